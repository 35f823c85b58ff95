"""The recovery commands before the CLI imports anything heavy: ``loop-status``, ``pause`` and ``resume`` answered
whole, ``kill-loop``'s kill written first.

The full command imports redis-py, pydantic and click first: about half a second on a small machine before it
could write anything. An operator stopping a runaway loop should not wait for that, nor be refused for a setting
that has nothing to do with it (issues 8 and 21: effective within 0.15 s of the command's start, whatever the
other settings say). So this module reads only the settings these commands use, from wherever users put them
(:mod:`factory_worker.config.essentials`: the environment, ``*_FILE``, the TOML file), connects with hiredis
(:mod:`.resp`: ``redis://``, ``unix://``, ``sentinel://``), and

- ``loop-status``: answers with the reader the full command uses (:func:`factory_worker.loop.status.read`; text
  without rich, colours as plain ANSI on a terminal);
- ``pause`` / ``resume``: writes or clears the pause record (what ``LoopControl.set_paused`` writes);
- ``kill-loop``: when the loop is live (or ``--force``), writes the kill record (:func:`kill_record`, the one
  ``control.set_kill`` writes); the full command then does the rest (revoke, end the run, release agents,
  notify) for that kill and reports it.

In every other case (another command, a bad setting of these, a URL form :mod:`.resp` leaves to redis-py, any
error) nothing is written or printed here and the full command does everything. Standard library and hiredis
only (the import contract in ``pyproject.toml`` holds it).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from factory_worker.cli import resp
from factory_worker.cli.text import one_line, ts
from factory_worker.config import essentials
from factory_worker.config.trust import ConfigError
from factory_worker.ledger import records
from factory_worker.ledger.keys import Keys
from factory_worker.loop import heartbeat, status
from factory_worker.loop.kill import EarlyKill, kill_record, who

log = logging.getLogger(__name__)

#: How long the early path may wait for Redis before it leaves everything to the full command.
CONNECT_TIMEOUT_S = 1.0
_KILL_FLAGS = {"--force", "--release-agents", "--json"}


def _command(argv: Sequence[str], name: str, flags: set[str]) -> bool:
    args = list(argv)
    if args[:1] in (["-v"], ["--verbose"]):
        args = args[1:]
    return args[:1] == [name] and all(a in flags for a in args[1:])


def is_kill(argv: Sequence[str]) -> bool:
    """``[-v] kill-loop [--force] [--release-agents] [--json]`` and nothing else (help, typos: the full CLI)."""
    return _command(argv, "kill-loop", _KILL_FLAGS)


def is_status(argv: Sequence[str]) -> bool:
    """``[-v] loop-status [--json]`` and nothing else."""
    return _command(argv, "loop-status", {"--json"})


def target(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> essentials.Essentials | None:
    """The recovery commands' settings; None when one of them is bad (the full command says which: exit 2)."""
    try:
        return essentials.read(os.environ if environ is None else environ, cwd)
    except (ConfigError, OSError) as exc:
        log.debug("early path not taken (%s); the full command decides", exc)
        return None


def _connect(e: essentials.Essentials | None) -> resp.Conn | None:
    """A connection to ``e``'s Redis, authenticated and on its database; None when that fails."""
    if e is None:
        return None
    try:
        return resp.connect(e.redis_url, CONNECT_TIMEOUT_S)
    except (resp.Unsupported, OSError, ValueError) as exc:
        log.debug("early path not taken (%s); the full command decides", exc)
        return None


def kill_first(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, cwd: Path | None = None
) -> EarlyKill | None:
    """For a ``kill-loop`` command whose loop is live (or ``--force``d) and not killed yet: write the kill now and
    say so. None (nothing written) in every other case, for the full command to decide."""
    if not is_kill(argv):
        return None
    e = target(environ, cwd)
    conn = _connect(e)
    if e is None or conn is None:
        return None
    keys = Keys(e.namespace)
    try:
        raw, time_reply, current, killed = records.raise_errors(
            conn.pipeline(["GET", keys.heartbeat], ["TIME"], ["GET", keys.current_run], ["EXISTS", keys.kill])
        )
        live = heartbeat.judge(raw, time_reply, e.stale_after_s)
        if killed or not (live.live or "--force" in argv):
            return None  # already killed, or nothing live: the full command refuses or acts on what is there
        run_id = (live.heartbeat.run_id if live.heartbeat else None) or records.text(current) or None
        by, now_ms = who(), records.time_ms(time_reply)
        fields = kill_record(run_id, by, now_ms)
        records.raise_errors(conn.pipeline(["HSET", keys.kill, *(x for kv in fields.items() for x in kv)]))
        return EarlyKill(run_id, by, now_ms, e.namespace, e.redis_url)
    except Exception as exc:
        log.debug("early kill not written (%s); the full command decides", exc)
        return None
    finally:
        conn.close()


_ANSI = {"bold": "1", "red": "31", "yellow": "33"}


def status_first(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, cwd: Path | None = None, out: Any = None
) -> int | None:
    """For a ``loop-status`` command: print its answer and return its exit code (0 live and nothing in the way,
    1 not). None (nothing printed) when the full command must answer."""
    if not is_status(argv):
        return None
    environ = os.environ if environ is None else environ
    e = target(environ, cwd)
    conn = _connect(e)
    if e is None or conn is None:
        return None
    try:
        data, code = status.read(conn.send, status.Query.of(e))
    except Exception as exc:
        log.debug("early loop-status not answered (%s); the full command answers", exc)
        return None
    finally:
        conn.close()
    out = out or sys.stdout
    if "--json" in argv:
        text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    else:
        colour = out.isatty() and not environ.get("NO_COLOR")
        style = (lambda t, tag: f"\x1b[{_ANSI[tag]}m{t}\x1b[0m") if colour else (lambda t, tag: t)
        text = "".join(line + "\n" for line in status.lines(data, style, one_line, ts))
    return _answer(out, text, code)


def pause_first(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, cwd: Path | None = None, out: Any = None
) -> int | None:
    """For ``pause`` / ``resume`` (``[--json]``): write or clear the pause record (``LoopControl.set_paused``'s)
    and print what the full command prints; exit 0. None (nothing written) when the full command must."""
    pause = _command(argv, "pause", {"--json"})
    if not (pause or _command(argv, "resume", {"--json"})):
        return None
    e = target(environ, cwd)
    conn = _connect(e)
    if e is None or conn is None:
        return None
    keys = Keys(e.namespace)
    try:
        if pause:
            existed, time_reply = records.raise_errors(conn.pipeline(["EXISTS", keys.paused], ["TIME"]))
            fields = ["by", who(), "at_ms", records.time_ms(time_reply)]
            records.raise_errors(conn.pipeline(["HSET", keys.paused, *fields]))
            changed = not existed
        else:
            changed = bool(records.raise_errors(conn.pipeline(["DEL", keys.paused]))[0])
    except Exception as exc:
        log.debug("early %s not done (%s); the full command does it", argv, exc)
        return None
    finally:
        conn.close()
    data = {"paused": pause, "changed": changed}
    if "--json" in argv:
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    elif pause:
        text = ("paused" if changed else "already paused") + "\n"
    else:
        text = ("resumed" if changed else "was not paused") + "\n"
    return _answer(out or sys.stdout, text, 0)


def _answer(out: Any, text: str, code: int) -> int:
    try:
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
