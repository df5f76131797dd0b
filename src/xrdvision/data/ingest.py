"""The ingest stage: gather CIFs (embedded sample, a local folder or the COD server) into ``data/cifs``.

Every later stage keys its records by the file's stem, so this stage is where names are made uniform
(:func:`~xrdvision.data.cif_files.output_name`): a COD file becomes ``<cod id>.cif`` whatever it was
called, a user's own CIF keeps its (sanitised) stem. Each input is checked only as far as "is this a CIF
at all"; the structure itself is judged later by pymatgen in ``simulate``, which reports per-file failures
the same way. A bad file is a row in the report (``data/reports/ingest.csv``), never the end of the batch.
Downloads go through :class:`~xrdvision.data.cod_client.CodClient` and its cache.
"""

from __future__ import annotations

import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from xrdvision.config import Params
from xrdvision.data.cif_files import cif_problem, output_name, sanitise_stem
from xrdvision.data.cod_client import CodClient, CodError, CodNotFound, cached_cif
from xrdvision.errors import InputError, XrdVisionError
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
