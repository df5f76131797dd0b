"""The ``evaluate`` stage: the saved full model on the test images, the way a user would run it.

The test split is small (~85 structures on the whole shared COD set, ~72 on the embedded default), so
every accuracy comes with a 95 % bootstrap confidence interval over test structures; a point figure
alone would overstate what we know. Results go to DVC (``metrics/metrics.json``, ``plots/``) and to the
MLflow run that trained the model (linked to its logged model and to the test split as a dataset), and
onto the registered model version as tags (what ``promote`` and ``models`` read). Every figure is named
``test_*`` (``test_accuracy``, ``test_accuracy_ci95_low``, ...) in ``metrics/metrics.json`` and MLflow.
"""

from __future__ import annotations

import csv
import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.crystal.labels import class_names
from xrdvision.errors import XrdVisionError
from xrdvision.formats.atomic import atomic_open, atomic_path, write_json, write_text
from xrdvision.formats.tables import read_split
from xrdvision.models.calibration import expected_calibration_error
from xrdvision.models.features import load_image
from xrdvision.models.train import encode_labels
from xrdvision.tracking import runs

log = logging.getLogger(__name__)

# The test figures every evaluated model version carries as tags (``promote`` compares one of them).
TEST_METRICS = ("test_accuracy", "test_loss", "test_macro_f1", "test_top3_accuracy")


def bootstrap_ci(
    correct: np.ndarray, seed: int, n_boot: int = 2000, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of 0/1 outcomes (resampling test structures)."""
    if len(correct) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(correct), size=(n_boot, len(correct)))
    means = correct[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def top_k_hits(probs: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Per image, 1.0 if the true class is among the ``k`` highest probabilities, else 0.0.

    Only for the bootstrap, which resamples images; the figure itself is scikit-learn's
    ``top_k_accuracy_score``, and ties are ranked as it ranks them (stable sort, reversed).
    """
    ranked = np.argsort(probs, axis=1, kind="mergesort")[:, ::-1][:, :k]
    return (ranked == y[:, None]).any(axis=1).astype(np.float64)


def classification_metrics(probs: np.ndarray, y: np.ndarray, classes: list[str], seed: int) -> dict[str, Any]:
    """Accuracy (+ CI), balanced accuracy, loss, top-3/top-5 accuracy, macro F1 and the expected
    calibration error from probabilities.

    The keys are bare (``accuracy``, ``n_test``); the stages name them for where they were measured
    with :func:`named` (``test_accuracy``, ``measured_accuracy``).
    """
    import warnings

    from sklearn.metrics import balanced_accuracy_score, f1_score, top_k_accuracy_score

    labels = np.arange(probs.shape[1])
    pred = probs.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    p_true = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)
    present = sorted(set(y.tolist()) | set(pred.tolist()))
    lo, hi = bootstrap_ci(correct, seed)
    with warnings.catch_warnings():  # a predicted class that no image has: scikit-learn warns, rightly
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(y, pred))
    out = {
        "accuracy": float(correct.mean()),
        "accuracy_ci95_low": lo,
        "accuracy_ci95_high": hi,
        "balanced_accuracy": balanced,
        "loss": float(-np.mean(np.log(p_true))),
        "top3_accuracy": float(top_k_accuracy_score(y, probs, k=3, labels=labels)),
        "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
        "ece": expected_calibration_error(probs, y) if len(y) else float("nan"),
        "n_test": len(y),
    }
    if len(classes) > 10:  # space groups: top-5 is the figure the literature reports beside top-1
        lo5, hi5 = bootstrap_ci(top_k_hits(probs, y, 5), seed + 1)
        top5 = float(top_k_accuracy_score(y, probs, k=5, labels=labels))
        out.update({"top5_accuracy": top5, "top5_ci95_low": lo5, "top5_ci95_high": hi5})
    return out


def named(figures: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``accuracy`` -> ``<prefix>_accuracy`` (the one metric scheme: ``test_*``, ``measured_*``); counts
    (``n``, ``n_test``) and nested tables keep their names."""
    return {
        k if k == "n" or k.startswith("n_") or isinstance(v, dict) else f"{prefix}_{k}": v
        for k, v in figures.items()
    }


def _cnn1d_figures(model: Any, params: Params, split_dir: Path, y: np.ndarray, classes: list[str]) -> dict:
    """The 1-D model's test-split figures (its structures' peak lists rendered on the model's grid) and
    its figures on every COD structure no training structure shares a compound with."""
    from xrdvision.data.peak_table import cod_table
    from xrdvision.models.score_patterns import pattern_probabilities, test_split_inputs, training_formulas

    probs = pattern_probabilities(model, test_split_inputs(params, split_dir)[0], params)
    metrics = named(classification_metrics(probs, y, classes, params.seed), "test")
    cod = cod_table(params)
    seen = training_formulas(params, cod, split_dir)
    return metrics | unseen_figures(model, params, cod, seen, params.seed) | {"_probs": probs}


def unseen_figures(model: Any, params: Params, cod: Any, seen: set[str], seed: int) -> dict[str, Any]:
    """The 1-D model's figures on every structure of ``cod`` (a peak table) whose compound is not in
    ``seen`` (the training structures'), and on its organic (C and H) and inorganic parts:
    ``unseen_*``, ``unseen_organic_*``, ``unseen_inorganic_*`` and their counts."""
    from xrdvision.models.score_patterns import pattern_probabilities, unseen_mask

    classes = class_names(params.labels.mode)
    mask = unseen_mask(cod, seen)
    table = cod.subset(np.flatnonzero(mask))
    y = encode_labels(table.labels(params.labels.mode), classes, "COD peak lists")
    probs = pattern_probabilities(model, table, params)
    out: dict[str, Any] = {"n_unseen": int(mask.sum()), "n_cod_seen_in_training": int((~mask).sum())}
    figures = classification_metrics(probs, y, classes, seed)
    out |= {k: v for k, v in named(figures, "unseen").items() if k != "n_test"}
    for name, part in (("organic", table.has_c_and_h), ("inorganic", ~table.has_c_and_h)):
        if part.any():
            figures = named(classification_metrics(probs[part], y[part], classes, seed), f"unseen_{name}")
            out |= {k.replace("n_test", f"n_unseen_{name}"): v for k, v in figures.items()}
    return out


def predict_images(model, paths: list[Path], batch_size: int = 16) -> np.ndarray:
    """Class probabilities for image files (raw RGB; the model carries VGG16's preprocessing)."""
    from tqdm import tqdm

    out = []
    quiet = not log.isEnabledFor(logging.INFO)  # the CLI's --quiet hides progress bars too
    for start in tqdm(range(0, len(paths), batch_size), desc="evaluate", unit="batch", disable=quiet):
        batch = np.stack([load_image(p) for p in paths[start : start + batch_size]])
        out.append(np.asarray(model.predict(batch, verbose=0)))
    return np.concatenate(out) if out else np.zeros((0, 0))


def confusion(y: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """The n x n confusion matrix over class indices 0..n-1 (rows: true, columns: predicted)."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y, pred, labels=np.arange(n)).astype(np.int64)


def plot_confusion(matrix: np.ndarray, names: list[str], path: Path, title: str) -> None:
    """Confusion matrix PNG with class names (rows: true, columns: predicted), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(names)
    size = (max(5, 0.6 * k + 2), max(4, 0.6 * k + 1.5))
    # constrained layout + a tight bounding box: the title, tick labels and axis labels are never clipped
    fig, ax = plt.subplots(figsize=size, dpi=100, layout="constrained")
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(textwrap.fill(title, width=max(40, int(size[0] * 9))), fontsize=10)
    vmax = matrix.max() if matrix.size else 0
    for i in range(k):
        for j in range(k):
            if matrix[i, j]:
                ax.text(
                    j,
                    i,
                    str(matrix[i, j]),
                    ha="center",
                    va="center",
                    color="white" if matrix[i, j] > vmax / 2 else "black",
                    fontsize=8,
                )
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)


def run_evaluate(
    params: Params,
    model_dir: Path,
    split_dir: Path,
    image_dir: Path,
    metrics_path: Path,
    plots_dir: Path,
    reports_dir: Path,
    train_metrics_path: Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``model_dir/model.keras`` on the test split; write DVC metrics/plots; log to MLflow."""
    from sklearn.metrics import classification_report

    from xrdvision.models.vgg16 import load_full_model

    model_dir, plots_dir, reports_dir = Path(model_dir), Path(plots_dir), Path(reports_dir)
    run_info = runs.read_run_info(model_dir / runs.RUN_INFO)
    mode = params.labels.mode
    if run_info.get("label_mode") != mode:
        raise XrdVisionError(
            f"{model_dir / runs.RUN_INFO}: model was trained for {run_info.get('label_mode')}, "
            f"params say labels.mode={mode}: run `dvc repro train` first"
        )
    kind = params.model.kind
    if run_info.get("model_kind", "vgg16") != kind:
        raise XrdVisionError(
            f"{model_dir / runs.RUN_INFO}: model is a {run_info.get('model_kind', 'vgg16')}, params say "
            f"model.kind={kind}: run `dvc repro train` first"
        )
    runs.setup(params.mlflow)
    classes = class_names(mode)
    rows = read_split(Path(split_dir) / "test.csv")
    if not rows:
        raise XrdVisionError(f"{Path(split_dir) / 'test.csv'}: the test split is empty")
    y = encode_labels(np.array([r[mode] for r in rows]), classes, str(Path(split_dir) / "test.csv"))
    model = load_full_model(model_dir / "model.keras")
    if kind == "cnn1d":  # the test structures' peak lists, rendered on the model's grid
        metrics = _cnn1d_figures(model, params, Path(split_dir), y, classes)
        item = "cod_id"
    else:
        probs = predict_images(model, [Path(image_dir) / r["image"] for r in rows])
        metrics = named(classification_metrics(probs, y, classes, params.seed), "test") | {"_probs": probs}
        item = "image"
    probs = metrics.pop("_probs")
    if train_metrics_path is not None and Path(train_metrics_path).is_file():
        tm = json.loads(Path(train_metrics_path).read_text())
        metrics.update(
            {k: tm[k] for k in ("train_accuracy", "train_loss", "val_accuracy", "val_loss") if k in tm}
        )

    pred = probs.argmax(axis=1)
    present = sorted(set(y.tolist()) | set(pred.tolist()))
    names = [classes[i] for i in present]
    matrix = confusion(y, pred, len(classes))[np.ix_(present, present)]
    # Per-image rows for `dvc plots` (its confusion template counts actual/predicted pairs).
    with atomic_open(plots_dir / "confusion.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "actual", "predicted", "p_predicted"])
        for r, t, p, pr in zip(rows, y, pred, probs, strict=True):
            w.writerow([r[item], classes[t], classes[p], f"{pr[p]:.4f}"])
    with atomic_open(reports_dir / "confusion_matrix.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["true\\predicted", *names])
        for name, row in zip(names, matrix, strict=True):
            w.writerow([name, *row.tolist()])
    plot_confusion(
        matrix,
        names,
        plots_dir / "confusion_matrix.png",
        f"{mode.replace('_', ' ')}: test accuracy {metrics['test_accuracy']:.1%} "
        f"[{metrics['test_accuracy_ci95_low']:.0%}-{metrics['test_accuracy_ci95_high']:.0%}] (n={len(y)})",
    )
    report_kwargs = {"labels": present, "target_names": names, "zero_division": 0}
    write_text(reports_dir / "classification_report.txt", classification_report(y, pred, **report_kwargs))
    write_json(
        reports_dir / "classification_report.json",
        classification_report(y, pred, output_dict=True, **report_kwargs),
    )
    write_json(metrics_path, metrics)
    test_set = runs.split_dataset(
        Path(split_dir) / "test.csv", f"{runs.data_source(params)}-test", params.labels.mode
    )
    _log_to_mlflow(
        run_info,
        metrics,
        test_set,
        [
            plots_dir / "confusion.csv",
            plots_dir / "confusion_matrix.png",
            reports_dir / "confusion_matrix.csv",
            reports_dir / "classification_report.txt",
            reports_dir / "classification_report.json",
        ],
    )
    return metrics


def test_summary(metrics: dict[str, Any]) -> str:
    """``test accuracy 40.7 % (95 % CI 30.2-51.2 %) on 86 structures``: appended to the run's note."""
    return (
        f"test accuracy {metrics['test_accuracy']:.1%} (95% CI {metrics['test_accuracy_ci95_low']:.1%}-"
        f"{metrics['test_accuracy_ci95_high']:.1%}) on {metrics['n_test']} structures"
    )


def _log_to_mlflow(
    run_info: dict[str, Any], metrics: dict[str, Any], test_set, artifacts: list[Path]
) -> None:
    """Test figures onto the training run, linked to its logged model and to the test split dataset.

    The run gets the split table as a ``testing`` input, ``test_*`` metrics (with the model id, so the
    Models page shows them beside the model, and the dataset, so they say which split), the split's md5
    as tag ``test_split_md5``, and a note ending in the test figure; the registered version gets the same
    figures and split hash as tags (what ``promote`` and ``models`` read).
    """
    import mlflow

    client = mlflow.MlflowClient()
    run_id, model_id = run_info["run_id"], run_info.get("model_id")
    client.log_inputs(run_id, [runs.dataset_input(test_set, "testing")])
    figures = {
        k: float(v)
        for k, v in metrics.items()
        if (k.startswith("test_") or k == "n_test") and isinstance(v, (int, float)) and np.isfinite(v)
    }
    for k, v in figures.items():
        client.log_metric(
            run_id, k, v, model_id=model_id, dataset_name=test_set.name, dataset_digest=test_set.digest
        )
    tags = client.get_run(run_id).data.tags
    held_out = tags.get(runs.TEST_SPLIT_TAG)
    if held_out and held_out != test_set.digest:
        log.warning(
            "evaluate: the model was trained with another test split held out (md5 %s, this one %s): "
            "it may have trained on some of these test structures",
            held_out[:8],
            test_set.digest[:8],
        )
    client.set_tag(run_id, runs.TEST_SPLIT_TAG, test_set.digest)
    note = tags.get(runs.NOTE_TAG, "").split("; test accuracy")[0]
    client.set_tag(run_id, runs.NOTE_TAG, f"{note}; {test_summary(metrics)}".lstrip("; "))
    for path in artifacts:
        client.log_artifact(run_id, str(path), "evaluation")
    if model_id:
        client.set_logged_model_tags(model_id, {runs.TEST_SPLIT_TAG: test_set.digest})
    name, version = run_info["registered_model"], run_info["version"]
    for k in TEST_METRICS:
        client.set_model_version_tag(name, version, k, f"{metrics[k]:.6f}")
    client.set_model_version_tag(name, version, runs.TEST_SPLIT_TAG, test_set.digest)
