"""Does the fitted generator teach real crystals? Synthetic-only training scored on real COD (issue 18).

The stage (``xrdvision generate``) scores the peer on the pipeline's own validation + test split, which
in a small run is a few dozen structures. This study does the same on all 852 COD structures of
../shared/cod, split as the split stage would split them (seed 42, 70/20/10, grouped by compound):

1. statistics fitted on COD's training part (without any structure whose reduced formula is that of a
   validation or test structure) plus ``--mp-fit`` Materials Project structures (the same formulas
   dropped): the stage's own functions (:func:`xrdvision.data.generate_inputs.fit`);
2. ``max(--sizes)`` crystals drawn, simulated and labelled in shards by the stage's shard task
   (:func:`xrdvision.data.generate.build_shard`), cached and resumable (``data/cache/study_generate``);
   the throughput and the peak RSS of that run are the 10^5 figures;
3. the peak-list peer (:mod:`xrdvision.models.peak_peer`, 200 trees, leaves >= 2) trained on the first
   10^3, 10^4, 10^5 synthetic crystals only, on as many Materials Project structures (the MP transfer
   study's nested leakage-free samples and features, when its cache is there), on COD's training part
   (the same protocol's real-only figure), and on COD training + 10^5 synthetic; all scored on COD
   validation + test (accuracy with a 95 % bootstrap interval, apart for C-and-H structures);
4. the realism KS statistics on this larger fit (as the stage computes them).

    nice -n 10 .venv/bin/python benchmarks/study_generate.py [--sizes 1000 10000 100000] [--mp-fit 20000]

Writes ``benchmarks/results/study_generate.json`` (everything) and ``metrics/generate_study.json`` (the
headline figures: ``synth_only_accuracy_1e3`` ...).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("XRDVISION_SHARED", ROOT.parent / "shared"))
CACHE = ROOT / "data" / "cache" / "study_generate"
MP_CACHE = ROOT / "data" / "cache" / "study_mp_transfer"
RESULTS = ROOT / "benchmarks" / "results" / "study_generate.json"
METRICS = ROOT / "metrics" / "generate_study.json"
REAL_ONLY_CV_ACCURACY = 0.582  # README: the peer by grouped 5-fold CV on the 852 COD structures


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cod_split(args: argparse.Namespace, params: Any) -> tuple[Any, dict[str, str]]:
    from xrdvision.data.cod_set import CodSet, build_cod_set, pipeline_split

    lab = params.labels
    path = MP_CACHE / f"cod_set_symprec{lab.symprec}_angle{lab.angle_tolerance}.npz"
    if path.exists():
        cod = CodSet.load(path)
    else:
        cod = build_cod_set(
            sorted((SHARED / "cod").glob("*.cif")), lab.symprec, lab.angle_tolerance, workers=2
        )
        cod.save(path)
    fractions = {"train": params.split.train, "val": params.split.val, "test": params.split.test}
    return cod, pipeline_split(cod, cod.ids, fractions, params.seed)


def statistics(
    args: argparse.Namespace, params: Any, cod: Any, split: dict[str, str]
) -> tuple[str, set[str]]:
    from xrdvision.data.generate_inputs import fit
    from xrdvision.data.mp_source import read_mp_records

    held = {str(f) for x, f in zip(cod.ids, cod.reduced_formula, strict=True) if split[x] != "train"}
    train = [
        x for x, f in zip(cod.ids, cod.reduced_formula, strict=True) if split[x] == "train" and f not in held
    ]
    path = CACHE / f"stats_seed{params.seed}_cod{len(train)}_mp{args.mp_fit}.json"
    if path.exists():
        return path.read_text(), held
    paths = [str(SHARED / "cod" / f"{x}.cif") for x in train]
    chunks: list[tuple[str, list[Any]]] = [("cif", paths[k : k + 50]) for k in range(0, len(paths), 50)]
    info: dict[str, Any] = {
        "reference": "COD validation + test of the 852 (study split)",
        "n_cod_train": len(train),
    }
    if args.mp_fit:
        errors: list[str] = []
        records = [
            {"id": r["id"], "cell": r["cell"], "species": r["species"], "frac": r["frac"]}
            for r in read_mp_records(
                SHARED / "mp",
                max_structures=args.mp_fit,
                seed=params.seed,
                exclude_formulas=held,
                errors=errors,
            )
        ]
        chunks += [("records", records[k : k + 500]) for k in range(0, len(records), 500)]
        info["n_mp"] = len(records)
        log(f"MP: {len(records)} structures read for the fit")
    t0 = time.perf_counter()
    stats = fit(params, chunks, info)
    log(
        f"statistics fitted on {stats['sources']} in {time.perf_counter() - t0:.0f} s: "
        f"levels {stats['levels_used']}"
    )
    text = json.dumps(stats, indent=1) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text, held


def generate(params: Any, stats_text: str, folder: Path) -> dict[str, Any]:
    """The stage's shards of ``params.generate.n_crystals`` crystals in ``folder`` (kept while their
    plan holds)."""
    from xrdvision.data.generate import build_shard, plan_tasks
    from xrdvision.data.shard_runner import run_tasks
    from xrdvision.formats.peaklists import shard_plan, write_shard_bytes

    folder.mkdir(parents=True, exist_ok=True)
    tasks = plan_tasks(params, stats_text)
    todo = [t for t in tasks if shard_plan(folder / f"{t.name}.npz") != t.plan]
    log(f"generate: {len(todo)} of {len(tasks)} shards to build")
    t0, rss, done = time.perf_counter(), 0.0, 0
    for task, result, error in run_tasks(build_shard, todo, workers=params.generate.workers):
        if error is not None:
            raise RuntimeError(f"{task.name}: {error}")
        write_shard_bytes(folder / f"{task.name}.npz", result[0])
        rss, done = max(rss, result[1]), done + task.count
        if task.index % 10 == 0:
            el = time.perf_counter() - t0
            log(f"  {done} crystals in {el:.0f} s ({done / el:.0f}/s)")
    wall = time.perf_counter() - t0
    main_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    built = sum(t.count for t in todo)
    return {
        "n_built": built,
        "wall_s": round(wall, 1),
        "crystals_per_s": round(built / wall, 1) if built else None,
        "peak_rss_mb_worker": round(rss),
        "peak_rss_mb_main": round(main_rss),
    }


def score(
    X: np.ndarray,
    y: np.ndarray,
    X_eval: np.ndarray,
    truth: np.ndarray,
    subsets: dict[str, np.ndarray],
    seed: int,
) -> dict[str, Any]:
    from xrdvision.crystal.labels import class_names
    from xrdvision.models.mp_transfer import train_and_score

    r = train_and_score(
        X,
        y,
        X_eval,
        truth,
        class_names("crystal_system"),
        subsets,
        seed,
        n_estimators=200,
        min_samples_leaf=2,
        n_jobs=2,
        random_state=0,
    )
    m = r["cod"]["val_test"]
    log(
        f"  n={r['n_train']:6d}: {100 * m['accuracy']:.1f} % "
        f"({100 * m['accuracy_ci95_low']:.1f}-{100 * m['accuracy_ci95_high']:.1f}), fit {r['fit_seconds']} s"
    )
    return r


def mp_sets(sizes: list[int]) -> tuple[Any, dict[int, np.ndarray]]:
    """The MP transfer study's nested samples and their features (None if its cache is not here)."""
    from xrdvision.models.mp_transfer import Featurised

    sel = sorted(MP_CACHE.glob("selection_seed42_*.json"))
    feats = sorted(MP_CACHE.glob("mp_features_seed42_*.npz"))
    if not sel or not feats:
        return None, {}
    sets = json.loads(sel[-1].read_text())["sets"]
    f = Featurised.load(feats[-1])
    names = {1000: "1e3", 10000: "1e4", 100000: "1e5"}
    return f, {n: f.rows_of(e[2] for e in sets[names[n]]) for n in sizes if names.get(n) in sets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--mp-fit", type=int, default=20000, help="Materials Project structures in the fit")
    ap.add_argument(
        "--min-distance-ablation",
        type=int,
        default=10000,
        help="crystals drawn with min_distance 0 (0: skip)",
    )
    args = ap.parse_args()
    from xrdvision.config import load_params, parse_params
    from xrdvision.data.generate_report import peak_quantities, realism, shard_quantities
    from xrdvision.data.mp_source import crystal_system_of
    from xrdvision.models.peak_peer import feature_matrix
    from xrdvision.models.synth_peer import size_key, synthetic_set

    t_start = time.perf_counter()
    base = load_params(ROOT / "params.yaml")
    g = {k: getattr(base.generate, k) for k in ("prior", "max_atoms", "min_distance")}
    n_max = max(args.sizes)
    params = parse_params({"generate": {**g, "n_crystals": n_max, "shard_size": 1000, "workers": 2}})
    cod, split = cod_split(args, params)
    stats_text, _ = statistics(args, params, cod, split)
    stats = json.loads(stats_text)
    folder = CACHE / f"shards_cod{stats['sources']['cod']}_mp{stats['sources']['mp']}"
    run = generate(params, stats_text, folder)
    saved = folder / "run.json"
    if run["n_built"] == 0 and saved.exists():
        run = json.loads(saved.read_text())  # the figures of the run that built them
    elif run["n_built"] == n_max:
        saved.write_text(json.dumps(run))
    log(f"generate: {run}")
    X, y, index = synthetic_set(folder)
    eval_mask = np.array([split[x] != "train" for x in cod.ids])
    X_cod = feature_matrix((cod.peaks(i)[1], cod.peaks(i)[2]) for i in range(len(cod)))
    X_eval, truth = X_cod[eval_mask], cod.crystal_system[eval_mask]
    ch = cod.has_c_and_h[eval_mask]
    subsets = {"val_test": np.ones(len(truth), bool), "c_and_h": ch, "rest": ~ch}
    runs: dict[str, Any] = {}
    log(f"scored on {len(truth)} COD validation + test structures")
    for n in args.sizes:
        log(f"synthetic only, first {n} drawn:")
        runs[f"synth_{size_key(n)}"] = score(X[index < n], y[index < n], X_eval, truth, subsets, params.seed)
    feats, rows = mp_sets(args.sizes)
    for n, r in rows.items():
        log(f"Materials Project only, {n}:")
        runs[f"mp_{size_key(n)}"] = score(feats.X[r], feats.label[r], X_eval, truth, subsets, params.seed)
    train_mask = np.array([split[x] == "train" for x in cod.ids])
    log("COD training part only:")
    runs["cod_train"] = score(
        X_cod[train_mask], cod.crystal_system[train_mask], X_eval, truth, subsets, params.seed
    )
    log(f"COD training part + {n_max} synthetic:")
    Xb, yb = np.concatenate([X_cod[train_mask], X]), np.concatenate([cod.crystal_system[train_mask], y])
    runs[f"cod_train_plus_synth_{size_key(n_max)}"] = score(Xb, yb, X_eval, truth, subsets, params.seed)
    if args.min_distance_ablation:
        n = args.min_distance_ablation
        p0 = parse_params(
            {"generate": {**g, "min_distance": 0.0, "n_crystals": n, "shard_size": 1000, "workers": 2}}
        )
        run0 = generate(p0, stats_text, folder.with_name(folder.name + "_mindist0"))
        X0, y0, _ = synthetic_set(folder.with_name(folder.name + "_mindist0"))
        log(f"synthetic only, {n} drawn with no minimum-distance check ({run0}):")
        runs[f"synth_{size_key(n)}_min_distance_0"] = score(X0, y0, X_eval, truth, subsets, params.seed)
        runs[f"synth_{size_key(n)}_min_distance_0"]["n_drawn"] = n
    files = sorted(folder.glob("synth-*.npz"))
    real = dict(stats["real"])
    real["crystal_system"] = [crystal_system_of(s) for s in real["space_group"]]
    train_lists = [(cod.peaks(i)[0], cod.peaks(i)[1]) for i in np.flatnonzero(train_mask)]
    real |= peak_quantities(train_lists)
    from xrdvision.data.generate_report import generated_cells
    from xrdvision.data.generator_sample import Sampler

    generated = generated_cells(
        Sampler(stats, params.generate.max_atoms), params.generate.prior, 2000, params.seed
    )
    generated |= shard_quantities(files[:10])
    ks = realism(real, generated)
    from xrdvision.formats.peaklists import read_shard

    n_ok = n_diff = n_failed = 0
    for path in files:
        s = read_shard(path)
        n_ok += len(s)
        n_failed += len(s.failed_ids)
        n_diff += int(np.sum(s.space_group != s.source_space_group))
    mismatch = n_diff / max(n_ok, 1)
    result = {
        "machine": platform.machine(),
        "seed": params.seed,
        "n_cod": len(cod),
        "n_scored": len(truth),
        "n_scored_c_and_h": int(ch.sum()),
        "fit": {
            "sources": stats["sources"],
            "levels_used": stats["levels_used"],
            "selection": stats["selection"],
        },
        "generate": {
            **run,
            "n_crystals": n_max,
            "n_simulated": n_ok,
            "n_failed": n_failed,
            "space_group_mismatch_rate": round(mismatch, 4),
        },
        "realism": ks,
        "runs": runs,
        "real_only_cv_accuracy": REAL_ONLY_CV_ACCURACY,
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    metrics: dict[str, Any] = {"n_scored": len(truth), "real_only_cv_accuracy": REAL_ONLY_CV_ACCURACY}
    for name, r in runs.items():
        if name.startswith("synth_"):
            label = "synth_only_accuracy_" + name.removeprefix("synth_")
        elif name.startswith("mp_"):
            label = "mp_only_accuracy_" + name.removeprefix("mp_")
        else:
            label = f"{name}_accuracy"
        m = r["cod"]["val_test"]
        metrics |= {label: m["accuracy"], f"{label}_ci95_low": m["accuracy_ci95_low"]}
        metrics |= {
            f"{label}_ci95_high": m["accuracy_ci95_high"],
            f"{label}_c_and_h": r["cod"]["c_and_h"]["accuracy"],
        }
    metrics |= {
        "crystals_per_s_1e5_run": run["crystals_per_s"],
        "peak_rss_mb_1e5_run": max(run["peak_rss_mb_worker"], run["peak_rss_mb_main"]),
        "space_group_mismatch_rate": round(mismatch, 4),
        "failed_rate": round(n_failed / max(n_max, 1), 4),
        **ks,
    }
    for path, obj in ((RESULTS, result), (METRICS, metrics)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    log(f"wrote {RESULTS} and {METRICS}")


if __name__ == "__main__":
    main()
