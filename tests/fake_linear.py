"""A local fake of Linear's GraphQL API: the operations factory_worker sends, answered with the fields Linear
documents (developers.linear.app: ``issues(filter, first, after)`` with ``nodes`` and
``pageInfo { hasNextPage endCursor }``; ``Issue { id identifier title description url updatedAt state { name
type } labels { nodes { name } } team { key } project { name } comments(first, filter: {body: {contains}})
{ nodes { id } } }``; ``workflowStates`` (with each type the schema names: triage, backlog, unstarted,
started, completed, canceled, duplicate); ``issueUpdate(id, input: {stateId})``; ``commentCreate(input:
{issueId, body})``).

It is not a GraphQL engine: a request is routed by its operation name (``query Issues(...)`` -> ``Issues``)
and answered from its variables. Errors as Linear sends them: ``{"errors": [{"message", "extensions":
{"code": "RATELIMITED"}}]}`` with ``X-RateLimit-Requests-Reset`` (epoch ms), HTTP 429, 5xx, 401 for a wrong
key, an error for an unknown issue, slow answers. ``requests`` records (operation, Authorization header).
Malformed answers (what a test feeds a source): ``tamper[identifier]`` rewrites that issue's node as sent
(any JSON value), ``tamper_page`` the ``issues`` object of every ``Issues`` page.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.fake_http import FakeServer, Response, read_body

STATES = {
    "Triage": "triage",
    "Backlog": "backlog",
    "Todo": "unstarted",
    "In Progress": "started",
    "Done": "completed",
    "Canceled": "canceled",
    "Duplicate": "duplicate",
}


@dataclass
class FakeLinearIssue:
    identifier: str
    title: str
    state: str = "Todo"
    labels: list[str] = field(default_factory=list)
    team: str = "ENG"
    project: str | None = None
    description: str = ""
    comments: list[str] = field(default_factory=list)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


class FakeLinear(FakeServer):
    def __init__(self, token: str = "lin_api_test") -> None:
        self.token = token
        self.lock = threading.Lock()
        self.issues: dict[str, FakeLinearIssue] = {}
        self.state_ids = {name: f"state-{i}" for i, name in enumerate(STATES)}
        self.requests: list[tuple[str, str | None]] = []
        self.faults: list[dict[str, Any]] = []
        self.delay_comment_s = 0.0
        self.comments_page = 250
        self.tamper: dict[str, Callable[[dict[str, Any]], Any]] = {}
        self.tamper_page: Callable[[dict[str, Any]], Any] | None = None
        #: user id -> the ``User`` fields the webhook receiver asks for (``id active guest teams { nodes { key } }``)
        self.users: dict[str, dict[str, Any]] = {}
        super().__init__()

    @property
    def url(self) -> str:
        return f"{self.base_url}/graphql"

    def add(
        self, identifier: str, title: str, state: str = "Todo", labels: tuple[str, ...] = (), **kw: Any
    ) -> FakeLinearIssue:
        with self.lock:
            issue = self.issues[identifier] = FakeLinearIssue(identifier, title, state, list(labels), **kw)
            return issue

    def fail(
        self, op: str, status: int = 500, times: int = 1, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        """The next ``times`` calls of ``op`` get ``status`` (and a GraphQL error with ``code``)."""
        with self.lock:
            self.faults.append({"op": op, "status": status, "times": times, "code": code, "headers": headers or {}})

    def ops(self, op: str) -> int:
        with self.lock:
            return sum(1 for o, _ in self.requests if o == op)

    # -- request handling -------------------------------------------------------------------------------
    def route(self, handler: BaseHTTPRequestHandler) -> Response:
        if handler.command != "POST" or not handler.path.startswith("/graphql"):
            return 404, {"errors": [{"message": "not found"}]}, {}
        try:
            req = json.loads(read_body(handler) or b"{}")
            words = str(req["query"]).split(None, 2)
            op, variables = words[1].split("(")[0], req.get("variables") or {}
        except (ValueError, KeyError, IndexError):
            return (
                400,
                {"errors": [{"message": "GraphQL parse error", "extensions": {"code": "GRAPHQL_PARSE_FAILED"}}]},
                {},
            )
        with self.lock:
            self.requests.append((op, handler.headers.get("Authorization")))
            fault = next((f for f in self.faults if f["op"] == op and f["times"] > 0), None)
            if fault:
                fault["times"] -= 1
        if handler.headers.get("Authorization") != self.token:
            return (
                401,
                {
                    "errors": [
                        {
                            "message": "Authentication required, not authenticated",
                            "extensions": {"code": "AUTHENTICATION_ERROR"},
                        }
                    ]
                },
                {},
            )
        if fault:
            errors = [
                {
                    "message": "Rate limit exceeded" if fault["code"] == "RATELIMITED" else "Internal error",
                    "extensions": {"code": fault["code"] or "INTERNAL_SERVER_ERROR"},
                }
            ]
            return fault["status"], {"errors": errors}, fault["headers"]
        handler_fn = getattr(self, f"_op_{op}", None)
        if handler_fn is None:
            return 400, {"errors": [{"message": f"Unknown operation {op}"}]}, {}
        return handler_fn(variables)

    def _node(self, i: FakeLinearIssue, containing: str | None = None) -> dict[str, Any]:
        node = {
            "id": i.id,
            "identifier": i.identifier,
            "title": i.title,
            "description": i.description,
            "url": f"https://linear.app/acme/issue/{i.identifier}",
            "updatedAt": "2026-11-25T08:00:00.000Z",
            "state": {"name": i.state, "type": STATES[i.state]},
            "labels": {"nodes": [{"name": n} for n in i.labels]},
            "team": {"key": i.team},
            "project": {"name": i.project} if i.project else None,
        }
        if containing is not None:  # comments(first: 1, filter: {body: {contains: ...}})
            hits = [{"id": f"comment-{n}"} for n, b in enumerate(i.comments) if containing in b]
            node["comments"] = {"nodes": hits[:1]}
        return node

    def _op_Issues(self, v: dict[str, Any]) -> Response:
        f = v.get("filter") or {}
        team = f.get("team", {}).get("key", {}).get("eq")
        states = f.get("state", {}).get("name", {}).get("in")
        project = (f.get("project") or {}).get("name", {}).get("eq")
        with self.lock:
            rows = [
                i
                for i in self.issues.values()
                if (team is None or i.team == team)
                and (states is None or i.state in states)
                and (project is None or i.project == project)
            ]
            start, first = int(v.get("after") or 0), min(int(v.get("first") or 50), 250)
            chunk = [self._sent(i) for i in rows[start : start + first]]
        more = start + first < len(rows)
        page = {"nodes": chunk, "pageInfo": {"hasNextPage": more, "endCursor": str(start + first)}}
        return 200, {"data": {"issues": self.tamper_page(page) if self.tamper_page else page}}, {}

    def _sent(self, i: FakeLinearIssue, containing: str | None = None) -> Any:
        """The node as sent: ``tamper`` may rewrite it (a malformed answer)."""
        node = self._node(i, containing)
        fn = self.tamper.get(i.identifier)
        return fn(node) if fn else node

    def _find(self, key: str) -> FakeLinearIssue | None:
        return self.issues.get(key) or next((i for i in self.issues.values() if i.id == key), None)

    def _op_Issue(self, v: dict[str, Any], containing: str | None = None) -> Response:
        with self.lock:
            issue = self._find(str(v.get("id")))
            if issue is None:
                return (
                    200,
                    {
                        "data": {"issue": None},
                        "errors": [{"message": "Entity not found: Issue", "extensions": {"type": "invalid input"}}],
                    },
                    {},
                )
            return 200, {"data": {"issue": self._sent(issue, containing)}}, {}

    def _op_IssueForWrite(self, v: dict[str, Any]) -> Response:
        if not isinstance(v.get("marker"), str):
            message = 'Variable "$marker" of required type "String!" was not provided.'
            return 400, {"errors": [{"message": message}]}, {}
        return self._op_Issue(v, containing=v["marker"])

    def _op_IssueState(self, v: dict[str, Any]) -> Response:
        return self._op_Issue(v)

    def _op_CommandUser(self, v: dict[str, Any]) -> Response:
        with self.lock:
            user = self.users.get(str(v.get("id")))
        if user is None:
            return (
                200,
                {
                    "data": None,
                    "errors": [{"message": "Entity not found: User", "extensions": {"type": "invalid input"}}],
                },
                {},
            )
        return 200, {"data": {"user": user}}, {}

    def _op_States(self, v: dict[str, Any]) -> Response:
        nodes = [{"id": sid, "name": name} for name, sid in self.state_ids.items()]
        return 200, {"data": {"workflowStates": {"nodes": nodes}}}, {}

    def _op_Move(self, v: dict[str, Any]) -> Response:
        by_id = {sid: name for name, sid in self.state_ids.items()}
        with self.lock:
            issue = self._find(str(v.get("id")))
            if issue is None or v.get("state") not in by_id:
                return (
                    200,
                    {
                        "data": None,
                        "errors": [{"message": "Entity not found", "extensions": {"type": "invalid input"}}],
                    },
                    {},
                )
            issue.state = by_id[v["state"]]
        return 200, {"data": {"issueUpdate": {"success": True}}}, {}

    def _op_Comment(self, v: dict[str, Any]) -> Response:
        with self.lock:
            issue = self._find(str(v.get("issue")))
            if issue is None:
                return 200, {"data": None, "errors": [{"message": "Entity not found"}]}, {}
            issue.comments.append(str(v.get("body")))
        if self.delay_comment_s:
            time.sleep(self.delay_comment_s)  # created, then slow to answer: the POST-then-crash window
        return 200, {"data": {"commentCreate": {"success": True}}}, {}
