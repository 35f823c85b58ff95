"""The tracker outbox: ledger transitions reported to the issue tracker, never lost, never twice.

Writing: the Lua script of each transition (``begin`` -> ``dispatched``, ``complete`` -> ``done``, ``fail``
-> ``backoff``/``parked``, ``release`` of a started claim -> ``released``, ``retry`` -> ``retried``) appends
one entry to the stream ``{ns}:outbox`` in the same script (``emit`` in ``lua/_prelude.lua``) when
``tracker.write_back`` is on: an event exists exactly when its transition happened.

Delivering: every worker runs an :class:`OutboxSender` (a thread of the worker bootstep, see
``lifecycle.py``) in the consumer group ``writers``. A drain reads this consumer's pending entries (retries),
claims entries another consumer left pending for ``tracker.takeover_s`` (a worker that died mid-delivery),
then new ones; each is handed to a :class:`Writer`. Delivered: ``XACK`` + ``XDEL``. Failed: retried with
backoff (``{ns}:outbox:retry``); after ``tracker.max_attempts`` (or at once for an error that cannot pass)
it is *parked* in ``{ns}:outbox:parked`` with its last error, like an issue. At-least-once delivery becomes
exactly-once as seen on the tracker because a writer makes each delivery idempotent (labels are sets; a
comment carries a marker the writer looks for before posting, see ``tracker.py``). Write-back never blocks
dispatch: the ledger does not wait for the tracker.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

import redis

from factory_worker.config.settings import TrackerSettings
from factory_worker.ledger.keys import Keys
from factory_worker.ledger.redis_client import decoded
from factory_worker.ledger.scripts import scripts_for

log = logging.getLogger(__name__)

GROUP = "writers"
BATCH = 50


@dataclass(frozen=True)
class Event:
    """One outbox entry: ``event`` about ``issue`` by dispatch ``token`` (empty for ``retried``)."""

    id: str
    event: str
    issue: str
    token: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    #: a newer event of the same issue was handed to the writer already: comment, but leave the labels or
    #: workflow state to that newer event (it was retried after it, see ``outbox_newest.lua``)
    superseded: bool = False

    @property
    def key(self) -> str:
        """What makes a delivery unique on the tracker: (dispatch, event); the entry id when no dispatch."""
        return f"{self.token or self.id}:{self.event}"

    @classmethod
    def from_entry(cls, entry_id: str, raw: dict[str, str]) -> Event:
        core = {k: raw.get(k, "") for k in ("event", "issue", "token")}
        rest = {k: v for k, v in raw.items() if k not in core}
        return cls(entry_id, core["event"], core["issue"], core["token"], rest)


class DeliveryError(Exception):
    """A delivery failed. ``retry_after``: the tracker asked for this wait (s); ``permanent``: it cannot
    pass by retrying (the event is parked at once)."""

    def __init__(self, message: str, retry_after: float | None = None, permanent: bool = False) -> None:
        super().__init__(message)
        self.retry_after, self.permanent = retry_after, permanent


class Writer(Protocol):
    def deliver(self, event: Event) -> None:
        """Apply ``event`` to the tracker idempotently; :class:`DeliveryError` when it did not happen."""


@dataclass
class DrainReport:
    delivered: int = 0
    retried: int = 0
    parked: int = 0


class OutboxSender:
    """Delivers the outbox as consumer ``consumer`` of the group :data:`GROUP`."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        cfg: TrackerSettings,
        writer: Writer,
        consumer: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.r, self.keys, self.cfg, self.writer, self.consumer, self.clock = client, keys, cfg, writer, consumer, clock
        self._s = scripts_for(client)
        self._group_ready = False

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.r.xgroup_create(self.keys.outbox, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _entries(self) -> list[tuple[str, dict[str, str] | None]]:
        out: list[tuple[str, dict[str, str] | None]] = []
        for start in ("0", ">"):  # this consumer's pending (retries), then new entries
            try:
                read = self.r.xreadgroup(GROUP, self.consumer, {self.keys.outbox: start}, count=BATCH) or []
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):  # the stream is gone (ledger lost, emptied Redis): make it again
                    self._group_ready = False
                raise
            for _stream, rows in cast("list[list[Any]]", read):  # the RESP2 shape (the default): [[stream, rows]]
                out.extend(rows)
            if start == "0":  # between the two: what a dead consumer left pending
                idle_ms = int(self.cfg.takeover_s * 1000)
                claimed = self.r.xautoclaim(self.keys.outbox, GROUP, self.consumer, idle_ms, "0-0", count=BATCH)
                out.extend(claimed[1])
        seen: set[str] = set()
        return [(i, f) for i, f in out if not (i in seen or seen.add(i))]  # type: ignore[func-returns-value]

    def drain(self) -> DrainReport:
        """Deliver what is due now; returns what happened."""
        self._ensure_group()
        report = DrainReport()
        now_ms = int(self.clock() * 1000)
        for entry_id, raw in self._entries():
            if raw is None:  # deleted while pending (parked or delivered by a consumer presumed dead)
                self.r.xack(self.keys.outbox, GROUP, entry_id)
                continue
            attempts, not_before = self._retry_state(entry_id)
            if not_before > now_ms:
                continue
            event = Event.from_entry(entry_id, raw)
            newest = self._s["outbox_newest"](
                self.keys, issue=event.issue, entry_id=entry_id, ttl_ms=Keys.OUTBOX_NEWEST_TTL_S * 1000
            ).values[0]
            if not int(newest):
                event = replace(event, superseded=True)
            try:
                self.writer.deliver(event)
            except DeliveryError as exc:
                self._failed(event, attempts + 1, exc, now_ms, report)
            except Exception as exc:
                self._failed(event, attempts + 1, DeliveryError(f"{type(exc).__name__}: {exc}"), now_ms, report)
            else:
                self._done(entry_id)
                report.delivered += 1
        return report

    def _retry_state(self, entry_id: str) -> tuple[int, int]:
        raw = decoded(self.r.hget(self.keys.outbox_retry, entry_id)) or ""
        attempts, _, rest = raw.partition(":")
        not_before = rest.partition(":")[0]
        return (int(attempts) if attempts.isdigit() else 0), (int(not_before) if not_before.isdigit() else 0)

    def _done(self, entry_id: str) -> None:
        p = self.r.pipeline(transaction=True)
        p.xack(self.keys.outbox, GROUP, entry_id)
        p.xdel(self.keys.outbox, entry_id)
        p.hdel(self.keys.outbox_retry, entry_id)
        p.execute()

    def _failed(self, event: Event, attempts: int, exc: DeliveryError, now_ms: int, report: DrainReport) -> None:
        error = str(exc)[: Keys.ERROR_MAX_CHARS]
        if exc.permanent or attempts >= self.cfg.max_attempts:
            record = {
                "event": event.event,
                "issue": event.issue,
                "token": event.token,
                **event.fields,
                "attempts": attempts,
                "error": error,
                "parked_ms": now_ms,
            }
            p = self.r.pipeline(transaction=True)
            p.hset(self.keys.outbox_parked, event.id, json.dumps(record))
            p.xack(self.keys.outbox, GROUP, event.id)
            p.xdel(self.keys.outbox, event.id)
            p.hdel(self.keys.outbox_retry, event.id)
            p.execute()
            log.error(
                "tracker event %s (%s of %s) parked after %d attempt(s): %s",
                event.id,
                event.event,
                event.issue,
                attempts,
                error,
            )
            report.parked += 1
            return
        wait_s = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (attempts - 1))
        if exc.retry_after is not None:
            wait_s = min(self.cfg.backoff_max_s, max(wait_s, exc.retry_after))
        self.r.hset(self.keys.outbox_retry, event.id, f"{attempts}:{now_ms + int(wait_s * 1000)}:{error}")
        log.warning(
            "tracker event %s (%s of %s) not delivered (attempt %d), retrying in %.1fs: %s",
            event.id,
            event.event,
            event.issue,
            attempts,
            wait_s,
            error,
        )
        report.retried += 1


def backlog(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    """What ``loop-status`` and the metrics show: events not yet delivered, and parked ones."""
    p = client.pipeline(transaction=False)
    p.xlen(keys.outbox)
    p.hlen(keys.outbox_parked)
    pending, parked = p.execute()
    return {"pending": int(pending), "parked": int(parked)}


def run_sender(ctx: Any, consumer: str, stop: threading.Event) -> None:
    """A worker's sender thread (started by the worker bootstep when ``tracker.write_back`` is on): drain
    every ``tracker.poll_s`` until ``stop`` is set. ``ctx``: the process's :class:`~factory_worker.context.Context`."""
    from factory_worker.writeback.github import writer_for

    sender = OutboxSender(
        ctx.redis, ctx.keys, ctx.settings.tracker, writer_for(ctx.settings.source, ctx.settings.tracker), consumer
    )
    while not stop.is_set():
        try:
            sender.drain()
        except Exception:
            log.warning("outbox: drain failed", exc_info=True)
        stop.wait(ctx.settings.tracker.poll_s)
