"""The wiring every task, iteration and CLI command shares: settings, Redis, ledger, loop control, source,
the workspace.

Celery-free. :class:`Context` builds each part lazily from :class:`~factory_worker.config.settings.Settings`;
:func:`current` is the one per process (one Redis pool), used by the Celery tasks, the worker bootstep and
the beat scheduler. Settings are never stored in the Celery app's config (its repr would carry secrets
into ``celery inspect conf`` and Flower).
"""

from __future__ import annotations

import logging
import os
import threading
from functools import cached_property
from typing import TYPE_CHECKING, Any

import redis

from factory_worker.config.settings import Settings, load_settings
from factory_worker.ledger.keys import Keys
from factory_worker.ledger.redis_client import client as make_client
from factory_worker.ledger.redis_client import decoded

if TYPE_CHECKING:
    from redis import Redis  # in the class body below, ``redis`` is the property

    from factory_worker.chat.notify import Notifier
    from factory_worker.ledger.core import Ledger
    from factory_worker.loop.control import LoopControl
    from factory_worker.sources import IssueSource
    from factory_worker.workspace import Workspace

log = logging.getLogger(__name__)


class Context:
    """Everything an iteration, an agent task or a CLI command needs, built from settings (lazily)."""

    def __init__(
        self, settings: Settings, redis_client: redis.Redis | None = None, source: IssueSource | None = None
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self._redis = redis_client
        self._source = source

    @cached_property
    def redis(self) -> redis.Redis:
        return self._redis or make_client(self.settings)

    @cached_property
    def broker_redis(self) -> Redis | None:
        """A client of the broker's Redis (the ledger's client when they are one); None for another broker."""
        url = self.settings.effective_broker_url
        if url == self.settings.effective_redis_url:
            return self.redis
        if not url.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
            return None
        from factory_worker.ledger.redis_client import client_from_url

        return client_from_url(url)

    @cached_property
    def ledger(self) -> Ledger:
        from factory_worker.ledger.core import Ledger

        return Ledger(
            self.redis,
            self.keys,
            self.settings.dispatch,
            outbox=self.settings.tracker.write_back,
            budget=self.settings.budget,
        )

    @cached_property
    def control(self) -> LoopControl:
        from factory_worker.loop.control import LoopControl

        return LoopControl(self.redis, self.settings)

    @cached_property
    def notifier(self) -> Notifier:
        from factory_worker.chat.notify import Notifier

        return Notifier.from_settings(self.settings.notify)

    @cached_property
    def workspace(self) -> Workspace:
        """This process's workspace (``workspace.*``; ``enabled`` is False without a repository): one per
        process, as its mirrors' fetches coalesce and its locks are taken per process. A staged attempt's
        worktree is kept between its stages while the attempt's progress still names it."""
        from factory_worker.workspace import Workspace

        return Workspace.from_settings(self.settings, keep_staged=self._staged_attempt_live)

    def _staged_attempt_live(self, name: str, note: dict[str, Any]) -> bool:
        issue = note.get("issue")
        if not isinstance(issue, str) or not issue:
            return False
        return decoded(self.redis.hget(self.keys.stages(issue), "workdir")) == name

    @property
    def source(self) -> IssueSource:
        if self._source is None:
            from factory_worker.sources import load_source

            self._source = load_source(self.settings.source)
        return self._source


_current: Context | None = None
_lock = threading.Lock()


def _forget_in_child() -> None:
    """A forked child (a Celery pool process) builds its own context: the parent's Redis pool and locks may
    have been held by one of the parent's threads (the worker's presence thread) at the moment of the fork,
    and would deadlock the child on first use."""
    global _current, _lock
    _current, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def current() -> Context:
    """The process-wide context (settings loaded once; raises ConfigError on a bad setting)."""
    global _current
    with _lock:
        if _current is None:
            _current = Context(load_settings())
        return _current


def set_current(ctx: Context | None) -> None:
    """Install ``ctx`` as the process-wide context (tests, ``run-once``); None forgets it."""
    global _current
    with _lock:
        _current = ctx
