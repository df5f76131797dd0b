"""What measured patterns look like: line fits (width, K-alpha2), the Caglioti law, noise, background,
the training draws beside them, and the measure_scans stage on synthetic and on real files."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import EXPERIMENTAL_DIR
from xrdvision.config import Params
from xrdvision.crystal.profile import profile_pattern
from xrdvision.serve import peak_fit
from xrdvision.serve.measured_stats import (
    ANGLES,
    QUANTITIES,
    measure_scan,
    run_measure_scans,
    training_draws,
)

U, V, W = 0.02, -0.01, 0.004  # a typical lab diffractometer (degrees^2)
LINES = (18.3, 24.7, 31.2, 36.9, 44.8, 52.1, 59.4, 65.0, 73.3, 81.6, 87.2)


def synthetic(
    kalpha2: bool = True, noise: float = 0.002, background: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Lines at ``LINES`` whose widths follow U, V, W, each as the project's own profile (with its
    K-alpha2 from the same code), on a decaying background with Gaussian noise; maximum ~1."""
    tt = np.round(np.arange(5.0, 90.0, 0.01), 4)
    y = np.zeros_like(tt)
    rng = np.random.default_rng(seed)
    heights = rng.uniform(0.3, 1.0, len(LINES))
    for at, h in zip(LINES, heights, strict=True):
        fwhm = float(peak_fit.caglioti_fwhm(np.array([at]), U, V, W)[0])
        y += h * profile_pattern(np.array([at]), np.array([1.0]), tt, fwhm, 0.5, kalpha2=kalpha2)
    y /= y.max()
    y += background * np.exp(-(tt - 5) / 30) + rng.normal(0, noise, tt.size)
    return tt, y


def _write_xy(path: Path, tt: np.ndarray, y: np.ndarray) -> Path:
    np.savetxt(path, np.column_stack([tt, np.clip(y, 0, None) * 10000]), fmt="%.4f", header="Cu K-alpha")
    return path


def test_noise_sigma_of_white_noise_on_a_slope():
    rng = np.random.default_rng(1)
    y = np.linspace(100, 50, 5000) + rng.normal(0, 2.0, 5000)
    assert peak_fit.noise_sigma(y) == pytest.approx(2.0, rel=0.08)


def test_kalpha2_position_is_braggs_law():
    # Cu K-alpha1/K-alpha2 split: 0.05 degrees at 20 deg 2-theta, about 0.25 at 80 (textbook values)
    sep = peak_fit.kalpha2_position(np.array([20.0, 80.0])) - np.array([20.0, 80.0])
    assert sep[0] == pytest.approx(0.05, abs=0.01) and sep[1] == pytest.approx(0.24, abs=0.02)


@pytest.mark.parametrize("kalpha2", [True, False])
def test_line_fits_recover_width_and_kalpha2_ratio(kalpha2):
    tt, y = synthetic(kalpha2=kalpha2, background=0.0)
    fits, ratio = peak_fit.fit_peaks(tt, y, peak_fit.noise_sigma(y))
    assert len(fits) >= 8
    if kalpha2:
        assert ratio == pytest.approx(0.5, abs=0.05)
    else:
        assert not ratio > 0.1  # NaN (nothing resolved) or about 0
    for f in fits:
        true = float(peak_fit.caglioti_fwhm(np.array([f.two_theta]), U, V, W)[0])
        assert f.fwhm == pytest.approx(true, rel=0.15), f


def test_caglioti_fit_recovers_the_law_and_never_dips_below_zero():
    at = np.array(LINES)
    widths = peak_fit.caglioti_fwhm(at, U, V, W)
    u, v, w = peak_fit.fit_caglioti(at, widths)
    np.testing.assert_allclose(
        peak_fit.caglioti_fwhm(np.array(ANGLES), u, v, w),
        peak_fit.caglioti_fwhm(np.array(ANGLES), U, V, W),
        rtol=0.03,
    )
    assert v >= -2 * math.sqrt(u * w) - 1e-12  # FWHM^2 >= 0 at every angle
    assert all(math.isnan(x) for x in peak_fit.fit_caglioti(at[:3], widths[:3]))  # too few lines


def test_scherrer_width():
    # 100 nm at 2-theta 40: 0.9 * 1.5406 / (1000 A * cos 20 deg) rad = 0.0845 degrees
    assert float(peak_fit.scherrer_fwhm(np.array([40.0]), 1000.0)[0]) == pytest.approx(0.0845, abs=5e-4)


def test_measure_scan_on_a_synthetic_file(tmp_path):
    tt, y = synthetic(noise=0.003, background=0.05)
    st = measure_scan(_write_xy(tmp_path / "syn.xy", tt, y), "lab/syn.xy", "cubic")
    assert not st.error and st.source == "lab" and st.n_points == tt.size
    assert st.step == pytest.approx(0.01) and st.two_theta_min == pytest.approx(5.0)
    assert st.kalpha2_ratio == pytest.approx(0.5, abs=0.06)
    for a in ANGLES:
        true = float(peak_fit.caglioti_fwhm(np.array([a]), U, V, W)[0])
        assert getattr(st, f"fwhm_{a:.0f}") == pytest.approx(true, rel=0.2), a
    assert st.noise == pytest.approx(0.003, rel=0.3)
    assert 0.005 < st.background_level < 0.05
    assert st.hump < 0.005  # a decaying background is no hump


def test_measure_scan_names_an_unreadable_file(tmp_path):
    bad = tmp_path / "bad.xy"
    bad.write_text("10 1\n")
    st = measure_scan(bad, "bad.xy")
    assert st.error.startswith(str(bad)) and st.n_peaks == 0


def test_training_draws_follow_the_conditions():
    p = Params()
    t = training_draws(p.conditions, p.pattern, 2000, 0)
    assert set(QUANTITIES) <= set(t)
    assert float(np.mean(t["kalpha2_ratio"] > 0)) == pytest.approx(p.conditions.kalpha2, abs=0.04)
    assert t["background_level"].max() <= p.conditions.background + p.conditions.hump
    assert t["hump"].max() <= p.conditions.hump + p.conditions.background
    # widest: U, W at their tops, V at 0, the smallest crystallites
    top = math.sqrt(
        float(
            peak_fit.caglioti_fwhm(
                np.array([80.0]), p.conditions.caglioti_u[1], 0, p.conditions.caglioti_w[1]
            )[0]
        )
        ** 2
        + float(peak_fit.scherrer_fwhm(np.array([80.0]), 10 * p.conditions.crystallite_nm[0])[0]) ** 2
    )
    assert t["fwhm_80"].max() <= top + 1e-9
    wider = dataclasses.replace(p.conditions, crystallite_nm=[5.0, 6.0])
    assert np.median(training_draws(wider, p.pattern, 500, 0)["fwhm_40"]) > np.median(t["fwhm_40"])


def test_stage_without_the_folder_writes_the_training_side(tmp_path):
    p = Params()
    p = dataclasses.replace(p, measured=dataclasses.replace(p.measured, folder=str(tmp_path / "absent")))
    m = run_measure_scans(p, tmp_path / "m.json", tmp_path / "plots", None)
    assert m["skipped"] and "does not exist" in m["reason"]
    assert json.loads((tmp_path / "m.json").read_text())["skipped"] is True
    rows = list(csv.DictReader((tmp_path / "plots" / "quantiles_fwhm_40.csv").read_text().splitlines()))
    assert rows and rows[0]["training"] and rows[0]["rruff_agi"] == ""
    assert (tmp_path / "plots" / "fwhm_training.csv").stat().st_size > 1000


@pytest.mark.needs_shared("experimental")
def test_stage_on_real_files(tmp_path):
    """Three real patterns (RRUFF, RockJock with its background, raw Empyrean counts) through the stage:
    widths in the range such instruments give, K-alpha2 found (none of them is monochromated)."""
    files = ["rruff_agi/rruff_agi_0159_sg173.xy", "rockjock/rockjock_rutile.xy", "other/RbNb2O5F_pxrd.xy"]
    folder = tmp_path / "exp"
    for f in files:
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        (folder / f).write_bytes((EXPERIMENTAL_DIR / f).read_bytes())
    (folder / "INDEX.csv").write_text(
        "file,crystal_system,space_group\n" + "".join(f"{f},x,227\n" for f in files)
    )
    p = Params()
    p = dataclasses.replace(p, measured=dataclasses.replace(p.measured, folder=str(folder)))
    cache = tmp_path / "cache" / "measure.json"
    m = run_measure_scans(p, tmp_path / "m.json", tmp_path / "plots", cache)
    assert not m["skipped"] and m["n_patterns"] == 3 and m["n_failed"] == 0
    rows = {r["file"]: r for r in csv.DictReader((tmp_path / "plots" / "scans.csv").read_text().splitlines())}
    for f in files:
        r = rows[f]
        assert 0.03 < float(r["fwhm_40"]) < 0.3, r
        assert 0.35 < float(r["kalpha2_ratio"]) < 0.6, r
    assert float(rows[files[1]]["two_theta_max"]) == pytest.approx(65.0)
    assert float(rows[files[2]]["step"]) == pytest.approx(0.0131, abs=1e-4)
    # the pyrochlore states its refined cell: Fd-3m lines give its zero offset (Empyrean, -0.05 degree)
    assert -0.1 < float(rows[files[2]]["zero_offset"]) < 0
    assert float(rows[files[2]]["cell_a"]) == pytest.approx(10.4956, abs=0.01)

    # a second run takes each pattern's figures from the cache (shown by a planted value) ...
    kept = json.loads(cache.read_text())
    assert len(kept) == 3
    planted = next(k for k in kept if k.startswith(files[0] + "|"))
    kept[planted]["fwhm_40"] = 9.99
    cache.write_text(json.dumps(kept))
    again = run_measure_scans(p, tmp_path / "m2.json", tmp_path / "plots2", cache)
    rows2 = {
        r["file"]: r for r in csv.DictReader((tmp_path / "plots2" / "scans.csv").read_text().splitlines())
    }
    assert float(rows2[files[0]]["fwhm_40"]) == 9.99 and rows2[files[1]] == rows[files[1]]
    assert again["n_peaks_fitted"] == m["n_peaks_fitted"]
    # ... and measures a file again once its bytes change
    with open(folder / files[0], "a") as fh:
        fh.write("# appended comment\n")
    run_measure_scans(p, tmp_path / "m3.json", tmp_path / "plots3", cache)
    rows3 = {
        r["file"]: r for r in csv.DictReader((tmp_path / "plots3" / "scans.csv").read_text().splitlines())
    }
    assert rows3[files[0]]["fwhm_40"] == rows[files[0]]["fwhm_40"]


def test_allowed_reflections_of_each_centring():
    from xrdvision.serve.zero_offset import allowed_n

    assert allowed_n("F", 20).tolist() == [3, 4, 8, 11, 12, 16, 19, 20]
    assert allowed_n("I", 14).tolist() == [2, 4, 6, 8, 10, 12, 14]
    assert allowed_n("P", 9).tolist() == [1, 2, 3, 4, 5, 6, 8, 9]  # 7 is no sum of three squares


def test_zero_offset_of_a_cubic_phase_apart_from_its_cell():
    from xrdvision.crystal.bragg import two_theta
    from xrdvision.serve.zero_offset import fit_zero_offset, header_cell

    ns = np.array([3, 4, 8, 11, 12, 16, 19])  # rock salt, a = 5.66 (1 % off the seed), offset +0.05
    lines = two_theta(5.66 / np.sqrt(ns)) + 0.05
    zero, a, used = fit_zero_offset(lines, 5.64, "F")
    assert zero == pytest.approx(0.05, abs=1e-4) and a == pytest.approx(5.66, abs=1e-4) and used == 7
    assert math.isnan(fit_zero_offset(lines[:2], 5.64, "F")[0])  # two lines: not determined
    assert header_cell("# Rietveld (FullProf, in source): cubic Fd-3m (227), a = 10.47740 A") == 10.4774
    assert header_cell("# a comment") is None
