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
        "model_kind": "cnn1d",
        "label_mode": params.labels.mode,
        "source": point,
        "n_train": len(table),
        "accuracy": figures["unseen_accuracy"],
        "ci_low": figures["unseen_accuracy_ci95_low"],
        "ci_high": figures["unseen_accuracy_ci95_high"],
        "balanced_accuracy": figures["unseen_balanced_accuracy"],
        "top5_accuracy": figures.get("unseen_top5_accuracy"),
        "n_real_scored": figures["n_unseen"],
        "scored_on": "COD structures whose compound no training structure shares",
        "epochs_run": info["epochs_run"],
        "best_epoch": info["best_epoch"],
        "train_seconds": round(train_s, 1),
        "temperature": round(info["temperature"], 4),
        **{k: v for k, v in figures.items() if k.startswith(("test_", "unseen_", "n_"))},
    }
    log(
        f"{point}: unseen accuracy {row['accuracy']:.1%} ({row['ci_low']:.1%}-{row['ci_high']:.1%}, "
        f"n={row['n_real_scored']}), test split {figures['test_accuracy']:.1%}, {train_s:.0f} s"
    )
    return row


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
    args = ap.parse_args()

    import mlflow

    from xrdvision.config import load_params
    from xrdvision.data.peak_table import cod_table
    from xrdvision.formats.atomic import write_json
    from xrdvision.tracking import runs

    p = load_params(args.params)
    params = dataclasses.replace(
        p,
        labels=dataclasses.replace(p.labels, mode=args.mode),
        model=dataclasses.replace(p.model, kind="cnn1d"),
        train=dataclasses.replace(p.train, epochs=args.epochs, batch_size=args.batch, learning_rate=args.lr),
        pattern=dataclasses.replace(p.pattern, patterns_per_epoch=args.per_epoch),
    )
    rows: list[dict[str, Any]] = json.loads(args.out.read_text())["points"] if args.out.is_file() else []
    done = {(r["model_kind"], r["label_mode"], r["source"]) for r in rows}
    cod = cod_table(params)
    log(f"COD: {len(cod)} structures")
    runs.setup(params.mlflow)
    runs.use_experiment(params.mlflow)
    name = f"learning-curve-cnn1d-{args.mode}"
    found = mlflow.search_runs(filter_string=f"tags.mlflow.runName = '{name}'", max_results=1)
    parent_id = str(found["run_id"].iloc[0]) if len(found) else None
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else name) as parent:
        mlflow.set_tags({"model_kind": "cnn1d", "label_mode": args.mode, "study": "learning_curve"})
        for point in args.points:
            if ("cnn1d", args.mode, point) in done:
                log(f"{point}: done already, skipped")
                continue
            rows.append(run_point(point, args, params, cod, parent.info.run_id))
            write_json(
                args.out,
                {
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
                    "settings": {
                        "epochs": args.epochs,
                        "patterns_per_epoch": args.per_epoch,
                        "batch": args.batch,
                        "learning_rate": args.lr,
                        "cnn1d": dataclasses.asdict(params.cnn1d),
                        "pattern": dataclasses.asdict(params.pattern),
                    },
                    "points": rows,
                },
            )


if __name__ == "__main__":
    main()
