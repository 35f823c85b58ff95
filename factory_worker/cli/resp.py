"""The CLI's early path to Redis: one socket, commands packed by hiredis (``pack_command``), replies parsed by
``hiredis.Reader`` (an error reply as a ``hiredis.ReplyError`` value, bulk strings as bytes: the shapes
:mod:`factory_worker.ledger.records` reads). Standard library and hiredis only.

:func:`connect` opens what a URL names as redis-py would (the full CLI's client): ``redis://`` and ``unix://``
(user, password, database from the path or ``?db=``, ``?password=``), and ``sentinel://`` (the first sentinel
that names the master, up and not down, then the master). It raises :class:`Unsupported` for what this path
does not do (``rediss://``, query options beyond timeouts): the full CLI then connects with redis-py.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import hiredis

from factory_worker.config.urls import parse_sentinel_url

#: Query options of a ``redis://`` / ``unix://`` URL this path honours or may ignore (timeouts: its own).
_QUERY = frozenset(
    {"db", "password", "username", "protocol", "socket_timeout", "socket_connect_timeout", "health_check_interval"}
    | {"retry_on_timeout", "socket_keepalive", "client_name", "max_connections", "timeout"}
)


class Unsupported(Exception):
    """A URL form this path leaves to the full CLI."""


class Conn:
    """One Redis connection; :meth:`pipeline` sends commands in one round trip."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = hiredis.Reader()

    def pipeline(self, *commands: Sequence[Any]) -> list[Any]:
        """The replies to ``commands`` in order (an error reply as a ``hiredis.ReplyError`` value)."""
        self.sock.sendall(b"".join(hiredis.pack_command(tuple(c)) for c in commands))
        out: list[Any] = []
        while len(out) < len(commands):
            reply = self.reader.gets()
            if reply is False:  # not a whole reply yet
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("connection closed")
                self.reader.feed(data)
                continue
            out.append(reply)
        return out

    def send(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """:meth:`pipeline` as a :data:`factory_worker.loop.status.Sender`."""
        return self.pipeline(*commands)

    def close(self) -> None:
        self.sock.close()


def _checked(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, Exception):
            raise ConnectionError(f"Redis refused: {reply}")
    return replies


def _open(address: str | tuple[str, int], timeout: float) -> Conn:
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection(address, timeout=timeout)
    return Conn(sock)


def _login(conn: Conn, username: str | None, password: str | None, db: int) -> Conn:
    setup: list[list[Any]] = []
    if password is not None:
        setup.append(["AUTH", *([username] if username else []), password])
    if db:
        setup.append(["SELECT", db])
    try:
        if setup:
            _checked(conn.pipeline(*setup))
        return conn
    except BaseException:
        conn.close()
        raise


@dataclass(frozen=True)
class Endpoint:
    """Where a ``redis://`` / ``unix://`` URL points, read as redis-py's ``parse_url`` reads it: the userinfo's
    password over ``?password=``, ``?db=`` over the path's database (a path that is not a number: database 0)."""

    address: str | tuple[str, int]  # a socket path, or (host, port)
    username: str | None = None
    password: str | None = None
    db: int = 0

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlparse(url)
        if parts.scheme not in ("redis", "unix"):
            raise Unsupported(parts.scheme)
        query = {k: v[0] for k, v in parse_qs(parts.query).items() if v}
        if set(query) - _QUERY:
            raise Unsupported(f"URL options {sorted(set(query) - _QUERY)}")
        db = 0
        if "db" in query:
            db = int(query["db"])
        elif parts.scheme == "redis" and parts.path:
            try:
                db = int(unquote(parts.path).replace("/", ""))
            except ValueError:
                pass
        if parts.scheme == "unix":
            address: str | tuple[str, int] = unquote(parts.path)
        else:
            address = (unquote(parts.hostname) if parts.hostname else "localhost", parts.port or 6379)
        return cls(
            address,
            unquote(parts.username) if parts.username else query.get("username"),
            unquote(parts.password) if parts.password else query.get("password"),
            db,
        )


def connect(url: str, timeout: float) -> Conn:
    """A connection to the Redis ``url`` names, authenticated and on its database; OSError / ConnectionError
    when that fails, :class:`Unsupported` for a form left to the full CLI."""
    if url.startswith("sentinel://"):
        return _sentinel(url, timeout)
    at = Endpoint.parse(url)
    return _login(_open(at.address, timeout), at.username, at.password, at.db)


def _sentinel(url: str, timeout: float) -> Conn:
    """The master the first answering sentinel names (as redis-py's ``Sentinel.discover_master``: flagged
    master, neither subjectively nor objectively down)."""
    target = parse_sentinel_url(url)
    errors = []
    for host, port in target.hosts:
        try:
            conn = _login(_open((host, port), timeout), None, target.sentinel_password, 0)
        except OSError as exc:
            errors.append(f"{host}:{port}: {exc}")
            continue
        try:
            reply = conn.pipeline(["SENTINEL", "MASTER", target.master])[0]
        except OSError as exc:
            errors.append(f"{host}:{port}: {exc}")
            continue
        finally:
            conn.close()
        if isinstance(reply, Exception) or not isinstance(reply, list):
            errors.append(f"{host}:{port}: {reply}")
            continue
        state = {k.decode(): v.decode() for k, v in zip(reply[::2], reply[1::2])}
        flags = set(state.get("flags", "").split(","))
        if "master" not in flags or flags & {"s_down", "o_down"}:
            errors.append(f"{host}:{port}: master {target.master} is {state.get('flags')}")
            continue
        master = _open((state["ip"], int(state["port"])), timeout)
        return _login(master, target.username, target.password, target.db)
    raise ConnectionError(f"no sentinel names master {target.master}: {'; '.join(errors) or 'no sentinels'}")
