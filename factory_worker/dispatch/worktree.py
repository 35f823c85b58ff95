"""A dispatch's worktree (``workspace.*`` on: ``factory_worker/workspace/``): made before the step's agent starts,
published after the exit 0 that completes the dispatch, released always; and what it made, for the ledger (the
``record`` of the step's :class:`~factory_worker.dispatch.decisions.Decision`, written with the settle).

* :func:`checkout` (before the agent, in the thread that will run it): ``Workspace.prepare`` for the issue, owned
  by the agent's uid/gid. A single agent gets a worktree of its own; a stage gets its attempt's
  (``prog.workdir``: made by the attempt's first stage on this root, found again by the next ones). The claim is
  renewed meanwhile: a cold clone can outlast a lease.
* :meth:`Checkout.settle` (after the agent, before the claim is settled): a completing decision is published
  (``Workspace.publish``: push, pull request); a push or pull-request failure, or "no changes" with
  ``workspace.no_changes=fail``, turns it into a failed attempt with that error (retried with backoff: the
  commits stay on the branch). Any other end of the dispatch records what the run left (``Workspace.outcome``).
* :meth:`Checkout.release` (always, ``finally``): the worktree removed (kept with ``agent.keep_workdir``); a
  stage whose attempt goes on (the next stage, or a release that a later claim resumes) leaves it for the next
  stage, its lock dropped.

The agent never gets a credential: the worktree's environment (``Prepared.env``) holds paths and names only,
and the push and API token stay with the worker's own git and HTTP client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

from factory_worker.agents.lease import LeaseKeeper
from factory_worker.agents.sandbox import Identity
from factory_worker.dispatch.decisions import Decision, Move
from factory_worker.dispatch.job import Job
from factory_worker.dispatch.steps import renew_interval
from factory_worker.ledger.stages import Progress
from factory_worker.ledger.states import Outcome
from factory_worker.ledger.types import fence_of
from factory_worker.workspace import Prepared, Published, Unroutable, WorkspaceError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The moves that end a staged attempt: its worktree goes (the others hand it to the next stage).
ENDS_ATTEMPT = (Move.COMPLETE, Move.FAIL, Move.ESCALATE)


class Checkout:
    """One step's worktree: ``prepared`` for ``job`` (a stage's when ``staged``), and what became of it."""

    def __init__(self, job: Job, prepared: Prepared, staged: bool, lost: str | None = None) -> None:
        self.job, self.prepared, self.staged = job, prepared, staged
        self.published: Published | None = None
        #: the claim was lost while the worktree was made (a renew found it gone): no agent may run
        self.lost = lost

    def settle(self, d: Decision) -> Decision:
        """``d`` after the step's agent ended: published when it completes the dispatch (or a failed attempt
        when that fails), with the dispatch's ``record`` when it ends the dispatch (a stage handing over to the
        next, or a lost claim, records nothing)."""
        ws = self.job.ctx.workspace
        if d.kind == Move.COMPLETE:
            try:
                published, _ = _renewing(self.job, lambda: ws.publish(self.prepared, self.job.issue))
            except WorkspaceError as exc:  # PublishError: push or pull request
                log.warning("%s: the work was not published: %s", self.job.label, exc)
                d = Decision(Move.FAIL, Outcome.FAILED, error=f"publish failed: {exc}")
            else:
                self.published = published
                if published.failure:
                    d = Decision(Move.FAIL, Outcome.FAILED, error=published.failure)
        if d.kind in (Move.NEXT, Move.LOST):
            return d
        if self.published is None:
            self.published = ws.outcome(self.prepared)
        return replace(d, record=self.record(d))

    def record(self, d: Decision) -> dict[str, Any]:
        """What the ledger keeps as the issue's last result (``ledger/results.py``)."""
        assert self.published is not None
        return {
            **self.published.as_record(),
            "outcome": d.outcome,
            "error": d.error or None,
            "fence": fence_of(self.job.token),
            "at_ms": int(time.time() * 1000),
        }

    def shown(self) -> dict[str, Any]:
        """The task result's part (what Flower shows): the branch and what was published, no text of the agent."""
        p, out = self.prepared, self.published
        return {
            "branch": p.branch,
            "worktree": str(p.cwd),
            "head_sha": out.head_sha if out else None,
            "pushed": out.pushed if out else False,
            "pr_url": out.pr_url if out else None,
            "no_changes": out.no_changes if out else None,
        }

    def release(self, d: Decision | None) -> None:
        """After the step, always: the worktree removed or kept; a stage's handed over unless ``d`` ends its
        attempt (None: the step did not get to a decision)."""
        hand_over = self.staged and (d is None or d.kind not in ENDS_ATTEMPT)
        self.job.ctx.workspace.release(self.prepared, hand_over=hand_over)


def checkout(job: Job, prog: Progress | None, ident: Identity | None) -> Checkout | None:
    """The step's worktree (None when the workspace is off). Raises :class:`WorkspaceError` (one line; an
    :class:`Unroutable` issue's names why it has no repository): a failed attempt."""
    ws = job.ctx.workspace
    if not ws.enabled:
        return None
    uid, gid = (ident.uid, ident.gid) if ident is not None else (None, None)
    name = prog.workdir if prog is not None else None
    prepared, lost = _renewing(job, lambda: ws.prepare(job.issue, fence_of(job.token), uid, gid, name=name))
    return Checkout(job, prepared, prog is not None, lost)


def failed(exc: WorkspaceError) -> Decision:
    """The decision for a worktree that could not be made."""
    if isinstance(exc, Unroutable):
        return Decision(Move.FAIL, Outcome.FAILED, error=f"no repository for this issue: {exc.reason}")
    return Decision(Move.FAIL, Outcome.FAILED, error=str(exc))


def _renewing(job: Job, work: Callable[[], T]) -> tuple[T, str | None]:
    """``work()`` with the claim renewed meanwhile (a clone, a fetch or a push may take longer than a lease);
    and why the claim was lost meanwhile, if it was."""
    with _keeper(job) as keeper:
        out = work()
    if keeper.lost:
        log.warning("%s: the claim was lost while the workspace worked: %s", job.label, keeper.lost)
    return out, keeper.lost


@contextmanager
def _keeper(job: Job) -> Iterator[LeaseKeeper]:
    ctx = job.ctx
    keeper = LeaseKeeper(
        lambda: ctx.ledger.renew(job.issue_id, job.token),
        lambda: None,
        renew_interval(ctx),
        ctx.settings.dispatch.lease_ttl_s,
        0.0,
        job.issue_id,
        time.monotonic(),
    ).start()
    try:
        yield keeper
    finally:
        keeper.close()
