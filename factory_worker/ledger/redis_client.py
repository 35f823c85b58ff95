"""One way to get a Redis client from settings: redis://, rediss://, unix:// or sentinel:// (see
:mod:`factory_worker.config.urls`), with the password in the URL."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast, overload

import redis
from redis.sentinel import Sentinel
from redis.typing import EncodableT

from factory_worker.config.settings import Settings
from factory_worker.config.urls import mask_url, parse_sentinel_url
from factory_worker.ledger.records import time_ms

__all__ = [
    "SOCKET_TIMEOUT_S",
    "client",
    "client_from_url",
    "decoded",
    "decoded_hash",
    "decoded_members",
    "decoded_scored",
    "hash_mapping",
    "mask_url",
    "server_now_ms",
]

#: Socket timeouts keep the CLI and the loop from hanging on a dead server.
SOCKET_TIMEOUT_S = 5.0


def client_from_url(url: str, **kwargs: object) -> redis.Redis:
    """A ``decode_responses`` client for ``url`` with bounded timeouts and health checks."""
    opts: dict[str, Any] = {
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


def _sentinel_client(url: str, opts: dict[str, Any]) -> redis.Redis:
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


def redis_py_sender(r: redis.Redis) -> Callable[[Sequence[Sequence[Any]]], list[Any]]:
    """A :data:`factory_worker.loop.status.Sender` over a redis-py client: a pipeline without a transaction, in
    one round trip, error replies as values (``execute(raise_on_error=False)``), replies undecoded
    (``NEVER_DECODE``: a stored value that is not UTF-8 reads as malformed, never as an error) but shaped by
    redis-py's response callbacks (``TIME`` a tuple, ``HGETALL`` a dict, ``SCAN`` a pair, ``INFO`` a dict), which
    the readers of :mod:`factory_worker.ledger.records` take as well as raw replies. A pooled connection that a
    Redis restart broke is replaced once: the commands only read, so sending them again is safe."""

    def once(commands: Sequence[Sequence[Any]]) -> list[Any]:
        pipe = r.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command, NEVER_DECODE=True)
        return pipe.execute(raise_on_error=False)

    def send(commands: Sequence[Sequence[Any]]) -> list[Any]:
        try:
            return once(commands)
        except (redis.ConnectionError, redis.TimeoutError):
            return once(commands)

    return send


# -- replies ------------------------------------------------------------------------------------------------
# Every client of this package decodes its replies (``decode_responses=True``: above, the embedded server's,
# the tests' fakeredis): a reply is ``str``, never ``bytes``. redis-py types a reply by its command alone
# (``bytes | str``), whatever the client decodes; these say what ours are. For the type checker only: no
# conversion, no copy (a client that did not decode would hand bytes through them unchanged).


@overload
def decoded(reply: bytes | str) -> str: ...
@overload
def decoded(reply: bytes | str | None) -> str | None: ...
def decoded(reply: bytes | str | None) -> str | None:
    """A string reply (``GET``, ``HGET``...) of a decoding client."""
    return cast("str | None", reply)


def decoded_hash(reply: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """An ``HGETALL`` reply of a decoding client."""
    return cast("dict[str, str]", reply)


@overload
def decoded_members(reply: set[bytes | str]) -> set[str]: ...
@overload
def decoded_members(reply: list[Any]) -> list[str]: ...
def decoded_members(reply: set[bytes | str] | list[Any]) -> set[str] | list[str]:
    """A set or list reply (``SMEMBERS``, ``HKEYS``, ``ZRANGE`` without scores...) of a decoding client. A
    list is ``list[Any]`` here: redis-py types ``ZRANGE``'s reply with and without scores as one union."""
    return cast("set[str] | list[str]", reply)


def decoded_scored(reply: list[Any]) -> list[tuple[str, float]]:
    """A ``ZRANGE``/``ZRANGEBYSCORE ... WITHSCORES`` reply (RESP2, the default score cast) of a decoding client:
    (member, score) pairs. redis-py types the reply of both forms as one union, whichever was asked for."""
    return cast("list[tuple[str, float]]", reply)


def hash_mapping(fields: Mapping[str, EncodableT]) -> Mapping[EncodableT, EncodableT]:
    """``fields`` as ``hset(..., mapping=)`` takes them. Its parameter is a ``Mapping`` (invariant in the key)
    of ``EncodableT`` keys, which a ``dict[str, str]`` variable does not match; a dict literal does."""
    return cast("Mapping[EncodableT, EncodableT]", fields)
