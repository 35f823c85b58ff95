"""Write-back to GitHub (Linear: ``tracker_linear.py``): what the outbox (``outbox.py``) delivers, as labels and a comment per event.

Per event, on issue ``{repo}#{issue}`` (REST API, the source's ``github_api_url`` and token):

- ``dispatched``: + ``working_label``; comment with the attempt and the dispatch (its fence)
- ``done``: + ``done_label``, - ``working_label``; comment
- ``backoff``: - ``working_label``; comment with the attempt and the error
- ``parked``: + ``parked_label``, - ``working_label``; comment with the attempt and the error
- ``released``: - ``working_label``; comment with the reason
- ``retried``: - ``parked_label`` (no comment)

An event retried after a newer event of its issue was handed over (``Event.superseded``) only comments:
the labels are the newer event's to set. Idempotent, so that at-least-once delivery is exactly-once on the
tracker: adding a label GitHub already
has and removing one it does not have (404) change nothing; every comment ends with a marker
``<!-- factory-worker:<dispatch token>:<event> -->`` and is posted only when no comment of the issue carries
it yet (a worker that died between GitHub's 201 and the outbox's acknowledgement does not post twice).

Errors: 429 and rate-limited 403 -> retry after ``Retry-After`` / ``X-RateLimit-Reset``; 5xx, timeouts and
connection errors -> retry with backoff; 404/410/422 on the issue -> permanent (the event is parked). The
token is sent only to the configured API origin and never logged.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httpx

from factory_worker.config.settings import SourceSettings, TrackerSettings, secret_from_env
from factory_worker.writeback.outbox import DeliveryError, Event

if TYPE_CHECKING:
    from factory_worker.writeback.linear import LinearWriter

log = logging.getLogger(__name__)

MAX_COMMENT_PAGES = 20
USER_AGENT = "factory-worker write-back"
PERMANENT = (404, 410, 422)


def marker(event: Event) -> str:
    return f"<!-- factory-worker:{event.key} -->"


def comment_body(event: Event) -> str:
    """The comment for ``event``: one line of facts, then the marker. Error text is the ledger's own
    (truncated, from the agent's exit), fenced so it renders as text."""
    f = event.fields
    fence = event.token.partition(":")[0] if event.token else ""
    facts = [f"**{event.event}**"]
    if fence:
        facts.append(f"dispatch {fence}")
    if f.get("attempt"):
        facts.append(f"attempt {f['attempt']}")
    if f.get("reason"):
        facts.append(f"reason: {f['reason']}")
    body = "factory-worker: " + ", ".join(facts)
    if f.get("error"):
        body += "\n\n```\n" + f["error"].replace("```", "'''") + "\n```"
    return body + "\n\n" + marker(event)


class GitHubWriter:
    """Delivers outbox events to one GitHub repository."""

    def __init__(self, source: SourceSettings, tracker: TrackerSettings, client: httpx.Client | None = None) -> None:
        if not source.github_repo:
            raise ValueError("tracker write-back needs source.github_repo (FACTORY_SOURCE__GITHUB_REPO)")
        self.source, self.tracker = source, tracker
        self.base = source.github_api_url.rstrip("/") + f"/repos/{source.github_repo}/issues"
        headers = {
            "Accept": "application/vnd.github+json",
            "User-Agent": USER_AGENT,
            "X-GitHub-Api-Version": "2022-11-28",
        }
        token = secret_from_env(source.github_token_env)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = client or httpx.Client(headers=headers, timeout=tracker.timeout_s, follow_redirects=False)
        self._origin = urlsplit(self.base)[:2]

    def labels_for(self, event: str) -> tuple[list[str], list[str]]:
        s = self.source
        return {
            "dispatched": ([s.working_label], []),
            "done": ([s.done_label], [s.working_label]),
            "parked": ([s.parked_label], [s.working_label]),
            "backoff": ([], [s.working_label]),
            "released": ([], [s.working_label]),
            "retried": ([], [s.parked_label]),
        }.get(event, ([], []))

    def deliver(self, event: Event) -> None:
        if not event.issue.isdigit():
            raise DeliveryError(f"issue id {event.issue!r} is not a GitHub issue number", permanent=True)
        url = f"{self.base}/{event.issue}"
        add, remove = self.labels_for(event.event) if not event.superseded else ([], [])
        if add:
            self._call("POST", f"{url}/labels", json={"labels": add})
        for name in remove:
            self._call("DELETE", f"{url}/labels/{quote(name, safe='')}", missing_ok=True)
        if self.tracker.comments and event.event != "retried" and not self._has_marker(url, marker(event)):
            self._call("POST", f"{url}/comments", json={"body": comment_body(event)})

    def _has_marker(self, url: str, mark: str) -> bool:
        next_url: str | None = f"{url}/comments?per_page=100"
        for _ in range(MAX_COMMENT_PAGES):
            if next_url is None:
                return False
            resp = self._call("GET", next_url)
            if any(mark in str(c.get("body", "")) for c in resp.json() if isinstance(c, dict)):
                return True
            next_url = resp.links.get("next", {}).get("url")
            if next_url and urlsplit(next_url)[:2] != self._origin:
                next_url = None  # never follow a link (and send the token) off the API origin
        return False

    def _call(self, method: str, url: str, missing_ok: bool = False, **kw: Any) -> httpx.Response:
        try:
            resp = self.http.request(method, url, **kw)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{method} {self._path(url)}: {type(exc).__name__}") from None
        if resp.status_code < 300 or (missing_ok and resp.status_code == 404):
            return resp
        where = f"{method} {self._path(url)}: HTTP {resp.status_code}"
        limited = resp.status_code == 429 or (
            resp.status_code == 403
            and (resp.headers.get("retry-after") or resp.headers.get("x-ratelimit-remaining") == "0")
        )
        if limited:
            raise DeliveryError(f"{where} (rate limited)", retry_after=_wait(resp.headers))
        raise DeliveryError(where, permanent=resp.status_code in PERMANENT)

    def _path(self, url: str) -> str:
        return urlsplit(url).path


def _wait(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    if value:
        try:
            wait = float(value)
            return wait if 0 <= wait < float("inf") else None
        except ValueError:
            return None
    reset = headers.get("x-ratelimit-reset")
    if reset and reset.isdigit():
        return max(0.0, int(reset) - time.time())
    return None


def writer_for(source: SourceSettings, tracker: TrackerSettings) -> GitHubWriter | LinearWriter:
    """The writer of the configured source: GitHub or Linear (settings refuse write-back for any other)."""
    if source.kind == "linear":
        from factory_worker.writeback.linear import LinearWriter

        return LinearWriter(source, tracker)
    return GitHubWriter(source, tracker)
