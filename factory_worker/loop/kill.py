"""What a kill is, shared by loop control and the CLI's early path (standard library only): who acts, the
``kill`` hash's fields, and the record of a kill the early path already wrote."""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass


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
class EarlyKill:
    """A kill written by :func:`kill_first`: the run it names and who killed it."""

    run_id: str
    by: str
    at_ms: int
    namespace: str
    url: str
