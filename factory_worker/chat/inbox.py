"""A running agent's inbox (``FACTORY_INBOX``): what humans say to it, one JSON line each, whatever the channel.

A line is ``{"source", "ts", "user", "text"}`` (and, from a tracker, ``issue`` and ``url``): ``source`` is
:class:`InboxSource` (``slack`` for a reply in the dispatch's Slack thread, ``github`` or ``linear`` for a
comment on its issue). Slack replies are appended by the thread's watcher (:mod:`.slack`); tracker comments
arrive at the webhook receiver, which may run on another machine than the agent, so they travel through Redis:
the receiver :func:`deliver` s a line to ``{ns}:agent:<task_id>:inbox`` of every running agent of the issue,
and that dispatch's :class:`TrackerRelay` (a thread of the agent task) moves it into the file every
:data:`RELAY_POLL_S`. :class:`AgentInbox` is the file with whatever feeds it, closed when the dispatch ends:
no read after :meth:`AgentInbox.close` returns.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import redis

from factory_worker.ledger.keys import Keys

log = logging.getLogger(__name__)

#: How often (s) a relay moves the lines waiting in Redis into the inbox file.
RELAY_POLL_S = 0.5
#: Lines moved per round trip.
RELAY_BATCH = 100


class InboxSource(StrEnum):
    """Where an inbox line comes from (its ``source``)."""

    SLACK = "slack"
    GITHUB = "github"
    LINEAR = "linear"


def entry(source: InboxSource, ts: str, user: str, text: str, **extra: Any) -> dict[str, Any]:
    """One inbox line as data: ``source``, ``ts``, ``user``, ``text``, then ``extra`` (``issue``, ``url``)."""
    return {"source": str(source), "ts": ts, "user": user, "text": text, **extra}


def inbox_line(message: dict[str, Any]) -> str:
    """One reply as one inbox line: JSON with every non-ASCII character escaped (``ensure_ascii``), so no line
    separator of any reader (U+2028, U+2029, U+0085; the ASCII ones are escaped by JSON anyway) and no lone
    surrogate reaches the file raw."""
    return json.dumps(message, ensure_ascii=True) + "\n"


def append(path: Path, entries: Iterable[dict[str, Any]]) -> bool:
    """Append ``entries`` to the inbox file, one :func:`inbox_line` each; False when the file is gone (the
    dispatch removed it): it is opened without ``O_CREAT`` (and never through a symlink), so it is never made
    again by a late writer."""
    data = "".join(inbox_line(e) for e in entries).encode("ascii")
    if not data:
        return True
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return True


def deliver(client: redis.Redis, keys: Keys, task_ids: Iterable[str], line: dict[str, Any]) -> int:
    """The receiver's side: queue ``line`` for the relay of each agent task in ``task_ids`` (one round trip;
    each list keeps its newest :attr:`Keys.INBOX_MAX_LINES` and expires :attr:`Keys.INBOX_TTL_S` after its
    last line). Returns how many tasks it was queued for."""
    ids = list(task_ids)
    if not ids:
        return 0
    raw = json.dumps(line, ensure_ascii=False)
    p = client.pipeline(transaction=False)
    for task_id in ids:
        key = keys.inbox(task_id)
        p.rpush(key, raw)
        p.ltrim(key, -keys.INBOX_MAX_LINES, -1)
        p.expire(key, keys.INBOX_TTL_S)
    p.execute()
    return len(ids)


class TrackerRelay:
    """Moves the lines queued for one agent task (``{ns}:agent:<task_id>:inbox``) into its inbox file."""

    def __init__(self, client: redis.Redis, keys: Keys, task_id: str, path: Path, poll_s: float = RELAY_POLL_S) -> None:
        self.client, self.key, self.path, self.poll_s = client, keys.inbox(task_id), path, poll_s
        self.moved = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> TrackerRelay:
        self._thread = threading.Thread(target=self._run, name="factory-inbox-relay", daemon=True)
        self._thread.start()
        return self

    def drain(self) -> int:
        """Move what waits now (in batches of RELAY_BATCH, each taken off the list atomically); how many lines."""
        moved = 0
        while True:
            p = self.client.pipeline(transaction=True)
            p.lrange(self.key, 0, RELAY_BATCH - 1)
            p.ltrim(self.key, RELAY_BATCH, -1)
            raw, _ = p.execute()
            entries = []
            for item in raw:
                try:
                    value = json.loads(item)
                except ValueError:
                    log.warning("inbox relay %s: dropped a line that is not JSON", self.key)
                    continue
                if isinstance(value, dict):
                    entries.append(value)
            if not append(self.path, entries):  # the dispatch removed its inbox: nothing is written any more
                log.warning("inbox relay %s: the inbox %s is gone; the relay stops", self.key, self.path)
                self._stop.set()
                return moved
            moved += len(entries)
            if len(raw) < RELAY_BATCH:
                self.moved += moved
                return moved

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.drain()
            except (redis.RedisError, OSError) as exc:
                log.warning("inbox relay %s: %s; trying again", self.key, exc)

    def close(self) -> None:
        """Stop, after moving what waits now; then forget the list (nobody reads it any more)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.drain()
            self.client.delete(self.key)
        except (redis.RedisError, OSError) as exc:
            log.warning("inbox relay %s: could not drain it at the end: %s", self.key, exc)


class _Thread(Protocol):
    """What :class:`AgentInbox` needs of a Slack conversation (:class:`~.slack.Conversation`)."""

    def post(self, text: str) -> None: ...

    def close(self, final: str | None = None) -> None: ...


class AgentInbox:
    """One dispatch's ``FACTORY_INBOX`` file and what feeds it: its Slack thread's watcher and / or the relay
    of tracker comments (either may be None)."""

    def __init__(self, path: Path, conversation: _Thread | None = None, relay: TrackerRelay | None = None) -> None:
        self.inbox, self.conversation, self.relay = path, conversation, relay

    def post(self, text: str) -> None:
        """Post ``text`` in the dispatch's Slack thread, when it has one."""
        if self.conversation is not None:
            self.conversation.post(text)

    def close(self, final: str | None = None) -> None:
        """No line is appended after this returns; then ``final`` is posted in the Slack thread."""
        if self.relay is not None:
            self.relay.close()
        if self.conversation is not None:
            self.conversation.close(final)


__all__ = ["AgentInbox", "InboxSource", "TrackerRelay", "append", "deliver", "entry", "inbox_line"]
