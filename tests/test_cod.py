"""Ingest: embedded sample, local folders and the COD REST interface (served by a real local HTTP server)."""

from __future__ import annotations

import csv
import re
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import COD_DIR, EMBEDDED_DIR
from xrdvision.config import parse_params
from xrdvision.crystal.systems import CRYSTAL_SYSTEMS
from xrdvision.data.ingest import (
    EMBEDDED_EXCLUDED,
    USER_AGENT,
    CodClient,
    CodError,
    CodNotFound,
    _retry_after_seconds,
    build_embedded_sample,
    run_ingest,
    select_sample,
)
from xrdvision.errors import InputError, XrdVisionError

# Small, quick files from ../shared/cod (all parse; all are plain COD entries named <id>.cif).
IDS = ["1000017", "1000023", "1000026", "1000032"]


def _index() -> dict[str, dict[str, str]]:
    with open(COD_DIR / "INDEX.csv", newline="", encoding="utf-8") as fh:
        return {r["cod_id"]: r for r in csv.DictReader(fh)}


def _elements(formula: str) -> set[str]:
    return set(re.findall(r"[A-Z][a-z]?", formula))


def _read_report(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------------------------------
# A local stand-in for www.crystallography.net/cod
# --------------------------------------------------------------------------------------------------


@dataclass
class FakeCod:
    """Serves ../shared/cod as COD does; can fail the first K requests (503) or answer HTML for some ids."""

    cod_dir: Path
    fail_first: int = 0
    retry_after: str | None = None
    html_ids: set[str] = field(default_factory=set)
    search_result: list[str] | None = None  # a fixed answer to any search, instead of filtering INDEX.csv
    requests: list[tuple[float, str, str]] = field(default_factory=list)  # (time, path, user agent)
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths(self) -> list[str]:
        return [p for _, p, _ in self.requests]

    def search(self, query: dict[str, list[str]]) -> list[str]:
        if self.search_result is not None:
            return self.search_result
        want = {v[0] for k, v in query.items() if re.fullmatch(r"el[1-8]", k)}
        avoid = {v[0] for k, v in query.items() if re.fullmatch(r"nel[1-8]", k)}
        lo = int(query.get("strictmin", ["0"])[0])
        hi = int(query.get("strictmax", ["99"])[0])
        hits = []
        for cod_id, row in _index().items():
            elements = _elements(row["formula"])
            if want <= elements and not avoid & elements and lo <= len(elements) <= hi:
                hits.append(cod_id)
        return hits

    def handle(self, handler: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(handler.path)
        with self.lock:
            self.requests.append((time.monotonic(), parts.path, handler.headers.get("User-Agent", "")))
            failing = len(self.requests) <= self.fail_first
        if failing:
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            return 503, headers, b"<html><body>Service Unavailable</body></html>"
        if parts.path == "/cod/result":
            query = parse_qs(parts.query)
            if query.get("format") != ["lst"]:
                return 200, {}, b"<html><body>a search page</body></html>"
            body = "".join(f"{i}\n" for i in self.search(query))
            return 200, {}, body.encode()
        match = re.fullmatch(r"/cod/(\d{7})\.cif", parts.path)
        if match is None:
            return 404, {}, b"<html>no such page</html>"
        cod_id = match.group(1)
        if cod_id in self.html_ids:
            return 200, {}, b"<!DOCTYPE html><html><body>Please try again later</body></html>"
        path = self.cod_dir / f"{cod_id}.cif"
        if not path.is_file():
            return 404, {}, b"<html>not found</html>"
        return 200, {"Content-Type": "chemical/x-cif"}, path.read_bytes()


@pytest.fixture
def fake_cod(cod_dir: Path) -> Iterator[FakeCod]:
    state = FakeCod(cod_dir)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, headers, body = state.handle(self)
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/cod"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _cod_params(fake: FakeCod, **ingest: object):
    settings = {"source": "cod", "cod_url": fake.url, "request_interval_s": 0.0, "retries": 3, **ingest}
    return parse_params({"ingest": settings})


def _client(fake: FakeCod, **kwargs: object) -> CodClient:
    settings = {"request_interval_s": 0.0, "retries": 3, "timeout_s": 10.0, "backoff_s": 0.01, **kwargs}
    return CodClient(fake.url, **settings)


# --------------------------------------------------------------------------------------------------
# COD source
# --------------------------------------------------------------------------------------------------


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
    rows = _read_report(tmp_path / "ingest.csv")
    assert [(r["cod_id"], r["source"], r["status"]) for r in rows] == [
        (i, f"{fake_cod.url}/{i}.cif", "ok") for i in IDS[:3]
    ]


def test_cod_search_returns_the_matching_ids(fake_cod: FakeCod) -> None:
    index = _index()
    expected = sorted(int(i) for i, r in index.items() if _elements(r["formula"]) == {"Si", "O"})

    ids = _client(fake_cod).search_ids({"el1": "Si", "el2": "O", "strictmax": 2})

    assert ids == expected
    assert len(ids) >= 3  # quartz, cristobalite, ... are in the set
    ((_, path, _),) = fake_cod.requests
    assert path == "/cod/result"


def test_cod_query_with_max_files_downloads_a_seeded_subset(fake_cod: FakeCod, tmp_path: Path) -> None:
    params = _cod_params(fake_cod, cod_query={"el1": "Si", "el2": "O", "strictmax": 2}, max_files=2)
    summary = run_ingest(params, tmp_path / "cifs", tmp_path / "ingest.csv", cache_dir=tmp_path / "cache")

    assert summary["n_ok"] == 2
    got = sorted(p.stem for p in (tmp_path / "cifs").glob("*.cif"))
    index = _index()
    assert all(_elements(index[i]["formula"]) == {"Si", "O"} for i in got)
    assert fake_cod.paths()[0] == "/cod/result"
    assert len(fake_cod.paths()) == 3  # one search, two downloads
    # Same seed, same subset (the downloads now come from the cache).
    run_ingest(params, tmp_path / "again", tmp_path / "again.csv", cache_dir=tmp_path / "cache")
    assert sorted(p.stem for p in (tmp_path / "again").glob("*.cif")) == got


def test_cod_search_rejects_an_empty_query_and_html(fake_cod: FakeCod) -> None:
    client = _client(fake_cod)
    with pytest.raises(CodError, match="empty query"):
        client.search_ids({})
    fake_cod.search_result = ["1000017", "<html>oops</html>"]
    with pytest.raises(CodError, match="did not return an id list"):
        client.search_ids({"el1": "Si"})


def test_cod_retries_after_transient_503s(fake_cod: FakeCod, tmp_path: Path) -> None:
    fake_cod.fail_first = 2
    client = _client(fake_cod, retries=3, backoff_s=0.05)

    path = client.fetch_cif(IDS[0], tmp_path)

    assert path.read_bytes() == (COD_DIR / f"{IDS[0]}.cif").read_bytes()
    assert fake_cod.paths() == [f"/cod/{IDS[0]}.cif"] * 3
    gaps = [b[0] - a[0] for a, b in zip(fake_cod.requests, fake_cod.requests[1:], strict=False)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # exponential backoff: 0.05 s, then 0.1 s


def test_cod_honours_retry_after(fake_cod: FakeCod, tmp_path: Path) -> None:
    fake_cod.fail_first = 1
    fake_cod.retry_after = "1"
    client = _client(fake_cod, backoff_s=0.01)

    start = time.monotonic()
    client.fetch_cif(IDS[0], tmp_path)

    assert time.monotonic() - start >= 1.0  # the server's 1 s, not the 0.01 s backoff
    assert len(fake_cod.requests) == 2


def test_retry_after_header_forms() -> None:
    assert _retry_after_seconds("7") == 7.0
    in_a_minute = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    assert 55 <= _retry_after_seconds(in_a_minute) <= 61
    assert _retry_after_seconds("soon") is None
    assert _retry_after_seconds(None) is None


def test_cod_gives_up_after_retries_and_the_batch_goes_on(fake_cod: FakeCod, tmp_path: Path) -> None:
    fake_cod.fail_first = 2  # the first id's two attempts fail, the second id is served
    params = _cod_params(fake_cod, cod_ids=[int(IDS[0]), int(IDS[1])], retries=1)
    client = _client(fake_cod, retries=1)

    summary = run_ingest(
        params, tmp_path / "cifs", tmp_path / "ingest.csv", cache_dir=tmp_path / "cache", client=client
    )

    rows = {r["cod_id"]: r for r in _read_report(tmp_path / "ingest.csv")}
    assert rows[IDS[0]]["status"] == "failed"
    assert rows[IDS[0]]["reason"] == "HTTP 503 Service Unavailable after 2 attempt(s)"
    assert rows[IDS[1]]["status"] == "ok"
    assert summary["n_ok"] == 1 and summary["n_failed"] == 1
    assert [p.name for p in (tmp_path / "cifs").iterdir()] == [f"{IDS[1]}.cif"]


def test_cod_connection_errors_are_retried_then_reported(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = CodClient(f"http://127.0.0.1:{port}/cod", 0.0, retries=2, timeout_s=2.0, backoff_s=0.01)

    with pytest.raises(CodError, match=r"ConnectionError after 3 attempt\(s\)"):
        client.fetch_cif(IDS[0], tmp_path)
    assert client.n_requests == 3
    assert not (tmp_path / f"{IDS[0]}.cif").exists()


def test_cod_404_is_not_retried_and_the_batch_goes_on(fake_cod: FakeCod, tmp_path: Path) -> None:
    params = _cod_params(fake_cod, cod_ids=[int(IDS[0]), 9999999, int(IDS[1])])

    summary = run_ingest(params, tmp_path / "cifs", tmp_path / "ingest.csv", cache_dir=tmp_path / "cache")

    assert summary == {"n_ok": 2, "n_skipped": 0, "n_failed": 1, "reasons": {"not found on COD": 1}}
    assert fake_cod.paths().count("/cod/9999999.cif") == 1
    rows = _read_report(tmp_path / "ingest.csv")
    assert [(r["cod_id"], r["status"], r["reason"]) for r in rows] == [
        (IDS[0], "ok", ""),
        ("9999999", "failed", "not found on COD"),
        (IDS[1], "ok", ""),
    ]
    with pytest.raises(CodNotFound, match=r"9999999\.cif: not found on COD"):
        _client(fake_cod).fetch_cif(9999999, tmp_path)


def test_cod_html_body_is_rejected_and_not_cached(fake_cod: FakeCod, tmp_path: Path) -> None:
    fake_cod.html_ids = {IDS[1]}
    params = _cod_params(fake_cod, cod_ids=[int(IDS[0]), int(IDS[1])])

    summary = run_ingest(params, tmp_path / "cifs", tmp_path / "ingest.csv", cache_dir=tmp_path / "cache")

    assert summary["reasons"] == {"not a CIF (got HTML?)": 1}
    assert not (tmp_path / "cache" / f"{IDS[1]}.cif").exists()
    assert not (tmp_path / "cifs" / f"{IDS[1]}.cif").exists()
    assert (tmp_path / "cifs" / f"{IDS[0]}.cif").is_file()


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
    rows = {r["cod_id"]: r["reason"] for r in _read_report(tmp_path / "ingest.csv")}
    assert rows == {IDS[0]: "from cache", IDS[1]: "from cache", IDS[2]: "", IDS[3]: ""}
    assert (cache / f"{IDS[3]}.cif").read_bytes() == (COD_DIR / f"{IDS[3]}.cif").read_bytes()

    # Third run over the same ids: no request at all.
    n_before = len(fake_cod.requests)
    run_ingest(second, tmp_path / "cifs", tmp_path / "ingest.csv", cache_dir=cache)
    assert len(fake_cod.requests) == n_before


def test_cod_rate_limit_spaces_requests(fake_cod: FakeCod, tmp_path: Path) -> None:
    client = _client(fake_cod, request_interval_s=0.2)

    start = time.monotonic()
    for cod_id in IDS:
        client.fetch_cif(cod_id, tmp_path)
    elapsed = time.monotonic() - start

    assert len(fake_cod.requests) == 4
    assert elapsed >= 0.6  # three gaps of at least 0.2 s (a lower bound, not a speed test)
    gaps = [b[0] - a[0] for a, b in zip(fake_cod.requests, fake_cod.requests[1:], strict=False)]
    assert min(gaps) >= 0.19


def test_cod_without_ids_or_query_is_an_error(fake_cod: FakeCod, tmp_path: Path) -> None:
    with pytest.raises(XrdVisionError, match="no CIF files found") as err:
        run_ingest(_cod_params(fake_cod), tmp_path / "cifs", tmp_path / "ingest.csv", cache_dir=tmp_path)
    assert "\n" not in str(err.value) and "source 'cod'" in str(err.value)
    assert fake_cod.requests == []


# --------------------------------------------------------------------------------------------------
# Folder and embedded sources
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


def test_folder_source_reports_each_file_and_normalises_names(messy_folder: Path, tmp_path: Path) -> None:
    params = parse_params({"ingest": {"source": "folder", "folder": str(messy_folder)}})

    summary = run_ingest(params, tmp_path / "cifs", tmp_path / "reports" / "ingest.csv")

    out = tmp_path / "cifs"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{IDS[0]}.cif", f"{IDS[1]}.cif", "my_sample_1.cif"]
    )
    assert (out / f"{IDS[1]}.cif").read_bytes() == (COD_DIR / f"{IDS[1]}.cif").read_bytes()
    assert (out / "my_sample_1.cif").read_bytes() == (messy_folder / "my sample (1).CIF").read_bytes()
    rows = {Path(r["source"]).name: r for r in _read_report(tmp_path / "reports" / "ingest.csv")}
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
    reasons = {r["cod_id"]: r["reason"] for r in _read_report(tmp_path / "ingest.csv")}
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


def test_embedded_source_yields_exactly_the_sample(tmp_path: Path) -> None:
    with open(EMBEDDED_DIR / "SAMPLE.csv", newline="", encoding="utf-8") as fh:
        sample = [r["cod_id"] for r in csv.DictReader(fh)]
    params = parse_params({"ingest": {"source": "embedded", "embedded_dir": str(EMBEDDED_DIR)}})

    summary = run_ingest(params, tmp_path / "cifs", tmp_path / "ingest.csv")

    assert summary == {"n_ok": len(sample), "n_skipped": 0, "n_failed": 0, "reasons": {}}
    assert sorted(p.stem for p in (tmp_path / "cifs").iterdir()) == sorted(sample)
    assert len(sample) == 105
    for cod_id in sample[::10]:
        assert (tmp_path / "cifs" / f"{cod_id}.cif").read_bytes() == (COD_DIR / f"{cod_id}.cif").read_bytes()


# --------------------------------------------------------------------------------------------------
# The embedded sample's selection
# --------------------------------------------------------------------------------------------------


def test_select_sample_is_deterministic_and_covers_every_system(cod_dir: Path) -> None:
    args = (cod_dir / "INDEX.csv", cod_dir / "SOURCES.csv")
    ids = select_sample(*args, per_system=15, seed=42, max_atoms=200)

    assert ids == select_sample(*args, per_system=15, seed=42, max_atoms=200)
    assert ids != select_sample(*args, per_system=15, seed=1, max_atoms=200)
    index = _index()
    with open(cod_dir / "SOURCES.csv", newline="", encoding="utf-8") as fh:
        variants = {r["cod_id"] for r in csv.DictReader(fh) if r["cod_tools_test_variant"] == "1"}
    rows = [index[i] for i in ids]
    assert Counter(r["crystal_system"] for r in rows) == dict.fromkeys(CRYSTAL_SYSTEMS, 15)
    assert len({(r["formula"], r["space_group_number"]) for r in rows}) == len(rows)
    assert all(int(r["n_atoms_in_cell"]) <= 200 for r in rows)
    assert not variants & set(ids)
    for system in CRYSTAL_SYSTEMS[2:]:  # orthorhombic and up have >= 15 space groups to spread over
        assert len({r["space_group_number"] for r in rows if r["crystal_system"] == system}) == 15


def test_select_sample_exclusion_replaces_only_the_excluded(cod_dir: Path) -> None:
    args = (cod_dir / "INDEX.csv", cod_dir / "SOURCES.csv", 15, 42, 200)
    ids = select_sample(*args)
    dropped = ids[3]
    again = select_sample(*args, exclude=[dropped])
    assert dropped not in again
    assert len(set(ids) - set(again)) == 1


def test_embedded_sample_is_what_select_sample_gives(cod_dir: Path) -> None:
    with open(EMBEDDED_DIR / "SAMPLE.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    ids = select_sample(
        cod_dir / "INDEX.csv", cod_dir / "SOURCES.csv", 15, 42, 200, exclude=EMBEDDED_EXCLUDED
    )
    assert [r["cod_id"] for r in rows] == ids
    index = _index()
    assert all(r == {k: index[r["cod_id"]][k] for k in r} for r in rows)
    assert sum((EMBEDDED_DIR / f"{i}.cif").stat().st_size for i in ids) < 3_000_000


def test_build_embedded_sample_checks_and_copies(cod_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "embedded"
    excluded = build_embedded_sample(cod_dir, out, per_system=1, seed=42, max_atoms=200, max_seconds=5.0)

    with open(out / "SAMPLE.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["crystal_system"] for r in rows] == list(CRYSTAL_SYSTEMS)
    assert not {r["cod_id"] for r in rows} & set(excluded)
    for row in rows:
        assert (out / f"{row['cod_id']}.cif").read_bytes() == (cod_dir / f"{row['cod_id']}.cif").read_bytes()
    assert len(list(out.glob("*.cif"))) == 7
