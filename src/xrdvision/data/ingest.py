"""Ingest: gather CIFs (embedded sample, a local folder or the COD server) into ``data/cifs/<cod_id>.cif``.

Every later stage keys its records by the file's stem, so this stage is where names are made uniform:
a COD file becomes ``<cod id>.cif`` whatever it was called, a user's own CIF keeps its (sanitised) stem.
Each input is checked only as far as "is this a CIF at all" (readable text with a ``data_`` block); the
structure itself is judged later by pymatgen in ``simulate``, which reports per-file failures the same way.
A bad file is a row in the report, never the end of the batch.

It also holds :func:`select_sample`, the reproducible rule that chose the embedded default sample
(``data/embedded/``), and :func:`build_embedded_sample`, which applies it and checks every pick loads.
"""

from __future__ import annotations

import contextlib
import csv
import email.utils
import io
import multiprocessing
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

from xrdvision import __version__
from xrdvision.config import Params
from xrdvision.crystal.bragg import CU_KA1
from xrdvision.crystal.systems import CRYSTAL_SYSTEMS
from xrdvision.errors import InputError, XrdVisionError
from xrdvision.formats.atomic import atomic_dir, atomic_open, atomic_path
from xrdvision.formats.tables import read_table

DEFAULT_CACHE_DIR = Path("data/cache/cod")
USER_AGENT = f"xrdvision/{__version__} (powder-XRD crystal-system classifier)"
REPORT_COLUMNS = ("cod_id", "source", "status", "reason")
SAMPLE_COLUMNS = ("cod_id", "formula", "space_group_number", "crystal_system", "n_atoms_in_cell")

# What ``build_embedded_sample`` dropped when it made data/embedded (xrayutilities cannot read them);
# ``select_sample(INDEX, SOURCES, 15, 42, 200, exclude=EMBEDDED_EXCLUDED)`` gives the sample again.
EMBEDDED_EXCLUDED = ("1100117", "1100975", "1100976", "1100977", "1100978", "1100979", "9007550")

_COD_CODE_RE = re.compile(rb"^[ \t]*_cod_database_code[ \t]+['\"]?(\d{7})\b", re.MULTILINE)
_DATA_BLOCK_RE = re.compile(rb"^[ \t]*data_\S+", re.MULTILINE | re.IGNORECASE)
_COD_ID_RE = re.compile(r"^\d{7}$")
_UNSAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


# --------------------------------------------------------------------------------------------------
# Pure checks on one file's bytes
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The embedded sample
# --------------------------------------------------------------------------------------------------


def _seeded_key(seed: int, kind: str, name: str) -> float:
    """A random number fixed by ``seed`` and ``name`` alone (not by what else is being shuffled)."""
    return random.Random(f"{seed}:{kind}:{name}").random()


def select_sample(
    index_csv: str | Path,
    sources_csv: str | Path,
    per_system: int = 15,
    seed: int = 42,
    max_atoms: int = 200,
    *,
    exclude: Iterable[str] = (),
    max_bytes: int | None = 100_000,
) -> list[str]:
    """Choose ``per_system`` COD ids per crystal system from ``../shared/cod``'s INDEX/SOURCES tables.

    The rule, so that the default pipeline is fast and its grouped split meaningful:

    - drop cod-tools test variants (altered files), cells with more than ``max_atoms`` sites, files
      larger than ``max_bytes`` (those carry structure factors the pipeline never reads) and ``exclude``;
    - keep one entry per compound (reduced formula + space group): duplicates would all land in one
      split group anyway and only shrink the effective sample;
    - within a system, go round-robin over its space groups in a seeded random order, so the sample
      spreads over space groups instead of piling into the commonest one; ordered structures (no partial
      occupancy) come first within a space group because their simulated patterns are the cleanest.

    Returns the chosen ids sorted by crystal system (in ``CRYSTAL_SYSTEMS`` order) then id. A system with
    fewer candidates than ``per_system`` contributes all it has.
    """
    if per_system < 1:
        raise ValueError("per_system must be >= 1")
    index_csv, sources_csv = Path(index_csv), Path(sources_csv)
    index = read_table(
        index_csv,
        ("cod_id", "formula", "space_group_number", "crystal_system", "n_atoms_in_cell"),
        "COD index",
    )
    sources = {
        r["cod_id"]: r
        for r in read_table(
            sources_csv, ("cod_id", "cod_tools_test_variant", "pymatgen_ordered"), "COD sources table"
        )
    }
    excluded = {str(e) for e in exclude}
    cif_dir = index_csv.parent

    candidates = []
    for row in sorted(index, key=lambda r: r["cod_id"]):  # the CSV's order must not matter
        cod_id = row["cod_id"]
        src = sources.get(cod_id, {})
        if cod_id in excluded or src.get("cod_tools_test_variant", "0") == "1":
            continue
        if int(row["n_atoms_in_cell"]) > max_atoms:
            continue
        if max_bytes is not None:
            path = cif_dir / f"{cod_id}.cif"
            if not path.is_file() or path.stat().st_size > max_bytes:
                continue
        candidates.append(row)

    # Ordered structures first, then a seeded random order. Each id (and below each space group) gets
    # its own random key, so excluding one file changes only that pick instead of reshuffling them all.
    candidates.sort(
        key=lambda r: (
            sources.get(r["cod_id"], {}).get("pymatgen_ordered", "1") != "1",
            _seeded_key(seed, "id", r["cod_id"]),
        )
    )

    seen_compounds: set[tuple[str, str]] = set()
    by_system: dict[str, dict[str, list[str]]] = {s: {} for s in CRYSTAL_SYSTEMS}
    for row in candidates:
        compound = (row["formula"], row["space_group_number"])
        if compound in seen_compounds or row["crystal_system"] not in by_system:
            continue
        seen_compounds.add(compound)
        by_system[row["crystal_system"]].setdefault(row["space_group_number"], []).append(row["cod_id"])

    chosen: list[str] = []
    for system in CRYSTAL_SYSTEMS:
        groups = sorted(by_system[system], key=lambda sg: _seeded_key(seed, "sg", sg))
        buckets = [by_system[system][sg] for sg in groups]
        picked: list[str] = []
        while len(picked) < per_system and any(buckets):
            for bucket in buckets:
                if bucket and len(picked) < per_system:
                    picked.append(bucket.pop(0))
        chosen.extend(sorted(picked))
    return chosen


def _silenced(fn: Any, *args: Any) -> Any:
    """Run ``fn`` with stdout swallowed (xrayutilities prints a line per ion it neutralises)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def check_cif_loads(path: str | Path, wavelength: float = CU_KA1, two_theta_max: float = 90.0) -> str:
    """Load ``path`` with pymatgen and with xrayutilities (peak list), or return why not ("" if fine).

    Mirrors what ``simulate`` needs: pymatgen for the labels, xrayutilities' ``fromCIF`` with the crystal
    renamed to ``cod_<id>`` (a bare number is not a valid name, FINDINGS.md) for the peak list.
    """
    import warnings

    from pymatgen.io.cif import CifParser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            structures = CifParser(path).parse_structures(primitive=False)
        except Exception as exc:
            return f"pymatgen: {type(exc).__name__}: {exc}"
        if not structures or len(structures[0]) == 0:
            return "pymatgen: no atoms in structure"
        try:
            import xrayutilities as xu

            crystal = _silenced(xu.materials.Crystal.fromCIF, str(path))
            crystal.name = f"cod_{sanitise_stem(Path(path).stem)}"
            powder = _silenced(
                lambda: xu.simpack.PowderDiffraction(
                    crystal, wl=wavelength, tt_cutoff=two_theta_max, enable_simulation=False
                )
            )
            if len(powder.data) == 0:
                return "xrayutilities: no peaks"
        except Exception as exc:
            return f"xrayutilities: {type(exc).__name__}: {exc}"
    return ""


def _warm_up() -> None:
    """Import the readers once so the first file's time is not the import time."""
    import pymatgen.io.cif  # noqa: F401
    import xrayutilities  # noqa: F401


def _timed_check(path: str) -> tuple[str, float]:
    start = time.perf_counter()
    problem = check_cif_loads(path)
    return problem, time.perf_counter() - start


@dataclass
class _Checker:
    """Runs :func:`check_cif_loads` in one worker process so a hanging file can be killed."""

    timeout_s: float
    _pool: Any = None

    def __call__(self, path: Path) -> tuple[str, float]:
        if self._pool is None:
            self._pool = multiprocessing.get_context("fork").Pool(1)
            self._pool.apply(_warm_up)
        try:
            return self._pool.apply_async(_timed_check, (str(path),)).get(timeout=self.timeout_s)
        except multiprocessing.TimeoutError:
            self.close()
            return f"timeout after {self.timeout_s:g} s", self.timeout_s

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def build_embedded_sample(
    cod_dir: str | Path,
    out_dir: str | Path,
    per_system: int = 15,
    seed: int = 42,
    max_atoms: int = 200,
    max_seconds: float = 1.0,
) -> dict[str, str]:
    """Select with :func:`select_sample`, drop picks that fail to load or load slowly, re-select, write.

    A pick that pymatgen or xrayutilities rejects, or that takes more than ``max_seconds`` to load and
    give a peak list, is excluded and the selection re-run (seeded, so the same files come out again),
    until every pick passes. Writes the CIFs, ``SAMPLE.csv`` into ``out_dir`` (replacing its ``*.cif``).
    Returns the excluded ids with their reasons (the README records them).
    """
    cod_dir, out_dir = Path(cod_dir), Path(out_dir)
    index_csv = cod_dir / "INDEX.csv"
    index = {r["cod_id"]: r for r in read_table(index_csv, SAMPLE_COLUMNS, "COD index")}
    excluded: dict[str, str] = {}
    passed: set[str] = set()
    checker = _Checker(timeout_s=max(30.0, 10 * max_seconds))
    try:
        while True:
            ids = select_sample(
                index_csv, cod_dir / "SOURCES.csv", per_system, seed, max_atoms, exclude=excluded
            )
            todo = [i for i in ids if i not in passed]
            if not todo:
                break
            for cod_id in tqdm(todo, desc="check sample", unit="cif", leave=False):
                problem, seconds = checker(cod_dir / f"{cod_id}.cif")
                if not problem and seconds > max_seconds:
                    problem = f"slow: {seconds:.2f} s to load and list peaks (> {max_seconds:g} s)"
                if problem:
                    excluded[cod_id] = problem
                else:
                    passed.add(cod_id)
    finally:
        checker.close()

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.cif"):
        if old.stem not in ids:
            old.unlink()
    for cod_id in ids:
        with atomic_path(out_dir / f"{cod_id}.cif") as tmp:
            shutil.copyfile(cod_dir / f"{cod_id}.cif", tmp)
    with atomic_open(out_dir / "SAMPLE.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(SAMPLE_COLUMNS)
        for cod_id in ids:
            writer.writerow([index[cod_id][c] for c in SAMPLE_COLUMNS])
    return excluded


# --------------------------------------------------------------------------------------------------
# The COD server
# --------------------------------------------------------------------------------------------------


class CodError(XrdVisionError):
    """A COD request that failed for good (after retries), or an answer that is not what was asked."""


class CodNotFound(CodError):
    """COD has no entry with that id (HTTP 404): retrying will not help."""


def _retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), None if absent/garbled."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def cached_cif(cod_id: int | str, dest_dir: str | Path) -> Path | None:
    """The already-downloaded, valid ``<dest_dir>/<cod_id>.cif``, or None (then it must be fetched)."""
    path = Path(dest_dir) / f"{cod_id}.cif"
    try:
        return path if looks_like_cod_cif(path.read_bytes()) else None
    except OSError:
        return None


class CodClient:
    """A polite client for the Crystallography Open Database's REST interface.

    Entries are ``<base_url>/<id>.cif``; searches are ``<base_url>/result?<fields>&format=lst`` (one id
    per line; fields as in COD's RESTful API page: ``el1``..``el8``, ``nel1``.., ``strictmin``,
    ``strictmax``, ``formula``, ``text``, ...). COD is a free service run by a small team, hence the
    minimum interval between requests, a User-Agent that names this tool, backoff that honours
    ``Retry-After``, and a download cache so an interrupted or repeated run asks only for what it lacks.
    """

    def __init__(
        self,
        base_url: str = "https://www.crystallography.net/cod",
        request_interval_s: float = 1.0,
        retries: int = 3,
        timeout_s: float = 30.0,
        session: requests.Session | None = None,
        *,
        backoff_s: float = 1.0,
        max_wait_s: float = 120.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.request_interval_s = request_interval_s
        self.retries = retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.max_wait_s = max_wait_s
        self.session = session if session is not None else requests.Session()
        agent = self.session.headers.get("User-Agent", "")
        if not agent or agent.startswith("python-requests"):  # keep a caller's own agent, replace the default
            self.session.headers["User-Agent"] = USER_AGENT
        self.n_requests = 0
        self._last_request = float("-inf")

    def _wait_turn(self) -> None:
        wait = self._last_request + self.request_interval_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last_request = time.monotonic()

    def _get(self, url: str, params: Mapping[str, Any] | None = None) -> requests.Response:
        """GET with rate limiting and retries; 404 -> :class:`CodNotFound`, give-up -> :class:`CodError`."""
        last_problem = ""
        for attempt in range(self.retries + 1):
            self._wait_turn()
            self.n_requests += 1
            delay = self.backoff_s * 2**attempt
            try:
                response = self.session.get(url, params=params, timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last_problem = f"{type(exc).__name__}"
            else:
                status = response.status_code
                if status == 404:
                    raise CodNotFound(f"{url}: not found on COD")
                if status < 400:
                    return response
                if status != 429 and status < 500:
                    raise CodError(f"{url}: HTTP {status} {response.reason}")
                last_problem = f"HTTP {status} {response.reason}"
                retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
                if retry_after is not None:
                    delay = retry_after
            if attempt < self.retries:
                time.sleep(min(delay, self.max_wait_s))
        raise CodError(f"{url}: {last_problem} after {self.retries + 1} attempt(s)")

    def fetch_cif(self, cod_id: int | str, dest_dir: str | Path) -> Path:
        """``<dest_dir>/<cod_id>.cif``, downloaded unless a valid copy is already there (resume)."""
        cached = cached_cif(cod_id, dest_dir)
        if cached is not None:
            return cached
        url = f"{self.base_url}/{cod_id}.cif"
        body = self._get(url).content
        if not looks_like_cod_cif(body):
            raise CodError(f"{url}: not a CIF (got HTML?)")
        dest = Path(dest_dir) / f"{cod_id}.cif"
        with atomic_path(dest) as tmp:
            tmp.write_bytes(body)
        return dest

    def search_ids(self, query: Mapping[str, Any]) -> list[int]:
        """COD ids matching ``query`` (COD search fields, e.g. ``{"el1": "Si", "el2": "O"}``), sorted."""
        if not query:
            raise CodError("ingest.cod_query: empty query (COD would answer with the whole database)")
        if "format" in query:
            raise CodError("ingest.cod_query: leave out 'format' (the ingest asks for format=lst itself)")
        url = f"{self.base_url}/result"
        response = self._get(url, params={**{k: str(v) for k, v in query.items()}, "format": "lst"})
        ids: set[int] = set()
        for line in response.text.splitlines():
            line = line.strip()
            if not line:
                continue
            if not line.isdigit():
                raise CodError(f"{response.url}: search did not return an id list (got {line[:40]!r})")
            ids.add(int(line))
        return sorted(ids)


# --------------------------------------------------------------------------------------------------
# The ingest stage
# --------------------------------------------------------------------------------------------------


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


def _ingest_local(paths: list[Path], tmp_dir: Path) -> list[_Row]:
    rows: list[_Row] = []
    taken: dict[str, Path] = {}
    for path in tqdm(paths, desc="ingest", unit="cif", leave=False):
        try:
            data = path.read_bytes()
        except OSError as exc:
            rows.append(_Row(sanitise_stem(path.stem), str(path), "failed", f"unreadable: {exc.strerror}"))
            continue
        name = output_name(path, data)
        problem = cif_problem(data)
        if problem:
            rows.append(_Row(name, str(path), "failed", problem))
        elif name in taken:
            rows.append(_Row(name, str(path), "skipped", f"duplicate of {taken[name]}"))
        else:
            (tmp_dir / f"{name}.cif").write_bytes(data)
            taken[name] = path
            rows.append(_Row(name, str(path), "ok"))
    return rows


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
    with atomic_open(report_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(REPORT_COLUMNS)
        for row in rows:
            writer.writerow([row.cod_id, row.source, row.status, row.reason])


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
    ``report_path`` (CSV ``cod_id, source, status, reason``; ``source`` is the file's path or URL) is
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
            else:
                folder = Path(cfg.embedded_dir if cfg.source == "embedded" else cfg.folder)
                label = "embedded sample folder" if cfg.source == "embedded" else "folder"
                paths = _seeded_subset(_local_cifs(folder, label), cfg.max_files, params.seed)
                rows, what = _ingest_local(paths, tmp_dir), str(folder)
            if not any(r.status == "ok" for r in rows):
                raise _NothingUsable(what, len(rows))
    except _NothingUsable as empty:
        _write_report(report_path, rows)
        detail = (
            f"none of {empty.n_files} file(s) was a usable CIF" if empty.n_files else "no CIF files found"
        )
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


if __name__ == "__main__":  # pragma: no cover - how data/embedded was made (see its README)
    import sys

    root = Path(__file__).resolve().parents[3]
    dropped = build_embedded_sample(
        Path(sys.argv[1]) if len(sys.argv) > 1 else root.parent / "shared" / "cod", root / "data" / "embedded"
    )
    for cod_id, why in sorted(dropped.items()):
        print(f"{cod_id}\t{why}")
