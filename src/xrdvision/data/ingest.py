"""The ingest stage: gather CIFs (the embedded archive, a local folder or the COD server) into ``data/cifs``.

Every later stage keys its records by the file's stem, so this stage is where names are made uniform
(:func:`~xrdvision.data.cif_files.output_name`): a COD file becomes ``<cod id>.cif`` whatever it was
called, a user's own CIF keeps its (sanitised) stem. Each input is checked only as far as "is this a CIF
at all"; the structure itself is judged later by pymatgen in ``simulate``, which reports per-file failures
the same way. A bad file is a row in the report (``data/reports/ingest.csv``), never the end of the batch.
The embedded default is a tar archive (``data/embedded/cod-canonical.tar.xz``) read member by member, with
the same checks, names and report rows as a folder; a damaged or truncated archive costs the members it
damaged (one report row naming the archive and where), not the batch. Downloads go through
:class:`~xrdvision.data.cod_client.CodClient` and its cache.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import random
import shutil
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from xrdvision.config import Params
from xrdvision.data.cif_files import cif_problem, output_name, sanitise_stem
from xrdvision.data.cod_client import CodClient, CodError, CodNotFound, cached_cif
from xrdvision.errors import InputError, XrdVisionError, one_line
from xrdvision.formats.atomic import atomic_dir
from xrdvision.formats.tables import write_table

DEFAULT_CACHE_DIR = Path("data/cache/cod")
REPORT_COLUMNS = ("cod_id", "source", "status", "reason")


@dataclass
class _Row:
    cod_id: str
    source: str
    status: str  # ok / skipped / failed
    reason: str = ""


def _seeded_subset(items: list[Any], max_files: int, seed: int) -> list[Any]:
    """All ``items`` if ``max_files`` is 0 or covers them, else a seeded random subset in input order."""
    if max_files <= 0 or len(items) <= max_files:
        return items
    keep = set(random.Random(seed).sample(range(len(items)), max_files))
    return [item for i, item in enumerate(items) if i in keep]


def _local_cifs(folder: Path, what: str) -> list[Path]:
    """The ``*.cif`` files directly in ``folder`` (not below it: ``cod/bad`` must stay out), sorted."""
    if not folder.is_dir():
        raise InputError(folder, f"{what} not found")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".cif" and p.is_file())


class _Unreadable(Exception):
    """Internal: one input's bytes could not be read (the message is the report's reason)."""


@dataclass
class _Input:
    """One CIF to ingest: a file in a folder or a member of an archive."""

    source: str  # what the report's ``source`` column says
    path: PurePosixPath | Path  # its name, for :func:`output_name`
    read: Callable[[], bytes]  # its bytes, or _Unreadable


def _read_file(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise _Unreadable(f"unreadable: {exc.strerror}") from None

    return read


def _ingest_inputs(inputs: list[_Input], tmp_dir: Path) -> list[_Row]:
    rows: list[_Row] = []
    taken: dict[str, str] = {}
    for item in tqdm(inputs, desc="ingest", unit="cif", leave=False):
        try:
            data = item.read()
        except _Unreadable as exc:
            rows.append(_Row(sanitise_stem(item.path.stem), item.source, "failed", str(exc)))
            continue
        name = output_name(item.path, data)
        problem = cif_problem(data)
        if problem:
            rows.append(_Row(name, item.source, "failed", problem))
        elif name in taken:
            rows.append(_Row(name, item.source, "skipped", f"duplicate of {taken[name]}"))
        else:
            (tmp_dir / f"{name}.cif").write_bytes(data)
            taken[name] = item.source
            rows.append(_Row(name, item.source, "ok"))
    return rows


# What a damaged archive raises while it is read: tar structure, truncated or corrupt compressed data.
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error)
_COMPRESSED = (lzma.LZMAFile, gzip.GzipFile, bz2.BZ2File)


class _CountingTarInfo(tarfile.TarInfo):
    """Counts the 512-byte blocks that are neither a header nor zeros (``bad_blocks``, per archive).

    With ``ignore_zeros`` tarfile steps over such blocks to the next valid header, so one damaged
    header costs one member instead of the rest of the archive, but it says nothing; this tells.
    """

    bad_blocks = 0

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.InvalidHeaderError:
            cls.bad_blocks += 1
            raise


@contextlib.contextmanager
def _open_archive(archive: Path) -> Iterator[tuple[tarfile.TarFile, type[_CountingTarInfo]]]:
    """The tar archive (any of tarfile's compressions), reading on past damaged headers."""
    if not archive.is_file():
        raise InputError(archive, "embedded archive not found")
    counter = type("ArchiveTarInfo", (_CountingTarInfo,), {"bad_blocks": 0})
    try:
        tar = tarfile.open(archive, "r:*", tarinfo=counter)  # noqa: SIM115 - closed below
    except _ARCHIVE_ERRORS:
        reason = "not a readable tar archive (damaged, truncated or another format)"
        raise InputError(archive, reason) from None
    with tar:
        tar.ignore_zeros = True  # after the first header: step over damaged ones instead of stopping
        yield tar, counter


def _label(archive: Path, name: str) -> str:
    """How the report names an archive member: ``<archive>:<member name>``."""
    return f"{archive}:{name}"


def _list_cif_members(
    tar: tarfile.TarFile, counter: type[_CountingTarInfo], archive: Path
) -> tuple[list[tarfile.TarInfo], list[_Row]]:
    """The archive's regular ``*.cif`` members (any depth), and a row per damage found on the way."""
    members: list[tarfile.TarInfo] = []
    problems: list[_Row] = []
    end = 0  # where the next header should start

    def lost(where: str) -> None:
        if counter.bad_blocks:
            reason = (
                f"damaged tar header at byte {end}: {counter.bad_blocks} block(s) skipped {where}, "
                "the member(s) there are lost"
            )
            problems.append(_Row("", str(archive), "failed", reason))
            counter.bad_blocks = 0

    try:
        while (member := tar.next()) is not None:
            lost(f"before {member.name}")
            end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if member.isreg() and member.name.lower().endswith(".cif"):
                members.append(member)
        lost("at the end")
    except _ARCHIVE_ERRORS as exc:
        lost("before the damage")
        last = f"member {tar.members[-1].name}" if tar.members else "its start"
        reason = f"archive ends early or is corrupt after {last} ({one_line(exc)}); the rest is lost"
        problems.append(_Row("", str(archive), "failed", reason))
        garbled = isinstance(tar.fileobj, _COMPRESSED) and not isinstance(exc, EOFError)
        if garbled and members and members[-1] is tar.members[-1]:
            # Corrupt compressed data (not a clean truncation) may decode as garbage for a while
            # before the decoder notices: the member that ran into it is not trusted.
            name = members.pop().name
            why = "not trusted: the archive's compressed data is corrupt within or right after it"
            stem = sanitise_stem(PurePosixPath(name).stem)
            problems.insert(0, _Row(stem, _label(archive, name), "failed", why))
    return members, problems


def _member_reader(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            fh = tar.extractfile(member)
            return fh.read() if fh is not None else b""
        except _ARCHIVE_ERRORS as exc:
            raise _Unreadable(f"unreadable archive member: {one_line(exc)}") from None

    return read


def _ingest_archive(archive: Path, max_files: int, seed: int, tmp_dir: Path) -> list[_Row]:
    """Ingest the ``*.cif`` members of a tar archive (.tar, .tar.gz, .tar.xz, .tar.bz2), any depth.

    Members are listed, a seeded subset taken over their sorted names (so a folder and an archive of
    the same files give the same subset), then read in archive order. A member that cannot be read is
    a failed row (source ``<archive>:<member>``); damaged tar headers (members lost) and an archive
    that ends early or whose compressed data is corrupt are one row each, naming the archive and where.
    """
    with _open_archive(archive) as (tar, counter):
        members, problems = _list_cif_members(tar, counter, archive)
        chosen = _seeded_subset(sorted(members, key=lambda m: m.name), max_files, seed)
        chosen.sort(key=lambda m: m.offset)  # read forward: a compressed stream cannot seek back cheaply
        inputs = [
            _Input(_label(archive, m.name), PurePosixPath(m.name), _member_reader(tar, m)) for m in chosen
        ]
        rows = _ingest_inputs(inputs, tmp_dir)
    return rows + problems


def _ingest_cod(
    params: Params, tmp_dir: Path, cache_dir: Path, client: CodClient | None
) -> tuple[list[_Row], str]:
    cfg = params.ingest
    client = client or CodClient(cfg.cod_url, cfg.request_interval_s, cfg.retries, cfg.timeout_s)
    ids: list[int] = list(dict.fromkeys(cfg.cod_ids))
    if cfg.cod_query:
        try:
            found = client.search_ids(cfg.cod_query)
        except CodError as exc:
            raise XrdVisionError(f"COD search {cfg.cod_query}: {exc}") from None
        ids = list(dict.fromkeys([*ids, *found]))
    ids = _seeded_subset(ids, cfg.max_files, params.seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    rows: list[_Row] = []
    for cod_id in tqdm(ids, desc="ingest (COD)", unit="cif", leave=False):
        url = f"{client.base_url}/{cod_id}.cif"
        was_cached = cached_cif(cod_id, cache_dir) is not None
        try:
            path = client.fetch_cif(cod_id, cache_dir)
        except CodNotFound:
            rows.append(_Row(str(cod_id), url, "failed", "not found on COD"))
            continue
        except CodError as exc:
            reason = str(exc).removeprefix(f"{url}: ")
            rows.append(_Row(str(cod_id), url, "failed", reason))
            continue
        problem = cif_problem(path.read_bytes())
        if problem:
            rows.append(_Row(str(cod_id), url, "failed", problem))
            continue
        shutil.copyfile(path, tmp_dir / f"{cod_id}.cif")
        rows.append(_Row(str(cod_id), url, "ok", "from cache" if was_cached else ""))
    what = f"COD ids {cfg.cod_ids}" if cfg.cod_ids else ""
    if cfg.cod_query:
        what = f"{what} + " if what else what
        what += f"COD query {cfg.cod_query}"
    return rows, what or "COD (no ingest.cod_ids and no ingest.cod_query given)"


def _write_report(report_path: Path, rows: list[_Row]) -> None:
    write_table(report_path, REPORT_COLUMNS, ((r.cod_id, r.source, r.status, r.reason) for r in rows))


def run_ingest(
    params: Params,
    out_dir: str | Path,
    report_path: str | Path,
    *,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    client: CodClient | None = None,
) -> dict[str, Any]:
    """Gather the CIFs ``params.ingest`` names into ``out_dir`` as ``<cod_id>.cif``; report every file.

    ``out_dir`` is rebuilt whole and swapped in at the end (an interrupted run keeps the old one);
    ``report_path`` (CSV ``cod_id, source, status, reason``; ``source`` is the file's path, its
    ``<archive>:<member>`` name or its URL; a damaged archive's own row has an empty ``cod_id``) is
    written even when nothing usable came out, so the user can see why. ``ingest.max_files`` > 0 takes a
    seeded random subset (``params.seed``). COD downloads go through ``cache_dir`` first, so a repeated
    or interrupted run only fetches what it lacks; ``client`` lets tests point at a local server.

    Returns ``{"n_ok", "n_skipped", "n_failed", "reasons"}`` (``reasons``: count per non-ok reason).
    Raises :class:`XrdVisionError` if no usable CIF came out at all.
    """
    cfg = params.ingest
    out_dir, report_path = Path(out_dir), Path(report_path)
    rows: list[_Row] = []
    try:
        with atomic_dir(out_dir) as tmp_dir:
            if cfg.source == "cod":
                rows, what = _ingest_cod(params, tmp_dir, Path(cache_dir), client)
            elif cfg.source == "embedded":
                archive = Path(cfg.embedded)
                rows, what = _ingest_archive(archive, cfg.max_files, params.seed, tmp_dir), str(archive)
            else:
                folder = Path(cfg.folder)
                paths = _seeded_subset(_local_cifs(folder, "folder"), cfg.max_files, params.seed)
                inputs = [_Input(str(p), p, _read_file(p)) for p in paths]
                rows, what = _ingest_inputs(inputs, tmp_dir), str(folder)
            if not any(r.status == "ok" for r in rows):
                raise _NothingUsable(what, sum(1 for r in rows if r.cod_id))  # not archive rows
    except _NothingUsable as empty:
        _write_report(report_path, rows)
        detail = (
            f"none of {empty.n_files} file(s) was a usable CIF" if empty.n_files else "no CIF files found"
        )
        detail += "".join(f"; {r.reason}" for r in rows if not r.cod_id)  # a damaged archive says how
        raise XrdVisionError(f"{empty.what}: {detail} (source '{cfg.source}', see {report_path})") from None
    _write_report(report_path, rows)
    counts = Counter(r.status for r in rows)
    return {
        "n_ok": counts["ok"],
        "n_skipped": counts["skipped"],
        "n_failed": counts["failed"],
        "reasons": dict(Counter(r.reason for r in rows if r.status != "ok").most_common()),
    }


class _NothingUsable(Exception):
    """Internal: abort the folder swap (keep the previous output) when nothing usable came out."""

    def __init__(self, what: str, n_files: int) -> None:
        super().__init__(what)
        self.what = what
        self.n_files = n_files
