"""An issue's last result (:meth:`Keys.result <factory_worker.ledger.keys.Keys.result>`): what its latest settled
dispatch made (summary, branch, head sha, pull request URL, cost, tokens, ...), one JSON string per issue.

Written in the round trip of the dispatch's settle (:func:`queue_result` on the pipeline a
:class:`~factory_worker.ledger.types.Rider` is given), with the cost and tokens added to the ledger's counters
(:data:`Keys.COST_COUNTER`, :data:`Keys.TOKENS_COUNTER`: what the metrics sum); read by ``explain`` and
``dispatches`` (:func:`parse_result`, which never raises: what is stored may be anything). The agent wrote
the summary: it is kept to :data:`Keys.RESULT_SUMMARY_MAX_CHARS` and only ever shown as text.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from factory_worker.ledger.keys import Keys
from factory_worker.ledger.records import loads

log = logging.getLogger(__name__)

#: The fields a result keeps (anything else given is dropped).
FIELDS = (
    "summary",
    "branch",
    "head_sha",
    "commits",
    "pushed",
    "pr_url",
    "no_changes",
    "cost_usd",
    "tokens",
    "result_problem",
    "outcome",
    "error",
    "fence",
    "at_ms",
)
_TEXT_MAX = 500  # every text field but the summary


def clean(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as stored: known fields only, texts cut, numbers finite."""
    out: dict[str, Any] = {}
    for name in FIELDS:
        v = record.get(name)
        if v is None:
            continue
        if isinstance(v, str):
            out[name] = v[: Keys.RESULT_SUMMARY_MAX_CHARS if name == "summary" else _TEXT_MAX]
        elif isinstance(v, bool) or (isinstance(v, int) and abs(v) < 2**63):
            out[name] = v
        elif isinstance(v, float) and math.isfinite(v):
            out[name] = v
    return out


def usage(record: dict[str, Any]) -> tuple[int, int]:
    """(micro-dollars, tokens) a record reports, each 0 when absent or not a sane number."""
    cost, tokens = record.get("cost_usd"), record.get("tokens")
    micro = 0
    if isinstance(cost, (int, float)) and not isinstance(cost, bool) and math.isfinite(cost) and 0 <= cost < 1e9:
        micro = round(cost * 1_000_000)
    n = tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and 0 <= tokens < 2**53 else 0
    return micro, n


def queue_result(pipe: Any, keys: Keys, issue: str, record: dict[str, Any]) -> None:
    """Queue the writes of ``issue``'s result on ``pipe``: the record (replacing the last one) and its usage
    added to the counters."""
    value = clean(record)
    pipe.set(keys.result(issue), json.dumps(value, ensure_ascii=True, allow_nan=False), ex=Keys.RESULT_TTL_S)
    micro, tokens = usage(value)
    if micro:
        pipe.hincrby(keys.counters, Keys.COST_COUNTER, micro)
    if tokens:
        pipe.hincrby(keys.counters, Keys.TOKENS_COUNTER, tokens)


def parse_result(raw: Any) -> dict[str, Any] | None:
    """A stored result, or None (missing, or not a JSON object: then ``{"invalid": true}``)."""
    if raw is None:
        return None
    try:
        value = loads(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw)
    except (TypeError, ValueError):
        log.warning("a stored result is not JSON")
        return {"invalid": True}
    return clean(value) if isinstance(value, dict) else {"invalid": True}


def described(result: dict[str, Any] | None) -> str:
    """One line for ``explain``: ``last result: pull request <url>, branch factory/7 at 1a2b3c4d5e6f, ...``."""
    if not result:
        return ""
    if result.get("invalid"):
        return "last result: invalid (not a JSON object)"
    parts = []
    if result.get("pr_url"):
        parts.append(f"pull request {result['pr_url']}")
    if result.get("branch"):
        at = f" at {str(result['head_sha'])[:12]}" if result.get("head_sha") else ""
        parts.append(f"branch {result['branch']}{at}{' (pushed)' if result.get('pushed') else ''}")
    if result.get("no_changes"):
        parts.append("no changes")
    if result.get("cost_usd") is not None:
        parts.append(f"cost ${result['cost_usd']:g}")
    if result.get("tokens") is not None:
        parts.append(f"{result['tokens']} tokens")
    if result.get("result_problem"):
        parts.append(str(result["result_problem"]))
    return "last result: " + (", ".join(parts) or "-")
