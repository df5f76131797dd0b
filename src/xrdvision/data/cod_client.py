"""The Crystallography Open Database's REST interface: fetch a CIF by id, search ids, cache downloads.

COD is a free service run by a small team, so the client is polite: a minimum interval between requests,
a User-Agent that names this tool, retries with exponential backoff that honour ``Retry-After``, and a
download cache so an interrupted or repeated run asks only for what it lacks. The retries are urllib3's
:class:`~urllib3.util.Retry` mounted on the ``requests`` session; this module only says which answers
are worth retrying and turns the final answer into a file or one :class:`CodError` line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import InvalidHeader
from urllib3.util import Retry

from xrdvision import __version__
from xrdvision.data.cif_files import looks_like_cod_cif
from xrdvision.errors import XrdVisionError
from xrdvision.formats.atomic import atomic_path

log = logging.getLogger(__name__)

USER_AGENT = f"xrdvision/{__version__} (powder-XRD crystal-system classifier)"
# Worth asking again: the server is busy (429) or failing (5xx). Any other 4xx is final, 404 included.
RETRY_STATUSES = frozenset({429, *range(500, 600)})


class CodError(XrdVisionError):
    """A COD request that failed for good (after retries), or an answer that is not what was asked."""


class CodNotFound(CodError):
    """COD has no entry with that id (HTTP 404): retrying will not help."""


class _PatientRetry(Retry):
    """urllib3's Retry with two changes for a small free service.

    - The first retry waits ``backoff_factor`` too (urllib3 retries the first failure at once, then waits
      ``backoff_factor * 2**(n - 1)``), so the waits are ``backoff_factor`` x 1, 2, 4, ... up to
      ``backoff_max``. A ``Retry-After`` header still overrides them.
    - A ``Retry-After`` that is neither seconds nor an HTTP date is ignored (the backoff applies) instead
      of ending the download with ``InvalidHeader``.
    """

    def get_backoff_time(self) -> float:
        return min(self.backoff_max, max(self.backoff_factor, super().get_backoff_time()))

    def parse_retry_after(self, retry_after: str) -> float:
        try:
            return super().parse_retry_after(retry_after)
        except InvalidHeader:
            return 0.0  # falsy: Retry.sleep then waits the backoff


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
    ``strictmax``, ``formula``, ``text``, ...). ``request_interval_s`` spaces the requests this client
    makes. A failed one (connection error, timeout, HTTP 429 or 5xx) is retried ``retries`` times, after
    the server's ``Retry-After`` if it sends one, else after ``b`` x 1, 2, 4, ... seconds with ``b`` the
    larger of ``backoff_s`` and ``request_interval_s`` (a retry is a request too); no wait is longer than
    ``max_wait_s``. ``n_requests`` counts the attempts sent, retries included.
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
        self.session = session if session is not None else requests.Session()
        agent = self.session.headers.get("User-Agent", "")
        if not agent or agent.startswith("python-requests"):  # keep a caller's own agent, replace the default
            self.session.headers["User-Agent"] = USER_AGENT
        retry = _PatientRetry(
            total=retries,
            allowed_methods=frozenset({"GET"}),
            status_forcelist=RETRY_STATUSES,
            backoff_factor=max(backoff_s, request_interval_s),
            backoff_max=max_wait_s,
            retry_after_max=max_wait_s,
            respect_retry_after_header=True,
            raise_on_status=False,  # after the last try, hand back the last answer: its status is the reason
        )
        # Only requests to COD get this policy, also on a session the caller passed in.
        self.session.mount(f"{self.base_url}/", HTTPAdapter(max_retries=retry))
        self.n_requests = 0
        self._last_request = float("-inf")

    def _wait_turn(self) -> None:
        wait = self._last_request + self.request_interval_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last_request = time.monotonic()

    def _count(self, attempts: int) -> None:
        self.n_requests += attempts
        if attempts > 1:  # retried: the polite interval runs from the last try, not the first
            self._last_request = time.monotonic()

    def _get(self, url: str, params: Mapping[str, Any] | None = None) -> requests.Response:
        """GET with rate limiting and retries; 404 -> :class:`CodNotFound`, give-up -> :class:`CodError`."""
        self._wait_turn()
        try:
            response = self.session.get(url, params=params, timeout=self.timeout_s)
        except (requests.ConnectionError, requests.Timeout) as exc:
            self._count(self.retries + 1)  # urllib3 gives up on a connection only when no retry is left
            raise CodError(f"{url}: {type(exc).__name__} after {self.retries + 1} attempt(s)") from None
        attempts = len(response.raw.retries.history) + 1
        self._count(attempts)
        status = response.status_code
        if status == 404:
            raise CodNotFound(f"{url}: not found on COD")
        if status < 400:
            return response
        if status in RETRY_STATUSES:
            raise CodError(f"{url}: HTTP {status} {response.reason} after {attempts} attempt(s)")
        raise CodError(f"{url}: HTTP {status} {response.reason}")

    def fetch_cif(self, cod_id: int | str, dest_dir: str | Path) -> Path:
        """``<dest_dir>/<cod_id>.cif``, downloaded unless a valid copy is already there (resume)."""
        cached = cached_cif(cod_id, dest_dir)
        if cached is not None:
            log.debug("COD %s: from the cache %s", cod_id, cached)
            return cached
        url = f"{self.base_url}/{cod_id}.cif"
        body = self._get(url).content
        if not looks_like_cod_cif(body):
            raise CodError(f"{url}: not a CIF (got HTML?)")
        dest = Path(dest_dir) / f"{cod_id}.cif"
        with atomic_path(dest) as tmp:
            tmp.write_bytes(body)
        log.debug("COD %s: downloaded to %s", cod_id, dest)
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
