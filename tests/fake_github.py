"""A stateful local fake of the GitHub REST API parts factory_worker uses, built from GitHub's documented
fields and status codes: list a repository's issues (``GET /repos/{o}/{r}/issues``: ``number``, ``title``,
``body``, ``labels[].name``, ``state``, ``html_url``, ``updated_at``; ``Link: rel="next"`` paging), get one
(``GET .../issues/{n}``, the same fields), add labels
(``POST .../issues/{n}/labels`` -> 200 with the labels), remove one (``DELETE .../labels/{name}`` -> 200, or
404 ``Label does not exist``), list an issue's labels (``GET .../labels``), list comments (``GET .../comments``
with the parameters GitHub documents for it, and only those: ``since`` (updated at or after), ``per_page``
(at most 100), ``page``; ascending ids; ``Link: rel="next"``; anything else, e.g. ``sort`` or ``direction``,
is ignored as GitHub ignores it), create one (``POST .../comments`` -> 201 with ``id``, ``created_at``,
``updated_at``). Faults: ``fail(method, path_part, status, times, headers)`` answers the next matching
requests with that status (429/5xx with ``Retry-After``...), ``delay_comment_s`` holds a comment's 201
*after* storing it (a client killed meanwhile never sees it), ``lose(method, path_part, every, stall_s)``
applies matching requests and loses every ``every``-th answer (the connection closes without one, or with
``stall_s`` the answer comes that late), ``hold(method, path_part, s)`` waits before applying (a slow
GitHub: the write lands late). ``clock`` stamps comments (settable).

Pull requests (``/repos/{o}/{r}/pulls``, GitHub's ``pulls/list``, ``pulls/create``, ``pulls/get``,
``pulls/update``): list with ``state`` (default ``open``), ``head`` (``owner:branch``), ``base``, ``per_page``
/ ``page`` and ``Link`` paging -> 200 with ``number``, ``html_url``, ``url``, ``state``, ``title``, ``body``,
``draft``, ``head{label,ref,sha}``, ``base{label,ref}``; create (``head`` and ``base`` required, ``title``)
-> 201 with a ``Location`` header, or 422 ``Validation Failed`` (a missing field, an open pull request for
that head and base exists already, or the head branch does not exist when ``branches`` is given); get and
update (``title``, ``body``, ``state``, ``base``) -> 200, or 404. Numbers are shared with issues.
``drop_every = n`` answers every n-th request whose path contains ``drop_part`` (and method is in
``drop_methods`` when set) with nothing: the request is applied, then the connection closed (a lost answer)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from tests.fake_http import LOST, FakeServer, Response, read_body


@dataclass
class FakeIssue:
    number: int
    title: str
    labels: set[str] = field(default_factory=set)
    comments: list[str] = field(default_factory=list)
    state: str = "open"
    #: per comment (by position): (created_at, updated_at) in epoch seconds; a comment without one (a test
    #: appended its body) counts as written long ago
    stamps: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class FakePull:
    number: int
    title: str
    head: str
    base: str
    body: str = ""
    state: str = "open"
    draft: bool = False
    updates: int = 0


class FakeGitHub(FakeServer):
    def __init__(self, repo: str = "acme/widgets") -> None:
        self.repo = repo
        self.issues: dict[int, FakeIssue] = {}
        self.lock = threading.Lock()
        self.faults: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        #: (method, path, query parameters) of every request
        self.queries: list[tuple[str, str, dict[str, list[str]]]] = []
        self.delay_comment_s = 0.0
        self.comments_per_page = 100
        self.losses: list[dict[str, Any]] = []
        self.holds: list[dict[str, Any]] = []
        self.clock = time.time
        self.pulls: dict[int, FakePull] = {}
        self.pulls_per_page = 30
        #: ``branch -> exists?`` of the repository (None: every head branch exists)
        self.branches: Callable[[str], bool] | None = None
        self.drop_every, self.drop_part, self.drop_methods = 0, "/pulls", None
        self.dropped, self._drop_seen = 0, 0
        super().__init__()

    @property
    def url(self) -> str:
        return self.base_url

    def add(self, number: int, title: str, labels: tuple[str, ...] = ("agent",)) -> FakeIssue:
        with self.lock:
            issue = self.issues[number] = FakeIssue(number, title, set(labels))
            return issue

    def comment(self, number: int, body: str, at: float | None = None) -> None:
        """A comment by someone else, written at ``at`` (default now)."""
        with self.lock:
            issue = self.issues[number]
            when = self.clock() if at is None else at
            issue.stamps.extend([(0.0, 0.0)] * (len(issue.comments) - len(issue.stamps)))
            issue.comments.append(body)
            issue.stamps.append((when, when))

    def lose(self, method: str, path_part: str, every: int = 1, stall_s: float = 0.0) -> None:
        """Apply every matching request, then lose every ``every``-th answer: the connection closes without
        one (``stall_s`` 0) or the answer comes ``stall_s`` late (after the client gave up)."""
        with self.lock:
            self.losses.append({"method": method, "part": path_part, "every": every, "stall_s": stall_s, "n": 0})

    def hold(self, method: str, path_part: str, seconds: float, times: int = 1) -> None:
        """The next ``times`` matching requests wait ``seconds`` *before* they are applied."""
        with self.lock:
            self.holds.append({"method": method, "part": path_part, "s": seconds, "times": times})

    def labels_of(self, number: int) -> set[str]:
        """The issue's labels as GitHub answers ``GET .../labels`` (the final read of a test)."""
        status, body, _ = self.handle("GET", f"/repos/{self.repo}/issues/{number}/labels?per_page=100", None)
        assert status == 200, body
        return {x["name"] for x in body}

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
        self.queries.append((method, path, query))
        fault = self._fault(method, path)
        if fault:
            return fault["status"], {"message": "fault injected"}, fault["headers"]
        if path.startswith(f"/repos/{self.repo}/pulls"):
            return self._pulls(method, path, query, body)
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
            if method == "GET" and name is None:
                return 200, [{"name": n} for n in sorted(issue.labels)], {}
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
                now = self.clock()
                issue.stamps.extend([(0.0, 0.0)] * (len(issue.comments) - len(issue.stamps)))
                issue.comments.append(body["body"])
                issue.stamps.append((now, now))
                n = len(issue.comments)
            if self.delay_comment_s:
                time.sleep(self.delay_comment_s)  # stored, but the client waits for its 201
            return 201, {"id": n, "body": body["body"], "created_at": _iso(now), "updated_at": _iso(now)}, {}
        if method != "GET":
            return 405, {"message": "Method Not Allowed"}, {}
        per = min(int(query.get("per_page", ["30"])[0]), 100, self.comments_per_page)
        page = int(query.get("page", ["1"])[0])
        since = _parse_iso(query["since"][0]) if "since" in query else None
        with self.lock:
            stamps = issue.stamps + [(0.0, 0.0)] * (len(issue.comments) - len(issue.stamps))
            rows = [
                {"id": i + 1, "body": b, "created_at": _iso(c), "updated_at": _iso(u)}
                for i, (b, (c, u)) in enumerate(zip(issue.comments, stamps))
                if since is None or u >= since
            ]
        chunk = rows[(page - 1) * per : page * per]
        headers = {}
        if page * per < len(rows):
            rest = {k: v[0] for k, v in query.items() if k != "page"}
            headers["Link"] = f'<{self.url}{path}?{urlencode({**rest, "page": page + 1})}>; rel="next"'
        return 200, chunk, headers

    def _matching(self, rules: list[dict[str, Any]], method: str, path: str) -> dict[str, Any] | None:
        with self.lock:
            return next(
                (r for r in rules if r["method"] == method and r["part"] in path and r.get("times", 1) > 0), None
            )

    # -- pull requests ------------------------------------------------------------------------------------
    def open_pulls(self, head: str | None = None) -> list[FakePull]:
        with self.lock:
            return [p for p in self.pulls.values() if p.state == "open" and (head is None or p.head == head)]

    def _pull_json(self, p: FakePull) -> dict[str, Any]:
        owner = self.repo.split("/")[0]
        return {
            "url": f"{self.url}/repos/{self.repo}/pulls/{p.number}",
            "html_url": f"https://github.example/{self.repo}/pull/{p.number}",
            "number": p.number,
            "state": p.state,
            "title": p.title,
            "body": p.body,
            "draft": p.draft,
            "head": {"label": f"{owner}:{p.head}", "ref": p.head, "sha": "0" * 40},
            "base": {"label": f"{owner}:{p.base}", "ref": p.base},
            "user": {"login": "factory"},
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
        }

    @staticmethod
    def _invalid(field: str, code: str, message: str | None = None) -> Response:
        error = {"resource": "PullRequest", "field": field, "code": code}
        if message:
            error["message"] = message
        doc = "https://docs.github.com/rest/pulls/pulls#create-a-pull-request"
        return 422, {"message": "Validation Failed", "errors": [error], "documentation_url": doc}, {}

    def _pulls(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> Response:
        base = f"/repos/{self.repo}/pulls"
        one = re.fullmatch(re.escape(base) + r"/(\d+)", path)
        if path == base and method == "GET":
            state = query.get("state", ["open"])[0]
            head = query.get("head", [None])[0]
            want_base = query.get("base", [None])[0]
            owner = self.repo.split("/")[0]
            with self.lock:
                rows = [
                    self._pull_json(p)
                    for p in sorted(self.pulls.values(), key=lambda p: -p.number)
                    if (state == "all" or p.state == state)
                    and (head is None or f"{owner}:{p.head}" == head)
                    and (want_base is None or p.base == want_base)
                ]
            per = min(int(query.get("per_page", ["30"])[0]), 100, self.pulls_per_page)
            page = int(query.get("page", ["1"])[0])
            headers = {}
            if page * per < len(rows):
                headers["Link"] = f'<{self.url}{base}?per_page={per}&page={page + 1}>; rel="next"'
            return 200, rows[(page - 1) * per : page * per], headers
        if path == base and method == "POST":
            body = body or {}
            for field_name in ("head", "base", "title"):
                if not isinstance(body.get(field_name), str) or not body[field_name]:
                    return self._invalid(field_name, "missing_field")
            if self.branches is not None and not self.branches(body["head"]):
                return self._invalid("head", "invalid")
            with self.lock:
                for p in self.pulls.values():
                    if p.state == "open" and p.head == body["head"] and p.base == body["base"]:
                        owner = self.repo.split("/")[0]
                        return self._invalid("", "custom", f"A pull request already exists for {owner}:{p.head}.")
                number = max([0, *self.issues, *self.pulls]) + 1
                p = self.pulls[number] = FakePull(
                    number,
                    body["title"],
                    body["head"],
                    body["base"],
                    body.get("body") or "",
                    draft=bool(body.get("draft")),
                )
                return 201, self._pull_json(p), {"Location": f"{self.url}{base}/{number}"}
        if one and method in ("GET", "PATCH"):
            with self.lock:
                p = self.pulls.get(int(one.group(1)))
                if p is None:
                    return 404, {"message": "Not Found"}, {}
                if method == "PATCH":
                    body = body or {}
                    if body.get("state") not in (None, "open", "closed"):
                        return self._invalid("state", "invalid")
                    for key in ("title", "body", "state", "base"):
                        if isinstance(body.get(key), str):
                            setattr(p, key, body[key])
                    p.updates += 1
                return 200, self._pull_json(p), {}
        return 404, {"message": "Not Found"}, {}

    def _drop(self, method: str, path: str) -> bool:
        """Is this request's answer to be lost (``drop_every``)?"""
        if not self.drop_every or self.drop_part not in path:
            return False
        if self.drop_methods is not None and method not in self.drop_methods:
            return False
        with self.lock:
            self._drop_seen += 1
            if self._drop_seen % self.drop_every:
                return False
            self.dropped += 1
            return True

    def route(self, handler: BaseHTTPRequestHandler) -> Response:
        raw = read_body(handler)
        method, path = handler.command, urlsplit(handler.path).path
        hold = self._matching(self.holds, method, path)
        if hold:
            with self.lock:
                hold["times"] -= 1
            time.sleep(hold["s"])
        answer = self.handle(method, handler.path, json.loads(raw) if raw else None)
        if self._drop(method, path):
            return LOST, None, {}
        loss = self._matching(self.losses, method, path)
        if loss:
            with self.lock:
                loss["n"] += 1
                lost = loss["n"] % loss["every"] == 0
            if lost and loss["stall_s"]:
                time.sleep(loss["stall_s"])  # applied; its answer comes after the client gave up
            elif lost:
                return LOST, None, {}  # applied; the client never learns it
        return answer


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(value: str) -> float:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
