"""The ingest stage from each source: COD (a real local HTTP server), a folder, the embedded archive."""

from __future__ import annotations

import csv
import io
import re
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import COD_DIR, EMBEDDED_DIR, ROOT
from helpers_cod import IDS, FakeCod, cod_index, elements, read_report, serve_fake_cod
from xrdvision.config import parse_params
from xrdvision.data.cod_client import USER_AGENT, CodClient
from xrdvision.data.embedded import ARCHIVE_NAME, read_members, write_archive
from xrdvision.data.ingest import run_ingest
from xrdvision.errors import InputError, XrdVisionError


@pytest.fixture
def fake_cod(cod_dir: Path) -> Iterator[FakeCod]:
    with serve_fake_cod(cod_dir) as fake:
        yield fake


def _cod_params(fake: FakeCod, **ingest: object):
    settings = {"source": "cod", "cod_url": fake.url, "request_interval_s": 0.0, "retries": 3, **ingest}
    return parse_params({"ingest": settings})


# --------------------------------------------------------------------------------------------------
# COD source
# --------------------------------------------------------------------------------------------------


@pytest.mark.needs_shared("cod")
def test_cod_fetch_by_ids_copies_the_served_files(fake_cod: FakeCod, tmp_path: Path) -> None:
    params = _cod_params(fake_cod, cod_ids=[int(i) for i in IDS[:3]])
    summary = run_ingest(params, tmp_path / "cifs", tmp_path / "ingest.csv", cache_dir=tmp_path / "cache")

    assert summary == {"n_ok": 3, "n_skipped": 0, "n_failed": 0, "reasons": {}}
    assert sorted(p.name for p in (tmp_path / "cifs").iterdir()) == [f"{i}.cif" for i in IDS[:3]]
    for cod_id in IDS[:3]:
        assert (tmp_path / "cifs" / f"{cod_id}.cif").read_bytes() == (COD_DIR / f"{cod_id}.cif").read_bytes()
        assert (tmp_path / "cache" / f"{cod_id}.cif").is_file()
    assert fake_cod.paths() == [f"/cod/{i}.cif" for i in IDS[:3]]
    assert {agent for _, _, agent in fake_cod.requests} == {USER_AGENT}
    assert USER_AGENT.startswith("xrdvision/")
    rows = read_report(tmp_path / "ingest.csv")
    assert [(r["cod_id"], r["source"], r["status"]) for r in rows] == [
        (i, f"{fake_cod.url}/{i}.cif", "ok") for i in IDS[:3]
    ]


@pytest.mark.needs_shared("cod")
def test_cod_query_with_max_files_downloads_a_seeded_subset(fake_cod: FakeCod, tmp_path: Path) -> None:
    params = _cod_params(fake_cod, cod_query={"el1": "Si", "el2": "O", "strictmax": 2}, max_files=2)
    summary = run_ingest(params, tmp_path / "cifs", tmp_path / "ingest.csv", cache_dir=tmp_path / "cache")

    assert summary["n_ok"] == 2
    got = sorted(p.stem for p in (tmp_path / "cifs").glob("*.cif"))
    index = cod_index()
    assert all(elements(index[i]["formula"]) == {"Si", "O"} for i in got)
    assert fake_cod.paths()[0] == "/cod/result"
    assert len(fake_cod.paths()) == 3  # one search, two downloads
    # Same seed, same subset (the downloads now come from the cache).
    run_ingest(params, tmp_path / "again", tmp_path / "again.csv", cache_dir=tmp_path / "cache")
    assert sorted(p.stem for p in (tmp_path / "again").glob("*.cif")) == got


@pytest.mark.needs_shared("cod")
def test_cod_gives_up_after_retries_and_the_batch_goes_on(fake_cod: FakeCod, tmp_path: Path) -> None:
    fake_cod.fail_first = 2  # the first id's two attempts fail, the second id is served
    params = _cod_params(fake_cod, cod_ids=[int(IDS[0]), int(IDS[1])], retries=1)
    client = CodClient(fake_cod.url, 0.0, retries=1, backoff_s=0.01)

    summary = run_ingest(
        params, tmp_path / "cifs", tmp_path / "ingest.csv", cache_dir=tmp_path / "cache", client=client
    )

    rows = {r["cod_id"]: r for r in read_report(tmp_path / "ingest.csv")}
    assert rows[IDS[0]]["status"] == "failed"
    assert rows[IDS[0]]["reason"] == "HTTP 503 Service Unavailable after 2 attempt(s)"
    assert rows[IDS[1]]["status"] == "ok"
    assert summary["n_ok"] == 1 and summary["n_failed"] == 1
    assert [p.name for p in (tmp_path / "cifs").iterdir()] == [f"{IDS[1]}.cif"]


@pytest.mark.needs_shared("cod")
def test_cod_404_is_not_retried_and_the_batch_goes_on(fake_cod: FakeCod, tmp_path: Path) -> None:
    params = _cod_params(fake_cod, cod_ids=[int(IDS[0]), 9999999, int(IDS[1])])

    summary = run_ingest(params, tmp_path / "cifs", tmp_path / "ingest.csv", cache_dir=tmp_path / "cache")

    assert summary == {"n_ok": 2, "n_skipped": 0, "n_failed": 1, "reasons": {"not found on COD": 1}}
    assert fake_cod.paths().count("/cod/9999999.cif") == 1
    rows = read_report(tmp_path / "ingest.csv")
    assert [(r["cod_id"], r["status"], r["reason"]) for r in rows] == [
        (IDS[0], "ok", ""),
        ("9999999", "failed", "not found on COD"),
        (IDS[1], "ok", ""),
    ]


@pytest.mark.needs_shared("cod")
def test_cod_html_body_is_rejected_and_not_cached(fake_cod: FakeCod, tmp_path: Path) -> None:
    fake_cod.html_ids = {IDS[1]}
    params = _cod_params(fake_cod, cod_ids=[int(IDS[0]), int(IDS[1])])

    summary = run_ingest(params, tmp_path / "cifs", tmp_path / "ingest.csv", cache_dir=tmp_path / "cache")

    assert summary["reasons"] == {"not a CIF (got HTML?)": 1}
    assert not (tmp_path / "cache" / f"{IDS[1]}.cif").exists()
    assert not (tmp_path / "cifs" / f"{IDS[1]}.cif").exists()
    assert (tmp_path / "cifs" / f"{IDS[0]}.cif").is_file()


@pytest.mark.needs_shared("cod")
def test_cod_resume_downloads_only_what_is_missing(fake_cod: FakeCod, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _cod_params(fake_cod, cod_ids=[int(i) for i in IDS[:2]])
    run_ingest(first, tmp_path / "cifs", tmp_path / "ingest.csv", cache_dir=cache)
    assert len(fake_cod.requests) == 2

    # Second run: the two cached ids cost no request; a third id and a corrupt cache entry are fetched.
    (cache / f"{IDS[3]}.cif").write_text("<html>half a download</html>")
    second = _cod_params(fake_cod, cod_ids=[int(i) for i in IDS])
    summary = run_ingest(second, tmp_path / "cifs", tmp_path / "ingest.csv", cache_dir=cache)

    assert summary["n_ok"] == 4
    assert fake_cod.paths()[2:] == [f"/cod/{IDS[2]}.cif", f"/cod/{IDS[3]}.cif"]
    rows = {r["cod_id"]: r["reason"] for r in read_report(tmp_path / "ingest.csv")}
    assert rows == {IDS[0]: "from cache", IDS[1]: "from cache", IDS[2]: "", IDS[3]: ""}
    assert (cache / f"{IDS[3]}.cif").read_bytes() == (COD_DIR / f"{IDS[3]}.cif").read_bytes()

    # Third run over the same ids: no request at all.
    n_before = len(fake_cod.requests)
    run_ingest(second, tmp_path / "cifs", tmp_path / "ingest.csv", cache_dir=cache)
    assert len(fake_cod.requests) == n_before


@pytest.mark.needs_shared("cod")
def test_cod_without_ids_or_query_is_an_error(fake_cod: FakeCod, tmp_path: Path) -> None:
    with pytest.raises(XrdVisionError, match="no CIF files found") as err:
        run_ingest(_cod_params(fake_cod), tmp_path / "cifs", tmp_path / "ingest.csv", cache_dir=tmp_path)
    assert "\n" not in str(err.value) and "source 'cod'" in str(err.value)
    assert fake_cod.requests == []


# --------------------------------------------------------------------------------------------------
# Folder source
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """Three real CIFs (one renamed, one with no COD code), junk, an empty file, a duplicate, a subfolder."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(COD_DIR / f"{IDS[0]}.cif", folder / f"{IDS[0]}.cif")
    shutil.copy(COD_DIR / f"{IDS[1]}.cif", folder / "renamed quartz-like.cif")  # has _cod_database_code
    text = (COD_DIR / f"{IDS[2]}.cif").read_text(encoding="utf-8")
    own = re.sub(r"(?m)^_cod_database_code.*\n", "", text)
    assert own != text
    (folder / "my sample (1).CIF").write_text(own, encoding="utf-8")
    shutil.copy(COD_DIR / f"{IDS[0]}.cif", folder / "zz_copy.cif")  # same COD id as the first
    (folder / "junk.cif").write_text("this is not a crystal structure\n_cell_length_a 5\n")
    (folder / "empty.cif").write_bytes(b"")
    (folder / "binary.cif").write_bytes(b"data_x\n\x00\x01\x02")
    (folder / "notes.txt").write_text("ignored: not a .cif")
    (folder / "sub").mkdir()
    shutil.copy(COD_DIR / f"{IDS[3]}.cif", folder / "sub" / f"{IDS[3]}.cif")  # not recursive
    return folder


@pytest.mark.needs_shared("cod")
def test_folder_source_reports_each_file_and_normalises_names(messy_folder: Path, tmp_path: Path) -> None:
    params = parse_params({"ingest": {"source": "folder", "folder": str(messy_folder)}})

    summary = run_ingest(params, tmp_path / "cifs", tmp_path / "reports" / "ingest.csv")

    out = tmp_path / "cifs"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{IDS[0]}.cif", f"{IDS[1]}.cif", "my_sample_1.cif"]
    )
    assert (out / f"{IDS[1]}.cif").read_bytes() == (COD_DIR / f"{IDS[1]}.cif").read_bytes()
    assert (out / "my_sample_1.cif").read_bytes() == (messy_folder / "my sample (1).CIF").read_bytes()
    rows = {Path(r["source"]).name: r for r in read_report(tmp_path / "reports" / "ingest.csv")}
    assert {name: (r["cod_id"], r["status"], r["reason"]) for name, r in rows.items()} == {
        f"{IDS[0]}.cif": (IDS[0], "ok", ""),
        "renamed quartz-like.cif": (IDS[1], "ok", ""),
        "my sample (1).CIF": ("my_sample_1", "ok", ""),
        "zz_copy.cif": (IDS[0], "skipped", f"duplicate of {messy_folder / f'{IDS[0]}.cif'}"),
        "junk.cif": ("junk", "failed", "not a CIF: no data_ block"),
        "empty.cif": ("empty", "failed", "empty file"),
        "binary.cif": ("binary", "failed", "not a text file (binary data)"),
    }
    assert summary["n_ok"] == 3 and summary["n_skipped"] == 1 and summary["n_failed"] == 3
    assert summary["reasons"]["empty file"] == 1


def test_missing_folder_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    params = parse_params({"ingest": {"source": "folder", "folder": str(missing)}})
    with pytest.raises(InputError) as err:
        run_ingest(params, tmp_path / "cifs", tmp_path / "ingest.csv")
    assert str(err.value) == f"{missing}: folder not found"
    assert not (tmp_path / "cifs").exists()


def test_folder_with_nothing_usable_fails_and_keeps_the_old_output(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "empty.cif").write_bytes(b"")
    (folder / "page.cif").write_text("<!DOCTYPE html><html><body>404</body></html>")
    out = tmp_path / "cifs"
    out.mkdir()
    (out / "old.cif").write_text("data_old\n")
    params = parse_params({"ingest": {"source": "folder", "folder": str(folder)}})

    with pytest.raises(XrdVisionError) as err:
        run_ingest(params, out, tmp_path / "ingest.csv")

    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{folder}: none of 2 file(s) was a usable CIF")
    assert [p.name for p in out.iterdir()] == ["old.cif"]
    reasons = {r["cod_id"]: r["reason"] for r in read_report(tmp_path / "ingest.csv")}
    assert reasons == {"empty": "empty file", "page": "not a CIF (got HTML?)"}

    (folder / "empty.cif").unlink()
    (folder / "page.cif").unlink()
    with pytest.raises(XrdVisionError, match="no CIF files found"):
        run_ingest(params, out, tmp_path / "ingest.csv")


def test_folder_max_files_takes_a_seeded_sample_and_skips_subfolders(cod_dir: Path, tmp_path: Path) -> None:
    def ingest(seed: int, name: str) -> list[str]:
        params = parse_params(
            {"seed": seed, "ingest": {"source": "folder", "folder": str(cod_dir), "max_files": 6}}
        )
        summary = run_ingest(params, tmp_path / name, tmp_path / f"{name}.csv")
        assert summary["n_ok"] == 6
        return sorted(p.stem for p in (tmp_path / name).iterdir())

    first, again, other = ingest(42, "a"), ingest(42, "b"), ingest(7, "c")
    assert first == again
    assert first != other
    bad_ids = {p.stem for p in (cod_dir / "bad").glob("*.cif")}
    assert not bad_ids & set(first + other)
    assert all((cod_dir / f"{i}.cif").is_file() for i in first + other)


# --------------------------------------------------------------------------------------------------
# Embedded source: a tar archive read in place
# --------------------------------------------------------------------------------------------------

ARCHIVE = EMBEDDED_DIR / ARCHIVE_NAME


@pytest.fixture(scope="module")
def shipped() -> dict[str, bytes]:
    """The shipped archive's members (real COD CIFs), name -> bytes: works without ../shared."""
    return read_members(ARCHIVE)


def _embedded(archive: Path, **ingest: object):
    return parse_params({"ingest": {"source": "embedded", "embedded": str(archive), **ingest}})


def _plain_tar(files: dict[str, bytes]) -> bytes:
    """An uncompressed ustar archive of ``files`` in the given order (tests damage it byte by byte)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _offsets(tar_bytes: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return [m.offset for m in tar.getmembers()]


def _not_ok(report: Path) -> list[tuple[str, str, str]]:
    return [(r["cod_id"], r["source"], r["reason"]) for r in read_report(report) if r["status"] != "ok"]


def test_embedded_archive_yields_exactly_the_shipped_cifs(shipped: dict[str, bytes], tmp_path: Path) -> None:
    with open(EMBEDDED_DIR / "SAMPLE.csv", newline="", encoding="utf-8") as fh:
        sample = [r["cod_id"] for r in csv.DictReader(fh)]
    assert ROOT / parse_params({}).ingest.embedded == ARCHIVE  # the default

    summary = run_ingest(_embedded(ARCHIVE), tmp_path / "cifs", tmp_path / "ingest.csv")

    assert summary == {"n_ok": 719, "n_skipped": 0, "n_failed": 0, "reasons": {}}
    assert len(sample) == 719 and sorted(shipped) == [f"{i}.cif" for i in sample]
    assert sorted(p.name for p in (tmp_path / "cifs").iterdir()) == sorted(shipped)
    assert all((tmp_path / "cifs" / name).read_bytes() == data for name, data in shipped.items())
    rows = read_report(tmp_path / "ingest.csv")
    assert [(r["cod_id"], r["source"], r["status"]) for r in rows] == [
        (i, f"{ARCHIVE}:{i}.cif", "ok") for i in sample
    ]


def test_archive_members_get_the_folder_checks_names_and_report(
    shipped: dict[str, bytes], tmp_path: Path
) -> None:
    ids = [name.removesuffix(".cif") for name in sorted(shipped)[:3]]
    text = shipped[f"{ids[2]}.cif"].decode("utf-8")
    own = re.sub(r"(?m)^_cod_database_code.*\n", "", text)
    assert own != text
    archive = tmp_path / "messy.tar.xz"
    write_archive(
        archive,
        {
            f"deep/er/{ids[0]}.cif": shipped[f"{ids[0]}.cif"],  # any depth
            "renamed quartz-like.cif": shipped[f"{ids[1]}.cif"],  # has _cod_database_code
            "my sample (1).CIF": own.encode("utf-8"),
            "zz_copy.cif": shipped[f"{ids[0]}.cif"],  # same COD id as the first
            "junk.cif": b"this is not a crystal structure\n_cell_length_a 5\n",
            "empty.cif": b"",
            "binary.cif": b"data_x\n\x00\x01\x02",
            "notes.txt": b"ignored: not a .cif",
        },
    )

    summary = run_ingest(_embedded(archive), tmp_path / "cifs", tmp_path / "ingest.csv")

    out = tmp_path / "cifs"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{ids[0]}.cif", f"{ids[1]}.cif", "my_sample_1.cif"]
    )
    assert (out / f"{ids[1]}.cif").read_bytes() == shipped[f"{ids[1]}.cif"]
    assert (out / "my_sample_1.cif").read_text(encoding="utf-8") == own
    rows = {r["source"].removeprefix(f"{archive}:"): r for r in read_report(tmp_path / "ingest.csv")}
    assert {name: (r["cod_id"], r["status"], r["reason"]) for name, r in rows.items()} == {
        f"deep/er/{ids[0]}.cif": (ids[0], "ok", ""),
        "renamed quartz-like.cif": (ids[1], "ok", ""),
        "my sample (1).CIF": ("my_sample_1", "ok", ""),
        "zz_copy.cif": (ids[0], "skipped", f"duplicate of {archive}:deep/er/{ids[0]}.cif"),
        "junk.cif": ("junk", "failed", "not a CIF: no data_ block"),
        "empty.cif": ("empty", "failed", "empty file"),
        "binary.cif": ("binary", "failed", "not a text file (binary data)"),
    }
    assert summary["n_ok"] == 3 and summary["n_skipped"] == 1 and summary["n_failed"] == 3


def test_archive_max_files_takes_the_same_seeded_subset_as_a_folder(
    shipped: dict[str, bytes], tmp_path: Path
) -> None:
    names = sorted(shipped)[::24]  # 30 real CIFs, spread over the archive
    archive = tmp_path / "some.tar.xz"
    write_archive(archive, {n: shipped[n] for n in names})
    folder = tmp_path / "folder"
    folder.mkdir()
    for n in names:
        (folder / n).write_bytes(shipped[n])

    def ingest(params, name: str) -> list[str]:
        summary = run_ingest(params, tmp_path / name, tmp_path / f"{name}.csv")
        assert summary["n_ok"] == 6 and summary["n_failed"] == 0
        return sorted(p.name for p in (tmp_path / name).iterdir())

    first = ingest(_embedded(archive, max_files=6), "a")
    assert first == ingest(_embedded(archive, max_files=6), "again")
    assert first == ingest(
        parse_params({"ingest": {"source": "folder", "folder": str(folder), "max_files": 6}}), "f"
    )
    assert first != ingest(
        parse_params({"seed": 7, "ingest": {"embedded": str(archive), "max_files": 6}}), "b"
    )
    assert set(first) <= set(names)
    # The shipped archive itself, subsampled: 6 of its members, byte for byte.
    picked = ingest(_embedded(ARCHIVE, max_files=6), "shipped")
    assert all((tmp_path / "shipped" / n).read_bytes() == shipped[n] for n in picked)


def test_truncated_archive_keeps_the_members_before_the_cut(
    shipped: dict[str, bytes], tmp_path: Path
) -> None:
    names = sorted(shipped)[:12]
    whole = tmp_path / "whole.tar.xz"
    write_archive(whole, {n: shipped[n] for n in names})
    cut = tmp_path / "cut.tar.xz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    summary = run_ingest(_embedded(cut), tmp_path / "cifs", tmp_path / "ingest.csv")

    got = sorted(p.name for p in (tmp_path / "cifs").iterdir())
    assert 1 <= summary["n_ok"] == len(got) < len(names) and got == names[: len(got)]
    assert all((tmp_path / "cifs" / n).read_bytes() == shipped[n] for n in got)
    problems = _not_ok(tmp_path / "ingest.csv")
    archive_rows = [p for p in problems if p[1] == str(cut)]
    assert len(archive_rows) == 1 and archive_rows[0][0] == ""
    assert re.fullmatch(
        r"archive ends early or is corrupt after member \d{7}\.cif \(EOFError: [^\n]+\); the rest is lost",
        archive_rows[0][2],
    )
    # The member the cut went through, if listed, is one row of its own; nothing else failed.
    assert all(p[2].startswith("unreadable archive member: EOFError") for p in problems if p[1] != str(cut))
    assert summary["n_failed"] == len(problems) <= 2

    # An uncompressed archive cut inside its fourth member: three members, one unreadable, one archive row.
    plain = _plain_tar({n: shipped[n] for n in names[:4]})
    short = tmp_path / "short.tar"
    short.write_bytes(plain[: _offsets(plain)[3] + 700])
    summary = run_ingest(_embedded(short), tmp_path / "plain", tmp_path / "plain.csv")
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == names[:3]
    assert _not_ok(tmp_path / "plain.csv") == [
        (
            names[3][:-4],
            f"{short}:{names[3]}",
            "unreadable archive member: ReadError: unexpected end of data",
        ),
        (
            "",
            str(short),
            f"archive ends early or is corrupt after member {names[3]} "
            "(ReadError: unexpected end of data); the rest is lost",
        ),
    ]

    # Cut so short that nothing usable is left: one line naming the archive and why; old output kept.
    stub = tmp_path / "stub.tar.xz"
    stub.write_bytes(whole.read_bytes()[:100])
    with pytest.raises(XrdVisionError) as err:
        run_ingest(_embedded(stub), tmp_path / "cifs", tmp_path / "stub.csv")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{stub}: ") and "archive ends early" in message
    assert sorted(p.name for p in (tmp_path / "cifs").iterdir()) == got


def test_damaged_member_header_costs_that_member_only(shipped: dict[str, bytes], tmp_path: Path) -> None:
    names = sorted(shipped)[:4]
    raw = bytearray(_plain_tar({n: shipped[n] for n in names}))
    offsets = _offsets(bytes(raw))
    raw[offsets[1] + 2] ^= 0x01  # one bit of the second member's name: its header checksum fails
    archive = tmp_path / "damaged.tar"
    archive.write_bytes(bytes(raw))

    summary = run_ingest(_embedded(archive), tmp_path / "cifs", tmp_path / "ingest.csv")

    kept = [names[0], *names[2:]]
    assert sorted(p.name for p in (tmp_path / "cifs").iterdir()) == kept
    assert all((tmp_path / "cifs" / n).read_bytes() == shipped[n] for n in kept)
    blocks = (offsets[2] - offsets[1]) // 512
    assert _not_ok(tmp_path / "ingest.csv") == [
        (
            "",
            str(archive),
            f"damaged tar header at byte {offsets[1]}: {blocks} block(s) skipped "
            f"before {names[2]}, the member(s) there are lost",
        ),
    ]
    assert summary["n_ok"] == 3 and summary["n_failed"] == 1


def test_corrupt_compressed_data_lets_no_garbled_member_in(shipped: dict[str, bytes], tmp_path: Path) -> None:
    names = sorted(shipped)[:12]
    whole = tmp_path / "whole.tar.xz"
    write_archive(whole, {n: shipped[n] for n in names})
    raw = bytearray(whole.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    archive = tmp_path / "flipped.tar.xz"
    archive.write_bytes(bytes(raw))

    summary = run_ingest(_embedded(archive), tmp_path / "cifs", tmp_path / "ingest.csv")

    got = sorted(p.name for p in (tmp_path / "cifs").iterdir())
    assert got == names[: len(got)] and summary["n_ok"] == len(got) >= 1
    assert all((tmp_path / "cifs" / n).read_bytes() == shipped[n] for n in got)
    problems = _not_ok(tmp_path / "ingest.csv")
    suspect = names[len(got)]
    assert problems == [
        (
            suspect[:-4],
            f"{archive}:{suspect}",
            "not trusted: the archive's compressed data is corrupt within or right after it",
        ),
        (
            "",
            str(archive),
            f"archive ends early or is corrupt after member {suspect} "
            "(LZMAError: Corrupt input data); the rest is lost",
        ),
    ]


def test_missing_or_unreadable_archive_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "cifs"
    out.mkdir()
    (out / "old.cif").write_text("data_old\n")
    missing = tmp_path / "nowhere.tar.xz"
    with pytest.raises(InputError) as err:
        run_ingest(_embedded(missing), out, tmp_path / "ingest.csv")
    assert str(err.value) == f"{missing}: embedded archive not found"
    junk = tmp_path / "junk.tar.xz"
    junk.write_bytes(b"no archive here\n" * 100)
    with pytest.raises(InputError) as err:
        run_ingest(_embedded(junk), out, tmp_path / "ingest.csv")
    assert str(err.value) == f"{junk}: not a readable tar archive (damaged, truncated or another format)"
    empty = tmp_path / "empty.tar.xz"
    write_archive(empty, {"README.txt": b"no CIF in here"})
    with pytest.raises(XrdVisionError, match="no CIF files found"):
        run_ingest(_embedded(empty), out, tmp_path / "ingest.csv")
    assert [p.name for p in out.iterdir()] == ["old.cif"]
