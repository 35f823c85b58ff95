"""An issue event dispatches at once: one gate pass for that issue, through what a poll goes through.

:func:`gate_issue` re-reads the issue from the source (``IssueSource.get``), asks the eligibility rules
(``sources/rules.py``), then the ledger's gate (``claim.lua``, with the fleet's slots: done, in flight,
parked, backoff, killed, paused, the in-flight cap and free slots, in that order), and sends the agent task of
a claim exactly as an iteration does (:func:`factory_worker.loop.iteration.dispatch_claims`: the task record,
the counters, a send failure releases the claim). Nothing here decides on its own: an issue the poll would
not dispatch is not dispatched.

Why re-read, and not trust the payload, although it is signed: a delivery can be late (GitHub and Linear
retry failed deliveries for hours; an operator can redeliver one days later) or overtaken (``labeled`` then
``unlabeled`` within a second arrive in either order), so its labels and state can be stale; and the source
builds the same :class:`~factory_worker.sources.base.Issue` its poll builds (the ready-state mapping, the
label filter, Linear's team), so the rules cannot see something a poll would not. It costs one API call per
event, made by the receiver's worker thread after the answer, never while the service waits.

Testable without Celery: sending is the :data:`~factory_worker.loop.iteration.Sender` handed in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from factory_worker.context import Context
from factory_worker.ledger.guard import LedgerLostError
from factory_worker.loop.iteration import Sender, dispatch_claims
from factory_worker.sources.base import Issue
from factory_worker.sources.concurrency import groups
from factory_worker.sources.rules import Rules

log = logging.getLogger(__name__)

#: The counter of dispatches an event started (``dispatched`` counts them too, with the polls').
COUNTER = "dispatched_by_webhook"


class Verdict(StrEnum):
    """What one event's gate pass did."""

    DISPATCHED = "dispatched"
    SKIPPED = "skipped"  # the gate said no: ``reason`` is its word (done, backoff, max-in-flight...)
    RULED_OUT = "ruled-out"  # the eligibility rules left it out (out of scope, not ready)
    NOT_IN_SOURCE = "not-in-source"
    SOURCE_ERROR = "source-error"
    LEDGER_LOST = "ledger-lost"


@dataclass
class GatePass:
    issue: str
    verdict: Verdict
    reason: str = ""
    dispatches: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"issue": self.issue, "verdict": str(self.verdict), "reason": self.reason, "dispatches": self.dispatches}


def read_issue(ctx: Context, ref: str) -> tuple[Issue | None, str]:
    """The issue ``ref`` names, as the source says now; (None, why) when it cannot say."""
    try:
        issue = ctx.source.get(ref)
    except Exception as exc:  # SourceError, or whatever a custom source raises: the poll retries anyway
        return None, f"{type(exc).__name__}: {exc}"
    return issue, "" if issue is not None else "not in the source"


def gate_issue(ctx: Context, send: Sender, ref: str, issue: Issue | None = None) -> GatePass:
    """One gate pass for the issue ``ref`` names (``issue``: already re-read from the source)."""
    if issue is None:
        issue, why = read_issue(ctx, ref)
        if issue is None:
            verdict = Verdict.NOT_IN_SOURCE if why == "not in the source" else Verdict.SOURCE_ERROR
            return GatePass(ref, verdict, why)
    ruled = Rules.from_settings(ctx.settings.source, ctx.settings.workspace).check(issue)
    if ruled is not None:
        return GatePass(issue.id, Verdict.RULED_OUT, str(ruled))
    try:
        batch = ctx.ledger.claim([issue.id], fleet_slots=True, groups=groups(ctx.settings, [issue]))
    except LedgerLostError as exc:  # safe mode: the loop tells the team; nothing is claimed here either
        return GatePass(issue.id, Verdict.LEDGER_LOST, str(exc))
    if not batch.claims:
        return GatePass(issue.id, Verdict.SKIPPED, str(batch.skipped[0].reason))
    sent = dispatch_claims(ctx, send, batch.claims, {issue.id: issue}, run_id=None, counter=COUNTER)
    return GatePass(issue.id, Verdict.DISPATCHED, dispatches=sent)


__all__ = ["COUNTER", "GatePass", "Verdict", "gate_issue", "read_issue"]
