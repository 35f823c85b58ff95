"""What a verified delivery means: an :class:`Event` (an issue to gate, a comment), or nothing to do.

Read only from payloads whose signature was verified (:mod:`.verify`), and only the documented fields:

- GitHub (``X-GitHub-Event``): ``issues`` with ``action`` opened, reopened, labeled, unlabeled or edited (an
  unlabel can lift an excluded label; an edit can change the title the rules read) -> :attr:`Kind.ISSUE` for
  ``issue.number``; ``issue_comment`` ``created`` on an issue (not a pull request: ``issue.pull_request``)
  -> :attr:`Kind.COMMENT` with ``comment.body``, ``comment.user.login``, ``comment.author_association``;
  ``ping`` -> :attr:`Kind.PING`. ``repository.full_name`` must be ``source.github_repo`` (an organisation's
  webhook also sends other repositories' events). Delivery id: the ``X-GitHub-Delivery`` header.
- Linear (``type``, ``action``, ``data``): ``Issue`` ``create``, or ``update`` whose ``updatedFrom`` names a
  field the rules read (state, labels, team, project, title) -> :attr:`Kind.ISSUE` for ``data.identifier``
  (else ``data.id``); ``Comment`` ``create`` -> :attr:`Kind.COMMENT` for ``data.issue.identifier`` (else
  ``data.issueId``) with ``data.body`` and ``data.userId``. Delivery id: ``webhookId`` and the
  ``Linear-Delivery`` header (a delivery without that header: ``webhookId`` and the body's SHA-256).
- Slack (Events API): ``url_verification`` is answered by the server; an ``event_callback`` is acknowledged
  (deduplicated by ``event_id``) and otherwise not acted on: replies in a dispatch's thread reach its inbox
  through the thread's watcher (:mod:`factory_worker.chat.slack`).

An event for another source kind than the configured one is nothing to do (logged at INFO).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from factory_worker.webhooks.verify import Refused

log = logging.getLogger(__name__)

GITHUB_ISSUE_ACTIONS = ("opened", "reopened", "labeled", "unlabeled", "edited")
#: Linear ``updatedFrom`` keys that can change what the eligibility rules say.
LINEAR_GATED_FIELDS = ("stateId", "labelIds", "teamId", "projectId", "title")
#: A comment or issue reference longer than this is refused as malformed.
MAX_REF_CHARS = 256


class Service(StrEnum):
    GITHUB = "github"
    LINEAR = "linear"
    SLACK = "slack"


class Kind(StrEnum):
    """What an event asks of the receiver."""

    ISSUE = "issue"  # one gate pass for that issue
    COMMENT = "comment"  # a command, or a line for the running agent's inbox
    PING = "ping"  # the service checking the endpoint
    IGNORED = "ignored"  # verified, acknowledged, nothing to do


@dataclass(frozen=True)
class Comment:
    body: str
    author: str
    author_id: str = ""
    #: GitHub's ``author_association`` (OWNER, MEMBER...); "" elsewhere
    association: str = ""
    created_at: str = ""
    url: str = ""


@dataclass(frozen=True)
class Event:
    service: Service
    kind: Kind
    delivery: str
    action: str = ""
    #: the issue as the source names it (GitHub: its number; Linear: its identifier, or its UUID)
    issue: str = ""
    comment: Comment | None = None
    #: why an IGNORED event is ignored (logged)
    why: str = ""
    #: when the receiver accepted it (``time.monotonic()``): the worker thread logs the latency
    received: float = field(default_factory=time.monotonic, compare=False)


def digest(text: str | bytes) -> str:
    """A fixed-length name for a delivery id (the dedupe key holds no sender-chosen text)."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return hashlib.sha256(raw).hexdigest()[:40]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any, what: str, limit: int = MAX_REF_CHARS) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Refused(400, f"{what} is missing or not a string")
    text = str(value)
    if not text or len(text) > limit:
        raise Refused(400, f"{what} is empty or too long")
    return text


def github_event(headers: Mapping[str, str], payload: Mapping[str, Any], source_kind: str, repo: str | None) -> Event:
    delivery = _text(headers.get("X-GitHub-Delivery"), "X-GitHub-Delivery")
    name = headers.get("X-GitHub-Event", "")
    action = str(payload.get("action") or "")

    def ignored(why: str) -> Event:
        return Event(Service.GITHUB, Kind.IGNORED, delivery, action, why=why)

    if name == "ping":
        return Event(Service.GITHUB, Kind.PING, delivery)
    if name not in ("issues", "issue_comment"):
        return ignored(f"event {name or '-'} is not subscribed to")
    if source_kind != "github":
        return ignored(f"source.kind is {source_kind}, not github")
    full_name = str(_dict(payload.get("repository")).get("full_name") or "")
    if not repo or full_name.casefold() != repo.casefold():
        return ignored(f"repository {full_name or '-'} is not source.github_repo")
    issue = _dict(payload.get("issue"))
    if "pull_request" in issue:
        return ignored("a pull request")
    number = issue.get("number")
    if not isinstance(number, int) or isinstance(number, bool) or number <= 0:
        raise Refused(400, "issue.number is missing or not a positive integer")
    if name == "issues":
        if action not in GITHUB_ISSUE_ACTIONS:
            return ignored(f"issues.{action} cannot make an issue ready")
        return Event(Service.GITHUB, Kind.ISSUE, delivery, action, str(number))
    if action != "created":
        return ignored(f"issue_comment.{action} is not a new comment")
    c = _dict(payload.get("comment"))
    user = _dict(c.get("user"))
    comment = Comment(
        body=str(c.get("body") or ""),
        author=str(user.get("login") or ""),
        author_id=str(user.get("id") or ""),
        association=str(c.get("author_association") or "").upper(),
        created_at=str(c.get("created_at") or ""),
        url=str(c.get("html_url") or ""),
    )
    return Event(Service.GITHUB, Kind.COMMENT, delivery, action, str(number), comment)


def linear_event(headers: Mapping[str, str], payload: Mapping[str, Any], body: bytes, source_kind: str) -> Event:
    webhook = _text(payload.get("webhookId"), "webhookId")
    delivery = f"{webhook}:{headers.get('Linear-Delivery') or digest(body)}"
    kind, action = str(payload.get("type") or ""), str(payload.get("action") or "")
    data = _dict(payload.get("data"))

    def ignored(why: str) -> Event:
        return Event(Service.LINEAR, Kind.IGNORED, delivery, action, why=why)

    if kind not in ("Issue", "Comment"):
        return ignored(f"type {kind or '-'} is not subscribed to")
    if source_kind != "linear":
        return ignored(f"source.kind is {source_kind}, not linear")
    if kind == "Issue":
        if action == "update":
            changed = _dict(payload.get("updatedFrom"))
            if changed and not any(f in changed for f in LINEAR_GATED_FIELDS):
                return ignored("an update of fields the eligibility rules do not read")
        elif action != "create":
            return ignored(f"Issue.{action} cannot make an issue ready")
        ref = data.get("identifier") or data.get("id")
        return Event(Service.LINEAR, Kind.ISSUE, delivery, action, _text(ref, "data.identifier"))
    if action != "create":
        return ignored(f"Comment.{action} is not a new comment")
    ref = _dict(data.get("issue")).get("identifier") or data.get("issueId")
    if not ref:  # a comment on a project update or a document: no issue of ours
        return ignored("a comment on something else than an issue")
    actor, user = _dict(payload.get("actor")), _dict(data.get("user"))
    comment = Comment(
        body=str(data.get("body") or ""),
        author=str(user.get("name") or actor.get("name") or ""),
        author_id=str(data.get("userId") or user.get("id") or actor.get("id") or ""),
        created_at=str(data.get("createdAt") or ""),
        url=str(payload.get("url") or data.get("url") or ""),
    )
    return Event(Service.LINEAR, Kind.COMMENT, delivery, action, _text(ref, "data.issueId"), comment)


def slack_event(payload: Mapping[str, Any]) -> Event:
    """An ``event_callback`` (``url_verification`` is answered before this); any other type (``app_rate_limited``)
    is acknowledged and ignored, with no delivery id (nothing to remember)."""
    if payload.get("type") != "event_callback":
        return Event(Service.SLACK, Kind.IGNORED, "", why=f"Slack payload type {str(payload.get('type'))[:40]!r}")
    delivery = _text(payload.get("event_id"), "event_id")
    name = str(_dict(payload.get("event")).get("type") or "")
    return Event(Service.SLACK, Kind.IGNORED, delivery, name, why="Slack events are acknowledged only")


__all__ = ["Comment", "Event", "Kind", "Service", "digest", "github_event", "linear_event", "slack_event"]
