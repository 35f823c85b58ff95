"""A stateful local fake of the GitHub REST API parts factory_worker uses, built from GitHub's documented
fields and status codes: list a repository's issues (``GET /repos/{o}/{r}/issues``: ``number``, ``title``,
``body``, ``labels[].name``, ``state``, ``html_url``, ``updated_at``; ``Link: rel="next"`` paging), get one
(``GET .../issues/{n}``, the same fields), add labels
(``POST .../issues/{n}/labels`` -> 200 with the labels), remove one (``DELETE .../labels/{name}`` -> 200, or
404 ``Label does not exist``), list comments (``GET .../comments?per_page&page`` with ``Link``), create one
(``POST .../comments`` -> 201). Faults: ``fail(method, path_part, status, times, headers)`` answers the next
matching requests with that status (429/5xx with ``Retry-After``...), ``delay_comment_s`` holds a comment's
201 *after* storing it (a client killed meanwhile never sees it)."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.fake_http import FakeServer, Response, read_body


@dataclass
class FakeIssue:
    number: int
    title: str
    labels: set[str] = field(default_factory=set)
    comments: list[str] = field(default_factory=list)
    state: str = "open"


class FakeGitHub(FakeServer):
    def __init__(self, repo: str = "acme/widgets") -> None:
        self.repo = repo
        self.issues: dict[int, FakeIssue] = {}
        self.lock = threading.Lock()
        self.faults: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        self.delay_comment_s = 0.0
        self.comments_per_page = 100
        super().__init__()

    @property
    def url(self) -> str:
        return self.base_url

    def add(self, number: int, title: str, labels: tuple[str, ...] = ("agent",)) -> FakeIssue:
        with self.lock:
            issue = self.issues[number] = FakeIssue(number, title, set(labels))
            return issue

    def fail(
        self, method: str, path_part: str, status: int, times: int = 1, headers: dict[str, str] | None = None
    ) -> None:
        with self.lock:
            self.faults.append(
                {"method": method, "part": path_part, "status": status, "times": times, "headers": headers or {}}
            )

    # -- request handling -------------------------------------------------------------------------------
    def _fault(self, method: str, path: str) -> dict[str, Any] | None:
        with self.lock:
            for f in self.faults:
                if f["method"] == method and f["part"] in path and f["times"] > 0:
                    f["times"] -= 1
                    return f
        return None

    def handle(self, method: str, raw_path: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        parts = urlsplit(raw_path)
        path, query = parts.path, parse_qs(parts.query)
        self.requests.append((method, path))
        fault = self._fault(method, path)
        if fault:
            return fault["status"], {"message": "fault injected"}, fault["headers"]
        base = f"/repos/{self.repo}/issues"
        if method == "GET" and path == base:
            with self.lock:
                items = [self._item(i) for i in self.issues.values() if i.state == "open"]
            return 200, items, {}
        m = re.fullmatch(re.escape(base) + r"/(\d+)(/labels(?:/(.+))?|/comments)?", path)
        if not m or int(m.group(1)) not in self.issues:
            return 404, {"message": "Not Found"}, {}
        issue = self.issues[int(m.group(1))]
        if not m.group(2) and method == "GET":  # get an issue
            with self.lock:
                return 200, self._item(issue), {}
        if m.group(2) and m.group(2).startswith("/labels"):
            return self._labels(method, issue, unquote(m.group(3)) if m.group(3) else None, body)
        if m.group(2) == "/comments":
            return self._comments(method, issue, query, body, path)
        return 405, {"message": "Method Not Allowed"}, {}

    @staticmethod
    def _item(i: FakeIssue) -> dict[str, Any]:
        return {
            "number": i.number,
            "title": i.title,
            "body": "",
            "state": i.state,
            "labels": [{"name": n} for n in sorted(i.labels)],
            "html_url": f"https://x/{i.number}",
            "updated_at": "2026-01-01T00:00:00Z",
        }

    def _labels(self, method: str, issue: FakeIssue, name: str | None, body: Any) -> tuple[int, Any, dict[str, str]]:
        with self.lock:
            if method == "POST" and name is None:
                issue.labels.update(body.get("labels", []))
                return 200, [{"name": n} for n in sorted(issue.labels)], {}
            if method == "DELETE" and name is not None:
                if name not in issue.labels:
                    return 404, {"message": "Label does not exist"}, {}
                issue.labels.discard(name)
                return 200, [{"name": n} for n in sorted(issue.labels)], {}
        return 405, {"message": "Method Not Allowed"}, {}

    def _comments(
        self, method: str, issue: FakeIssue, query: dict[str, list[str]], body: Any, path: str
    ) -> tuple[int, Any, dict[str, str]]:
        if method == "POST":
            with self.lock:
                issue.comments.append(body["body"])
                n = len(issue.comments)
            if self.delay_comment_s:
                time.sleep(self.delay_comment_s)  # stored, but the client waits for its 201
            return 201, {"id": n, "body": body["body"]}, {}
        per = min(int(query.get("per_page", ["30"])[0]), self.comments_per_page)
        page = int(query.get("page", ["1"])[0])
        with self.lock:
            rows = [{"id": i + 1, "body": b} for i, b in enumerate(issue.comments)]
        chunk = rows[(page - 1) * per : page * per]
        headers = {}
        if page * per < len(rows):
            headers["Link"] = f'<{self.url}{path}?per_page={per}&page={page + 1}>; rel="next"'
        return 200, chunk, headers

    def route(self, handler: BaseHTTPRequestHandler) -> Response:
        raw = read_body(handler)
        return self.handle(handler.command, handler.path, json.loads(raw) if raw else None)
