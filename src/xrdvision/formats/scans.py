"""Measured powder scans on disk: the one home of the two-column text format (xy, csv, dat, RRUFF txt)
and of the checks every measured scan gets, whatever its format (vendor files: :mod:`.scan_readers`).

Reading is deliberately tolerant of the ways people write such files (comments with ``#``, ``;``, ``!``
or ``%``, a text header, RRUFF ``##KEY=value`` headers, commas, semicolons, tabs, decimal commas, extra
columns, decreasing 2-theta, repeated points) and strict about what cannot be a powder pattern: every
such problem is an :class:`~xrdvision.errors.InputError` with one line naming the file and the reason.
The wavelength a header states (a number, or an anode such as ``Cu K-alpha``) is read here too; what is
done with it (conversion to the training wavelength, background, grid) is :mod:`xrdvision.serve.preprocess`.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xrdvision.crystal.bragg import CU_KA1, CU_KA_AVERAGE
from xrdvision.errors import InputError
from xrdvision.formats.scan_readers import READERS

# File name endings read as two-column text, and those with a reader of their own (PANalytical XRDML).
# Anything else is refused: a vendor binary (.raw, .brml) read as text gives nonsense, not an error.
TEXT_SUFFIXES = (".xy", ".xye", ".csv", ".dat", ".txt", ".asc")
PATTERN_SUFFIXES = (*TEXT_SUFFIXES, *READERS)
VENDOR_FORMATS = {
    ".raw": "Bruker/Rigaku RAW is a binary format with no maintained reader here",
    ".brml": "Bruker BRML is a zipped XML format",
    ".rd": "Philips RD is a binary format",
    ".sd": "Philips SD is a binary format",
}
COMMENT_CHARS = ("#", ";", "!", "%", "//")
MIN_POINTS = 50  # fewer points cannot show the peaks the model needs (the training grid has 4251)
# Negative intensities: background-subtracted files scatter around zero, so small negative values are
# noise and are clipped to 0. Values below -NEGATIVE_TOLERANCE x the maximum, or a pattern with more
# negative than positive points, are not counts at all (a wrong column, a badly subtracted background).
NEGATIVE_TOLERANCE = 0.10
# Wavelengths (Angstrom) a header may name by anode: K-alpha1 and the K-alpha1/2 weighted average.
ANODES = {
    "cu": (CU_KA1, CU_KA_AVERAGE),
    "co": (1.78897, 1.7902),
    "fe": (1.93604, 1.9373),
    "cr": (2.28970, 2.2909),
    "mo": (0.70930, 0.7107),
    "ag": (0.55941, 0.5608),
}
WAVELENGTH_RANGE = (0.1, 5.0)  # plausible X-ray wavelengths in Angstrom; anything else is a unit error
_UNIT = r"(?P<{}>nm|pm|angstroms?|[aåÅ])"
_WAVELENGTH_KEY = re.compile(
    r"(?:wave\s*length|lambda)\s*(?:[(\[]\s*" + _UNIT.format("u1") + r"\s*[)\]])?(?:\s*[=:,]\s*|\s+)"
    r"(?P<value>[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*" + _UNIT.format("u2") + r"?\b",
    re.IGNORECASE,
)
_UNIT_TO_ANGSTROM = {"nm": 10.0, "pm": 0.01}
_ANODE = re.compile(
    r"\b(Cu|Co|Fe|Cr|Mo|Ag)\s*[- ]?\s*[Kk]\s*[-_ ]?\s*(?:alpha|Alpha|α|a)(1(?!\s*[+,/])|1\s*[+,/]\s*2)?"
)
_DECIMAL_COMMA = re.compile(r"^[-+]?\d+,\d+(?:[eE][-+]?\d+)?$")


@dataclass(frozen=True)
class MeasuredPattern:
    """A parsed pattern: 2-theta ascending and unique (degrees), intensities >= 0 on the file's scale.

    ``wavelength`` is None when neither the caller nor the file gave one; ``wavelength_from`` says which
    did (``"argument"``, ``"file"`` or ``""``). ``notes`` lists what was repaired (sorted, merged
    duplicates, clipped negatives) so a caller can show it.
    """

    two_theta: np.ndarray
    intensity: np.ndarray
    wavelength: float | None
    source: str
    wavelength_from: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


def _is_comment(line: str) -> bool:
    return line.startswith(COMMENT_CHARS)


def header_wavelength(lines: list[str], path: str | Path = "") -> float | None:
    """The wavelength a header states: ``##X-RAY WAVELENGTH=1.541838``, ``wavelength: 1.5406``,
    ``Wavelength (nm) = 0.15406`` (nm and pm converted), or an anode (``Cu K-alpha`` -> 1.5418,
    ``Cu K-alpha1`` -> 1.5406). A stated number wins over an anode name.

    Only comment/header lines are passed in. A number outside 0.1-5 Angstrom is an :class:`InputError`
    (most likely nm or pm): guessing the unit would shift every peak.
    """
    anode: float | None = None
    for line in lines:
        m = _WAVELENGTH_KEY.search(line)
        if m:
            unit = (m.group("u2") or m.group("u1") or "a").lower()
            value = float(m.group("value")) * _UNIT_TO_ANGSTROM.get(unit, 1.0)
            if not WAVELENGTH_RANGE[0] <= value <= WAVELENGTH_RANGE[1]:
                raise InputError(
                    path,
                    f"header wavelength {value:g} is not in Angstrom (expected {WAVELENGTH_RANGE[0]:g}-"
                    f"{WAVELENGTH_RANGE[1]:g}); pass the wavelength explicitly",
                )
            return value
        if anode is None:
            a = _ANODE.search(line)
            if a:
                ka1, average = ANODES[a.group(1).lower()]
                only_ka1 = a.group(2) == "1"
                anode = ka1 if only_ka1 else average
    return anode


def _split_fields(line: str) -> list[str]:
    """Fields of one data line: whitespace/tab, semicolon or comma separated, decimal commas allowed."""
    if ";" in line:
        parts = [p.strip() for p in line.split(";")]
    else:
        parts = line.split()
        if len(parts) == 1:
            parts = [p.strip() for p in line.split(",")]
        else:
            parts = [p.rstrip(",") for p in parts if p not in (",",)]
    parts = [p for p in parts if p != ""]
    return [p.replace(",", ".") if _DECIMAL_COMMA.match(p) else p for p in parts]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _read_text(path: Path) -> str:
    suffix = path.suffix.lower()
    if path.is_dir():
        raise InputError(path, "is a folder, not a pattern file")
    if suffix not in TEXT_SUFFIXES:
        hint = VENDOR_FORMATS.get(suffix, "unknown format")
        raise InputError(
            path,
            f"{hint} ({suffix or 'no extension'}); export the pattern as two-column text "
            f"({', '.join(TEXT_SUFFIXES)}) or PANalytical XRDML",
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc})") from None
    if not data.strip():
        raise InputError(path, "empty file")
    if b"\x00" in data[:65536]:
        raise InputError(path, "binary file, not a two-column text pattern")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # old instrument software writes degree signs in Latin-1


def _first_data_line(lines: list[str]) -> tuple[int, list[str]]:
    """Index of the first line that starts with a number, and the header lines before it."""
    header: list[str] = []
    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line:
            continue
        if _is_comment(line):
            header.append(line)
            continue
        fields = _split_fields(line)
        if fields and _number(fields[0]) is not None:
            return i, header
        header.append(line)  # a text header ("2Theta Intensity") before the data
    return len(lines), header


def _parse_fast(lines: list[str], start: int) -> tuple[list[str], np.ndarray | None]:
    """Comment lines, and the data through numpy's C reader, or None where it fails on the file.

    One separator style for the whole file, taken from its first data line; any file the reader
    rejects (ragged columns, text, a footer) goes to :func:`_parse_slow`, which names the bad line.
    """
    comments: list[str] = []
    body: list[str] = []
    for raw in lines[start:]:
        line = raw.strip()
        if not line:
            continue
        if line.startswith(COMMENT_CHARS):
            comments.append(line)
        else:
            body.append(line)
    first = body[0]
    parts = [p.strip() for p in first.split(";")] if ";" in first else first.split()
    decimal_comma = any(_DECIMAL_COMMA.match(p) for p in parts)
    joined = "\n".join(body)
    joined = joined.replace(",", ".") if decimal_comma else joined.replace(",", " ")
    joined = joined.replace(";", " ")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = np.loadtxt(io.StringIO(joined), usecols=(0, 1), ndmin=2, comments=["#", "!"], dtype=float)
    except (ValueError, IndexError):
        return comments, None
    return comments, data if data.shape[0] == len(body) else None


def _parse_slow(lines: list[str], start: int, path: Path) -> np.ndarray:
    """Line by line, for files the fast reader rejects: finds and names the offending line."""
    rows: list[tuple[float, float]] = []
    trailing_text: tuple[int, str] | None = None  # first non-numeric line after the data began
    for number, raw in enumerate(lines[start:], start=start + 1):
        line = raw.strip()
        if not line or _is_comment(line):
            continue
        for mark in ("#", "!"):  # inline comment after the numbers
            if mark in line:
                line = line.split(mark, 1)[0].strip()
        fields = _split_fields(line)
        first = _number(fields[0]) if fields else None
        if first is None:
            if trailing_text is None:
                trailing_text = (number, raw.strip())
            continue
        if trailing_text is not None:
            n, t = trailing_text
            raise InputError(path, f"line {n}: text among the numbers ({t[:40]!r})")
        if len(fields) < 2:
            if not rows and all(len(_split_fields(x.strip())) < 2 for x in lines[start:] if x.strip()):
                raise InputError(path, "one column only; expected two columns: 2-theta and intensity")
            raise InputError(path, f"line {number}: one column, expected 2-theta and intensity")
        second = _number(fields[1])
        if second is None:
            raise InputError(path, f"line {number}: {fields[1][:30]!r} is not a number")
        rows.append((first, second))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def _parse(text: str, path: Path) -> tuple[list[str], np.ndarray]:
    """(header and comment lines, (n, 2) array of 2-theta and intensity)."""
    lines = text.splitlines()
    start, header = _first_data_line(lines)
    if start == len(lines):
        raise InputError(path, "no numeric data lines (two columns: 2-theta and intensity)")
    comments, data = _parse_fast(lines, start)
    if data is None:
        data = _parse_slow(lines, start, path)
    return header + comments, data


def read_pattern(path: str | Path, wavelength: float | None = None) -> MeasuredPattern:
    """Read a measured pattern: two-column (2-theta, intensity) text, or a vendor file with a reader in
    :data:`~xrdvision.formats.scan_readers.READERS` (``.xrdml``); see the module docstring.

    ``wavelength`` (Angstrom), when given, overrides the file's header: the user knows their instrument
    better than a header written by someone else's software. Otherwise a wavelength in the header is
    used, and failing that the result's wavelength is None (the caller picks a default).
    Negative intensities down to -10 % of the maximum are clipped to 0 (noise around a subtracted
    background); deeper ones, or a mostly negative pattern, are an error.
    """
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is not None and not path.is_dir():
        raw = reader(path)
        tt, y = raw.two_theta.copy(), raw.intensity.copy()
        header: list[str] = []
        file_wavelength, file_notes = raw.wavelength, raw.notes
    else:
        header, data = _parse(_read_text(path), path)
        tt, y = data[:, 0].copy(), data[:, 1].copy()
        file_wavelength, file_notes = None, ()
    if tt.size == 0:
        raise InputError(path, "no data points")
    bad = ~(np.isfinite(tt) & np.isfinite(y))
    if bad.any():
        raise InputError(
            path, f"{int(bad.sum())} non-finite value(s) (nan/inf), first at data row {np.argmax(bad) + 1}"
        )
    notes: list[str] = list(file_notes)
    if not (tt.min() > 0 and tt.max() < 180):
        raise InputError(
            path,
            f"2-theta runs {tt.min():g} to {tt.max():g}: not angles in (0, 180) degrees "
            "(is the first column 2-theta?)",
        )
    if np.any(np.diff(tt) < 0):
        notes.append("2-theta sorted ascending")
    tt_u, inverse, counts = np.unique(tt, return_inverse=True, return_counts=True)
    if tt_u.size < tt.size:
        y = np.bincount(inverse, weights=y) / counts
        notes.append(f"{tt.size - tt_u.size} repeated 2-theta point(s) averaged")
        tt = tt_u
    else:
        order = np.argsort(tt, kind="stable")
        tt, y = tt[order], y[order]
    if tt.size < MIN_POINTS:
        raise InputError(path, f"only {tt.size} points; a powder pattern needs at least {MIN_POINTS}")
    top = float(y.max())
    if top <= 0:
        raise InputError(path, "no positive intensities")
    negative = y < 0
    if negative.any():
        if negative.sum() > tt.size / 2:
            raise InputError(path, f"{negative.sum()} of {tt.size} intensities are negative: not a pattern")
        if y.min() < -NEGATIVE_TOLERANCE * top:
            raise InputError(
                path,
                f"negative intensities down to {y.min():g} (maximum {top:g}): more than "
                f"{NEGATIVE_TOLERANCE:.0%} of the maximum below zero",
            )
        notes.append(f"{int(negative.sum())} slightly negative intensities clipped to 0")
        y = np.clip(y, 0.0, None)

    wavelength_from = ""
    if wavelength is not None:
        if not WAVELENGTH_RANGE[0] <= wavelength <= WAVELENGTH_RANGE[1]:
            raise InputError(path, f"wavelength {wavelength:g} is not in Angstrom (0.1-5)")
        wl: float | None = float(wavelength)
        wavelength_from = "argument"
    else:
        wl = file_wavelength if file_wavelength is not None else header_wavelength(header, path)
        wavelength_from = "file" if wl is not None else ""
    return MeasuredPattern(
        two_theta=tt,
        intensity=y,
        wavelength=wl,
        source=str(path),
        wavelength_from=wavelength_from,
        notes=tuple(notes),
    )


def measured_range(pattern: MeasuredPattern) -> tuple[float, float]:
    """The 2-theta span that holds data: runs of exact zeros at either end mean "not measured"
    (RRUFF files re-gridded onto 5-90 degrees are padded so)."""
    nz = np.flatnonzero(pattern.intensity > 0)
    return float(pattern.two_theta[nz[0]]), float(pattern.two_theta[nz[-1]])
