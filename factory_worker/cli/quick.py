"""``kill-loop``'s first effect and ``loop-status``'s answer, before the CLI imports anything heavy.

The full command imports redis-py, pydantic and click first: about half a second on a small machine before
it could write anything. An operator stopping a runaway loop should not wait for that (issue 8: effective
within 0.15 s of the command's start). So when the settings are plain enough to read without pydantic
(:func:`plain_target`: environment variables only, a ``redis://`` URL, no config file and no ``*_FILE``), this
module connects with the standard library, judges the heartbeat with :mod:`.heartbeat` (the functions the
full command uses) and, when the loop is live, writes the kill record (:func:`kill_record`, the one
``control.set_kill`` writes). The full command then does the rest (revoke, end the run, release agents,
notify) for that kill and reports it. ``loop-status`` is answered here whole (:func:`status_first`: the same
reader, :func:`.status.read`, the full command uses; text without rich, colours as plain ANSI on a
terminal). In every other case, or on any error, nothing is written or printed here and the full command
does everything, as before. Standard library only.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from factory_worker.cli.text import one_line, ts
from factory_worker.config.defaults import DEFAULT_STALE_AFTER_S
from factory_worker.config.urls import DEFAULT_REDIS_URL, mask_url
from factory_worker.config.urls import validate as validate_url
from factory_worker.ledger import records
from factory_worker.ledger.keys import NAMESPACE_PATTERN, Keys
from factory_worker.loop import heartbeat, status
from factory_worker.loop.kill import EarlyKill, kill_record, who

log = logging.getLogger(__name__)

#: How long the early kill may wait for Redis before it leaves everything to the full command.
CONNECT_TIMEOUT_S = 1.0
_FLAGS = {"--force", "--release-agents", "--json"}
#: The only settings ``loop-status`` may have to be answered early (:func:`status_first`).
STATUS_SETTINGS = frozenset({"FACTORY_REDIS_URL", "FACTORY_NAMESPACE"})


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    keys: Keys
    stale_after_s: float
    url: str


def _command(argv: Sequence[str], name: str, flags: set[str]) -> bool:
    args = list(argv)
    if args[:1] in (["-v"], ["--verbose"]):
        args = args[1:]
    return args[:1] == [name] and all(a in flags for a in args[1:])


def is_kill(argv: Sequence[str]) -> bool:
    """``[-v] kill-loop [--force] [--release-agents] [--json]`` and nothing else (help, typos: the full CLI)."""
    return _command(argv, "kill-loop", _FLAGS)


def is_status(argv: Sequence[str]) -> bool:
    """``[-v] loop-status [--json]`` and nothing else."""
    return _command(argv, "loop-status", {"--json"})


def plain_target(environ: Mapping[str, str], cwd: Path | None = None) -> Target | None:
    """Where the ledger is, when the settings say it plainly: else None (the full settings decide).

    The full loader reads environment names in any case (``factory_namespace``): a setting spelt otherwise
    than in capitals leaves everything to it, so both paths always mean the same loop."""
    if any(k.upper().startswith("FACTORY_") and not k.startswith("FACTORY_") for k in environ):
        return None
    try:
        cwd = cwd or Path.cwd()
        if environ.get("FACTORY_CONFIG") or (cwd / "factory.toml").exists() or environ.get("FACTORY_LOOP"):
            return None
    except OSError:  # a working directory that is gone: the full loader reports it
        return None
    if any(k.startswith("FACTORY_") and k.endswith("_FILE") for k in environ):
        return None
    namespace = environ.get("FACTORY_NAMESPACE", "factory")
    if not (1 <= len(namespace) <= 64 and NAMESPACE_PATTERN.fullmatch(namespace)):
        return None
    try:
        stale = float(environ.get("FACTORY_LOOP__STALE_AFTER_S", DEFAULT_STALE_AFTER_S))
        text = environ.get("FACTORY_REDIS_URL", DEFAULT_REDIS_URL)  # "" is an error, not the default
        url = urlsplit(validate_url(text))  # the full loader's own check, then only plain redis:// URLs
        if not text.startswith("redis://") or url.query or url.fragment or not url.hostname or not stale > 0:
            return None
        db = int(url.path.strip("/") or 0)
        return Target(
            url.hostname,
            url.port or 6379,
            db,
            unquote(url.username) if url.username else None,
            unquote(url.password) if url.password is not None else None,
            Keys(namespace),
            stale,
            text,
        )
    except ValueError:
        return None


class RespError(Exception):
    """An error reply."""


class _Resp:
    """The few RESP2 commands the early kill sends, pipelined on one socket."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def pipeline(self, *commands: Sequence[Any]) -> list[Any]:
        """Send ``commands`` in one round trip; their replies (an error reply as a :class:`RespError` value)."""
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
            return RespError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError("connection closed mid-reply")
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise ConnectionError(f"unexpected reply {line[:20]!r}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def kill_first(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, cwd: Path | None = None
) -> EarlyKill | None:
    """For a ``kill-loop`` command on plain settings with a live loop: write the kill now and say so.
    None (nothing written) in every other case, for the full command to decide."""
    if not is_kill(argv):
        return None
    target = plain_target(os.environ if environ is None else environ, cwd)
    conn = _connect(target)
    if target is None or conn is None:
        return None
    try:
        raw, time_reply = records.raise_errors(conn.pipeline(["GET", target.keys.heartbeat], ["TIME"]))
        live = heartbeat.judge(raw, time_reply, target.stale_after_s)
        if not live.live or live.heartbeat is None:
            return None
        by = who()
        now_ms = records.time_ms(time_reply)
        fields = kill_record(live.heartbeat.run_id, by, now_ms)
        records.raise_errors(conn.pipeline(["HSET", target.keys.kill, *(x for kv in fields.items() for x in kv)]))
        return EarlyKill(live.heartbeat.run_id, by, now_ms, target.keys.namespace, target.url)
    except Exception as exc:
        log.debug("early kill not written (%s); the full command decides", exc)
        return None
    finally:
        conn.close()


def _connect(target: Target | None) -> _Resp | None:
    """A connection to ``target``, authenticated and on its database; None when that fails."""
    if target is None:
        return None
    try:
        conn = _Resp(target.host, target.port, CONNECT_TIMEOUT_S)
    except Exception:
        return None
    setup: list[list[Any]] = []
    if target.password is not None:
        setup.append(["AUTH", *([target.username] if target.username else []), target.password])
    if target.db:
        setup.append(["SELECT", target.db])
    try:
        if setup:
            records.raise_errors(conn.pipeline(*setup))
        return conn
    except Exception:
        conn.close()
        return None


_ANSI = {"bold": "1", "red": "31", "yellow": "33"}


def status_first(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, cwd: Path | None = None, out: Any = None
) -> int | None:
    """For a ``loop-status`` command whose only settings are ``FACTORY_REDIS_URL`` and ``FACTORY_NAMESPACE``
    (any other setting could be invalid, and the full command must then say so: exit 2): print its answer
    and return its exit code (0 live, 1 not). None (nothing printed) in every other case."""
    environ = os.environ if environ is None else environ
    if not is_status(argv) or any(k.startswith("FACTORY_") and k not in STATUS_SETTINGS for k in environ):
        return None
    target = plain_target(environ, cwd)
    conn = _connect(target)
    if target is None or conn is None:
        return None
    try:
        data, code = status.read(
            lambda cmds: conn.pipeline(*cmds), target.keys, target.stale_after_s, False, mask_url(target.url)
        )
    except Exception as exc:
        log.debug("early loop-status not answered (%s); the full command answers", exc)
        return None
    finally:
        conn.close()
    out = out or sys.stdout
    try:
        if "--json" in argv:
            text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
        else:
            colour = out.isatty() and not environ.get("NO_COLOR")
            style = (lambda t, tag: f"\x1b[{_ANSI[tag]}m{t}\x1b[0m") if colour else (lambda t, tag: t)
            text = "".join(line + "\n" for line in status.lines(data, style, one_line, ts))
        _write(out, text)
    except Exception as exc:
        print(f"factory-worker: error: cannot write the answer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return code


def _write(out: Any, text: str) -> None:
    """``text`` to ``out``; what its encoding cannot show is written as escapes, never an error."""
    encoding = getattr(out, "encoding", None) or "utf-8"
    buffer = getattr(out, "buffer", None)
    if buffer is not None:
        out.flush()
        buffer.write(text.encode(encoding, "backslashreplace"))
        buffer.flush()
    else:
        out.write(text)
