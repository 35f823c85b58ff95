"""The Lua scripts, loaded from ``lua/*.lua`` and registered once per Redis client.

Each script file opens with its contract (KEYS, ARGV, returns). Compare-and-set scripts share one return
convention, turned into typed exceptions here: ``{1, ...}`` ok, ``{0, ""}`` no live claim (expired or
released), ``{-1, current}`` the claim is held by another token.
"""

from __future__ import annotations

import logging
import weakref
from functools import lru_cache
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script

log = logging.getLogger(__name__)

NAMES = ("claim", "renew", "complete", "fail", "release", "retry", "lease_release", "run_end", "begin", "iteration_begin", "kill_clear")

_registered: "weakref.WeakKeyDictionary[Any, dict[str, Script]]" = weakref.WeakKeyDictionary()


class LedgerError(Exception):
    """Base class of ledger errors."""


class StaleClaimError(LedgerError):
    """A write by a token that no longer holds the claim: nothing was changed.

    ``current`` is the token holding the claim now, or ``None`` when no live claim exists (the lease
    expired, or the claim was completed, failed or released).
    """

    def __init__(self, issue: str, token: str, current: str | None) -> None:
        self.issue, self.token, self.current = issue, token, current
        why = "no live claim (lease expired or already finished)" if current is None else "superseded"
        super().__init__(f"stale claim on issue {issue!r} with token {token}: {why}")

    @property
    def expired(self) -> bool:
        return self.current is None


@lru_cache(maxsize=None)
def source(name: str) -> str:
    """The text of ``lua/<name>.lua``."""
    return resources.files("factory_worker").joinpath("lua", f"{name}.lua").read_text()


def scripts_for(client: redis.Redis) -> dict[str, Script]:
    """The registered scripts of ``client``; registered on first use, once per client."""
    try:
        return _registered[client]
    except KeyError:
        regs = {name: client.register_script(source(name)) for name in NAMES}
        _registered[client] = regs
        return regs


def checked(result: list[Any], issue: str, token: str) -> list[Any]:
    """Raise :class:`StaleClaimError` unless a compare-and-set script returned success."""
    status = int(result[0])
    if status == 1:
        return result
    current = result[1] if status == -1 else None
    if isinstance(current, bytes):
        current = current.decode()
    raise StaleClaimError(issue, token, current)
