"""The Lua scripts: found by glob in ``lua/``, each declared once, registered once per Redis client.

Every script file opens with its contract, which is also its machine-readable declaration::

    KEYS: claim(issue) inflight counters started      -- names of Keys members, in order
    ARGV: token issue reason                          -- argument names, in order
    REPLIES: ok gone held                             -- the status words it may answer with

A member with a parameter (``claim(issue)``) is built from the argument of that name; a trailing ``*``
(``claim(issue)*`` / ``issue*``) marks a variadic tail, one key / argument per item. This module prepends
to each script a header generated from that declaration (``local K = {claim = KEYS[1], ...}``,
``local A = {...}``) and the shared prelude ``lua/_prelude.lua`` (server time, the holder check, the end of
a claim). So the key order is written once, and Lua and Python both use it by name.

One reply convention: a script answers a flat array whose first element is a status word. ``gone`` (no
live claim) and ``held`` (another token holds it; the second element is that token) become
:class:`StaleClaimError`; a word the script did not declare raises :class:`ScriptReplyError`.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script

# the catalogue (standard library, for the CLI before it loads redis-py) is this module's API too
from factory_worker.ledger.contracts import NAMES, Contract, KeySpec, contract, source  # noqa: F401
from factory_worker.ledger.keys import Keys

log = logging.getLogger(__name__)


class LedgerError(Exception):
    """Base class of ledger errors."""


class ScriptReplyError(LedgerError):
    """A script answered with a status word its contract does not declare (a bug, never a stale claim)."""


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


@dataclass(frozen=True)
class Reply:
    status: str
    values: list[Any]


class BoundScript:
    """One script registered on one client; call it with keyword arguments named as in its contract."""

    def __init__(self, client: redis.Redis, name: str) -> None:
        self.contract = contract(name)
        self._script: Script = client.register_script(source(name))
        #: per namespace: the fixed KEYS, built and encoded once (bytes), a KeySpec where a key takes a value
        self._templates: dict[Keys, list[bytes | KeySpec]] = {}

    @property
    def sha(self) -> str:
        return self._script.sha

    def __call__(self, keys: Keys, items: Iterable[Any] = (), **args: Any) -> Reply:
        klist, alist = self.keys_args(keys, items, **args)
        return self.parse(self._script(keys=klist, args=alist))

    def keys_args(self, keys: Keys, items: Iterable[Any] = (), **args: Any) -> tuple[list[bytes | str], list[Any]]:
        """KEYS (the fixed ones encoded once, as bytes) and ARGV for one call, in the contract's order."""
        c = self.contract
        items = list(items)
        template = self._templates.get(keys)
        if template is None:  # hot: a dispatch makes ~8 script calls of 5-15 keys, most of them fixed
            template = self._templates[keys] = [s if s.param else s.build(keys).encode() for s in c.keys]
        # a KeySpec left in the template has a param (the others were built and encoded above)
        klist = [k if isinstance(k, bytes) else k.build(keys, args.get(k.param or "")) for k in template]
        if c.each_keys:  # hot on a big backlog: bind each key builder once, not once per item
            builders = [getattr(keys, spec.member) for spec in c.each_keys]
            klist += [build(str(item)) for item in items for build in builders]
        alist = [args[a] for a in c.args] + (items if c.each_arg else [])
        return klist, alist

    def queue(self, pipe: Any, keys: Keys, items: Iterable[Any] = (), **args: Any) -> None:
        """Add one ``EVALSHA`` to a pipeline ``pipe`` (its raw reply goes through :meth:`parse`). Not through
        redis-py's pipeline scripts, which cost a ``SCRIPT EXISTS`` round trip on every execute: a reply that
        is :class:`redis.exceptions.NoScriptError` (a restarted Redis) means :meth:`load` and send again (the
        pipeline must be executed with ``raise_on_error=False``)."""
        klist, alist = self.keys_args(keys, items, **args)
        pipe.execute_command("EVALSHA", self.sha, len(klist), *klist, *alist)

    def load(self) -> None:
        """Load the script into Redis (after a ``NOSCRIPT`` reply to :meth:`queue`)."""
        self._script.sha = self._script.registered_client.script_load(self._script.script)

    def parse(self, raw: Any) -> Reply:
        """The typed reply; ScriptReplyError on a status word the contract does not declare."""
        c = self.contract
        status = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
        if status not in c.replies:
            raise ScriptReplyError(f"lua/{c.name}.lua answered {status!r}, which its contract does not declare")
        return Reply(status, list(raw[1:]))


_registered: weakref.WeakKeyDictionary[Any, dict[str, BoundScript]] = weakref.WeakKeyDictionary()


def scripts_for(client: redis.Redis) -> Mapping[str, BoundScript]:
    """The registered scripts of ``client``; registered on first use, once per client."""
    try:
        return _registered[client]
    except KeyError:
        regs = {name: BoundScript(client, name) for name in NAMES}
        _registered[client] = regs
        return regs


def checked(reply: Reply, issue: str, token: str) -> Reply:
    """``reply`` unless it says the token does not hold the claim (then :class:`StaleClaimError`)."""
    if reply.status == "gone":
        raise StaleClaimError(issue, token, None)
    if reply.status == "held":
        cur = reply.values[0]
        raise StaleClaimError(issue, token, cur.decode() if isinstance(cur, bytes) else cur)
    return reply
