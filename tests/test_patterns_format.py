"""patterns.npz and manifest.csv: the writer and the reader of formats.patterns agree, and both check."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from xrdvision.errors import InputError
from xrdvision.formats.patterns import (
    MANIFEST_COLUMNS,
    Patterns,
    load_patterns,
    write_manifest,
    write_patterns,
)


def _patterns() -> Patterns:
    grid = np.linspace(5, 90, 11, dtype=np.float32)
    peaks = [
        (np.array([10.0, 20.0]), np.array([1.0, 0.5]), np.array([8.8, 4.4])),
        (np.array([30.0]), np.array([1.0]), np.array([2.9])),
    ]
    intensity = np.random.default_rng(0).random((2, grid.size)).astype(np.float32)
    return Patterns.from_peak_lists(["1000041", "9008901"], peaks, grid, intensity, 1.5406)


def test_written_patterns_read_back(tmp_path: Path) -> None:
    write_patterns(tmp_path / "patterns.npz", _patterns())
    pats = load_patterns(tmp_path / "patterns.npz")
    assert pats.ids == ["1000041", "9008901"] and pats.wavelength == 1.5406
    assert pats.peak_offsets.tolist() == [0, 2, 3]
    tt, amp, d = pats.peaks(0)
    assert tt.tolist() == [10.0, 20.0] and amp.tolist() == [1.0, 0.5] and d.dtype == np.float64
    np.testing.assert_array_equal(pats.intensity, _patterns().intensity)
    with np.load(tmp_path / "patterns.npz") as z:  # the stored types of docs/dataflow.md
        assert z["peak_offsets"].dtype == np.int64 and z["peak_d"].dtype == np.float32
        assert z["intensity"].dtype == np.float32 and z["two_theta"].dtype == np.float32


def test_no_structures_is_a_valid_file(tmp_path: Path) -> None:
    grid = np.linspace(5, 90, 11, dtype=np.float32)
    write_patterns(tmp_path / "p.npz", Patterns.from_peak_lists([], [], grid, np.zeros((0, 11)), 1.5406))
    pats = load_patterns(tmp_path / "p.npz")
    assert pats.ids == [] and pats.intensity.shape == (0, 11) and pats.peak_offsets.tolist() == [0]


def test_writer_refuses_inconsistent_arrays(tmp_path: Path) -> None:
    bad = _patterns()
    bad = Patterns(**{**bad.__dict__, "peak_offsets": np.array([0, 1, 3])[:2]})
    with pytest.raises(ValueError, match="peak_offsets must be 3 increasing values from 0 to 3"):
        write_patterns(tmp_path / "patterns.npz", bad)
    assert not (tmp_path / "patterns.npz").exists()


def test_reader_names_the_file_and_the_inconsistency(tmp_path: Path) -> None:
    good = _patterns()
    path = tmp_path / "patterns.npz"
    arrays = {k: getattr(good, k) for k in ("peak_offsets", "peak_two_theta", "peak_intensity", "peak_d")}
    arrays.update(ids=np.array(good.ids), two_theta=good.two_theta, intensity=good.intensity[:1])
    np.savez(path, **arrays, wavelength=np.float64(1.5406))  # one structure's profile too few
    with pytest.raises(InputError, match=r"patterns\.npz: intensity is \(1, 11\), expected \(2, 11\)"):
        load_patterns(path)


def test_manifest_columns_in_order_missing_values_empty(tmp_path: Path) -> None:
    write_manifest(
        tmp_path / "manifest.csv", [{"cod_id": "1", "status": "failed", "reason": "timeout after 1 s"}]
    )
    with open(tmp_path / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == list(MANIFEST_COLUMNS)
    assert dict(zip(rows[0], rows[1], strict=True)) == {
        **dict.fromkeys(MANIFEST_COLUMNS, ""),
        "cod_id": "1",
        "status": "failed",
        "reason": "timeout after 1 s",
    }
    assert (tmp_path / "manifest.csv").read_bytes().endswith(b"\r\n")  # csv's default, as before
