"""The peak-list peer: extremely randomised trees on a structure's exact line positions, no image.

Why a classifier beside the VGG16 one? It is the yardstick the image models are measured against
(README, "What limits it"): on the 852 COD structures it reaches 58.2 % by grouped cross-validation,
8 points above every rendering, and it is cheap enough to train on 10^5 structures on two cores, so
it is also the first measure of what more training data buys (``benchmarks/study_mp_transfer.py``).
One featurisation serves both studies, so their figures stay comparable.

Features of one peak list (85 numbers), from the lines above 0.2 % of the strongest:

- the first 40 ratios ``q / q_1`` of ``q = 1/d^2`` (ascending) over the first line's, zero-padded:
  scale-free, so a cell 1-3 % too large (DFT-relaxed Materials Project structures) changes none;
- their histogram, 44 bins over 1-12: the spacing pattern regardless of which lines are missing;
- ``q_1`` itself (1/A^2): the size of the cell, the one absolute number.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

N_RATIOS = 40
HIST_EDGES = np.linspace(1.0, 12.0, 45)
MIN_RELATIVE = 0.002  # lines weaker than this fraction of the strongest are ignored
N_FEATURES = N_RATIOS + HIST_EDGES.size - 1 + 1


def peak_list_features(intensity: np.ndarray, d: np.ndarray, n: int = N_RATIOS) -> np.ndarray:
    """The ``n + 45`` features of one peak list (``intensity`` relative or absolute, ``d`` in A).

    ``ValueError`` for an empty list (nothing to describe: the caller decides whether to drop it).
    """
    amp = np.asarray(intensity, dtype=np.float64)
    dd = np.asarray(d, dtype=np.float64)
    if amp.size == 0 or not amp.max() > 0:
        raise ValueError("empty peak list")
    q = np.sort(1.0 / dd[amp > MIN_RELATIVE * amp.max()] ** 2)
    r = q / q[0]
    head = np.pad(r[:n], (0, max(0, n - r.size)))
    hist = np.histogram(r, bins=HIST_EDGES)[0]
    return np.concatenate([head, hist, [q[0]]])


def feature_matrix(peak_lists: Iterable[tuple[np.ndarray, np.ndarray]], n: int = N_RATIOS) -> np.ndarray:
    """One row of :func:`peak_list_features` per ``(intensity, d)`` peak list."""
    rows = [peak_list_features(amp, d, n) for amp, d in peak_lists]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), n + HIST_EDGES.size)


def batch_features(batch: Any) -> tuple[np.ndarray, np.ndarray]:
    """Features of a :class:`xrdvision.crystal.powder.PeakBatch`: ``(X, kept)``, ``kept`` the indices of
    the records that have lines (a record in ``batch.errors`` or with an empty list is left out)."""
    off = batch.offsets
    kept = [i for i in range(len(batch)) if i not in batch.errors and off[i + 1] > off[i]]
    lists = ((batch.intensity[off[i] : off[i + 1]], batch.d[off[i] : off[i + 1]]) for i in kept)
    return feature_matrix(lists), np.asarray(kept, dtype=np.int64)


def make_peer(
    n_estimators: int = 500,
    *,
    min_samples_leaf: int = 2,
    max_features: str | float | int = "sqrt",
    n_jobs: int = -1,
    random_state: int = 0,
) -> Any:
    """The peer as the representation study trains it (500 trees, leaves of >= 2); fewer trees or a
    larger leaf make it affordable at 10^5 training structures (each tree then has ~10^5 nodes)."""
    from sklearn.ensemble import ExtraTreesClassifier

    return ExtraTreesClassifier(
        n_estimators,
        min_samples_leaf=min_samples_leaf,
        max_features=max_features,
        n_jobs=n_jobs,
        random_state=random_state,
    )


def class_probabilities(model: Any, X: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """``model.predict_proba`` with one column per name in ``classes`` (in that order): a class the
    model never saw in training gets probability 0, so scores use the project's fixed class index."""
    proba = np.asarray(model.predict_proba(X))
    out = np.zeros((len(X), len(classes)))
    index = {c: i for i, c in enumerate(classes)}
    for j, c in enumerate(model.classes_):
        if str(c) not in index:
            raise ValueError(f"model class {c!r} is not one of {list(classes)}")
        out[:, index[str(c)]] = proba[:, j]
    return out
