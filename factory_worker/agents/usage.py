"""The agent's usage lines: ``FACTORY_USAGE``, a file the agent appends JSON lines to while it runs.

Each line is one delta, ``{"cost_usd": 0.12, "tokens": 3400}`` (either field optional). A line that is no JSON
object, or whose values are not finite non-negative numbers (``tokens`` an integer), is ignored and counted
(``malformed``): never fatal. :class:`UsageFile` reads what was appended since its last read (a line without its
newline yet waits for it), at most :data:`READ_MAX` bytes a read, through a descriptor that follows no symlink
(the agent owns its directory, never the worker's files). :class:`Usage` is a sum of deltas.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The name of the usage file in the agent's directory (``FACTORY_USAGE``).
USAGE_FILE = "usage.jsonl"
#: At most this many bytes are read per read; a line longer than :data:`LINE_MAX` is malformed.
READ_MAX = 1 << 20
LINE_MAX = 64 * 1024


@dataclass
class Usage:
    """A sum of usage deltas: cost, tokens, and how many lines it took (valid and malformed)."""

    cost_usd: float = 0.0
    tokens: int = 0
    lines: int = 0
    malformed: int = 0

    def add(self, other: Usage) -> None:
        self.cost_usd += other.cost_usd
        self.tokens += other.tokens
        self.lines += other.lines
        self.malformed += other.malformed

    def as_dict(self) -> dict[str, Any]:
        return {
            "cost_usd": round(self.cost_usd, 6),
            "tokens": self.tokens,
            "lines": self.lines,
            "malformed": self.malformed,
        }


#: Sends one delta (and the wall seconds since the last report) to the ledger: None to carry on, else
#: (outcome, reason) to stop the agent with (a budget crossed: ``budget``; the day's, hard: ``interrupted``).
UsageReport = Callable[[Usage, float], "tuple[str, str] | None"]


def parse_line(raw: bytes) -> Usage | None:
    """One line's delta (``lines`` 1), or None when it is malformed."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    cost, tokens = value.get("cost_usd", 0.0), value.get("tokens", 0)
    if isinstance(cost, bool) or not isinstance(cost, int | float) or not math.isfinite(cost) or cost < 0:
        return None
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        return None
    return Usage(float(cost), tokens, 1, 0)


class UsageFile:
    """Reads the usage lines appended to ``path`` since the last :meth:`read` (one reader, one thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self._partial = b""

    def read(self) -> list[Usage]:
        """The deltas of the complete lines appended since the last read (a malformed line is a
        ``Usage(malformed=1)``); [] when the file does not exist (yet) or cannot be read."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return []
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device: never read
                return []
            data = os.pread(fd, READ_MAX, self.offset)
        except OSError:
            return []
        finally:
            os.close(fd)
        self.offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        out: list[Usage] = []
        if len(self._partial) > LINE_MAX:  # no newline in sight: malformed, the rest of it skipped
            self._partial = b""
            out.append(Usage(malformed=1))
        for line in lines:
            if not line.strip():
                continue
            parsed = parse_line(line) if len(line) <= LINE_MAX else None
            out.append(parsed if parsed is not None else Usage(malformed=1))
        return out
