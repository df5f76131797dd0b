"""Measured-like 1-D patterns drawn from peak lists: the physics of each condition, checked on its own."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from xrdvision.config import Params, parse_params
from xrdvision.crystal.bragg import CU_KA2, d_spacing, two_theta
from xrdvision.data import measurement as M

P = Params()
X = M.grid(P.pattern)


def one_line(tt: float, h: float = 1.0, normal=None) -> M.Lines:
    return M.Lines(np.array([0]), np.array([tt]), np.array([h]), normal)


def fwhm_of(y: np.ndarray, x: np.ndarray) -> float:
    above = x[y >= y.max() / 2]
    return float(above[-1] - above[0])


def test_grid_is_the_issue_resolution_and_scaling_lifts_weak_lines():
    assert X[0] == 5.0 and X[-1] == pytest.approx(90.0) and X.size == 8501
    y = np.array([0.0, 0.01, 1.0])
    np.testing.assert_allclose(M.scale_intensity(y, "sqrt"), [0, 0.1, 1])
    assert M.scale_intensity(y, "log")[1] > 0.3 and M.scale_intensity(y, "linear")[1] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="unknown intensity scale"):
        M.scale_intensity(y, "cube")


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_a_rendered_line_has_its_width_its_centroid_and_unit_area(eta):
    """Off-grid position (33.337 deg), FWHM 0.15 deg: the profile's half-maximum width, centroid and
    sum over the grid (the line's intensity: profiles are area-normalised) come out as asked, for
    Gaussian, pseudo-Voigt and Lorentzian lines (a Lorentzian's far tails leave the grid)."""
    y = M.render(one_line(33.337), 1, X, np.array([[0.15]]), np.array([eta]))[0].astype(np.float64)
    assert fwhm_of(y, X) == pytest.approx(0.15, abs=0.012)
    near = np.abs(X - 33.337) < 0.5
    assert np.sum(X[near] * y[near]) / np.sum(y[near]) == pytest.approx(33.337, abs=2e-3)
    assert np.sum(y) == pytest.approx(1.0, abs=0.03)


def test_line_widths_follow_caglioti_and_scherrer():
    w = M.line_fwhm(np.array([30.0]), 0.0, 0.0, 0.01, 1e9, 1.5406)  # W only: 0.1 deg everywhere
    assert w[0] == pytest.approx(0.1, rel=1e-3)
    big = M.line_fwhm(np.array([30.0, 80.0]), 0.0, 0.0, 0.0, 20.0, 1.5406)  # 20 nm crystallites
    theta = np.radians([15.0, 40.0])
    np.testing.assert_allclose(big, np.degrees(0.9 * 1.5406 / (200.0 * np.cos(theta))), rtol=1e-6)
    assert big[1] > big[0]  # size broadening grows with 2-theta


def test_march_dollase_leaves_a_random_powder_alone_and_favours_the_axis_for_plates():
    cos = np.array([1.0, 0.0])
    np.testing.assert_allclose(M.march_dollase(cos, np.ones(2)), 1.0)
    plate = M.march_dollase(cos, np.full(2, 0.6))
    assert plate[0] > 1 > plate[1]


def test_conditions_put_the_k_alpha2_line_where_braggs_law_says():
    cond = dataclasses.replace(
        P.conditions,
        kalpha2=1.0,
        zero_shift=0.0,
        displacement=0.0,
        intensity_jitter=0.0,
        preferred_orientation=0.0,
        background=0.0,
        hump=0.0,
        noise=[0.0, 0.0],
        poisson=0.0,
        impurity=0.0,
        range_cut=0.0,
        caglioti_u=[0.0, 0.0],
        caglioti_v=[0.0, 0.0],
        caglioti_w=[0.0004, 0.0004],
        crystallite_nm=[1e4, 1e4],
        eta=[0.0, 0.0],
    )
    y = M.measured_like(one_line(80.0), None, 1, X, cond, np.random.default_rng(0))[0]
    expected = float(two_theta(d_spacing(80.0), CU_KA2))
    second = (X > 80.1) & (X < 80.5)
    assert X[second][np.argmax(y[second])] == pytest.approx(expected, abs=0.011)
    first = (X > 79.85) & (X < 80.1)
    assert y[second].sum() / y[first].sum() == pytest.approx(0.5, abs=0.03)  # half the K-alpha1 line


def test_drawn_patterns_are_finite_reproducible_and_vary_between_draws():
    rng_lines = np.random.default_rng(3)
    n = 6
    counts = rng_lines.integers(5, 40, n)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    tt = rng_lines.uniform(6, 89, offsets[-1])
    inten = rng_lines.uniform(0.01, 1, offsets[-1])
    normal = rng_lines.normal(size=(offsets[-1], 3))
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    lines = M.gather(offsets, tt, inten, normal, np.arange(n))
    imp = M.gather(offsets, tt, inten, normal, np.arange(n)[::-1])
    a = M.measured_like(lines, imp, n, X, P.conditions, np.random.default_rng(1))
    b = M.measured_like(lines, imp, n, X, P.conditions, np.random.default_rng(1))
    c = M.measured_like(lines, imp, n, X, P.conditions, np.random.default_rng(2))
    assert a.shape == (n, X.size) and np.isfinite(a).all() and (a >= 0).all()
    np.testing.assert_allclose(a.max(axis=1), 1.0)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.05


def test_a_range_cut_leaves_zeros_beyond_the_end_of_the_scan():
    cond = dataclasses.replace(P.conditions, range_cut=1.0, range_min=50.0)
    lines = M.gather(np.array([0, 3]), np.array([20.0, 60.0, 85.0]), np.ones(3), None, np.array([0]))
    y = M.measured_like(lines, None, 1, X, cond, np.random.default_rng(5))[0]
    stop = np.flatnonzero(y > 0)[-1] + 1  # the zero tail of the scan starts here
    assert stop < X.size and X[stop] >= 50.0


def test_impossible_condition_ranges_are_one_line_naming_the_key():
    with pytest.raises(Exception, match=r"conditions\.eta"):
        parse_params({"conditions": {"eta": [0.9, 0.2]}})
    with pytest.raises(Exception, match=r"pattern\.step"):
        parse_params({"pattern": {"step": 0.05}})
    with pytest.raises(Exception, match=r"model\.kind"):
        parse_params({"model": {"kind": "resnet50"}})
