"""What a CIF file is called and whether it is one at all, judged from its bytes alone.

Every later stage keys its records by a CIF's stem, so one place decides the name: a COD file becomes
``<cod id>`` (from ``_cod_database_code``, else its file name), any other file keeps its sanitised stem.
:func:`cif_problem` only keeps junk out (empty files, binaries, HTML) and :func:`looks_like_cod_cif` tells
a COD answer from an error page; whether the structure is sound is pymatgen's call in ``simulate``. No
physics and no parser here, so the ingest stage that uses this loads nothing heavy.
"""

from __future__ import annotations

import re
from pathlib import Path

_COD_CODE_RE = re.compile(rb"^[ \t]*_cod_database_code[ \t]+['\"]?(\d{7})\b", re.MULTILINE)
_DATA_BLOCK_RE = re.compile(rb"^[ \t]*data_\S+", re.MULTILINE | re.IGNORECASE)
_COD_ID_RE = re.compile(r"^\d{7}$")
_UNSAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


def cif_problem(data: bytes) -> str | None:
    """Why ``data`` is not a usable CIF text (one line), or None if it looks like one.

    Deliberately shallow: readable text with a ``data_`` block. Whether the structure in it is sound
    is pymatgen's call in ``simulate``; this only keeps junk (empty files, binaries, HTML) out.
    """
    if not data.strip():
        return "empty file"
    if b"\x00" in data:
        return "not a text file (binary data)"
    if not _DATA_BLOCK_RE.search(data):
        head = data.lstrip()[:200].lower()
        if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
            return "not a CIF (got HTML?)"
        return "not a CIF: no data_ block"
    return None


def looks_like_cod_cif(data: bytes) -> bool:
    """True if a body fetched from COD is a CIF (a ``data_`` block and a cell), not an error page.

    COD answers some failures with an HTML page and status 200, so the status alone proves nothing.
    """
    return bool(_DATA_BLOCK_RE.search(data)) and b"_cell_length_a" in data


def _outside_text_fields(data: bytes) -> bytes:
    """``data`` without its semicolon-delimited text fields (where titles can quote other COD codes)."""
    kept, in_field = [], False
    for line in data.splitlines(keepends=True):
        if line.startswith(b";"):
            in_field = not in_field
        elif not in_field:
            kept.append(line)
    return b"".join(kept)


def cod_id_from_text(data: bytes) -> str | None:
    """The 7-digit ``_cod_database_code`` a COD CIF carries, or None.

    Only data items count: a text field may quote another entry's code (COD 9015630's title quotes
    ``_cod_database_code 1010070``), so text fields are skipped.
    """
    match = _COD_CODE_RE.search(_outside_text_fields(data))
    return match.group(1).decode("ascii") if match else None


def sanitise_stem(stem: str) -> str:
    """A file-name-safe version of a user's CIF stem (letters, digits, ``._-``; never empty)."""
    clean = _UNSAFE_NAME_RE.sub("_", stem).strip("._")
    return clean or "cif"


def output_name(path: Path, data: bytes) -> str:
    """The stem the file gets in ``data/cifs``: its COD id if it has one, else its sanitised stem.

    The id in the text wins over the file name because files are often renamed (``1000055-cell-diff``,
    ``quartz.cif``) while ``_cod_database_code`` is set by COD itself.
    """
    code = cod_id_from_text(data)
    if code is not None:
        return code
    if _COD_ID_RE.match(path.stem):
        return path.stem
    return sanitise_stem(path.stem)
