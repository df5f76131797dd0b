"""The simulate stage's outputs as files: ``patterns.npz`` (peak lists and profiles) and ``manifest.csv``.

One home for both sides of the format (docs/dataflow.md): the simulate stage writes
through :func:`write_patterns` and :func:`write_manifest`, render, the studies and the tests read
through :func:`load_patterns`, and the writer and the reader run the same consistency checks, so a
file that one of them accepts is one the other accepts too. A bad file on reading is one
:class:`~xrdvision.errors.InputError` naming the file and what is wrong with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.errors import InputError
from xrdvision.formats.atomic import atomic_open
from xrdvision.formats.tables import write_table

# manifest.csv: one row per input CIF, successes and failures alike.
MANIFEST_COLUMNS = (
    "cod_id",
    "file",
    "formula",
    "reduced_formula",
    "crystal_system",
    "space_group",
    "space_group_symbol",
    "declared_space_group",
    "symmetry_mismatch",
    "n_atoms",
    "n_peaks",
    "status",
    "reason",
)

# patterns.npz: these arrays, plus the scalar ``wavelength``.
_KEYS = ("ids", "peak_offsets", "peak_two_theta", "peak_intensity", "peak_d", "two_theta", "intensity")


@dataclass(frozen=True)
class Patterns:
    """The contents of ``patterns.npz`` (see docs/dataflow.md)."""

    ids: list[str]
    peak_offsets: np.ndarray
    peak_two_theta: np.ndarray
    peak_intensity: np.ndarray
    peak_d: np.ndarray
    two_theta: np.ndarray
    intensity: np.ndarray
    wavelength: float

    def peaks(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Peak list ``(two_theta, intensity, d)`` of structure ``i``."""
        a, b = int(self.peak_offsets[i]), int(self.peak_offsets[i + 1])
        return self.peak_two_theta[a:b], self.peak_intensity[a:b], self.peak_d[a:b]

    @classmethod
    def from_peak_lists(
        cls,
        ids: Sequence[str],
        peak_lists: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
        two_theta: np.ndarray,
        intensity: np.ndarray,
        wavelength: float,
    ) -> Patterns:
        """Patterns from one ``(two_theta, intensity, d)`` peak list per structure, in ``ids`` order."""
        counts = np.array([len(p[0]) for p in peak_lists], dtype=np.int64)

        def cat(k: int) -> np.ndarray:
            arrays = [p[k] for p in peak_lists]
            return np.concatenate(arrays) if arrays else np.zeros(0)

        return cls(
            ids=list(ids),
            peak_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            peak_two_theta=cat(0),
            peak_intensity=cat(1),
            peak_d=cat(2),
            two_theta=two_theta,
            intensity=intensity,
            wavelength=float(wavelength),
        )


def _problem(n: int, arrays: Mapping[str, np.ndarray]) -> str:
    """What is inconsistent between the arrays of ``n`` structures ("" if nothing)."""
    p = arrays["peak_two_theta"].shape[0]
    offsets = np.asarray(arrays["peak_offsets"])
    if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != p or np.any(np.diff(offsets) < 0):
        return f"peak_offsets must be {n + 1} increasing values from 0 to {p}"
    if arrays["peak_intensity"].shape != (p,) or arrays["peak_d"].shape != (p,):
        return "peak_two_theta, peak_intensity and peak_d differ in length"
    m = arrays["two_theta"].shape[0]
    if arrays["intensity"].shape != (n, m):
        return f"intensity is {arrays['intensity'].shape}, expected ({n}, {m})"
    return ""


def load_patterns(path: str | Path) -> Patterns:
    """Read and check ``patterns.npz``; any inconsistency is an :class:`InputError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "patterns file not found (run the simulate stage first)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in (*_KEYS, "wavelength") if k not in z.files]
            if missing:
                raise InputError(path, f"missing arrays: {', '.join(missing)}")
            arrays = {k: z[k] for k in _KEYS}
            wavelength = float(z["wavelength"])
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a readable .npz file ({exc})") from None
    ids = [str(i) for i in arrays["ids"].tolist()]
    problem = _problem(len(ids), arrays)
    if problem:
        raise InputError(path, problem)
    return Patterns(
        ids=ids,
        peak_offsets=arrays["peak_offsets"].astype(np.int64),
        peak_two_theta=arrays["peak_two_theta"].astype(np.float64),
        peak_intensity=arrays["peak_intensity"].astype(np.float64),
        peak_d=arrays["peak_d"].astype(np.float64),
        two_theta=arrays["two_theta"],
        intensity=arrays["intensity"],
        wavelength=wavelength,
    )


def write_patterns(path: str | Path, patterns: Patterns) -> None:
    """Write ``patterns`` as ``patterns.npz`` (compressed; float32 arrays, int64 offsets), atomically.

    Inconsistent arrays are a bug in the caller, not bad input: ``ValueError``.
    """
    arrays = {
        "ids": np.array(patterns.ids, dtype=str),
        "peak_offsets": np.asarray(patterns.peak_offsets).astype(np.int64),
        "peak_two_theta": np.asarray(patterns.peak_two_theta).astype(np.float32),
        "peak_intensity": np.asarray(patterns.peak_intensity).astype(np.float32),
        "peak_d": np.asarray(patterns.peak_d).astype(np.float32),
        "two_theta": np.asarray(patterns.two_theta, dtype=np.float32),
        "intensity": np.asarray(patterns.intensity, dtype=np.float32),
    }
    problem = _problem(len(patterns.ids), arrays)
    if problem:
        raise ValueError(f"{path}: {problem}")
    with atomic_open(Path(path), "wb") as fh:
        np.savez_compressed(fh, **arrays, wavelength=np.float64(patterns.wavelength))


def write_manifest(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write ``manifest.csv`` (rows by column name, a missing column empty), atomically."""
    write_table(path, MANIFEST_COLUMNS, rows)
