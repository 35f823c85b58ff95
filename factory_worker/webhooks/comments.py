"""A new comment on a tracker issue: a command (``/factory stop``, ``/factory retry``) from someone allowed to
give it, or a line for the issue's running agent (its ``FACTORY_INBOX``), or nothing (the factory's own).

- **The factory's own** comments (write-back's, which carry the marker ``<!-- factory-worker:...-->`` and open
  with ``factory-worker:``) are ignored: an agent is not told what the factory said about it.
- **A command** is a comment whose first line is ``/factory <word>``. Who may: on GitHub a commenter whose
  ``author_association`` (from the verified payload) is in ``webhooks.command_associations`` (OWNER, MEMBER,
  COLLABORATOR); on Linear an active member (not a guest) of ``source.linear.team``, asked of Linear's API
  (``user(id) { active guest teams }``). Anyone else's command, or an unknown word, is ignored and logged;
  a command never reaches the agent.

  ``stop``: the issue's running agents are stopped as ``kill-loop --release-agents`` stops one
  (:func:`factory_worker.ops.operations.stop_agents`: their stop flag, then their workers release the claims
  as interrupted, no attempt counted; a dead worker's claim is released by token after the grace). It runs
  on a thread of its own, so a stop's grace does not hold the events behind it. With write-back on, the
  release is commented on the issue by the outbox like any release.
  ``retry``: as ``factory-worker retry`` (a fresh attempt budget; a done issue is refused), then one gate
  pass (:func:`~.gate.gate_issue`), so it starts at once when it may.
- **Any other comment** is appended, as one line ``{"source", "ts", "user", "text", "issue", "url"}``
  (:mod:`factory_worker.chat.inbox`), to the inbox of every agent running the issue now (found by task id
  in ``{ns}:agents``); with none running it is dropped (logged at INFO).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from factory_worker.chat.inbox import InboxSource, deliver, entry
from factory_worker.context import Context
from factory_worker.ledger.scripts import LedgerError
from factory_worker.loop.iteration import Sender
from factory_worker.webhooks.events import Comment, Event, Service
from factory_worker.webhooks.gate import gate_issue, read_issue

log = logging.getLogger(__name__)

#: What marks a comment as the factory's own (write-back's marker, and the first words of its comments).
OWN_MARKER = "<!-- factory-worker:"
OWN_PREFIX = "factory-worker:"
COMMAND_PREFIX = "/factory"
#: An inbox line keeps at most this much of a comment.
MAX_TEXT_CHARS = 64 * 1024

CommandUser = Callable[[Context, str], bool]
#: Stops agent tasks by id (the receiver hands in :func:`factory_worker.ops.operations.stop_agents`).
Stopper = Callable[[Context, list[str]], Any]


class Command(StrEnum):
    STOP = "stop"
    RETRY = "retry"


@dataclass
class CommentResult:
    issue: str
    did: str  # "ignored", "inbox", "stop", "retry", "refused"
    detail: str = ""
    tasks: tuple[str, ...] = ()


def is_own(body: str) -> bool:
    return OWN_MARKER in body or body.lstrip().startswith(OWN_PREFIX)


def command_of(body: str) -> str | None:
    """The word after ``/factory`` on the comment's first line ("" when none); None when it is no command."""
    first = next((line.strip() for line in body.splitlines() if line.strip()), "")
    words = first.split()
    if not words or words[0].casefold() != COMMAND_PREFIX:
        return None
    return words[1].casefold() if len(words) > 1 else ""


def running_tasks(ctx: Context, issue: str) -> list[str]:
    """The agent tasks running ``issue`` now (``{ns}:agents`` and each task's record)."""
    ids = sorted(str(t) for t in ctx.redis.smembers(ctx.keys.agents))
    if not ids:
        return []
    p = ctx.redis.pipeline(transaction=False)
    for task_id in ids:
        p.hget(ctx.keys.agent_task(task_id), "issue")
    return [t for t, owner in zip(ids, p.execute()) if owner == issue]


def github_may_command(ctx: Context, comment: Comment) -> bool:
    return comment.association in ctx.settings.webhooks.command_associations


USER = "query CommandUser($id: String!) { user(id: $id) { id active guest teams { nodes { key } } } }"


def linear_may_command(ctx: Context, user_id: str) -> bool:
    """An active, non-guest member of ``source.linear.team`` (asked of Linear; any failure: no)."""
    api = getattr(ctx.source, "api", None)
    team = (ctx.settings.source.linear.team or "").casefold()
    if not user_id or api is None or not team:
        return False
    try:
        user = (api.call(USER, {"id": user_id}) or {}).get("user") or {}
    except Exception as exc:
        log.warning("could not ask Linear who %s is (%s): the command is ignored", user_id, type(exc).__name__)
        return False
    teams = {
        str(t.get("key", "")).casefold() for t in (user.get("teams") or {}).get("nodes") or [] if isinstance(t, dict)
    }
    return bool(user.get("active")) and not user.get("guest") and team in teams


def issue_id(ctx: Context, event: Event) -> str | None:
    """The ledger's id of the event's issue: GitHub's number as is; a Linear identifier as is, a Linear UUID
    (a comment payload without the identifier) through the source."""
    if event.service == Service.GITHUB or not _looks_like_uuid(event.issue):
        return event.issue
    issue, why = read_issue(ctx, event.issue)
    if issue is None:
        log.info("comment on Linear issue %s: %s", event.issue, why)
        return None
    return issue.id


def _looks_like_uuid(ref: str) -> bool:
    return len(ref) == 36 and ref.count("-") == 4


class CommentHandler:
    """Acts on comment events; ``send`` dispatches (a retry's gate pass), ``stop`` stops agent tasks."""

    def __init__(
        self, ctx: Context, send: Sender, stop: Stopper, linear_user: CommandUser = linear_may_command
    ) -> None:
        self.ctx, self.send, self.stop, self.linear_user = ctx, send, stop, linear_user
        self.stoppers: list[threading.Thread] = []

    def handle(self, event: Event) -> CommentResult:
        comment = event.comment
        assert comment is not None
        if is_own(comment.body):
            return CommentResult(event.issue, "ignored", "the factory's own comment")
        issue = issue_id(self.ctx, event)
        if issue is None:
            return CommentResult(event.issue, "ignored", "its issue is not in the source")
        word = command_of(comment.body)
        if word is None:
            return self._to_inbox(event, issue, comment)
        if not self._allowed(event, comment):
            log.warning(
                "ignored '/factory %s' on %s from %s (%s): not allowed to give commands",
                word[:20],
                issue,
                comment.author or "?",
                comment.association or event.service,
            )
            return CommentResult(issue, "refused", f"{comment.author or '?'} may not give commands")
        if word == Command.STOP:
            return self._stop(issue, comment)
        if word == Command.RETRY:
            return self._retry(issue, comment)
        log.warning("ignored '/factory %s' on %s from %s: unknown command", word[:20], issue, comment.author)
        return CommentResult(issue, "ignored", "unknown command")

    def _allowed(self, event: Event, comment: Comment) -> bool:
        if event.service == Service.GITHUB:
            return github_may_command(self.ctx, comment)
        return self.linear_user(self.ctx, comment.author_id)

    def _stop(self, issue: str, comment: Comment) -> CommentResult:
        tasks = running_tasks(self.ctx, issue)
        log.warning("'/factory stop' on %s from %s: stopping %d agent(s) %s", issue, comment.author, len(tasks), tasks)
        if tasks:
            t = threading.Thread(target=self._stop_quietly, args=(tasks,), name="factory-webhook-stop", daemon=True)
            self.stoppers = [s for s in self.stoppers if s.is_alive()] + [t]
            t.start()
        return CommentResult(issue, "stop", "" if tasks else "no agent is running it", tuple(tasks))

    def _stop_quietly(self, tasks: list[str]) -> None:
        try:
            log.info("stopped: %s", self.stop(self.ctx, tasks))
        except Exception:
            log.exception("could not stop %s", tasks)

    def _retry(self, issue: str, comment: Comment) -> CommentResult:
        try:
            before = self.ctx.ledger.retry(issue)
        except LedgerError as exc:
            log.warning("'/factory retry' on %s from %s refused: %s", issue, comment.author, exc)
            return CommentResult(issue, "refused", str(exc))
        passed = gate_issue(self.ctx, self.send, issue)
        log.warning("'/factory retry' on %s from %s: %s; then %s", issue, comment.author, before, passed.as_dict())
        return CommentResult(issue, "retry", f"{passed.verdict} {passed.reason}".strip())

    def _to_inbox(self, event: Event, issue: str, comment: Comment) -> CommentResult:
        if not self.ctx.settings.webhooks.relays_comments:
            return CommentResult(issue, "ignored", "webhooks.inbox is off")
        tasks = running_tasks(self.ctx, issue)
        if not tasks:
            log.info("comment on %s by %s: no agent is running it", issue, comment.author or "?")
            return CommentResult(issue, "ignored", "no agent is running it")
        line = entry(
            InboxSource(str(event.service)),
            comment.created_at,
            comment.author,
            comment.body[:MAX_TEXT_CHARS],
            issue=issue,
            url=comment.url,
        )
        deliver(self.ctx.redis, self.ctx.keys, tasks, line)
        return CommentResult(issue, "inbox", tasks=tuple(tasks))


__all__ = ["Command", "CommentHandler", "CommentResult", "command_of", "is_own", "running_tasks"]
