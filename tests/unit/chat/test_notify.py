"""The webhook notifier against a local HTTP server (no network), and the message formatters."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from factory_worker.chat import notify
from factory_worker.chat.notify import (
    EVENTS,
    Notifier,
    escape,
    format_dispatched,
    format_done,
    format_killed,
    format_message,
    format_parked,
    format_stale,
)
from factory_worker.config.settings import NotifySettings
from factory_worker.net import Backoff

SECRET = "/services/T0000/B0000/XXsecretXX"


class Hook:
    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.status = 200
        #: (status, headers) answered before ``status``, one a request; and when each request came
        self.answers: list[tuple[int, dict[str, str]]] = []
        self.times: list[float] = []
        self.delay = 0.0
        self.gate: threading.Event | None = None
        self.url = ""


@pytest.fixture
def hook() -> Iterator[Hook]:
    state = Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if state.gate is not None:
                state.gate.wait(5)
            if state.delay:
                time.sleep(state.delay)
            state.bodies.append(json.loads(raw))
            state.times.append(time.monotonic())
            status, headers = state.answers.pop(0) if state.answers else (state.status, {})
            body = b"ok" if status < 300 else b"error"
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass  # the client gave up

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}{SECRET}"
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield state
    if state.gate is not None:
        state.gate.set()
    httpd.shutdown()
    httpd.server_close()


def wait_for(pred: Callable[[], bool], timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


@pytest.fixture
def make() -> Iterator[Callable[..., Notifier]]:
    made: list[Notifier] = []

    def _make(url: str | None, **kw: Any) -> Notifier:
        n = Notifier(url, **kw)
        made.append(n)
        return n

    yield _make
    for n in made:
        n.close(timeout=0.5)


def test_messages_arrive_as_json(hook, make):
    n = make(hook.url, timeout_s=2.0)
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "hi"}}]
    assert n.notify("dispatched", "hello", blocks=blocks) is True
    assert n.notify("done", "bye") is True
    n.close(timeout=2.0)
    assert hook.bodies == [{"text": "hello", "blocks": blocks}, {"text": "bye"}]
    assert n.stats == {"sent": 2, "failed": 0, "dropped": 0}


def test_send_event_formats(hook, make):
    n = make(hook.url)
    assert n.send_event("parked", issue_id="7", attempts=3, last_error="exit 1", title="<fix> & go")
    n.close()
    assert hook.bodies == [{"text": format_parked("7", 3, "exit 1", "<fix> & go")}]
    assert "&lt;fix&gt; &amp; go" in hook.bodies[0]["text"]


def test_slow_server_does_not_block_and_counts_failed(hook, make, caplog):
    hook.delay = 0.6
    n = make(hook.url, timeout_s=0.2)
    t0 = time.perf_counter()
    n.notify("dispatched", "one")
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    n.notify("done", "two")
    second = time.perf_counter() - t1
    assert first < 0.05 and second < 0.05
    assert wait_for(lambda: n.stats["failed"] == 2, timeout=3.0), n.stats
    assert n.stats["sent"] == 0
    assert "timed out" in caplog.text and "127.0.0.1" in caplog.text and SECRET not in caplog.text


def test_server_500_counted_failed_without_secret_in_logs(hook, make, caplog):
    hook.status = 500
    caplog.set_level(logging.INFO)
    n = make(hook.url)
    n.notify("stale", "loop is stale")
    n.close()
    assert n.stats == {"sent": 0, "failed": 1, "dropped": 0}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("HTTP 500" in r.getMessage() and "127.0.0.1" in r.getMessage() for r in warnings)
    assert "XXsecretXX" not in caplog.text  # not even in httpx's own "HTTP Request: POST ..." line
    assert any(r.name == "httpx" for r in caplog.records)


def test_connection_refused_counted_failed(make, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    n = make(f"http://127.0.0.1:{port}{SECRET}")
    t0 = time.perf_counter()
    assert n.notify("killed", "killed by ops")
    assert time.perf_counter() - t0 < 0.05
    n.close()
    assert n.stats == {"sent": 0, "failed": 1, "dropped": 0}
    assert "ConnectError" in caplog.text and "XXsecretXX" not in caplog.text


def test_events_filter(hook, make):
    n = make(hook.url, events=["parked"])
    assert n.notify("dispatched", "x") is False
    assert n.send_event("done", issue_id="1") is False
    assert n._thread is None  # nothing to send: no thread started
    assert n.notify("parked", "y") is True
    n.close()
    assert hook.bodies == [{"text": "y"}] and n.stats["sent"] == 1


def test_from_settings(hook):
    n = Notifier.from_settings(NotifySettings(webhook_url=hook.url, timeout_s=1.5, events=["done"]))
    try:
        assert n.enabled and n.timeout_s == 1.5 and n.events == {"done"}
        assert "XXsecretXX" not in repr(n) and "127.0.0.1" in repr(n)
    finally:
        n.close()


def test_disabled_notifier_does_nothing():
    n = Notifier.from_settings(NotifySettings())
    assert not n.enabled
    before = threading.active_count()
    for event in EVENTS:
        assert n.notify(event, "text") is False
        assert n.send_event(event, issue_id="1") is False
    assert n._thread is None and threading.active_count() == before
    assert n.stats == {"sent": 0, "failed": 0, "dropped": 0}
    n.close()
    n.close()


def test_close_idempotent_and_thread_gone(hook, make):
    n = make(hook.url)
    n.notify("done", "x")
    thread = n._thread
    assert thread is not None and thread.daemon and thread.is_alive()
    n.close()
    n.close(timeout=0)
    assert not thread.is_alive()
    assert not any(t.name == "factory-notify" and t is thread for t in threading.enumerate())
    assert n.notify("done", "late") is False and n.stats["dropped"] == 1
    assert hook.bodies == [{"text": "x"}]


def test_close_without_thread():
    n = Notifier("http://127.0.0.1:9/x")
    n.close()
    assert n.notify("done", "x") is False


def test_close_flushes_queue(hook, make):
    n = make(hook.url)
    for i in range(20):
        n.notify("done", f"m{i}")
    n.close(timeout=3.0)
    assert [b["text"] for b in hook.bodies] == [f"m{i}" for i in range(20)]
    assert n.stats["sent"] == 20


def test_queue_full_drops_and_counts(hook, make):
    hook.gate = threading.Event()
    n = make(hook.url, queue_size=2, timeout_s=3.0)
    results = [n.notify("done", f"m{i}") for i in range(6)]
    assert results.count(False) >= 3 and n.stats["dropped"] == results.count(False)
    hook.gate.set()
    n.close(timeout=3.0)
    assert n.stats["sent"] == results.count(True) and n.stats["failed"] == 0
    assert sum(n.stats.values()) == 6


def test_close_gives_up_at_deadline(hook, make):
    hook.delay = 0.3
    n = make(hook.url, timeout_s=1.0)
    for i in range(10):
        n.notify("done", f"m{i}")
    t0 = time.monotonic()
    n.close(timeout=0.5)
    assert time.monotonic() - t0 < 1.5
    assert wait_for(lambda: not n._thread.is_alive(), timeout=2.0)
    assert n.stats["dropped"] >= 5 and sum(n.stats.values()) == 10


def test_escape():
    assert escape("<!channel> & <http://evil|click>") == "&lt;!channel&gt; &amp; &lt;http://evil|click&gt;"
    assert escape("&amp;") == "&amp;amp;"


def test_formatters_escape_and_one_line():
    hostile = "<!here> fix\n& <https://x|y>"
    texts = [
        format_dispatched("12", hostile, run_id="r1"),
        format_done("12", hostile, duration_s=3.2),
        format_parked("12", 3, last_error=hostile + "\nTraceback...", title=hostile),
        format_stale(age_s=95.0, run_id="<r>", hostname="h<1>"),
        format_killed(run_id="r<1>", by="ops & co"),
    ]
    for text in texts:
        assert "<" not in text and ">" not in text and "\n" not in text
    assert "dispatched" in texts[0] and "12" in texts[0] and "&lt;!here&gt; fix &amp;" in texts[0]
    assert "done in 3s" in texts[1]
    assert "parked after 3 attempts" in texts[2] and "last error" in texts[2]
    assert "95s" in texts[3] and "&lt;r&gt;" in texts[3]
    assert "killed by ops &amp; co" in texts[4] and "r&lt;1&gt;" in texts[4]
    assert len(format_dispatched("1", "x" * 5000)) < 300


def test_format_message_known_and_unknown():
    assert format_message("killed", run_id="r1", by="alice") == format_killed("r1", "alice")
    assert format_message("custom", a="<b>") == "custom: a=&lt;b&gt;"
    with pytest.raises(TypeError):
        format_message("parked", issue_id="1")  # attempts is required


@pytest.fixture
def quick_backoff(monkeypatch):
    """The waits between sends after a 429 start at 0.05 s (not 1 s), so the tests stay short."""
    monkeypatch.setattr(notify, "RATE_LIMIT_BACKOFF", Backoff(0.05, 10.0))


def test_a_rate_limited_message_is_sent_again_after_retry_after(hook, make, quick_backoff):
    hook.answers = [(429, {"Retry-After": "1"})]
    n = make(hook.url)
    assert n.notify("done", "one")
    assert wait_for(lambda: n.stats["sent"] == 1, timeout=5.0), n.stats
    assert hook.bodies == [{"text": "one"}, {"text": "one"}] and n.stats["failed"] == 0
    assert hook.times[1] - hook.times[0] >= 0.9  # not before Retry-After


def test_a_webhook_that_stays_rate_limited_fails_the_message_once(hook, make, quick_backoff, caplog):
    hook.status = 429
    n = make(hook.url)
    n.notify("done", "one")
    assert wait_for(lambda: n.stats["failed"] == 1, timeout=5.0), n.stats
    assert len(hook.bodies) == notify.RATE_LIMIT_SENDS and n.stats["sent"] == 0
    assert "HTTP 429" in caplog.text and SECRET not in caplog.text


def test_close_ends_a_rate_limit_wait_at_once(hook, make):
    hook.answers = [(429, {"Retry-After": "10"})]
    n = make(hook.url)
    n.notify("done", "one")
    assert wait_for(lambda: len(hook.bodies) == 1)
    t0 = time.monotonic()
    n.close(timeout=5.0)
    assert time.monotonic() - t0 < 1.0
    assert n.stats == {"sent": 0, "failed": 1, "dropped": 0} and len(hook.bodies) == 1
