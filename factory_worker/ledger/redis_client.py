"""One way to get a Redis client from settings: redis://, rediss://, unix:// or sentinel:// (see
:mod:`factory_worker.config.urls`), with the password in the URL."""

from __future__ import annotations

import redis
from redis.sentinel import Sentinel

from factory_worker.config.settings import Settings
from factory_worker.config.urls import mask_url, parse_sentinel_url
from factory_worker.ledger.records import time_ms

__all__ = ["SOCKET_TIMEOUT_S", "client", "client_from_url", "mask_url", "server_now_ms"]

#: Socket timeouts keep the CLI and the loop from hanging on a dead server.
SOCKET_TIMEOUT_S = 5.0


def client_from_url(url: str, **kwargs: object) -> redis.Redis:
    """A ``decode_responses`` client for ``url`` with bounded timeouts and health checks."""
    opts: dict[str, object] = {
        "decode_responses": True,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": SOCKET_TIMEOUT_S,
        "health_check_interval": 30,
        "retry_on_timeout": False,
    }
    opts.update(kwargs)
    if url.startswith("sentinel://"):
        return _sentinel_client(url, opts)
    return redis.Redis.from_url(url, **opts)


def _sentinel_client(url: str, opts: dict[str, object]) -> redis.Redis:
    """A client of the master that the sentinels name; after a failover its connections fail once and
    reconnect to the new master (redis-py's ``SentinelConnectionPool`` asks the sentinels again)."""
    target = parse_sentinel_url(url)
    sentinel_kwargs: dict[str, object] = {
        "socket_timeout": opts["socket_timeout"],
        "socket_connect_timeout": opts["socket_connect_timeout"],
    }
    if target.sentinel_password is not None:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinels = Sentinel(list(target.hosts), sentinel_kwargs=sentinel_kwargs)
    return sentinels.master_for(
        target.master, redis_class=redis.Redis, db=target.db, username=target.username, password=target.password, **opts
    )


def client(settings: Settings, **kwargs: object) -> redis.Redis:
    """The ledger's Redis client for ``settings``."""
    return client_from_url(settings.effective_redis_url, **kwargs)


def server_now_ms(r: redis.Redis) -> int:
    """Redis server time in ms: the one clock every worker shares."""
    return time_ms(r.time())
