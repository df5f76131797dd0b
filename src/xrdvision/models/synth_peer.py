"""The check that matters for the generator: the peak-list peer trained on synthetic crystals only,
scored on real COD structures it never saw.

Why here and not in the ``generate`` stage's data module: it trains a model (the extremely randomised
trees of :mod:`xrdvision.models.peak_peer`, the yardstick of the README: 58.2 % by grouped CV on real
data), and models sit above data. The ``generate`` command runs it after the shards are written.

Trained on the first 10^3, 10^4, 10^5 (10^6) *drawn* crystals (those of them that were simulated; the
shards' seeded streams make a smaller run's crystals a prefix of a larger one's), as many as the run
drew; labels are the crystal systems spglib gave the synthetic crystals. Scored on COD's validation and
test structures of ``data/split`` (never fitted on: :mod:`xrdvision.data.generate_inputs`), with their
peak lists from ``data/patterns/patterns.npz`` and labels from the split lists. Writes
``synth_only_accuracy_1e3`` ... into ``metrics/generate.json`` beside the realism figures.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import Params
from xrdvision.errors import InputError
from xrdvision.formats.atomic import write_json
from xrdvision.formats.patterns import load_patterns
from xrdvision.formats.peaklists import read_shards
from xrdvision.formats.tables import read_split
from xrdvision.models.peak_peer import feature_matrix, make_peer

log = logging.getLogger(__name__)

SIZES = (1_000, 10_000, 100_000, 1_000_000)
TREES = 200  # as study_mp_transfer at 10^5 structures (the representation study used 500)
PART = 50  # trees grown at a time


def real_eval_set(split_dir: Path, patterns_path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features, crystal systems and ids of COD's validation + test structures."""
    rows = [r for s in ("val", "test") for r in read_split(Path(split_dir) / f"{s}.csv")]
    label = {r["cod_id"].strip(): r["crystal_system"].strip() for r in rows}
    p = load_patterns(patterns_path)
    where = {x: i for i, x in enumerate(p.ids)}
    missing = sorted(set(label) - set(where))
    if missing:
        raise InputError(patterns_path, f"no peak list for split structure(s) {', '.join(missing[:5])}")
    ids = sorted(label)
    lists = []
    for x in ids:
        _, amp, d = p.peaks(where[x])
        lists.append((amp, d))
    return feature_matrix(lists), np.array([label[x] for x in ids]), ids


def synthetic_set(generated_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, crystal systems and draw indices of every simulated synthetic crystal (shard order)."""
    feats, systems, index = [], [], []
    for shard in read_shards(generated_dir, source="synth"):
        d = shard.d()
        lists = []
        for i in range(len(shard)):
            sl = slice(int(shard.offsets[i]), int(shard.offsets[i + 1]))
            lists.append((shard.intensity[sl], d[sl]))
        feats.append(feature_matrix(lists))
        systems.extend(shard.crystal_system)
        index.extend(int(x.rsplit("-", 1)[1]) for x in shard.ids)
    X = np.concatenate(feats) if feats else np.zeros((0, 85))
    return X, np.array(systems), np.array(index, dtype=np.int64)


def size_key(n: int) -> str:
    """``1000`` -> ``1e3``."""
    return f"1e{round(math.log10(n))}"


def forest_predict(X: np.ndarray, y: np.ndarray, X_test: np.ndarray, n_jobs: int = 2) -> np.ndarray:
    """The peer's predictions, its ``TREES`` trees grown ``PART`` at a time and their class
    probabilities summed (the same forest, memory of a part: 200 trees on 10^5 crystals hold ~1.2 GB)."""
    classes = np.unique(y)
    proba = np.zeros((len(X_test), len(classes)))
    for k in range(TREES // PART):
        peer = make_peer(PART, min_samples_leaf=2, n_jobs=n_jobs, random_state=k).fit(X, y)
        peer.set_params(n_jobs=1)  # threads add votes in completion order: ties would fall at random
        proba += peer.predict_proba(X_test)
        del peer
    return classes[proba.argmax(axis=1)]


def score_sizes(
    X: np.ndarray,
    y: np.ndarray,
    index: np.ndarray,
    X_real: np.ndarray,
    y_real: np.ndarray,
    n_drawn: int,
    *,
    n_jobs: int = 2,
) -> dict[str, Any]:
    """``synth_only_accuracy_<size>`` for every size of :data:`SIZES` up to ``n_drawn``."""
    out: dict[str, Any] = {}
    for size in (s for s in SIZES if s <= n_drawn):
        rows = index < size
        t0 = time.perf_counter()
        acc = (
            float(np.mean(forest_predict(X[rows], y[rows], X_real, n_jobs) == y_real)) if len(y_real) else 0.0
        )
        key = size_key(size)
        out[f"synth_only_accuracy_{key}"] = round(acc, 4)
        out[f"synth_only_trained_{key}"] = int(rows.sum())
        log.info(
            "generate: peer on %d synthetic crystals: %.1f %% on %d real structures (%.0f s)",
            rows.sum(),
            100 * acc,
            len(y_real),
            time.perf_counter() - t0,
        )
    out["synth_only_scored_on"] = len(y_real)
    return out


def run_synth_peer(
    params: Params, generated_dir: Path, split_dir: Path, patterns_dir: Path, metrics_path: Path
) -> dict[str, Any]:
    """Add the synthetic-only accuracies to ``metrics_path`` (written by the generate stage); returns them."""
    metrics_path = Path(metrics_path)
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    if params.generate.n_crystals == 0:
        return {}
    X_real, y_real, _ = real_eval_set(split_dir, Path(patterns_dir) / "patterns.npz")
    X, y, index = synthetic_set(generated_dir)
    scores = score_sizes(
        X, y, index, X_real, y_real, params.generate.n_crystals, n_jobs=params.generate.workers
    )
    write_json(metrics_path, {**metrics, **scores})
    return scores
