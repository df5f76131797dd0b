"""Materials Project -> COD transfer: featurise many MP structures, train on them, score on all of COD.

Why: COD gives 597 real training structures, and every image model saturates at 46-50 % on them. The
Materials Project (``../shared/mp``, 154,925 structures) is 250 times more. Whether it helps is
measured the honest way: train on Materials Project structures only, never on a compound that is in
COD (same reduced formula, :func:`select`), and score on every COD structure
(:mod:`xrdvision.data.cod_set`), which is then an external test set.

The shards are read by :mod:`xrdvision.data.mp_source` (its catalogue, nested seeded samples, line
reader and spglib labels): this module only decides which structures, and turns each into the
peak-list peer's features (:mod:`xrdvision.models.peak_peer`) with the project's own label. A structure
costs ~1 ms of batch simulation (:mod:`xrdvision.crystal.powder`) plus its symmetry analysis, so
:func:`featurise_shards` gives worker processes ``(shard, line numbers)`` tasks that they read
themselves: only names and numbers cross processes, and 10^5 structures take minutes on two cores.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.crystal.powder import PowderSettings, simulate_batch
from xrdvision.data.mp_source import Entry, eligible, mp_labels, read_lines, sample
from xrdvision.errors import one_line
from xrdvision.formats.atomic import atomic_path
from xrdvision.models.evaluate import classification_metrics
from xrdvision.models.peak_peer import N_FEATURES, batch_features, class_probabilities, make_peer

LabelFn = Callable[[Mapping[str, Any], float, float], tuple[int, str]]


def select(
    entries: Sequence[Entry], held_out_formulas: Collection[str], sizes: Sequence[int], seed: int
) -> dict[str, Any]:
    """The training sets of the study, as catalogue entries (:func:`xrdvision.data.mp_source.catalogue`).

    Every Materials Project structure whose reduced formula is among ``held_out_formulas`` (the scored
    COD structures') is dropped first, then: for each of ``sizes`` a seeded sample of what is left
    (nested: a smaller one is part of every larger one; a size above what is left takes all), and all
    ICSD-linked ones (``icsd``); ``kept`` is everything left, ``dropped_formulas`` the held-out
    compounds the Materials Project has. Also the counts: ``n_catalogue``, ``n_dropped`` (and
    ``_icsd``), ``n_left``.
    """
    kept = [e for e in entries if e.reduced_formula not in held_out_formulas]
    icsd = [e for e in kept if eligible(e, icsd_only=True)]
    return {
        "n_catalogue": len(entries),
        "n_dropped": len(entries) - len(kept),
        "n_dropped_icsd": sum(e.icsd for e in entries) - len(icsd),
        "n_left": len(kept),
        "dropped_formulas": sorted({e.reduced_formula for e in entries} & set(held_out_formulas)),
        "kept": kept,
        "sizes": {int(n): sample(kept, int(n), seed) for n in sizes},
        "icsd": icsd,
    }


def element_set(formula: str) -> frozenset[str]:
    """The elements of a formula (``"Fe0.5Ni0.5O"`` -> ``{"Fe", "Ni", "O"}``): its chemical system, for
    a stricter leakage check than the reduced formula (no compound of the same elements at all)."""
    return frozenset(re.findall(r"[A-Z][a-z]?", formula))


def shard_tasks(entries: Iterable[Entry], chunk: int = 500) -> list[tuple[str, list[int]]]:
    """``(shard file name, line numbers)`` tasks of at most ``chunk`` records, in shard and line order."""
    by_shard: dict[str, list[int]] = {}
    for e in entries:
        by_shard.setdefault(e.shard, []).append(e.line)
    tasks = []
    for shard in sorted(by_shard):
        lines = sorted(set(by_shard[shard]))
        tasks += [(shard, lines[i : i + chunk]) for i in range(0, len(lines), chunk)]
    return tasks


def own_labels(record: Mapping[str, Any], symprec: float, angle_tolerance: float) -> tuple[int, str]:
    """The project's own ``(space group, crystal system)`` of a Materials Project record."""
    return mp_labels(record, symprec, angle_tolerance)


@dataclass
class Featurised:
    """Peak-list features of the records that simulated and got a label, in task order."""

    ids: list[str]
    X: np.ndarray
    label: np.ndarray  # the project's own crystal system (spglib at labels.symprec)
    space_group: np.ndarray  # ... and space group
    shard_space_group: np.ndarray  # the record's ``sg`` field (0 if it has none)
    errors: dict[str, str] = field(default_factory=dict)  # id -> one line
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: Sequence[int] | np.ndarray) -> Featurised:
        idx = np.asarray(idx, dtype=np.int64)
        arrays = (self.X, self.label, self.space_group, self.shard_space_group)
        return Featurised([self.ids[i] for i in idx], *(a[idx] for a in arrays), {}, self.seconds)

    def rows_of(self, ids: Iterable[str]) -> np.ndarray:
        """Row indices of ``ids`` (those that were featurised; the others are skipped)."""
        where = {x: i for i, x in enumerate(self.ids)}
        return np.array([where[x] for x in ids if x in where], dtype=np.int64)

    def save(self, path: str | Path) -> None:
        arrays = {"ids": np.array(self.ids, dtype=str), "X": self.X, "label": self.label}
        arrays |= {"space_group": self.space_group, "shard_space_group": self.shard_space_group}
        arrays |= {"error_ids": np.array(list(self.errors), dtype=str)}
        arrays |= {"error_lines": np.array(list(self.errors.values()), dtype=str)}
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, seconds=self.seconds, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Featurised:
        with np.load(path, allow_pickle=False) as z:
            errors = dict(zip(z["error_ids"].tolist(), z["error_lines"].tolist(), strict=True))
            return cls(
                [str(i) for i in z["ids"]],
                z["X"],
                z["label"],
                z["space_group"],
                z["shard_space_group"],
                errors,
                float(z["seconds"]),
            )


def featurise_chunk(
    records: Sequence[Mapping[str, Any]],
    settings: PowderSettings,
    symprec: float,
    angle_tolerance: float,
    label_fn: LabelFn = own_labels,
) -> dict[str, Any]:
    """Simulate, featurise and label one chunk; a record that fails either way is an error line."""
    batch = simulate_batch(records, settings, source="mp")
    X, kept = batch_features(batch)
    errors = {batch.ids[i]: msg for i, msg in batch.errors.items()}
    out: dict[str, list[Any]] = {"ids": [], "X": [], "label": [], "space_group": [], "shard_space_group": []}
    for row, i in zip(X, kept, strict=True):
        rec = records[i]
        try:
            sg, system = label_fn(rec, symprec, angle_tolerance)
        except Exception as exc:  # spglib fails a handful of odd cells: reported, the chunk goes on
            errors[batch.ids[i]] = f"mp:{batch.ids[i]}: labels: {one_line(exc)}"
            continue
        out["ids"].append(batch.ids[i])
        out["X"].append(row)
        out["label"].append(str(system))
        out["space_group"].append(int(sg))
        out["shard_space_group"].append(int(rec.get("sg") or 0))
    return {**out, "X": np.asarray(out["X"], dtype=np.float64).reshape(-1, N_FEATURES), "errors": errors}


def featurise_lines(
    path: str, lines: list[int], settings: PowderSettings, symprec: float, angle_tolerance: float
) -> dict[str, Any]:
    """:func:`featurise_chunk` of the records at ``lines`` of one shard (a worker's task: the worker
    reads its own lines, so only file names and line numbers cross processes)."""
    errors: list[str] = []
    out = featurise_chunk(read_lines(Path(path), lines, errors), settings, symprec, angle_tolerance)
    for k, line in enumerate(errors):
        out["errors"][f"{Path(path).name}#{k}"] = line
    return out


def featurise_shards(
    folder: str | Path,
    tasks: Sequence[tuple[str, list[int]]],
    *,
    symprec: float = 0.01,
    angle_tolerance: float = 5.0,
    settings: PowderSettings | None = None,
    workers: int = 2,
    timeout_s: float = 900.0,
    progress: Callable[[int, int], None] | None = None,
) -> Featurised:
    """:func:`featurise_lines` over ``tasks`` (:func:`shard_tasks`) in ``workers`` processes, results
    in task order; a task that times out or whose worker dies is one error line. ``progress(done, n)``."""
    from xrdvision.data.pool import TaskFailure, run_pool

    settings = settings or PowderSettings()
    t0 = time.perf_counter()
    parts: dict[int, dict[str, Any]] = {}

    def keep(k: int, out: Any) -> None:
        if isinstance(out, TaskFailure):
            shard, lines = tasks[k]
            where = f"{shard}:lines {lines[0]}-{lines[-1]}"
            empty = {"ids": [], "X": np.zeros((0, N_FEATURES)), "label": [], "space_group": []}
            out = {**empty, "shard_space_group": [], "errors": {where: f"{where}: {out.reason}"}}
        parts[k] = out
        if progress:
            progress(len(parts), len(tasks))

    jobs = [
        (k, (str(Path(folder) / s), lines, settings, symprec, angle_tolerance))
        for k, (s, lines) in enumerate(tasks)
    ]
    preload = ("spglib", "xrdvision.models.mp_transfer")
    run_pool(featurise_lines, jobs, keep, workers=workers, timeout_s=timeout_s, preload=preload)
    ordered = [parts[k] for k in sorted(parts)]
    errors: dict[str, str] = {}
    for p in ordered:
        errors.update(p["errors"])

    def cat(key: str, dtype: Any) -> np.ndarray:
        return np.array([x for p in ordered for x in p[key]], dtype=dtype)

    return Featurised(
        ids=[i for p in ordered for i in p["ids"]],
        X=np.concatenate([p["X"] for p in ordered]) if ordered else np.zeros((0, N_FEATURES)),
        label=cat("label", str),
        space_group=cat("space_group", np.int64),
        shard_space_group=cat("shard_space_group", np.int64),
        errors=errors,
        seconds=time.perf_counter() - t0,
    )


def disagreement_rate(own: Sequence[int], other: Sequence[int]) -> float:
    """Fraction of structures whose two space groups differ (those where ``other`` is 0, unknown,
    left out); NaN if none is left."""
    pairs = [(int(a), int(b)) for a, b in zip(own, other, strict=True) if int(b) > 0]
    return float(np.mean([a != b for a, b in pairs])) if pairs else float("nan")


def score_subsets(
    probs: np.ndarray,
    truth: Sequence[str],
    classes: Sequence[str],
    subsets: Mapping[str, np.ndarray],
    seed: int,
) -> dict[str, dict[str, Any]]:
    """The evaluate stage's figures (accuracy with a 95 % bootstrap interval, balanced accuracy, loss,
    top-3, macro F1, ``n_test``) on each named boolean mask of the scored structures."""
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[str(t)] for t in truth], dtype=np.int64)
    out = {}
    for name, mask in subsets.items():
        mask = np.asarray(mask, dtype=bool)
        out[name] = classification_metrics(probs[mask], y[mask], list(classes), seed) if mask.any() else {}
    return out


def train_and_score(
    X: np.ndarray,
    y: np.ndarray,
    X_test: np.ndarray,
    truth: Sequence[str],
    classes: Sequence[str],
    subsets: Mapping[str, np.ndarray],
    seed: int,
    **peer: Any,
) -> dict[str, Any]:
    """Fit the peak-list peer (``peer``: :func:`xrdvision.models.peak_peer.make_peer`'s settings) on
    ``(X, y)`` and score it on the test structures' named subsets (:func:`score_subsets`), with the
    training set's size and classes and the fit and predict wall times."""
    model = make_peer(**peer)
    t0 = time.perf_counter()
    model.fit(X, y)
    fit_s = time.perf_counter() - t0
    # One thread to predict: threads add the trees' votes in completion order, and in a forest of a
    # few hundred trees two classes can tie, so the rounding would decide a few structures at random.
    model.set_params(n_jobs=1)
    t0 = time.perf_counter()
    probs = class_probabilities(model, X_test, classes)
    return {
        "n_train": len(y),
        "train_per_class": {c: int(np.sum(y == c)) for c in classes},
        "fit_seconds": round(fit_s, 1),
        "predict_seconds": round(time.perf_counter() - t0, 1),
        "cod": score_subsets(probs, truth, classes, subsets, seed),
    }


def labelled_peak_lists(
    folder: str | Path,
    entries: Sequence[Entry],
    settings: PowderSettings,
    symprec: float = 0.01,
    angle_tolerance: float = 5.0,
) -> tuple[list[str], list[Any], np.ndarray, dict[str, str]]:
    """``(ids, peak lists, own crystal systems, errors)`` of ``entries``, in the order given (for the
    image model, which needs the lines themselves, not the peer's features); in this process."""
    by_shard: dict[str, list[int]] = {}
    for e in entries:
        by_shard.setdefault(e.shard, []).append(e.line)
    errors: list[str] = []
    records = {
        r["id"]: r for s, lines in by_shard.items() for r in read_lines(Path(folder) / s, lines, errors)
    }
    ordered = [records[e.id] for e in entries if e.id in records]
    batch = simulate_batch(ordered, settings, source="mp")
    bad = {batch.ids[i]: msg for i, msg in batch.errors.items()} | {
        f"read#{k}": m for k, m in enumerate(errors)
    }
    ids, lists, labels = [], [], []
    for i, rec in enumerate(ordered):
        if i in batch.errors:
            continue
        try:
            labels.append(own_labels(rec, symprec, angle_tolerance)[1])
        except ValueError as exc:
            bad[rec["id"]] = f"mp:{rec['id']}: labels: {exc}"
            continue
        ids.append(rec["id"])
        lists.append(batch.peaks(i))
    return ids, lists, np.array(labels, dtype=str), bad
