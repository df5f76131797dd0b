"""How the embedded default (``data/embedded/cod-canonical.tar.xz``) was made from ``../shared/cod``.

The pipeline's default runs on the 719 canonical COD structures of ``../shared/cod``, shipped in the
repository as one compressed archive, so that ``make repro`` needs neither the network nor ``../shared``
and its test split is large enough to judge a model. :func:`canonical_ids` is the selection rule,
:func:`write_archive` writes a tar.xz deterministically (the same files give the same bytes) and
:func:`build_embedded` applies both. Not part of any DVC stage: ``ingest`` reads the archive this wrote.
``python -m xrdvision.data.embedded [../shared/cod]`` rebuilds ``data/embedded``.
"""

from __future__ import annotations

import io
import logging
import lzma
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from xrdvision.errors import InputError
from xrdvision.formats.atomic import atomic_path
from xrdvision.formats.tables import read_table, write_table

log = logging.getLogger(__name__)

ARCHIVE_NAME = "cod-canonical.tar.xz"
SAMPLE_COLUMNS = ("cod_id", "formula", "space_group_number", "crystal_system", "n_atoms_in_cell")
SOURCES_COLUMNS = ("cod_id", "cod_tools_test_variant")

# Fixed member metadata: an archive's bytes depend on the files' names and contents only.
_MTIME = 0
_MODE = 0o644
_XZ_PRESET = 9 | lzma.PRESET_EXTREME


def canonical_ids(index_csv: str | Path, sources_csv: str | Path) -> list[str]:
    """The canonical COD entries of ``../shared/cod``: every id of INDEX.csv that is no cod-tools variant.

    ``SOURCES.csv`` marks the cod-tools test files that the COD developers decorated or altered on purpose
    (``cod_tools_test_variant=1``); they are left out, everything else is kept. An INDEX id without a
    SOURCES row is an error rather than a guess. Returns the ids sorted (as strings, all 7 digits).
    """
    index = read_table(index_csv, SAMPLE_COLUMNS, "COD index")
    sources = {r["cod_id"]: r for r in read_table(sources_csv, SOURCES_COLUMNS, "COD sources table")}
    missing = sorted({r["cod_id"] for r in index} - set(sources))
    if missing:
        raise InputError(sources_csv, f"no row for {len(missing)} indexed id(s), e.g. {missing[0]}")
    return sorted(r["cod_id"] for r in index if sources[r["cod_id"]]["cod_tools_test_variant"] != "1")


def write_archive(out: str | Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` (member name -> bytes) as a tar.xz at ``out``, reproducibly and atomically.

    Members are regular files in name order with fixed metadata (mtime 0, mode 644, uid/gid 0, no
    owner names), in the POSIX ustar format, compressed as one xz stream (preset 9e, CRC64): the same
    names and contents give the same bytes (for a given liblzma version).
    """
    with (
        atomic_path(out) as tmp,
        tarfile.open(tmp, "w:xz", format=tarfile.USTAR_FORMAT, preset=_XZ_PRESET) as tar,
    ):
        for name in sorted(files):
            data = files[name]
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _MTIME, _MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


def read_members(archive: str | Path, names: Iterable[str] | None = None) -> dict[str, bytes]:
    """The regular members of ``archive`` (all, or those named) as name -> bytes, in archive order.

    For tests and tools (e.g. a smaller archive of some of the shipped CIFs); ``ingest`` reads archives
    itself, member by member, with a report line per bad one. A name that is not there is an error.
    """
    wanted = None if names is None else set(names)
    out: dict[str, bytes] = {}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            if member.isreg() and (wanted is None or member.name in wanted):
                fh = tar.extractfile(member)
                assert fh is not None  # a regular member always has data
                out[member.name] = fh.read()
    if wanted is not None and wanted - set(out):
        raise InputError(archive, f"no member {sorted(wanted - set(out))[0]}")
    return out


def build_embedded(cod_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Write ``out_dir/cod-canonical.tar.xz`` and ``out_dir/SAMPLE.csv`` from ``cod_dir`` (../shared/cod).

    The archive holds ``<cod id>.cif`` for every id :func:`canonical_ids` keeps, byte for byte;
    ``SAMPLE.csv`` is their ``INDEX.csv`` rows (label columns as spglib gave them). Loose ``*.cif`` files
    left in ``out_dir`` by the earlier folder-based sample are removed. Returns the ids.
    """
    cod_dir, out_dir = Path(cod_dir), Path(out_dir)
    index_csv = cod_dir / "INDEX.csv"
    ids = canonical_ids(index_csv, cod_dir / "SOURCES.csv")
    index = {r["cod_id"]: r for r in read_table(index_csv, SAMPLE_COLUMNS, "COD index")}
    files: dict[str, bytes] = {}
    for cod_id in ids:
        path = cod_dir / f"{cod_id}.cif"
        if not path.is_file():
            raise InputError(path, "indexed CIF not found")
        files[path.name] = path.read_bytes()
    write_archive(out_dir / ARCHIVE_NAME, files)
    write_table(out_dir / "SAMPLE.csv", SAMPLE_COLUMNS, (index[cod_id] for cod_id in ids))
    for old in out_dir.glob("*.cif"):
        old.unlink()
    return ids


if __name__ == "__main__":  # pragma: no cover - how data/embedded was made (see its README)
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(__file__).resolve().parents[3]
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else root.parent / "shared" / "cod"
    kept = build_embedded(source, root / "data" / "embedded")
    archive = root / "data" / "embedded" / ARCHIVE_NAME
    log.info("%d CIFs -> %s (%.2f MB)", len(kept), archive, archive.stat().st_size / 1e6)
