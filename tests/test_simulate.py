"""Simulation on real COD CIFs: physics against xrayutilities and pymatgen, and the batch stage."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import xrayutilities as xu
from pymatgen.analysis.diffraction.xrd import XRDCalculator

import xrdvision.data.simulate as simulate
from xrdvision.config import LabelsParams, Params, SimulateParams
from xrdvision.crystal.bragg import CU_KA2
from xrdvision.crystal.diffraction import merge_lines, simulate_peaks
from xrdvision.crystal.labels import read_structure
from xrdvision.crystal.profile import grid, profile_pattern
from xrdvision.data.pool import TaskFailure
from xrdvision.data.simulate import (
    NO_REFLECTIONS,
    reason_group,
    run_simulate,
    simulate_file,
    summary_line,
)
from xrdvision.errors import InputError
from xrdvision.formats.patterns import MANIFEST_COLUMNS

# Various systems: NaCl, Si, alpha-Fe (cubic); corundum, quartz (trigonal); graphite-like C (hexagonal);
# aragonite-like CaCO3 (orthorhombic); organic P2_1/c and Hg complex (monoclinic); two organic P-1.
PHYSICS_IDS = [
    "1000041",
    "4104917",
    "1100108",
    "1000017",
    "5000035",
    "1200017",
    "3000000",
    "1000000",
    "2003136",
    "2007325",
    "7238658",
]
BATCH_IDS = ["1000017", "1000041", "5000035", "1004008", "1100163", "9008901", "2007325", "1000023"]
BAD_IDS = ["1000002", "1000451"]
SLOW_ID = "2104374"  # 6400 sites: ~3 s to parse, it was over 60 s with stock xrayutilities


def _merged(two_theta: np.ndarray, intensity: np.ndarray, tol: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Lines closer than ``tol`` as one (both calculators split pseudo-equivalent lines differently;
    at a 0.1 degree peak width they are one peak), normalised to max 1."""
    tt, inten, _ = merge_lines(
        np.asarray(two_theta, float), np.asarray(intensity, float), np.zeros((len(two_theta), 3), int), tol
    )
    return tt, inten / inten.max()


def _stock_xrayutilities(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """xrayutilities' own peak list (CIF reader + PowderDiffraction), Debye-Waller factors set to 0."""
    with contextlib.redirect_stdout(io.StringIO()):
        crystal = xu.materials.Crystal.fromCIF(str(path))
        crystal.name = f"cod_{path.stem}"
        base = crystal.lattice._wbase
        for i in range(len(base)):
            atom, wyckoff, occ, _b = base[i]
            base[i] = (atom, wyckoff, occ, 0.0)
        powder = xu.simpack.PowderDiffraction(
            crystal, en=xu.utilities.lam2en(1.5406), tt_cutoff=90, enable_simulation=False
        )
    lines = [(2 * v["ang"], v["r"]) for v in powder.data.values() if v["active"] and 2 * v["ang"] >= 5]
    tt, inten = np.array(lines).T
    return _merged(tt, inten)


@pytest.mark.parametrize("cod_id", ["1000041", "1000017", "1004008", "2103956"])
@pytest.mark.needs_shared("cod")
def test_peaks_are_xrayutilities_physics(cod_dir: Path, cod_id: str) -> None:
    """Same lines and intensities as xrayutilities' own PowderDiffraction (NaCl, corundum, a C2 selenide,
    a triclinic lead fluoride where anomalous dispersion matters)."""
    ref_tt, ref_i = _stock_xrayutilities(cod_dir / f"{cod_id}.cif")
    peaks = simulate_peaks(read_structure(cod_dir / f"{cod_id}.cif"))
    tt, inten = _merged(peaks.two_theta, peaks.intensity)
    strong = ref_i > 0.01
    idx = np.array([np.argmin(np.abs(tt - t)) for t in ref_tt[strong]])
    assert np.abs(tt[idx] - ref_tt[strong]).max() < 5e-3  # lines merged within 0.01 deg: a shift < 0.01
    assert np.abs(inten[idx] - ref_i[strong]).max() < 0.03
    # the same lines above 1 %, give or take one that a 0.01-degree merge groups differently
    assert abs(int((inten > 0.01).sum()) - int(strong.sum())) <= max(1, strong.sum() // 100)


def test_peaks_agree_with_pymatgen(cod_dir: Path) -> None:
    """Strongest 10 peaks at pymatgen's positions; intensities close (pymatgen ignores anomalous
    dispersion and ion form factors, xrayutilities does not, so they are not identical)."""
    calc = XRDCalculator(wavelength=1.5406)
    correlations = []
    for cod_id in PHYSICS_IDS:
        structure = read_structure(cod_dir / f"{cod_id}.cif")
        peaks = simulate_peaks(structure)
        pattern = calc.get_pattern(structure, two_theta_range=(5, 90))
        ref_tt, ref_i = _merged(pattern.x, pattern.y)
        tt, inten = _merged(peaks.two_theta, peaks.intensity)
        top = np.argsort(-ref_i)[:10]
        idx = np.array([np.argmin(np.abs(tt - ref_tt[i])) for i in top])
        assert np.abs(tt[idx] - ref_tt[top]).max() < 0.02, cod_id
        n5 = min(5, len(top))
        overlap = len(set(np.argsort(-inten)[:n5]) & set(idx[:n5]))
        assert overlap >= n5 - 1, cod_id
        if len(top) >= 3:
            correlations.append(np.corrcoef(ref_i[top], inten[idx])[0, 1])
    # measured: all >= 0.999 on these; over 150 random COD CIFs the minimum was 0.93 (Ga, 4 lines)
    assert min(correlations) > 0.99
    assert np.median(correlations) > 0.999


def test_pseudo_symmetric_cell_keeps_its_split_lines(cod_dir: Path) -> None:
    """Ga (9011089): monoclinic, beta = 92 degrees, which spglib's 5-degree angle tolerance calls
    orthorhombic. Its near-equivalent lines are 1.5 degrees apart and must not be merged."""
    structure = read_structure(cod_dir / "9011089.cif")
    peaks = simulate_peaks(structure)
    ref = XRDCalculator(wavelength=1.5406).get_pattern(structure, two_theta_range=(5, 90))
    for t, i in zip(ref.x, ref.y / 100, strict=True):
        if i > 0.05:
            j = np.argmin(np.abs(peaks.two_theta - t))
            assert abs(peaks.two_theta[j] - t) < 1e-6 and abs(peaks.intensity[j] - i) < 0.05


@pytest.mark.parametrize("cod_id", ["1000041", "1000017", "1100163", "2240655"])
def test_symmetry_reduction_changes_nothing(cod_dir: Path, cod_id: str) -> None:
    """Merging symmetry-equivalent reflections is only a shortcut: same pattern as the P1 sum."""
    structure = read_structure(cod_dir / f"{cod_id}.cif")
    fast = simulate_peaks(structure)
    p1 = simulate_peaks(structure, rotations=np.eye(3, dtype=int)[None])
    g = grid(5, 90, 0.02)
    a = profile_pattern(fast.two_theta, fast.intensity, g, 0.1)
    b = profile_pattern(p1.two_theta, p1.intensity, g, 0.1)
    assert np.abs(a - b).max() < 1e-4


def test_peak_list_content_nacl(cod_dir: Path) -> None:
    """NaCl (Fm-3m, a = 5.64 A): only all-even or all-odd hkl, Bragg positions, 200 strongest."""
    structure = read_structure(cod_dir / "1000041.cif")
    peaks = simulate_peaks(structure)
    h = np.abs(peaks.hkl)
    assert np.all((h % 2 == 0).all(axis=1) | (h % 2 == 1).all(axis=1))
    assert sorted(h[np.argmax(peaks.intensity)]) == [0, 0, 2]
    assert 2 * peaks.d[np.argmax(peaks.intensity)] == pytest.approx(structure.lattice.a, abs=1e-9)
    assert np.allclose(1.5406 / (2 * np.sin(np.radians(peaks.two_theta) / 2)), peaks.d)
    assert peaks.intensity.max() == 1.0 and np.all(np.diff(peaks.two_theta) > 0)
    assert peaks.two_theta.min() >= 5 and peaks.two_theta.max() <= 90


def test_simulate_file_record_and_kalpha2(cod_dir: Path) -> None:
    """K-alpha2 adds a half-height twin at the Bragg angle for 1.54439 A, split from K-alpha1 at high
    angle. Si (4104917): the (440) line near 106 degrees is out of range, so (331) at 76.4 is used."""
    lab = LabelsParams()
    sim1 = SimulateParams()
    sim2 = dataclasses.replace(sim1, kalpha2=True)
    path = cod_dir / "4104917.cif"
    rec1, rec2 = simulate_file(path, sim1, lab), simulate_file(path, sim2, lab)
    assert (
        rec1.labels is not None and rec1.labels.crystal_system == "cubic" and rec1.labels.space_group == 227
    )
    g = grid(sim1.two_theta_min, sim1.two_theta_max, sim1.step)
    assert rec1.pattern is not None and rec2.pattern is not None
    assert rec1.pattern.shape == g.shape and rec1.pattern.max() == pytest.approx(1.0)
    for k in np.flatnonzero(rec1.peaks.two_theta > 60):
        t1, d = rec1.peaks.two_theta[k], rec1.peaks.d[k]
        t2 = 2 * np.degrees(np.arcsin(CU_KA2 / (2 * d)))
        assert t2 - t1 > 0.15  # resolved at fwhm 0.1
        i1, i2 = (int(np.argmin(np.abs(g - t))) for t in (t1, t2))
        window = slice(i2 - 3, i2 + 4)
        assert np.argmax(rec2.pattern[window]) == 3  # a local maximum at the K-alpha2 position
        assert rec2.pattern[i2] / rec2.pattern[i1] == pytest.approx(0.5, abs=0.08)
        assert rec1.pattern[i2] < 0.1 * rec1.pattern[i1]  # and none without the option


def test_no_reflections_in_range_is_an_input_error(cod_dir: Path) -> None:
    sim = SimulateParams(two_theta_min=5.0, two_theta_max=6.0, step=0.01)
    with pytest.raises(InputError, match=NO_REFLECTIONS) as info:
        simulate_file(cod_dir / "1000041.cif", sim, LabelsParams())
    assert "1000041.cif" in str(info.value)


def _params(**simulate_kw: object) -> Params:
    p = Params()
    return dataclasses.replace(p, simulate=dataclasses.replace(p.simulate, **simulate_kw))


def _folder(tmp_path: Path, cod_dir: Path, bad_dir: Path, ids: list[str], bad: list[str]) -> Path:
    folder = tmp_path / "cifs"
    folder.mkdir()
    for i in ids:
        shutil.copy(cod_dir / f"{i}.cif", folder)
    for i in bad:
        shutil.copy(bad_dir / f"{i}.cif", folder)
    return folder


def _manifest(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_run_simulate_outputs(tmp_path: Path, cod_dir: Path, bad_dir: Path) -> None:
    folder = _folder(tmp_path, cod_dir, bad_dir, BATCH_IDS, BAD_IDS)
    params = _params()
    summary = run_simulate(params, folder, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert summary["n_ok"] == 8 and summary["n_failed"] == 2 and summary["n_computed"] == 10
    assert sum(summary["per_system"].values()) == 8 and summary["per_system"]["monoclinic"] == 2
    assert all(k.startswith("pymatgen: ") for k in summary["reasons"])
    assert "8 ok, 2 failed" in summary_line(summary)

    rows = _manifest(tmp_path / "out" / "manifest.csv")
    assert [r["cod_id"] for r in rows] == sorted(BATCH_IDS + BAD_IDS)
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    with open(cod_dir / "INDEX.csv", encoding="utf-8") as fh:
        index = {r["cod_id"]: r for r in csv.DictReader(fh)}
    for r in rows:
        if r["cod_id"] in BAD_IDS:
            assert (
                r["status"] == "failed" and r["reason"].startswith("pymatgen: ") and r["crystal_system"] == ""
            )
        else:
            assert r["status"] == "ok" and r["reason"] == ""
            assert r["crystal_system"] == index[r["cod_id"]]["crystal_system"]
            assert int(r["space_group"]) == int(index[r["cod_id"]]["space_group_number"])
            assert int(r["n_atoms"]) == int(index[r["cod_id"]]["n_atoms_in_cell"]) and int(r["n_peaks"]) > 0
    assert next(r for r in rows if r["cod_id"] == "9008901")["symmetry_mismatch"] == "True"

    data = np.load(tmp_path / "out" / "patterns.npz")
    ok = [r for r in rows if r["status"] == "ok"]
    assert list(data["ids"]) == [r["cod_id"] for r in ok]
    off = data["peak_offsets"]
    assert (
        off.dtype == np.int64 and off.shape == (9,) and off[0] == 0 and off[-1] == data["peak_two_theta"].size
    )
    assert np.all(np.diff(off) == [int(r["n_peaks"]) for r in ok])
    for name in ("peak_two_theta", "peak_intensity", "peak_d", "two_theta", "intensity"):
        assert data[name].dtype == np.float32, name
    assert data["intensity"].shape == (8, data["two_theta"].size) == (8, 4251)
    assert np.allclose(data["intensity"].max(axis=1), 1.0)
    tt = data["peak_two_theta"]
    assert tt.min() >= 5 and tt.max() <= 90
    for i in range(8):
        seg = slice(off[i], off[i + 1])
        assert data["peak_intensity"][seg].max() == pytest.approx(1.0)
        # the pattern is the profile of this very peak list
        again = profile_pattern(
            data["peak_two_theta"][seg],
            data["peak_intensity"][seg],
            data["two_theta"],
            params.simulate.fwhm,
            params.simulate.eta,
        )
        assert np.abs(again - data["intensity"][i]).max() < 1e-4
    lam = float(data["wavelength"])
    assert lam == 1.5406
    assert np.allclose(data["peak_d"], lam / (2 * np.sin(np.radians(tt) / 2)), rtol=1e-5)


def test_timeout_stops_a_slow_cif_and_the_batch_goes_on(tmp_path: Path, cod_dir: Path, bad_dir: Path) -> None:
    folder = _folder(tmp_path, cod_dir, bad_dir, [SLOW_ID, "1000041", "1000017"], [])
    t0 = time.perf_counter()
    summary = run_simulate(
        _params(timeout_s=1.0), folder, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False
    )
    assert time.perf_counter() - t0 < 20
    assert summary["n_ok"] == 2 and summary["reasons"] == {"timeout": 1}
    rows = {r["cod_id"]: r for r in _manifest(tmp_path / "out" / "manifest.csv")}
    assert rows[SLOW_ID]["status"] == "failed" and rows[SLOW_ID]["reason"] == "timeout after 1 s"
    assert summary["slowest"][0][0] == SLOW_ID and summary["slowest"][0][1] < 3
    assert f"slowest: {SLOW_ID}" in summary_line(summary)
    assert rows["1000041"]["status"] == rows["1000017"]["status"] == "ok"
    # the same limit again: the timeout is remembered, nothing is recomputed
    again = run_simulate(
        _params(timeout_s=1.0), folder, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False
    )
    assert again["n_computed"] == 0 and again["reasons"] == {"timeout": 1}
    assert again["slowest"] == [] and "slowest" not in summary_line(again)  # nothing timed this run


def test_outputs_hash_the_same_on_every_run(tmp_path: Path, cod_dir: Path, bad_dir: Path) -> None:
    """DVC records the outputs' hashes in dvc.lock: a rerun (a fresh clone's `dvc repro`, on a machine
    with another number of cores) must match them, so no wall time or other per-run value may be written
    into the manifest or the npz, and the order results come back from the workers must not matter."""
    folder = _folder(tmp_path, cod_dir, bad_dir, BATCH_IDS[:3], BAD_IDS[:1])
    run_simulate(_params(workers=2), folder, tmp_path / "a", cache_dir=tmp_path / "cache_a", progress=False)
    time.sleep(1.1)  # so that a time stamp at one-second resolution would differ
    run_simulate(_params(workers=1), folder, tmp_path / "b", cache_dir=tmp_path / "cache_b", progress=False)
    for name in ("manifest.csv", "patterns.npz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_interrupted_run_resumes_from_the_cache(
    tmp_path: Path, cod_dir: Path, bad_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(tmp_path, cod_dir, bad_dir, BATCH_IDS[:5], BAD_IDS[:1])
    cache = tmp_path / "cache"
    real_put = simulate.ResultCache.put
    calls = []

    def put_then_interrupt(self: simulate.ResultCache, key: str, payload: dict) -> None:
        real_put(self, key, payload)
        calls.append(key)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(simulate.ResultCache, "put", put_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_simulate(_params(), folder, tmp_path / "out", cache_dir=cache, progress=False)
    assert not (tmp_path / "out" / "manifest.csv").exists()
    monkeypatch.setattr(simulate.ResultCache, "put", real_put)

    resumed = run_simulate(_params(), folder, tmp_path / "out", cache_dir=cache, progress=False)
    assert (resumed["n_cached"], resumed["n_computed"]) == (3, 3)
    assert resumed["n_ok"] == 5 and resumed["n_failed"] == 1
    first = np.load(tmp_path / "out" / "patterns.npz")["intensity"]

    # a third run computes nothing, and a profile-only change (step) needs no recomputation either
    third = run_simulate(_params(), folder, tmp_path / "out", cache_dir=cache, progress=False)
    assert third["n_computed"] == 0
    assert np.array_equal(np.load(tmp_path / "out" / "patterns.npz")["intensity"], first)
    coarse = run_simulate(_params(step=0.04), folder, tmp_path / "out2", cache_dir=cache, progress=False)
    assert coarse["n_computed"] == 0
    assert np.load(tmp_path / "out2" / "patterns.npz")["intensity"].shape == (5, 2126)
    # a peak-list change (range) does recompute
    other = run_simulate(
        _params(two_theta_max=80.0), folder, tmp_path / "out3", cache_dir=cache, progress=False
    )
    assert other["n_computed"] == 6


def test_dead_worker_is_a_failed_record_and_not_cached(
    tmp_path: Path, cod_dir: Path, bad_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the pool reports for a worker that died (a segfault, an out-of-memory kill) becomes a failed
    manifest row with the pool's one-line reason, and is not cached: the next run tries that CIF again."""
    folder = _folder(tmp_path, cod_dir, bad_dir, BATCH_IDS[:2], [])
    calls: list[int] = []

    def all_die(function: object, tasks: list, on_result: Callable, **kw: object) -> None:
        for index, _args in tasks:
            calls.append(index)
            on_result(index, TaskFailure("worker died (exit code -11)", crashed=True))

    monkeypatch.setattr(simulate, "run_pool", all_die)
    kw = {"cache_dir": tmp_path / "cache", "progress": False}
    summary = run_simulate(_params(), folder, tmp_path / "out", **kw)
    assert summary["n_failed"] == 2 and summary["reasons"] == {"worker died": 2}
    rows = _manifest(tmp_path / "out" / "manifest.csv")
    assert [r["reason"] for r in rows] == ["worker died (exit code -11)"] * 2
    assert all(r["status"] == "failed" and r["crystal_system"] == "" for r in rows)
    again = run_simulate(_params(), folder, tmp_path / "out", **kw)
    assert again["n_computed"] == 2 and len(calls) == 4


def test_reason_groups() -> None:
    assert reason_group("timeout after 60 s") == "timeout"
    assert reason_group("pymatgen: could not convert string to float: '?'") == (
        "pymatgen: could not convert string to float"
    )
    assert reason_group(
        "pymatgen: Invalid CIF file with no structures! (Occupancy 5.0 exceeded tolerance.)"
    ) == ("pymatgen: Invalid CIF file with no structures!")
    assert reason_group("worker died (exit code -9)") == "worker died"
