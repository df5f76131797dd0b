"""Labels of a structure: formula, crystal system and space group, from a CIF via pymatgen + spglib.

The label the model learns is the space group that spglib *detects* in the parsed structure, not the
one the CIF declares: a declared group can be wrong or in a setting that hides the real symmetry (H-less
or disordered structures), and the detected one is what the simulated pattern actually shows. The
declared group is kept beside it, and a disagreement is flagged, so that such entries can be audited or
left out later.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xrdvision.crystal.systems import CRYSTAL_SYSTEMS
from xrdvision.errors import InputError

# spglib tolerances tried in turn when detection fails; the order is the one ../shared/cod/INDEX.csv
# was made with (0.01, then 0.1, then 0.001), so our labels agree with that index.
_FALLBACK_SYMPREC = (0.1, 0.001)

_NUMBER_TAGS = ("_space_group_it_number", "_space_group.it_number", "_symmetry_int_tables_number")
_SYMBOL_TAGS = (
    "_symmetry_space_group_name_h-m",
    "_space_group_name_h-m_alt",
    "_space_group.name_h-m_alt",
)


@dataclass(frozen=True)
class Labels:
    """What we know about one structure's composition and symmetry."""

    formula: str
    reduced_formula: str
    crystal_system: str
    space_group: int
    space_group_symbol: str
    declared_space_group: int | None
    symmetry_mismatch: bool


def read_structure(path: str | Path) -> Any:
    """The first structure of a CIF as pymatgen parses it (conventional cell as given, not primitive).

    pymatgen warns loudly on many valid COD files (implicit hydrogens, rounded occupancies); those
    warnings are not the user's business, so they are silenced. A file pymatgen cannot read is an
    :class:`InputError` naming the file and pymatgen's reason (with the cause pymatgen only gives as a
    warning, e.g. an occupancy over 1, when it has one).
    """
    from pymatgen.io.cif import CifParser

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            structures = CifParser(path).parse_structures(primitive=False)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            detail = _why_no_structure([str(w.message) for w in caught])
            reason = f"pymatgen: {first}" + (f" ({detail})" if detail else "")
            raise InputError(path, reason) from None
    if not structures:
        raise InputError(path, "pymatgen: Invalid CIF file with no structures!")
    structure = structures[0]
    if len(structure) == 0:
        raise InputError(path, "no atoms")
    return structure


def _why_no_structure(messages: list[str]) -> str:
    """The cause pymatgen gives in a warning ("No structure parsed ...\\nOccupancy 5.0 exceeded ...")."""
    for msg in messages:
        lines = [s.strip() for s in msg.splitlines() if s.strip()]
        if lines and lines[0].startswith("No structure parsed") and len(lines) > 1:
            return " ".join(lines[1:])
    return ""


def declared_space_group(path: str | Path) -> int | None:
    """The space-group number the CIF itself declares, or None if it declares none we can read.

    The number tags (``_space_group_IT_number``, ``_symmetry_Int_Tables_number``) win; otherwise the
    Hermann-Mauguin symbol is looked up among all 530 settings spglib knows (short, full and
    setting-specific forms, e.g. ``P 1 21/n 1`` -> 14, ``B m e b`` -> 64).
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    values = _first_values(text, _NUMBER_TAGS + _SYMBOL_TAGS)
    for tag in _NUMBER_TAGS:
        value = values.get(tag)
        if value is not None and re.fullmatch(r"\d{1,3}", value) and 1 <= int(value) <= 230:
            return int(value)
    for tag in _SYMBOL_TAGS:
        value = values.get(tag)
        if value is not None:
            number = _lookup_symbol(value)
            if number is not None:
                return number
    return None


def _first_values(text: str, tags: tuple[str, ...]) -> dict[str, str]:
    """First value of each of ``tags`` in a CIF's text (tag and value on one line; quotes removed)."""
    out: dict[str, str] = {}
    pattern = re.compile(r"^\s*(_\S+)[ \t]+(.+?)\s*$", re.MULTILINE)
    for match in pattern.finditer(text):
        tag = match.group(1).lower()
        if tag in tags and tag not in out:
            value = match.group(2).strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1].strip()
            if value not in ("", "?", "."):
                out[tag] = value
    return out


def _normalise_symbol(symbol: str) -> str:
    """``"R -3 2/c (hexagonal axes)"`` -> ``"r-32/c"``: no spaces, underscores, setting suffix or note."""
    symbol = re.sub(r"(\d)\((\d)\)", r"\1\2", symbol)  # "P2(1)/n": old screw-axis notation
    symbol = re.sub(r"\(.*?\)|\{.*?\}", "", symbol)  # "(hexagonal axes)", "{origin @ centre}"
    symbol = symbol.split(":")[0]  # origin choice / axes: ":2", ":H"
    symbol = re.sub(r"\s+[SZHR]\s*$", "", symbol.strip())  # "P 42/m m c S": a setting letter
    return re.sub(r"[\s_]", "", symbol).lower()


def _symbol_variants(key: str) -> list[str]:
    """Other spellings of a normalised symbol: short from full, old cubic, short monoclinic."""
    out = [key]
    short = re.sub(r"(?<![\d/])2(1)?/", "", key)  # full -> short: "c2/m2/c21/a" -> "cmca"
    out.append(short)
    for k in (key, short):
        # Old cubic notation without the bar: "pm3m" -> "pm-3m", "fd3m" -> "fd-3m".
        out.append(re.sub(r"(?<=[mnadb])3", "-3", k))
        # Short monoclinic with unique axis b: "p21/n" -> "p121/n1".
        m = re.fullmatch(r"([pabcfi])(21/[a-z]|2/[a-z]|21|2|[a-z])", k)
        if m:
            out.append(f"{m.group(1)}1{m.group(2)}1")
    return out


@functools.cache
def _symbol_to_number() -> dict[str, int]:
    """Every way spglib writes each of its 530 Hall settings, normalised, -> space-group number.

    Old names of the e-glide groups (``Cmca`` for ``Cmce``, 64) are added after the real names so they
    never shadow one.
    """
    import spglib

    table: dict[str, int] = {}
    for hall in range(1, 531):
        sg = spglib.get_spacegroup_type(hall)
        for name in (sg.international_short, sg.international_full, *sg.international.split("=")):
            table.setdefault(_normalise_symbol(name), sg.number)
    for key, number in list(table.items()):
        if "e" in key:
            for glide in "abc":
                table.setdefault(key.replace("e", glide), number)
    return table


def _lookup_symbol(symbol: str) -> int | None:
    table = _symbol_to_number()
    for key in _symbol_variants(_normalise_symbol(symbol)):
        if key in table:
            return table[key]
    return None


def analyse_symmetry(structure: Any, symprec: float = 0.01, angle_tolerance: float = 5.0) -> Any:
    """A pymatgen ``SpacegroupAnalyzer``, retrying looser then tighter tolerances when spglib fails.

    Raises ``ValueError`` when no tolerance works (the caller names the file).
    """
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    last: Exception | None = None
    for prec in (symprec, *(p for p in _FALLBACK_SYMPREC if p != symprec)):
        try:
            return SpacegroupAnalyzer(structure, symprec=prec, angle_tolerance=angle_tolerance)
        except Exception as exc:  # spglib: SymmetryUndeterminedError or a C++ error
            last = exc
    raise ValueError(f"spglib found no space group at symprec {symprec} or {_FALLBACK_SYMPREC}: {last}")


def labels_from_analyzer(structure: Any, sga: Any, declared: int | None = None) -> Labels:
    """:class:`Labels` from an already run ``SpacegroupAnalyzer`` (so the caller can reuse it)."""
    number = int(sga.get_space_group_number())
    return Labels(
        formula=structure.composition.formula,
        reduced_formula=structure.composition.reduced_formula,
        crystal_system=str(sga.get_crystal_system()),
        space_group=number,
        space_group_symbol=str(sga.get_space_group_symbol()),
        declared_space_group=declared,
        symmetry_mismatch=declared is not None and declared != number,
    )


def derive_labels(
    structure: Any,
    symprec: float = 0.01,
    angle_tolerance: float = 5.0,
    declared: int | None = None,
    path: str | Path = "<structure>",
) -> Labels:
    """Formula, crystal system and space group (spglib) of ``structure``; ``declared`` is the CIF's own.

    An undeterminable symmetry is an :class:`InputError` naming ``path``.
    """
    try:
        sga = analyse_symmetry(structure, symprec, angle_tolerance)
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
    return labels_from_analyzer(structure, sga, declared)


def class_names(mode: str) -> list[str]:
    """The class names of a label mode, in a fixed order (the model's output index)."""
    if mode == "crystal_system":
        return list(CRYSTAL_SYSTEMS)
    if mode == "space_group":
        return [str(n) for n in range(1, 231)]
    raise ValueError(f"unknown label mode {mode!r} (crystal_system or space_group)")


def label_value(labels_or_row: Labels | Mapping[str, Any], mode: str) -> str:
    """The class name of one structure: from :class:`Labels` or a manifest/split row (a mapping)."""
    if mode not in ("crystal_system", "space_group"):
        raise ValueError(f"unknown label mode {mode!r} (crystal_system or space_group)")
    if isinstance(labels_or_row, Labels):
        value: Any = getattr(labels_or_row, mode)
    else:
        value = labels_or_row[mode]
    if mode == "space_group":
        return str(int(float(value)))
    return str(value)
