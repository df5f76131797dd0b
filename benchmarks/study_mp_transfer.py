"""What Materials Project training data buys on real COD structures (issue 15, part 6).

Two measures, each trained on Materials Project structures only and scored on COD, which then is an
external test set (nothing of COD is trained on):

``peer``: the peak-list extra-trees peer of ``study_representation.py`` (58.2 % by grouped 5-fold CV
on the 852 COD structures, trained on ~680 real ones per fold) trained on seeded random samples of
10^3, 10^4 and 10^5 Materials Project structures (nested: the smaller inside the larger), on all the
ICSD-linked ones, and on a sample of all of the same size as that, then scored on all COD structures,
on those with carbon and hydrogen (organic, metal-organic) and on the rest. Held out: every Materials
Project structure whose reduced formula is that of any of the scored COD structures (the counts are
reported). Labels on both sides are the project's own (spglib at ``labels.symprec``); how often the
Materials Project structures' own space group differs from the shard's ``sg`` is reported too.

``vgg``: the training model's head (frozen VGG16 block5 features, ``model.*``/``train.*`` of
params.yaml) trained on as many rendered Materials Project structures (drawn from the same 10^4
sample, 10 % of them for early stopping) as ``--budget-s`` of VGG16 time allows, scored on all COD
structures and on the default run's test split (the 72 structures ``dvc repro`` tests on).

    .venv/bin/python benchmarks/study_mp_transfer.py peer [--sizes 1000 10000 100000] [--trees 200]
    .venv/bin/python benchmarks/study_mp_transfer.py vgg [--budget-s 1200] [--max-mp 10000]

Both write ``benchmarks/results/study_mp_transfer.json`` (everything) and ``metrics/mp_transfer.json``
(the headline figures), each adding its own part. The COD set, the selection and the features are
cached in ``data/cache/study_mp_transfer`` (delete it to start over).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("XRDVISION_SHARED", ROOT.parent / "shared"))
CACHE = ROOT / "data" / "cache" / "study_mp_transfer"
RESULTS = ROOT / "benchmarks" / "results" / "study_mp_transfer.json"
METRICS = ROOT / "metrics" / "mp_transfer.json"
REAL_ONLY_CV = ROOT / "benchmarks" / "results" / "study_representation.json"
# README, "What limits it": the peer by grouped 5-fold CV (2 shuffles) on the 852 COD structures
REAL_ONLY_CV_ACCURACY = 0.582
SIZE_NAMES = {1000: "1e3", 10000: "1e4", 100000: "1e5"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cod_set(args: argparse.Namespace, params: Any) -> Any:
    """Every COD CIF labelled and simulated once (cached per labels setting)."""
    from xrdvision.data.cod_set import CodSet, build_cod_set

    lab = params.labels
    path = args.cache / f"cod_set_symprec{lab.symprec}_angle{lab.angle_tolerance}.npz"
    if path.exists():
        return CodSet.load(path)
    cod = build_cod_set(
        sorted(args.cod.glob("*.cif")), lab.symprec, lab.angle_tolerance, workers=args.workers
    )
    cod.save(path)
    log(f"COD: {len(cod)} structures labelled and simulated, {len(cod.failed)} failed ({cod.seconds:.0f} s)")
    return cod


def cod_subsets(args: argparse.Namespace, cod: Any, params: Any) -> dict[str, np.ndarray]:
    """Where the scores are taken: all COD, with C and H, the rest, and the default run's test split."""
    from xrdvision.data.cod_set import pipeline_split
    from xrdvision.data.embedded import canonical_ids

    canonical = canonical_ids(args.cod / "INDEX.csv", args.cod / "SOURCES.csv")
    fractions = {"train": params.split.train, "val": params.split.val, "test": params.split.test}
    split = pipeline_split(cod, canonical, fractions, params.seed)
    sizes = {s: sum(v == s for v in split.values()) for s in ("train", "val", "test")}
    log(f"the default run's split of the {len(canonical)} canonical COD structures: {sizes}")
    return {
        "all": np.ones(len(cod), bool),
        "c_and_h": cod.has_c_and_h,
        "rest": ~cod.has_c_and_h,
        "default_test_split": np.array([split.get(i) == "test" for i in cod.ids]),
    }


def selection(args: argparse.Namespace, cod: Any) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The training sets (catalogue entries by name) and the counts: one pass over the shards, cached."""
    from xrdvision.data.mp_source import Entry, catalogue, mp_shards, sample
    from xrdvision.models.mp_transfer import select

    path = args.cache / f"selection_seed{args.seed}_{'-'.join(map(str, args.sizes))}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        return saved["counts"], {k: [Entry(*e) for e in v] for k, v in saved["sets"].items()}
    t0 = time.perf_counter()
    errors: list[str] = []
    entries = list(catalogue(mp_shards(args.mp, errors), errors))
    sel = select(entries, set(cod.reduced_formula.tolist()), args.sizes, args.seed)
    sets = {SIZE_NAMES.get(n, str(n)): e for n, e in sel["sizes"].items()}
    sets["icsd_only"] = sel["icsd"]
    sets["all_at_icsd_size"] = sample(sel["kept"], len(sel["icsd"]), args.seed)
    counts = {k: v for k, v in sel.items() if k.startswith("n_")}
    counts["dropped_formulas"] = sel["dropped_formulas"]
    counts |= {"n_icsd_left": len(sel["icsd"]), "catalogue_errors": errors}
    counts["catalogue_seconds"] = round(time.perf_counter() - t0, 1)
    log(
        f"MP: {counts['n_catalogue']} structures, {counts['n_dropped']} dropped (formula in COD), "
        f"{counts['n_left']} left ({len(sel['icsd'])} ICSD-linked); {counts['catalogue_seconds']} s"
    )
    as_lists = {k: [list(dataclasses.astuple(e)) for e in v] for k, v in sets.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"counts": counts, "sets": as_lists}))
    return counts, sets


def run_peer(args: argparse.Namespace) -> None:
    from xrdvision.config import load_params
    from xrdvision.crystal.labels import class_names
    from xrdvision.crystal.powder import PowderSettings
    from xrdvision.data.mp_source import crystal_system_of
    from xrdvision.models.mp_transfer import (
        Featurised,
        disagreement_rate,
        element_set,
        featurise_shards,
        shard_tasks,
    )
    from xrdvision.models.peak_peer import feature_matrix

    t_start = time.perf_counter()
    params = load_params(args.params)
    classes = class_names("crystal_system")
    cod = cod_set(args, params)
    X_cod = feature_matrix((cod.peaks(i)[1], cod.peaks(i)[2]) for i in range(len(cod)))
    subsets = cod_subsets(args, cod, params)
    counts, sets = selection(args, cod)
    # Stricter than the rule: no Materials Project structure of the same elements as any COD structure
    # (largest sample), and scores apart on the COD compounds the Materials Project has (then dropped).
    largest_name = SIZE_NAMES.get(max(args.sizes), str(max(args.sizes)))
    cod_systems = {element_set(f) for f in cod.reduced_formula}
    sets[f"{largest_name}_no_cod_element_set"] = [
        e for e in sets[largest_name] if element_set(e.reduced_formula) not in cod_systems
    ]
    in_mp = np.isin(cod.reduced_formula, counts["dropped_formulas"])
    subsets |= {"formula_in_mp": in_mp, "formula_not_in_mp": ~in_mp}
    sim = params.simulate
    settings = PowderSettings(sim.wavelength, sim.two_theta_min, sim.two_theta_max)
    union = {e.id: e for entries in sets.values() for e in entries}  # the strict set is in the largest
    feat_path = args.cache / f"mp_features_seed{args.seed}_{len(union)}.npz"
    if feat_path.exists():
        feats = Featurised.load(feat_path)
    else:
        log(f"featurising {len(union)} MP structures on {args.workers} processes")
        tasks = shard_tasks(union.values(), args.chunk)

        def progress(done: int, n: int) -> None:
            if done % 20 == 0 or done == n:
                log(f"  {done}/{n} tasks")

        feats = featurise_shards(
            args.mp,
            tasks,
            symprec=params.labels.symprec,
            angle_tolerance=params.labels.angle_tolerance,
            settings=settings,
            workers=args.workers,
            progress=progress,
        )
        feats.save(feat_path)
    log(f"featurised {len(feats)} ({len(feats.errors)} errors) in {feats.seconds:.0f} s")
    shard_system = np.array([crystal_system_of(g) if g > 0 else "" for g in feats.shard_space_group])
    known = shard_system != ""
    result: dict[str, Any] = {
        "machine": platform.machine(),
        "seed": args.seed,
        "n_cod_scored": len(cod),
        "n_cod_c_and_h": int(cod.has_c_and_h.sum()),
        "n_cod_formula_in_mp": int(in_mp.sum()),
        "cod_set_seconds": round(cod.seconds, 1),
        "cod_failed": cod.failed,
        "mp_counts": counts,
        "n_mp_featurised": len(feats),
        "mp_featurise_errors": len(feats.errors),
        "mp_featurise_error_examples": list(feats.errors.values())[:20],
        "mp_featurise_seconds": round(feats.seconds, 1),
        "label_disagreement_rate": disagreement_rate(feats.space_group, feats.shard_space_group),
        "label_disagreement_rate_crystal_system": float(np.mean(feats.label[known] != shard_system[known])),
        "peer": {
            "n_estimators": args.trees,
            "min_samples_leaf": args.min_leaf,
            "max_features": args.max_features,
            "n_jobs": args.n_jobs,
        },
        "real_only_cv_accuracy": real_only_cv(),
        "runs": {},
    }
    for name, entries in sets.items():
        rows = feats.rows_of(e.id for e in entries)
        result["runs"][name] = fit_and_score(args, feats, rows, X_cod, cod, classes, subsets)
        r = result["runs"][name]
        log(
            f"{name:>17}: n={r['n_train']:6d}  COD {pct(r['cod']['all'])}  C&H {pct(r['cod']['c_and_h'])}  "
            f"rest {pct(r['cod']['rest'])}  test split {pct(r['cod']['default_test_split'])}  "
            f"(fit {r['fit_seconds']} s)"
        )
    rng = np.random.default_rng(args.seed + 1)
    largest = feats.rows_of(e.id for e in sets[largest_name])
    for n in [s for s in args.sizes if s < max(args.sizes)]:
        accs = []
        for _ in range(args.repeats):  # a random sample of a random sample is a random sample
            rows = np.sort(rng.choice(largest, n, replace=False))
            accs.append(
                fit_and_score(args, feats, rows, X_cod, cod, classes, subsets)["cod"]["all"]["accuracy"]
            )
        result["runs"][SIZE_NAMES.get(n, str(n))]["other_draws_accuracy"] = accs
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_outputs(args, result, metrics_from_peer(result), "peer_list")


def pct(m: dict[str, Any]) -> str:
    lo, hi = 100 * m["accuracy_ci95_low"], 100 * m["accuracy_ci95_high"]
    return f"{100 * m['accuracy']:.1f} % ({lo:.1f}-{hi:.1f})"


def fit_and_score(
    args: argparse.Namespace,
    feats: Any,
    rows: np.ndarray,
    X_cod: np.ndarray,
    cod: Any,
    classes: list[str],
    subsets: dict[str, np.ndarray],
) -> dict[str, Any]:
    from xrdvision.models.mp_transfer import train_and_score

    mf = args.max_features if args.max_features in ("sqrt", "log2") else float(args.max_features)
    peer = {"n_estimators": args.trees, "min_samples_leaf": args.min_leaf, "max_features": mf}
    return train_and_score(
        feats.X[rows],
        feats.label[rows],
        X_cod,
        cod.crystal_system,
        classes,
        subsets,
        args.seed,
        n_jobs=args.n_jobs,
        random_state=0,
        **peer,
    )


def real_only_cv() -> float:
    """The peer's real-only figure: study_representation.py's output if it is here, else the README's."""
    try:
        return json.loads(REAL_ONLY_CV.read_text())["results"]["peaks (extra trees)"]["accuracy"]
    except (OSError, KeyError, ValueError):
        return REAL_ONLY_CV_ACCURACY


def metrics_from_peer(result: dict[str, Any]) -> dict[str, Any]:
    runs = result["runs"]
    out: dict[str, Any] = {
        "n_mp_used": max(r["n_train"] for r in runs.values()),
        "n_mp_dropped_leakage": result["mp_counts"]["n_dropped"],
        "n_mp_left_after_leakage": result["mp_counts"]["n_left"],
        "label_disagreement_rate": result["label_disagreement_rate"],
        "n_cod_scored": result["n_cod_scored"],
        "real_only_cv_accuracy": result["real_only_cv_accuracy"],
    }
    for name, r in runs.items():
        key = f"peer_cod_accuracy_{name}"
        m = r["cod"]
        out |= {
            key: m["all"]["accuracy"],
            f"{key}_ci95_low": m["all"]["accuracy_ci95_low"],
            f"{key}_ci95_high": m["all"]["accuracy_ci95_high"],
            f"peer_cod_balanced_accuracy_{name}": m["all"]["balanced_accuracy"],
            f"peer_cod_c_and_h_accuracy_{name}": m["c_and_h"]["accuracy"],
            f"peer_cod_rest_accuracy_{name}": m["rest"]["accuracy"],
            f"peer_cod_test_split_accuracy_{name}": m["default_test_split"]["accuracy"],
            f"n_train_{name}": r["n_train"],
            f"fit_seconds_{name}": r["fit_seconds"],
        }
    for name, r in runs.items():
        if "other_draws_accuracy" in r:
            draws = [r["cod"]["all"]["accuracy"], *r["other_draws_accuracy"]]
            out[f"peer_cod_accuracy_{name}_draws_mean"] = float(np.mean(draws))
            out[f"peer_cod_accuracy_{name}_draws_sd"] = float(np.std(draws, ddof=1))
    out["label_disagreement_rate_crystal_system"] = result["label_disagreement_rate_crystal_system"]
    out |= {k: result[k] for k in ("n_mp_featurised", "n_cod_c_and_h", "n_cod_formula_in_mp")}
    out["n_mp_dropped_leakage_icsd"] = result["mp_counts"]["n_dropped_icsd"]
    out["cod_set_seconds"] = result["cod_set_seconds"]
    out["mp_catalogue_seconds"] = result["mp_counts"]["catalogue_seconds"]
    out["mp_featurise_seconds"] = result["mp_featurise_seconds"]
    out["peer_total_seconds"] = result["total_seconds"]
    return out


def write_outputs(args: argparse.Namespace, part: dict[str, Any], metrics: dict[str, Any], key: str) -> None:
    """Merge ``part`` under ``key`` into the results file and ``metrics`` into the metrics file."""
    for path, new in ((args.out, {key: part}), (args.metrics, metrics)):
        old = json.loads(path.read_text()) if path.exists() else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**old, **new}, indent=1, default=float) + "\n")
    log(f"wrote {args.out} and {args.metrics}")


def run_vgg(args: argparse.Namespace) -> None:
    from xrdvision.config import load_params
    from xrdvision.crystal.labels import class_names
    from xrdvision.crystal.powder import PowderSettings
    from xrdvision.models.mp_transfer import labelled_peak_lists, score_subsets, train_and_score
    from xrdvision.models.peak_images import fit_head, image_features, vgg_front
    from xrdvision.models.peak_peer import feature_matrix
    from xrdvision.models.vgg16 import resolve_weights

    params = load_params(args.params)
    classes = class_names("crystal_system")
    weights = resolve_weights(args.weights or params.model.weights, allow_download=False)
    cod = cod_set(args, params)
    subsets = cod_subsets(args, cod, params)
    counts, sets = selection(args, cod)
    pool = sets[SIZE_NAMES.get(args.pool_size, str(args.pool_size))]
    order = np.random.default_rng(args.seed).permutation(len(pool))[: args.max_mp]
    sim = params.simulate
    settings = PowderSettings(sim.wavelength, sim.two_theta_min, sim.two_theta_max)
    lab = params.labels
    _, lists, labels, bad = labelled_peak_lists(
        args.mp, [pool[k] for k in order], settings, lab.symprec, lab.angle_tolerance
    )
    front = vgg_front(params, weights)
    cod_path = args.cache / "cod_vgg_features.npy"
    t0 = time.perf_counter()
    if cod_path.exists():
        cod_feats = np.load(cod_path)
    else:
        cod_feats = image_features(
            front, ((cod.peaks(i)[0], cod.peaks(i)[1]) for i in range(len(cod))), params
        )
        np.save(cod_path, cod_feats)
    cod_seconds = time.perf_counter() - t0
    log(f"COD: {len(cod_feats)} images through VGG16 in {cod_seconds:.0f} s")

    t0 = time.perf_counter()

    def within_budget():
        for p in lists:
            if time.perf_counter() - t0 > args.budget_s:
                return
            yield p.two_theta, p.intensity

    def progress(n: int, seconds: float) -> None:
        if n % 320 == 0:
            log(f"  {n} MP images, {n / seconds:.1f}/s")

    mp_feats = image_features(front, within_budget(), params, progress=progress)
    mp_seconds = time.perf_counter() - t0
    n = len(mp_feats)
    y = labels[:n]
    is_val = np.arange(n) % args.val_every == 0
    log(f"MP: {n} images through VGG16 in {mp_seconds:.0f} s ({n / mp_seconds:.1f}/s)")
    t0 = time.perf_counter()
    tail, info = fit_head(params, (mp_feats[~is_val], y[~is_val]), (mp_feats[is_val], y[is_val]), weights)
    fit_seconds = time.perf_counter() - t0
    probs = np.asarray(tail.predict(cod_feats, batch_size=64, verbose=0))
    head = score_subsets(probs, cod.crystal_system, classes, subsets, params.seed)
    # the peak-list peer on exactly the same training structures, for a same-data comparison
    X_mp = feature_matrix((p.intensity, p.d) for p in lists[:n])
    X_cod = feature_matrix((cod.peaks(i)[1], cod.peaks(i)[2]) for i in range(len(cod)))
    same = train_and_score(
        X_mp[~is_val],
        y[~is_val],
        X_cod,
        cod.crystal_system,
        classes,
        subsets,
        params.seed,
        n_estimators=200,
        n_jobs=args.workers,
    )
    peer_scores = same["cod"]
    part = {
        "n_mp_train": int((~is_val).sum()),
        "n_mp_val": int(is_val.sum()),
        "mp_vgg_seconds": round(mp_seconds, 1),
        "mp_images_per_s": round(n / mp_seconds, 2),
        "budget_s": args.budget_s,
        "cod_vgg_seconds": round(cod_seconds, 1),
        "head_fit_seconds": round(fit_seconds, 1),
        "head": {
            "dense": list(params.model.dense),
            "dropout": params.model.dropout,
            "learning_rate": params.train.learning_rate,
            "epochs_run": info["epochs_run"],
            "best_epoch": info["best_epoch"],
            "val_accuracy": info["val_accuracy"],
        },
        "cod": head,
        "peer_same_structures_cod": peer_scores,
        "mp_errors": len(bad),
        "mp_counts": counts,
    }
    for name in ("all", "c_and_h", "rest", "default_test_split"):
        log(
            f"VGG16 head, {name}: {pct(head[name])} (n={head[name]['n_test']}); "
            f"peer on the same structures: {pct(peer_scores[name])}"
        )
    h = head["all"]
    t = head["default_test_split"]
    metrics = {
        "vgg_n_mp_train": part["n_mp_train"],
        "vgg_cod_accuracy": h["accuracy"],
        "vgg_cod_accuracy_ci95_low": h["accuracy_ci95_low"],
        "vgg_cod_accuracy_ci95_high": h["accuracy_ci95_high"],
        "vgg_cod_balanced_accuracy": h["balanced_accuracy"],
        "vgg_cod_test_split_accuracy": t["accuracy"],
        "vgg_cod_test_split_accuracy_ci95_low": t["accuracy_ci95_low"],
        "vgg_cod_test_split_accuracy_ci95_high": t["accuracy_ci95_high"],
        "vgg_n_cod_test_split": t["n_test"],
        "vgg_mp_seconds": part["mp_vgg_seconds"],
    }
    write_outputs(args, part, metrics, "vgg16_head")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    for name in ("peer", "vgg"):
        p = sub.add_parser(name)
        p.add_argument("--cod", type=Path, default=SHARED / "cod")
        p.add_argument("--mp", type=Path, default=SHARED / "mp")
        p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
        p.add_argument("--seed", type=int, default=42)
        p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
        p.add_argument("--workers", type=int, default=2, help="processes for simulation and labels")
        p.add_argument("--cache", type=Path, default=CACHE)
        p.add_argument("--out", type=Path, default=RESULTS)
        p.add_argument("--metrics", type=Path, default=METRICS)
    peer, vgg = sub.choices["peer"], sub.choices["vgg"]
    peer.add_argument("--trees", type=int, default=200)
    peer.add_argument("--min-leaf", type=int, default=2)
    peer.add_argument("--max-features", default="sqrt")
    peer.add_argument("--n-jobs", type=int, default=2)
    peer.add_argument("--repeats", type=int, default=3, help="other random draws at the smaller sizes")
    peer.add_argument("--chunk", type=int, default=500, help="structures per worker task")
    vgg.add_argument("--budget-s", type=float, default=1200, help="VGG16 seconds for the MP images")
    vgg.add_argument("--max-mp", type=int, default=10000)
    vgg.add_argument("--pool-size", type=int, default=10000, help="the --sizes sample the images come from")
    vgg.add_argument("--val-every", type=int, default=10, help="every k-th MP structure validates")
    vgg.add_argument("--weights", default="")
    a = ap.parse_args()
    run_peer(a) if a.part == "peer" else run_vgg(a)


if __name__ == "__main__":
    from xrdvision.errors import XrdVisionError

    try:
        main()
    except XrdVisionError as exc:
        raise SystemExit(f"study_mp_transfer: {exc}") from None
