"""What the control CLI prints: JSON or human text, tables of untrusted text, the exit code it ends with.

Issue ids, titles and errors come from the source and from agents: in a table rich markup in them is
escaped, and everywhere control bytes are shown as ``\\xNN`` (:func:`printable`), so no terminal escape or
OSC 8 link reaches an operator's terminal. Used by :mod:`factory_worker.cli.commands`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from factory_worker.cli.text import printable, ts

console = Console()


class Exit(Exception):
    """End the command with ``code`` (raised by :func:`emit` once the output is printed)."""

    def __init__(self, code: int) -> None:
        self.code = code


def emit(data: Any, as_json: bool, human: Callable[[Any], None], code: int = 0) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        human(data)
    raise Exit(code)


def table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[_cell(c, r.get(c)) for c in columns])
    console.print(t)


def _cell(name: str, v: Any) -> str:
    """A table cell; issue ids, titles and errors are untrusted: control bytes shown, rich markup escaped."""
    if v is None:
        return "-"
    if name.endswith("_ms"):
        return ts(v)
    return escape(printable(v))
