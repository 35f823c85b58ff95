"""The tracker outbox: ledger transitions reported to the issue tracker, never lost, never twice.

Writing: the Lua script of each transition (``begin`` -> ``dispatched``, ``complete`` -> ``done``, ``fail``
-> ``backoff``/``parked``, ``release`` of a started claim -> ``released``, ``retry`` -> ``retried``) appends
one entry to the stream ``{ns}:outbox`` in the same script (``emit`` in ``lua/_prelude.lua``) when
``tracker.write_back`` is on: an event exists exactly when its transition happened.

Delivering: every worker runs an :class:`OutboxSender` (a thread of the worker bootstep, see
``lifecycle.py``) in the consumer group ``writers``. A drain reads this consumer's pending entries (retries),
claims entries another consumer left pending for ``tracker.takeover_s`` (a worker that died mid-delivery),
then new ones; each is handed to a :class:`Writer`. Delivered: ``XACK`` + ``XDEL``. Failed: retried after
``min(backoff_base_s * 2**(n-1), backoff_max_s)``, or the tracker's ``Retry-After`` when longer (the one
:class:`~factory_worker.net.Backoff`; ``{ns}:outbox:retry``); after ``tracker.max_attempts`` (or at once for
an error that cannot pass) it is *parked* in ``{ns}:outbox:parked`` with its last error, like an issue.
At-least-once delivery becomes exactly-once as seen on the tracker because a writer makes each delivery
idempotent (labels are sets; a comment carries a marker the writer looks for before posting, see
``tracker.py``). Write-back never blocks dispatch: the ledger does not wait for the tracker.

Order per issue (``outbox_newest.lua``): a failed event backs off while later events of its issue go on, so
before handing an event over the sender learns whether a newer event of the issue was handed over already;
then the event is ``superseded``: it comments, and the labels or state it writes are the newer one's
(``Event.shows``). Two senders may deliver two events of one issue at once, so after a delivery the sender
looks again: when a newer event was handed over meanwhile (its labels may have been written before ours
landed) it writes that event's labels or state once more (``Writer.settle``), also when the delivery
failed. An entry read as new (``>``) was never handed to any sender, and no other sender can take it over
before it has been pending ``tracker.takeover_s``: for half of that it is ``fresh``, and no comment of it can
exist yet.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import redis

from factory_worker.config.settings import TrackerSettings
from factory_worker.ledger.keys import Keys
from factory_worker.ledger.redis_client import decoded
from factory_worker.ledger.scripts import scripts_for
from factory_worker.net import Backoff
from factory_worker.writeback.events import DeliveryError, Event, Writer

log = logging.getLogger(__name__)

GROUP = "writers"
BATCH = 50
#: A delivery writes a newer event's labels again at most this many times (each time a newer event was
#: handed over while it wrote).
SETTLE_ROUNDS = 3


@dataclass
class DrainReport:
    delivered: int = 0
    retried: int = 0
    parked: int = 0
    #: times a newer event's labels or state were written again after a delivery
    settled: int = 0


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

    def _entries(self) -> list[tuple[str, dict[str, str] | None, float]]:
        """(entry id, fields or None when deleted, fresh until) of what to look at now."""
        out: list[tuple[str, dict[str, str] | None, float]] = []
        for start in ("0", ">"):  # this consumer's pending (retries), then new entries
            fresh_until = time.monotonic() + self.cfg.takeover_s / 2 if start == ">" else 0.0
            try:
                read = self.r.xreadgroup(GROUP, self.consumer, {self.keys.outbox: start}, count=BATCH) or []
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):  # the stream is gone (ledger lost, emptied Redis): make it again
                    self._group_ready = False
                raise
            for _stream, rows in cast("list[list[Any]]", read):  # the RESP2 shape (the default): [[stream, rows]]
                out.extend((i, f, fresh_until) for i, f in rows)
            if start == "0":  # between the two: what a dead consumer left pending
                idle_ms = int(self.cfg.takeover_s * 1000)
                claimed = self.r.xautoclaim(self.keys.outbox, GROUP, self.consumer, idle_ms, "0-0", count=BATCH)
                out.extend((i, f, 0.0) for i, f in claimed[1])
        seen: set[str] = set()
        return [e for e in out if not (e[0] in seen or seen.add(e[0]))]  # type: ignore[func-returns-value]

    def drain(self) -> DrainReport:
        """Deliver what is due now; returns what happened."""
        self._ensure_group()
        report = DrainReport()
        now_ms = int(self.clock() * 1000)
        for entry_id, raw, fresh_until in self._entries():
            if raw is None:  # deleted while pending (parked or delivered by a consumer presumed dead)
                self.r.xack(self.keys.outbox, GROUP, entry_id)
                continue
            attempts, not_before = self._retry_state(entry_id)
            if not_before > now_ms:
                continue
            event = replace(Event.from_entry(entry_id, raw), fresh_until=fresh_until)
            newest, newest_id, name = self._s["outbox_newest"](
                self.keys,
                issue=event.issue,
                entry_id=entry_id,
                event=event.event,
                ttl_ms=Keys.OUTBOX_NEWEST_TTL_S * 1000,
            ).values
            if not int(newest):
                event = replace(event, superseded=True, newest=_text(name))
            error = self._attempt(self.writer.deliver, event)
            # also after a failed delivery: its label writes may have landed after a newer event's, and this
            # entry may be delivered (and gone) by another sender that took it over meanwhile
            settle_to = _text(newest_id)
            error = self._attempt(lambda e: self._settle(e, settle_to, report), event) or error  # noqa: B023 - called at once
            if error is not None:
                self._failed(event, attempts + 1, error, now_ms, report)
            else:
                self._done(entry_id)
                report.delivered += 1
        return report

    @staticmethod
    def _attempt(step: Callable[[Event], None], event: Event) -> DeliveryError | None:
        try:
            step(event)
        except DeliveryError as exc:
            return exc
        except Exception as exc:
            return DeliveryError(f"{type(exc).__name__}: {exc}")
        return None

    def _settle(self, event: Event, wrote: str, report: DrainReport) -> None:
        """After ``event``'s delivery wrote the labels or state of entry ``wrote`` (the newest when it was handed
        over): while a newer event of the issue has been handed over since, write that one's too. Its own
        delivery may have written them before ours landed (two senders delivering one issue at once)."""
        if not event.shows:
            return  # it wrote none
        for _ in range(SETTLE_ROUNDS):
            newest_id, _, name = _text(self.r.hget(self.keys.outbox_newest, event.issue)).partition("|")
            if not name or _order(newest_id) <= _order(wrote):
                return
            self.writer.settle(event.issue, name)
            report.settled += 1
            wrote = newest_id

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
        if not self.r.xrange(self.keys.outbox, event.id, event.id, count=1):  # another sender that took it
            self.r.xack(self.keys.outbox, GROUP, event.id)  # over delivered (or parked) it meanwhile
            return
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
        wait_s = Backoff(self.cfg.backoff_base_s, self.cfg.backoff_max_s).wait_s(attempts, exc.retry_after)
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _order(entry_id: str) -> tuple[int, int]:
    """A stream id ``<ms>-<seq>`` as a sortable pair ((0, 0) when malformed)."""
    ms, _, seq = entry_id.partition("-")
    return (int(ms), int(seq)) if ms.isdigit() and seq.isdigit() else (0, 0)


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
    from factory_worker.writeback.writers import writer_for

    sender = OutboxSender(
        ctx.redis, ctx.keys, ctx.settings.tracker, writer_for(ctx.settings.source, ctx.settings.tracker), consumer
    )
    while not stop.is_set():
        try:
            sender.drain()
        except Exception:
            log.warning("outbox: drain failed", exc_info=True)
        stop.wait(ctx.settings.tracker.poll_s)
