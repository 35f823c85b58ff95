"""The Lua scripts' catalogue: found by glob in ``lua/``, each script's contract parsed from its header, and the
full text sent to Redis (generated header + prelude + script). Standard library only: :mod:`.scripts` registers
them on redis-py clients, and the CLI's early path (:mod:`.status` via :mod:`.quick`) sends them itself.
The contract format is described in :mod:`.scripts`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from factory_worker.ledger.keys import Keys

_DECL = re.compile(r"^(KEYS|ARGV|REPLIES):(.*)$", re.MULTILINE)
_SPEC = re.compile(r"^([a-z_]+)(?:\(([a-z_]+)\))?(\*?)$")


@dataclass(frozen=True)
class KeySpec:
    member: str  # a Keys property or method
    param: str | None  # the argument a method takes (``claim(issue)``)

    def build(self, keys: Keys, value: Any = None) -> str:
        attr = getattr(keys, self.member)
        return attr(str(value)) if self.param else attr


@dataclass(frozen=True)
class Contract:
    """A script's declaration, parsed from its header."""

    name: str
    keys: tuple[KeySpec, ...]
    each_keys: tuple[KeySpec, ...]  # per item, in this order (KEYS[K_N + (i-1)*K_E + j])
    args: tuple[str, ...]
    each_arg: str | None
    replies: frozenset[str]

    def lua_header(self) -> str:
        """``K`` and ``A``: the keys and arguments by name (variadic tails start at ``K_N + 1``/``A_N + 1``)."""
        k = ", ".join(f"{s.member} = KEYS[{i}]" for i, s in enumerate(self.keys, 1))
        a = ", ".join(f"{n} = ARGV[{i}]" for i, n in enumerate(self.args, 1))
        return (
            f"local K = {{{k}}}\nlocal A = {{{a}}}\n"
            f"local K_N, A_N, K_E = {len(self.keys)}, {len(self.args)}, {len(self.each_keys)}\n"
        )


def _parse(name: str, text: str) -> Contract:
    decl = {kind: body.split() for kind, body in _DECL.findall(text)}
    missing = {"KEYS", "ARGV", "REPLIES"} - set(decl)
    if missing:
        raise ValueError(f"lua/{name}.lua: contract lacks {', '.join(sorted(missing))}")
    keys: list[KeySpec] = []
    each_keys: list[KeySpec] = []
    for raw in decl["KEYS"]:
        m = _SPEC.match(raw)
        if not m or not hasattr(Keys, m.group(1)):
            raise ValueError(f"lua/{name}.lua: KEYS entry {raw!r} is not a Keys member")
        spec = KeySpec(m.group(1), m.group(2))
        if m.group(3):
            each_keys.append(spec)
        else:
            keys.append(spec)
    args = [a for a in decl["ARGV"] if not a.endswith("*")]
    tail = [a[:-1] for a in decl["ARGV"] if a.endswith("*")]
    return Contract(
        name, tuple(keys), tuple(each_keys), tuple(args), tail[0] if tail else None, frozenset(decl["REPLIES"])
    )


_LUA = Path(__file__).with_name("lua")
#: Every script's name (one per ``lua/*.lua`` file, the prelude aside).
NAMES = tuple(sorted(p.stem for p in _LUA.glob("*.lua") if not p.name.startswith("_")))


@cache
def _entry(name: str) -> tuple[Contract, str]:
    """One script, read and parsed on first use (the CLI's early path needs one, not all)."""
    if name not in NAMES:
        raise KeyError(f"no script lua/{name}.lua")
    text = (_LUA / f"{name}.lua").read_text()
    contract = _parse(name, text)
    return contract, contract.lua_header() + (_LUA / "_prelude.lua").read_text() + text


def source(name: str) -> str:
    """The full text sent to Redis for ``name``: generated header + prelude + ``lua/<name>.lua``."""
    return _entry(name)[1]


def contract(name: str) -> Contract:
    return _entry(name)[0]
