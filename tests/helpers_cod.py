"""A real local HTTP server that answers as www.crystallography.net/cod does, serving ../shared/cod.

It can fail the first K requests (any status, with or without ``Retry-After``), answer HTML with status
200 for some ids, or give a fixed search answer; it records every request (time, path, User-Agent). The
client under test talks to it over a real socket, so the retry library is exercised, not mocked.
"""

from __future__ import annotations

import csv
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from conftest import COD_DIR

# Small, quick files from ../shared/cod (all parse; all are plain COD entries named <id>.cif).
IDS = ["1000017", "1000023", "1000026", "1000032"]


def cod_index() -> dict[str, dict[str, str]]:
    with open(COD_DIR / "INDEX.csv", newline="", encoding="utf-8") as fh:
        return {r["cod_id"]: r for r in csv.DictReader(fh)}


def elements(formula: str) -> set[str]:
    return set(re.findall(r"[A-Z][a-z]?", formula))


def read_report(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@dataclass
class FakeCod:
    """Serves ../shared/cod as COD does; can fail the first K requests or answer HTML for some ids."""

    cod_dir: Path
    fail_first: int = 0
    fail_status: int = 503
    retry_after: str | None = None
    html_ids: set[str] = field(default_factory=set)
    search_result: list[str] | None = None  # a fixed answer to any search, instead of filtering INDEX.csv
    requests: list[tuple[float, str, str]] = field(default_factory=list)  # (time, path, user agent)
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths(self) -> list[str]:
        return [p for _, p, _ in self.requests]

    def gaps(self) -> list[float]:
        """Seconds between consecutive requests' arrivals."""
        return [b[0] - a[0] for a, b in zip(self.requests, self.requests[1:], strict=False)]

    def search(self, query: dict[str, list[str]]) -> list[str]:
        if self.search_result is not None:
            return self.search_result
        want = {v[0] for k, v in query.items() if re.fullmatch(r"el[1-8]", k)}
        avoid = {v[0] for k, v in query.items() if re.fullmatch(r"nel[1-8]", k)}
        lo = int(query.get("strictmin", ["0"])[0])
        hi = int(query.get("strictmax", ["99"])[0])
        hits = []
        for cod_id, row in cod_index().items():
            found = elements(row["formula"])
            if want <= found and not avoid & found and lo <= len(found) <= hi:
                hits.append(cod_id)
        return hits

    def handle(self, handler: BaseHTTPRequestHandler) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(handler.path)
        with self.lock:
            self.requests.append((time.monotonic(), parts.path, handler.headers.get("User-Agent", "")))
            failing = len(self.requests) <= self.fail_first
        if failing:
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            return self.fail_status, headers, b"<html><body>try again later</body></html>"
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


@contextmanager
def serve_fake_cod(cod_dir: Path) -> Iterator[FakeCod]:
    """A :class:`FakeCod` listening on 127.0.0.1 (its ``url`` ends in ``/cod``) until the block ends."""
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
