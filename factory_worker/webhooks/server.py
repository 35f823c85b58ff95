"""The webhook receiver: ``POST /webhooks/{github,linear,slack}`` answered at once, the work done after.

One process (``factory-worker webhooks --serve [HOST:]PORT``, 127.0.0.1 unless written otherwise): a
:class:`~http.server.ThreadingHTTPServer` (at most :data:`MAX_CONNECTIONS` requests at a time; one more is
answered 503 at once) whose request threads only check and queue, and one worker thread that acts. A request:

1. an endpoint whose secret is unset answers 404 (not configured): it never accepts unsigned input;
2. ``Content-Length`` is required (411) and at most ``webhooks.max_body_bytes`` (413, before reading a byte);
   the body must arrive within ``webhooks.read_timeout_s`` (408);
3. the signature (and Linear's and Slack's timestamp) is checked (:mod:`.verify`: 401, or 400 when malformed),
   then the JSON (400), then what it means (:mod:`.events`); Slack's ``url_verification`` is answered here;
4. its delivery id is remembered with ``SET NX`` for ``webhooks.dedupe_ttl_s`` (``{ns}:webhook:<service>:<sha>``):
   a delivery seen before is acknowledged (200, ``duplicate``) and ignored; Redis unreachable: 503;
5. an issue or comment event is put on a bounded queue (``webhooks.queue_size``) and answered 200; a full
   queue answers 503 with ``Retry-After`` (the delivery id is forgotten again, so the service's retry counts),
   never blocks.

Nothing a refused request carries is acted on, and no request waits for the source, the gate or the broker:
the worker thread does those (:mod:`.gate`, :mod:`.comments`). On SIGINT/SIGTERM (the handler only sets a flag)
the server stops taking requests; events still queued are dropped (logged): the beat poll, which stays the
reconciler, finds their issues at its next iteration.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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

PATHS = {f"/webhooks/{s}": s for s in Service}
#: Requests handled at once; one more is answered 503 without being read.
MAX_CONNECTIONS = 32
#: The answer path's Redis timeouts (the dedupe ``SET NX``): an answer never waits longer than this on Redis.
FAST_REDIS_TIMEOUT_S = 0.5
RETRY_AFTER_S = 5

Answer = tuple[int, dict[str, Any]]


class Headers(dict[str, str]):
    """Request headers, looked up by any case (HTTP header names are case-insensitive)."""

    def __init__(self, pairs: Mapping[str, str] | Any) -> None:
        super().__init__((str(k).lower(), str(v)) for k, v in pairs.items())

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver

    def __init__(self, addr: tuple[str, int], receiver: Receiver) -> None:
        self.receiver = receiver
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.address_family = family
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):  # answered at once, never queued behind the others
            try:
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "factory-worker-webhooks"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.receiver.cfg.read_timeout_s)  # a slow sender cannot hold a thread

    def _answer(self, status: int, body: dict[str, Any], close: bool = False) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        if status == 503:
            self.send_header("Retry-After", str(RETRY_AFTER_S))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._answer(200, {"ok": True})
        else:
            self._answer(404, {"error": "not found"})

    def do_POST(self) -> None:
        service = PATHS.get(self.path.split("?", 1)[0])
        if service is None:
            self._answer(404, {"error": "not found"}, close=True)
            return
        receiver = self.server.receiver
        if receiver.cfg.secret(service) is None:
            self._answer(404, {"error": f"/webhooks/{service} is not configured"}, close=True)
            return
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None or not length.strip().isdigit():
            receiver.count("refused_411")
            self._answer(411, {"error": "Content-Length is required"}, close=True)
            return
        if int(length) > receiver.cfg.max_body_bytes:
            receiver.count("refused_413")
            log.warning("refused a %s delivery: 413 (%s bytes)", service, length)
            self._answer(413, {"error": f"the body is larger than {receiver.cfg.max_body_bytes} bytes"}, close=True)
            return
        try:
            body = self.rfile.read(int(length))
        except (TimeoutError, OSError):
            receiver.count("refused_408")
            self._answer(408, {"error": "the body did not arrive in time"}, close=True)
            return
        if len(body) != int(length):
            self._answer(400, {"error": "the body is shorter than Content-Length"}, close=True)
            return
        status, answer = receiver.accept(service, Headers(self.headers), body)
        self._answer(status, answer)

    def do_PUT(self) -> None:
        self._answer(405, {"error": "POST only"}, close=True)

    do_DELETE = do_PATCH = do_PUT

    def log_message(self, format: str, *args: Any) -> None:  # never the body or the headers: status lines only
        log.debug("%s %s", self.address_string(), format % args)


def make_server(receiver: Receiver, host: str, port: int) -> _Server:
    return _Server((host, port), receiver)


class _Stop:
    requested = False


def serve(ctx: Context, host: str, port: int, send: Sender, stop: Stopper, poll_s: float = 0.2) -> int:
    """Serve the webhooks on ``host:port`` until SIGINT/SIGTERM; returns 0."""
    receiver = Receiver(ctx, send, stop).start()
    server = make_server(receiver, host, port)
    thread = threading.Thread(target=server.serve_forever, name="factory-webhooks-http", daemon=True)
    thread.start()
    flag = _Stop()

    def _on_signal(signum: int, _frame: Any) -> None:
        flag.requested = True  # only a flag: the loop below does the stopping

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    shown = f"[{host}]" if ":" in host else host
    on = [s for s in Service if ctx.settings.webhooks.secret(s) is not None]
    print(
        f"factory-worker: receiving webhooks on http://{shown}:{server.server_port}/webhooks/ "
        f"({', '.join(on) or 'no endpoint configured: set FACTORY_WEBHOOKS__GITHUB_SECRET, ...'})",
        file=sys.stderr,
        flush=True,
    )
    try:
        while not flag.requested:
            time.sleep(poll_s)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        server.shutdown()
        server.server_close()
        thread.join(5)
        dropped = receiver.close()
        if dropped:
            log.warning("stopped with %d event(s) not acted on: the next poll finds their issues", dropped)
    log.info("webhook receiver stopped: %s", dict(receiver.stats))
    return 0


__all__ = ["Receiver", "make_server", "serve"]
