"""Peak profiles: put a peak list on a 2-theta grid (pseudo-Voigt), optionally with Cu K-alpha2.

Simulation, augmentation and prediction all go through :func:`profile_pattern`, so that a pattern
simulated for training and one re-profiled with another step or width are drawn the same way.
"""

from __future__ import annotations

import numpy as np

from xrdvision.crystal import bragg
from xrdvision.crystal.bragg import CU_KA1, CU_KA2

# Peaks farther than this many FWHM from a grid point contribute nothing measurable there; the
# Lorentzian tail at 30 FWHM is 0.03 % of the peak, well under one grey level of a rendered image.
_CUTOFF_FWHM = 30.0


def grid(two_theta_min: float, two_theta_max: float, step: float) -> np.ndarray:
    """The 2-theta grid ``[min, max]`` with ``step`` (both ends included, float32)."""
    n = round((two_theta_max - two_theta_min) / step) + 1
    return (two_theta_min + step * np.arange(n)).astype(np.float32)


def kalpha2_peaks(
    two_theta: np.ndarray, intensity: np.ndarray, wavelength: float = CU_KA1
) -> tuple[np.ndarray, np.ndarray]:
    """The K-alpha2 companions of K-alpha1 peaks: same d-spacing, lambda = 1.54439 A, half intensity.

    Measured Cu patterns (RRUFF, lab diffractometers without a monochromator) keep this line, which
    splits peaks at high angle; simulating it makes training patterns look like measured ones.
    Peaks whose K-alpha2 position would pass 180 degrees are dropped.
    """
    tt2 = bragg.two_theta(bragg.d_spacing(two_theta, wavelength), CU_KA2)
    keep = np.isfinite(tt2) & (tt2 < 180.0)
    return tt2[keep], 0.5 * np.asarray(intensity)[keep]


def profile_pattern(
    two_theta: np.ndarray,
    intensity: np.ndarray,
    grid_two_theta: np.ndarray,
    fwhm: float,
    eta: float = 0.5,
    *,
    kalpha2: bool = False,
    wavelength: float = CU_KA1,
) -> np.ndarray:
    """Sum of pseudo-Voigt peaks on ``grid_two_theta``, scaled to a maximum of 1 (float32).

    ``intensity`` are integrated intensities (areas). With ``kalpha2`` the K-alpha2 doublet is added.
    An empty peak list (nothing diffracts in range) gives an all-zero pattern. Peaks are summed only
    within a window of +-30 FWHM, so the cost is O(peaks x window), not O(peaks x grid).
    """
    tt = np.asarray(two_theta, dtype=np.float64)
    amp = np.asarray(intensity, dtype=np.float64)
    if kalpha2 and tt.size:
        tt2, amp2 = kalpha2_peaks(tt, amp, wavelength)
        tt = np.concatenate([tt, tt2])
        amp = np.concatenate([amp, amp2])
    g = np.asarray(grid_two_theta, dtype=np.float64)
    out = np.zeros(g.size, dtype=np.float64)
    if tt.size == 0 or g.size == 0:
        return out.astype(np.float32)
    step = float(np.median(np.diff(g))) if g.size > 1 else fwhm
    half = int(np.ceil(_CUTOFF_FWHM * fwhm / step))
    # Index of each peak's nearest grid point, then a fixed window around it (vectorised).
    centre = np.searchsorted(g, tt)
    offsets = np.arange(-half, half + 1)
    idx = centre[:, None] + offsets[None, :]
    valid = (idx >= 0) & (idx < g.size)
    idx_c = np.clip(idx, 0, g.size - 1)
    x = g[idx_c] - tt[:, None]
    hw = fwhm / 2
    gauss = np.sqrt(np.log(2) / np.pi) / hw * np.exp(-np.log(2) * (x / hw) ** 2)
    lorentz = 1 / (np.pi * hw * (1 + (x / hw) ** 2))
    vals = amp[:, None] * (eta * lorentz + (1 - eta) * gauss)
    np.add.at(out, idx_c[valid], vals[valid])
    peak = out.max()
    if peak > 0:
        out /= peak
    return out.astype(np.float32)
