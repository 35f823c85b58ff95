"""Concurrency keys (``dispatch.concurrency``): which keys an issue counts against, each with its limit.

A rule ``label:<prefix>*`` keys an issue by its first label starting with ``<prefix>`` (any case; the label
itself is the key, e.g. ``repo:api``); ``repo`` keys every issue of a GitHub source by its repository
(``repo:<owner>/<name>``). The gate (``claim.lua``) counts the live claims of each key with the in-flight cap
in one script; see :meth:`factory_worker.ledger.core.Ledger.claim`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from factory_worker.config.settings import Settings
from factory_worker.sources.base import Issue

log = logging.getLogger(__name__)

#: The separators of the gate's encoding (``claim.lua`` ARGV ``groups``): never part of a key.
_SEPARATORS = ("\x1e", "\x1f")

Groups = dict[str, list[tuple[str, int]]]


def issue_keys(rules: Mapping[str, int], issue: Issue, repo: str | None = None) -> list[tuple[str, int]]:
    """The (key, limit) pairs ``issue`` counts against under ``rules``."""
    out: list[tuple[str, int]] = []
    for rule, limit in rules.items():
        key: str | None = None
        if rule.startswith("label:"):
            prefix = rule[len("label:") :].removesuffix("*").casefold()
            key = next((label for label in issue.labels if label.casefold().startswith(prefix)), None)
        elif rule == "repo" and repo:
            key = f"repo:{repo}"
        if key and not any(s in key for s in _SEPARATORS) and all(k != key for k, _ in out):
            out.append((key, limit))
    return out


def groups(settings: Settings, issues: Iterable[Issue]) -> Groups | None:
    """Each issue's keys under ``settings.dispatch.concurrency`` (None: no rule, the gate counts no key)."""
    rules = settings.dispatch.concurrency
    if not rules:
        return None
    repo = settings.source.github_repo if settings.source.kind == "github" else None
    return {i.id: issue_keys(rules, i, repo) for i in issues}
