"""Peaks of a measured scan: where they are, how wide, whether K-alpha2 sits beside them, and the
Caglioti law their widths follow.

Why its own module: measuring what measured data look like (:mod:`xrdvision.serve.measured_stats`)
needs line widths and doublets from real scans, and those are fitted peak by peak. Each found peak is
fitted in a window with a K-alpha1/K-alpha2 pseudo-Voigt doublet on a straight background; K-alpha2 lies
where Bragg's law puts it (:mod:`xrdvision.crystal.bragg`, the one home of the wavelengths) with the same
width, and its height ratio ``r`` is free (0: no K-alpha2, 0.5: an unmonochromated Cu tube). The widths
then give the Caglioti law FWHM^2 = U tan^2(theta) + V tan(theta) + W (degrees^2), fitted robustly.
All functions are pure (arrays in, numbers out).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from xrdvision.crystal.bragg import CU_KA1, CU_KA2, convert_wavelength

MAX_PEAKS = 30  # strongest isolated peaks fitted per scan: enough for a width law, bounded cost
MIN_PROMINENCE = 0.02  # of the strongest net peak: weaker lines are too noisy to give a width
MIN_SNR = 5.0  # and at least this many noise sd
ISOLATION = 0.3  # a neighbour within the window above this share of a peak's height spoils it
MIN_R2 = 0.9  # fits explaining less of the window's variance are dropped
MAX_EVALS = 60  # model evaluations per line fit (a clean line converges in 10-30)
KA2_MIN_SEPARATION = 0.7  # x FWHM: closer doublets do not tell the K-alpha2 ratio apart from the width


def noise_sigma(intensity: np.ndarray) -> float:
    """Robust sd of point-to-point noise: the MAD of second differences / (0.6745 sqrt 6).

    Second differences cancel smooth background and broad peaks; the median ignores the few points on
    sharp peaks. Re-gridded (interpolated) data come out lower than their true noise.
    """
    y = np.asarray(intensity, dtype=np.float64)
    if y.size < 5:
        return math.nan
    d2 = y[2:] - 2 * y[1:-1] + y[:-2]
    return float(np.median(np.abs(d2 - np.median(d2))) / (0.6745 * math.sqrt(6.0)))


def pseudo_voigt(x: np.ndarray, centre: float, fwhm: float, eta: float) -> np.ndarray:
    """Pseudo-Voigt of height 1: ``eta`` Lorentzian + ``1 - eta`` Gaussian of the same FWHM."""
    u = (np.asarray(x) - centre) / fwhm
    return eta / (1 + 4 * u * u) + (1 - eta) * np.exp(-4 * math.log(2) * u * u)


def kalpha2_position(two_theta: float | np.ndarray) -> np.ndarray:
    """Where the K-alpha2 line of a Cu K-alpha1 line at ``two_theta`` lies (same d-spacing)."""
    return convert_wavelength(np.asarray(two_theta, dtype=np.float64), CU_KA1, CU_KA2)


def doublet(
    x: np.ndarray, height: float, centre: float, fwhm: float, eta: float, ratio: float, b0: float, b1: float
) -> np.ndarray:
    """K-alpha1 line of ``height`` at ``centre``, its K-alpha2 at ``ratio`` x height, on a straight line."""
    c2 = float(kalpha2_position(centre))
    return height * (pseudo_voigt(x, centre, fwhm, eta) + ratio * pseudo_voigt(x, c2, fwhm, eta)) + (
        b0 + b1 * (x - centre)
    )


@dataclass(frozen=True)
class PeakFit:
    """One fitted line: K-alpha1 centre and FWHM (degrees 2-theta), eta, K-alpha2 ratio, height."""

    two_theta: float
    fwhm: float
    eta: float
    ratio: float
    height: float
    r2: float
    resolved: bool  # K-alpha2 far enough from K-alpha1 (KA2_MIN_SEPARATION x FWHM) to measure its ratio


def find_peaks(two_theta: np.ndarray, net: np.ndarray, sigma: float) -> list[tuple[int, float]]:
    """Indices and rough FWHM (degrees) of the strongest, isolated peaks of a background-free scan."""
    from scipy.signal import find_peaks as sp_find_peaks
    from scipy.signal import peak_widths

    step = float(np.median(np.diff(two_theta)))
    top = float(net.max()) if net.size else 0.0
    if not top > 0:
        return []
    floor = max(MIN_PROMINENCE * top, MIN_SNR * (sigma if np.isfinite(sigma) else 0.0))
    idx, _ = sp_find_peaks(net, prominence=floor, distance=max(1, round(0.05 / step)))
    if idx.size == 0:
        return []
    widths = peak_widths(net, idx, rel_height=0.5)[0] * step
    heights = net[idx]
    keep: list[tuple[int, float]] = []
    for j in np.argsort(-heights, kind="stable"):
        i, w = int(idx[j]), float(max(widths[j], 2 * step))
        lo, hi = _window(float(two_theta[i]), w)
        near = (two_theta[idx] > lo) & (two_theta[idx] < hi)
        near[j] = False
        # K-alpha2 of this very line is not a neighbour: it is fitted with it.
        ka2 = float(kalpha2_position(two_theta[i]))
        near &= np.abs(two_theta[idx] - ka2) > max(w, 2 * step)
        if np.any(heights[near] > ISOLATION * heights[j]):
            continue
        keep.append((i, w))
        if len(keep) >= MAX_PEAKS:
            break
    return keep


def _window(centre: float, width: float) -> tuple[float, float]:
    """The fit window (degrees): the line's feet on the left, its K-alpha2 companion's on the right."""
    foot = max(4.0 * width, 0.25)
    return centre - foot, centre + foot + max(float(kalpha2_position(centre)) - centre, 0.0)


def fit_peak(
    two_theta: np.ndarray,
    net: np.ndarray,
    index: int,
    width: float,
    ratio: float | None = None,
    start: PeakFit | None = None,
) -> PeakFit | None:
    """Fit one line (see the module doc); ``ratio`` fixed when given, free in [0, 1] otherwise;
    ``start`` (an earlier fit of the same line) is the starting point. At most ``MAX_EVALS`` evaluations:
    a line that does not converge by then is not a clean line.

    None when the fit fails, hits a bound of the width, or explains less than ``MIN_R2`` of the window.
    """
    from scipy.optimize import curve_fit

    x0 = float(two_theta[index])
    lo, hi = _window(x0, width)
    m = (two_theta > lo) & (two_theta < hi)
    x, y = two_theta[m], net[m]
    step = float(np.median(np.diff(two_theta)))
    if x.size < 8:
        return None
    h0 = float(net[index])
    lo_w, hi_w = 0.5 * step, 3.0
    p0 = [h0, x0, min(max(width, lo_w * 2), hi_w / 2), 0.5, 0.5 if ratio is None else ratio, 0.0, 0.0]
    if start is not None:
        p0[:4] = [start.height, start.two_theta, min(max(start.fwhm, lo_w * 1.1), hi_w * 0.9), start.eta]
    lower = [0.0, x0 - width, lo_w, 0.0, 0.0, -abs(h0), -abs(h0)]
    upper = [3 * h0 + 1e-12, x0 + width, hi_w, 1.0, 1.0, abs(h0), abs(h0)]
    if ratio is not None:

        def model(x: np.ndarray, h: float, c: float, w: float, e: float, b0: float, b1: float) -> np.ndarray:
            return doublet(x, h, c, w, e, ratio, b0, b1)

        p0, lower, upper = p0[:4] + p0[5:], lower[:4] + lower[5:], upper[:4] + upper[5:]
    else:
        model = doublet  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p0 = list(np.clip(p0, lower, upper))
            p, _ = curve_fit(model, x, y, p0=p0, bounds=(lower, upper), max_nfev=MAX_EVALS, x_scale="jac")
    except (RuntimeError, ValueError):
        return None
    h, c, w, e = (float(v) for v in p[:4])
    r = float(p[4]) if ratio is None else float(ratio)
    resid = y - model(x, *p)
    ss = float(np.sum((y - y.mean()) ** 2))
    r2 = 1 - float(np.sum(resid**2)) / ss if ss > 0 else 0.0
    if r2 < MIN_R2 or w <= lo_w * 1.01 or w >= hi_w * 0.99:
        return None
    resolved = (float(kalpha2_position(c)) - c) > KA2_MIN_SEPARATION * w
    return PeakFit(c, w, e, r, h, r2, bool(resolved))


def fit_peaks(two_theta: np.ndarray, net: np.ndarray, sigma: float) -> tuple[list[PeakFit], float]:
    """All isolated peaks, in two passes: K-alpha2 ratio free, then fixed at the scan's median ratio of
    the resolved doublets (0 when none is resolved) so unresolved widths are not traded for a ratio.
    Returns (fits of the second pass, the ratio; NaN when no doublet was resolved)."""
    found = find_peaks(two_theta, net, sigma)
    first = [(i, w, f) for i, w in found if (f := fit_peak(two_theta, net, i, w)) is not None]
    resolved = [f.ratio for _, _, f in first if f.resolved]
    ratio = float(np.median(resolved)) if len(resolved) >= 2 else math.nan
    fixed = ratio if np.isfinite(ratio) else 0.0
    second = [g for i, w, f in first if (g := fit_peak(two_theta, net, i, w, fixed, f)) is not None]
    return sorted(second, key=lambda f: f.two_theta), ratio


def caglioti_fwhm(two_theta: np.ndarray, u: float, v: float, w: float) -> np.ndarray:
    """FWHM (degrees) of the Caglioti law at ``two_theta`` (0 where U tan^2 + V tan + W < 0)."""
    t = np.tan(np.radians(np.asarray(two_theta, dtype=np.float64) / 2))
    return np.sqrt(np.clip(u * t * t + v * t + w, 0.0, None))


def fit_caglioti(two_theta: np.ndarray, fwhm: np.ndarray, min_peaks: int = 5) -> tuple[float, float, float]:
    """U, V, W (degrees^2) of the widths ``fwhm`` at ``two_theta``: relative residuals, soft-L1 loss (a
    few overlapped or strained lines do not drag the law). U, W >= 0 and V = c 2 sqrt(U W) with
    |c| <= 1, so that FWHM^2 stays >= 0 at every angle (an unconstrained fit to a few lines dips to 0
    between them). NaNs with fewer than ``min_peaks`` lines or a span under 20 degrees."""
    from scipy.optimize import least_squares

    tt = np.asarray(two_theta, dtype=np.float64)
    h = np.asarray(fwhm, dtype=np.float64)
    ok = np.isfinite(tt) & np.isfinite(h) & (h > 0)
    tt, h = tt[ok], h[ok]
    if tt.size < min_peaks or np.ptp(tt) < 20.0:
        return math.nan, math.nan, math.nan

    def uvw(p: np.ndarray) -> tuple[float, float, float]:
        u, c, w = p
        return u, c * 2 * math.sqrt(u * w), w

    def resid(p: np.ndarray) -> np.ndarray:
        return caglioti_fwhm(tt, *uvw(p)) / h - 1.0

    w0 = float(np.min(h) ** 2)
    fit = least_squares(
        resid, [0.01, 0.0, w0], bounds=([0.0, -1.0, 0.0], [5.0, 1.0, 5.0]), loss="soft_l1", f_scale=0.1
    )
    return tuple(float(x) for x in uvw(fit.x))  # type: ignore[return-value]


def scherrer_fwhm(two_theta: np.ndarray, size_angstrom: float, wavelength: float = CU_KA1) -> np.ndarray:
    """Size broadening (degrees 2-theta) of crystallites of ``size_angstrom``: 0.9 lambda / (L cos theta)."""
    theta = np.radians(np.asarray(two_theta, dtype=np.float64) / 2)
    return np.degrees(0.9 * wavelength / (size_angstrom * np.cos(theta)))
