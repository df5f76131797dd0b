"""The COD client against a real local HTTP server: searches, downloads, retries, Retry-After, politeness."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
import requests

from conftest import COD_DIR
from helpers_cod import IDS, FakeCod, cod_index, elements, serve_fake_cod
from xrdvision.data.cod_client import USER_AGENT, CodClient, CodError, CodNotFound

pytestmark = pytest.mark.needs_shared("cod")  # the fake COD server serves ../shared/cod


@pytest.fixture
def fake_cod(cod_dir: Path) -> Iterator[FakeCod]:
    with serve_fake_cod(cod_dir) as fake:
        yield fake


def _client(fake: FakeCod, **kwargs: object) -> CodClient:
    settings = {"request_interval_s": 0.0, "retries": 3, "timeout_s": 10.0, "backoff_s": 0.01, **kwargs}
    return CodClient(fake.url, **settings)


def test_cod_fetch_names_the_tool_and_stores_the_served_bytes(fake_cod: FakeCod, tmp_path: Path) -> None:
    client = _client(fake_cod)

    path = client.fetch_cif(IDS[0], tmp_path)

    assert path == tmp_path / f"{IDS[0]}.cif"
    assert path.read_bytes() == (COD_DIR / f"{IDS[0]}.cif").read_bytes()
    assert fake_cod.requests[0][1:] == (f"/cod/{IDS[0]}.cif", USER_AGENT)
    assert USER_AGENT.startswith("xrdvision/")
    assert client.n_requests == 1


def test_cod_search_returns_the_matching_ids(fake_cod: FakeCod) -> None:
    index = cod_index()
    expected = sorted(int(i) for i, r in index.items() if elements(r["formula"]) == {"Si", "O"})

    ids = _client(fake_cod).search_ids({"el1": "Si", "el2": "O", "strictmax": 2})

    assert ids == expected
    assert len(ids) >= 3  # quartz, cristobalite, ... are in the set
    ((_, path, _),) = fake_cod.requests
    assert path == "/cod/result"


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
    assert client.n_requests == 3
    gaps = fake_cod.gaps()
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # exponential backoff: 0.05 s, then 0.1 s


@pytest.mark.parametrize("status", [429, 500, 502, 504])
def test_cod_retries_busy_and_server_errors(fake_cod: FakeCod, tmp_path: Path, status: int) -> None:
    fake_cod.fail_first, fake_cod.fail_status = 1, status

    _client(fake_cod).fetch_cif(IDS[0], tmp_path)

    assert len(fake_cod.requests) == 2


@pytest.mark.parametrize(("status", "reason"), [(403, "Forbidden"), (400, "Bad Request")])
def test_cod_other_client_errors_are_not_retried(
    fake_cod: FakeCod, tmp_path: Path, status: int, reason: str
) -> None:
    fake_cod.fail_first, fake_cod.fail_status = 1, status

    with pytest.raises(CodError) as err:
        _client(fake_cod).fetch_cif(IDS[0], tmp_path)

    assert str(err.value) == f"{fake_cod.url}/{IDS[0]}.cif: HTTP {status} {reason}"
    assert len(fake_cod.requests) == 1


def _in_two_seconds() -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)


@pytest.mark.parametrize("retry_after", ["1", "http-date"])
def test_cod_honours_retry_after(fake_cod: FakeCod, tmp_path: Path, retry_after: str) -> None:
    fake_cod.fail_first, fake_cod.fail_status = 1, 429
    fake_cod.retry_after = _in_two_seconds() if retry_after == "http-date" else retry_after
    client = _client(fake_cod, backoff_s=0.01)

    client.fetch_cif(IDS[0], tmp_path)

    # The server's 1 s (or its date, 1-2 s away at whole-second precision), not the 0.01 s backoff.
    assert fake_cod.gaps()[0] >= 0.9
    assert len(fake_cod.requests) == 2


def test_cod_caps_a_long_retry_after_and_ignores_a_garbled_one(fake_cod: FakeCod, tmp_path: Path) -> None:
    fake_cod.fail_first, fake_cod.retry_after = 1, "3600"
    start = time.monotonic()
    _client(fake_cod, max_wait_s=0.2).fetch_cif(IDS[0], tmp_path / "a")
    assert 0.2 <= time.monotonic() - start < 5.0  # max_wait_s, not an hour

    fake_cod.requests.clear()
    fake_cod.fail_first, fake_cod.retry_after = 1, "soon"
    _client(fake_cod, backoff_s=0.05).fetch_cif(IDS[0], tmp_path / "b")
    assert len(fake_cod.requests) == 2
    assert fake_cod.gaps()[0] >= 0.05  # the backoff instead


def test_cod_gives_up_after_retries_in_one_line(fake_cod: FakeCod, tmp_path: Path) -> None:
    fake_cod.fail_first = 99
    client = _client(fake_cod, retries=2)

    with pytest.raises(CodError) as err:
        client.fetch_cif(IDS[0], tmp_path)

    url = f"{fake_cod.url}/{IDS[0]}.cif"
    assert str(err.value) == f"{url}: HTTP 503 Service Unavailable after 3 attempt(s)"
    assert client.n_requests == len(fake_cod.requests) == 3
    assert not (tmp_path / f"{IDS[0]}.cif").exists()


def test_cod_connection_errors_are_retried_then_reported(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = CodClient(f"http://127.0.0.1:{port}/cod", 0.0, retries=2, timeout_s=2.0, backoff_s=0.01)

    with pytest.raises(CodError, match=r"ConnectionError after 3 attempt\(s\)$"):
        client.fetch_cif(IDS[0], tmp_path)
    assert client.n_requests == 3
    assert not (tmp_path / f"{IDS[0]}.cif").exists()


def test_cod_404_is_not_retried(fake_cod: FakeCod, tmp_path: Path) -> None:
    client = _client(fake_cod)
    with pytest.raises(CodNotFound, match=r"9999999\.cif: not found on COD$"):
        client.fetch_cif(9999999, tmp_path)
    assert fake_cod.paths() == ["/cod/9999999.cif"]


def test_cod_html_body_is_rejected_and_not_cached(fake_cod: FakeCod, tmp_path: Path) -> None:
    fake_cod.html_ids = {IDS[1]}
    with pytest.raises(CodError, match=r"not a CIF \(got HTML\?\)"):
        _client(fake_cod).fetch_cif(IDS[1], tmp_path)
    assert not (tmp_path / f"{IDS[1]}.cif").exists()


def test_cod_cache_answers_without_a_request(fake_cod: FakeCod, tmp_path: Path) -> None:
    client = _client(fake_cod)
    client.fetch_cif(IDS[0], tmp_path)
    (tmp_path / f"{IDS[1]}.cif").write_text("<html>half a download</html>")

    assert client.fetch_cif(IDS[0], tmp_path) == tmp_path / f"{IDS[0]}.cif"
    client.fetch_cif(IDS[1], tmp_path)  # a corrupt cache entry is fetched again

    assert fake_cod.paths() == [f"/cod/{IDS[0]}.cif", f"/cod/{IDS[1]}.cif"]
    assert (tmp_path / f"{IDS[1]}.cif").read_bytes() == (COD_DIR / f"{IDS[1]}.cif").read_bytes()


def test_cod_rate_limit_spaces_requests(fake_cod: FakeCod, tmp_path: Path) -> None:
    client = _client(fake_cod, request_interval_s=0.2)

    start = time.monotonic()
    for cod_id in IDS:
        client.fetch_cif(cod_id, tmp_path)
    elapsed = time.monotonic() - start

    assert len(fake_cod.requests) == 4
    assert elapsed >= 0.6  # three gaps of at least 0.2 s (a lower bound, not a speed test)
    # Gaps between the server's arrival stamps: a few ms of scheduling jitter on a loaded machine (0.188 s
    # seen with load 7 on 2 cores) is not a client that skips its polite wait (that would be ~0 s).
    assert min(fake_cod.gaps()) >= 0.17


def test_cod_retries_keep_the_polite_interval(fake_cod: FakeCod, tmp_path: Path) -> None:
    fake_cod.fail_first = 1
    client = _client(fake_cod, request_interval_s=0.2, backoff_s=0.01)

    client.fetch_cif(IDS[0], tmp_path)  # fails once, then is served
    client.fetch_cif(IDS[1], tmp_path)

    assert len(fake_cod.requests) == 3
    assert min(fake_cod.gaps()) >= 0.17  # before the retry, and after it before the next id


def test_cod_keeps_a_callers_session_and_agent(fake_cod: FakeCod, tmp_path: Path) -> None:
    session = requests.Session()
    session.headers["User-Agent"] = "my-lab-mirror/2.0"
    fake_cod.fail_first = 1

    CodClient(fake_cod.url, 0.0, session=session, backoff_s=0.01).fetch_cif(IDS[0], tmp_path)

    assert [agent for _, _, agent in fake_cod.requests] == ["my-lab-mirror/2.0"] * 2  # retried too
