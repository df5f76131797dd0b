"""Fitting the 1-D model on patterns drawn on the fly from peak lists (the ``train`` stage's cnn1d part).

Why a module of its own: :mod:`xrdvision.models.train` is the one training path (MLflow run, saved
model, registration) for both kinds; what differs is how inputs are made and fitted, which lives here
for ``cnn1d`` as :func:`fit_cnn1d`, beside :func:`xrdvision.models.train.fit_tail` for VGG16.

- Every epoch draws fresh measurement conditions for every training structure
  (:func:`xrdvision.data.measurement.measured_like`) in a ``keras.utils.PyDataset`` whose worker threads
  render the next batches while the network trains on the current one.
- Early stopping and the temperature watch a *synthetic* held-out set: whole compounds of the training
  sources set aside (``pattern.holdout_share``) and rendered once under drawn conditions, so COD's
  validation and test structures stay untouched by every choice made during training.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.crystal.labels import class_names
from xrdvision.data import measurement
from xrdvision.data.peak_table import PeakTable, cod_table, holdout_mask, training_table
from xrdvision.errors import XrdVisionError
from xrdvision.models import cnn1d
from xrdvision.models.calibration import class_prior, fit_temperature
from xrdvision.models.classes import class_weight_map, encode_labels

log = logging.getLogger(__name__)


def encode(table: PeakTable, mode: str, classes: list[str]) -> np.ndarray:
    """Class indices of a table's structures; a label outside the classes is an error."""
    return encode_labels(table.labels(mode), classes, "training peak lists")


def measured_batch(
    table: PeakTable, idx: np.ndarray, params: Params, x: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Scaled patterns (B, G, 1) of structures ``idx`` under fresh conditions (impurities: any others)."""
    y = measurement.draw_patterns(table, idx, params, x, rng)
    return measurement.scale_intensity(y, params.pattern.scale)[..., None]


def pattern_batches(table: PeakTable, y: np.ndarray, params: Params, x: np.ndarray, steps: int):
    """A ``keras.utils.PyDataset`` of ``steps`` batches per epoch, each drawn with a generator seeded by
    ``(seed, epoch, batch)``: reproducible, and independent of which worker thread renders it."""
    import keras

    class PatternBatches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=2, use_multiprocessing=False, max_queue_size=8)
            self.epoch = 0
            self.batch = params.train.batch_size

        def __len__(self) -> int:
            return steps

        def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
            order = np.random.default_rng([params.seed, self.epoch]).permutation(len(table))
            take = np.resize(order, steps * self.batch)[i * self.batch : (i + 1) * self.batch]
            rng = np.random.default_rng([params.seed, self.epoch, i, 1])
            return measured_batch(table, take, params, x, rng), y[take]

        def on_epoch_end(self) -> None:
            self.epoch += 1

    return PatternBatches()


def split_holdout(params: Params, table: PeakTable) -> tuple[PeakTable, PeakTable]:
    """(training structures, held-out structures): whole compounds, ``pattern.holdout_share`` of them
    (more for a small source, see below)."""
    # A small source (COD's ~500 training structures) would hold out a handful of compounds at 2 %: at
    # least 30 structures' worth of compounds (or a fifth of the source) are held out then.
    share = max(params.pattern.holdout_share, min(0.2, 30 / max(len(table), 1)))
    mask = holdout_mask(table, share, params.seed)
    if mask.all() or not mask.any():
        raise XrdVisionError(
            f"pattern.holdout_share={params.pattern.holdout_share}: {int(mask.sum())} of {len(table)} "
            "training structures held out; need some on both sides"
        )
    return table.subset(np.flatnonzero(~mask)), table.subset(np.flatnonzero(mask))


def fit_cnn1d(
    params: Params,
    *,
    split_dir: Path = Path("data/split"),
    extra_callbacks: list | None = None,
    backup_dir: Path | None = None,
    verbose: int = 2,
    table: PeakTable | None = None,
) -> tuple[Any, dict[str, list[float]], dict[str, Any]]:
    """Fit the 1-D model; returns (calibrated full model, history, info). ``table``: the training
    structures (default: those of ``split.train_sources``)."""
    import keras

    mode = params.labels.mode
    classes = class_names(mode)
    table = table if table is not None else training_table(params, cod_table(params), split_dir)
    train, hold = split_holdout(params, table)
    ytr, yho = encode(train, mode, classes), encode(hold, mode, classes)
    x = measurement.grid(params.pattern)
    keras.utils.set_random_seed(params.seed)
    top_k = 3 if mode == "crystal_system" else 5
    logits_model = cnn1d.build_logits_model(len(classes), x.size, params.cnn1d, params.seed)
    cnn1d.compile_logits(logits_model, params.train.learning_rate, top_k)
    rng = np.random.default_rng([params.seed, 7])
    hold_idx = rng.choice(len(hold), size=params.pattern.holdout, replace=len(hold) < params.pattern.holdout)
    x_hold = measured_batch(hold, hold_idx, params, x, rng)
    y_hold = yho[hold_idx]
    per_epoch = params.pattern.patterns_per_epoch or len(train)
    steps = max(1, -(-per_epoch // params.train.batch_size))
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=params.train.patience, restore_best_weights=True, verbose=1
        ),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, verbose=1),
        *(extra_callbacks or []),
    ]
    if backup_dir is not None:
        callbacks.append(keras.callbacks.BackupAndRestore(str(backup_dir)))
    class_weight = None
    if params.train.class_weights:
        class_weight = class_weight_map(ytr)
    log.info(
        "cnn1d: %d training structures, %d held out (%d patterns), %d steps of %d per epoch, grid %d points",
        len(train),
        len(hold),
        len(y_hold),
        steps,
        params.train.batch_size,
        x.size,
    )
    t0 = time.perf_counter()
    history = logits_model.fit(
        pattern_batches(train, ytr, params, x, steps),
        validation_data=(x_hold, y_hold),
        epochs=params.train.epochs,
        class_weight=class_weight,
        callbacks=callbacks,
        verbose=verbose,
    )
    seconds = time.perf_counter() - t0
    hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    logits = np.asarray(logits_model.predict(x_hold, batch_size=256, verbose=0))
    temperature = fit_temperature(logits, y_hold)
    full = cnn1d.with_temperature(logits_model, temperature)
    best_epoch = int(np.argmin(hist["val_loss"])) if hist.get("val_loss") else len(hist.get("loss", [])) - 1
    info = {
        "seconds": seconds,
        "epochs_run": len(hist.get("loss", [])),
        "best_epoch": best_epoch,
        "temperature": temperature,
        "n_train_structures": len(train),
        "n_holdout_structures": len(hold),
        "holdout_logits": logits,
        "holdout_y": y_hold,
        "sources": {s: int((table.source == s).sum()) for s in sorted(set(table.source.tolist()))},
        "train_prior": class_prior(ytr, len(classes)),
        "train_formulas": set(train.reduced_formula.tolist()) | set(hold.reduced_formula.tolist()),
        "warnings": [],
    }
    return full, hist, info


def backup_dir(params: Params) -> Path:
    """Resume folder keyed by the settings and the training data's file stamps (a changed run never
    resumes a stale one)."""
    import hashlib
    import json

    from xrdvision.data.peak_table import SHARD_SOURCES

    stamps = sorted(
        str(p.stat().st_mtime_ns)
        for s in params.split.train_sources
        if s in SHARD_SOURCES
        for p in Path(SHARD_SOURCES[s]).glob("*.npz")
    )
    key = json.dumps({"params": params.flat(), "data": stamps}, sort_keys=True, default=str)
    return Path("data/cache/train_backup") / f"cnn1d-{hashlib.md5(key.encode()).hexdigest()[:12]}"


def fit_and_measure(
    params: Params, split_dir: Path, callbacks: list
) -> tuple[Any, dict[str, list[float]], dict[str, Any], dict[str, Any], dict[str, str]]:
    """:func:`fit_cnn1d` with resume, and the run's figures: training patterns at the best epoch,
    the synthetic held-out patterns (``val_*``: what early stopping watched) before and after
    temperature scaling. Returns (full model, history, info, metrics, tags) as ``train.fit_vgg16``."""
    from scipy.special import log_softmax, softmax

    from xrdvision.models.calibration import expected_calibration_error

    full, hist, info = fit_cnn1d(
        params, split_dir=split_dir, extra_callbacks=callbacks, backup_dir=backup_dir(params)
    )
    best = info["best_epoch"]
    y, logits, t = info["holdout_y"], info["holdout_logits"], info["temperature"]
    logp = log_softmax(logits / t, axis=1)
    probs = softmax(logits / t, axis=1)
    metrics = {
        "train_accuracy": hist["accuracy"][best],
        "train_loss": hist["loss"][best],
        "val_accuracy": float(np.mean(logits.argmax(1) == y)),
        "val_loss": float(-np.mean(logp[np.arange(len(y)), y])),
        "val_loss_uncalibrated": hist["val_loss"][best],
        "val_ece": expected_calibration_error(probs, y),
        "val_ece_uncalibrated": expected_calibration_error(softmax(logits, axis=1), y),
        "temperature": t,
        "n_train_structures": info["n_train_structures"],
        "n_holdout_structures": info["n_holdout_structures"],
        "n_holdout_patterns": len(y),
        **{f"n_train_{s}": n for s, n in info["sources"].items()},
    }
    return full, hist, info, metrics, {"train_sources": ",".join(params.split.train_sources)}
