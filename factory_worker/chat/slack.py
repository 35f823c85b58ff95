"""A Slack conversation per dispatch: a thread opened when the agent starts, its end posted in it, and the
humans' replies delivered to the running agent.

Slack Web API (bot token from the env var ``slack.token_env``, base URL ``slack.api_url`` so tests use a
local fake): ``chat.postMessage`` (``channel``, ``text``, ``thread_ts``) opens the thread and posts in it;
``conversations.replies`` (``channel``, ``ts``, ``oldest``, ``cursor``) reads it. Slack answers HTTP 200 with
``{"ok": false, "error": ...}`` for API errors and HTTP 429 with ``Retry-After`` (seconds) when rate limited
(read by the one reader, :func:`factory_worker.net.retry_after_s`: seconds or an HTTP date, at most
``slack.poll_max_s``).

The watcher (:class:`Conversation`) is a thread of the agent task: it reads the thread every ``slack.poll_s``
(backing off after the ``n``-th error in a row by the one :class:`~factory_worker.net.Backoff`:
``2 * poll_s * 2**(n-1)`` with equal jitter, at most ``slack.poll_max_s``; never sooner than a ``Retry-After``)
and appends every new human reply (not the bot's own messages) as one JSON line
``{"source": "slack", "ts", "user", "text"}`` (the format of :mod:`.inbox`) to the dispatch's inbox
file, whose path the agent gets in ``FACTORY_INBOX``. A line is pure ASCII JSON (:func:`.inbox.inbox_line`): every
line break a reader could split on (``\\n``, ``\\r``, ``\\x0b``, ``\\x0c``, ``\\x1c``-``\\x1e``, U+0085, U+2028,
U+2029) is escaped, so one reply is one line for any reader (``splitlines()`` included).

It ends with its dispatch — done, failed, stopped by kill-loop ``--release-agents`` or a warm shutdown (the
agent task stops it before settling and waits for it), or with the worker process (it is a daemon thread of
it). The stop flag is checked before every page of a read, so after :meth:`Conversation.close` at most the
call already in flight completes (close waits for it, up to ``slack.timeout_s`` + 1 s); its answer is dropped.
The inbox is written only while the dispatch runs: the stop flag and each append share a lock, and an
append opens the file without creating it, so once close() returned nothing is written, and an inbox the
dispatch removed is never made again. Slack failures never stop or fail an agent: they are logged.

Every text the factory posts goes through :func:`factory_worker.chat.notify.clean` (the notifier's own: Slack's
``& < >`` escaped, one line, bounded): an issue id or title like ``<!channel>`` or ``<https://evil|the fix>``
is shown as typed, never a ping or a disguised link.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from factory_worker.chat.inbox import append, inbox_line
from factory_worker.chat.notify import clean
from factory_worker.config.settings import SlackSettings, secret_from_env
from factory_worker.net import Backoff, HttpError, Jitter, retry_after_s

log = logging.getLogger(__name__)


#: Pages of one thread read at most per read (a server handing out cursors forever cannot hold the watcher).
MAX_PAGES = 100


class SlackError(HttpError):
    """A Web API call failed (``retry_after``: Slack's ``Retry-After``, at most ``slack.poll_max_s``)."""


class SlackClient:
    """The two Web API methods the conversation needs; the token is never logged."""

    def __init__(self, cfg: SlackSettings, http: httpx.Client | None = None) -> None:
        token = secret_from_env(cfg.token_env)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.cfg = cfg
        self.http = http or httpx.Client(base_url=cfg.api_url.rstrip("/") + "/", headers=headers, timeout=cfg.timeout_s)

    def call(self, method: str, http_method: str = "POST", **params: Any) -> dict[str, Any]:
        try:
            if http_method == "GET":
                resp = self.http.get(method, params=params)
            else:
                resp = self.http.post(method, json=params)
        except httpx.HTTPError as exc:
            raise SlackError(f"{method}: {type(exc).__name__}") from None
        if resp.status_code == 429:
            wait = retry_after_s(resp.headers, time.time(), self.cfg.poll_max_s)
            raise SlackError(f"{method}: rate limited", retry_after=wait, status=429)
        if resp.status_code >= 300:
            raise SlackError(f"{method}: HTTP {resp.status_code}", status=resp.status_code)
        try:
            body = resp.json()
        except ValueError:
            raise SlackError(f"{method}: not JSON") from None
        if not body.get("ok"):
            raise SlackError(f"{method}: {body.get('error', 'not ok')}")
        return body


class Conversation:
    """One dispatch's thread and its watcher."""

    def __init__(self, cfg: SlackSettings, client: SlackClient, inbox: Path) -> None:
        self.cfg, self.client, self.inbox = cfg, client, inbox
        self.channel = cfg.channel or ""
        self.thread_ts: str | None = None
        self.last_ts = "0"
        self.polls = 0
        self._stop = threading.Event()
        #: held by each append to the inbox and by close() setting the stop flag: no append after close()
        self._writing = threading.Lock()
        self._thread: threading.Thread | None = None

    def open(self, text: str) -> bool:
        """Post the opening message and start watching its thread; False (logged) when Slack failed."""
        try:
            body = self.client.call("chat.postMessage", channel=self.channel, text=text)
        except SlackError as exc:
            log.warning("could not open the Slack thread: %s", exc)
            return False
        self.thread_ts = self.last_ts = str(body.get("ts"))
        self.channel = str(body.get("channel") or self.channel)
        self.watch()
        return True

    def watch(self) -> None:
        """Start the watcher of ``thread_ts`` (by :meth:`open`, or for a thread opened earlier)."""
        self._thread = threading.Thread(target=self._watch, name="factory-slack-watch", daemon=True)
        self._thread.start()

    @property
    def ref(self) -> str:
        """The thread as ``<channel>:<ts>`` (what a staged dispatch keeps in the ledger), "" when none."""
        return f"{self.channel}:{self.thread_ts}" if self.thread_ts else ""

    def post(self, text: str) -> None:
        """Post ``text`` in the thread (best effort)."""
        if self.thread_ts is None:
            return
        try:
            self.client.call("chat.postMessage", channel=self.channel, text=text, thread_ts=self.thread_ts)
        except SlackError as exc:
            log.warning("could not post in the Slack thread %s: %s", self.thread_ts, exc)

    def close(self, final: str | None = None) -> None:
        """Stop watching, then post ``final`` in the thread. Nothing is written to the inbox once this began
        (an append in progress ends first); no call starts after it, and the one in flight, if any, is waited
        for (at most ``timeout_s`` + 1 s) and its answer dropped."""
        with self._writing:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.cfg.timeout_s + 1)
            if self._thread.is_alive():
                log.warning(
                    "Slack thread %s: a read still waits for Slack after %.1fs; its answer is dropped",
                    self.thread_ts,
                    self.cfg.timeout_s + 1,
                )
        if final:
            self.post(final)

    def _watch(self) -> None:
        wait, failed = self.cfg.poll_s, 0
        backoff = Backoff(2 * self.cfg.poll_s, self.cfg.poll_max_s, Jitter.EQUAL)
        while not self._stop.wait(wait):
            try:
                self.read_once()
                wait, failed = self.cfg.poll_s, 0
            except SlackError as exc:
                failed += 1
                wait = backoff.wait_s(failed, exc.retry_after)
                log.warning("Slack thread %s: %s; next read in %.1fs", self.thread_ts, exc, wait)
            except Exception:
                log.exception("Slack thread %s: watcher error", self.thread_ts)
                wait = self.cfg.poll_max_s

    def read_once(self) -> int:
        """Read the thread once; append new human replies to the inbox. Returns how many (0 once stopped:
        the stop flag is checked before every page, and nothing read is written after it)."""
        if self._stop.is_set():
            return 0
        self.polls += 1
        new: list[dict[str, Any]] = []
        cursor = None
        for _ in range(MAX_PAGES):
            if self._stop.is_set():  # the dispatch ended between two pages: read no further
                return 0
            params: dict[str, Any] = {
                "channel": self.channel,
                "ts": self.thread_ts,
                "oldest": self.last_ts,
                "limit": 200,
            }
            if cursor:
                params["cursor"] = cursor
            body = self.client.call("conversations.replies", "GET", **params)
            messages = body.get("messages", [])
            if not isinstance(messages, list):
                raise SlackError("conversations.replies: messages is not a list")
            for m in messages:
                if not isinstance(m, dict):
                    continue
                ts = str(m.get("ts", ""))
                if ts > self.last_ts and ts != self.thread_ts and not m.get("bot_id") and m.get("user"):
                    new.append({"source": "slack", "ts": ts, "user": str(m["user"]), "text": str(m.get("text", ""))})
            meta = body.get("response_metadata")
            cursor = meta.get("next_cursor") if isinstance(meta, dict) else None
            if not cursor:
                break
        new.sort(key=lambda m: m["ts"])
        if new and self._append(new):
            self.last_ts = new[-1]["ts"]
            return len(new)
        return 0

    def _append(self, messages: list[dict[str, Any]]) -> bool:
        """Append ``messages`` to the inbox, unless the dispatch ended (stop flag) or removed it
        (:func:`.inbox.append`: never made again)."""
        with self._writing:
            if self._stop.is_set():
                return False
            if not append(self.inbox, messages):
                log.warning("Slack thread %s: the inbox %s is gone; the watcher stops", self.thread_ts, self.inbox)
                self._stop.set()
                return False
        return True


def open_conversation(
    cfg: SlackSettings, inbox: Path, issue_id: str, title: str, task_id: str, attempt_note: str = ""
) -> Conversation | None:
    """Open the thread of one dispatch, or None (Slack off, or it failed: the agent runs anyway)."""
    if not cfg.channel:
        return None
    conv = Conversation(cfg, SlackClient(cfg), inbox)
    note = (" " if attempt_note[:1].isspace() else "") + clean(attempt_note, 100)  # its leading blank kept
    text = (
        f"factory-worker: agent started on {clean(issue_id, 64)}: {clean(title)} (dispatch "
        f"{clean(task_id, 64)}{note}); reply in this thread to talk to it"
    )
    return conv if conv.open(text) else None


def open_thread(cfg: SlackSettings, issue_id: str, title: str, task_id: str, plan: list[str]) -> str:
    """A staged dispatch's thread, opened at hand-over without a watcher (each stage's run watches it):
    ``<channel>:<ts>``, or "" (Slack off, or it failed: the stages run anyway)."""
    if not cfg.channel:
        return ""
    conv = Conversation(cfg, SlackClient(cfg), Path("/dev/null"))
    try:
        body = conv.client.call(
            "chat.postMessage",
            channel=conv.channel,
            text=f"factory-worker: agents started on {clean(issue_id, 64)}: {clean(title)} "
            f"(dispatch {clean(task_id, 64)}; stages {clean(' -> '.join(plan), 300)}); "
            "reply in this thread to talk to the running stage",
        )
    except SlackError as exc:
        log.warning("could not open the Slack thread: %s", exc)
        return ""
    return f"{body.get('channel') or conv.channel}:{body.get('ts')}"


def join_conversation(cfg: SlackSettings, inbox: Path, thread: str) -> Conversation | None:
    """Watch an open thread (``<channel>:<ts>``) for one stage's run: every human reply in it so far and
    from now on is appended to ``inbox``. None when Slack is off or there is no thread."""
    channel, _, ts = thread.rpartition(":")
    if not cfg.channel or not channel or not ts:
        return None
    conv = Conversation(cfg, SlackClient(cfg), inbox)
    conv.channel, conv.thread_ts, conv.last_ts = channel, ts, ts
    try:  # the replies so far are in the inbox when the stage starts, not one poll later
        conv.read_once()
    except SlackError as exc:
        log.warning("Slack thread %s: %s; the watcher reads it again", ts, exc)
    conv.watch()
    return conv


def ended_text(settled: str, error: str = "") -> str:
    """What the thread is told when its dispatch ends."""
    words = {
        "done": "done",
        "backoff": "failed: backing off before another attempt",
        "parked": "parked (needs a human)",
        "released": "stopped (kill-loop, shutdown or revoke): released",
        "stale": "stopped: its claim was lost",
        "lease-lost": "stopped: its claim was lost",
    }
    text = f"factory-worker: {words.get(settled) or clean(settled, 64)}"
    return text + (f" ({clean(error, 300)})" if error and settled in ("backoff", "parked") else "")


__all__ = [
    "Conversation",
    "SlackClient",
    "SlackError",
    "clean",
    "ended_text",
    "inbox_line",
    "join_conversation",
    "open_conversation",
    "open_thread",
]
