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
