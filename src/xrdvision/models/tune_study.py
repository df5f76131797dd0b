"""The Optuna study's identity and storage: what must match to resume it, where it lives, its summary.

The study lives in an Optuna RDB storage (``tune.storage``: sqlite by default, any SQLAlchemy URL so
several machines can work on one study) and a rerun resumes it. The settings that define the objective
(search space, epochs, label mode, data) are stored on the study; a rerun with other settings under the
same ``tune.study_name`` is an error rather than a silent mix of two experiments.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.errors import XrdVisionError, one_line
from xrdvision.models.search_space import (
    DENSE_WIDTHS,
    DROPOUT_RANGE,
    MAX_DENSE_LAYERS,
    conv_choices,
    overrides_from_trial,
)
from xrdvision.models.tune_features import SPLITS

OBJECTIVE = "val_loss"  # best (lowest) validation loss of a trial, minimised
PRUNER_STARTUP_TRIALS = 2  # trials that always run to the end before pruning starts
PRUNER_WARMUP_EPOCHS = 2  # epochs a trial always runs before it can be pruned
SETTINGS_ATTR = "xrdvision_settings"


def study_settings(params: Params, data_md5: str, weights_md5: str) -> dict[str, Any]:
    """Everything that defines the objective; stored on the study and compared on every rerun.

    The seed is left out on purpose: a rerun with another seed measures the same objective.
    """
    if params.model.kind == "cnn1d":
        from xrdvision.models.search_space import CNN1D_DEPTHS, CNN1D_KERNELS, CNN1D_WIDTHS

        return {
            "objective": f"minimize {OBJECTIVE} (synthetic held-out patterns)",
            "model.kind": "cnn1d",
            "tune.lr_range": [float(v) for v in params.tune.lr_range],
            "cnn1d.widths": list(CNN1D_WIDTHS),
            "cnn1d.depths": list(CNN1D_DEPTHS),
            "cnn1d.kernels": list(CNN1D_KERNELS),
            "dropout_range": list(DROPOUT_RANGE),
            "tune.epochs": params.tune.epochs,
            "labels.mode": params.labels.mode,
            "train.batch_size": params.train.batch_size,
            "train.patience": params.train.patience,
            "pattern.patterns_per_epoch": params.pattern.patterns_per_epoch,
            "data_md5": data_md5,
        }
    return {
        "objective": f"minimize {OBJECTIVE}",
        "tune.lr_range": [float(v) for v in params.tune.lr_range],
        "dense_layers": [1, MAX_DENSE_LAYERS],
        "dense_widths": list(DENSE_WIDTHS),
        "dropout_range": list(DROPOUT_RANGE),
        "trainable_conv": conv_choices(params.tune),
        "tune.epochs": params.tune.epochs,
        "labels.mode": params.labels.mode,
        "train.batch_size": params.train.batch_size,
        "train.patience": params.train.patience,
        "train.class_weights": params.train.class_weights,
        "weights_md5": weights_md5,
        "data_md5": data_md5,
    }


def settings_mismatch(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One short phrase per setting that differs (empty: the study can be resumed)."""
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if a != b:
            if key.endswith("md5"):
                a = str(a)[:8] if a else a
                b = str(b)[:8] if b else b
            out.append(f"{key} stored {a} vs now {b}")
    return out


def data_fingerprint(splits: dict[str, dict[str, np.ndarray]], image_dir: Path, mode: str) -> str:
    """md5 of the train/val images (names, labels, file bytes): independent of the cached cut layer.

    Keyed on the images rather than the cached tensors so that changing ``model.trainable_conv`` in
    params.yaml (and re-running ``features``) does not make the study look like another experiment.
    """
    h = hashlib.md5()
    for s in SPLITS:
        for name, label in zip(splits[s]["image"], splits[s][mode], strict=True):
            h.update(f"{s}\t{name}\t{label}\n".encode())
            path = Path(image_dir) / str(name)
            h.update(hashlib.md5(path.read_bytes()).digest() if path.is_file() else b"missing")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------


def table_fingerprint(table: Any, mode: str) -> str:
    """md5 of a peak table's structures and labels: the 1-D model's training data, as a study sees it."""
    h = hashlib.md5()
    for ident, label in zip(table.ids.tolist(), table.labels(mode).tolist(), strict=True):
        h.update(f"{ident}\t{label}\n".encode())
    return h.hexdigest()


def display_url(url: str) -> str:
    """The storage URL with any password hidden (it goes into messages and MLflow tags)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: the error that follows says so
        return url


def open_storage(url: str):
    """Connect to the Optuna RDB storage (creating a local sqlite file's folder), or fail in one line."""
    import optuna

    engine_kwargs: dict[str, Any] = {}
    if url.startswith(("postgresql", "mysql")):
        engine_kwargs = {"connect_args": {"connect_timeout": 10}}  # not minutes of TCP retries
    try:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as exc:  # SQLAlchemy, DB drivers and a missing driver raise different types
        raise XrdVisionError(f"{display_url(url)}: Optuna storage not reachable ({one_line(exc)})") from None


def open_study(params: Params, storage, settings: dict[str, Any]):
    """Create or resume the study; a stored study with other settings is a one-line error.

    The TPE seed is ``seed + number of trials already in the study``: a resumed study with the
    original seed would replay the first random suggestions and repeat trials already run.
    """
    import optuna

    name = params.tune.study_name
    where = f"{display_url(params.tune.storage)}: study '{name}'"
    probe = optuna.load_study(study_name=name, storage=storage) if _study_exists(storage, name) else None
    n_existing = len(probe.trials) if probe is not None else 0
    if probe is not None:
        if len(probe.directions) > 1 or probe.direction != optuna.study.StudyDirection.MINIMIZE:
            raise XrdVisionError(
                f"{where} exists with direction {[d.name.lower() for d in probe.directions]}, "
                f"tune minimises {OBJECTIVE}: use another tune.study_name"
            )
        stored = probe.user_attrs.get(SETTINGS_ATTR)
        if stored is None and n_existing:
            raise XrdVisionError(
                f"{where} exists and was not made by xrdvision tune: use another tune.study_name"
            )
        diff = settings_mismatch(stored or {}, settings) if stored is not None else []
        if diff:
            raise XrdVisionError(
                f"{where} exists with other settings ({'; '.join(diff[:3])}): "
                "use another tune.study_name to start a new study"
            )
    sampler = optuna.samplers.TPESampler(
        seed=params.seed + n_existing,
        n_startup_trials=max(2, min(10, params.tune.trials // 3)),
    )
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS
    )
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction="minimize",
        load_if_exists=True,
    )
    if SETTINGS_ATTR not in study.user_attrs:
        study.set_user_attr(SETTINGS_ATTR, settings)
    return study


def _study_exists(storage, name: str) -> bool:
    import optuna

    return name in optuna.study.get_all_study_names(storage)


def summarize(study) -> dict[str, Any]:
    """Counts and the best trial of the whole study (all runs, all machines)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    out: dict[str, Any] = {
        "n_trials": sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials),
        "n_complete": len(complete),
        "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "n_failed": sum(t.state == TrialState.FAIL for t in trials),
        "best_value": None,
        "best_params": None,
        "best_trial": None,
        "best_val_accuracy": None,
        "baseline_value": None,
        "baseline_val_accuracy": None,
    }
    if complete:
        best = min(complete, key=lambda t: t.value)
        out.update(
            {
                "best_value": float(best.value),
                "best_params": overrides_from_trial(best.params),
                "best_trial": best.number,
                "best_val_accuracy": float(best.user_attrs.get("val_accuracy", float("nan"))),
            }
        )
    base = [t for t in complete if t.user_attrs.get("baseline")]
    if base:
        out["baseline_value"] = float(base[0].value)
        out["baseline_val_accuracy"] = float(base[0].user_attrs.get("val_accuracy", float("nan")))
    return out
