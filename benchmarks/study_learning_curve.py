"""The learning curve (issue 16): accuracy on real COD structures vs the number of training structures.

Each point trains the 1-D model (``model.kind: cnn1d``, ``cnn1d.*`` / ``pattern.*`` / ``conditions.*``
of the params file) on one source at one size with patterns drawn on the fly, early-stopped on synthetic
held-out patterns of its own training sources, and is then scored on

- the COD test split of the workspace (the official figure, comparable to ``dvc repro``'s), and
- every COD structure of the workspace whose compound (reduced formula) no training structure shares
  (``unseen``; all of them for the Materials Project and generated points), organic (C and H) apart.

Points: ``cod`` (COD's training split), ``mp1e3`` / ``mp1e4`` / ``mp1e5`` (nested seeded samples of the
Materials Project peak lists), ``mpall``, ``synth1e3``... (generated crystals), ``cod+mp1e5`` (both).
One MLflow parent run (``learning-curve-cnn1d-<mode>``) holds a child run per point; each finished
point is written to ``--out`` at once, so an interrupted study resumes at the next point (and the point
in progress resumes from its last epoch through Keras' ``BackupAndRestore``).

    cd <workspace with data/cifs, data/patterns, data/split>   # e.g. a clone after `dvc repro split`
    python <repo>/benchmarks/study_learning_curve.py --peaklists data/peaklists \\
        --points cod mp1e3 mp1e4 mp1e5 --epochs 12 --per-epoch 16384

Writes ``benchmarks/results/learning_curve.json`` (a list of ``{model_kind, label_mode, source, n_train,
accuracy, ci_low, ci_high, balanced_accuracy, top5_accuracy, n_real_scored, ...}``) in the repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import resource
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "learning_curve.json"
SIZES = {"1e3": 1000, "1e4": 10000, "1e5": 100000, "all": 0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def point_table(point: str, cod: Any, args: argparse.Namespace, params: Any) -> Any:
    """The training structures of a point such as ``cod``, ``mp1e4``, ``synthall`` or ``cod+mp1e5``."""
    from xrdvision.data.peak_table import concat, select, shard_table, split_ids

    parts = []
    for part in point.split("+"):
        if part == "cod":
            parts.append(select(cod, split_ids(Path("data/split"), "train")))
            continue
        m = re.fullmatch(r"(mp|synth)(1e3|1e4|1e5|all)", part)
        if not m:
            raise SystemExit(f"--points: unknown point {part!r} (cod, mp1e3..mpall, synth1e3..synthall)")
        folder = args.peaklists if m.group(1) == "mp" else args.generated
        table = shard_table(folder, m.group(1))
        n = SIZES[m.group(2)] or len(table)
        order = np.random.default_rng(params.seed).permutation(len(table))  # nested: 1e3 inside 1e4
        parts.append(table.subset(np.sort(order[: min(n, len(table))])))
    return concat(parts)


def score(model: Any, params: Any, cod: Any, table: Any) -> dict[str, Any]:
    """Official test-split figures and the unseen-COD figures of one trained model."""
    from xrdvision.crystal.labels import class_names
    from xrdvision.data.peak_table import select, split_ids
    from xrdvision.models.evaluate import classification_metrics, named, unseen_figures
    from xrdvision.models.score_patterns import pattern_probabilities
    from xrdvision.models.train_cnn1d import encode

    mode = params.labels.mode
    classes = class_names(mode)
    test = select(cod, split_ids(Path("data/split"), "test"))
    probs = pattern_probabilities(model, test, params)
    out = named(classification_metrics(probs, encode(test, mode, classes), classes, params.seed), "test")
    seen = set(table.reduced_formula.tolist())
    out |= unseen_figures(model, params, cod, seen, params.seed)
    return out


def curve_row(
    kind: str, mode: str, point: str, n_train: int, figures: dict[str, Any], info: dict[str, Any]
) -> dict[str, Any]:
    """The fields every curve point has (learning_curve.json), from its unseen-COD figures."""
    return {
        "model_kind": kind,
        "label_mode": mode,
        "source": point,
        "n_train": n_train,
        "accuracy": figures["unseen_accuracy"],
        "ci_low": figures["unseen_accuracy_ci95_low"],
        "ci_high": figures["unseen_accuracy_ci95_high"],
        "balanced_accuracy": figures["unseen_balanced_accuracy"],
        "top5_accuracy": figures.get("unseen_top5_accuracy"),
        "n_real_scored": figures["n_unseen"],
        "scored_on": "COD structures whose compound no training structure shares",
        "epochs_run": info["epochs_run"],
        "best_epoch": info["best_epoch"],
    }


def run_point(point: str, args: argparse.Namespace, params: Any, cod: Any, parent_id: str) -> dict[str, Any]:
    import mlflow

    from xrdvision.models.train import mlflow_epoch_callback
    from xrdvision.models.train_cnn1d import fit_cnn1d
    from xrdvision.tracking import runs

    table = point_table(point, cod, args, params)
    log(f"{point}: {len(table)} training structures")
    backup = Path("data/cache/learning_curve") / f"{params.labels.mode}-{point}-{runs.params_digest(params)}"
    with mlflow.start_run(run_name=f"{point}-{len(table)}", nested=True, parent_run_id=parent_id):
        mlflow.log_params({"point": point, "n_train": len(table), **params.flat()})
        mlflow.set_tags({"model_kind": "cnn1d", "label_mode": params.labels.mode, "source": point})
        t0 = time.perf_counter()
        model, _, info = fit_cnn1d(
            params, table=table, extra_callbacks=[mlflow_epoch_callback()], backup_dir=backup, verbose=2
        )
        train_s = time.perf_counter() - t0
        figures = score(model, params, cod, table)
        mlflow.log_metrics({k: float(v) for k, v in figures.items() if isinstance(v, int | float)})
        mlflow.log_metrics({"temperature": info["temperature"], "train_seconds": train_s})
    row = {
        **curve_row("cnn1d", params.labels.mode, point, len(table), figures, info),
        "train_seconds": round(train_s, 1),
        "temperature": round(info["temperature"], 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **{k: v for k, v in figures.items() if k.startswith(("test_", "unseen_", "n_"))},
    }
    log(
        f"{point}: unseen accuracy {row['accuracy']:.1%} ({row['ci_low']:.1%}-{row['ci_high']:.1%}, "
        f"n={row['n_real_scored']}), test split {figures['test_accuracy']:.1%}, {train_s:.0f} s"
    )
    return row


def cod_clean_features(front: Any, cod: Any, params: Any) -> np.ndarray:
    """VGG16 features of every COD structure's clean image, cached in ``data/cache`` under a key of the
    structures and the image settings (scoring images are the same at every point of the curve)."""
    import hashlib

    from xrdvision.models.measured_images import table_features

    key = hashlib.sha256(
        json.dumps(
            [list(map(str, cod.ids)), dataclasses.asdict(params.pattern), dataclasses.asdict(params.render)],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    path = Path("data/cache") / f"vgg16_cod_clean_{key}.npy"
    if path.is_file():
        log(f"vgg16 COD clean features from {path}")
        return np.load(path)
    feats = table_features(front, cod, params, True, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, feats)
    tmp.replace(path)
    return feats


def run_vgg_point(
    point: str, args: argparse.Namespace, params: Any, cod: Any, parent_id: str
) -> dict[str, Any]:
    """VGG16 (the default head-only recipe) on images of the same structures, drawn from the same
    generator once per structure (the feature cache makes a fresh draw per epoch unaffordable: 4-7
    images/s), early-stopped on the same kind of synthetic held-out images, scored like the 1-D model."""
    import mlflow

    from xrdvision.crystal.labels import class_names
    from xrdvision.data.peak_table import split_ids
    from xrdvision.models.evaluate import classification_metrics, named
    from xrdvision.models.measured_images import table_features
    from xrdvision.models.score_patterns import unseen_mask
    from xrdvision.models.train import fit_tail, mlflow_epoch_callback
    from xrdvision.models.train_cnn1d import encode, split_holdout
    from xrdvision.models.vgg16 import build_model

    mode = params.labels.mode
    classes = class_names(mode)
    vp = dataclasses.replace(params, model=dataclasses.replace(params.model, kind="vgg16"))
    table = point_table(point, cod, args, vp)
    train, hold = split_holdout(vp, table)
    log(f"vgg16 {point}: {len(train)} training structures, {len(hold)} held out")
    front = build_model(len(classes), vp.model, seed=vp.seed).front
    t0 = time.perf_counter()
    feats = {
        "train": table_features(front, train, vp, False, 1),
        "val": table_features(front, hold, vp, False, 2),
    }
    test_idx = np.flatnonzero(np.isin(cod.ids, list(split_ids(Path("data/split"), "test"))))
    unseen_idx = np.flatnonzero(unseen_mask(cod, set(table.reduced_formula.tolist())))
    test, unseen = cod.subset(test_idx), cod.subset(unseen_idx)
    clean_cod = cod_clean_features(front, cod, vp)  # the same clean images at every point: cached
    feats["test"], feats["unseen"] = clean_cod[test_idx], clean_cod[unseen_idx]
    feature_s = time.perf_counter() - t0
    data = {
        "train": {"features": feats["train"], mode: train.labels(mode)},
        "val": {"features": feats["val"], mode: hold.labels(mode)},
    }
    with mlflow.start_run(run_name=f"vgg16-{point}-{len(table)}", nested=True, parent_run_id=parent_id):
        mlflow.log_params({"point": point, "n_train": len(table), **vp.flat()})
        mlflow.set_tags({"model_kind": "vgg16", "label_mode": mode, "source": point})
        net, _, info = fit_tail(
            vp, data["train"], data["val"], extra_callbacks=[mlflow_epoch_callback()], verbose=2
        )
        figures = {}
        for name, part, feat in (("test", test, feats["test"]), ("unseen", unseen, feats["unseen"])):
            probs = np.asarray(net.tail.predict(feat, batch_size=64, verbose=0))
            figures |= named(
                classification_metrics(probs, encode(part, mode, classes), classes, vp.seed), name
            )
        mlflow.log_metrics({k: float(v) for k, v in figures.items() if isinstance(v, int | float)})
        mlflow.log_metrics({"feature_seconds": feature_s, "train_seconds": info["seconds"]})
    row = {
        **curve_row("vgg16", mode, point, len(table), figures | {"n_unseen": len(unseen)}, info),
        "train_seconds": round(feature_s + info["seconds"], 1),
        "feature_seconds": round(feature_s, 1),
        **{k: v for k, v in figures.items() if k.startswith(("test_", "unseen_"))},
    }
    log(f"vgg16 {point}: unseen accuracy {row['accuracy']:.1%}, test split {figures['test_accuracy']:.1%}")
    return row


def study_params(p: Any, args: argparse.Namespace) -> Any:
    """The params a study trains with: ``p`` with the command line's label mode and training budget."""
    return dataclasses.replace(
        p,
        labels=dataclasses.replace(p.labels, mode=args.mode),
        model=dataclasses.replace(p.model, kind="cnn1d"),
        train=dataclasses.replace(p.train, epochs=args.epochs, batch_size=args.batch, learning_rate=args.lr),
        pattern=dataclasses.replace(p.pattern, patterns_per_epoch=args.per_epoch),
    )


def write_plot_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """The curve as ``dvc plots`` reads it: one row per point."""
    import csv

    from xrdvision.formats.atomic import atomic_open

    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["model_kind", "label_mode", "source", "n_train", "accuracy", "ci_low", "ci_high"])
        for r in rows:
            w.writerow(
                [r[k] for k in ("model_kind", "label_mode", "source", "n_train")]
                + [f"{r[k]:.4f}" for k in ("accuracy", "ci_low", "ci_high")]
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--peaklists", default="data/peaklists")
    ap.add_argument("--generated", default="data/generated")
    ap.add_argument("--points", nargs="+", default=["cod", "mp1e3", "mp1e4", "mp1e5"])
    ap.add_argument("--mode", default="crystal_system", choices=["crystal_system", "space_group"])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--per-epoch", type=int, default=16384, help="patterns drawn per epoch")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--kind", default="cnn1d", choices=["cnn1d", "vgg16"])
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="an ablation: params changed for these points (e.g. cnn1d.architecture=plain); its rows are "
        "named <point>/<changes>",
    )
    ap.add_argument("--plot", type=Path, default=ROOT / "plots" / "learning_curve.csv")
    args = ap.parse_args()

    import mlflow

    from xrdvision.cli import configure_logging
    from xrdvision.config import load_params
    from xrdvision.data.peak_table import cod_table
    from xrdvision.formats.atomic import write_json
    from xrdvision.tracking import runs

    configure_logging()  # the library's progress (VGG16 features) on stderr
    p = load_params(args.params)
    params = study_params(p, args)
    if args.set:
        import yaml

        from xrdvision.models.search_space import apply_overrides

        changes = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
        params = apply_overrides(params, changes)
    suffix = "/" + ",".join(args.set) if args.set else ""
    rows: list[dict[str, Any]] = json.loads(args.out.read_text())["points"] if args.out.is_file() else []
    done = {(r["model_kind"], r["label_mode"], r["source"]) for r in rows}
    run = run_point if args.kind == "cnn1d" else run_vgg_point
    cod = cod_table(params)
    log(f"COD: {len(cod)} structures")
    runs.setup(params.mlflow)
    runs.use_experiment(params.mlflow)
    name = f"learning-curve-{args.mode}"
    found = mlflow.search_runs(filter_string=f"tags.mlflow.runName = '{name}'", max_results=1)
    parent_id = str(found["run_id"].iloc[0]) if len(found) else None
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else name) as parent:
        mlflow.set_tags({"label_mode": args.mode, "study": "learning_curve"})
        for point in args.points:
            if (args.kind, args.mode, point + suffix) in done:
                log(f"{args.kind} {point + suffix}: done already, skipped")
                continue
            row = run(point, args, params, cod, parent.info.run_id)
            budget = {
                "epochs": args.epochs,
                "patterns_per_epoch": args.per_epoch,
                "batch": args.batch,
                "lr": args.lr,
            }
            rows.append(row | {"source": point + suffix, "changes": args.set, "budget": budget})
            write_plot_csv(rows, args.plot)
            write_json(
                args.out,
                {
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
                    "defaults": {  # params.yaml's; a row's changes and budget say what differed
                        "cnn1d": dataclasses.asdict(p.cnn1d),
                        "pattern": dataclasses.asdict(p.pattern),
                        "conditions": dataclasses.asdict(p.conditions),
                    },
                    "points": rows,
                },
            )


if __name__ == "__main__":
    main()
