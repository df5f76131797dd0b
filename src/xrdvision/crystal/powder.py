"""Powder peak lists for many structures at once, from plain arrays: the batch simulator.

Why a second simulator beside the per-CIF ``simulate_peaks``? That one starts from a pymatgen
structure, asks spglib for its symmetry and xrayutilities for form factors: right for 852 CIFs, about
30 ms a structure. The Materials Project set has 155 000 structures that arrive as arrays (cell,
species, fractional coordinates); at that scale the objects, not the physics, are the cost (pymatgen's
``XRDCalculator`` manages about 25 structures per CPU-second on them, xrayutilities 12). Here a
structure is a few numpy arrays, no xrayutilities or pymatgen object is touched, and the physics is
the same:

* reflections: every hkl with ``s = 1/d`` in the 2-theta range, enumerated in P1 with no symmetry
  analysis, one of each Friedel pair (first nonzero index > 0). Symmetry-equivalent reflections have
  the same d, so merging lines closer than 1e-3 degree sums them: the multiplicity comes for free,
  and a pseudo-symmetric cell keeps its split lines (they are more than 1e-3 degree apart);
* structure factors ``F(+-h) = sum_j occ_j f_j(s) exp(+-2 pi i h.x_j)`` with xrayutilities' form
  factors, anomalous terms included (:mod:`xrdvision.crystal.form_factors`). With ``f = A + iB`` and
  ``C + iS`` the occupancy-weighted sum of ``exp(2 pi i h.x)`` over the atoms of each species,
  ``|F(h)|^2 + |F(-h)|^2 = 2 (P^2 + Q^2 + U^2 + V^2)``, ``P = sum A C, Q = sum B S, U = sum B C,
  V = sum A S``: both Friedel mates from one complex sum (anomalous dispersion breaks Friedel's law);
* intensity: that, times xrayutilities' Lorentz-polarisation factor ``(1 + cos^2 2theta) / 2 /
  (sin^2 theta cos theta)``; lines closer than 1e-3 degree merged (intensity-weighted position), the
  range cut, scaled to a maximum of 1, lines under 1e-5 dropped. Cu K-alpha1 by default; K-alpha2
  companions (same d, half intensity, as ``crystal.profile``) on request. No Debye-Waller factor (as
  ``simulate``: most structures have no reliable displacement parameters).

Where the time goes, and what was done about it (profiled on 3200 random Materials Project
structures, 2-core machine): a cos and a sin per reflection and atom cost 15 ms for a 50-atom cell.
The exponential factorises, ``exp(2 pi i (hx + ky + lz)) = X^h Y^k Z^l``, so the sums over atoms are
a complex matrix product over the box of hkl (:func:`species_sums`): BLAS at tens of GFLOP/s instead
of transcendental functions, after reducing the cell (the box of a skewed cell is up to 50 times the
sphere of reflections). Form factors and Lorentz-polarisation are evaluated once per distinct d.
What is left is mostly a fixed cost of about a hundred numpy calls, 0.6 ms a structure (an 8-atom
cell), against 1.2 ms for the average Materials Project structure (32 atoms): spread evenly over
checking, enumerating, summing and merging, so grouping small structures would save at most a third.
BLAS runs on one thread: the matrices are small, and threads only fight over a busy machine (8x
slower measured); run processes instead.

Bad records do not stop a batch: each is checked first (:mod:`xrdvision.crystal.powder_input`:
unknown element, non-finite or zero-volume cell, NaN coordinates, bad occupancy, atoms closer than
0.5 A whose occupancies add up to more than 1) and reported in :attr:`PeakBatch.errors` as one line
naming the record.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xrdvision.crystal import bragg
from xrdvision.crystal.bragg import CU_KA1
from xrdvision.crystal.form_factors import FormFactorTable, f0, form_factor_table
from xrdvision.crystal.powder_input import MIN_DISTANCE_A, Prepared, prepare
from xrdvision.errors import InputError

MERGE_TOL_DEG = 1e-3  # lines closer than this (degrees 2-theta) are one peak, as in data/simulate.py
MIN_RELATIVE_INTENSITY = 1e-5  # weaker lines are dropped, as in data/simulate.py
NO_REFLECTIONS = "no reflections in 2-theta range"
_PAIR_CHUNK = 1 << 20  # (hk, atoms) elements per slab of the box: 8 MB of complex64


@dataclass(frozen=True)
class PowderSettings:
    """What a peak list depends on besides the structure (defaults: ``params.yaml``'s simulate)."""

    wavelength: float = CU_KA1
    two_theta_min: float = 5.0
    two_theta_max: float = 90.0
    kalpha2: bool = False  # add K-alpha2 companions (same d, half intensity)
    merge_tol: float = MERGE_TOL_DEG
    min_relative_intensity: float = MIN_RELATIVE_INTENSITY
    with_hkl: bool = False  # label each line with its strongest reflection (in the given cell)
    # Each line's unit plane normal (its strongest reflection's reciprocal vector in an orthonormal frame
    # of the structure): what a March-Dollase texture needs (angle to the preferred orientation).
    with_normals: bool = False
    # Atoms closer than this (A) whose occupancies add up to more than 1 make a record bad; 0: no
    # check. 1.8 % of COD CIFs as pymatgen reads them have such pairs (duplicated atoms, disorder
    # parts with full occupancy); the per-CIF simulator sums them as they are.
    min_distance: float = MIN_DISTANCE_A

    def __post_init__(self) -> None:
        if not self.wavelength > 0:
            raise ValueError(f"wavelength must be > 0 Angstrom, got {self.wavelength}")
        if not 0 <= self.two_theta_min < self.two_theta_max <= 180:
            raise ValueError("need 0 <= two_theta_min < two_theta_max <= 180 degrees")
        if not (self.merge_tol >= 0 and 0 <= self.min_relative_intensity < 1 and self.min_distance >= 0):
            raise ValueError("need merge_tol >= 0, 0 <= min_relative_intensity < 1 and min_distance >= 0")

    def s_range(self) -> tuple[float, float]:
        """``s = 1/d`` bounds (1/A) of the K-alpha1 reflections in the 2-theta range."""
        s_min = 2 * math.sin(math.radians(self.two_theta_min) / 2) / self.wavelength
        s_max = 2 * math.sin(math.radians(self.two_theta_max) / 2) / self.wavelength
        return s_min, s_max


@dataclass
class PowderPeaks:
    """One peak list: 2-theta (degrees, ascending), relative intensity (max 1), d (A), hkl or None,
    unit plane normals (N, 3) or None."""

    two_theta: np.ndarray
    intensity: np.ndarray
    d: np.ndarray
    hkl: np.ndarray | None = None
    normal: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.two_theta.size)


@dataclass
class PeakBatch:
    """Peak lists of a batch, concatenated: lines of record ``i`` are ``offsets[i]:offsets[i + 1]``.

    A record in ``errors`` (index -> ``"<id>: <reason>"``) has no lines.
    """

    ids: list[str]
    offsets: np.ndarray
    two_theta: np.ndarray
    intensity: np.ndarray
    d: np.ndarray
    hkl: np.ndarray | None = None
    errors: dict[int, str] = field(default_factory=dict)
    normal: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def peaks(self, i: int) -> PowderPeaks:
        sl = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        hkl = self.hkl[sl] if self.hkl is not None else None
        normal = self.normal[sl] if self.normal is not None else None
        return PowderPeaks(self.two_theta[sl], self.intensity[sl], self.d[sl], hkl, normal)


@dataclass(frozen=True)
class Reflections:
    """The reflections of one cell in the range, one of each Friedel pair (first nonzero index > 0):
    ``mask`` over the box ``0 <= h <= H, |k| <= K, |l| <= L`` (``H = floor(s_max a)``...), their
    ``hkl`` (R, 3) and ``s = 1/d`` (R,)."""

    bounds: tuple[int, int, int]
    mask: np.ndarray
    hkl: np.ndarray
    s: np.ndarray


def reflections(g: np.ndarray, g_star: np.ndarray, s_min: float, s_max: float) -> Reflections:
    """Every hkl with ``s_min < s <= s_max`` (``s^2 = h G* h``; G, G*: the metric and its inverse),
    scored over the box in one broadcast expression; the half-space rule drops h = 0 with k < 0, and
    h = k = 0 with l <= 0."""
    lengths = np.sqrt(np.diag(g))
    hmax, kmax, lmax = (int(x) for x in np.floor(s_max * lengths + 1e-9))
    h = np.arange(hmax + 1, dtype=np.float64)[:, None, None]
    k = np.arange(-kmax, kmax + 1, dtype=np.float64)[None, :, None]
    l_ = np.arange(-lmax, lmax + 1, dtype=np.float64)[None, None, :]
    g = g_star
    s2 = (g[0, 0] * h + 2 * g[0, 1] * k + 2 * g[0, 2] * l_) * h + (g[1, 1] * k + 2 * g[1, 2] * l_) * k
    s2 = s2 + g[2, 2] * l_ * l_
    mask = (s2 > s_min * s_min) & (s2 <= s_max * s_max)
    mask[0, :kmax, :] = False
    mask[0, kmax, : lmax + 1] = False
    idx = np.nonzero(mask)
    hkl = np.stack([idx[0], idx[1] - kmax, idx[2] - lmax], axis=1)
    return Reflections((hmax, kmax, lmax), mask, hkl, np.sqrt(s2[idx]))


def _waves(x: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """``exp(2 pi i n x)`` (N, len(orders)) as complex64, the phase reduced modulo 1 in float64."""
    phase = np.multiply.outer(x, orders)
    phase -= np.rint(phase)
    phase *= 2 * np.pi
    out = np.empty(phase.shape, dtype=np.complex64)
    out.real = np.cos(phase)
    out.imag = np.sin(phase)
    return out


def species_sums(prep: Prepared, refl: Reflections) -> np.ndarray:
    """``G_s(h) = sum_{j in s} occ_j exp(2 pi i h.x_j)`` (S, R) for every species and reflection.

    The exponential factorises, ``exp(2 pi i (hx + ky + lz)) = X^h Y^k Z^l``, so over the box the
    sum is a matrix product: ``(X^h Y^k)`` as an (hk, atoms) matrix times ``occ Z^l`` (atoms, l).
    That is one complex multiply-add per box cell and atom in BLAS instead of a cos and a sin per
    reflection and atom: the cost of large cells drops by an order of magnitude. Single precision
    (relative error ~1e-6 on a line above 1 % of the strongest) doubles the BLAS rate; slabs of h keep
    the (hk, atoms) matrix under a few MB.
    """
    hmax, kmax, lmax = refl.bounds
    x, y, z = prep.frac.T
    wx = _waves(x, np.arange(hmax + 1))
    wy = _waves(y, np.arange(-kmax, kmax + 1))
    wz = _waves(z, np.arange(-lmax, lmax + 1)) * prep.occ.astype(np.float32)[:, None]
    nk, nl = 2 * kmax + 1, 2 * lmax + 1
    n_species = len(prep.rows)
    out = np.empty((n_species, len(refl.s)), dtype=np.complex64)
    step = max(1, _PAIR_CHUNK // (len(x) * nk))
    done = 0
    for h0 in range(0, hmax + 1, step):
        h1 = min(h0 + step, hmax + 1)
        sub = refl.mask[h0:h1]
        n_here = int(np.count_nonzero(sub))
        if n_here == 0:
            continue
        xy = (wx[:, h0:h1, None] * wy[:, None, :]).reshape(len(x), -1)
        for s, (a, b) in enumerate(zip(prep.starts[:-1], prep.starts[1:], strict=True)):
            box = xy[a:b].T @ wz[a:b]  # (hk, l)
            out[s, done : done + n_here] = box.reshape(h1 - h0, nk, nl)[sub]
        done += n_here
    return out


def lorentz_polarisation(theta: np.ndarray) -> np.ndarray:
    """xrayutilities' ``PowderDiffraction.correction_factor`` without its constant 1/V^2, the same
    formula as ``data.simulate.lorentz_polarisation``: (1 + cos^2 2theta) / 2 / (sin^2 theta cos theta)."""
    return (1 + np.cos(2 * theta) ** 2) / 2 / (np.sin(theta) ** 2 * np.cos(theta))


def line_strengths(sums: np.ndarray, f_real: np.ndarray, f_imag: np.ndarray) -> np.ndarray:
    """``|F(h)|^2 + |F(-h)|^2`` (R,) from the species sums ``C + iS`` (S, R) and the form factors
    ``A + iB`` (A: (R, S), B: (S,)): ``2 (P^2 + Q^2 + U^2 + V^2)`` (see the module doc)."""
    cos = sums.real.T.astype(np.float64)
    sin = sums.imag.T.astype(np.float64)
    p = np.einsum("rs,rs->r", f_real, cos)
    v = np.einsum("rs,rs->r", f_real, sin)
    q = sin @ f_imag
    u = cos @ f_imag
    return 2 * (p * p + q * q + u * u + v * v)


def merge_sorted(
    two_theta: np.ndarray, intensity: np.ndarray, hkl: np.ndarray | None, tol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Lines (sorted by 2-theta) closer than ``tol`` degrees as one: summed intensity at the
    intensity-weighted position, labelled with the strongest line's hkl or other per-line rows
    (``data.simulate.merge_lines`` on sorted input)."""
    starts = np.flatnonzero(np.concatenate([[True], np.diff(two_theta) > tol]))
    total = np.add.reduceat(intensity, starts)
    weighted = np.add.reduceat(intensity * two_theta, starts)
    counts = np.diff(np.append(starts, two_theta.size))
    mean_tt = np.add.reduceat(two_theta, starts) / counts
    pos = np.where(total > 0, weighted / np.where(total > 0, total, 1.0), mean_tt)
    if hkl is None:
        return pos, total, None
    group = np.repeat(np.arange(starts.size), counts)
    strongest = np.lexsort((intensity, group))[np.cumsum(counts) - 1]
    return pos, total, hkl[strongest]


def peaks_of(prep: Prepared, settings: PowderSettings, table: FormFactorTable) -> PowderPeaks:
    """The peak list of one checked structure; raises ``ValueError`` if nothing is in range.

    Reflections are sorted by s first: the merge then needs no sort, and symmetry-equivalent
    reflections (equal s) are adjacent, so the form factors and the Lorentz-polarisation factor are
    evaluated once per distinct s (a cubic cell in P1 has 24 reflections per distinct s).
    """
    s_min, s_max = settings.s_range()
    refl = reflections(prep.g, prep.g_star, s_min, s_max)
    if refl.s.size == 0:
        raise ValueError(NO_REFLECTIONS)
    order = np.argsort(refl.s, kind="stable")
    s = refl.s[order]
    new = np.concatenate([[True], np.diff(s) > 1e-10 * s[1:]])
    s_u = s[new]
    which = np.cumsum(new) - 1
    f_real = (f0(table, prep.rows, s_u) + table.f1[prep.rows])[which]
    strength = line_strengths(species_sums(prep, refl)[:, order], f_real, table.f2[prep.rows])
    theta_u = np.arcsin(np.minimum(settings.wavelength * s_u / 2, 1.0))
    intensity = strength * lorentz_polarisation(theta_u)[which]
    two_theta = np.degrees(2 * theta_u)[which]
    hkl = refl.hkl[order] @ prep.hkl_to_cell if settings.with_hkl else None
    normal = plane_normals(refl.hkl[order], prep.g_star) if settings.with_normals else None
    labels = _stack(hkl, normal)
    two_theta, intensity, labels = merge_sorted(two_theta, intensity, labels, settings.merge_tol)
    hkl, normal = _unstack(labels, hkl is not None, normal is not None)
    keep = (two_theta >= settings.two_theta_min) & (two_theta <= settings.two_theta_max)
    top = intensity[keep].max() if keep.any() else 0.0
    if not top > 0:
        raise ValueError(NO_REFLECTIONS)
    intensity = intensity / top
    keep &= intensity > settings.min_relative_intensity
    two_theta, intensity = two_theta[keep], intensity[keep]
    hkl = np.rint(hkl[keep]).astype(np.int32) if hkl is not None else None
    normal = normal[keep].astype(np.float32) if normal is not None else None
    d = bragg.d_spacing(two_theta, settings.wavelength)
    if settings.kalpha2:  # same d, half intensity: profile.kalpha2_peaks' rule, parents kept
        tt2 = bragg.two_theta(d, bragg.CU_KA2)
        parent = np.flatnonzero(tt2 <= settings.two_theta_max)  # NaN (no K-alpha2 line) drops out
        both = np.argsort(np.concatenate([two_theta, tt2[parent]]), kind="stable")
        two_theta = np.concatenate([two_theta, tt2[parent]])[both]
        intensity = np.concatenate([intensity, 0.5 * intensity[parent]])[both]
        d = np.concatenate([d, d[parent]])[both]
        if hkl is not None:
            hkl = np.concatenate([hkl, hkl[parent]])[both]
        if normal is not None:
            normal = np.concatenate([normal, normal[parent]])[both]
    return PowderPeaks(two_theta, intensity, d, hkl, normal)


def plane_normals(hkl: np.ndarray, g_star: np.ndarray) -> np.ndarray:
    """Unit normals (R, 3) of the planes ``hkl`` (R, 3) in an orthonormal frame of the cell whose
    reciprocal metric is ``g_star``: with ``G* = L L^T`` (Cholesky), ``h G* h' = (h L) . (h' L)``, so
    the angle between two normals is the angle between the planes' reciprocal vectors."""
    vec = np.asarray(hkl, dtype=np.float64) @ np.linalg.cholesky(g_star)
    return vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)


def _stack(hkl: np.ndarray | None, normal: np.ndarray | None) -> np.ndarray | None:
    """Per-line labels that the merge carries along (one array, so one pass picks the strongest)."""
    parts = [a.astype(np.float64) for a in (hkl, normal) if a is not None]
    return np.hstack(parts) if parts else None


def _unstack(labels: np.ndarray | None, has_hkl: bool, has_normal: bool) -> tuple[Any, Any]:
    if labels is None:
        return None, None
    hkl = labels[:, :3] if has_hkl else None
    normal = labels[:, -3:] if has_normal else None
    return hkl, normal


def powder_peaks(
    cell: Sequence[float] | np.ndarray,
    species: Sequence[str | int],
    frac: Sequence[Sequence[float]] | np.ndarray,
    occupancy: Sequence[float] | np.ndarray | None = None,
    settings: PowderSettings | None = None,
    *,
    name: str = "structure",
) -> PowderPeaks:
    """The peak list of one structure; raises :class:`InputError` (``"<name>: <reason>"``) if bad.

    ``cell`` is ``(a, b, c, alpha, beta, gamma)`` (A, degrees) or a 3x3 lattice matrix (rows a, b,
    c); ``species`` element or ion names (``"Fe"``, ``"Fe3+"``) or atomic numbers; ``frac`` (N, 3).
    """
    settings = settings or PowderSettings()
    table = form_factor_table(settings.wavelength)
    try:
        prep = prepare(cell, species, frac, occupancy, table, settings.min_distance)
        return peaks_of(prep, settings, table)
    except ValueError as exc:
        raise InputError(name, str(exc)) from None


def simulate_batch(
    records: Iterable[Mapping[str, Any]], settings: PowderSettings | None = None, *, source: str = ""
) -> PeakBatch:
    """Peak lists of many structures: ``records`` are mappings with ``cell``, ``species``, ``frac``
    and optional ``id`` and ``occupancy`` (a Materials Project shard line as it is). A bad record
    gets one line in :attr:`PeakBatch.errors`, ``"<source>:<id>: <reason>"``, and no peaks; the
    batch goes on. ``source`` (e.g. the shard's file name) is only used in those lines."""
    settings = settings or PowderSettings()
    table = form_factor_table(settings.wavelength)
    with _one_blas_thread():
        return _batch(records, settings, table, source)


def _one_blas_thread() -> Any:
    """BLAS limited to one thread: each structure's matrices are small, so threads only add
    synchronisation (8x slower measured on a busy 2-core machine); scale out with processes."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _batch(
    records: Iterable[Mapping[str, Any]], settings: PowderSettings, table: FormFactorTable, source: str
) -> PeakBatch:
    ids: list[str] = []
    parts: list[PowderPeaks] = []
    errors: dict[int, str] = {}
    for i, rec in enumerate(records):
        name = str(rec.get("id", f"record {i}")) if isinstance(rec, Mapping) else f"record {i}"
        ids.append(name)
        try:
            if not isinstance(rec, Mapping):
                raise TypeError(f"a record must be a mapping, got {type(rec).__name__}")
            missing = [k for k in ("cell", "species", "frac") if k not in rec]
            if missing:
                raise ValueError(f"missing field(s) {', '.join(missing)}")
            occupancy = rec.get("occupancy")
            prep = prepare(rec["cell"], rec["species"], rec["frac"], occupancy, table, settings.min_distance)
            parts.append(peaks_of(prep, settings, table))
        except (ValueError, TypeError, IndexError, MemoryError) as exc:
            reason = str(exc) or type(exc).__name__
            errors[i] = str(InputError(f"{source}:{name}" if source else name, reason))
            parts.append(_EMPTY)
    counts = np.array([len(p) for p in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])

    def cat(attr: str) -> np.ndarray:
        arrays = [getattr(p, attr) for p in parts]
        return np.concatenate(arrays) if arrays else np.zeros(0)

    hkl = normal = None
    if settings.with_hkl:
        hkl = np.concatenate([p.hkl if p.hkl is not None else np.zeros((0, 3), np.int32) for p in parts])
    if settings.with_normals:
        normal = np.concatenate(
            [p.normal if p.normal is not None else np.zeros((0, 3), np.float32) for p in parts]
        )
    return PeakBatch(ids, offsets, cat("two_theta"), cat("intensity"), cat("d"), hkl, errors, normal)


_EMPTY = PowderPeaks(
    np.zeros(0), np.zeros(0), np.zeros(0), np.zeros((0, 3), dtype=np.int32), np.zeros((0, 3), np.float32)
)
