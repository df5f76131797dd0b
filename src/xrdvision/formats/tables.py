"""The CSV tables passed between stages (manifests, image indexes, split lists, reports), read in one place.

Every table is read with its required columns named: a missing file or column is one
:class:`~xrdvision.errors.InputError` naming the file and what is missing, never a ``KeyError`` later.
Tables are written with :func:`write_table`, atomically, so an interrupted stage leaves the old table or
the whole new one.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from xrdvision.errors import InputError
from xrdvision.formats.atomic import atomic_open

# A split list (data/split/<split>.csv): one row per image.
SPLIT_COLUMNS = ["image", "cod_id", "group", "crystal_system", "space_group"]


def read_table(
    path: str | Path, required: Iterable[str], what: str, *, hint: str = "", allow_empty: bool = True
) -> list[dict[str, str]]:
    """Rows of the CSV table ``path`` as dicts; ``required`` columns must be in its header.

    ``what`` names the table in messages ("manifest", "training split list"), ``hint`` says how to make a
    missing one (e.g. "run `dvc repro split` first"). With ``allow_empty=False`` a table with a header
    and no row is an error too.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{what} not found" + (f" ({hint})" if hint else ""))
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"{what} is not a readable CSV table ({exc})") from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise InputError(path, f"{what} lacks column(s) {', '.join(missing)}")
    if not allow_empty and not rows:
        raise InputError(path, f"{what} has no rows")
    return rows


def read_split(path: str | Path) -> list[dict[str, str]]:
    """Rows of a split list (``image, cod_id, group, crystal_system, space_group``)."""
    return read_table(
        path,
        ["image", "cod_id", "crystal_system", "space_group"],
        "split list",
        hint="run `dvc repro split` first",
    )


def write_table(
    path: str | Path,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any] | Mapping[str, Any]],
    *,
    lineterminator: str = "\r\n",
) -> None:
    """Write a header and ``rows`` (sequences in column order, or mappings by column) atomically."""
    with atomic_open(Path(path), "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator=lineterminator)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c, "") for c in columns] if isinstance(row, Mapping) else row)
