"""A measured scan made to look like the training data: wavelength, background, normalisation, grid.

A measured pattern differs from a simulated one in ways that have nothing to do with the structure:
another wavelength (peaks elsewhere), a background (air scatter, fluorescence, an amorphous holder),
counts on an arbitrary scale, another 2-theta range and step. :func:`to_training_grid` removes what it
can so that the rendered image looks like the training images: Bragg's law to the training wavelength
(:mod:`xrdvision.crystal.bragg`), SNIP background subtraction, normalisation to a maximum of 1 and
interpolation onto the training grid. Reading the file is :mod:`xrdvision.formats.scans`.

Also here, as pure functions the measured-input path of either model kind calls: :func:`background` (the
hand SNIP or a ``pybaselines`` method, compared in ``benchmarks/compare_baselines.py``) and
:func:`strip_kalpha2` (Rachinger's K-alpha2 stripping, wavelengths from :mod:`xrdvision.crystal.bragg`).
"""

from __future__ import annotations

import math

import numpy as np

from xrdvision.config import SimulateParams
from xrdvision.crystal.bragg import CU_KA1, CU_KA2, CU_KA_AVERAGE, convert_wavelength
from xrdvision.crystal.profile import grid
from xrdvision.errors import InputError
from xrdvision.formats.scans import MeasuredPattern, measured_range
from xrdvision.serve.peak_fit import noise_sigma

MIN_OVERLAP_DEG = 10.0  # at least this much of the pattern must fall inside the training 2-theta range
# SNIP background: clipping half-width in degrees 2-theta. It must be wider than a peak's foot (peaks
# here have FWHM 0.05-0.3 degree, clay basal bands ~1 degree) and narrower than the background's
# features; SNIP never clips a convex (decaying) background, so a generous window is safe.
BG_HALF_WIDTH_DEG = 2.0
BG_SMOOTH_DEG = 0.2  # moving average before SNIP: the background follows the noise mean, not its minima
NO_PEAK_SNR = 6.0  # strongest line above the background, in noise sd: below it the scan shows no peak
BASELINE_METHODS = ("snip_hand", "snip", "arpls", "modpoly")
# pybaselines' SNIP: the closest to the truth on the measured scans' peak-free stretches and on synthetic
# scans without eating into lines (arpls is closer still between lines but climbs into broad ones: +1.3 %
# of the strongest line at the 90th percentile); benchmarks/compare_baselines.py, the README's figures.
DEFAULT_BACKGROUND = "snip"
ARPLS_LAM = 1e7  # at a 0.01 degree step; scaled by (0.01 / step)^4 (second differences) for other steps
MODPOLY_ORDER = 4


def _lls(y: np.ndarray) -> np.ndarray:
    """The log-log-square-root operator of SNIP: compresses strong peaks so clipping works on counts."""
    return np.log(np.log(np.sqrt(y + 1) + 1) + 1)


def _lls_inverse(v: np.ndarray) -> np.ndarray:
    return (np.exp(np.exp(v) - 1) - 1) ** 2 - 1


def snip_background(intensity: np.ndarray, half_width: int, smooth: int = 1) -> np.ndarray:
    """SNIP background (Ryan et al. 1988; Morhac et al. 1997) of an evenly stepped pattern.

    Why SNIP: it needs no peak shapes or positions and only one setting (``half_width`` in points, wider
    than a peak's foot); it follows smooth, convex backgrounds (the decay of air scatter at low angle)
    exactly, where a polynomial fit needs a degree and bends under strong peaks, and a rolling minimum
    follows the noise minima and leaves steps. Iteration ``p`` (1 .. half_width) replaces each point by
    the smaller of itself and the mean of its neighbours ``p`` away, on the LLS-compressed counts; the
    ends are padded with the edge values. ``smooth`` points of moving average first put the background
    at the mean of the noise.

    No longer the default (``background(..., "snip_hand")`` keeps it): ``benchmarks/compare_baselines.py``
    found pybaselines' SNIP with the same window closer to the true background on the measured scans'
    peak-free stretches (median residual 0.17 % vs 0.36 % of the strongest line on the tuning half) and
    on synthetic scans with a known background (0.11 % vs 0.13 %), and leaving less under the lines.
    """
    y = np.asarray(intensity, dtype=np.float64)
    if y.size == 0 or half_width < 1:
        return np.zeros_like(y)
    if smooth > 1:
        kernel = np.ones(smooth) / smooth
        y = np.convolve(np.pad(y, smooth // 2, mode="edge"), kernel, mode="valid")[: intensity.size]
    v = _lls(np.clip(y, 0.0, None))
    n = v.size
    padded = np.pad(v, half_width, mode="reflect", reflect_type="odd")
    for p in range(1, half_width + 1):
        centre = padded[half_width : half_width + n]
        mean = 0.5 * (
            padded[half_width - p : half_width - p + n] + padded[half_width + p : half_width + p + n]
        )
        padded[half_width : half_width + n] = np.minimum(centre, mean)
    return _lls_inverse(padded[half_width : half_width + n])


def subtract_background(
    two_theta: np.ndarray,
    intensity: np.ndarray,
    half_width_deg: float = BG_HALF_WIDTH_DEG,
    method: str | None = None,
) -> np.ndarray:
    """Intensity minus its :func:`background` (``DEFAULT_BACKGROUND`` unless ``method``), clipped at 0."""
    bg = background(two_theta, intensity, method, half_width_deg)
    return np.clip(np.asarray(intensity, dtype=np.float64) - bg, 0.0, None)


def background(
    two_theta: np.ndarray,
    intensity: np.ndarray,
    method: str | None = None,
    half_width_deg: float = BG_HALF_WIDTH_DEG,
) -> np.ndarray:
    """The background of an evenly stepped scan by ``method`` (one of :data:`BASELINE_METHODS`;
    ``DEFAULT_BACKGROUND`` when None).

    ``snip_hand``: :func:`snip_background` (the default everywhere); ``snip``: ``pybaselines``' SNIP with
    the same window and pre-smoothing; ``arpls``: asymmetrically reweighted penalised least squares
    (Baek et al. 2015) with ``ARPLS_LAM``; ``modpoly``: an iteratively clipped polynomial of degree
    ``MODPOLY_ORDER`` (Lieber and Mahadevan-Jansen 2003). Window sizes are given in degrees.
    """
    tt = np.asarray(two_theta, dtype=np.float64)
    y = np.asarray(intensity, dtype=np.float64)
    step = float(np.median(np.diff(tt))) if tt.size > 1 else 1.0
    half = max(1, round(half_width_deg / step))
    smooth = max(1, round(BG_SMOOTH_DEG / step))
    method = method or DEFAULT_BACKGROUND
    if method == "snip_hand":
        return snip_background(y, half, smooth)
    if method not in BASELINE_METHODS:
        raise ValueError(f"background method {method!r} is not one of {', '.join(BASELINE_METHODS)}")
    from pybaselines import Baseline

    fitter = Baseline(x_data=tt, assume_sorted=True)
    if method == "snip":
        bg, _ = fitter.snip(y, max_half_window=half, decreasing=True, smooth_half_window=max(1, smooth // 2))
    elif method == "arpls":
        bg, _ = fitter.arpls(y, lam=ARPLS_LAM * (0.01 / step) ** 4)
    else:
        bg, _ = fitter.modpoly(y, poly_order=MODPOLY_ORDER)
    return np.asarray(bg, dtype=np.float64)


def strip_kalpha2(
    two_theta: np.ndarray,
    intensity: np.ndarray,
    ratio: float = 0.5,
    wavelengths: tuple[float, float] = (CU_KA1, CU_KA2),
) -> np.ndarray:
    """The K-alpha1 part of a background-free scan (Rachinger 1948): from low angle up, each point loses
    ``ratio`` x the stripped intensity where its K-alpha2 came from, the K-alpha1 position of the same
    d-spacing (Bragg's law, :func:`~xrdvision.crystal.bragg.convert_wavelength`), interpolated linearly.

    Any ascending 2-theta grid works (uneven steps too). Where the source lies between the previous and
    this point (low angles, split under a step), the equation is solved for this point. Run it after
    the background is removed: a flat background would come out scaled by 1 / (1 + ratio). Small
    negative ripples where the doublet model is not exact are clipped to 0.
    """
    tt = np.asarray(two_theta, dtype=np.float64)
    y = np.asarray(intensity, dtype=np.float64)
    src = convert_wavelength(tt, wavelengths[1], wavelengths[0])
    j_all = np.searchsorted(tt, src, side="right") - 1
    out = np.empty_like(y)
    for k in range(y.size):
        j = int(j_all[k])
        if not np.isfinite(src[k]) or j < 0 or j >= k:
            out[k] = y[k]
            continue
        w = (src[k] - tt[j]) / (tt[j + 1] - tt[j])
        if j + 1 == k:
            out[k] = (y[k] - ratio * (1 - w) * out[j]) / (1 + ratio * w)
        else:
            out[k] = y[k] - ratio * ((1 - w) * out[j] + w * out[j + 1])
    return np.clip(out, 0.0, None)


def source_wavelength(pattern: MeasuredPattern, sim: SimulateParams, default: float | None = None) -> float:
    """The wavelength to convert from: the pattern's, else ``default``, else the training one (no shift).

    Cu K-alpha1+2 data (1.5418 average) and a simulation with ``kalpha2`` both have K-alpha1 at 1.5406 A
    and K-alpha2 beside it, so such data are already like the training patterns: converting the average
    would move the K-alpha1 component off its simulated position. Only then is 1.5406 used instead.
    """
    wl = pattern.wavelength if pattern.wavelength is not None else default
    if wl is None:
        return sim.wavelength
    if sim.kalpha2 and abs(sim.wavelength - CU_KA1) < 1e-4 and abs(wl - CU_KA_AVERAGE) < 1e-3:
        return CU_KA1
    return float(wl)


def to_training_grid(
    pattern: MeasuredPattern,
    sim: SimulateParams,
    *,
    default_wavelength: float | None = None,
    background: bool = True,
    strip_ka2: bool = False,
) -> np.ndarray:
    """The pattern as the model's training data: float32 on ``grid(two_theta_min, two_theta_max, step)``.

    In order: leading/trailing zero runs (unmeasured) dropped; SNIP background subtracted on the
    measured (even) steps; with ``strip_ka2`` the K-alpha2 half of each doublet removed
    (:func:`strip_kalpha2`; Cu K-alpha1+2 data only, then read at K-alpha1); 2-theta
    converted to ``sim.wavelength`` through the d-spacings
    (:func:`source_wavelength` picks the wavelength to convert from); linear interpolation onto the
    grid, zero outside the measured range; scaled to a maximum of 1 over the grid. A pattern that
    overlaps the training range by less than 10 degrees, whose strongest line stands less than
    ``NO_PEAK_SNR`` noise sd above the background (no peaks), or has no signal left after the
    background, is an :class:`InputError`.
    """
    lo, hi = measured_range(pattern)
    keep = (pattern.two_theta >= lo) & (pattern.two_theta <= hi)
    tt, y = pattern.two_theta[keep], pattern.intensity[keep]
    net = subtract_background(tt, y)
    sigma = noise_sigma(y)
    if sigma > 0 and not float(net.max()) >= NO_PEAK_SNR * sigma:
        raise InputError(
            pattern.source,
            f"no peak above the noise: the strongest line stands {float(net.max()) / sigma:.1f} noise sd "
            f"above the background (at least {NO_PEAK_SNR:g} needed)",
        )
    if background:
        y = net
    wl = source_wavelength(pattern, sim, default_wavelength)
    if strip_ka2 and abs(wl - CU_KA_AVERAGE) < 1e-3:  # Rachinger: Cu K-alpha1+2 doublets to K-alpha1
        y, wl = strip_kalpha2(tt, np.clip(y, 0.0, None)), CU_KA1
    tt_c = convert_wavelength(tt, wl, sim.wavelength)
    ok = np.isfinite(tt_c)
    tt_c, y = tt_c[ok], y[ok]
    lo_c, hi_c = (float(tt_c[0]), float(tt_c[-1])) if tt_c.size else (math.nan, math.nan)
    overlap = min(hi_c, sim.two_theta_max) - max(lo_c, sim.two_theta_min) if tt_c.size else -1.0
    if not overlap >= MIN_OVERLAP_DEG:
        where = f"{lo_c:.2f}-{hi_c:.2f}" if tt_c.size else "nothing"
        at = f" at {sim.wavelength:g} A" if wl != sim.wavelength else ""
        raise InputError(
            pattern.source,
            f"2-theta range {where} degrees{at} overlaps the training range {sim.two_theta_min:g}-"
            f"{sim.two_theta_max:g} by less than {MIN_OVERLAP_DEG:g} degrees",
        )
    g = grid(sim.two_theta_min, sim.two_theta_max, sim.step).astype(np.float64)
    out = np.interp(g, tt_c, y, left=0.0, right=0.0)
    top = float(out.max())
    if not top > 0:
        raise InputError(pattern.source, "no signal left after background subtraction (a flat pattern?)")
    return (out / top).astype(np.float32)
