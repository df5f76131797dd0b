"""The ``train`` stage: fit the trainable tail on cached features, save the full model, track in MLflow.

The seed recipe: categorical cross-entropy, Adam (lr 1e-4), early stopping on validation loss with the
best weights restored, up to 50 epochs, batch 32. Training runs on the cached output of VGG16's frozen
layers (``features`` stage); because the tail shares its layers with the full model, the saved
``models/model.keras`` is the complete image classifier. Interrupted training resumes from the last
finished epoch (Keras ``BackupAndRestore``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.crystal.labels import class_names
from xrdvision.errors import XrdVisionError
from xrdvision.formats.atomic import atomic_open, atomic_path, write_json
from xrdvision.models.calibration import class_prior
from xrdvision.models.classes import check_class_coverage, class_weight_map, encode_labels
from xrdvision.models.features import load_features
from xrdvision.tracking import runs

log = logging.getLogger(__name__)

HISTORY_KEYS = ("loss", "accuracy", "top3_accuracy", "val_loss", "val_accuracy", "val_top3_accuracy")
# What travels with a model so that an input is prepared as its training images were (see input_settings).
INPUT_SETTINGS_FILE = "preprocessing.json"
INPUT_SETTINGS_FORMAT = 1
INPUT_SETTINGS: dict[str, tuple[str, ...]] = {
    "model": ("kind",),
    "pattern": ("two_theta_min", "two_theta_max", "step", "scale"),
    "simulate": ("wavelength", "kalpha2", "two_theta_min", "two_theta_max", "step", "fwhm", "eta"),
    "labels": ("mode", "symprec", "angle_tolerance"),
    "render": ("size", "line_width"),
    "measured": ("wavelength", "strip_kalpha2"),
}


def epoch_metric_name(keras_key: str) -> str:
    """Keras' history key as logged: ``loss`` -> ``train_loss``; ``val_loss`` stays ``val_loss``."""
    return keras_key if keras_key.startswith("val_") else f"train_{keras_key}"


def mlflow_epoch_callback():
    import keras
    import mlflow

    class MlflowEpochLogger(keras.callbacks.Callback):
        """Per-epoch ``train_*`` / ``val_*`` metrics to the active MLflow run (step = epoch)."""

        def on_epoch_end(self, epoch, logs=None):
            logs = {epoch_metric_name(k): float(v) for k, v in (logs or {}).items() if np.isscalar(v)}
            mlflow.log_metrics(logs, step=epoch)

    return MlflowEpochLogger()


def _backup_dir(params: Params, features_dir: Path) -> Path:
    """Resume folder keyed by what the run depends on, so a changed run never resumes a stale one."""
    key = json.dumps(
        {
            "model": params.flat(),
            "features": sorted(str(p.stat().st_mtime_ns) for p in Path(features_dir).glob("*.npz")),
        },
        sort_keys=True,
        default=str,
    )
    return Path("data/cache/train_backup") / hashlib.md5(key.encode()).hexdigest()[:12]


def fit_tail(
    params: Params,
    train: dict[str, np.ndarray],
    val: dict[str, np.ndarray],
    *,
    weights: Any = "resolve",
    extra_callbacks: list | None = None,
    backup_dir: Path | None = None,
    verbose: int = 2,
):
    """Build the split model and fit its tail on cached features. Returns (SplitModel, history, info).

    Shared by the train stage and the tuner, so a tuned trial and the final run train the same way.
    """
    import keras
    import tensorflow as tf

    from xrdvision.models.vgg16 import build_model, compile_tail

    mode = params.labels.mode
    classes = class_names(mode)
    ytr = encode_labels(train[mode], classes, "train features")
    yva = encode_labels(val[mode], classes, "val features")
    warnings = check_class_coverage(ytr, {"val": yva}, classes, mode)
    keras.utils.set_random_seed(params.seed)
    net = build_model(len(classes), params.model, weights=weights, seed=params.seed)
    if tuple(net.tail.input.shape[1:]) != tuple(train["features"].shape[1:]):
        raise XrdVisionError(
            f"features: cached tensors have shape {train['features'].shape[1:]} but model.trainable_conv="
            f"{params.model.trainable_conv} needs {tuple(net.tail.input.shape[1:])}: run `dvc repro features`"
        )
    compile_tail(net.tail, params.train.learning_rate)
    n = len(classes)
    bs = params.train.batch_size
    ds_train = (
        tf.data.Dataset.from_tensor_slices((train["features"], keras.utils.to_categorical(ytr, n)))
        .shuffle(len(ytr), seed=params.seed, reshuffle_each_iteration=True)
        .batch(bs)
        .prefetch(tf.data.AUTOTUNE)
    )
    ds_val = (
        tf.data.Dataset.from_tensor_slices((val["features"], keras.utils.to_categorical(yva, n)))
        .batch(bs)
        .prefetch(tf.data.AUTOTUNE)
    )
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=params.train.patience, restore_best_weights=True, verbose=1
        ),
        *(extra_callbacks or []),
    ]
    if backup_dir is not None:
        callbacks.append(keras.callbacks.BackupAndRestore(str(backup_dir)))
    t0 = time.perf_counter()
    history = net.tail.fit(
        ds_train,
        validation_data=ds_val,
        epochs=params.train.epochs,
        class_weight=class_weight_map(ytr) if params.train.class_weights else None,
        callbacks=callbacks,
        verbose=verbose,
    )
    seconds = time.perf_counter() - t0
    hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    best_epoch = int(np.argmin(hist["val_loss"])) if hist.get("val_loss") else len(hist.get("loss", [])) - 1
    info = {
        "seconds": seconds,
        "epochs_run": len(hist.get("loss", [])),
        "best_epoch": best_epoch,
        "warnings": warnings,
    }
    return net, hist, info


def tail_metrics(tail, data: dict[str, np.ndarray], mode: str, only_copy0: bool = True) -> dict[str, float]:
    """Loss and accuracy of the tail on cached features (unaugmented copies only by default)."""
    classes = class_names(mode)
    mask = data["copy"] == 0 if only_copy0 and "copy" in data else np.ones(len(data[mode]), bool)
    y = encode_labels(data[mode][mask], classes, "features")
    probs = np.asarray(tail.predict(data["features"][mask], batch_size=64, verbose=0))
    p_true = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)
    return {"loss": float(-np.mean(np.log(p_true))), "accuracy": float(np.mean(probs.argmax(1) == y))}


def write_history_csv(path: Path, hist: dict[str, list[float]]) -> None:
    """Per-epoch curves for ``dvc plots`` (one row per epoch)."""
    keys = [k for k in HISTORY_KEYS if k in hist]
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", *(epoch_metric_name(k) for k in keys)])
        for e in range(len(hist.get("loss", []))):
            w.writerow([e, *(f"{hist[k][e]:.6f}" for k in keys)])


def input_settings(
    params: Params, classes: list[str], train_prior: list[float] | None = None
) -> dict[str, Any]:
    """What it takes to prepare an input the way this model's training images were made.

    Stored with the model (``preprocessing.json`` in the ``models/`` folder, ``preprocessing`` in the
    logged model's MLmodel metadata), so that ``predict`` needs no ``params.yaml``: the grid, wavelength
    and peak profile a CIF is simulated with, the rendering, the label mode and class order, and the
    wavelength assumed for a measured scan that states none; and the training class frequencies
    (``train_prior``, aligned with ``classes``) that ``measured.prior`` corrects for.
    """
    out: dict[str, Any] = {"format": INPUT_SETTINGS_FORMAT, "classes": list(classes)}
    if train_prior is not None:
        out["train_prior"] = [round(float(v), 6) for v in train_prior]
    for section, keys in INPUT_SETTINGS.items():
        values = getattr(params, section)
        out[section] = {k: getattr(values, k) for k in keys}
    return out


DATA_DIRS = {
    "vgg16": ["data/images", "data/split", "data/features"],
    "cnn1d": ["data/cifs", "data/split", "data/peaklists", "data/generated"],
}


def fit_vgg16(
    params: Params, features_dir: Path, callbacks: list
) -> tuple[Any, dict[str, list[float]], dict[str, Any], dict[str, Any], dict[str, str]]:
    """VGG16's input builder and fit: the tail on cached features. Returns (full model, history, info,
    metrics, tags)."""
    train = load_features(features_dir / "train.npz")
    val = load_features(features_dir / "val.npz")
    mode = params.labels.mode
    net, hist, info = fit_tail(
        params, train, val, extra_callbacks=callbacks, backup_dir=_backup_dir(params, features_dir)
    )
    train_m, val_m = tail_metrics(net.tail, train, mode), tail_metrics(net.tail, val, mode)
    metrics = {
        "train_accuracy": train_m["accuracy"],
        "train_loss": train_m["loss"],
        "val_accuracy": val_m["accuracy"],
        "val_loss": val_m["loss"],
        "n_train_images": len(train["features"]),
        "n_val_images": len(val["features"]),
    }
    tags = {"weights_md5": str(train.get("weights_md5", "")), "cut_layer": str(train.get("cut_layer", ""))}
    classes = class_names(mode)
    y = encode_labels(np.asarray(train[mode]), classes, str(features_dir / "train.npz"))
    info["train_prior"] = class_prior(y, len(classes))
    return net.full, hist, info, metrics, tags


def run_train(
    params: Params,
    features_dir: Path,
    model_dir: Path,
    metrics_path: Path,
    history_path: Path,
    split_dir: Path = Path("data/split"),
) -> dict[str, Any]:
    """Train either model kind, then save the full model, metrics and curves, and log + register it.

    One path for both kinds: only the input builder and fit differ (:func:`fit_vgg16` on cached image
    features, :func:`xrdvision.models.train_cnn1d.fit_cnn1d` on patterns drawn from peak lists). The
    MLflow run is named by :func:`~xrdvision.tracking.runs.run_name`, described in one line
    (``mlflow.note.content``), tagged with the model kind, the git commit and the DVC hashes of its
    data, and lists the training and validation split tables as its datasets (``split_dir``).
    """
    import mlflow

    runs.setup(params.mlflow)  # fail now, not after training, if the store does not answer
    features_dir, model_dir, split_dir = Path(features_dir), Path(model_dir), Path(split_dir)
    mode, kind = params.labels.mode, params.model.kind
    classes = class_names(mode)
    runs.use_experiment(params.mlflow)
    with mlflow.start_run(run_name=runs.run_name(params)) as run:
        mlflow.log_params(params.flat())
        data = runs.data_hashes([d for d in DATA_DIRS[kind] if Path(d).exists()])
        sha = runs.git_sha()
        mlflow.set_tags(
            {
                runs.NOTE_TAG: runs.run_note(params),
                "git_commit": runs.git_commit(),
                **({"mlflow.source.git.commit": sha} if sha else {}),
                "model_kind": kind,
                "data_source": runs.data_source(params),
                "params_hash": runs.params_digest(params),
                "label_mode": mode,
                **{f"data_md5.{k}": v for k, v in data.items()},
            }
        )
        test_md5 = _log_split_inputs(params, split_dir, {"train": "training", "val": "validation"})
        callbacks = [mlflow_epoch_callback()]
        if kind == "cnn1d":
            from xrdvision.models.train_cnn1d import fit_and_measure

            full, hist, info, metrics, tags = fit_and_measure(params, split_dir, callbacks)
        else:
            full, hist, info, metrics, tags = fit_vgg16(params, features_dir, callbacks)
        mlflow.set_tags(tags)
        for w in info["warnings"]:
            log.warning("train: %s", w)
        metrics |= {
            "best_epoch": info["best_epoch"],
            "epochs_run": info["epochs_run"],
            "train_seconds": round(info["seconds"], 1),
        }
        # The per-epoch train_*/val_* curves are logged already; these are about the run as a whole.
        whole = [k for k in metrics if not k.startswith(("train_acc", "train_loss", "val_"))]
        mlflow.log_metrics({k: float(metrics[k]) for k in whole})
        mlflow.set_tag(
            runs.NOTE_TAG,
            runs.run_note(
                params,
                f"best val_loss {metrics['val_loss']:.3f} (val accuracy {metrics['val_accuracy']:.1%}) "
                f"at epoch {info['best_epoch']} of {info['epochs_run']}",
            ),
        )
        model_path = model_dir / "model.keras"
        with atomic_path(model_path, suffix=".keras") as tmp:
            full.save(tmp)
        settings = input_settings(params, classes, info.get("train_prior"))
        write_json(model_dir / "classes.json", {"mode": mode, "classes": classes})
        write_json(model_dir / INPUT_SETTINGS_FILE, settings)
        logged = log_and_register(full, params, classes, step=info["best_epoch"], settings=settings)
        if test_md5:
            mlflow.MlflowClient().set_model_version_tag(
                logged["registered_model"], logged["version"], runs.TEST_SPLIT_TAG, test_md5
            )
        write_json(metrics_path, metrics)
        write_history_csv(history_path, hist)
        mlflow.log_artifact(str(history_path), "plots")
        info_out = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "experiment": params.mlflow.experiment,
            "tracking_uri": runs.tracking_uri(params.mlflow),
            "registered_model": logged["registered_model"],
            "version": logged["version"],
            "model_uri": logged["model_uri"],
            "model_id": logged["model_id"],
            "label_mode": mode,
            "model_kind": kind,
        }
        runs.write_run_info(model_dir / runs.RUN_INFO, info_out)
    return {**metrics, **info_out}


def _log_split_inputs(params: Params, split_dir: Path, contexts: dict[str, str]) -> str | None:
    """The split tables this run saw, as MLflow datasets (the run page's and run list's dataset column);
    the test split's md5 (held out from this model) as tag ``test_split_md5``, which it returns."""
    import mlflow

    found = {s: split_dir / f"{s}.csv" for s in contexts if (split_dir / f"{s}.csv").is_file()}
    if len(found) < len(contexts):
        log.warning("train: no split lists in %s; the MLflow run lists no datasets", split_dir)
        return None
    source = runs.data_source(params)
    datasets = [runs.split_dataset(path, f"{source}-{s}", params.labels.mode) for s, path in found.items()]
    mlflow.log_inputs(
        datasets=datasets, contexts=[contexts[s] for s in found], tags_list=[None] * len(datasets)
    )
    test = split_dir / "test.csv"
    if not test.is_file():
        return None
    md5 = runs.file_md5(test)  # the split held out from this model: what its test figures must come from
    mlflow.set_tag(runs.TEST_SPLIT_TAG, md5)
    return md5


def log_and_register(
    full_model,
    params: Params,
    classes: list[str],
    *,
    step: int = 0,
    name: str = "model",
    settings: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Log the full model as an MLflow logged model and register it as ``challenger``.

    TensorFlow flavour (``mlflow.tensorflow.log_model``: it saves a Keras 3 model as ``.keras`` and
    serves it through pyfunc), with signature, input example and the input settings as MLmodel metadata.
    ``mlflow.keras.log_model`` is not used: in MLflow 3.17 it writes the input example before it creates
    the model folder and fails (mlflow/mlflow#16183). ``step`` is the epoch whose weights the model
    holds: the run's ``train_*`` / ``val_*`` figures of that epoch are linked to the logged model.
    ``name`` "model" keeps ``runs:/<run id>/model`` pointing at it; the Models page shows the run's
    name beside it. ``settings``: the input settings stored with it (default :func:`input_settings`).
    """
    import mlflow
    from mlflow.models import infer_signature

    mode = params.labels.mode
    registered = runs.registered_model_name(params.mlflow, mode)
    example = input_example(params)
    signature = infer_signature(example, np.asarray(full_model.predict(example, verbose=0)))
    info = mlflow.tensorflow.log_model(
        full_model,
        name=name,
        signature=signature,
        input_example=example,
        pip_requirements=_pip_requirements(),
        metadata={
            "classes": classes,
            "label_mode": mode,
            "preprocessing": settings or input_settings(params, classes),
        },
        tags={"label_mode": mode, "model_kind": params.model.kind, "params_hash": runs.params_digest(params)},
        step=step,
    )
    mv = mlflow.register_model(info.model_uri, registered)
    client = mlflow.MlflowClient()
    version = str(mv.version)
    client.set_registered_model_alias(registered, "challenger", version)
    client.set_model_version_tag(registered, version, "label_mode", mode)
    client.set_model_version_tag(registered, version, "classes", json.dumps(classes))
    client.set_model_version_tag(registered, version, "model_id", info.model_id)
    client.set_model_version_tag(registered, version, "model_kind", params.model.kind)
    return {
        "registered_model": registered,
        "version": version,
        "model_uri": f"models:/{registered}/{version}",
        "model_id": info.model_id,
        "logged_model_uri": info.model_uri,
    }


def input_example(params: Params) -> np.ndarray:
    """One input as the model takes it: a rendered empty pattern (VGG16: a white baseline on black,
    224 x 224 x 3) or a 1-D pattern with one line (cnn1d: grid points x 1)."""
    if params.model.kind == "cnn1d":
        from xrdvision.data.measurement import grid

        example = np.zeros((1, grid(params.pattern).size, 1), dtype=np.float32)
        example[0, example.shape[1] // 3, 0] = 1.0
        return example
    example = np.zeros((1, 224, 224, 3), dtype=np.float32)
    example[0, 200:, :, :] = 255.0
    return example


def _pip_requirements() -> list[str]:
    """What serving the model needs, pinned to this environment's distributions (``tensorflow-cpu``
    here); MLflow would otherwise infer them by loading the model again in a subprocess."""
    from importlib.metadata import packages_distributions, version

    tensorflow = packages_distributions().get("tensorflow", ["tensorflow"])[0]
    return [f"{name}=={version(name)}" for name in ("mlflow", tensorflow, "keras", "numpy")]
