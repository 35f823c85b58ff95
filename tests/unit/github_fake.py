"""A local fake of GitHub's REST API (a real HTTP server on 127.0.0.1, no network) for the source's tests."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from factory_worker.sources.github import GitHubSource

TOKEN = "ghp_s3cr3tT0kenValue"


@dataclass
class Req:
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # JSON-encoded unless bytes
    headers: dict[str, str] = field(default_factory=dict)


class Server:
    def __init__(self) -> None:
        self.requests: list[Req] = []
        self.route: Callable[[Req], Reply] = lambda req: Reply(404, {"message": "Not Found"})
        self.url = ""

    @property
    def hits(self) -> int:
        return len(self.requests)


@pytest.fixture
def gh() -> Iterator[Server]:
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            req = Req(parts.path, parse_qs(parts.query), {k.lower(): v for k, v in self.headers.items()})
            state.requests.append(req)
            reply = state.route(req)
            body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            if reply.status == 304:
                body = b""
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            for k, v in reply.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def item(n: int, title: str | None = None, labels: tuple[str, ...] = ("agent",), **extra: Any) -> dict[str, Any]:
    return {
        "number": n,
        "title": title or f"issue {n}",
        "state": "open",
        "body": None,
        "labels": [{"name": lb} for lb in labels],
        "updated_at": "2024-05-01T00:00:00Z",
        "html_url": f"https://github.com/o/r/issues/{n}",
        **extra,
    }


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def source(gh: Server, **kw: Any) -> GitHubSource:
    kw.setdefault("labels", ["agent"])
    kw.setdefault("token", TOKEN)
    return GitHubSource(gh.url, "o/r", **kw)
