"""Vendor files diffractometers write, read into 2-theta and intensity: PANalytical ``.xrdml``.

Why apart from :mod:`xrdvision.formats.scans`: that module is the one home of measured scans and of their
checks; the vendor formats each need a parser of their own, and keeping them here keeps both small.
``.xrdml`` is read with ``xrayutilities.io.XRDMLFile`` (already a dependency: the simulator); its
``usedWavelength`` block is read here, since xrayutilities does not return it. Bruker ``.raw`` has no
maintained reader that installs from PyPI without a compiler (``xylib-py`` and ``xylib-py-wheels``
ship only sources needing SWIG and a C++ build), so it stays refused with a hint to export text.
Every problem is an :class:`~xrdvision.errors.InputError`: one line naming the file and the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xrdvision.errors import InputError, one_line


@dataclass(frozen=True)
class RawScan:
    """What a vendor file holds, before the checks every measured pattern gets."""

    two_theta: np.ndarray
    intensity: np.ndarray
    wavelength: float | None  # K-alpha1 (Angstrom) as the file states it, None if it does not
    notes: tuple[str, ...] = ()


_TAG = r"<{tag}\b[^>]*>\s*([-+0-9.eE]+)\s*</{tag}>"


def _xml_number(text: str, tag: str) -> float | None:
    m = re.search(_TAG.format(tag=tag), text)
    try:
        return float(m.group(1)) if m else None
    except ValueError:
        return None


def xrdml_wavelength(text: str) -> tuple[float | None, tuple[str, ...]]:
    """K-alpha1 of the ``usedWavelength`` block and a note on K-alpha2 (its wavelength and ratio).

    K-alpha1 is returned even when the file's ``intended`` wavelength is the K-alpha average: the 2-theta
    axis is the same, and the strongest component of each line is K-alpha1. A K-alpha2 ratio above 0
    means the lines are doublets (no monochromator), as in the training patterns with K-alpha2.
    """
    block = re.search(r"<usedWavelength\b([^>]*)>(.*?)</usedWavelength>", text, re.DOTALL)
    if not block:
        return None, ()
    body = block.group(2)
    ka1 = _xml_number(body, "kAlpha1")
    ka2 = _xml_number(body, "kAlpha2")
    ratio = _xml_number(body, "ratioKAlpha2KAlpha1")
    intended = re.search(r'intended="([^"]*)"', block.group(1))
    notes = []
    if ka2 is not None and ratio:
        notes.append(f"K-alpha2 {ka2:g} A at {ratio:g} x K-alpha1 in the beam (header)")
    if intended:
        notes.append(f"intended wavelength: {intended.group(1)}")
    return ka1, tuple(notes)


def read_xrdml(path: Path) -> RawScan:
    """The first scan of a PANalytical XRDML file: 2-theta and counts per second (``detector``)."""
    import xrayutilities.io as xio

    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc})") from None
    if not text.strip():
        raise InputError(path, "empty file")
    if "<xrdMeasurements" not in text[:4096]:
        raise InputError(path, "not an XRDML file (no <xrdMeasurements> element at the start)")
    try:
        xf = xio.XRDMLFile(str(path))
    except KeyError as exc:  # xrayutilities looks up the axis its scanAxis names (Gonio -> 2Theta)
        raise InputError(path, f"scan has no {exc.args[0]} positions: not a 2-theta powder scan") from None
    except Exception as exc:  # ElementTree.ParseError for a truncated file, anything else: not readable
        raise InputError(path, f"not a readable XRDML file ({one_line(exc)})") from None
    if not xf.scans:
        raise InputError(path, "XRDML file holds no xrdMeasurement")
    scan = xf.scans[0]
    notes = [f"{len(xf.scans)} measurements in the file; the first is read"] if len(xf.scans) > 1 else []
    if "2Theta" not in scan.ddict:
        raise InputError(
            path, f"scan axis {scan.scanmotname!r} has no 2Theta positions: not a 2-theta powder scan"
        )
    tt = np.asarray(scan["2Theta"], dtype=np.float64)
    y = np.asarray(scan.int, dtype=np.float64)
    if tt.ndim != 1 or y.ndim != 1:
        raise InputError(path, f"a {y.ndim}-D scan (a map?), not a powder pattern")
    if tt.size != y.size:
        raise InputError(path, f"{tt.size} 2-theta positions but {y.size} intensities")
    wl, wl_notes = xrdml_wavelength(text)
    return RawScan(tt, y, wl, (*notes, *wl_notes))


# Suffix -> reader. Anything else that is not text is refused in formats.scans with a hint.
READERS = {".xrdml": read_xrdml}
