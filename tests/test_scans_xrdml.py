"""Files diffractometers write: a real PANalytical XRDML file read through xrayutilities, its wavelength
block, truncated and foreign files as one line naming them, and ``predict`` routing it as a pattern."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from xrdvision.config import SimulateParams
from xrdvision.crystal.bragg import CU_KA1
from xrdvision.errors import InputError
from xrdvision.formats.scan_readers import xrdml_wavelength
from xrdvision.formats.scans import PATTERN_SUFFIXES, read_pattern
from xrdvision.serve.inputs import input_kind
from xrdvision.serve.preprocess import to_training_grid

XRDML = ROOT / "tests" / "data" / "xrdml" / "TiO2_0p4009-ZnO_0p6010--2min.xrdml"


def test_real_xrdml_file_reads_with_its_wavelength():
    p = read_pattern(XRDML)
    assert p.two_theta.size == 2071
    assert p.two_theta[0] == pytest.approx(10.0217, abs=1e-3) and p.two_theta[-1] == pytest.approx(
        99.9959, abs=1e-3
    )
    assert np.all(np.diff(p.two_theta) > 0)
    assert np.median(np.diff(p.two_theta)) == pytest.approx(0.0435, abs=1e-3)
    assert p.intensity.min() >= 0 and p.intensity.max() > 10 * np.median(
        p.intensity
    )  # lines above background
    assert p.wavelength == pytest.approx(1.540598) and p.wavelength_from == "file"
    assert any("K-alpha2 1.54443 A at 0.5" in n for n in p.notes)
    assert read_pattern(XRDML, wavelength=1.5418).wavelength == 1.5418  # the caller still overrides
    y = to_training_grid(p, SimulateParams())
    assert y.max() == pytest.approx(1.0) and y[:100].max() == 0.0  # nothing measured below 10 degrees


def test_predict_routes_xrdml_as_a_measured_pattern():
    assert ".xrdml" in PATTERN_SUFFIXES and input_kind(XRDML) == "pattern"


def test_wavelength_block_variants():
    text = (
        '<usedWavelength intended="K-Alpha"><kAlpha1 unit="Angstrom">1.7890100</kAlpha1>'
        '<kAlpha2 unit="Angstrom">1.7928500</kAlpha2><ratioKAlpha2KAlpha1>0.5</ratioKAlpha2KAlpha1>'
        "</usedWavelength>"
    )
    wl, notes = xrdml_wavelength(text)
    assert wl == pytest.approx(1.78901) and "intended wavelength: K-Alpha" in notes
    mono = (
        '<usedWavelength intended="K-Alpha 1"><kAlpha1 unit="Angstrom">1.5405980</kAlpha1></usedWavelength>'
    )
    assert xrdml_wavelength(mono) == (pytest.approx(CU_KA1, abs=1e-5), ("intended wavelength: K-Alpha 1",))
    assert xrdml_wavelength("<xrdMeasurements/>") == (None, ())


def _bad(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        read_pattern(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


def test_truncated_foreign_and_empty_xrdml_files(tmp_path):
    data = XRDML.read_bytes()
    assert "not a readable XRDML file (ParseError" in _bad(tmp_path, "cut.xrdml", data[: len(data) // 2])
    assert "not an XRDML file" in _bad(tmp_path, "foreign.xrdml", b"10.0 5\n10.1 7\n" * 100)
    assert "empty file" in _bad(tmp_path, "empty.xrdml", b"")
    # a rocking curve: an XRDML file whose scan has no 2-theta axis
    rocking = data.replace(b'axis="2Theta"', b'axis="Phi"')
    assert "no 2Theta positions: not a 2-theta powder scan" in _bad(tmp_path, "rocking.xrdml", rocking)
    with pytest.raises(InputError, match="file not found"):
        read_pattern(tmp_path / "absent.xrdml")


def test_bruker_raw_and_unknown_formats_are_named(tmp_path):
    assert "Bruker/Rigaku RAW is a binary format" in _bad(tmp_path, "scan.raw", b"RAW4.00\x00" * 50)
    assert "unknown format (.spe)" in _bad(tmp_path, "scan.spe", b"10 1\n" * 100)
    with pytest.raises(InputError, match="RAW is a binary format"):
        input_kind(tmp_path / "scan.raw")
