"""Write-back to GitHub (Linear: ``tracker_linear.py``): what the outbox (``outbox.py``) delivers, as labels and a comment per event.

Per event, on issue ``{repo}#{issue}`` (REST API, the source's ``github_api_url`` and token):

- ``dispatched``: + ``working_label``; comment with the attempt and the dispatch (its fence)
- ``done``: + ``done_label``, - ``working_label``; comment
- ``backoff``: - ``working_label``; comment with the attempt and the error
- ``parked``: + ``parked_label``, - ``working_label``; comment with the attempt and the error
- ``released``: - ``working_label``; comment with the reason
- ``retried``: - ``parked_label`` (no comment)

An event retried after a newer event of its issue was handed over (``Event.superseded``) comments and
writes the newer event's labels, not its own (``Event.shows``; :meth:`GitHubWriter.settle` writes an
event's labels alone, for the outbox's second look after a delivery). Idempotent, so that at-least-once
delivery is exactly-once on the tracker:

- Labels: adding a label GitHub already has and removing one it does not have (404) change nothing. A
  label write whose answer is lost (timeout, dropped connection, 5xx: GitHub may have applied it) does not
  fail the event by itself: after the writes the issue's labels are read once, and the event fails (to be
  retried) only when they are not as wanted. So a done issue ends with the done label and without the
  working label even when no label write is ever answered.
- Comments: every comment ends with a marker ``<!-- factory-worker:<dispatch id>:<event> -->`` (the dispatch
  id is ``Event.dispatch_id``: the fence and a hash of the token, never the token) and is posted only when
  no comment of the issue carries it yet. An event just read as new, never handed over before and not yet
  open to a takeover (``Event.fresh``), cannot have a comment, so it is posted at once; otherwise (a retry,
  a takeover, a slow delivery) the issue's comments updated since the event happened
  (``since`` = its ``at_ms`` less :data:`MARKER_SKEW_S`; GitHub lists an issue's comments by ascending id
  and offers no other order) are read, at most :data:`MARKER_PAGES` pages of 100: the factory's comment is
  among the first comments of that window, however many comments came before the event or after the
  comment. Only more than 300 comments created or edited inside the window push it out (then it is posted,
  and may appear twice).

Errors: 429 and rate-limited 403 -> retry after ``Retry-After`` / ``X-RateLimit-Reset`` (else 60 s; never
more than ``source.github_max_retry_after_s``: the source's own reading, ``github_http.retry_wait_s``); 5xx,
timeouts and connection errors -> retry with backoff; 404/410/422 on the issue -> permanent (the event is
parked). The token is sent only to the configured API origin and never logged.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpx

from factory_worker.config.settings import SourceSettings, TrackerSettings, secret_from_env
from factory_worker.sources.github_http import iso, rate_limited, retry_wait_s
from factory_worker.writeback.events import DeliveryError, Event, comment_body, marker

log = logging.getLogger(__name__)

#: Pages of comments (100 each) read at most when looking for an event's comment.
MARKER_PAGES = 3
#: The comments looked at start this long before the event happened (Redis' clock against GitHub's).
MARKER_SKEW_S = 60.0
USER_AGENT = "factory-worker write-back"
PERMANENT = (404, 410, 422)


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
        self._set_labels(url, *self.labels_for(event.shows))
        if self.tracker.comments and event.event != "retried" and (event.fresh or not self._has_marker(url, event)):
            self._call("POST", f"{url}/comments", json={"body": comment_body(event)})

    def settle(self, issue: str, event: str) -> None:
        """The labels ``event`` leaves on ``issue``, without a comment."""
        if not issue.isdigit():
            raise DeliveryError(f"issue id {issue!r} is not a GitHub issue number", permanent=True)
        self._set_labels(f"{self.base}/{issue}", *self.labels_for(event))

    def _set_labels(self, url: str, add: list[str], remove: list[str]) -> None:
        """``add`` on the issue, ``remove`` off it. A write whose answer was lost is checked by one read of
        the issue's labels after the writes: the event fails only when they are not as wanted."""
        unsure: DeliveryError | None = None
        if add:
            unsure = self._write("POST", f"{url}/labels", json={"labels": add}) or unsure
        for name in remove:
            unsure = self._write("DELETE", f"{url}/labels/{quote(name, safe='')}", missing_ok=True) or unsure
        if unsure is None:
            return
        have = {str(x.get("name", "")).casefold() for x in _objects(self._call("GET", f"{url}/labels?per_page=100"))}
        if any(n.casefold() not in have for n in add) or any(n.casefold() in have for n in remove):
            raise unsure
        log.info("issue %s: labels as wanted after a lost answer (%s)", url.rsplit("/", 1)[-1], unsure)

    def _write(self, method: str, url: str, **kw: Any) -> DeliveryError | None:
        """One write; None when answered, the error when its answer was lost (it may have been applied)."""
        try:
            self._call(method, url, **kw)
        except _Unsure as exc:
            return exc
        return None

    def _has_marker(self, url: str, event: Event) -> bool:
        mark, params = marker(event), {"per_page": "100"}
        at_ms = event.fields.get("at_ms", "")
        if at_ms.isdigit():
            params["since"] = iso(max(0.0, int(at_ms) / 1000 - MARKER_SKEW_S))
        next_url: str | None = f"{url}/comments?{urlencode(params)}"
        for _ in range(MARKER_PAGES):
            if next_url is None:
                return False
            resp = self._call("GET", next_url)
            if any(mark in str(c.get("body", "")) for c in _objects(resp)):
                return True
            next_url = resp.links.get("next", {}).get("url")
            if next_url and urlsplit(next_url)[:2] != self._origin:
                next_url = None  # never follow a link (and send the token) off the API origin
        if next_url is not None:
            log.warning(
                "issue %s: more than %d pages of comments since %s happened; its comment is posted "
                "without looking further",
                url.rsplit("/", 1)[-1],
                MARKER_PAGES,
                event.event,
            )
        return False

    def _call(self, method: str, url: str, missing_ok: bool = False, **kw: Any) -> httpx.Response:
        try:
            resp = self.http.request(method, url, **kw)
        except httpx.HTTPError as exc:
            raise _Unsure(f"{method} {self._path(url)}: {type(exc).__name__}") from None
        if resp.status_code < 300 or (missing_ok and resp.status_code == 404):
            return resp
        status = resp.status_code
        where = f"{method} {self._path(url)}: HTTP {status}"
        if rate_limited(status, resp.headers):
            wait = retry_wait_s(resp.headers, time.time(), self.source.github_max_retry_after_s)
            raise DeliveryError(f"{where} (rate limited)", retry_after=wait, status=status)
        if status >= 500:
            raise _Unsure(where, status=status)
        raise DeliveryError(where, permanent=status in PERMANENT, status=status)

    def _path(self, url: str) -> str:
        return urlsplit(url).path


def _objects(resp: httpx.Response) -> list[dict[str, Any]]:
    """The objects of a JSON array answer (nothing for any other answer)."""
    try:
        body = resp.json()
    except ValueError:
        return []
    return [x for x in body if isinstance(x, dict)] if isinstance(body, list) else []


class _Unsure(DeliveryError):
    """No answer, or a 5xx: the request may or may not have been applied (retried like any failure)."""
