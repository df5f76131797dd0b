"""The ``evaluate_measured`` stage: the model on real measured patterns, against their INDEX labels.

The patterns listed in ``params.measured.folder``/``INDEX.csv`` are prepared as for prediction and
classified; the figures (accuracy with a bootstrap confidence interval, top-3, macro F1, per source and
per class, a confusion matrix) are written for DVC and logged to MLflow. Every figure is named
``measured_*`` (``measured_accuracy``, ``measured_balanced_accuracy``, ...) in ``metrics/measured.json``
and in MLflow, where they are linked to the model's logged model and to ``INDEX.csv`` as a dataset.

The measured set is split by mineral into a tuning half and a report half (``data/measured_split.csv``,
:mod:`xrdvision.serve.measured_split`): every overall figure is also given for each half
(``tuning_half_accuracy``, ``report_half_accuracy``, ``report_half_balanced_accuracy``, ...), so that
choices made by looking at the tuning half are judged on the report half only. ``measured_ece`` is the
expected calibration error of the probabilities the model gives (:mod:`xrdvision.models.calibration`;
calibrated once the model carries a fitted temperature) under the class prior ``measured.prior``;
``coverage.csv`` and ``measured_coverage`` say what the ``measured.uncertain_below`` flag buys.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.errors import XrdVisionError
from xrdvision.formats.atomic import write_json
from xrdvision.formats.tables import read_table, write_table
from xrdvision.serve.inputs import Preparer, error_line
from xrdvision.serve.loading import LoadedModel, load_model
from xrdvision.serve.measured_split import HALVES, read_split
from xrdvision.tracking import runs

logger = logging.getLogger(__name__)


def _index_rows(folder: Path, index_name: str) -> list[dict[str, str]]:
    return read_table(
        folder / index_name,
        ["file", "crystal_system", "space_group"],
        "index of measured patterns",
        allow_empty=False,
    )


def _label(row: dict[str, str], mode: str) -> str:
    value = (row.get(mode) or "").strip()
    if mode == "space_group" and value:
        try:
            return str(int(float(value)))
        except ValueError:
            return ""
    return value


def _float_or_none(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and np.isfinite(value) and value > 0 else None


def _source_of(file: str) -> str:
    parts = Path(file).parts
    return parts[0] if len(parts) > 1 else "other"


def measured_metrics(
    probs: np.ndarray, y: np.ndarray, sources: list[str], classes: list[str], seed: int
) -> dict[str, Any]:
    """Overall figures (accuracy with a 95 % bootstrap CI, balanced accuracy, top-3, macro F1, loss,
    expected calibration error), per source and per true class, plus the majority-class baseline (what
    always answering the commonest class scores). Overall figures are named ``measured_*``; counts and
    the nested tables are not."""
    from xrdvision.models.evaluate import bootstrap_ci, named

    pred = probs.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    out = overall_figures(probs, y, classes, seed)
    counts = np.bincount(y, minlength=len(classes))
    per_source: dict[str, Any] = {}
    for s in sorted(set(sources)):
        mask = np.array([x == s for x in sources])
        lo, hi = bootstrap_ci(correct[mask], seed)
        per_source[s] = {
            "n": int(mask.sum()),
            "accuracy": float(correct[mask].mean()),
            "accuracy_ci95_low": lo,
            "accuracy_ci95_high": hi,
        }
    per_class: dict[str, Any] = {}
    for c in np.flatnonzero(counts):
        mask = y == c
        per_class[classes[c]] = {
            "n": int(mask.sum()),
            "correct": int(correct[mask].sum()),
            "accuracy": float(correct[mask].mean()),
            "predicted_as_this": int((pred == c).sum()),
        }
    out["per_source"] = per_source
    out["per_class"] = per_class
    return named(out, "measured")


def overall_figures(probs: np.ndarray, y: np.ndarray, classes: list[str], seed: int) -> dict[str, Any]:
    """Accuracy (95 % CI), balanced accuracy, top-3, macro F1, loss, expected calibration error and
    the majority-class baseline, under bare names (``accuracy``, ``ece``, ``n``)."""
    from xrdvision.models.calibration import expected_calibration_error
    from xrdvision.models.evaluate import classification_metrics

    out = classification_metrics(probs, y, classes, seed)
    out["n"] = out.pop("n_test")
    out["ece"] = expected_calibration_error(probs, y)
    out["majority_baseline_accuracy"] = float(np.bincount(y).max() / len(y))
    return out


def half_metrics(
    probs: np.ndarray, y: np.ndarray, halves: list[str], classes: list[str], seed: int
) -> dict[str, Any]:
    """The overall figures of each half: ``tuning_half_accuracy``, ``report_half_balanced_accuracy``,
    ``report_half_ece``, ... and ``n_tuning_half`` / ``n_report_half`` (a half with no pattern: n = 0
    and no figures)."""
    out: dict[str, Any] = {}
    for h in HALVES:
        mask = np.array([x == h for x in halves], dtype=bool)
        out[f"n_{h}_half"] = int(mask.sum())
        if not mask.any():
            continue
        figures = overall_figures(probs[mask], y[mask], classes, seed)
        figures.pop("n")
        out.update({f"{h}_half_{k}": v for k, v in figures.items()})
    return out


def uncertain_figures(probs: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, float]:
    """What ``measured.uncertain_below`` buys: the share of patterns answered with confidence and the
    accuracy on them (the rest are flagged ``uncertain``)."""
    from xrdvision.models.calibration import coverage_curve

    (at,) = coverage_curve(probs, y, np.array([threshold]))
    return {
        "measured_uncertain_below": float(threshold),
        "measured_coverage": at["coverage"],
        "measured_accuracy_when_certain": at["accuracy"],
    }


def half_line(m: dict[str, Any]) -> str:
    """The CLI's line for the two halves."""
    return (
        f"evaluate_measured: report half {m['report_half_accuracy']:.3f} (balanced "
        f"{m['report_half_balanced_accuracy']:.3f}, n={m['n_report_half']}), tuning half "
        f"{m['tuning_half_accuracy']:.3f} (balanced {m['tuning_half_balanced_accuracy']:.3f}, "
        f"n={m['n_tuning_half']}); ECE {m['measured_ece']:.3f}"
    )


def run_evaluate_measured(
    params: Params,
    model_uri_or_dir: str | Path,
    out_metrics: str | Path,
    out_dir: str | Path,
    split: str | Path | None = None,
) -> dict[str, Any]:
    """The model on ``params.measured.folder``/``index``: metrics for DVC, reports, MLflow.

    Every INDEX row with a label in the model's mode (crystal system, or space group for a space-group
    model) is predicted; unlabelled rows are counted and left out, unreadable files are listed in
    ``failures.csv`` and counted, and do not stop the run. The wavelength of each pattern is its file
    header's, else the INDEX ``wavelength_A`` column, else ``params.measured.wavelength``.

    Writes ``out_metrics`` (JSON) and, in ``out_dir``, ``predictions.csv`` (one row per pattern),
    ``confusion_matrix.csv`` and ``.png``, ``per_class.csv`` and ``failures.csv``. Figures are logged to
    the MLflow run that trained the model (``measured_*`` metrics, ``measured/`` artifacts, and
    ``measured_accuracy`` on the registered version) or, for a model with no known run, to a new
    ``evaluate-measured`` run. An empty ``measured.folder`` writes ``{"skipped": true, ...}`` only.
    ``split`` (the tuning/report table) adds the figures of each half; a pattern it does not list
    counts in the whole only (``n_not_in_split``); a missing file gives the whole only, and says so.
    """
    from tqdm import tqdm

    from xrdvision.models.evaluate import confusion, plot_confusion

    out_metrics, out_dir = Path(out_metrics), Path(out_dir)
    mp = params.measured
    if not mp.folder:
        metrics: dict[str, Any] = {"skipped": True, "reason": "params measured.folder is empty"}
        write_json(out_metrics, metrics)
        return metrics
    folder = Path(mp.folder)
    if not folder.is_dir():
        # A fresh clone without ../shared/ still runs `dvc repro` end to end: the check is reported as
        # skipped (printed, and recorded in the metrics file), never silently passed.
        metrics = {"skipped": True, "reason": f"measured.folder {folder} does not exist or is not a folder"}
        write_json(out_metrics, metrics)
        return metrics
    rows = _index_rows(folder, mp.index)
    half_of = read_split(Path(split)) if split and Path(split).is_file() else {}
    if split and not half_of:
        logger.warning("evaluate_measured: no split table %s: figures for the whole set only", split)
    lm = load_model(params, str(model_uri_or_dir))
    reweight = lm.prior_correction(mp.prior)  # a bad prior fails now, not after every scan is prepared
    mode = lm.label_mode
    if mode not in ("crystal_system", "space_group"):
        raise XrdVisionError(
            f"{lm.uri}: classes are not a known label mode; cannot score against INDEX labels"
        )
    index_of = {c: i for i, c in enumerate(lm.classes)}
    prep = Preparer(lm.input_params(params), lm.image_size, lm.model_kind)
    show = logger.isEnabledFor(logging.INFO)  # the CLI's --quiet hides the progress bars too
    logger.info(
        "evaluate_measured: %d INDEX rows in %s; model %s (classes: %s)",
        len(rows),
        folder,
        lm.uri,
        lm.classes_from,
    )

    kept: list[dict[str, str]] = []
    images: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []
    n_unlabelled = n_unknown_class = 0
    for row in tqdm(rows, desc="measured", unit="pattern", disable=not show):
        label = _label(row, mode)
        if not label:
            n_unlabelled += 1
            continue
        if label not in index_of:
            n_unknown_class += 1
            failures.append((row["file"], f"label {label!r} is not one of the model's classes"))
            logger.warning("evaluate_measured: skipped %s: %s", *failures[-1])
            continue
        path = folder / row["file"]
        try:
            prepared = prep(path, None, _float_or_none(row.get("wavelength_A")) or mp.wavelength)
        except Exception as exc:  # reported in failures.csv; the other patterns are still scored
            failures.append((row["file"], error_line(path, exc)))
            logger.warning("evaluate_measured: skipped %s", failures[-1][1])
            continue
        kept.append(row)
        images.append(prepared.image)
    if not kept:
        raise XrdVisionError(f"{folder / mp.index}: no pattern could be scored ({len(failures)} failed)")

    probs = reweight(lm.predict(np.stack(images), progress=show))
    y = np.array([index_of[_label(r, mode)] for r in kept])
    sources = [_source_of(r["file"]) for r in kept]
    metrics = measured_metrics(probs, y, sources, lm.classes, params.seed)
    halves = [half_of.get(r["file"], "") for r in kept]
    if half_of:
        metrics.update(half_metrics(probs, y, halves, lm.classes, params.seed))
        metrics["n_not_in_split"] = sum(1 for h in halves if not h)
    metrics["split"] = str(split) if half_of else ""
    metrics |= uncertain_figures(probs, y, mp.uncertain_below)
    metrics = {
        "skipped": False,
        "label_mode": mode,
        "model": lm.uri,
        "folder": str(folder),
        "n_index": len(rows),
        "n_unlabelled": n_unlabelled,
        "n_failed": len(failures),
        "prior": mp.prior,
        **metrics,
        "warnings": lm.warnings,
    }
    pred = probs.argmax(axis=1)
    _write_measured_reports(out_dir, kept, probs, y, pred, sources, halves, lm.classes, failures, metrics)
    present = sorted(set(y.tolist()) | set(pred.tolist()))
    names = [lm.classes[i] for i in present]
    matrix = confusion(y, pred, len(lm.classes))[np.ix_(present, present)]
    write_table(
        out_dir / "confusion_matrix.csv",
        ["true\\predicted", *names],
        ([name, *r.tolist()] for name, r in zip(names, matrix, strict=True)),
    )
    title = (
        f"measured patterns, {mode.replace('_', ' ')}: accuracy {metrics['measured_accuracy']:.1%} "
        f"[{metrics['measured_accuracy_ci95_low']:.0%}-{metrics['measured_accuracy_ci95_high']:.0%}], "
        f"balanced {metrics['measured_balanced_accuracy']:.1%} (n={len(y)})"
    )
    plot_confusion(matrix, names, out_dir / "confusion_matrix.png", title)
    write_json(out_metrics, metrics)
    metrics["mlflow_run_id"] = _log_measured(params, lm, metrics, out_dir, folder / mp.index)
    return metrics


def _write_measured_reports(
    out_dir: Path,
    rows: list[dict[str, str]],
    probs: np.ndarray,
    y: np.ndarray,
    pred: np.ndarray,
    sources: list[str],
    halves: list[str],
    classes: list[str],
    failures: list[tuple[str, str]],
    metrics: dict[str, Any],
) -> None:
    def prediction_row(r: dict[str, str], s: str, h: str, t: int, p: int, pr: np.ndarray) -> list[Any]:
        top3 = ";".join(classes[i] for i in np.argsort(-pr, kind="stable")[:3])
        return [r["file"], s, h, classes[t], classes[p], f"{pr[p]:.4f}", f"{pr[t]:.4f}", top3, int(t == p)]

    write_table(
        out_dir / "predictions.csv",
        ["file", "source", "half", "actual", "predicted", "p_predicted", "p_actual", "top3", "correct"],
        (prediction_row(*x) for x in zip(rows, sources, halves, y, pred, probs, strict=True)),
    )
    write_table(
        out_dir / "per_class.csv",
        ["class", "n", "correct", "accuracy", "predicted_as_this"],
        (
            [name, d["n"], d["correct"], f"{d['accuracy']:.4f}", d["predicted_as_this"]]
            for name, d in metrics["per_class"].items()
        ),
    )
    write_table(out_dir / "failures.csv", ["file", "reason"], failures)
    from xrdvision.models.calibration import coverage_curve

    write_table(  # the coverage-accuracy plot (dvc.yaml): what each uncertainty threshold buys
        out_dir / "coverage.csv",
        ["threshold", "coverage", "accuracy"],
        (
            [f"{r['threshold']:.2f}", f"{r['coverage']:.4f}", f"{r['accuracy']:.4f}"]
            for r in coverage_curve(probs, y)
            if np.isfinite(r["accuracy"])
        ),
    )


def _flat_figures(metrics: dict[str, Any]) -> dict[str, float]:
    """``measured_accuracy``, ``measured_rruff_agi_accuracy``, ... : the numbers MLflow takes."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            out[k if k.startswith("measured_") else f"measured_{k}"] = float(v)
    for s, d in metrics.get("per_source", {}).items():
        for k, v in d.items():
            if np.isfinite(v):
                out[f"measured_{re.sub(r'[^A-Za-z0-9_]', '_', s)}_{k}"] = float(v)
    return out


def _log_measured(
    params: Params, lm: LoadedModel, metrics: dict[str, Any], out_dir: Path, index: Path
) -> str:
    """Log to the model's training run (or a new run), linked to its logged model and to ``index`` as
    the ``measured`` dataset; returns the run id."""
    import mlflow

    runs.setup(params.mlflow)
    client = mlflow.MlflowClient()
    figures = _flat_figures(metrics)
    run_id = lm.run_id
    if run_id is not None:
        try:
            client.get_run(run_id)
        except Exception:  # the run lives in another store: log a run of our own instead
            run_id = None
    if run_id is None:
        runs.use_experiment(params.mlflow)
        with mlflow.start_run(run_name="evaluate-measured") as run:
            mlflow.set_tags(
                {"model_uri": lm.uri, "label_mode": lm.label_mode, "git_commit": runs.git_commit()}
            )
            run_id = run.info.run_id
    measured = runs.split_dataset(
        index, f"measured-{index.parent.name}", lm.label_mode, key="file", unit="patterns"
    )
    client.log_inputs(run_id, [runs.dataset_input(measured, "measured")])
    for k, v in figures.items():
        client.log_metric(
            run_id, k, v, model_id=lm.model_id, dataset_name=measured.name, dataset_digest=measured.digest
        )
    for name in (
        "predictions.csv",
        "per_class.csv",
        "failures.csv",
        "coverage.csv",
        "confusion_matrix.csv",
        "confusion_matrix.png",
    ):
        client.log_artifact(run_id, str(out_dir / name), "measured")
    if lm.registered is not None:
        name, version = lm.registered
        with contextlib.suppress(Exception):  # a version from another store: the run has the figures
            for k in ("measured_accuracy", "measured_balanced_accuracy", "report_half_accuracy"):
                if k in metrics:
                    client.set_model_version_tag(name, version, k, f"{metrics[k]:.6f}")
            client.set_model_version_tag(name, version, "measured_n", str(metrics["n"]))
    return run_id
