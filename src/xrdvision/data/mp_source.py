"""The Materials Project structures of ``../shared/mp``: read, labelled and kept apart from COD's test.

Why read the JSONL shards directly? Each line already holds a structure as arrays (``cell``,
``species``, ``frac``), which is what the batch simulator (:mod:`xrdvision.crystal.powder`) takes; a CIF
round trip through pymatgen would cost more than simulating. This module is the one reader of that
format, shared by the ``peaklists`` stage and the benchmarks:

* :func:`read_mp_records` yields checked records (the shard's fields plus ``reduced_formula`` and
  ``shard``), filtered (``icsd_only``, ``max_sites``, compounds to leave out) and optionally a seeded
  sample of ``max_structures``. Samples are nested: with the same filters and seed, the first 1 000
  drawn are among the 10 000 drawn.
* :func:`mp_labels` is the project's own label, spglib on the arrays at ``labels.symprec`` (the
  shard's ``sg`` is only compared with it), with the same fallback tolerances as
  :func:`xrdvision.crystal.labels.analyse_symmetry`.
* :func:`drop_compounds` is the leakage rule across sources: a record whose reduced formula (pymatgen's,
  as in COD's ``manifest.csv``) is in a given set is not trained on.

Bad input never stops a read: a missing shard (a gap in the numbering), a truncated or damaged one (its
records before the damage are kept), a line that is not a JSON object, a record with a missing field or
an unknown element each give one line naming the shard and the record (appended to ``errors`` and
logged as a warning), and the read goes on. Zero-volume cells and overlapping atoms are the
simulator's to find (:mod:`xrdvision.crystal.powder_input`), with the same kind of line.
"""

from __future__ import annotations

import functools
import json
import logging
import lzma
import os
import re
import warnings
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xrdvision.crystal.powder_input import cholesky_sym3, metric
from xrdvision.errors import InputError

log = logging.getLogger(__name__)

SHARD_GLOB = "structures-*.jsonl.xz"
_SHARD_NUMBER = re.compile(r"structures-(\d+)\.jsonl\.xz")
# Tried in turn after the asked tolerance, as crystal.labels.analyse_symmetry does (and ../shared/cod's
# INDEX.csv was made): looser first, then tighter.
FALLBACK_SYMPREC = (0.1, 0.001)
# Space-group number ranges of the seven crystal systems (International Tables).
_SYSTEM_BOUNDS = ((2, "triclinic"), (15, "monoclinic"), (74, "orthorhombic"), (142, "tetragonal"))
_SYSTEM_BOUNDS += ((167, "trigonal"), (194, "hexagonal"), (230, "cubic"))


@dataclass(frozen=True)
class Entry:
    """One readable record of the shards, as the first pass sees it (enough to filter and sample)."""

    shard: str  # file name, e.g. structures-03.jsonl.xz
    line: int  # 1-based line number in the shard
    id: str
    reduced_formula: str
    icsd: bool
    nsites: int


def crystal_system_of(space_group: int) -> str:
    """The crystal system of a space-group number (1-230); ``ValueError`` outside that range."""
    if not 1 <= int(space_group) <= 230:
        raise ValueError(f"space group {space_group} is not in 1-230")
    return next(name for top, name in _SYSTEM_BOUNDS if space_group <= top)


def mp_shards(folder: str | Path, errors: list[str] | None = None) -> list[Path]:
    """The shard files of ``folder`` in order; a gap in their numbering is one line per missing shard.

    A folder that does not exist or holds no shard is an :class:`InputError` (nothing to read at all).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "Materials Project shard folder not found (see README: mp.folder)")
    shards = sorted(folder.glob(SHARD_GLOB))
    if not shards:
        raise InputError(folder, f"no shards ({SHARD_GLOB}) in the Materials Project folder")
    found = [m.group(1) for p in shards if (m := _SHARD_NUMBER.fullmatch(p.name))]
    numbers, width = {int(x) for x in found}, len(found[0]) if found else 2
    for n in sorted(set(range(min(numbers, default=0), max(numbers, default=-1) + 1)) - numbers):
        _report(errors, str(InputError(folder / f"structures-{n:0{width}d}.jsonl.xz", "missing shard")))
    return shards


def _report(errors: list[str] | None, line: str) -> None:
    log.warning("%s", line)
    if errors is not None:
        errors.append(line)


def shard_lines(path: Path, errors: list[str] | None = None) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a shard; a truncated or damaged shard ends with one error line."""
    n = 0
    try:
        with lzma.open(path, "rt", encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                yield n, line
    except (EOFError, lzma.LZMAError, UnicodeDecodeError) as exc:
        _report(errors, str(InputError(path.name, f"truncated or damaged after line {n} ({exc})")))
    except OSError as exc:
        _report(errors, str(InputError(path.name, f"cannot read: {exc.strerror or exc}")))


@functools.cache
def _elements() -> frozenset[str]:
    from pymatgen.core.periodic_table import Element

    return frozenset(e.symbol for e in Element)


@functools.lru_cache(maxsize=1 << 16)
def _reduced_formula(counts: tuple[tuple[str, int], ...]) -> str:
    from pymatgen.core import Composition

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No Pauling electronegativity for He": harmless here
        return str(Composition(dict(counts)).reduced_formula)


def reduced_formula(species: Iterable[str]) -> str:
    """pymatgen's reduced formula of a list of element symbols (``["O", "Si", "O"]`` -> ``"SiO2"``),
    the same function COD's ``manifest.csv`` column comes from, so the two sources group together."""
    return _reduced_formula(tuple(sorted(Counter(species).items())))


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def check_record(rec: Any) -> dict[str, Any]:
    """A shard line's object, checked: ``ValueError`` saying what is wrong; else the record with
    ``reduced_formula`` added (``icsd`` defaults to false, ``sg`` to None)."""
    if not isinstance(rec, dict):
        raise ValueError(f"not a JSON object but {type(rec).__name__}")
    missing = [k for k in ("id", "cell", "species", "frac") if k not in rec]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    cell, species, frac = rec["cell"], rec["species"], rec["frac"]
    if not (isinstance(cell, list) and len(cell) == 6 and all(_number(x) for x in cell)):
        raise ValueError(f"cell must be 6 numbers (a, b, c, alpha, beta, gamma), got {cell!r}"[:200])
    if not (isinstance(species, list) and species and all(isinstance(s, str) for s in species)):
        raise ValueError("species must be a non-empty list of element symbols")
    ok = isinstance(frac, list) and len(frac) == len(species)
    if not (ok and all(isinstance(f, list) and len(f) == 3 and all(map(_number, f)) for f in frac)):
        raise ValueError(f"frac must be {len(species)} triples of numbers (one per species)")
    unknown = sorted(set(species) - _elements())
    if unknown:
        raise ValueError(f"unknown element {unknown[0]!r} (atom {species.index(unknown[0])})")
    out = dict(rec)
    out["id"] = str(rec["id"])
    out["icsd"] = bool(rec.get("icsd", False))
    out["sg"] = rec["sg"] if isinstance(rec.get("sg"), int) and not isinstance(rec["sg"], bool) else None
    out["nsites"] = len(species)
    out["reduced_formula"] = reduced_formula(species)
    return out


def iter_shard(path: Path, errors: list[str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, checked record)`` of every good line of one shard (bad ones reported)."""
    for n, text in shard_lines(path, errors):
        if not text.strip():
            continue
        try:
            rec = check_record(json.loads(text))
        except (ValueError, RecursionError) as exc:  # json.JSONDecodeError is a ValueError
            what = _record_name(text, n)
            _report(errors, str(InputError(f"{path.name}:{what}", str(exc) or type(exc).__name__)))
            continue
        rec["shard"] = path.name
        yield n, rec


def _record_name(text: str, n: int) -> str:
    """``mp-123 (line 7)`` when the id can be found in a bad line, else ``line 7``."""
    m = re.search(r'"id"\s*:\s*"([^"]{1,40})"', text)
    return f"{m.group(1)} (line {n})" if m else f"line {n}"


def catalogue(
    shards: Iterable[Path], errors: list[str] | None = None, *, with_records: bool = False
) -> Iterator[Entry | tuple[Entry, dict[str, Any]]]:
    """The first pass: an :class:`Entry` per good record (with the record too if asked)."""
    for path in shards:
        for n, rec in iter_shard(path, errors):
            entry = Entry(path.name, n, rec["id"], rec["reduced_formula"], rec["icsd"], rec["nsites"])
            yield (entry, rec) if with_records else entry


def eligible(entry: Entry, *, icsd_only: bool = False, max_sites: int = 0) -> bool:
    """Whether a record passes the filters (``max_sites`` 0: no limit)."""
    return (entry.icsd or not icsd_only) and (max_sites <= 0 or entry.nsites <= max_sites)


def sample(entries: list[Entry], max_structures: int, seed: int) -> list[Entry]:
    """A seeded sample of ``max_structures`` entries (0 or more than there are: all), in shard order.

    The first ``n`` of one permutation, so a smaller sample is part of a larger one.
    """
    if max_structures <= 0 or max_structures >= len(entries):
        return list(entries)
    rng = np.random.default_rng([int(seed), 0x4D50])  # 0x4D50 "MP": a stream of its own
    chosen = np.sort(rng.permutation(len(entries))[:max_structures])
    return [entries[i] for i in chosen]


def drop_compounds(
    records: Iterable[Mapping[str, Any]], formulas: Collection[str], dropped: list[str] | None = None
) -> Iterator[Mapping[str, Any]]:
    """The records whose ``reduced_formula`` is not in ``formulas`` (the leakage rule across sources:
    a compound in COD's validation or test set is not trained on); ids of the others go to ``dropped``."""
    for rec in records:
        if rec["reduced_formula"] in formulas:
            if dropped is not None:
                dropped.append(str(rec["id"]))
            continue
        yield rec


def read_mp_records(
    folder: str | Path,
    *,
    icsd_only: bool = False,
    max_sites: int = 0,
    max_structures: int = 0,
    seed: int = 42,
    exclude_formulas: Collection[str] = (),
    errors: list[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Checked records of the shards in ``folder`` (in shard and line order), filtered, without the
    compounds in ``exclude_formulas``, and a seeded sample of ``max_structures`` of what is left (0:
    all). Each is the shard's object (``id``, ``formula``, ``cell``, ``species``, ``frac``, ``sg``,
    ``icsd``, ...) plus ``reduced_formula``, ``nsites`` and ``shard``. Bad input: see the module doc
    (one line each in ``errors``). A sample takes two passes over the shards (the first keeps ids only).
    """
    shards = mp_shards(folder, errors)

    def keep(e: Entry) -> bool:
        return eligible(e, icsd_only=icsd_only, max_sites=max_sites) and e.reduced_formula not in (
            exclude_formulas
        )

    if max_structures <= 0:
        for entry, rec in catalogue(shards, errors, with_records=True):  # type: ignore[misc]
            if keep(entry):
                yield rec
        return
    first_pass: list[str] = []  # errors of the second pass repeat the first's
    chosen = sample([e for e in catalogue(shards, errors) if keep(e)], max_structures, seed)  # type: ignore[arg-type]
    wanted: dict[str, set[int]] = {}
    for e in chosen:
        wanted.setdefault(e.shard, set()).add(e.line)
    for path in shards:
        lines = wanted.get(path.name)
        if lines:
            yield from read_lines(path, lines, first_pass)


def read_lines(path: Path, lines: Collection[int], errors: list[str] | None = None) -> list[dict[str, Any]]:
    """The checked records at ``lines`` (1-based) of one shard, in line order (a task's input)."""
    wanted = set(lines)
    out: list[dict[str, Any]] = []
    last = max(wanted, default=0)
    for n, text in shard_lines(path, errors):
        if n in wanted:
            try:
                rec = check_record(json.loads(text))
            except (ValueError, RecursionError) as exc:
                _report(errors, str(InputError(f"{path.name}:{_record_name(text, n)}", str(exc))))
                continue
            rec["shard"] = path.name
            out.append(rec)
        if n >= last:
            break
    return out


def mp_labels(
    record: Mapping[str, Any], symprec: float = 0.01, angle_tolerance: float = 5.0
) -> tuple[int, str]:
    """``(space group, crystal system)`` of a record from spglib on its arrays (no pymatgen object),
    at ``symprec`` (A), then the fallback tolerances; ``ValueError`` if none gives a space group
    (or the cell is impossible)."""
    os.environ.setdefault("SPGLIB_WARNING", "OFF")  # its C code prints a line per failed tolerance try
    import spglib

    lattice = cholesky_sym3(metric(record["cell"]))  # rows a, b, c; the orientation does not matter
    frac = np.asarray(record["frac"], dtype=np.float64)
    kinds = {s: i + 1 for i, s in enumerate(dict.fromkeys(record["species"]))}
    numbers = np.array([kinds[s] for s in record["species"]], dtype=np.intc)
    for prec in (symprec, *(p for p in FALLBACK_SYMPREC if p != symprec)):
        try:
            dataset = spglib.get_symmetry_dataset(
                (lattice, frac, numbers), symprec=prec, angle_tolerance=angle_tolerance
            )
        except Exception:  # spglib >= 2.5 may raise SpglibError instead of returning None
            dataset = None
        if dataset is not None:
            number = int(dataset.number)
            return number, crystal_system_of(number)
    raise ValueError(f"spglib found no space group at symprec {symprec} or {FALLBACK_SYMPREC}")
