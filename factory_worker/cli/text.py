"""Text the CLI shows, standard library only (the early path of :mod:`.quick` prints without rich):
untrusted text made safe for a terminal, and Redis-clock timestamps."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(v: Any) -> str:
    """Untrusted text for a terminal: control bytes (ESC, OSC 8 links, BEL, ...) shown as ``\\xNN``, never sent."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(v))


def one_line(v: Any) -> str:
    """:func:`printable`, and line breaks and tabs shown as ``\\n`` / ``\\t`` too: for a field inside one line
    (a host name or an operator's name cannot fake another line of status)."""
    return printable(v).replace("\n", "\\n").replace("\t", "\\t")


def ts(ms: Any) -> str:
    """A Redis-clock ms timestamp as UTC text; ``-`` when there is none, ``invalid`` when what is stored is not
    one (garbage, ``inf``, a year past 9999: never an exception)."""
    if ms is None or ms == "":
        return "-"
    try:
        return datetime.fromtimestamp(int(ms) / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "invalid"
