"""Redis and broker URLs: the schemes factory_worker accepts, Sentinel URLs parsed, and passwords masked for display.

No Redis or kombu import here: the settings validate URLs with it, and the CLI imports it cheaply.

``sentinel://[[user]:password@]host[:port][,host[:port]...]/<master>[/<db>][?sentinel_password=...]``
names a Redis Sentinel deployment: the sentinels to ask (port 26379 by default), the master's service name
and the database. The password is the master's (and replicas'); the sentinels' own password, when they
have one, is ``sentinel_password``.

The broker (``FACTORY_BROKER_URL``) may also be RabbitMQ: ``amqp://user:password@host:5672/<vhost>`` or
``amqps://`` (TLS), served by kombu's py-amqp transport; the ledger stays on Redis (:func:`validate_broker`).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

#: The ledger's Redis when ``FACTORY_REDIS_URL`` is not set.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://")
#: RabbitMQ broker URLs (the broker only: the ledger needs Redis).
AMQP_SCHEMES = ("amqp://", "amqps://")
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``sentinel://`` URL."""

    hosts: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    def kombu_url(self) -> str:
        """The broker URL kombu's sentinel transport reads: one ``sentinel://`` URL per sentinel, joined by
        ``;`` (the master's name goes in the transport options, see :meth:`transport_options`)."""
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:{self.password}@"
        return ";".join(f"sentinel://{auth}{h}:{p}/{self.db}" for h, p in self.hosts)

    def transport_options(self) -> dict[str, object]:
        opts: dict[str, object] = {"master_name": self.master}
        if self.sentinel_password is not None:
            opts["sentinel_kwargs"] = {"password": self.sentinel_password}
        return opts


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse a ``sentinel://`` URL; ValueError saying what is wrong otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "sentinel":
        raise ValueError(f"not a sentinel:// URL: {mask_url(url)}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if sep else None
    hosts = []
    for item in hostlist.split(","):
        host, sep, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        if not host:
            raise ValueError(f"sentinel URL needs host[:port] entries separated by commas, got {item!r}")
        if sep and not port.isdigit():
            raise ValueError(f"sentinel URL has a bad port in {item!r}")
        hosts.append((host, int(port) if port else SENTINEL_PORT))
    segments = [s for s in parts.path.split("/") if s]
    if not segments or len(segments) > 2:
        raise ValueError("sentinel URL needs the master's name as its path: sentinel://host:26379/<master>[/<db>]")
    if len(segments) == 2 and not segments[1].isdigit():
        raise ValueError(f"sentinel URL database must be a number, got {segments[1]!r}")
    query = dict(parse_qsl(parts.query))
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise ValueError(f"sentinel URL has unknown parameter(s): {', '.join(sorted(unknown))}")
    return SentinelURL(
        tuple(hosts),
        unquote(segments[0]),
        int(segments[1]) if len(segments) == 2 else 0,
        username,
        password,
        query.get("sentinel_password"),
    )


def validate(url: str) -> str:
    """``url`` when factory_worker can use it; ValueError with a one-line reason otherwise."""
    if not url.startswith(SCHEMES):
        raise ValueError("must start with redis://, rediss://, unix:// or sentinel://")
    if url.startswith("sentinel://"):
        parse_sentinel_url(url)
        return url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"bad URL: {exc}") from None
    if any(k.lower() == "protocol" and v.strip() not in ("", "2") for k, v in parse_qsl(parts.query)):
        # RESP3 changes the shape of replies every reader parses (XREADGROUP becomes a map, HGETALL...)
        raise ValueError("protocol=3 (RESP3) is not supported: the ledger reads RESP2 replies; remove ?protocol=")
    return url


def is_amqp(url: str) -> bool:
    """``url`` names a RabbitMQ broker (``amqp://``, ``amqps://``)."""
    return url.startswith(AMQP_SCHEMES)


def validate_broker(url: str) -> str:
    """A broker URL: one the ledger would take (:func:`validate`), or RabbitMQ's ``amqp://`` / ``amqps://``;
    ValueError with a one-line reason otherwise."""
    if not is_amqp(url):
        if not url.startswith(SCHEMES):
            raise ValueError("must start with redis://, rediss://, unix://, sentinel://, amqp:// or amqps://")
        return validate(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"bad URL: {exc}") from None
    if not parts.hostname:
        raise ValueError("an amqp:// URL needs a host: amqp://user:password@host:5672/<vhost>")
    return url


def mask_url(url: str) -> str:
    """``url`` with every password replaced by ``***``: the userinfo form (``redis://:pw@h``,
    ``redis://user:pw@h``) and the query form (``redis://h?password=pw``, ``unix:///s.sock?password=pw``,
    ``sentinel://...?sentinel_password=pw``). The one masking used wherever a URL is shown."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _pw = userinfo.partition(":")
        netloc = f"{user}{':***' if sep else ''}@{hostport}" if sep else netloc
    query = parse_qsl(parts.query, keep_blank_values=True)
    secret = ("password", "sentinel_password")
    if any(k.lower() in secret for k, _ in query):
        masked = "&".join(f"{k}={'***' if k.lower() in secret else v}" for k, v in query)
    else:
        masked = parts.query
    return urlunsplit(parts._replace(netloc=netloc, query=masked))
