"""A structure given as plain arrays, checked and turned into what the batch simulator computes with.

Why a check of its own? The batch simulator (:mod:`xrdvision.crystal.powder`) takes structures as
arrays straight from a data file, with no pymatgen object that would have refused a broken one. A
record with an unknown element, a NaN coordinate, a flat cell or two atoms on top of each other would
otherwise give a pattern of NaNs or nonsense that nobody notices among 10^5; here each raises one
``ValueError`` that says what is wrong and with which atom, and the batch reports it and goes on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xrdvision.crystal.form_factors import FormFactorTable

MIN_DISTANCE_A = 0.5  # atoms closer than this are "overlapping" (pymatgen's proximity check)...
MAX_OCCUPANCY_SUM = 1.001  # ...unless they share the site: occupancies that add up to at most 1
_DIST_CHUNK = 1 << 20  # atom pairs per block of the overlap check


@dataclass(frozen=True)
class Prepared:
    """A checked structure in a reduced cell (see :func:`reduce_cell`): its metric ``g`` and
    reciprocal metric ``g_star`` (s^2 = h G* h); fractional coordinates (N, 3) and occupancies (N,)
    of the atoms, sorted by species; the S species' rows in the form-factor table, species ``s``
    being atoms ``starts[s]:starts[s + 1]``; ``hkl_to_cell`` (3, 3) int turns reduced-cell Miller
    indices (rows) into those of the cell given."""

    g: np.ndarray
    g_star: np.ndarray
    frac: np.ndarray
    occ: np.ndarray
    rows: np.ndarray
    starts: np.ndarray
    hkl_to_cell: np.ndarray


def metric(cell: Sequence[float] | np.ndarray) -> np.ndarray:
    """Real-space metric tensor G (3, 3) of ``(a, b, c, alpha, beta, gamma)`` or of a lattice matrix
    (rows a, b, c); ``ValueError`` for a cell that is not finite or has (almost) no volume."""
    arr = np.asarray(cell, dtype=np.float64)
    if arr.shape == (3, 3):
        g = arr @ arr.T
    elif arr.shape == (6,):
        if not np.isfinite(arr).all():
            raise ValueError(f"cell has non-finite parameters {arr.tolist()}")
        a, b, c = arr[:3]
        if min(a, b, c) <= 0 or not all(0 < x < 180 for x in arr[3:]):
            raise ValueError(f"impossible cell {arr.tolist()} (lengths > 0, angles in (0, 180) needed)")
        ca, cb, cg = np.cos(np.radians(arr[3:]))
        g = np.array(
            [
                [a * a, a * b * cg, a * c * cb],
                [a * b * cg, b * b, b * c * ca],
                [a * c * cb, b * c * ca, c * c],
            ]
        )
    else:
        raise ValueError(f"cell must be 6 parameters or a 3x3 matrix, got shape {arr.shape}")
    if not np.isfinite(g).all():
        raise ValueError("cell is not finite")
    lengths = np.sqrt(np.diag(g))
    volume2 = _det_sym3(g)
    if not volume2 > (1e-3 * float(np.prod(lengths))) ** 2:
        volume = np.sqrt(max(volume2, 0.0))
        raise ValueError(
            f"zero-volume cell (V = {volume:.3g} A^3 for a, b, c = {np.round(lengths, 4).tolist()})"
        )
    return g


# 3x3 symmetric algebra in plain floats: numpy.linalg spends ~20 us per call on a 3x3 in checks and
# dispatch, several times per structure, more than the arithmetic of a small structure's peak list.
def _det_sym3(g: np.ndarray) -> float:
    (a, b, c), (_, d, e), (_, _, f) = g.tolist()
    return a * (d * f - e * e) - b * (b * f - c * e) + c * (b * e - c * d)


def inverse_sym3(g: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive-definite 3x3 matrix (its adjugate over its determinant)."""
    (a, b, c), (_, d, e), (_, _, f) = g.tolist()
    adj = [
        [d * f - e * e, c * e - b * f, b * e - c * d],
        [0.0, a * f - c * c, b * c - a * e],
        [0.0, 0.0, a * d - b * b],
    ]
    adj[1][0], adj[2][0], adj[2][1] = adj[0][1], adj[0][2], adj[1][2]
    det = a * adj[0][0] + b * adj[0][1] + c * adj[0][2]
    return np.array(adj) / det


def cholesky_sym3(g: np.ndarray) -> np.ndarray:
    """Lower-triangular L with L L^T = G: rows a, b, c of the cell in a Cartesian frame."""
    (a, b, c), (_, d, e), (_, _, f) = g.tolist()
    l00 = math.sqrt(a)
    l10, l20 = b / l00, c / l00
    l11 = math.sqrt(d - l10 * l10)
    l21 = (e - l20 * l10) / l11
    return np.array([[l00, 0.0, 0.0], [l10, l11, 0.0], [l20, l21, math.sqrt(f - l20 * l20 - l21 * l21)]])


def reduce_cell(g: np.ndarray) -> np.ndarray:
    """An integer matrix M (det +-1) such that the basis ``M @ (a, b, c)`` is pairwise reduced:
    ``|2 a_i . a_j| <= |a_j|^2``. A powder pattern does not depend on the basis, but the box of hkl the
    simulator scores does: for a skewed cell (a quarter of the Materials Project cells as stored) it
    can be 50 times the sphere of reflections; for a reduced one it is about twice. Greedy Gauss
    steps in plain floats (a 3x3 problem: numpy calls would cost more than the work).
    """
    m = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    diag = np.diag(g)
    if (2 * np.abs(g - np.diag(diag)) <= np.minimum.outer(diag, diag) * (1 + 1e-6)).all():
        return np.array(m, dtype=np.int64)  # already reduced (most cells)
    v = cholesky_sym3(g).tolist()  # the basis vectors in a Cartesian frame: dot products of 3 terms

    def dot(p: list[float], q: list[float]) -> float:
        return p[0] * q[0] + p[1] * q[1] + p[2] * q[2]

    for _ in range(100):
        changed = False
        for i in range(3):
            for j in range(3):
                if i == j:
                    continue
                r = round(dot(v[i], v[j]) / dot(v[j], v[j]))
                if r:
                    v[i] = [v[i][k] - r * v[j][k] for k in range(3)]
                    m[i] = [m[i][k] - r * m[j][k] for k in range(3)]
                    changed = True
        if not changed:
            break
    return np.array(m, dtype=np.int64)


def inverse_int(m: np.ndarray) -> np.ndarray:
    """The inverse of an integer matrix with determinant +-1 (exact: its adjugate)."""
    return np.rint(np.linalg.inv(m)).astype(np.int64)


def check_overlaps(
    frac: np.ndarray,
    occ: np.ndarray,
    g: np.ndarray,
    g_star: np.ndarray,
    names: Sequence[object],
    min_distance: float = MIN_DISTANCE_A,
) -> None:
    """``ValueError`` naming the first pair of atoms closer than ``min_distance`` (A) whose
    occupancies add up to more than 1 (two halves of a disordered site may share a position).

    The nearest image of a pair is the one with the fractional difference wrapped to [-0.5, 0.5]
    whenever every cell height is above twice the distance limit; else all 27 neighbours are tried.
    """
    n = len(frac)
    if n < 2 or min_distance <= 0:
        return
    basis = cholesky_sym3(g)
    heights = 1 / np.sqrt(np.diag(g_star))
    shifts = np.zeros((1, 3))
    if heights.min() < 2 * min_distance:
        grid = np.arange(-1, 2, dtype=np.float64)
        shifts = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), axis=-1).reshape(-1, 3)
    x, y, z = frac.T.astype(np.float32)
    rows = max(1, _DIST_CHUNK // n)
    later = np.arange(n)[None, :]
    for start in range(0, n - 1, rows):
        i = slice(start, min(start + rows, n - 1))
        wrapped = [c[None, :] - c[i, None] for c in (x, y, z)]
        for d in wrapped:
            d -= np.rint(d)
        dist2 = np.full(wrapped[0].shape, np.inf, dtype=np.float32)
        for sx, sy, sz in shifts:
            d0, d1, d2 = wrapped[0] + sx, wrapped[1] + sy, wrapped[2] + sz
            c0 = d0 * basis[0, 0] + d1 * basis[1, 0] + d2 * basis[2, 0]
            c1 = d1 * basis[1, 1] + d2 * basis[2, 1]
            c2 = d2 * basis[2, 2]
            np.minimum(dist2, c0 * c0 + c1 * c1 + c2 * c2, out=dist2)
        close = (dist2 < min_distance**2) & (later > np.arange(i.start, i.stop)[:, None])
        if not close.any():
            continue
        close &= occ[i, None] + occ[None, :] > MAX_OCCUPANCY_SUM
        if close.any():
            a, b = np.argwhere(close)[0]
            raise ValueError(
                f"overlapping atoms: {names[start + a]} (atom {start + a}) and {names[b]} (atom {b}) "
                f"are {np.sqrt(dist2[a, b]):.3f} A apart"
            )


def prepare(
    cell: Sequence[float] | np.ndarray,
    species: Sequence[str | int],
    frac: Sequence[Sequence[float]] | np.ndarray,
    occupancy: Sequence[float] | np.ndarray | None,
    table: FormFactorTable,
    min_distance: float = MIN_DISTANCE_A,
) -> Prepared:
    """Check one structure and index its species in ``table``; ``ValueError`` saying what is wrong.
    ``min_distance`` is the overlap limit of :func:`check_overlaps` (0: no overlap check)."""
    g = metric(cell)
    xyz = np.asarray(frac, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or len(xyz) == 0:
        raise ValueError(f"fractional coordinates must be (N >= 1, 3), got shape {xyz.shape}")
    if len(species) != len(xyz):
        raise ValueError(f"{len(species)} species for {len(xyz)} coordinates")
    bad = np.flatnonzero(~np.isfinite(xyz).all(axis=1))
    if bad.size:
        raise ValueError(f"non-finite fractional coordinates (atom {bad[0]}: {xyz[bad[0]].tolist()})")
    occ = np.ones(len(xyz)) if occupancy is None else np.asarray(occupancy, dtype=np.float64)
    if occ.shape != (len(xyz),):
        raise ValueError(f"{occ.size} occupancies for {len(xyz)} atoms")
    bad = np.flatnonzero(~((occ > 0) & (occ <= 1)))
    if bad.size:
        raise ValueError(f"occupancy must be in (0, 1] (atom {bad[0]}: {occ[bad[0]]})")
    row_of: dict[str | int, int] = {}
    for name in dict.fromkeys(species):
        try:
            row_of[name] = table.lookup(name)
        except KeyError as exc:
            first = list(species).index(name)
            raise ValueError(f"{exc.args[0]} (atom {first})") from None
    m = reduce_cell(g)
    m_inv = np.eye(3, dtype=np.int64)
    if (m != m_inv).any():
        m_inv = inverse_int(m)
        g = m @ g @ m.T
        xyz = xyz @ m_inv  # the same atoms in the reduced basis: r = x B = (x M^-1)(M B)
    g_star = inverse_sym3(g)
    check_overlaps(xyz, occ, g, g_star, species, min_distance)
    atom_rows = np.array([row_of[name] for name in species], dtype=np.int64)
    order = np.argsort(atom_rows, kind="stable")
    rows = np.array(sorted(set(row_of.values())), dtype=np.int64)
    starts = np.append(np.searchsorted(atom_rows[order], rows), len(atom_rows))
    return Prepared(g, g_star, xyz[order], occ[order], rows, starts, m_inv.T.copy())
