"""Measured-like 1-D patterns made on the fly from peak lists: the training data of the 1-D model.

Why on the fly: a profiled pattern on a 0.01-degree grid is 8 501 floats, 30 times its peak list, and a
fresh draw of measurement conditions every epoch is the augmentation that carries a simulation-trained
model to a diffractometer (Schopmans et al. 2023, AlphaDiffract 2026). So a batch is rendered from peak
lists when it is needed, vectorised over the batch (the lines go onto the grid with one ``bincount``
and are convolved with their profiles by FFT), about a millisecond per pattern.

What a pattern goes through, in the order a diffractometer imposes it (each range a ``conditions:``
param, :class:`~xrdvision.config.patterns.ConditionsParams`):

1. line intensities: relative jitter, March-Dollase preferred orientation (``(r^2 cos^2 a + sin^2 a / r)
   ^ -3/2``, ``a`` the angle between a line's plane normal and the texture axis, the normal of one of the
   pattern's strong lines), an impurity phase (a second crystal's lines at 1-20 % of the height);
2. K-alpha2 companions (same d, half the height; Bragg's law from :mod:`xrdvision.crystal.bragg`);
3. line positions: zero offset and sample displacement (``-2 s cos(theta) / R``, R = 240 mm);
4. widths: instrument Caglioti ``FWHM^2 = U tan^2 + V tan + W`` and Scherrer size broadening
   ``0.9 lambda / (L cos theta)``, combined in quadrature; area-normalised pseudo-Voigt profiles with
   mixing ``eta``, convolved in Fourier space (:func:`render`);
5. background (a smooth polynomial plus an amorphous hump), counting noise (Poisson at a drawn count
   level, or Gaussian), a scan that stops early (zero beyond), scaling (square root by default).

:func:`clean_patterns` renders the same lines under one fixed, noiseless condition: how simulated real
structures (COD validation and test) are scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from xrdvision.config.patterns import ConditionsParams, PatternParams
from xrdvision.crystal.bragg import CU_KA1, CU_KA2, d_spacing, two_theta

GONIOMETER_RADIUS_MM = 240.0
SCHERRER_K = 0.9
MIN_FWHM = 0.005  # degrees; a drawn width is never narrower (a Caglioti V < 0 can make it imaginary)


def grid(pattern: PatternParams) -> np.ndarray:
    """The model's 2-theta grid (degrees), ``two_theta_min`` to ``two_theta_max`` inclusive."""
    n = round((pattern.two_theta_max - pattern.two_theta_min) / pattern.step) + 1
    return (pattern.two_theta_min + pattern.step * np.arange(n)).astype(np.float64)


def scale_intensity(y: np.ndarray, scale: str) -> np.ndarray:
    """Intensities (max 1, >= 0) as the network sees them: ``sqrt`` lifts weak lines, ``log`` more so."""
    y = np.clip(np.asarray(y, dtype=np.float32), 0.0, None)
    if scale == "sqrt":
        return np.sqrt(y)
    if scale == "log":
        return (np.log1p(1000.0 * y) / np.log1p(1000.0)).astype(np.float32)
    if scale == "linear":
        return y
    raise ValueError(f"unknown intensity scale {scale!r} (sqrt, linear or log)")


@dataclass
class Lines:
    """Lines of a batch, flattened: ``row`` says which pattern a line belongs to."""

    row: np.ndarray  # (L,) int
    two_theta: np.ndarray  # (L,) degrees
    height: np.ndarray  # (L,) relative
    normal: np.ndarray | None  # (L, 3) or None


def gather(
    offsets: np.ndarray,
    two_theta_all: np.ndarray,
    intensity_all: np.ndarray,
    normal_all: np.ndarray | None,
    idx: np.ndarray,
) -> Lines:
    """The lines of structures ``idx`` (in that order) from offset-indexed arrays."""
    starts, ends = offsets[idx], offsets[idx + 1]
    counts = (ends - starts).astype(np.int64)
    row = np.repeat(np.arange(len(idx)), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    pick = np.repeat(starts, counts) + within
    normal = None if normal_all is None else normal_all[pick].astype(np.float32)
    return Lines(row, two_theta_all[pick].astype(np.float64), intensity_all[pick].astype(np.float64), normal)


def sticks(lines: Lines, n_rows: int, x: np.ndarray, size: int) -> np.ndarray:
    """Line heights on the grid as sticks, (n_rows, size) float64: each line is split between its two
    neighbouring grid points in proportion to its distance from them (its centroid stays exact)."""
    g, step = x.size, float(x[1] - x[0])
    pos = (lines.two_theta - x[0]) / step
    keep = (pos >= 0) & (pos < g - 1) & (lines.height > 0)
    pos, h, row = pos[keep], lines.height[keep], lines.row[keep]
    left = np.floor(pos).astype(np.int64)
    frac = pos - left
    where = np.concatenate([row * size + left, row * size + left + 1])
    weight = np.concatenate([h * (1.0 - frac), h * frac])
    return np.bincount(where, weights=weight, minlength=n_rows * size).reshape(n_rows, size)


def segment_weights(x: np.ndarray, n_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment centres (K,) over ``x`` and hat-function weights (K, len(x)) that sum to 1 at every point."""
    centres = np.linspace(x[0], x[-1], n_segments)
    if n_segments == 1:
        return centres, np.ones((1, x.size))
    eye = np.eye(n_segments)
    return centres, np.stack([np.interp(x, centres, eye[k]) for k in range(n_segments)])


def render(lines: Lines, n_rows: int, x: np.ndarray, fwhm: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Area-normalised pseudo-Voigt profiles of all lines on the uniform grid ``x``: (n_rows, len(x)).

    ``fwhm`` (n_rows, K): each row's FWHM (degrees) at K segment centres spread evenly over ``x``
    (K = 1: one width); ``eta`` (n_rows,): Lorentzian fraction. The lines go onto the grid as sticks and
    are convolved in Fourier space, where both profiles are closed forms (Gaussian: ``exp(-2 pi^2
    sigma^2 f^2)``, Lorentzian: ``exp(-2 pi gamma |f|)``); with K widths the K convolutions are blended
    with hat functions, as the width changes slowly with 2-theta. The grid is zero-padded by
    ``PAD_DEGREES`` (to a fast FFT length), so a tail that wraps round lands far from the pattern.
    """
    from scipy import fft

    g, step = x.size, float(x[1] - x[0])
    size = fft.next_fast_len(g + int(np.ceil(PAD_DEGREES / step)), real=True)
    spectrum = fft.rfft(sticks(lines, n_rows, x, size).astype(np.float32), axis=1)  # (B, F) complex64
    f = np.fft.rfftfreq(size, d=step).astype(np.float32)  # cycles per degree
    _, weights = segment_weights(x, fwhm.shape[1])
    out = np.zeros((n_rows, g), np.float32)
    e = eta.astype(np.float32)[:, None]
    for j in range(fwhm.shape[1]):
        width = fwhm[:, j : j + 1].astype(np.float32)
        lorentz = np.exp((-np.pi * f) * width)  # gamma = FWHM / 2
        gauss = np.exp(np.float32(-2 * np.pi**2 / (8 * np.log(2))) * (f * width) ** 2)
        kernel = e * lorentz + (1 - e) * gauss
        out += fft.irfft(spectrum * kernel, n=size, axis=1)[:, :g] * weights[j].astype(np.float32)
    return out


PAD_DEGREES = 25.0  # zero padding beyond the grid: a Lorentzian tail that wraps round is 25 degrees away
N_SEGMENTS = 8  # widths per pattern: FWHM changes by a few % between neighbouring segment centres


def _uniform(rng: np.random.Generator, bounds: list[float], n: int) -> np.ndarray:
    return rng.uniform(bounds[0], bounds[1], n)


def _log_uniform(rng: np.random.Generator, bounds: list[float], n: int) -> np.ndarray:
    return np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]), n))


def line_fwhm(
    two_theta_deg: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    w: np.ndarray,
    size_nm: np.ndarray,
    wavelength: float,
) -> np.ndarray:
    """FWHM (degrees) of lines at ``two_theta_deg``: Caglioti (U, V, W in deg^2) and Scherrer (size in
    nm) in quadrature; never below ``MIN_FWHM``."""
    theta = np.radians(two_theta_deg) / 2
    tan = np.tan(theta)
    inst2 = np.maximum(u * tan * tan + v * tan + w, 0.0)
    size = np.degrees(SCHERRER_K * wavelength / (size_nm * 10.0 * np.cos(theta)))
    return np.maximum(np.sqrt(inst2 + size * size), MIN_FWHM)


def march_dollase(cos_angle: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The March-Dollase intensity factor for lines at angle ``a`` (``cos a``) to the texture axis."""
    c2 = np.clip(cos_angle, -1.0, 1.0) ** 2
    return (r * r * c2 + (1.0 - c2) / r) ** -1.5


def texture(lines: Lines, n_rows: int, apply: np.ndarray, r: np.ndarray, rng: np.random.Generator) -> None:
    """March-Dollase on the rows where ``apply``, in place; the axis is the normal of one of the row's
    five strongest lines, chosen at random (plates and needles grow along low-index planes)."""
    if lines.normal is None or not apply.any():
        return
    order = np.lexsort((-lines.height, lines.row))
    rank = np.arange(order.size) - np.searchsorted(lines.row[order], lines.row[order])
    counts = np.bincount(lines.row, minlength=n_rows)
    k = np.minimum(counts, 5)
    pick_rank = (rng.random(n_rows) * np.maximum(k, 1)).astype(np.int64)
    chosen = order[(rank == pick_rank[lines.row[order]])]
    axis = np.zeros((n_rows, 3), np.float32)
    axis[lines.row[chosen]] = lines.normal[chosen]
    cos = np.einsum("ij,ij->i", lines.normal, axis[lines.row])
    on = apply[lines.row] & (counts[lines.row] > 0)
    lines.height[on] *= march_dollase(cos[on], r[lines.row[on]])


def measured_like(
    lines: Lines,
    impurity: Lines | None,
    n_rows: int,
    x: np.ndarray,
    cond: ConditionsParams,
    rng: np.random.Generator,
    wavelength: float = CU_KA1,
) -> np.ndarray:
    """Patterns (n_rows, len(x)), max 1 each, >= 0, unscaled, under freshly drawn conditions.

    ``impurity`` holds the lines of a second crystal per row (any rows; only those drawn to carry an
    impurity phase use them).
    """
    if lines.normal is not None:
        lines = Lines(lines.row, lines.two_theta, lines.height.copy(), lines.normal)
    else:
        lines = Lines(lines.row, lines.two_theta, lines.height.copy(), None)
    lines.height *= np.clip(1.0 + cond.intensity_jitter * rng.standard_normal(lines.height.size), 0.05, None)
    textured = rng.random(n_rows) < cond.preferred_orientation
    texture(lines, n_rows, textured, _uniform(rng, cond.march_dollase, n_rows), rng)
    top = np.zeros(n_rows)
    np.maximum.at(top, lines.row, lines.height)
    lines.height /= np.maximum(top[lines.row], 1e-12)
    row, tt, hh = lines.row, lines.two_theta, lines.height
    if impurity is not None and impurity.row.size:
        has = rng.random(n_rows) < cond.impurity
        frac = _uniform(rng, cond.impurity_fraction, n_rows)
        sel = has[impurity.row]
        itop = np.zeros(n_rows)
        np.maximum.at(itop, impurity.row, impurity.height)
        ih = impurity.height[sel] / np.maximum(itop[impurity.row[sel]], 1e-12) * frac[impurity.row[sel]]
        row = np.concatenate([row, impurity.row[sel]])
        tt = np.concatenate([tt, impurity.two_theta[sel]])
        hh = np.concatenate([hh, ih])
    doublet = rng.random(n_rows) < cond.kalpha2
    a2 = doublet[row]
    tt2 = two_theta(d_spacing(tt[a2], wavelength), CU_KA2)
    ok = np.isfinite(tt2)
    row = np.concatenate([row, row[a2][ok]])
    hh = np.concatenate([hh, 0.5 * hh[a2][ok]])
    tt = np.concatenate([tt, tt2[ok]])
    zero = rng.uniform(-cond.zero_shift, cond.zero_shift, n_rows)
    disp = rng.uniform(-cond.displacement, cond.displacement, n_rows)
    theta = np.radians(tt) / 2
    tt = tt + zero[row] + np.degrees(-2.0 * disp[row] * np.cos(theta) / GONIOMETER_RADIUS_MM)
    u, v, w = (_uniform(rng, getattr(cond, f"caglioti_{k}"), n_rows)[:, None] for k in "uvw")
    size = _log_uniform(rng, cond.crystallite_nm, n_rows)[:, None]
    centres, _ = segment_weights(x, N_SEGMENTS)
    fwhm = line_fwhm(centres[None, :], u, v, w, size, wavelength)
    y = render(Lines(row, tt, hh, None), n_rows, x, fwhm, _uniform(rng, cond.eta, n_rows))
    y /= np.maximum(y.max(axis=1, keepdims=True), 1e-12)
    y += backgrounds(n_rows, x, cond, rng)
    y = add_noise(y, cond, rng)
    cut = rng.random(n_rows) < cond.range_cut
    if cut.any():
        stop = rng.uniform(min(cond.range_min, x[-1]), x[-1], n_rows)
        y[cut[:, None] & (x[None, :] > stop[:, None])] = 0.0
    y = np.clip(y, 0.0, None)
    return y / np.maximum(y.max(axis=1, keepdims=True), 1e-12)


def backgrounds(n_rows: int, x: np.ndarray, cond: ConditionsParams, rng: np.random.Generator) -> np.ndarray:
    """A smooth background per row: a cubic in 2-theta (shifted to start at 0, then scaled to a drawn
    height up to ``background``) plus an amorphous hump (a Gaussian 8-30 degrees wide, centred at 15-35
    degrees, up to ``hump`` high)."""
    t = (x - x[0]) / (x[-1] - x[0]) * 2.0 - 1.0
    coef = rng.standard_normal((n_rows, 4)) / np.arange(1, 5)
    poly = np.polynomial.chebyshev.chebval(t, coef.T)
    poly -= poly.min(axis=1, keepdims=True)
    poly /= np.maximum(poly.max(axis=1, keepdims=True), 1e-12)
    bg = poly * rng.uniform(0, cond.background, (n_rows, 1))
    centre = rng.uniform(15, 35, (n_rows, 1))
    sigma = rng.uniform(8, 30, (n_rows, 1)) / 2.355
    bg += rng.uniform(0, cond.hump, (n_rows, 1)) * np.exp(-0.5 * ((x[None, :] - centre) / sigma) ** 2)
    return bg.astype(np.float32)


def add_noise(y: np.ndarray, cond: ConditionsParams, rng: np.random.Generator) -> np.ndarray:
    """Poisson counting noise at a drawn count level on a share of rows, Gaussian on the others."""
    n = y.shape[0]
    poisson = rng.random(n) < cond.poisson
    out = y.copy()
    if poisson.any():
        counts = _log_uniform(rng, cond.counts, int(poisson.sum()))[:, None]
        out[poisson] = rng.poisson(np.clip(y[poisson], 0, None) * counts) / counts
    gauss = ~poisson
    if gauss.any():
        sd = _uniform(rng, cond.noise, int(gauss.sum()))[:, None]
        out[gauss] = y[gauss] + sd * rng.standard_normal(y[gauss].shape)
    return out.astype(np.float32)


def clean_patterns(
    lines: Lines,
    n_rows: int,
    x: np.ndarray,
    fwhm: float,
    eta: float,
    kalpha2: bool = False,
    wavelength: float = CU_KA1,
) -> np.ndarray:
    """Noiseless patterns (max 1) of fixed width ``fwhm`` and mixing ``eta``: a simulated structure as
    the test images show it (``simulate.fwhm`` / ``eta`` / ``kalpha2``)."""
    row, tt, hh = lines.row, lines.two_theta, lines.height
    if kalpha2:
        tt2 = two_theta(d_spacing(tt, wavelength), CU_KA2)
        ok = np.isfinite(tt2)
        row, hh, tt = (
            np.concatenate([row, row[ok]]),
            np.concatenate([hh, 0.5 * hh[ok]]),
            np.concatenate([tt, tt2[ok]]),
        )
    y = render(Lines(row, tt, hh, None), n_rows, x, np.full((n_rows, 1), fwhm), np.full(n_rows, eta))
    return y / np.maximum(y.max(axis=1, keepdims=True), 1e-12)


def draw_patterns(
    table: Any, idx: np.ndarray, params: Any, x: np.ndarray, rng: np.random.Generator | None
) -> np.ndarray:
    """Linear patterns (B, len(x)), max 1, of structures ``idx`` of a peak table (anything with
    ``lines(idx)``, ``len`` and ``wavelength``): under one fresh draw of ``params.conditions`` each
    (impurity partners: any structures of the table), or noiseless with ``rng`` None (``params.simulate``'s
    width and mixing, as real structures are scored). The 1-D model's batches, its scoring patterns and
    VGG16's drawn images all come from here."""
    lines = table.lines(idx)
    if rng is None:
        s = params.simulate
        return clean_patterns(lines, len(idx), x, s.fwhm, s.eta, s.kalpha2, table.wavelength)
    other = rng.integers(0, len(table), len(idx))
    return measured_like(lines, table.lines(other), len(idx), x, params.conditions, rng, table.wavelength)
