"""Simulated powder patterns: CIF -> labels + xrayutilities peak list -> pseudo-Voigt pattern.

Why not call ``xrayutilities.simpack.PowderDiffraction`` directly? It is the same physics, but it is
7-9x slower than pymatgen's calculator on low-symmetry cells and its CIF reader fails on ~10 % of COD
files (see ../shared/FINDINGS.md). cProfile on a 300-site monoclinic cell (4022310.cif, 2.4 s) shows
where the time goes: 62 % in ``Crystal.fromCIF`` identifying Wyckoff positions (one scipy BFGS
minimisation per atom, in ``testwp``), the rest in ``PowderDiffraction``: a recursive Python walk over
reflections with one call per reflection, one ``numpy.isclose`` per line to merge them, and one profile
object per line even when only the peak list is wanted. And the CIF was already parsed once, by
pymatgen, for the labels.

:func:`simulate_peaks` keeps xrayutilities' physics and drops that overhead:

* the structure is the one pymatgen parsed (partial occupancies included, ions mapped to
  xrayutilities' ion form factors where it has them, as its own CIF reader does);
* reflections are enumerated with numpy and reduced to one per symmetry orbit with the structure's
  point-group rotations (spglib, the ones the labels came from), so a cubic cell costs 1/48 of P1;
* the structure factors of *all* unique reflections are computed at once,
  ``F(h) = sum_j occ_j f_j(|q|) exp(-2 pi i h.x_j)``, with xrayutilities' atomic form factors
  ``Atom.f(q, en)`` (f0 + f' + i f'' at the X-ray energy), for ``h`` and ``-h`` from the same
  cosines and sines (anomalous dispersion breaks Friedel's law, so both are needed);
* intensities get xrayutilities' Lorentz-polarisation factor and the orbit multiplicity, and lines
  closer than 1e-3 degree are merged.

Debye-Waller factors are left out (as pymatgen's calculator does by default): many COD files give no or
unreliable displacement parameters, and the model should not learn which file had them.

:func:`run_simulate` is the batch stage: all CIFs of a folder in worker processes with a hard per-CIF
time limit (the parent kills and replaces a worker that overruns), a result cache that makes an
interrupted run resume where it stopped, and the ``patterns.npz`` + ``manifest.csv`` of
docs/dataflow.md, written atomically.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import sqlite3
import sys
import time
import warnings
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.config import LabelsParams, Params, SimulateParams
from xrdvision.crystal import bragg
from xrdvision.crystal.bragg import CU_KA1
from xrdvision.crystal.labels import (
    Labels,
    analyse_symmetry,
    declared_space_group,
    labels_from_analyzer,
    read_structure,
)
from xrdvision.crystal.profile import grid, profile_pattern
from xrdvision.errors import InputError, XrdVisionError
from xrdvision.formats.atomic import atomic_open

# Bump when the physics or the record layout changes: it is part of every cache key.
SIMULATE_VERSION = 1

MERGE_TOL_DEG = 1e-3  # lines closer than this (degrees 2-theta) are one peak
MIN_RELATIVE_INTENSITY = 1e-5  # weaker peaks are dropped (pymatgen's cut-off: 1e-3 on a 0-100 scale)
_PHASE_CHUNK = 1 << 21  # reflections x atoms per block of cos/sin (8 MB of float32)
DEFAULT_CACHE_DIR = Path("data/cache/simulate")
CACHE_FLUSH_EVERY = 25  # results per sqlite transaction
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
NO_REFLECTIONS = "no reflections in 2-theta range"


# --------------------------------------------------------------------------------------------------
# Peak list: the physics
# --------------------------------------------------------------------------------------------------


@dataclass
class Peaks:
    """A K-alpha1 peak list: positions (degrees 2-theta), intensities (max 1), d (A), one hkl per peak."""

    two_theta: np.ndarray
    intensity: np.ndarray
    d: np.ndarray
    hkl: np.ndarray  # (P, 3) int: the strongest reflection of each merged peak (in the CIF's cell)

    def __len__(self) -> int:
        return int(self.two_theta.size)


def _xu() -> Any:
    """xrayutilities, imported on first use (it opens its form-factor database at import)."""
    import xrayutilities

    return xrayutilities


def xu_atom(species: Any) -> Any:
    """The xrayutilities atom for a pymatgen species: the ion (``Fe3p``) when xrayutilities has its
    form factor, else the neutral element, as xrayutilities' own CIF reader does (but silently)."""
    elements = _xu().materials.elements
    symbol = getattr(species, "symbol", str(species))
    oxi = getattr(species, "oxi_state", None)
    if oxi and float(oxi).is_integer():
        name = f"{symbol}{abs(int(oxi))}{'p' if oxi > 0 else 'm'}"
        if hasattr(elements, name):
            return getattr(elements, name)
    if re.fullmatch(r"[A-Z][a-z]?", symbol) and hasattr(elements, symbol):
        return getattr(elements, symbol)
    raise ValueError(f"xrayutilities has no form factor for {species}")


def form_factor(atom: Any, q: np.ndarray, energy: float) -> np.ndarray:
    """``atom.f(q, en)`` (xrayutilities: f0(q) + f'(E) + i f''(E)) without letting its cache grow.

    xrayutilities keeps the last 1000 results per atom; with one array of thousands of q values per
    structure that would hold hundreds of MB in a long batch, so the q-dependent entries are dropped.
    """
    f = np.asarray(atom.f(q, energy), dtype=np.complex128)
    cache = getattr(atom, "_dbcache", None)
    if isinstance(cache, dict):
        cache["f0"] = []
        cache["f"] = []
    return f


def laue_rotations(
    rotations: np.ndarray | None, inv_t: np.ndarray | None = None, max_rel_error: float = 0.0
) -> np.ndarray:
    """The point-group rotations (plus their negatives, for Friedel pairs) that may merge reflections.

    spglib finds symmetry within tolerances (0.01 A, 5 degrees), so a monoclinic cell with beta = 92
    degrees can come back orthorhombic. Its "equivalent" reflections then sit at different angles and
    must not be merged: with ``inv_t`` (rows: reciprocal vectors), only rotations that keep every 1/d^2
    within a relative ``max_rel_error`` are kept, and unless they still form a group, only the identity
    and inversion are (Friedel's pairs always have the same 1/d).
    """
    eye = np.eye(3, dtype=np.int64)
    friedel = np.stack([eye, -eye])
    if rotations is None or len(rotations) == 0:
        return friedel
    rots = np.unique(np.concatenate([np.rint(rotations).astype(np.int64), friedel]), axis=0)
    rots = np.unique(np.concatenate([rots, -rots]), axis=0)
    if inv_t is not None:
        metric = inv_t @ inv_t.T  # 1/d^2 = h G h^T
        lam_min = float(np.linalg.eigvalsh(metric)[0])
        moved = np.einsum("aij,jk,alk->ail", rots, metric, rots) - metric
        rots = rots[np.linalg.norm(moved, 2, axis=(1, 2)) / lam_min <= max_rel_error]
        products = np.einsum("aij,bjk->abik", rots, rots).reshape(-1, 9)
        flat = rots.reshape(-1, 9)
        bound = int(np.abs(products).max())
        if bound > 60:  # an odd cell setting: integer keys would overflow, and no speed-up is worth it
            return friedel
        weights = (2 * bound + 1) ** np.arange(9, dtype=np.int64)
        if not np.isin((products + bound) @ weights, (flat + bound) @ weights).all():
            return friedel
    return rots


def _half_sphere_hkl(inv_t: np.ndarray, s_min: float, s_max: float) -> np.ndarray:
    """All hkl with s = 1/d in (s_min, s_max], one of each Friedel pair (first nonzero index > 0)."""
    lengths = np.linalg.norm(np.linalg.inv(inv_t).T, axis=1)  # |a|, |b|, |c|
    hmax, kmax, lmax = (int(np.floor(s_max * n)) for n in lengths)
    k, l_ = np.meshgrid(np.arange(-kmax, kmax + 1), np.arange(-lmax, lmax + 1), indexing="ij")
    k = k.ravel()
    l_ = l_.ravel()
    out = []
    for h in range(hmax + 1):
        hkl = np.stack([np.full_like(k, h), k, l_], axis=1)
        if h == 0:
            hkl = hkl[(k > 0) | ((k == 0) & (l_ > 0))]
        s = np.linalg.norm(hkl @ inv_t, axis=1)
        out.append(hkl[(s > s_min) & (s <= s_max)])
    return np.concatenate(out) if out else np.zeros((0, 3), dtype=np.int64)


def unique_reflections(hkl: np.ndarray, laue: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One representative per symmetry orbit of ``hkl`` and the orbit size (the multiplicity).

    A reflection h maps to h.R under each rotation R (rows are Miller indices); the representative is
    the image with the largest integer key, and the multiplicity is the number of distinct images.
    """
    if hkl.size == 0:
        return hkl.reshape(0, 3), np.zeros(0, dtype=np.int64)
    bound = 4 * int(np.abs(hkl).max()) + 1
    base = 2 * bound + 1

    def key(v: np.ndarray) -> np.ndarray:
        return ((v[..., 0] + bound) * base + (v[..., 1] + bound)) * base + (v[..., 2] + bound)

    best = np.full(len(hkl), -1, dtype=np.int64)
    for rot in laue:
        np.maximum(best, key(hkl @ rot), out=best)
    reps_key = np.unique(best)
    reps = np.stack(
        [reps_key // (base * base) - bound, (reps_key // base) % base - bound, reps_key % base - bound],
        axis=1,
    )
    images = np.sort(np.stack([key(reps @ rot) for rot in laue], axis=1), axis=1)
    mult = 1 + np.count_nonzero(np.diff(images, axis=1), axis=1)
    return reps, mult


def _site_table(structure: Any) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Fractional coordinates (N, 3), occupancy per site and atom type (N, S), the S xrayutilities atoms.

    Dummy sites (pymatgen ``DummySpecies``: the ring centroids "M" or unassigned "X" some CIFs list)
    are left out: they are not atoms, and guessing an element for them would invent scattering.
    """
    atoms: list[Any] = []
    index: dict[str, int] = {}
    rows: list[tuple[int, int, float]] = []
    for i, site in enumerate(structure):
        for species, occ in site.species.items():
            if type(species).__name__ == "DummySpecies":
                continue  # a CIF's dummy atom (ring centroid "M", unknown "X"): nothing to scatter
            atom = xu_atom(species)
            col = index.setdefault(atom.name, len(atoms))
            if col == len(atoms):
                atoms.append(atom)
            rows.append((i, col, float(occ)))
    weights = np.zeros((len(structure), len(atoms)), dtype=np.float32)
    for i, col, occ in rows:
        weights[i, col] += occ
    if not atoms:
        raise ValueError("no scattering atoms (only dummy sites)")
    return np.asarray(structure.frac_coords, dtype=np.float64), weights, atoms


def structure_factors(
    hkl: np.ndarray, frac: np.ndarray, weights: np.ndarray, f: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``|F(h)|^2`` and ``|F(-h)|^2`` for every row of ``hkl``.

    ``f`` (U, S) are the form factors of the S atom types at each reflection, ``weights`` (N, S) the
    occupancy of each type on each of the N sites. F(h) = sum_s f_s (C_s - i S_s) and
    F(-h) = sum_s f_s (C_s + i S_s) with C_s, S_s the occupancy-weighted sums of cos and sin of
    2 pi h.x: one cos and one sin per reflection and site, no complex exponentials. The phase is reduced
    modulo 1 in float64 before the float32 trigonometry, so float32 costs no accuracy that matters
    (phase error < 1e-6 rad).
    """
    n = len(hkl)
    f_plus = np.empty(n)
    f_minus = np.empty(n)
    rows = max(1, _PHASE_CHUNK // max(1, len(frac)))
    frac_t = frac.T.copy()
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        phase = hkl[sl].astype(np.float64) @ frac_t
        phase -= np.rint(phase)
        angle = phase.astype(np.float32)
        angle *= np.float32(2 * np.pi)
        c = np.cos(angle) @ weights  # (rows, S)
        s = np.sin(angle) @ weights
        fs = f[sl]
        fp = np.sum(fs * (c - 1j * s), axis=1)
        fm = np.sum(fs * (c + 1j * s), axis=1)
        f_plus[sl] = fp.real**2 + fp.imag**2
        f_minus[sl] = fm.real**2 + fm.imag**2
    return f_plus, f_minus


def lorentz_polarisation(theta: np.ndarray) -> np.ndarray:
    """xrayutilities' ``PowderDiffraction.correction_factor`` without its constant 1/V^2 (unpolarised
    beam, no monochromator): (1 + cos^2 2theta) / 2 / (sin^2 theta cos theta)."""
    return (1 + np.cos(2 * theta) ** 2) / 2 / (np.sin(theta) ** 2 * np.cos(theta))


def merge_lines(
    two_theta: np.ndarray, intensity: np.ndarray, hkl: np.ndarray, tol: float = MERGE_TOL_DEG
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge lines closer than ``tol`` degrees: summed intensity at the intensity-weighted position,
    labelled with the strongest line's hkl. Input in any order; output sorted by 2-theta."""
    if two_theta.size == 0:
        return two_theta, intensity, hkl
    order = np.argsort(two_theta, kind="stable")
    tt, inten, hk = two_theta[order], intensity[order], hkl[order]
    starts = np.flatnonzero(np.concatenate([[True], np.diff(tt) > tol]))
    total = np.add.reduceat(inten, starts)
    weighted = np.add.reduceat(inten * tt, starts)
    counts = np.diff(np.append(starts, tt.size))
    mean_tt = np.add.reduceat(tt, starts) / counts
    pos = np.where(total > 0, weighted / np.where(total > 0, total, 1), mean_tt)
    group = np.repeat(np.arange(starts.size), counts)
    # index of the strongest line in each group: sort by (group, intensity), take each group's last
    strongest = np.lexsort((inten, group))[np.cumsum(counts) - 1]
    return pos, total, hk[strongest]


def simulate_peaks(
    structure: Any,
    wavelength: float = CU_KA1,
    two_theta_min: float = 5.0,
    two_theta_max: float = 90.0,
    *,
    rotations: np.ndarray | None = None,
    symprec: float = 0.01,
) -> Peaks:
    """The powder peak list of a pymatgen structure with xrayutilities' form factors (see module doc).

    ``rotations`` are the structure's point-group rotations in its own fractional coordinates (spglib's
    dataset rotations); without them they are found with spglib at ``symprec`` (and with none found,
    only Friedel pairs are merged, which is slower but exact). Returns an empty :class:`Peaks` when
    nothing diffracts in range. Raises ``ValueError`` for an element xrayutilities has no data for.
    """
    if rotations is None:
        try:
            rotations = analyse_symmetry(structure, symprec).get_symmetry_dataset().rotations
        except ValueError:
            rotations = None
    lattice = np.asarray(structure.lattice.matrix, dtype=np.float64)  # rows a, b, c
    inv_t = np.linalg.inv(lattice).T  # rows: reciprocal vectors, s = |h @ inv_t| = 1/d
    s_min = 2 * math.sin(math.radians(two_theta_min) / 2) / wavelength
    s_max = 2 * math.sin(math.radians(min(two_theta_max, 180.0)) / 2) / wavelength
    # Rotations may merge lines only if they move none by more than a tenth of the merge tolerance.
    theta_max = math.radians(min(two_theta_max, 179.0)) / 2
    max_rel_error = 0.1 * 2 * math.radians(MERGE_TOL_DEG) / 2 / math.tan(theta_max)
    laue = laue_rotations(rotations, inv_t, max_rel_error)
    hkl, mult = unique_reflections(_half_sphere_hkl(inv_t, s_min, s_max), laue)
    if hkl.size == 0:
        return _empty_peaks()
    s = np.linalg.norm(hkl @ inv_t, axis=1)
    q = 2 * np.pi * s  # xrayutilities' momentum transfer 4 pi sin(theta) / lambda, 1/A
    energy = float(_xu().utilities.lam2en(wavelength))
    frac, weights, atoms = _site_table(structure)
    f = np.stack([form_factor(atom, q, energy) for atom in atoms], axis=1)
    f2_plus, f2_minus = structure_factors(hkl, frac, weights, f)
    theta = np.arcsin(np.clip(wavelength * s / 2, -1.0, 1.0))
    intensity = mult * (f2_plus + f2_minus) / 2 * lorentz_polarisation(theta)
    two_theta, intensity, hkl = merge_lines(np.degrees(2 * theta), intensity, hkl)
    keep = (two_theta >= two_theta_min) & (two_theta <= two_theta_max)
    two_theta, intensity, hkl = two_theta[keep], intensity[keep], hkl[keep]
    top = intensity.max() if intensity.size else 0.0
    if not top > 0:
        return _empty_peaks()
    intensity = intensity / top
    keep = intensity > MIN_RELATIVE_INTENSITY
    two_theta, intensity, hkl = two_theta[keep], intensity[keep], hkl[keep]
    d = bragg.d_spacing(two_theta, wavelength)
    return Peaks(two_theta=two_theta, intensity=intensity, d=d, hkl=hkl.astype(np.int32))


def _empty_peaks() -> Peaks:
    z = np.zeros(0)
    return Peaks(two_theta=z, intensity=z.copy(), d=z.copy(), hkl=np.zeros((0, 3), dtype=np.int32))


# --------------------------------------------------------------------------------------------------
# One file
# --------------------------------------------------------------------------------------------------


@dataclass
class Record:
    """Everything the simulate stage knows about one CIF (``pattern`` is None for a failure)."""

    cod_id: str
    file: str
    status: str  # "ok" or "failed"
    reason: str = ""
    labels: Labels | None = None
    n_atoms: int = 0
    peaks: Peaks | None = None
    pattern: np.ndarray | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_peaks(self) -> int:
        return len(self.peaks) if self.peaks is not None else 0

    def manifest_row(self) -> dict[str, Any]:
        lab = self.labels
        row: dict[str, Any] = dict.fromkeys(MANIFEST_COLUMNS, "")
        row.update(cod_id=self.cod_id, file=self.file, status=self.status, reason=self.reason)
        row.update(n_atoms=self.n_atoms or "", n_peaks=self.n_peaks if self.status == "ok" else "")
        if lab is not None:
            row.update(
                formula=lab.formula,
                reduced_formula=lab.reduced_formula,
                crystal_system=lab.crystal_system,
                space_group=lab.space_group,
                space_group_symbol=lab.space_group_symbol,
                declared_space_group="" if lab.declared_space_group is None else lab.declared_space_group,
                symmetry_mismatch=lab.symmetry_mismatch,
            )
        return row


def _peaks_record(path: str | Path, sim: SimulateParams, lab: LabelsParams) -> Record:
    """Labels + peak list of one CIF (no profile); a bad file raises :class:`InputError`."""
    path = Path(path)
    t0 = time.perf_counter()
    structure = read_structure(path)
    declared = declared_space_group(path)
    try:
        sga = analyse_symmetry(structure, lab.symprec, lab.angle_tolerance)
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
    labels = labels_from_analyzer(structure, sga, declared)
    try:
        peaks = simulate_peaks(
            structure,
            sim.wavelength,
            sim.two_theta_min,
            sim.two_theta_max,
            rotations=sga.get_symmetry_dataset().rotations,
        )
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
    if len(peaks) == 0:
        raise InputError(path, NO_REFLECTIONS)
    return Record(
        cod_id=path.stem,
        file=str(path),
        status="ok",
        labels=labels,
        n_atoms=len(structure),
        peaks=peaks,
        seconds=time.perf_counter() - t0,
    )


def profile_record(record: Record, sim: SimulateParams) -> np.ndarray:
    """The record's peak list on the stage's 2-theta grid (pseudo-Voigt, optional K-alpha2), max 1."""
    assert record.peaks is not None
    return profile_pattern(
        record.peaks.two_theta,
        record.peaks.intensity,
        grid(sim.two_theta_min, sim.two_theta_max, sim.step),
        sim.fwhm,
        sim.eta,
        kalpha2=sim.kalpha2,
        wavelength=sim.wavelength,
    )


def simulate_file(path: str | Path, sim: SimulateParams, lab: LabelsParams) -> Record:
    """Labels, peak list and profiled pattern of one CIF. Raises :class:`InputError` for a bad file
    (unreadable by pymatgen, no symmetry, an element without form factor, nothing in range)."""
    record = _peaks_record(path, sim, lab)
    record.pattern = profile_record(record, sim)
    return record


# --------------------------------------------------------------------------------------------------
# Batch: workers with a hard time limit, a resumable cache, the stage outputs
# --------------------------------------------------------------------------------------------------


def cache_key(cif_bytes: bytes, sim: SimulateParams, lab: LabelsParams) -> str:
    """Content hash of a CIF + the settings its peak list and labels depend on (not the profile:
    step, width and K-alpha2 are applied when the stage's outputs are assembled)."""
    settings = {
        "version": SIMULATE_VERSION,
        "wavelength": sim.wavelength,
        "two_theta_min": sim.two_theta_min,
        "two_theta_max": sim.two_theta_max,
        "symprec": lab.symprec,
        "angle_tolerance": lab.angle_tolerance,
    }
    digest = hashlib.sha256(cif_bytes)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


class ResultCache:
    """Finished per-CIF results in one sqlite file, written in transactions of a few dozen results.

    sqlite rather than one small file per CIF: a batch of 10^5 CIFs would otherwise leave 10^5 files,
    and a transaction is atomic, so a killed run loses at most the last unflushed chunk.
    """

    def __init__(self, cache_dir: str | Path, flush_every: int = CACHE_FLUSH_EVERY) -> None:
        self.path = Path(cache_dir) / "results.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60)
        self.db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, payload BLOB NOT NULL)")
        self.db.commit()
        self.flush_every = flush_every
        self.pending: list[tuple[str, bytes]] = []

    def get(self, key: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT payload FROM results WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            return pickle.loads(row[0])
        except Exception:  # a payload from an incompatible version: recompute it
            return None

    def put(self, key: str, payload: dict[str, Any]) -> None:
        self.pending.append((key, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)))
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?)", self.pending)
            self.pending.clear()

    def close(self) -> None:
        self.flush()
        self.db.close()


def _to_payload(record: Record) -> dict[str, Any]:
    """A record as plain data (what the cache stores and workers send back): no profiled pattern."""
    out: dict[str, Any] = {
        "status": record.status,
        "reason": record.reason,
        "labels": asdict(record.labels) if record.labels is not None else None,
        "n_atoms": record.n_atoms,
        "seconds": record.seconds,
        "extra": record.extra,
    }
    if record.peaks is not None:
        p = record.peaks
        out["peaks"] = {
            "two_theta": p.two_theta.astype(np.float64),
            "intensity": p.intensity.astype(np.float64),
            "d": p.d.astype(np.float64),
            "hkl": p.hkl.astype(np.int32),
        }
    return out


def _from_payload(payload: dict[str, Any], path: Path) -> Record:
    peaks = Peaks(**payload["peaks"]) if payload.get("peaks") is not None else None
    labels = Labels(**payload["labels"]) if payload.get("labels") is not None else None
    return Record(
        cod_id=path.stem,
        file=str(path),
        status=payload["status"],
        reason=payload["reason"],
        labels=labels,
        n_atoms=payload.get("n_atoms", 0),
        peaks=peaks,
        seconds=payload.get("seconds", 0.0),
        extra=dict(payload.get("extra") or {}),
    )


def _failure(path: Path, reason: str, seconds: float = 0.0, **extra: Any) -> Record:
    return Record(
        cod_id=path.stem, file=str(path), status="failed", reason=reason, seconds=seconds, extra=extra
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _silence_output() -> None:
    """Point the worker's stdout/stderr at /dev/null: xrayutilities, pymatgen and spglib print
    warnings (some from C), and the user's terminal belongs to the progress bar and the summary."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            os.dup2(devnull, fd)
    sys.stdout = io.TextIOWrapper(open(os.devnull, "wb"))  # noqa: SIM115 - lives as long as the worker
    sys.stderr = sys.stdout
    warnings.simplefilter("ignore")


def _reopen_form_factor_db() -> None:
    """Give this process its own handle on xrayutilities' HDF5 database (a forked worker inherits the
    parent's open file, and HDF5 handles are not meant to be shared across processes)."""
    db = _xu().materials.atom._db
    with contextlib.suppress(Exception):
        db.Close()
    db.matname = None
    db.Open()


def _worker_main(conn: Any, sim: SimulateParams, lab: LabelsParams, quiet: bool) -> None:
    """A worker: receive ``(index, path)``, send back ``(index, payload)``; ``None`` ends it."""
    if quiet:
        _silence_output()
    _reopen_form_factor_db()
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        index, path = task
        path = Path(path)
        t0 = time.perf_counter()
        try:
            record = _peaks_record(path, sim, lab)
        except XrdVisionError as exc:
            reason = exc.reason if isinstance(exc, InputError) else str(exc)
            record = _failure(path, reason, time.perf_counter() - t0)
        except MemoryError:
            record = _failure(path, "out of memory", time.perf_counter() - t0)
        except Exception as exc:  # a bug or an odd file: report it on one line, keep the batch going
            record = _failure(path, _one_line(exc), time.perf_counter() - t0)
        conn.send((index, _to_payload(record)))


def _mp_context() -> Any:
    """forkserver where there is one: workers fork from a clean server that has the heavy modules
    imported once (fast replacement after a timeout kill, no state from the parent's threads)."""
    try:
        ctx = multiprocessing.get_context("forkserver")
    except ValueError:
        return multiprocessing.get_context("spawn")
    ctx.set_forkserver_preload(
        ["xrayutilities", "pymatgen.io.cif", "pymatgen.symmetry.analyzer", "xrdvision.data.simulate"]
    )
    return ctx


class _Worker:
    """One worker process and its pipe; ``ready`` once it has started up (imports, database)."""

    def __init__(self, ctx: Any, sim: SimulateParams, lab: LabelsParams, quiet: bool) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, sim, lab, quiet), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.task: tuple[int, Path] | None = None
        self.started = 0.0

    def assign(self, index: int, path: Path) -> None:
        self.task = (index, path)
        self.started = time.monotonic()
        self.conn.send((index, str(path)))

    def stop(self, kill: bool = False) -> int | None:
        """End the process (politely unless ``kill``) and return its exit code."""
        if kill:
            self.proc.kill()
        else:
            with contextlib.suppress(OSError):
                self.conn.send(None)
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()
        return self.proc.exitcode


def run_pool(
    tasks: list[tuple[int, Path]],
    sim: SimulateParams,
    lab: LabelsParams,
    on_result: Any,
    *,
    workers: int,
    timeout_s: float,
    quiet: bool = True,
) -> None:
    """Run ``tasks`` in ``workers`` processes, calling ``on_result(index, Record)`` as each finishes.

    The time limit is enforced by the parent: a worker still busy ``timeout_s`` after it got a CIF is
    killed (whatever it is doing, C code included) and replaced, and the CIF is a "timeout" failure.
    The clock starts when a started-up worker receives the CIF, so start-up never counts against it.
    A worker that dies (segfault, out-of-memory kill) is replaced too and its CIF reported.
    """
    if not tasks:
        return
    ctx = _mp_context()
    queue = deque(tasks)
    pool = [_Worker(ctx, sim, lab, quiet) for _ in range(min(workers, len(tasks)))]
    startup_failures = 0

    def replace(i: int) -> int | None:
        code = pool[i].stop(kill=True)
        pool[i] = _Worker(ctx, sim, lab, quiet)
        return code

    try:
        while True:
            for w in pool:
                if w.ready and w.task is None and queue:
                    w.assign(*queue.popleft())
            waiting = [w for w in pool if not w.ready or w.task is not None]
            if not queue and not any(w.task is not None for w in pool):
                break
            busy = [w for w in pool if w.task is not None]
            wait_s = min((w.started + timeout_s for w in busy), default=time.monotonic() + 1.0)
            wait_s = min(max(0.0, wait_s - time.monotonic()), 1.0)
            ready = multiprocessing.connection.wait([w.conn for w in waiting], timeout=wait_s)
            for i, w in enumerate(pool):
                if w.conn in ready:
                    try:
                        message = w.conn.recv()
                    except (EOFError, OSError):
                        code = replace(i)
                        if w.task is None:
                            startup_failures += 1
                            if startup_failures > 3 * len(pool):
                                raise XrdVisionError(
                                    f"simulate: worker processes die on start-up (exit code {code})"
                                ) from None
                            continue
                        index, path = w.task
                        on_result(index, _failure(path, f"worker died (exit code {code})", crashed=True))
                        continue
                    if not w.ready:
                        w.ready = True
                        continue
                    assert w.task is not None
                    index, path = w.task
                    w.task = None
                    on_result(message[0], _from_payload(message[1], path))
                elif w.task is not None and time.monotonic() - w.started > timeout_s:
                    index, path = w.task
                    seconds = time.monotonic() - w.started
                    replace(i)
                    on_result(index, _failure(path, f"timeout after {timeout_s:g} s", seconds, timeout=True))
    finally:
        for w in pool:
            w.stop(kill=w.task is not None or not w.ready)


def reason_group(reason: str) -> str:
    """A failure reason without its particulars (numbers, quoted values, details in parentheses), to
    count failures by kind: ``"pymatgen: could not convert string to float: '?'"`` ->
    ``"pymatgen: could not convert string to float"``."""
    text = re.sub(r"\s*\(.*\)\s*$", "", reason)
    if text.startswith("timeout after"):
        return "timeout"
    text = re.sub(r":\s*'[^']*'$|:\s*\"[^\"]*\"$", "", text)
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return text.strip()


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the terminal: ``simulate: 850 ok, 2 failed (timeout: 1, ...) in 123 s``."""
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary["reasons"].items(), key=lambda kv: -kv[1]))
    failed = f"{summary['n_failed']} failed" + (f" ({reasons})" if reasons else "")
    cached = f", {summary['n_cached']} from cache" if summary.get("n_cached") else ""
    slowest = ", ".join(f"{c} {t:.1f} s" for c, t in summary.get("slowest", []))
    slow = f"; slowest: {slowest}" if slowest else ""
    return f"simulate: {summary['n_ok']} ok, {failed} in {summary['seconds']:.0f} s{cached}{slow}"


def run_simulate(
    params: Params,
    cif_dir: str | Path,
    out_dir: str | Path,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """The simulate stage: every ``*.cif`` of ``cif_dir`` -> ``out_dir/patterns.npz`` + ``manifest.csv``.

    Results already in the cache (same CIF bytes, same peak/label settings) are reused, so an
    interrupted run resumes where it stopped. A CIF that timed out is retried only with a longer
    ``timeout_s`` than the one it failed under. Returns ``{n_ok, n_failed, reasons, per_system,
    seconds, n_cached, n_computed, slowest}`` (see :func:`summary_line` for the one-line form).
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    sim, lab = params.simulate, params.labels
    cif_dir, out_dir = Path(cif_dir), Path(out_dir)
    if not cif_dir.is_dir():
        raise InputError(cif_dir, "CIF folder not found")
    paths = sorted(cif_dir.glob("*.cif"))
    if not paths:
        raise InputError(cif_dir, "no *.cif files")
    records: list[Record | None] = [None] * len(paths)
    keys = [cache_key(p.read_bytes(), sim, lab) for p in paths]
    cache = ResultCache(cache_dir)
    try:
        todo: list[tuple[int, Path]] = []
        for i, (path, key) in enumerate(zip(paths, keys, strict=True)):
            payload = cache.get(key)
            usable = payload is not None and not (
                payload.get("extra", {}).get("timeout") and payload["extra"]["timeout_s"] < sim.timeout_s
            )
            if usable:
                assert payload is not None
                records[i] = _from_payload(payload, path)
            else:
                todo.append((i, path))
        # Largest files first: the slow ones start early instead of leaving one worker busy at the end.
        todo.sort(key=lambda task: -task[1].stat().st_size)
        n_cached = len(paths) - len(todo)
        bar = tqdm(total=len(paths), initial=n_cached, desc="simulate", unit="cif", disable=not progress)

        def on_result(index: int, record: Record) -> None:
            records[index] = record
            if not record.extra.get("crashed"):
                if record.extra.get("timeout"):
                    record.extra["timeout_s"] = sim.timeout_s
                cache.put(keys[index], _to_payload(record))
            bar.update(1)

        try:
            run_pool(todo, sim, lab, on_result, workers=sim.workers, timeout_s=sim.timeout_s)
        finally:
            bar.close()
    finally:
        cache.close()
    done = [r for r in records if r is not None]
    computed = [r for i, _ in todo if (r := records[i]) is not None]
    _write_outputs(done, sim, out_dir)
    ok = [r for r in done if r.status == "ok"]
    failed = [r for r in done if r.status != "ok"]
    per_system = Counter(r.labels.crystal_system for r in ok if r.labels is not None)
    return {
        "n_ok": len(ok),
        "n_failed": len(failed),
        "reasons": dict(Counter(reason_group(r.reason) for r in failed)),
        "per_system": dict(sorted(per_system.items())),
        "seconds": round(time.perf_counter() - t0, 2),
        "n_cached": n_cached,
        "n_computed": len(todo),
        # Per-CIF times go to the log, not the manifest: a data output must hash the same on every run.
        # Only this run's CIFs: a cached record's time is that of the run that computed it.
        "slowest": [(r.cod_id, round(r.seconds, 2)) for r in sorted(computed, key=lambda r: -r.seconds)[:3]],
    }


def _write_outputs(records: list[Record], sim: SimulateParams, out_dir: Path) -> None:
    """``manifest.csv`` (every CIF) and ``patterns.npz`` (the ok ones, manifest order), atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    two_theta = grid(sim.two_theta_min, sim.two_theta_max, sim.step)
    ok = [r for r in records if r.status == "ok" and r.peaks is not None]
    intensity = np.zeros((len(ok), two_theta.size), dtype=np.float32)
    for i, r in enumerate(ok):
        intensity[i] = profile_record(r, sim)
    counts = np.array([r.n_peaks for r in ok], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def cat(name: str) -> np.ndarray:
        arrays = [getattr(r.peaks, name) for r in ok]
        return np.concatenate(arrays).astype(np.float32) if arrays else np.zeros(0, dtype=np.float32)

    ids = np.array([r.cod_id for r in ok], dtype=str)
    with atomic_open(out_dir / "patterns.npz", "wb") as fh:
        np.savez_compressed(
            fh,
            ids=ids,
            peak_offsets=offsets,
            peak_two_theta=cat("two_theta"),
            peak_intensity=cat("intensity"),
            peak_d=cat("d"),
            two_theta=two_theta,
            intensity=intensity,
            wavelength=np.float64(sim.wavelength),
        )
    with atomic_open(out_dir / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        for r in records:
            writer.writerow(r.manifest_row())
