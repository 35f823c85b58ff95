"""Slack-compatible incoming-webhook notifications, sent from a background thread so the loop never waits.

``Notifier.from_settings(settings.notify)`` gives a disabled (no-op) notifier when ``webhook_url`` is unset.
``notify(event, text, **fields)`` only enqueues (bounded queue: when it is full the message is dropped and
counted) and returns at once; one daemon thread, started on first use (and again in a forked child, e.g. a
Celery prefork process), POSTs ``{"text": text, **fields}`` (``fields`` may carry Slack's ``blocks``,
``username``... and must be JSON-serialisable) with the configured timeout. Only events listed in
``settings.events`` are sent. A webhook that answers 429 (rate limited; Slack allows about one message a
second) gets the message again after the wait it asks (``Retry-After``, read by the one reader of
:mod:`factory_worker.net`; the one :class:`~factory_worker.net.Backoff` when it says none, at most
:data:`RATE_LIMIT_BACKOFF` ``.max_s``), at most :data:`RATE_LIMIT_SENDS` sends in all and never past
``close()``. Failures (HTTP status >= 300, timeouts, refused connections) are counted in
``notifier.stats`` (``sent``, ``failed``, ``dropped``) and logged at WARNING with the webhook's host only:
the URL's path is a secret, and it is also redacted from httpx's own request log lines. Nothing here raises
into the caller. ``close(timeout)`` sends what it can within ``timeout`` then stops the thread; it is
idempotent and registered with :mod:`atexit`.

Messages for the loop's events are built by :func:`format_message` (``dispatched``, ``done``, ``parked``,
``stale``, ``killed``); every interpolated value is untrusted text and goes through :func:`clean`:
:func:`escape` (Slack's control characters ``& < >`` become ``&amp; &lt; &gt;``, so a title cannot ping
``<!channel>`` or forge a link) and squeezed to one line of bounded length. The dispatch threads
(``slack.py``) post through the same :func:`clean`.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from factory_worker.net import Backoff, retry_after_s

if TYPE_CHECKING:
    import httpx

    from factory_worker.config.settings import NotifySettings

log = logging.getLogger(__name__)

EVENTS = ("dispatched", "done", "parked", "stale", "killed", "ledger-lost")
QUEUE_SIZE = 256
#: Sends of one message at most while the webhook answers 429, and the waits between them.
RATE_LIMIT_SENDS = 3
RATE_LIMIT_BACKOFF = Backoff(1.0, 10.0)
_STOP = object()


# -- formatting -------------------------------------------------------------------------------------


def escape(text: Any) -> str:
    """Escape Slack's control characters (``&``, ``<``, ``>``) in untrusted text."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def clean(text: Any, limit: int = 200) -> str:
    """Untrusted text for a Slack message, the notifier's and every dispatch thread's (``slack.py``): one line,
    at most ``limit`` characters, escaped (:func:`escape`)."""
    line = " ".join(str(text).split())
    if len(line) > limit:
        line = line[: limit - 1] + "…"
    return escape(line)


_clean = clean


def format_dispatched(issue_id: str, title: str = "", run_id: str | None = None) -> str:
    run = f" (run {_clean(run_id, 64)})" if run_id else ""
    return f":arrow_forward: dispatched issue *{_clean(issue_id, 64)}*: {_clean(title)}{run}"


def format_done(issue_id: str, title: str = "", duration_s: float | None = None) -> str:
    took = f" in {duration_s:.0f}s" if duration_s is not None else ""
    sep = f": {_clean(title)}" if title else ""
    return f":white_check_mark: issue *{_clean(issue_id, 64)}* done{took}{sep}"


def format_parked(issue_id: str, attempts: int, last_error: str = "", title: str = "") -> str:
    sep = f" ({_clean(title)})" if title else ""
    err = f"; last error: {_clean(last_error, 300)}" if last_error else ""
    return f":warning: issue *{_clean(issue_id, 64)}*{sep} parked after {int(attempts)} attempts{err}"


def format_stale(age_s: float | None = None, run_id: str | None = None, hostname: str | None = None) -> str:
    age = f" (last heartbeat {age_s:.0f}s ago)" if age_s is not None else ""
    run = f", run {_clean(run_id, 64)}" if run_id else ""
    host = f" on {_clean(hostname, 64)}" if hostname else ""
    return f":hourglass: factory loop heartbeat is stale{age}{run}{host}"


def format_killed(run_id: str | None = None, by: str | None = None) -> str:
    run = f" run {_clean(run_id, 64)}" if run_id else ""
    who = f" by {_clean(by, 64)}" if by else ""
    return f":octagonal_sign: factory loop{run} killed{who}"


def format_ledger_lost(remembered: str = "", current: str | None = None) -> str:
    now = f"generation {_clean(current, 64)}" if current else "an empty ledger"
    return (
        f":rotating_light: factory ledger lost: worked in generation {_clean(remembered, 64)}, Redis now holds "
        f"{now}; nothing is claimed or started until `factory-worker ledger accept`"
    )


FORMATTERS: dict[str, Callable[..., str]] = {
    "ledger-lost": format_ledger_lost,
    "dispatched": format_dispatched,
    "done": format_done,
    "parked": format_parked,
    "stale": format_stale,
    "killed": format_killed,
}


def format_message(event: str, **kwargs: Any) -> str:
    """The text for one of :data:`EVENTS`; unknown events give ``event: k=v ...`` (escaped)."""
    fmt = FORMATTERS.get(event)
    if fmt is not None:
        return fmt(**kwargs)
    pairs = " ".join(f"{_clean(k, 40)}={_clean(v, 100)}" for k, v in kwargs.items())
    return f"{_clean(event, 40)}: {pairs}".rstrip(": ")


# -- the notifier -----------------------------------------------------------------------------------


def _host(url: str) -> str:
    return urlsplit(url).hostname or "?"


class _RedactUrl(logging.Filter):
    """Replace the webhook URL in httpx's ``HTTP Request: POST <url> ...`` log records by its host."""

    def __init__(self, url: str) -> None:
        super().__init__()
        import httpx  # imported only once notifications are on: a disabled notifier costs no import

        try:
            self.urls = {url, str(httpx.URL(url))}
        except Exception:
            self.urls = {url}
        self.safe = f"{urlsplit(url).scheme}://{_host(url)}/<redacted>"

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(str(a) in self.urls for a in record.args):
            record.args = tuple(self.safe if str(a) in self.urls else a for a in record.args)
        return True


class Notifier:
    """Posts event messages to a webhook from one background thread; see the module docstring."""

    def __init__(
        self,
        webhook_url: str | None,
        *,
        timeout_s: float = 2.0,
        events: Iterable[str] = EVENTS,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.webhook_url = webhook_url or None
        self.host = _host(webhook_url) if webhook_url else None
        self.timeout_s = timeout_s
        self.events = frozenset(events)
        self.stats = {"sent": 0, "failed": 0, "dropped": 0}
        self._queue_size = queue_size
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._closed = False
        #: set by close(): a wait for a rate limit ends at once
        self._closing = threading.Event()
        self._deadline: float | None = None
        self._redact = _RedactUrl(webhook_url) if webhook_url else None

    @classmethod
    def from_settings(cls, settings: NotifySettings) -> Notifier:
        """A notifier for ``settings``; a disabled one (``enabled`` False) when ``webhook_url`` is unset."""
        return cls(settings.webhook_url, timeout_s=settings.timeout_s, events=settings.events)

    @property
    def enabled(self) -> bool:
        return self.webhook_url is not None

    def __repr__(self) -> str:  # never shows the URL's secret path
        return f"Notifier(host={self.host!r}, events={sorted(self.events)!r}, stats={self.stats!r})"

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def notify(self, event: str, text: str, **fields: Any) -> bool:
        """Queue one message (never blocks, never raises); True when queued, False when off/filtered/dropped."""
        if not self.enabled or event not in self.events:
            return False
        try:
            if not self._ensure_thread():
                self._count("dropped")  # closed
                return False
            self._queue.put_nowait({"text": text, **fields})
        except queue.Full:
            self._count("dropped")
            log.warning("notify: queue full (%d), dropped a %r message for %s", self._queue_size, event, self.host)
            return False
        except Exception as exc:  # e.g. "can't start new thread" at interpreter shutdown
            self._count("dropped")
            log.warning("notify: cannot queue a %r message: %s", event, type(exc).__name__)
            return False
        return True

    def send_event(self, event: str, **kwargs: Any) -> bool:
        """``notify(event, format_message(event, **kwargs))``; a formatting error drops the message."""
        if not self.enabled or event not in self.events:
            return False
        try:
            text = format_message(event, **kwargs)
        except Exception as exc:
            log.warning("notify: cannot format a %r message: %s", event, exc)
            self._count("dropped")
            return False
        return self.notify(event, text)

    def _ensure_thread(self) -> bool:
        """Start the sender thread if needed; False once closed."""
        with self._lock:
            if self._closed:
                return False
            if self._pid != os.getpid():  # forked: the parent's thread and queue state did not come along
                self._pid, self._thread = os.getpid(), None
                self._queue = queue.Queue(maxsize=self._queue_size)
            if self._thread is not None:
                return True
            self._thread = threading.Thread(target=self._run, name="factory-notify", daemon=True)
            self._thread.start()
            if self._redact is not None:
                logging.getLogger("httpx").addFilter(self._redact)
            atexit.register(self.close)
            return True

    def _run(self) -> None:
        import httpx

        q = self._queue
        with httpx.Client(timeout=self.timeout_s) as client:
            while True:
                item = q.get()
                if item is _STOP:
                    return
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    self._count("dropped")
                    self._drain(q)
                    return
                self._send(client, item)

    def _drain(self, q: queue.Queue[Any]) -> None:
        while True:
            try:
                item = q.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                self._count("dropped")

    def _send(self, client: httpx.Client, payload: dict[str, Any]) -> None:
        """Send one message; again after a 429 (see the module docstring). Counted once: sent or failed."""
        for send in range(1, RATE_LIMIT_SENDS + 1):
            resp = self._post(client, payload)
            if resp is None:
                return
            if 200 <= resp.status_code < 300:
                self._count("sent")
                return
            if resp.status_code != 429 or send == RATE_LIMIT_SENDS or not self._wait_out(resp, send):
                self._count("failed")
                log.warning("notify: webhook %s answered HTTP %d", self.host, resp.status_code)
                return

    def _wait_out(self, resp: httpx.Response, send: int) -> bool:
        """Wait as the 429 asks before the next send; False when close() came (or would come) first."""
        asked = retry_after_s(resp.headers, time.time(), RATE_LIMIT_BACKOFF.max_s)
        wait = RATE_LIMIT_BACKOFF.wait_s(send, asked)
        if self._deadline is not None and time.monotonic() + wait >= self._deadline:
            return False
        log.info("notify: webhook %s rate limited; sending again in %.1fs", self.host, wait)
        return not self._closing.wait(wait)

    def _post(self, client: httpx.Client, payload: dict[str, Any]) -> httpx.Response | None:
        """One POST; None when it got no answer (counted failed and logged)."""
        import httpx

        timeout = self.timeout_s
        if self._deadline is not None:
            timeout = max(0.05, min(timeout, self._deadline - time.monotonic()))
        try:
            resp = client.post(self.webhook_url, json=payload, timeout=timeout)  # type: ignore[arg-type]
        except httpx.TimeoutException:
            self._count("failed")
            log.warning("notify: webhook %s timed out after %.1fs", self.host, timeout)
            return None
        except Exception as exc:  # connection refused, DNS, TLS, unserialisable fields...
            self._count("failed")
            log.warning("notify: webhook %s failed: %s", self.host, type(exc).__name__)
            return None
        return resp

    def close(self, timeout: float = 2.0) -> None:
        """Send what can be sent within ``timeout`` seconds, then stop the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread if self._pid == os.getpid() else None
        self._closing.set()
        try:
            atexit.unregister(self.close)
        except Exception:
            pass
        if thread is None:
            return
        self._deadline = time.monotonic() + max(0.0, timeout)
        try:
            self._queue.put(_STOP, timeout=max(0.0, timeout))
        except queue.Full:
            pass  # the thread sees the deadline at its next message and drops the rest
        thread.join(max(0.0, self._deadline - time.monotonic()) + 0.05)
        if thread.is_alive():
            log.warning("notify: sender thread still busy after %.1fs (a request is in flight)", timeout)
        if self._redact is not None:
            logging.getLogger("httpx").removeFilter(self._redact)
