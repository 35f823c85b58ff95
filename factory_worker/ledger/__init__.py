"""ledger/: the dispatch ledger in Redis, the one room that decides whether an issue may be dispatched and records what
became of it.

It owns: the :class:`Ledger` (claims with fencing tokens, leases, backoff, parking, done markers, explain;
``core``), how each kind of write is sent (``writes``: replica acknowledgements, the ledger-loss retry, the
repeats of a settle, the release of an unacknowledged claim) and the read side (``views``); the stage ledger
(``stages``); every key name (``keys``); the closed vocabularies (``states``); the result types (``types``); the
record parsers every reader shares (``records``); the Lua scripts (``lua/``), their contracts (``contracts``)
and their registration (``scripts``); the ledger-loss guard (``guard``); the Redis client (``redis_client``) and a Redis outage's log (``outage``).

May import: ``factory_worker.config`` only, plus redis-py and hiredis: no other room, never Celery.

Importing the package is cheap: the CLI's fast path (standard library only) imports ``ledger.keys`` and
``ledger.records``, which load neither redis-py nor pydantic. The public names below are loaded on first use
(PEP 562), each from its module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from factory_worker.ledger.core import Ledger
    from factory_worker.ledger.guard import LedgerLostError
    from factory_worker.ledger.keys import Keys
    from factory_worker.ledger.scripts import LedgerError, ScriptReplyError, StaleClaimError
    from factory_worker.ledger.stages import Opened, Progress, StageLedger, StageUnackedError
    from factory_worker.ledger.types import Claim, ClaimBatch, Explanation, FailResult, Rider, Skip, fence_of
    from factory_worker.ledger.views import LedgerView
    from factory_worker.ledger.writes import LedgerWrites, Written

#: public name -> the module that defines it
_PUBLIC = {
    "Ledger": "core",
    "LedgerView": "views",
    "LedgerWrites": "writes",
    "Written": "writes",
    "StageLedger": "stages",
    "Keys": "keys",
    # results
    "Claim": "types",
    "ClaimBatch": "types",
    "Skip": "types",
    "Explanation": "types",
    "FailResult": "types",
    "Rider": "types",
    "Opened": "stages",
    "Progress": "stages",
    "fence_of": "types",
    # errors
    "LedgerError": "scripts",
    "StaleClaimError": "scripts",
    "ScriptReplyError": "scripts",
    "LedgerLostError": "guard",
    "StageUnackedError": "stages",
}

__all__ = [
    "Claim",
    "ClaimBatch",
    "Explanation",
    "FailResult",
    "Keys",
    "Ledger",
    "LedgerError",
    "LedgerLostError",
    "LedgerView",
    "LedgerWrites",
    "Opened",
    "Progress",
    "Rider",
    "ScriptReplyError",
    "Skip",
    "StageLedger",
    "StageUnackedError",
    "StaleClaimError",
    "Written",
    "fence_of",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once loaded, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
