"""Measured patterns: parsing real files from ../shared/experimental, the ways people write such files,
bad files, and the conversion onto the training grid (Bragg's law, background, normalisation)."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import EXPERIMENTAL_DIR
from xrdvision.config import SimulateParams
from xrdvision.crystal.bragg import CU_KA1, convert_wavelength
from xrdvision.crystal.profile import grid
from xrdvision.errors import InputError
from xrdvision.formats.scans import MIN_POINTS, measured_range, read_pattern
from xrdvision.serve.preprocess import snip_background, source_wavelength, to_training_grid

SIM = SimulateParams()
GRID = grid(SIM.two_theta_min, SIM.two_theta_max, SIM.step)
RRUFF = EXPERIMENTAL_DIR / "rruff_agi" / "rruff_agi_0016_sg225.xy"  # cubic, Fm-3m
PYRITE = EXPERIMENTAL_DIR / "rockjock" / "rockjock_pyrite.xy"  # background kept, 5-65 deg
PYROCHLORE = EXPERIMENTAL_DIR / "other" / "RbNb2O5F_pxrd.xy"  # raw counts, high background, 5-120 deg


def _index() -> list[dict[str, str]]:
    with open(EXPERIMENTAL_DIR / "INDEX.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _data(path: Path) -> np.ndarray:
    return np.loadtxt(path)


@pytest.mark.needs_shared("experimental")
def test_every_experimental_file_parses_as_indexed():
    """All 444 real files: point count and 2-theta span as INDEX.csv states, Cu K-alpha from the header."""
    rows = _index()
    assert len(rows) == 444
    for row in rows:
        p = read_pattern(EXPERIMENTAL_DIR / row["file"])
        assert p.two_theta.size == int(row["n_points"]), row["file"]
        assert np.all(np.diff(p.two_theta) > 0) and p.intensity.min() >= 0
        lo, hi = float(row["two_theta_min"]), float(row["two_theta_max"])
        if row["file"].startswith("rruff_agi/"):
            # the file runs 5.00-89.99; INDEX gives the part with data (zero runs = not measured)
            assert p.two_theta[0] == pytest.approx(5.0) and p.two_theta[-1] == pytest.approx(89.99)
            assert measured_range(p) == pytest.approx((lo, hi), abs=0.006), row["file"]
        else:
            assert (p.two_theta[0], p.two_theta[-1]) == pytest.approx((lo, hi), abs=1e-4), row["file"]
        # the headers say "Cu K-alpha" (RRUFF, RockJock) or "Cu K-alpha1+2" (pyrochlores): the average
        assert p.wavelength == pytest.approx(float(row["wavelength_A"])) and p.wavelength_from == "file"


@pytest.mark.needs_shared("experimental")
def test_rruff_style_file_with_header_wavelength_decreasing_and_duplicates(tmp_path):
    """RRUFF download layout: ``##KEY=value`` header, ``x, y`` lines, ``##END=``; here written backwards
    with repeated points. The result is the original pattern, ascending, with the file's wavelength."""
    ref = _data(RRUFF)
    lines = ["##NAMES=Test mineral", "##RRUFFID=R000000", "##X-RAY WAVELENGTH=1.541838", "##STATUS=ok"]
    body = [f"{x:.4f}, {y:.1f}" for x, y in ref[::-1]]
    body[100:100] = [body[100]] * 3  # the same point four times
    path = tmp_path / "Test__R000000-9__Powder__Xray_Data_XY_Processed__1.txt"
    path.write_text("\n".join([*lines, *body, "##END="]) + "\n")
    p = read_pattern(path)
    assert p.wavelength == pytest.approx(1.541838) and p.wavelength_from == "file"
    np.testing.assert_allclose(p.two_theta, ref[:, 0], atol=1e-9)
    np.testing.assert_allclose(p.intensity, ref[:, 1], atol=1e-9)
    assert "2-theta sorted ascending" in p.notes and "3 repeated 2-theta point(s) averaged" in p.notes


@pytest.mark.needs_shared("experimental")
def test_explicit_wavelength_overrides_the_header(tmp_path):
    p = read_pattern(PYRITE, wavelength=1.7902)
    assert p.wavelength == 1.7902 and p.wavelength_from == "argument"


@pytest.mark.parametrize(
    ("name", "header", "fmt"),
    [
        ("comma.csv", ["2Theta,Intensity"], "{x:.4f},{y:.0f}"),
        ("semicolon_decimal_comma.csv", ["; exported by some software", "Angle;Counts"], "{xc};{yc}"),
        ("tabs_extra_columns.xye", ["! Cu K-alpha1", "# 2theta\tI\tesd"], "{x:.4f}\t{y:.0f}\t{e:.2f}"),
        ("spaces_inline_comments.dat", ["% a comment", "   "], "  {x:.4f}   {y:.0f}   # point"),
        ("tab_decimal_comma.txt", ["Winkel\tIntensitaet"], "{xc}\t{yc}"),
    ],
)
@pytest.mark.needs_shared("experimental")
def test_separators_comments_and_headers(tmp_path, name, header, fmt):
    """The same real pattern written five common ways reads back identically."""
    ref = _data(PYRITE)
    body = [
        fmt.format(
            x=x,
            y=y,
            e=np.sqrt(y),
            xc=f"{x:.4f}".replace(".", ","),
            yc=f"{y:.1f}".replace(".", ","),
        )
        for x, y in ref
    ]
    path = tmp_path / name
    path.write_text("\n".join([*header, *body]) + "\n", encoding="utf-8")
    p = read_pattern(path)
    np.testing.assert_allclose(p.two_theta, ref[:, 0], atol=1e-9)
    np.testing.assert_allclose(p.intensity, ref[:, 1], atol=1e-9)
    if name.startswith("tabs"):
        assert p.wavelength == CU_KA1  # "Cu K-alpha1" names the anode and line
    else:
        assert p.wavelength is None


@pytest.mark.needs_shared("experimental")
def test_slightly_negative_intensities_are_clipped_and_noted(tmp_path):
    """A background-subtracted file scatters around zero: small negatives are noise, clipped to 0."""
    ref = _data(RRUFF)
    ref[:, 1] -= 5.0  # the baseline (0-40 of 1000) partly goes negative, by 0.5 % of the maximum at most
    path = tmp_path / "subtracted.xy"
    np.savetxt(path, ref)
    p = read_pattern(path)
    n_neg = int((ref[:, 1] < 0).sum())
    assert n_neg > 100 and p.intensity.min() == 0.0
    assert f"{n_neg} slightly negative intensities clipped to 0" in p.notes
    positive = ref[:, 1] > 0
    np.testing.assert_allclose(p.intensity[positive], ref[positive, 1])


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _pairs(n: int, start: float = 10.0, y: str = "{i}") -> str:
    return "\n".join(f"{start + 0.02 * i:.2f} {y.format(i=i)}" for i in range(n)) + "\n"


BAD_FILES = [
    ("empty.xy", "", "empty file"),
    ("blank.xy", "\n   \n\t\n", "empty file"),
    ("header_only.xy", "# 2theta intensity\n# nothing measured\n", "no numeric data lines"),
    ("one_column.xy", "\n".join(str(10 + 0.02 * i) for i in range(200)) + "\n", "one column only"),
    ("one_column_row.xy", _pairs(100) + "12.5\n" + _pairs(100, 20), "line 101: one column"),
    ("text_in_numbers.xy", _pairs(100) + "12.00 abc\n" + _pairs(100, 20), "line 101: 'abc' is not a number"),
    ("text_between.xy", _pairs(100) + "intermission\n" + _pairs(100, 20), "line 101: text among the numbers"),
    ("nan.xy", _pairs(100).replace("10.20 10", "10.20 nan"), "1 non-finite value(s)"),
    ("mostly_negative.xy", _pairs(200, y="5").replace(" ", " -", 150), "150 of 200 intensities are negative"),
    ("deep_negative.xy", _pairs(200, y="{i}").replace(" 3\n", " -90\n"), "negative intensities down to -90"),
    ("zero.xy", _pairs(200, y="0"), "no positive intensities"),
    ("few_points.xy", _pairs(MIN_POINTS - 1), f"only {MIN_POINTS - 1} points"),
    ("not_angles.xy", _pairs(200, start=178.0), "not angles in (0, 180) degrees"),
    ("binary.xy", bytes(range(256)) * 20, "binary file"),
    ("scan.raw", b"RAW1.01\x00\x00\x01" * 100, "Bruker/Rigaku RAW is a binary format"),
    ("pattern.xlsx", "10 1\n", "unknown format (.xlsx)"),
    (
        "nm_wavelength.xy",
        "# Wavelength (A): 154.06\n" + _pairs(200),
        "header wavelength 154.06 is not in Angstrom",
    ),
]


@pytest.mark.parametrize(("name", "content", "reason"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, name, content, reason):
    path = _write(tmp_path / name, content)
    with pytest.raises(InputError) as info:
        read_pattern(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert reason in message, message


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InputError, match=r"nope\.xy: file not found"):
        read_pattern(tmp_path / "nope.xy")
    (tmp_path / "dir.xy").mkdir()
    with pytest.raises(InputError, match=r"dir\.xy: is a folder"):
        read_pattern(tmp_path / "dir.xy")


@pytest.mark.needs_shared("experimental")
def test_training_grid_shape_range_and_zero_outside_the_measured_span():
    y = to_training_grid(read_pattern(PYRITE), SIM)
    assert y.dtype == np.float32 and y.shape == GRID.shape
    assert y.max() == pytest.approx(1.0) and y.min() >= 0
    beyond = GRID > 65.05  # RockJock stops at 65 degrees (65.04 after the 1.5418 -> 1.5406 shift)
    assert np.all(y[beyond] == 0) and y[(GRID > 20) & (GRID < 64)].max() > 0.05
    # RRUFF zero padding at the ends is "not measured": nothing below the first measured angle
    rr = read_pattern(RRUFF)
    lo, _ = measured_range(rr)
    y_rr = to_training_grid(rr, SIM)
    assert np.all(y_rr[lo - 0.05 > GRID] == 0)


def _strongest(y: np.ndarray, lo: float = 0, hi: float = 180) -> float:
    mask = (lo <= GRID) & (hi >= GRID)
    return float(GRID[mask][np.argmax(y[mask])])


@pytest.mark.parametrize("wavelength", [1.7902, 0.7107, 2.2909])
@pytest.mark.needs_shared("experimental")
def test_other_wavelength_moves_peaks_by_bragg(wavelength):
    """Pyrite read as if measured at Co, Mo or Cr: its strongest line lands where Bragg's law puts the
    same d-spacing at 1.5406 A, within one grid step, and nothing is left where it was measured."""
    p = read_pattern(PYRITE, wavelength=wavelength)
    # the strongest line that exists at 1.5406 A inside 6-89 degrees (Mo: only lines below ~38 deg)
    usable = (
        np.isfinite(tt := convert_wavelength(p.two_theta, wavelength, SIM.wavelength)) & (tt > 6) & (tt < 89)
    )
    measured = float(p.two_theta[usable][np.argmax(p.intensity[usable])])
    expected = float(convert_wavelength(np.array([measured]), wavelength, SIM.wavelength)[0])
    assert abs(expected - measured) > 5.0 and SIM.two_theta_min < expected < SIM.two_theta_max
    y = to_training_grid(p, SIM)
    assert _strongest(y, expected - 0.5, expected + 0.5) == pytest.approx(expected, abs=SIM.step * 1.01)
    assert y[np.abs(GRID - measured) < 0.5].max() < 0.2  # nothing left where it was measured
    # the file's own Cu K-alpha average moves it only slightly, to the K-alpha1 position
    cu = to_training_grid(read_pattern(PYRITE), SIM)
    shift = measured - float(convert_wavelength(np.array([measured]), 1.5418, CU_KA1)[0])
    assert shift > SIM.step  # more than one grid step, so the check below can tell
    assert _strongest(cu, measured - 0.5, measured + 0.5) == pytest.approx(
        measured - shift, abs=SIM.step * 1.01
    )


def test_convert_wavelength_is_bragg():
    d = np.array([3.0, 2.0, 1.2])
    tt_cu = 2 * np.degrees(np.arcsin(CU_KA1 / (2 * d)))
    tt_mo = 2 * np.degrees(np.arcsin(0.7107 / (2 * d)))
    np.testing.assert_allclose(convert_wavelength(tt_mo, 0.7107, CU_KA1), tt_cu, atol=1e-9)
    back = convert_wavelength(tt_cu, CU_KA1, 0.7107)
    np.testing.assert_allclose(back, tt_mo, atol=1e-9)
    # Mo 80 deg has no Cu counterpart (sin theta > 1)
    assert np.isnan(convert_wavelength(np.array([80.0]), 0.7107, CU_KA1)[0])


@pytest.mark.parametrize(("offset", "where"), [(95.0, "100.0"), (78.0, "83.0")])
@pytest.mark.needs_shared("experimental")
def test_pattern_outside_the_training_range_is_an_error(tmp_path, offset, where):
    """100-160 degrees does not overlap 5-90 at all; 83-143 only by 7 degrees (too little to classify)."""
    ref = _data(PYRITE)
    ref[:, 0] += offset
    path = tmp_path / "high_angle.xy"
    np.savetxt(path, ref)
    p = read_pattern(path)
    with pytest.raises(InputError) as info:
        to_training_grid(p, SIM)
    message = str(info.value)
    assert message.startswith(f"{path}: 2-theta range {where}")
    assert message.endswith("overlaps the training range 5-90 by less than 10 degrees")


def test_explicit_units_in_the_header_are_converted(tmp_path):
    path = tmp_path / "nm.xy"
    path.write_text("# Wavelength = 0.179026 nm\n" + _pairs(200))
    assert read_pattern(path).wavelength == pytest.approx(1.79026)


@pytest.mark.needs_shared("experimental")
def test_background_removed_lowers_the_baseline_and_keeps_the_peaks():
    """The pyrochlore raw counts sit on a background of ~3 % of the strongest line: after SNIP the
    median of the pattern is near zero, and the strongest lines keep their heights relative to each
    other (measured in the raw data above the local minimum within 1.5 degrees)."""
    from scipy.signal import find_peaks

    p = read_pattern(PYROCHLORE)
    raw = np.interp(GRID, p.two_theta, p.intensity)
    raw = raw / raw.max()
    y = to_training_grid(p, SIM)
    assert np.median(raw) > 0.025 and np.median(y) < 0.005
    peaks, _ = find_peaks(y, height=0.1, distance=50)
    peaks = peaks[np.argsort(-y[peaks])][:6]
    assert len(peaks) == 6

    def net_raw(i: int) -> float:
        near = np.abs(GRID - GRID[i]) <= 0.1
        local = np.abs(GRID - GRID[i]) <= 1.5
        return float(raw[near].max() - raw[local].min())

    ratios_raw = np.array([net_raw(i) for i in peaks]) / net_raw(peaks[0])
    np.testing.assert_allclose(y[peaks], ratios_raw, rtol=0.1, atol=0.02)
    # without background subtraction the baseline stays
    assert np.median(to_training_grid(p, SIM, background=False)) > 0.025


def test_snip_recovers_a_smooth_background_under_peaks():
    """A low-angle decay plus a sloping floor under four sharp lines: SNIP finds the background to
    0.2 % of the strongest line without noise, and within a fraction of the noise with Poisson counts."""
    x = np.arange(5, 90, 0.02)
    bg = 200 * np.exp(-(x - 5) / 8) + 50 + 0.3 * x
    lines = [(20, 1000), (35, 400), (36, 700), (60, 300)]
    peaks = sum(a * np.exp(-0.5 * ((x - c) / 0.05) ** 2) for c, a in lines)
    est = snip_background(bg + peaks, half_width=round(2.0 / 0.02))
    assert np.max(np.abs(est - bg)) < 2.0
    counts = np.random.default_rng(0).poisson(bg + peaks).astype(float)
    est = snip_background(counts, half_width=round(2.0 / 0.02), smooth=10)
    far = np.abs(x[:, None] - np.array([c for c, _ in lines])[None, :]).min(axis=1) > 0.5
    sigma = np.sqrt(bg)  # 8-16 counts
    assert np.all(np.abs(est - bg)[far] < 1.5 * sigma[far])
    # SNIP sits on the lower envelope of the noise; smoothing first halves that bias
    bias = abs(np.mean((est - bg)[far]))
    rough = snip_background(counts, half_width=round(2.0 / 0.02), smooth=1)
    assert bias < 0.8 * np.mean(sigma) and bias < 0.5 * abs(np.mean((rough - bg)[far]))
    net = counts - est
    for c, a in lines:
        assert net[np.argmin(np.abs(x - c))] == pytest.approx(a, abs=4 * np.sqrt(a + 250))


@pytest.mark.needs_shared("experimental")
def test_kalpha12_data_against_a_kalpha2_simulation_needs_no_shift():
    p = read_pattern(PYROCHLORE)
    assert source_wavelength(p, SIM) == pytest.approx(1.5418)
    assert source_wavelength(p, replace(SIM, kalpha2=True)) == CU_KA1
    assert source_wavelength(replace(p, wavelength=None), SIM, default=None) == SIM.wavelength
