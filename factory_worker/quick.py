"""``kill-loop``'s first effect, written before the CLI imports anything heavy.

The full command imports redis-py, pydantic and click first: about half a second on a small machine before
it could write anything. An operator stopping a runaway loop should not wait for that (issue 8: effective
within 0.15 s of the command's start). So when the settings are plain enough to read without pydantic
(:func:`plain_target`: environment variables only, a ``redis://`` URL, no config file and no ``*_FILE``), this
module connects with the standard library, judges the heartbeat with :mod:`.heartbeat` (the functions the
full command uses) and, when the loop is live, writes the kill record (:func:`kill_record`, the one
``control.set_kill`` writes). The full command then does the rest (revoke, end the run, release agents,
notify) for that kill and reports it. In every other case, or on any error, nothing is written here and
the full command does everything, as before. Standard library only.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import unquote, urlsplit

from . import heartbeat
from .keys import NAMESPACE_PATTERN, Keys
from .urls import DEFAULT_REDIS_URL

log = logging.getLogger(__name__)

#: How long the early kill may wait for Redis before it leaves everything to the full command.
CONNECT_TIMEOUT_S = 1.0
_FLAGS = {"--force", "--release-agents", "--json"}


def who() -> str:
    """``user@host:pid`` of the operator (or process) acting."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = os.environ.get("USER", "unknown")
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def kill_record(run_id: str | None, by: str, at_ms: int, reason: str = "kill-loop") -> dict[str, str]:
    """The ``kill`` hash's fields (``control.LoopControl.set_kill`` writes the same)."""
    return {"run_id": run_id or "", "by": by, "at_ms": str(at_ms), "reason": reason}


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    keys: Keys
    stale_after_s: float


@dataclass(frozen=True)
class EarlyKill:
    """A kill written by :func:`kill_first`: the run it names and who killed it."""

    run_id: str
    by: str
    at_ms: int


def is_kill(argv: Sequence[str]) -> bool:
    """``[-v] kill-loop [--force] [--release-agents] [--json]`` and nothing else (help, typos: the full CLI)."""
    args = list(argv)
    if args[:1] in (["-v"], ["--verbose"]):
        args = args[1:]
    return args[:1] == ["kill-loop"] and all(a in _FLAGS for a in args[1:])


def plain_target(environ: Mapping[str, str], cwd: Path) -> Target | None:
    """Where the ledger is, when the settings say it plainly: else None (the full settings decide)."""
    if environ.get("FACTORY_CONFIG") or (cwd / "factory.toml").exists() or environ.get("FACTORY_LOOP"):
        return None
    if any(k.startswith("FACTORY_") and k.endswith("_FILE") for k in environ):
        return None
    namespace = environ.get("FACTORY_NAMESPACE", "factory")
    if not (1 <= len(namespace) <= 64 and NAMESPACE_PATTERN.fullmatch(namespace)):
        return None
    try:
        stale = float(environ.get("FACTORY_LOOP__STALE_AFTER_S", heartbeat.DEFAULT_STALE_AFTER_S))
        url = urlsplit(environ.get("FACTORY_REDIS_URL", DEFAULT_REDIS_URL))  # "" is an error, not the default
        if url.scheme != "redis" or url.query or url.fragment or not url.hostname or not stale > 0:
            return None
        db = int(url.path.strip("/") or 0)
        return Target(url.hostname, url.port or 6379, db, unquote(url.username) if url.username else None,
                      unquote(url.password) if url.password is not None else None, Keys(namespace), stale)
    except ValueError:
        return None


class _Resp:
    """The few RESP2 commands the early kill sends, pipelined on one socket."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def pipeline(self, *commands: Sequence[Any]) -> list[Any]:
        out = bytearray()
        for cmd in commands:
            out += b"*%d\r\n" % len(cmd)
            for arg in cmd:
                data = arg if isinstance(arg, bytes) else str(arg).encode()
                out += b"$%d\r\n%s\r\n" % (len(data), data)
        self.sock.sendall(out)
        return [self._reply() for _ in commands]

    def _reply(self) -> Any:
        line = self.file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RuntimeError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise ConnectionError(f"unexpected reply {line[:20]!r}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def kill_first(argv: Sequence[str], environ: Mapping[str, str] | None = None,
               cwd: Path | None = None) -> EarlyKill | None:
    """For a ``kill-loop`` command on plain settings with a live loop: write the kill now and say so.
    None (nothing written) in every other case, for the full command to decide."""
    if not is_kill(argv):
        return None
    target = plain_target(os.environ if environ is None else environ, cwd or Path.cwd())
    if target is None:
        return None
    try:
        conn = _Resp(target.host, target.port, CONNECT_TIMEOUT_S)
    except OSError:
        return None
    try:
        setup: list[list[Any]] = []
        if target.password is not None:
            setup.append(["AUTH", *([target.username] if target.username else []), target.password])
        if target.db:
            setup.append(["SELECT", target.db])
        *_, raw, (sec, usec) = conn.pipeline(*setup, ["GET", target.keys.heartbeat], ["TIME"])
        now_ms = int(sec) * 1000 + int(usec) // 1000
        live = heartbeat.liveness(heartbeat.parse(raw), now_ms, target.stale_after_s)
        if not live.live or live.heartbeat is None:
            return None
        by = who()
        fields = kill_record(live.heartbeat.run_id, by, now_ms)
        conn.pipeline(["HSET", target.keys.kill, *(x for kv in fields.items() for x in kv)])
        return EarlyKill(live.heartbeat.run_id, by, now_ms)
    except Exception as exc:  # noqa: BLE001 - never in the way: the full command decides and reports
        log.debug("early kill not written (%s); the full command decides", exc)
        return None
    finally:
        conn.close()
