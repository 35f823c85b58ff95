"""The closed vocabularies: every status, outcome and reason word the ledger, the loop and the CLI use.

They are ``StrEnum`` s, so a member is its word (``RunStatus.KILLED == "killed"``) in JSON, in Redis and
in the Lua scripts' replies.
"""

from __future__ import annotations

from enum import StrEnum


class LedgerState(StrEnum):
    """What ``dispatches --state`` lists."""

    IN_FLIGHT = "in-flight"
    BACKOFF = "backoff"
    PARKED = "parked"
    DONE = "done"


class Gate(StrEnum):
    """Why the gate (``claim.lua``) does or does not dispatch an issue now; also ``explain``'s state."""

    CLAIMABLE = "claimable"
    DONE = "done"
    IN_FLIGHT = "in-flight"
    PARKED = "parked"
    BACKOFF = "backoff"
    MAX_IN_FLIGHT = "max-in-flight"
    NO_FREE_SLOT = "no-free-slot"
    DUPLICATE = "duplicate"
    KILLED = "killed"
    PAUSED = "paused"
    CONCURRENCY = "concurrency-key"  # a concurrency key of the issue holds its limit of claims
    DAY_BUDGET = "day-budget"  # the fleet spent budget.day_usd in this UTC day: nothing is claimed until the next
    UNACKED = "unacked"  # claimed, but too few replicas acknowledged the claim in time: released, not used
    NOT_IN_SOURCE = "not-in-source"  # explain only: the source does not have it
    NOT_READY = "not-ready"  # explain only: the source has it, not ready (its state, or a factory:done/parked label)
    OUT_OF_SCOPE = "out-of-scope"  # explain only: the source has it, but an eligibility rule (source.*) excludes it
    MALFORMED = "malformed"  # explain only: the source has it, malformed: every poll skips it (the reason in the text)
    UNKNOWN = "unknown"  # explain and retry only: neither the ledger nor the source has it (exit 1)


class RunStatus(StrEnum):
    """A run's status on its record: ``running`` until it is ended exactly once."""

    RUNNING = "running"
    FINISHED = "finished"
    STOPPING = "stopping"
    KILLED = "killed"
    FAILED = "failed"
    ABANDONED = "abandoned"


class Outcome(StrEnum):
    """How an agent run ended (and the ``outcome`` of the agent task that ran it)."""

    OK = "ok"  # exit 0
    FAILED = "failed"  # non-zero exit (or it could not be started)
    TIMEOUT = "timeout"
    SIGNALLED = "signalled"
    LEASE_LOST = "lease-lost"  # the claim was no longer ours: stopped, nothing written
    INTERRUPTED = "interrupted"  # operator stop, worker shutdown, revoke: released, no attempt counted
    BUDGET = "budget"  # an issue budget (budget.issue_*) was crossed: parked needs-human, no further attempt
    STAGED = "staged"  # no agent ran in this task: it handed its claim over to the stage tasks


class StageOutcome(StrEnum):
    """How a stage's step ended, where its decision says more than the run's :class:`Outcome` (the attempt's
    history ``step:stage:outcome``, the stage task's ``outcome``)."""

    REJECTED = "rejected"  # exit 3 (REJECT_EXIT): back to ``back_to`` with the output as feedback
    INVALID = "invalid"  # a triage whose output is no valid verdict
    ESCALATED = "escalated"  # a triage below ``agent.min_confidence``: parked for a human


class Settled(StrEnum):
    """What the ledger recorded for an agent or stage task (its ``settled``: ``dispatch.lifecycle.finish``)."""

    DONE = "done"
    BACKOFF = "backoff"
    PARKED = "parked"
    RELEASED = "released"
    LEASE_LOST = "lease-lost"
    STALE = "stale"  # a late write by a token that no longer holds the claim: nothing changed
    NEXT = "next"  # a stage handed the claim over to the next step (the claim stays held)
    MOVED = "moved"  # a late result of a step the attempt has moved past (a duplicate's): nothing changed
    UNWRITTEN = "unwritten"  # Redis was unreachable until the worker's shutdown window ended: the lease ends the claim


class ReleaseReason(StrEnum):
    """Why a claim was released without counting an attempt (``release.lua``'s reason, ``released_<reason>``)."""

    INTERRUPTED = "interrupted"  # operator stop, worker shutdown, revoke, a killed loop at begin or start
    UNACKED = "unacked"  # a begin, stage open or start too few replicas acknowledged
    SEND_FAILED = "send-failed"  # its task could not be sent
    MESSAGE_LOST = "message-lost"  # its task's message is gone from the broker (the sweep)


class TaskState(StrEnum):
    """An agent or stage task's record (``agent:<task_id>``): written ``queued`` when its message is sent,
    ``running`` once ``begin.lua`` / ``stage.lua`` start it."""

    QUEUED = "queued"
    RUNNING = "running"


class Begin(StrEnum):
    """What ``begin.lua`` said to an agent task about to start."""

    STARTED = "started"
    DUPLICATE = "duplicate"
    REVOKED = "revoked"
    KILLED = "killed"
    UNACKED = "unacked"  # started, but too few replicas acknowledged it (min_replica_acks): do not run
    LEDGER_LOST = "ledger-lost"  # the ledger is not the one this fleet wrote (safe mode): nothing starts


class StageStart(StrEnum):
    """What ``stage.lua``'s ``start`` said to a stage task about to run its step (``StageLedger.start``)."""

    OK = "ok"
    MOVED = "moved"  # the attempt is at another step (this one finished, or there is no progress)
    DUPLICATE = "duplicate"  # the step runs already (a redelivered twin)
    REVOKED = "revoked"  # the task was revoked: the caller releases the claim
    KILLED = "killed"  # the loop is killed: the caller releases the claim
    UNACKED = "unacked"  # started, but too few replicas acknowledged it: released, nothing runs


class Liveness(StrEnum):
    """The loop's state as ``loop-status`` says it: the heartbeat's (``live``, ``stale``, ``stopping``,
    ``missing``), or ``killed`` while a kill stands (after ``kill-loop``, until ``start-loop``)."""

    LIVE = "live"
    STALE = "stale"
    STOPPING = "stopping"
    MISSING = "missing"
    KILLED = "killed"


class Stuck(StrEnum):
    """Why the loop cannot make progress (``loop-status``'s ``reason_codes``, ``doctor``'s ``loop`` findings)."""

    KILLED = "killed"  # a kill stands: beat's kickoffs are no-ops until start-loop
    LEDGER_LOST = "ledger-lost"  # safe mode: nothing is claimed or started
    NO_WORKER = "no-worker"  # no live worker at all (or every one is shutting down)
    NO_LOOP_WORKER = "no-loop-worker"  # no live worker consumes <ns>.loop: kickoffs pile up in it
    LOOP_STARVED = "loop-starved"  # every worker on <ns>.loop has all its processes running agents
    NO_AGENT_SLOT = "no-agent-slot"  # no live worker consumes <ns>.agents: nothing can be dispatched
    NO_BEAT = "no-beat"  # no live beat: nothing kicks off runs
    SOURCE_FAILING = "source-failing"  # the loop's polls fail (since when, the last error)
    ITERATIONS_FAILING = "iterations-failing"  # iterations fail for another reason (the broker, Redis...)
    REPLICA_ACKS = "replica-acks"  # dispatch.min_replica_acks above the connected replicas: claims are refused
    NO_HEARTBEAT = "no-heartbeat"  # none of the above, but no run's heartbeat (missing or expired)
    HEARTBEAT_STALE = "heartbeat-stale"  # none of the above, but the heartbeat is older than stale_after_s
    STOPPING = "stopping"  # none of the above, but the last run is stopping (ended, not by a kill)
