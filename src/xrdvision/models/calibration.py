"""Calibrated probabilities: temperature scaling, class-prior correction and the calibration error.

Why: a classifier trained on simulated patterns is over-confident on measured ones, and its class
frequencies (the training sources') are not those of the user's samples (minerals are mostly monoclinic
and orthorhombic). A temperature fitted on held-out *simulated* patterns (Guo et al. 2017) and a prior
correction (Saerens et al. 2002: multiply by new / training prior, renormalise) fix the two without
touching the network; the expected calibration error (ECE) says how well the probabilities match the
hit rate.
"""

from __future__ import annotations

import numpy as np


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of ``softmax(logits / T)`` on ``y``,
    searched on log T in [0.05, 20]."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)

    def nll(log_t: float) -> float:
        return float(-np.mean(log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(y)), y]))

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE: the mean |accuracy - confidence| over ``bins`` equal-width confidence bins, weighted by
    the share of predictions in each (0 = calibrated)."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(y) or not len(y):
        raise ValueError(f"need (n, k) probabilities and n labels, got {probs.shape} and {len(y)}")
    conf = probs.max(axis=1)
    hit = probs.argmax(axis=1) == y
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(hit[sel].mean() - conf[sel].mean())
    return float(total)


def correct_prior(probs: np.ndarray, train_prior: np.ndarray, new_prior: np.ndarray) -> np.ndarray:
    """Probabilities under ``new_prior`` of a model trained with class frequencies ``train_prior``:
    ``p * new / train``, renormalised (a class the training never saw stays at 0)."""
    probs = np.asarray(probs, dtype=np.float64)
    train_prior = np.asarray(train_prior, dtype=np.float64)
    new_prior = np.asarray(new_prior, dtype=np.float64)
    ratio = np.divide(new_prior, train_prior, out=np.zeros_like(new_prior), where=train_prior > 0)
    out = probs * ratio
    total = out.sum(axis=1, keepdims=True)
    return np.divide(out, total, out=np.full_like(out, 1.0 / out.shape[1]), where=total > 0)


def class_prior(labels: np.ndarray, n_classes: int) -> list[float]:
    """The training class frequencies of integer ``labels`` (what a trained model's outputs assume)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    return (counts / max(counts.sum(), 1.0)).tolist()


def prior_from_spec(
    spec: str, classes: list[str], train_prior: list[float] | None, where: str
) -> np.ndarray | None:
    """The class prior ``measured.prior`` names, aligned with ``classes``; None for ``train`` (the
    model's own: nothing to correct).

    ``uniform``: equal over the classes the training saw. A path: a CSV of ``class,weight`` rows (a
    header line ``class,weight``); a class the file omits gets weight 0, a class the model lacks or a
    weight that is negative or not a number is an error naming the file. ``where`` names the setting in
    error lines.
    """
    from xrdvision.errors import XrdVisionError

    if spec == "train":
        return None
    if train_prior is None or len(train_prior) != len(classes):
        raise XrdVisionError(
            f"{where}: {spec!r} needs the model's training class frequencies, and this model (trained "
            "before they were stored with it) has none: retrain it, or use measured.prior: train"
        )
    seen = np.asarray(train_prior, dtype=np.float64) > 0
    if spec == "uniform":
        return seen / seen.sum()
    from pathlib import Path

    from xrdvision.formats.tables import read_table

    rows = read_table(Path(spec), ["class", "weight"], f"class prior ({where})", allow_empty=False)
    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros(len(classes))
    for r in rows:
        name = r["class"].strip()
        if name not in index:
            raise XrdVisionError(f"{spec}: class {name!r} is not one of the model's classes ({where})")
        try:
            w = float(r["weight"])
        except ValueError:
            w = float("nan")
        if not (np.isfinite(w) and w >= 0):
            raise XrdVisionError(f"{spec}: weight of {name!r} must be a number >= 0, got {r['weight']!r}")
        out[index[name]] = w
    if not (out * seen).sum() > 0:
        raise XrdVisionError(f"{spec}: no positive weight on a class the model was trained on ({where})")
    return out / out.sum()


def coverage_curve(
    probs: np.ndarray, y: np.ndarray, thresholds: np.ndarray | None = None
) -> list[dict[str, float]]:
    """What an "uncertain" threshold buys: for each threshold on the top-1 probability, the share of
    patterns answered (coverage) and the accuracy on those (NaN when none is answered)."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    conf = probs.max(axis=1)
    hit = probs.argmax(axis=1) == y
    ts = np.round(np.arange(0.0, 1.0, 0.05), 2) if thresholds is None else np.asarray(thresholds)
    out = []
    for t in ts:
        kept = conf >= t
        out.append(
            {
                "threshold": float(t),
                "coverage": float(kept.mean()) if len(y) else 0.0,
                "accuracy": float(hit[kept].mean()) if kept.any() else float("nan"),
            }
        )
    return out
