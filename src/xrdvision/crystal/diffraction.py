"""Powder diffraction physics: a structure -> its K-alpha1 peak list (positions, intensities, d, hkl).

Pure functions, no pipeline I/O. Why not call ``xrayutilities.simpack.PowderDiffraction`` directly? It
is the same physics, but it is 7-9x slower than pymatgen's calculator on low-symmetry cells and its CIF
reader fails on ~10 % of COD files (see ../shared/FINDINGS.md). cProfile on a 300-site monoclinic cell
(4022310.cif, 2.4 s) shows where the time goes: 62 % in ``Crystal.fromCIF`` identifying Wyckoff
positions (one scipy BFGS minimisation per atom, in ``testwp``), the rest in ``PowderDiffraction``: a
recursive Python walk over reflections with one call per reflection, one ``numpy.isclose`` per line to
merge them, and one profile object per line even when only the peak list is wanted. And the CIF was
already parsed once, by pymatgen, for the labels.

:func:`simulate_peaks` keeps xrayutilities' physics and drops that overhead:

* the structure is the one pymatgen parsed (partial occupancies included, ions mapped to
  xrayutilities' ion form factors where it has them, as its own CIF reader does:
  :mod:`xrdvision.crystal.structure`);
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from xrdvision.crystal import bragg
from xrdvision.crystal.bragg import CU_KA1
from xrdvision.crystal.labels import analyse_symmetry
from xrdvision.crystal.structure import site_table, xu

MERGE_TOL_DEG = 1e-3  # lines closer than this (degrees 2-theta) are one peak
MIN_RELATIVE_INTENSITY = 1e-5  # weaker peaks are dropped (pymatgen's cut-off: 1e-3 on a 0-100 scale)
_PHASE_CHUNK = 1 << 21  # reflections x atoms per block of cos/sin (8 MB of float32)


@dataclass
class Peaks:
    """A K-alpha1 peak list: positions (degrees 2-theta), intensities (max 1), d (A), one hkl per peak."""

    two_theta: np.ndarray
    intensity: np.ndarray
    d: np.ndarray
    hkl: np.ndarray  # (P, 3) int: the strongest reflection of each merged peak (in the CIF's cell)

    def __len__(self) -> int:
        return int(self.two_theta.size)


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
    energy = float(xu().utilities.lam2en(wavelength))
    frac, weights, atoms = site_table(structure)
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
