"""The embedded default: the selection rule, the shipped archive is exactly what it gives, and rebuilds."""

from __future__ import annotations

import csv
import hashlib
import tarfile
from pathlib import Path

import pytest

from conftest import EMBEDDED_DIR
from xrdvision.data.embedded import (
    ARCHIVE_NAME,
    SAMPLE_COLUMNS,
    build_embedded,
    canonical_ids,
    read_members,
    write_archive,
)

ARCHIVE = EMBEDDED_DIR / ARCHIVE_NAME


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_canonical_ids_are_all_but_the_cod_tools_variants(cod_dir: Path) -> None:
    ids = canonical_ids(cod_dir / "INDEX.csv", cod_dir / "SOURCES.csv")

    sources = _rows(cod_dir / "SOURCES.csv")
    variants = {r["cod_id"] for r in sources if r["cod_tools_test_variant"] == "1"}
    indexed = {r["cod_id"] for r in _rows(cod_dir / "INDEX.csv")}
    assert len(indexed) == 852 and len(variants) == 133
    assert ids == sorted(indexed - variants) and len(ids) == 719
    assert not {p.stem for p in (cod_dir / "bad").glob("*.cif")} & set(ids)  # bad/ is a separate folder
    assert all((cod_dir / f"{i}.cif").is_file() for i in ids)


def test_shipped_archive_is_exactly_the_canonical_cod_files(cod_dir: Path) -> None:
    ids = canonical_ids(cod_dir / "INDEX.csv", cod_dir / "SOURCES.csv")
    members = read_members(ARCHIVE)

    assert list(members) == [f"{i}.cif" for i in ids]  # in name order
    assert all(data == (cod_dir / name).read_bytes() for name, data in members.items())
    index = {r["cod_id"]: r for r in _rows(cod_dir / "INDEX.csv")}
    assert _rows(EMBEDDED_DIR / "SAMPLE.csv") == [{k: index[i][k] for k in SAMPLE_COLUMNS} for i in ids]
    assert ARCHIVE.stat().st_size < 5_000_000  # one compressed file of about 1 MB, not 7 MB of CIFs
    assert not list(EMBEDDED_DIR.glob("*.cif"))


def test_write_archive_is_deterministic(tmp_path: Path) -> None:
    files = {"b.cif": b"data_b\n", "a/c.cif": b"data_c\n", "a.cif": b"data_a\n" * 100}
    write_archive(tmp_path / "one.tar.xz", files)
    write_archive(tmp_path / "two.tar.xz", dict(reversed(files.items())))
    write_archive(tmp_path / "other.tar.xz", {**files, "b.cif": b"data_B\n"})

    one = (tmp_path / "one.tar.xz").read_bytes()
    assert one == (tmp_path / "two.tar.xz").read_bytes()
    assert one != (tmp_path / "other.tar.xz").read_bytes()
    with tarfile.open(tmp_path / "one.tar.xz") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(files)
    assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname, m.type) for m in members} == {
        (0, 0o644, 0, 0, "", "", tarfile.REGTYPE)
    }
    assert read_members(tmp_path / "one.tar.xz") == dict(sorted(files.items()))


@pytest.mark.slow  # ~5 s: xz at preset 9e over 7.4 MB
def test_build_embedded_rebuilds_the_shipped_archive_byte_for_byte(cod_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "embedded"
    out.mkdir()
    (out / "1000000.cif").write_text("data_left_over_from_the_old_sample\n")

    ids = build_embedded(cod_dir, out)

    assert len(ids) == 719
    assert sorted(p.name for p in out.iterdir()) == sorted([ARCHIVE_NAME, "SAMPLE.csv"])
    digest = hashlib.sha256((out / ARCHIVE_NAME).read_bytes()).hexdigest()
    assert digest == hashlib.sha256(ARCHIVE.read_bytes()).hexdigest()
    assert digest in (EMBEDDED_DIR / "README.md").read_text(encoding="utf-8")  # as documented there
    assert (out / "SAMPLE.csv").read_bytes() == (EMBEDDED_DIR / "SAMPLE.csv").read_bytes()
