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
the worker thread does those (:class:`~.receiver.Receiver`, :mod:`.gate`, :mod:`.comments`). On SIGINT/SIGTERM (the handler only sets a flag)
the server stops taking requests; events still queued are dropped (logged): the beat poll, which stays the
reconciler, finds their issues at its next iteration.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from factory_worker.context import Context
from factory_worker.loop.iteration import Sender
from factory_worker.webhooks.comments import Stopper
from factory_worker.webhooks.events import Service
from factory_worker.webhooks.receiver import RETRY_AFTER_S, Receiver

log = logging.getLogger(__name__)

PATHS = {f"/webhooks/{s}": s for s in Service}
#: Requests handled at once; one more is answered 503 without being read.
MAX_CONNECTIONS = 32


class Headers(dict[str, str]):
    """Request headers, looked up by any case (HTTP header names are case-insensitive)."""

    def __init__(self, pairs: Mapping[str, str] | Any) -> None:
        super().__init__((str(k).lower(), str(v)) for k, v in pairs.items())

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())


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
        body = self._read(int(length), receiver.cfg.read_timeout_s)
        if body is None:
            receiver.count("refused_408")
            self._answer(408, {"error": "the body did not arrive in time"}, close=True)
            return
        if len(body) != int(length):
            self._answer(400, {"error": "the body is shorter than Content-Length"}, close=True)
            return
        status, answer = receiver.accept(service, Headers(self.headers), body)
        self._answer(status, answer)

    def _read(self, length: int, within_s: float) -> bytes | None:
        """The body, whole within ``within_s`` (a sender trickling bytes is cut off too); None when late."""
        deadline, chunks, left = time.monotonic() + within_s, [], length
        try:
            while left > 0:
                if time.monotonic() > deadline:
                    return None
                chunk = self.rfile.read1(min(left, 64 * 1024))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        except (TimeoutError, OSError):
            return None
        return b"".join(chunks)

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
