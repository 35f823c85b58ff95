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
    UNACKED = "unacked"  # claimed, but too few replicas acknowledged the claim in time: released, not used
    NOT_IN_SOURCE = "not-in-source"  # explain only: the source does not have it
    NOT_READY = "not-ready"  # explain only: the source has it, not ready (its state, or a factory:done/parked label)
    OUT_OF_SCOPE = "out-of-scope"  # explain only: the source has it, but an eligibility rule (source.*) excludes it
    MALFORMED = "malformed"  # explain only: the source has it, malformed: every poll skips it (the reason in the text)


class RunStatus(StrEnum):
    """A run's status on its record: ``running`` until it is ended exactly once."""

    RUNNING = "running"
    FINISHED = "finished"
    STOPPING = "stopping"
    KILLED = "killed"
    FAILED = "failed"
    ABANDONED = "abandoned"


class Outcome(StrEnum):
    """How an agent run ended."""

    OK = "ok"  # exit 0
    FAILED = "failed"  # non-zero exit (or it could not be started)
    TIMEOUT = "timeout"
    SIGNALLED = "signalled"
    LEASE_LOST = "lease-lost"  # the claim was no longer ours: stopped, nothing written
    INTERRUPTED = "interrupted"  # operator stop, worker shutdown, revoke: released, no attempt counted


class Settled(StrEnum):
    """What the ledger recorded for an agent task (``agent_task.settle``)."""

    DONE = "done"
    BACKOFF = "backoff"
    PARKED = "parked"
    RELEASED = "released"
    LEASE_LOST = "lease-lost"
    STALE = "stale"  # a late write by a token that no longer holds the claim: nothing changed


class Begin(StrEnum):
    """What ``begin.lua`` said to an agent task about to start."""

    STARTED = "started"
    DUPLICATE = "duplicate"
    REVOKED = "revoked"
    KILLED = "killed"
    UNACKED = "unacked"  # started, but too few replicas acknowledged it (min_replica_acks): do not run
