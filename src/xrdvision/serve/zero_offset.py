"""The 2-theta zero offset of a measured scan, where its structure allows: cubic phases of known cell.

Why: the training conditions shift every pattern by a random zero offset (``conditions.zero_shift``), and
its range should cover what instruments do. An offset can only be told apart from a cell a little off
when the lines can be indexed, which the INDEX labels allow for cubic phases: their lines sit at
N = h^2 + k^2 + l^2 (allowed by the lattice centring). The fitted K-alpha1 positions are matched to the
lines of the seed cell, then the cell edge and the offset are fitted together by least squares
(2-theta_obs = 2-theta(a / sqrt N) + zero): a wrong seed cell changes the edge, not the offset, since a
cell error grows with tan(theta) and an offset does not. Bragg's law is :mod:`xrdvision.crystal.bragg`.
Sample displacement (~cos theta) is not separated: over 10-65 degrees it folds into the offset.
"""

from __future__ import annotations

import math
import re

import numpy as np

from xrdvision.crystal.bragg import CU_KA1, two_theta

# Seed cells (A) and centring of the cubic RockJock standards: handbook values of the pure minerals
# (solid solutions differ by up to ~1 %, which the fit absorbs into the edge).
CUBIC_SEEDS = {
    "rockjock/rockjock_halite.xy": (5.640, "F"),
    "rockjock/rockjock_sylvite.xy": (6.293, "F"),
    "rockjock/rockjock_fluorite.xy": (5.463, "F"),
    "rockjock/rockjock_galena.xy": (5.936, "F"),
    "rockjock/rockjock_silver.xy": (4.086, "F"),
    "rockjock/rockjock_sphalerite.xy": (5.409, "F"),
    "rockjock/rockjock_magnetite.xy": (8.396, "F"),
    "rockjock/rockjock_spinel.xy": (8.083, "F"),
    "rockjock/rockjock_pyrite.xy": (5.417, "P"),
    "rockjock/rockjock_iron.xy": (2.866, "I"),
    "rockjock/rockjock_grossular_garnet.xy": (11.851, "I"),
    "rockjock/rockjock_almandine_garnet.xy": (11.526, "I"),
    "rockjock/rockjock_analcime.xy": (13.71, "I"),
}
CENTRING_OF_SG = {225: "F", 227: "F", 216: "F", 229: "I", 230: "I", 205: "P"}
MATCH_DEG = (0.3, 0.1)  # matching tolerance of the first and the second pass (degrees)
MIN_LINES = 3
_HEADER_CELL = re.compile(r"\ba\s*=\s*([0-9]+\.[0-9]+)\s*A\b")


def header_cell(text: str) -> float | None:
    """A cubic edge stated in a file's header (``a = 10.49561 A``), or None."""
    m = _HEADER_CELL.search(text)
    return float(m.group(1)) if m else None


def allowed_n(centring: str, n_max: int) -> np.ndarray:
    """Sorted distinct N = h^2 + k^2 + l^2 (0 < N <= n_max) of the reflections a centring allows."""
    top = math.isqrt(n_max) + 1
    found = set()
    for h in range(top + 1):
        for k in range(h + 1):
            for l in range(k + 1):  # noqa: E741 - Miller index
                n = h * h + k * k + l * l
                if not 0 < n <= n_max:
                    continue
                if centring == "F" and len({h % 2, k % 2, l % 2}) != 1:
                    continue
                if centring == "I" and (h + k + l) % 2:
                    continue
                found.add(n)
    return np.array(sorted(found), dtype=np.float64)


def fit_zero_offset(
    observed: np.ndarray, a_seed: float, centring: str, wavelength: float = CU_KA1
) -> tuple[float, float, int]:
    """(zero offset in degrees, fitted edge in A, lines used) from K-alpha1 line positions ``observed``;
    NaNs and 0 with fewer than ``MIN_LINES`` indexed lines over 15+ degrees."""
    obs = np.sort(np.asarray(observed, dtype=np.float64))
    if obs.size < MIN_LINES:
        return math.nan, math.nan, 0
    d_min = wavelength / (2 * math.sin(math.radians(min(obs.max() + 2, 179.0) / 2)))
    ns = allowed_n(centring, int((a_seed * 1.02 / d_min) ** 2) + 1)
    zero, a = 0.0, a_seed
    used = np.zeros(0, dtype=bool)
    for tol in MATCH_DEG:
        calc = two_theta(a / np.sqrt(ns), wavelength) + zero
        j = np.argmin(np.abs(obs[:, None] - calc[None, :]), axis=1)
        used = np.abs(obs - calc[j]) < tol
        if used.sum() < MIN_LINES or np.ptp(obs[used]) < 15:
            return math.nan, math.nan, int(used.sum())
        n_used, o_used = ns[j[used]], obs[used]
        for _ in range(20):  # Gauss-Newton on (zero, a)
            model = two_theta(a / np.sqrt(n_used), wavelength) + zero
            eps = 1e-5 * a
            slope = (two_theta((a + eps) / np.sqrt(n_used), wavelength) - model + zero) / eps
            jac = np.column_stack([np.ones_like(model), slope])
            step, *_ = np.linalg.lstsq(jac, o_used - model, rcond=None)
            zero, a = zero + float(step[0]), a + float(step[1])
            if abs(step[0]) < 1e-6 and abs(step[1]) < 1e-7:
                break
    return zero, a, int(used.sum())
