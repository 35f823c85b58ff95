"""Keeping a running agent's claim: renewals and stop-flag reads off the supervising thread.

The supervisor (the thread that forked the agent: PDEATHSIG is tied to it) must never wait on Redis: a
renew or a flag read can block for a whole socket timeout while Redis is unreachable, and by then another
worker may hold the issue. So :class:`LeaseKeeper` runs them in its own thread and only publishes facts —
when the last successful renew was *sent*, whether the claim was lost, whether a stop was asked — and the
supervisor enforces the deadline locally: the agent's whole group is stopped from
``last_renew_sent + lease - margin - term_grace`` (SIGTERM, then SIGKILL after ``term_grace``), so it is gone
before the claim can expire (``margin`` covers clock drift and the kill itself).

With a usage file (``FACTORY_USAGE``, :mod:`.usage`) the keeper also reads the agent's usage lines every tick
and reports each one (with the wall time since the last report, at least every :data:`WALL_REPORT_S`) to the
ledger; a report that says stop (a budget crossed) is published as :attr:`LeaseKeeper.budget_stop`, so the
supervisor stops the agent within a tick or two of the line that crossed it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from factory_worker.agents.usage import Usage, UsageFile, UsageReport
from factory_worker.config.leases import margin_s, stop_lead_s  # noqa: F401 - this module's API too
from factory_worker.ledger.outage import FailureLog
from factory_worker.ledger.scripts import StaleClaimError

log = logging.getLogger(__name__)

#: The wall time an agent has run is reported at least this often (s) while it runs (``budget.issue_wall_s``).
WALL_REPORT_S = 1.0


def helpers_after_s(renew_interval_s: float) -> float:
    """When the supervisor starts an agent's helper threads (the :class:`LeaseKeeper`, the log relay): well
    before the first renew is due and the first stop-flag read (``agent_task.STOP_POLL_S``), at most 0.1 s."""
    return min(0.1, renew_interval_s / 2)


class LeaseKeeper:
    """Renews every ``renew_interval_s`` and polls ``should_stop`` every ``tick_s``, in a daemon thread."""

    def __init__(
        self,
        renew: Callable[[], object],
        should_stop: Callable[[], str | None],
        renew_interval_s: float,
        lease_ttl_s: float,
        term_grace_s: float,
        issue_id: str,
        started: float,
        tick_s: float = 0.05,
        usage: UsageFile | None = None,
        report: UsageReport | None = None,
    ) -> None:
        self._renew, self._should_stop = renew, should_stop
        self.renew_interval_s, self.lease_ttl_s, self.term_grace_s = renew_interval_s, lease_ttl_s, term_grace_s
        self.issue_id, self.tick_s = issue_id, tick_s
        self.last_renew_sent = started  # begin renewed the lease just before the agent started
        self.lost: str | None = None
        self.stop_reason: str | None = None
        #: (outcome, reason) once a usage report said stop (a budget crossed)
        self.budget_stop: tuple[str, str] | None = None
        self.usage_file, self._report = usage, report
        #: this attempt's usage so far, and when its last line was read (monotonic; the stall clock)
        self.usage = Usage()
        self.last_usage = started
        self._reported_at = started
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{issue_id}"[:60], daemon=True)

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> LeaseKeeper:
        """Renew and read the flags in the thread from now on. The supervisor starts it once the agent outlives
        :func:`helpers_after_s`: a shorter agent needs no renew and no flag read, and costs no thread."""
        if not self.started:
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread; never waits on a Redis call that hangs (the thread is a daemon)."""
        self._closing.set()
        if self.started:
            self._thread.join(timeout=self.tick_s)

    @property
    def stop_at(self) -> float:
        """Monotonic time to start stopping the agent if no renew succeeds before it: ``lease - margin -
        term_grace`` after the last renew sent, so the group is gone (SIGKILL included) before the claim can
        expire. Settings validation keeps that lead above one renew interval (``config``) and it is then used
        as is: a floor above it (two renew intervals, as once here) let an agent stopped with a lead between one
        and two intervals outlive its claim. Only a bare pair that no settings would accept (no room for one
        renew) gets two renew intervals, so an agent is never stopped before its first renew could happen."""
        lead = stop_lead_s(self.lease_ttl_s, self.term_grace_s)
        if lead <= self.renew_interval_s:
            lead = 2 * self.renew_interval_s
        return self.last_renew_sent + lead

    def _run(self) -> None:
        next_renew = self.last_renew_sent + self.renew_interval_s
        flags = FailureLog(f"issue {self.issue_id}: reading the stop flags", log)
        renewals = FailureLog(f"issue {self.issue_id}: renewing the claim", log)
        while not self._closing.wait(self.tick_s):
            try:
                reason = self._should_stop()
                flags.ok()
            except Exception as exc:
                flags.failed(exc, "carrying on")
                reason = None
            if reason is not None and self.stop_reason is None:
                self.stop_reason = str(reason)
            self._read_usage()
            now = time.monotonic()
            if now < next_renew:
                continue
            try:
                self._renew()
            except StaleClaimError as exc:
                self.lost = str(exc)
                return
            except Exception as exc:
                renewals.failed(exc)
                next_renew = time.monotonic() + self.tick_s
                continue
            renewals.ok()
            self.last_renew_sent = now
            next_renew = now + self.renew_interval_s

    def last_usage_read(self) -> None:
        """After the agent ended (and :meth:`close`): the lines it wrote last, read and reported, with the
        wall time left; skipped while the thread still runs (a Redis call that hangs: it owns the reader)."""
        if self.started and self._thread.is_alive():
            return
        self._read_usage(final=True)

    def _read_usage(self, final: bool = False) -> None:
        """Read the new usage lines and report each (the wall time rides the first), or the wall time alone
        once :data:`WALL_REPORT_S` passed; a failed report is logged (that line is not sent again: the ledger may
        undercount a line, never count one twice)."""
        lines = self.usage_file.read() if self.usage_file is not None else []
        now = time.monotonic()
        if lines:
            self.last_usage = now
        for line in lines:
            self.usage.add(line)
        if self._report is None or self.budget_stop is not None:
            return
        if not lines and not final and now - self._reported_at < WALL_REPORT_S:
            return
        for delta in lines or [Usage()]:
            try:
                verdict = self._report(delta, now - self._reported_at)
            except Exception as exc:
                log.warning("issue %s: reporting usage failed: %s", self.issue_id, exc)
                return
            self._reported_at = now
            if verdict is not None:
                self.budget_stop = verdict
                return
