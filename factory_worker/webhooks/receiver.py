"""The receiver's two sides: the answer (request threads: check a delivery, remember its id, queue its work) and
the work (one worker thread: an issue's gate pass, a comment), in :class:`Receiver`. The HTTP around it is
:mod:`.server`; what each step checks is listed there.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from typing import Any

import redis

from factory_worker.context import Context
from factory_worker.ledger.redis_client import client as make_client
from factory_worker.loop.iteration import Sender
from factory_worker.webhooks import events, verify
from factory_worker.webhooks.comments import CommentHandler, Stopper
from factory_worker.webhooks.events import Event, Kind, Service
from factory_worker.webhooks.gate import gate_issue

log = logging.getLogger(__name__)

#: The answer path's Redis timeouts (the dedupe ``SET NX``): an answer never waits longer than this on Redis.
FAST_REDIS_TIMEOUT_S = 0.5
#: What a 503 asks the service to wait (s).
RETRY_AFTER_S = 5

Answer = tuple[int, dict[str, Any]]


class Receiver:
    """What the HTTP threads and the worker thread share: settings, the queue, the answer path's Redis."""

    def __init__(self, ctx: Context, send: Sender, stop: Stopper, fast_redis: redis.Redis | None = None) -> None:
        self.ctx, self.cfg = ctx, ctx.settings.webhooks
        self.fast = fast_redis or make_client(
            ctx.settings, socket_timeout=FAST_REDIS_TIMEOUT_S, socket_connect_timeout=FAST_REDIS_TIMEOUT_S
        )
        self.send = send
        self.comments = CommentHandler(ctx, send, stop)
        self.queue: queue.Queue[Event | None] = queue.Queue(maxsize=self.cfg.queue_size)
        self.stats: Counter[str] = Counter()
        #: what the worker thread did with the latest events (newest last): for logs, status and tests
        self.done: deque[dict[str, Any]] = deque(maxlen=100)
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    # -- the answer (request threads) ------------------------------------------------------------------
    def count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def accept(self, service: str, headers: Mapping[str, str], body: bytes, now_s: float | None = None) -> Answer:
        """Check one delivery and queue its work; the answer (status, JSON body)."""
        now_s = time.time() if now_s is None else now_s
        secret = self.cfg.secret(service)
        if secret is None:
            return 404, {"error": f"/webhooks/{service} is not configured"}
        try:
            event = self._verified(Service(service), secret, headers, body, now_s)
        except verify.Refused as exc:
            self.count(f"refused_{exc.status}")
            log.warning("refused a %s delivery: %d %s", service, exc.status, exc.reason)
            return exc.status, {"error": exc.reason}
        if isinstance(event, dict):  # Slack's url_verification: the challenge, answered at once
            return 200, event
        return self._queue(event)

    def _verified(
        self, service: Service, secret: bytes, headers: Mapping[str, str], body: bytes, now_s: float
    ) -> Event | dict[str, Any]:
        if service == Service.GITHUB:
            verify.check_github(secret, headers, body)
        elif service == Service.LINEAR:
            verify.check_linear(secret, headers, body)
        else:
            verify.check_slack(secret, headers, body, now_s, self.cfg.slack_max_age_s)
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            raise verify.Refused(400, "the body is not JSON") from None
        if not isinstance(payload, dict):
            raise verify.Refused(400, "the body is not a JSON object")
        src = self.ctx.settings.source
        if service == Service.GITHUB:
            return events.github_event(headers, payload, src.kind, src.github_repo)
        if service == Service.LINEAR:
            verify.check_linear_age(payload, now_s, self.cfg.linear_max_age_s)
            return events.linear_event(headers, payload, body, src.kind)
        if payload.get("type") == "url_verification":
            challenge = payload.get("challenge")
            if not isinstance(challenge, str) or len(challenge) > 1024:
                raise verify.Refused(400, "url_verification without a challenge")
            return {"challenge": challenge}
        return events.slack_event(payload)

    def _queue(self, event: Event) -> Answer:
        if not event.delivery:  # nothing to act on and nothing to remember
            self.count(str(event.kind))
            log.info("%s delivery: nothing to do (%s)", event.service, event.why)
            return 200, {"ok": True, "did": str(event.kind)}
        key = self.ctx.keys.webhook_seen(str(event.service), events.digest(event.delivery))
        try:
            first = self.fast.set(key, 1, nx=True, ex=self.cfg.dedupe_ttl_s)
        except redis.RedisError as exc:
            self.count("unavailable")
            log.warning("cannot remember %s delivery %s (%s): answered 503", event.service, event.delivery, exc)
            return 503, {"error": "Redis is unavailable; retry later", "retry_after": RETRY_AFTER_S}
        if not first:
            self.count("duplicate")
            log.info("%s delivery %s seen before: ignored", event.service, event.delivery)
            return 200, {"ok": True, "duplicate": True}
        if event.kind not in (Kind.ISSUE, Kind.COMMENT):
            self.count(str(event.kind))
            if event.why:
                log.info("%s delivery %s: nothing to do (%s)", event.service, event.delivery, event.why)
            return 200, {"ok": True, "did": str(event.kind)}
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            self.count("queue_full")
            try:  # the service's retry must not be taken for a duplicate
                self.fast.delete(key)
            except redis.RedisError:
                log.warning("could not forget delivery %s: its retry will be ignored", event.delivery)
            log.warning(
                "the event queue is full (%d): %s delivery %s answered 503",
                self.cfg.queue_size,
                event.service,
                event.delivery,
            )
            return 503, {"error": "busy; retry later", "retry_after": RETRY_AFTER_S}
        self.count("queued")
        return 200, {"ok": True, "queued": str(event.kind)}

    # -- the work (one worker thread) ------------------------------------------------------------------
    def start(self) -> Receiver:
        self._worker = threading.Thread(target=self._work, name="factory-webhooks-worker", daemon=True)
        self._worker.start()
        return self

    def _work(self) -> None:
        while True:
            event = self.queue.get()
            try:
                if event is None:
                    return
                self.process(event)
            except Exception as exc:  # a send that failed released its claim; the poll tries again
                assert event is not None
                log.exception("could not act on %s delivery %s", event.service, event.delivery)
                self.done.append({"service": str(event.service), "delivery": event.delivery, "error": repr(exc)})
            finally:
                self.queue.task_done()

    def process(self, event: Event) -> dict[str, Any]:
        """Act on one queued event; what was done (logged)."""
        if event.kind == Kind.ISSUE:
            passed = gate_issue(self.ctx, self.send, event.issue)
            out = passed.as_dict()
            self.ctx.control.count(f"webhook_gate_{passed.verdict}")
        else:
            done = self.comments.handle(event)
            out = {"issue": done.issue, "did": done.did, "detail": done.detail, "tasks": list(done.tasks)}
            self.ctx.control.count(f"webhook_comment_{done.did}")
        out.update(service=str(event.service), kind=str(event.kind), delivery=event.delivery)
        out["ms"] = round((time.monotonic() - event.received) * 1000, 1)
        self.done.append(out)
        log.info("%s %s %s (delivery %s): %s", event.service, event.kind, event.action, event.delivery, out)
        return out

    def close(self, timeout_s: float = 5.0) -> int:
        """Stop the worker thread after the event it is acting on; returns how many queued events were dropped."""
        dropped = 0
        while True:
            try:
                if self.queue.get_nowait() is not None:
                    dropped += 1
                self.queue.task_done()
            except queue.Empty:
                break
        if self._worker is not None:
            self.queue.put(None)
            self._worker.join(timeout_s)
        return dropped


__all__ = ["Answer", "Receiver", "RETRY_AFTER_S"]
