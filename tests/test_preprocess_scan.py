"""Preprocessing of measured scans: Rachinger K-alpha2 stripping on a synthetic doublet, the background
methods (hand SNIP and pybaselines) on a known background, and a scan with no peaks as one line."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from conftest import EXPERIMENTAL_DIR
from xrdvision.config import SimulateParams
from xrdvision.crystal.bragg import CU_KA1, CU_KA2, two_theta
from xrdvision.crystal.profile import profile_pattern
from xrdvision.errors import InputError
from xrdvision.formats.scans import MeasuredPattern, read_pattern
from xrdvision.serve.preprocess import BASELINE_METHODS, background, strip_kalpha2, to_training_grid

D_SPACINGS = np.array([4.2, 3.1, 2.45, 1.98, 1.62, 1.41, 1.27, 1.12])  # lines from ~21 to ~87 degrees


def _doublet(kalpha2: bool, step: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    tt = np.round(np.arange(10.0, 90.0, step), 6)
    at = two_theta(D_SPACINGS, CU_KA1)
    return tt, profile_pattern(at, np.ones_like(at), tt, 0.08, 0.5, kalpha2=kalpha2).astype(np.float64)


@pytest.mark.parametrize("step", [0.01, 0.02, 0.0131])
def test_rachinger_strips_the_kalpha2_of_a_synthetic_doublet(step):
    tt, both = _doublet(True, step)
    _, alone = _doublet(False, step)
    stripped = strip_kalpha2(tt, both)
    # the same K-alpha1 pattern up to scale (profile_pattern scales each to a maximum of 1)
    scale = alone.max() / stripped.max()
    assert np.abs(stripped * scale - alone).max() < 0.03  # linear interpolation at a 0.02 step
    # where K-alpha2 stood alone (high angle), nothing is left
    ka2_at = two_theta(D_SPACINGS[-2:], CU_KA2)
    idx = np.searchsorted(tt, ka2_at)
    assert np.all(stripped[idx] * scale < 0.05) and np.all(both[idx] / both.max() > 0.2)
    # on a pattern WITHOUT K-alpha2 it does harm where the doublet would overlap the line (low angle):
    # strip only scans whose K-alpha2 is there (measured_stats finds it in 270 of 270 measurable ones)
    kept = strip_kalpha2(tt, alone)
    peaks = np.searchsorted(tt, two_theta(D_SPACINGS, CU_KA1))
    assert kept[peaks[0]] < 0.9 * alone[peaks[0]]


def test_rachinger_leaves_a_flat_background_scaled_and_keeps_length():
    tt = np.arange(10.0, 30.0, 0.01)
    out = strip_kalpha2(tt, np.ones_like(tt))
    assert out.shape == tt.shape and out[-1] == pytest.approx(1 / 1.5, rel=1e-3)
    assert np.all(strip_kalpha2(tt, np.zeros_like(tt)) == 0)


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_background_methods_recover_a_known_background(method):
    tt, lines = _doublet(True)
    rng = np.random.default_rng(0)
    truth = 0.15 * np.exp(-(tt - 10) / 25) + 0.05 + 0.04 * np.exp(-0.5 * ((tt - 25) / 4) ** 2)
    y = lines + truth + rng.normal(0, 0.003, tt.size)
    bg = background(tt, y, method)
    assert bg.shape == tt.shape
    assert np.median(np.abs(bg - truth)) < 0.02, method


def test_unknown_background_method():
    with pytest.raises(ValueError, match="not one of snip_hand, snip, arpls, modpoly"):
        background(np.arange(10.0), np.ones(10), "rolling_ball")


def test_a_scan_with_no_peaks_is_one_line():
    tt = np.arange(10.0, 80.0, 0.02)
    rng = np.random.default_rng(1)
    noise = MeasuredPattern(tt, 100 + rng.normal(0, 3, tt.size), 1.5406, "noise.xy")
    with pytest.raises(InputError, match=r"^noise.xy: no peak above the noise: the strongest line stands"):
        to_training_grid(noise, SimulateParams())
    lines = MeasuredPattern(
        tt, noise.intensity + np.interp(tt, _doublet(False)[0], 50 * _doublet(False)[1]), 1.5406, "ok.xy"
    )
    assert to_training_grid(lines, SimulateParams()).max() == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.needs_shared("experimental")
def test_every_real_pattern_has_peaks():
    rows = list(csv.DictReader((EXPERIMENTAL_DIR / "INDEX.csv").read_text().splitlines()))
    sim = SimulateParams()
    for r in rows:
        to_training_grid(read_pattern(EXPERIMENTAL_DIR / r["file"]), sim, default_wavelength=1.5418)


def test_training_grid_strips_kalpha2_of_cu_scans_only():
    """measured.strip_kalpha2: a Cu K-alpha1+2 scan loses its K-alpha2 lines and is read at K-alpha1;
    a scan at another wavelength has no known doublet and is left as it is."""
    from xrdvision.crystal.bragg import CU_KA_AVERAGE

    tt, both = _doublet(True)
    sim = SimulateParams(two_theta_min=10.0, two_theta_max=89.0, step=0.01)
    cu = MeasuredPattern(tt, both + 0.01, CU_KA_AVERAGE, "cu.xy")
    kept = to_training_grid(cu, sim)
    stripped = to_training_grid(cu, sim, strip_ka2=True)
    g = np.round(np.arange(10.0, 89.0 + 1e-9, 0.01), 6)

    def top(y: np.ndarray, at: np.ndarray) -> np.ndarray:  # the highest point within 0.05 degree
        return np.array([y[np.abs(g - a) <= 0.05].max() for a in at])

    d = D_SPACINGS[-2:]
    assert np.all(top(kept, two_theta(d, CU_KA2 * CU_KA1 / CU_KA_AVERAGE)) > 0.2)  # read at the average
    assert np.all(top(stripped, two_theta(d, CU_KA2)) < 0.05)
    assert np.all(top(stripped, two_theta(d, CU_KA1)) > 0.5)  # K-alpha1 where it was simulated
    mo = MeasuredPattern(tt, both + 0.01, 1.5, "other.xy")
    np.testing.assert_array_equal(to_training_grid(mo, sim, strip_ka2=True), to_training_grid(mo, sim))
