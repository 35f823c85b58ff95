"""The plumbing the local HTTP fakes (GitHub, Slack, Linear) share: a threaded server on a free loopback
port, started and stopped as a context manager, answering JSON.

A fake subclasses :class:`FakeServer` and implements ``route(handler) -> (status, payload, headers)``;
the handler is the request (``handler.command``, ``handler.path``, ``handler.headers``, ``read_body``)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Response = tuple[int, Any, dict[str, str]]
#: A status that sends no answer at all: the connection is closed after the request was handled (a lost answer).
DROP = 0


def read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request body (Content-Length bytes; empty without one)."""
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


class FakeServer:
    """A local HTTP server in a daemon thread; ``url`` is its base (``http://127.0.0.1:<port>``).

    ``stall_s``: every request is handled, then answered that late (a slow or hung service: the client's
    timeout fires after the server did the work)."""

    stall_s = 0.0

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def route(self, handler: BaseHTTPRequestHandler) -> Response:
        raise NotImplementedError

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                status, payload, headers = fake.route(self)
                if fake.stall_s:
                    time.sleep(fake.stall_s)
                if status == DROP:  # applied, never answered: the client sees the connection close
                    self.close_connection = True
                    return
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                try:
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client died waiting (the kill tests do that on purpose)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
