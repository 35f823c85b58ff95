"""One way to get a Redis client from settings: redis:// and unix:// URLs, with a password."""

from __future__ import annotations

import pytest
import redis

from factory_worker.config.settings import load_settings
from factory_worker.ledger.core import Ledger
from factory_worker.ledger.redis_client import client
from factory_worker.ops.embedded import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    d = tmp_path_factory.mktemp("secured")
    sock = d / "redis.sock"
    server = RedisServer(d, extra=["--unixsocket", str(sock), "--unixsocketperm", "700"], password="s3cret")
    server.start()
    yield server, sock
    server.stop()


def test_tcp_url_with_password(secured):
    server, _ = secured
    s = load_settings(redis_url=f"redis://:s3cret@127.0.0.1:{server.port}/2")
    r = client(s)
    assert r.ping() and r.connection_pool.connection_kwargs["db"] == 2
    assert Ledger.from_settings(s, r).claim(["a"]).claims


def test_unix_socket_url_with_password(secured):
    _, sock = secured
    s = load_settings(redis_url=f"unix://:s3cret@{sock}?db=1")
    r = client(s)
    assert r.ping()
    assert Ledger.from_settings(s, r).claim(["b"]).claims


def test_wrong_password_is_an_error_not_a_hang(secured):
    server, _ = secured
    r = client(load_settings(redis_url=f"redis://:wrong@127.0.0.1:{server.port}/0"))
    with pytest.raises(redis.AuthenticationError):
        r.ping()


def test_rediss_and_bad_schemes(secured):
    assert (
        client(load_settings(redis_url="rediss://:pw@example.invalid:6380/0")).connection_pool.connection_class
        is redis.SSLConnection
    )
    from factory_worker.config.settings import ConfigError

    with pytest.raises(ConfigError, match="redis_url"):
        load_settings(redis_url="http://localhost:6379")
