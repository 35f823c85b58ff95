"""One way to get a Redis client from settings: redis://, rediss://, unix://, with password in the URL."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis

from .config import Settings

#: Socket timeouts keep the CLI and the loop from hanging on a dead server.
SOCKET_TIMEOUT_S = 5.0


def mask_url(url: str) -> str:
    """``url`` with every password replaced by ``***``: the userinfo form (``redis://:pw@h``,
    ``redis://user:pw@h``) and the query form (``redis://h?password=pw``, ``unix:///s.sock?password=pw``).
    The one masking used wherever a URL is shown (loop-status, doctor, up, metrics)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _pw = userinfo.partition(":")
        netloc = f"{user}{':***' if sep else ''}@{hostport}" if sep else netloc
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k.lower() == "password" for k, _ in query):
        masked = "&".join(f"{k}={'***' if k.lower() == 'password' else v}" for k, v in query)
    else:
        masked = parts.query
    return urlunsplit(parts._replace(netloc=netloc, query=masked))


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
    return redis.Redis.from_url(url, **opts)


def client(settings: Settings, **kwargs: object) -> redis.Redis:
    """The ledger's Redis client for ``settings``."""
    return client_from_url(settings.effective_redis_url, **kwargs)


def server_now_ms(r: redis.Redis) -> int:
    """Redis server time in ms: the one clock every worker shares."""
    sec, usec = r.time()
    return int(sec) * 1000 + int(usec) // 1000
