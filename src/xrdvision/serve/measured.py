"""Measured powder patterns: read two-column text files and put them on the training grid.

A measured pattern differs from a simulated one in ways that have nothing to do with the structure:
another wavelength (peaks elsewhere), a background (air scatter, fluorescence, an amorphous holder),
counts on an arbitrary scale, another 2-theta range and step. :func:`to_training_grid` removes what it
can so that the rendered image looks like the training images: Bragg's law to the training wavelength,
background subtraction, normalisation to a maximum of 1 and interpolation onto the training grid.

Reading is deliberately tolerant of the ways people write such files (comments with ``#``, ``;``, ``!``
or ``%``, a text header, RRUFF ``##KEY=value`` headers, commas, semicolons, tabs, decimal commas, extra
columns, decreasing 2-theta, repeated points) and strict about what cannot be a powder pattern: every
such problem is an :class:`~xrdvision.errors.InputError` with one line naming the file and the reason.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xrdvision.config import SimulateParams
from xrdvision.crystal.bragg import CU_KA1, CU_KA_AVERAGE, convert_wavelength
from xrdvision.crystal.profile import grid
from xrdvision.errors import InputError

# File name endings read as two-column text. Anything else is refused: a vendor binary (.raw, .brml)
# read as text would give nonsense numbers rather than an error.
PATTERN_SUFFIXES = (".xy", ".xye", ".csv", ".dat", ".txt", ".asc")
VENDOR_FORMATS = {
    ".raw": "Bruker/Rigaku RAW is a binary format",
    ".brml": "Bruker BRML is a zipped XML format",
    ".xrdml": "PANalytical XRDML is an XML format",
    ".rd": "Philips RD is a binary format",
    ".sd": "Philips SD is a binary format",
}
COMMENT_CHARS = ("#", ";", "!", "%", "//")
MIN_POINTS = 50  # fewer points cannot show the peaks the model needs (the training grid has 4251)
MIN_OVERLAP_DEG = 10.0  # at least this much of the pattern must fall inside the training 2-theta range
# Negative intensities: background-subtracted files scatter around zero, so small negative values are
# noise and are clipped to 0. Values below -NEGATIVE_TOLERANCE x the maximum, or a pattern with more
# negative than positive points, are not counts at all (a wrong column, a badly subtracted background).
NEGATIVE_TOLERANCE = 0.10
# Wavelengths (Angstrom) a header may name by anode: K-alpha1 and the K-alpha1/2 weighted average.
ANODES = {
    "cu": (CU_KA1, 1.5418),
    "co": (1.78897, 1.7902),
    "fe": (1.93604, 1.9373),
    "cr": (2.28970, 2.2909),
    "mo": (0.70930, 0.7107),
    "ag": (0.55941, 0.5608),
}
WAVELENGTH_RANGE = (0.1, 5.0)  # plausible X-ray wavelengths in Angstrom; anything else is a unit error
# SNIP background: clipping half-width in degrees 2-theta. It must be wider than a peak's foot (peaks
# here have FWHM 0.05-0.3 degree, clay basal bands ~1 degree) and narrower than the background's
# features; SNIP never clips a convex (decaying) background, so a generous window is safe.
BG_HALF_WIDTH_DEG = 2.0
BG_SMOOTH_DEG = 0.2  # moving average before SNIP: the background follows the noise mean, not its minima

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
    if suffix not in PATTERN_SUFFIXES:
        hint = VENDOR_FORMATS.get(suffix, "unknown format")
        raise InputError(
            path,
            f"{hint} ({suffix or 'no extension'}); export the pattern as two-column text "
            f"({', '.join(PATTERN_SUFFIXES)})",
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
    """Read a two-column (2-theta, intensity) text pattern; see the module docstring for what is accepted.

    ``wavelength`` (Angstrom), when given, overrides the file's header: the user knows their instrument
    better than a header written by someone else's software. Otherwise a wavelength in the header is
    used, and failing that the result's wavelength is None (the caller picks a default).
    Negative intensities down to -10 % of the maximum are clipped to 0 (noise around a subtracted
    background); deeper ones, or a mostly negative pattern, are an error.
    """
    path = Path(path)
    header, data = _parse(_read_text(path), path)
    tt, y = data[:, 0].copy(), data[:, 1].copy()
    bad = ~(np.isfinite(tt) & np.isfinite(y))
    if bad.any():
        raise InputError(
            path, f"{int(bad.sum())} non-finite value(s) (nan/inf), first at data row {np.argmax(bad) + 1}"
        )
    notes: list[str] = []
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
        wl = header_wavelength(header, path)
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


def _lls(y: np.ndarray) -> np.ndarray:
    """The log-log-square-root operator of SNIP: compresses strong peaks so clipping works on counts."""
    return np.log(np.log(np.sqrt(y + 1) + 1) + 1)


def _lls_inverse(v: np.ndarray) -> np.ndarray:
    return (np.exp(np.exp(v) - 1) - 1) ** 2 - 1


def snip_background(intensity: np.ndarray, half_width: int, smooth: int = 1) -> np.ndarray:
    """SNIP background (Ryan et al. 1988; Morhac et al. 1997) of an evenly stepped pattern.

    Why SNIP: it needs no peak shapes or positions and only one setting (``half_width`` in points, wider
    than a peak's foot); it follows smooth, convex backgrounds (the decay of air scatter at low angle)
    exactly, where a polynomial fit needs a degree and bends under strong peaks, and a rolling minimum
    follows the noise minima and leaves steps. Iteration ``p`` (1 .. half_width) replaces each point by
    the smaller of itself and the mean of its neighbours ``p`` away, on the LLS-compressed counts; the
    ends are padded with the edge values. ``smooth`` points of moving average first put the background
    at the mean of the noise.
    """
    y = np.asarray(intensity, dtype=np.float64)
    if y.size == 0 or half_width < 1:
        return np.zeros_like(y)
    if smooth > 1:
        kernel = np.ones(smooth) / smooth
        y = np.convolve(np.pad(y, smooth // 2, mode="edge"), kernel, mode="valid")[: intensity.size]
    v = _lls(np.clip(y, 0.0, None))
    n = v.size
    padded = np.pad(v, half_width, mode="reflect", reflect_type="odd")
    for p in range(1, half_width + 1):
        centre = padded[half_width : half_width + n]
        mean = 0.5 * (
            padded[half_width - p : half_width - p + n] + padded[half_width + p : half_width + p + n]
        )
        padded[half_width : half_width + n] = np.minimum(centre, mean)
    return _lls_inverse(padded[half_width : half_width + n])


def subtract_background(
    two_theta: np.ndarray, intensity: np.ndarray, half_width_deg: float = BG_HALF_WIDTH_DEG
) -> np.ndarray:
    """Intensity minus its SNIP background (clipped at 0), window sizes converted from degrees to points."""
    step = float(np.median(np.diff(two_theta))) if len(two_theta) > 1 else 1.0
    half = max(1, round(half_width_deg / step))
    smooth = max(1, round(BG_SMOOTH_DEG / step))
    return np.clip(intensity - snip_background(intensity, half, smooth), 0.0, None)


def source_wavelength(pattern: MeasuredPattern, sim: SimulateParams, default: float | None = None) -> float:
    """The wavelength to convert from: the pattern's, else ``default``, else the training one (no shift).

    Cu K-alpha1+2 data (1.5418 average) and a simulation with ``kalpha2`` both have K-alpha1 at 1.5406 A
    and K-alpha2 beside it, so such data are already like the training patterns: converting the average
    would move the K-alpha1 component off its simulated position. Only then is 1.5406 used instead.
    """
    wl = pattern.wavelength if pattern.wavelength is not None else default
    if wl is None:
        return sim.wavelength
    if sim.kalpha2 and abs(sim.wavelength - CU_KA1) < 1e-4 and abs(wl - CU_KA_AVERAGE) < 1e-3:
        return CU_KA1
    return float(wl)


def to_training_grid(
    pattern: MeasuredPattern,
    sim: SimulateParams,
    *,
    default_wavelength: float | None = None,
    background: bool = True,
) -> np.ndarray:
    """The pattern as the model's training data: float32 on ``grid(two_theta_min, two_theta_max, step)``.

    In order: leading/trailing zero runs (unmeasured) dropped; SNIP background subtracted on the
    measured (even) steps; 2-theta converted to ``sim.wavelength`` through the d-spacings
    (:func:`source_wavelength` picks the wavelength to convert from); linear interpolation onto the
    grid, zero outside the measured range; scaled to a maximum of 1 over the grid. A pattern that
    overlaps the training range by less than 10 degrees, or has no signal left after the background, is
    an :class:`InputError`.
    """
    lo, hi = measured_range(pattern)
    keep = (pattern.two_theta >= lo) & (pattern.two_theta <= hi)
    tt, y = pattern.two_theta[keep], pattern.intensity[keep]
    if background:
        y = subtract_background(tt, y)
    wl = source_wavelength(pattern, sim, default_wavelength)
    tt_c = convert_wavelength(tt, wl, sim.wavelength)
    ok = np.isfinite(tt_c)
    tt_c, y = tt_c[ok], y[ok]
    lo_c, hi_c = (float(tt_c[0]), float(tt_c[-1])) if tt_c.size else (math.nan, math.nan)
    overlap = min(hi_c, sim.two_theta_max) - max(lo_c, sim.two_theta_min) if tt_c.size else -1.0
    if not overlap >= MIN_OVERLAP_DEG:
        where = f"{lo_c:.2f}-{hi_c:.2f}" if tt_c.size else "nothing"
        at = f" at {sim.wavelength:g} A" if wl != sim.wavelength else ""
        raise InputError(
            pattern.source,
            f"2-theta range {where} degrees{at} overlaps the training range {sim.two_theta_min:g}-"
            f"{sim.two_theta_max:g} by less than {MIN_OVERLAP_DEG:g} degrees",
        )
    g = grid(sim.two_theta_min, sim.two_theta_max, sim.step).astype(np.float64)
    out = np.interp(g, tt_c, y, left=0.0, right=0.0)
    top = float(out.max())
    if not top > 0:
        raise InputError(pattern.source, "no signal left after background subtraction (a flat pattern?)")
    return (out / top).astype(np.float32)
