"""Augmentation on real peak lists (pymatgen XRDCalculator on real COD CIFs)."""

from __future__ import annotations

import dataclasses
import warnings
import zlib

import numpy as np
import pytest
from pymatgen.io.cif import CifParser

from helpers_patterns import peak_list
from xrdvision.config import AugmentParams, SimulateParams
from xrdvision.crystal.bragg import CU_KA1
from xrdvision.crystal.bragg import two_theta as bragg_two_theta
from xrdvision.data.augment import augment_pattern, augment_peaks, copy_rng, id_key

NONE = AugmentParams(intensity_jitter=0.0, zero_shift=0.0, strain=0.0, fwhm_range=[0.1, 0.1], steps=[0.02])


def _peaks(cod_dir, cod_id: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structure = CifParser(cod_dir / f"{cod_id}.cif").parse_structures(primitive=False)[0]
    return peak_list(structure, CU_KA1, (5.0, 90.0))


@pytest.fixture(scope="module")
def baso4(cod_dir):
    """Barite (BaSO4, Pnma): 161 peaks over 5-90 degrees."""
    return _peaks(cod_dir, "1000037")


@pytest.fixture(scope="module")
def carbon(cod_dir):
    """C in Pm-3m (one atom): 9 well-separated peaks."""
    return _peaks(cod_dir, "2101499")


def test_id_key_is_stable_and_numeric_for_cod_ids():
    assert id_key("1000017") == 1000017
    assert id_key(" 1000017 ") == 1000017
    # A user CIF name: a fixed CRC32, the same in every process (unlike hash()).
    assert id_key("quartz_a") == zlib.crc32(b"quartz_a")
    assert id_key("quartz_a") != id_key("quartz_b")


def test_same_seed_same_copy_is_identical(baso4):
    p, sim = AugmentParams(noise=0.01, background=0.1), SimulateParams()
    g1, y1 = augment_pattern(*baso4, copy_rng(42, "1000037", 1), p, sim)
    g2, y2 = augment_pattern(*baso4, copy_rng(42, "1000037", 1), p, sim)
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(y1, y2)


def test_different_seed_or_copy_or_id_differs(baso4):
    p = AugmentParams()
    base = augment_peaks(*baso4, copy_rng(42, "1000037", 1), p)
    for rng in (copy_rng(43, "1000037", 1), copy_rng(42, "1000037", 2), copy_rng(42, "1000017", 1)):
        tt, amp = augment_peaks(*baso4, rng, p)
        assert not np.allclose(tt, base[0]) or not np.allclose(amp, base[1])


def test_strain_follows_braggs_law(baso4):
    tt0, amp0, d0 = baso4
    p = dataclasses.replace(NONE, strain=0.01)
    for copy in range(1, 6):
        tt, amp = augment_peaks(tt0, amp0, d0, copy_rng(7, "1000037", copy), p)
        assert tt.size == tt0.size
        # One isotropic strain e for every peak: d_new / d_old is the same number, |e| <= 0.01.
        d_new = CU_KA1 / (2 * np.sin(np.radians(tt) / 2))
        ratio = d_new / d0
        e = np.median(ratio) - 1
        assert 0 < abs(e) <= 0.01
        np.testing.assert_allclose(ratio, 1 + e, rtol=2e-6)
        # Positions are Bragg's law at the strained d; the shift grows with angle as 2 e tan(theta).
        np.testing.assert_allclose(tt, bragg_two_theta(d0 * (1 + e)), atol=1e-9)
        shift = tt - tt0
        expected = -2 * e * np.degrees(np.tan(np.radians(tt0) / 2))
        np.testing.assert_allclose(shift, expected, rtol=0.03, atol=1e-4)
        low, high = np.argmin(tt0), np.argmax(tt0)
        assert abs(shift[high]) > 5 * abs(shift[low])
        assert np.all(np.sign(shift) == -np.sign(e))  # expansion moves peaks to lower angle
        np.testing.assert_allclose(amp, amp0)  # no jitter asked for


def test_zero_shift_moves_every_peak_by_the_same_offset(baso4):
    tt0, amp0, d0 = baso4
    p = dataclasses.replace(NONE, zero_shift=0.1)
    offsets = []
    for copy in range(1, 6):
        tt, amp = augment_peaks(tt0, amp0, d0, copy_rng(7, "1000037", copy), p)
        shift = tt - tt0
        np.testing.assert_allclose(shift, shift[0], atol=1e-9)
        assert 0 < abs(shift[0]) <= 0.1
        offsets.append(shift[0])
        np.testing.assert_allclose(amp, amp0)
    assert len(set(np.round(offsets, 9))) == 5


def test_intensity_jitter_keeps_count_and_positions(baso4):
    tt0, amp0, d0 = baso4
    p = dataclasses.replace(NONE, intensity_jitter=0.15)
    tt, amp = augment_peaks(tt0, amp0, d0, copy_rng(7, "1000037", 1), p)
    np.testing.assert_array_equal(tt, tt0)
    assert amp.size == amp0.size and amp.max() == pytest.approx(1.0)
    log_ratio = np.log(amp / amp0)
    # Log-normal with sd 0.15 per peak (the max-1 rescaling only shifts the logs by a constant).
    assert 0.10 < np.std(log_ratio) < 0.20
    assert np.all(amp > 0)


def test_no_amplitudes_means_no_change(baso4):
    tt0, amp0, d0 = baso4
    tt, amp = augment_peaks(tt0, amp0, d0, copy_rng(1, "1000037", 3), NONE)
    np.testing.assert_array_equal(tt, tt0)
    np.testing.assert_allclose(amp, amp0)


def test_d_spacings_recomputed_when_missing(baso4):
    tt0, amp0, d0 = baso4
    p = dataclasses.replace(NONE, strain=0.01)
    a = augment_peaks(tt0, amp0, d0, copy_rng(3, "x", 1), p)
    b = augment_peaks(tt0, amp0, np.zeros(0), copy_rng(3, "x", 1), p)
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)


def test_steps_change_the_grid(carbon):
    sim = SimulateParams()
    for step, n in ((0.01, 8501), (0.02, 4251), (0.04, 2126)):
        g, y = augment_pattern(
            *carbon, copy_rng(0, "2101499", 1), dataclasses.replace(NONE, steps=[step]), sim
        )
        assert g.size == y.size == n
        np.testing.assert_allclose(np.diff(g), step, atol=1e-4)
        assert g[0] == pytest.approx(5.0) and g[-1] == pytest.approx(90.0, abs=1e-3)
    # With several steps each copy draws one; over 30 copies all three appear.
    p = AugmentParams()
    seen = {len(augment_pattern(*carbon, copy_rng(0, "2101499", k), p, sim)[0]) for k in range(1, 31)}
    assert seen == {8501, 4251, 2126}


def test_fwhm_is_drawn_from_the_range(carbon):
    tt0, amp0, d0 = carbon
    sim = SimulateParams(eta=0.0)  # pure Gaussian: the measured width is the FWHM itself
    for width in (0.1, 0.3):
        p = dataclasses.replace(NONE, steps=[0.005], fwhm_range=[width, width])
        g, y = augment_pattern(tt0, amp0, d0, copy_rng(0, "2101499", 1), p, sim)
        top = int(np.argmax(y))
        above = np.flatnonzero(y[max(0, top - 400) : top + 400] >= 0.5)
        assert (above.size - 1) * 0.005 == pytest.approx(width, abs=0.011)
        assert g[top] == pytest.approx(tt0[np.argmax(amp0)], abs=0.005)


def test_background_and_noise(baso4):
    sim = SimulateParams()
    clean_p = dataclasses.replace(NONE, background=0.0, noise=0.0)
    bg_p = dataclasses.replace(NONE, background=0.5, noise=0.0)
    noisy_p = dataclasses.replace(NONE, background=0.0, noise=0.02)
    g, clean = augment_pattern(*baso4, copy_rng(5, "1000037", 2), clean_p, sim)
    _, with_bg = augment_pattern(*baso4, copy_rng(5, "1000037", 2), bg_p, sim)
    _, noisy = augment_pattern(*baso4, copy_rng(5, "1000037", 2), noisy_p, sim)
    for y in (clean, with_bg, noisy):
        assert y.min() >= 0 and y.max() == pytest.approx(1.0)
    # Background: positive everywhere between peaks, decaying from low to high angle.
    floor_low = np.min(with_bg[g < 10])
    floor_high = np.min(with_bg[g > 80])
    assert floor_low > 0.01 and floor_low > floor_high > 0
    assert np.min(clean[g < 10]) < 1e-3
    # Noise: same draws as the clean copy (aligned streams), plus N(0, 0.02) clipped at 0.
    resid = (noisy - clean)[clean > 0.2]  # where clipping at 0 cannot bite
    assert 0.01 < np.std(resid) < 0.03
    assert abs(np.mean(resid)) < 0.015  # the max-1 rescaling scales the noisy copy by ~1 +- 0.02


def test_kalpha2_follows_simulate_settings(carbon):
    p = dataclasses.replace(NONE, steps=[0.005], fwhm_range=[0.05, 0.05])
    g, y1 = augment_pattern(*carbon, copy_rng(0, "c", 1), p, SimulateParams(kalpha2=False))
    _, y2 = augment_pattern(*carbon, copy_rng(0, "c", 1), p, SimulateParams(kalpha2=True))
    high = carbon[0].max()  # the highest-angle peak, where the doublet is split most
    win = (g > high - 0.1) & (g < high + 0.6)
    n_max = [int(np.sum((y[win][1:-1] > y[win][:-2]) & (y[win][1:-1] > y[win][2:]))) for y in (y1, y2)]
    assert n_max == [1, 2]


def test_image_augmentation_is_off_at_zero_and_keeps_the_image_shape():
    """Contrast and rotation (the seed's image-level augmentation) change a rendered copy only when
    asked, keep its shape and its black background, and are reproducible from the copy's generator."""
    from xrdvision.data.augment import augment_image, copy_rng
    from xrdvision.data.render import Renderer

    x = np.linspace(5, 90, 4251)
    y = np.exp(-(((x - 30) / 0.2) ** 2)) + 0.5 * np.exp(-(((x - 60) / 0.2) ** 2))
    rgb = Renderer().render(x, y)
    same = augment_image(rgb, copy_rng(42, "1000004", 1), 0.0, 0.0)
    np.testing.assert_array_equal(same, rgb)
    a = augment_image(rgb, copy_rng(42, "1000004", 1), 0.3, 3.0)
    b = augment_image(rgb, copy_rng(42, "1000004", 1), 0.3, 3.0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == rgb.shape and a.dtype == np.uint8 and not np.array_equal(a, rgb)
    assert a[0, 0].tolist() == [0, 0, 0]
    dimmer = augment_image(rgb, np.random.default_rng(0), 0.5, 0.0)
    assert dimmer.max() != rgb.max() or not np.array_equal(dimmer, rgb)
