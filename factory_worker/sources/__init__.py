"""sources/: where issues come from. The IssueSource protocol and the Issue model, the file, GitHub and
Linear sources (and their HTTP helpers and Linear API client), the eligibility rules, and :func:`load_source`
to pick one by kind.

May import: ledger (the closed vocabularies), config, net (the one HTTP edge).

Issue sources: the protocol, the built-in file source, and :func:`load_source` to pick one by kind.

``kind`` is ``file`` (:class:`FileSource`), ``github`` or ``linear`` (``sources/github.py`` /
``sources/linear.py``, imported only when asked for) or ``module:Class`` (any importable class taking the
:class:`SourceSettings`). Whatever the kind, the loop keeps only the polled issues the eligibility rules (:mod:`.rules`) let through.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from factory_worker.sources.base import Issue, IssueSource, MalformedIssue, PollResult, SourceError
from factory_worker.sources.file import FileSource

if TYPE_CHECKING:
    from factory_worker.config.settings import SourceSettings

log = logging.getLogger(__name__)

__all__ = ["FileSource", "Issue", "IssueSource", "MalformedIssue", "PollResult", "SourceError", "load_source"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _check(obj: object, what: str) -> IssueSource:
    ok = isinstance(obj, IssueSource) and callable(getattr(obj, "poll", None)) and callable(getattr(obj, "get", None))
    if not ok:
        raise SourceError(f"source {what} does not implement IssueSource (needs poll() and get(issue_id))")
    return obj  # type: ignore[return-value]


def _load_tracker(kind: str, settings: SourceSettings) -> IssueSource:
    """The ``github`` or ``linear`` source, imported only when asked for."""
    try:
        if kind == "github":
            from factory_worker.sources.github import GitHubSource as cls
        else:
            from factory_worker.sources.linear import LinearSource as cls  # type: ignore[assignment]
    except ImportError as exc:
        raise SourceError(f"source kind {kind!r} is unavailable: {_first_line(exc)}") from None
    try:
        return _check(cls.from_settings(settings), kind)
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"source kind {kind!r} failed to start: {_first_line(exc)}") from None


def _load_class(spec: str, settings: SourceSettings) -> IssueSource:
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise SourceError(f"source kind {spec!r}: expected 'file', 'github' or 'module:Class'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise SourceError(f"source kind {spec!r}: cannot import {module_name}: {_first_line(exc)}") from None
    cls: Any = module
    for part in class_name.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            raise SourceError(f"source kind {spec!r}: {module_name} has no attribute {class_name!r}")
    if not callable(cls):
        raise SourceError(f"source kind {spec!r}: {class_name} is not a class or factory")
    try:
        obj = cls(settings)
    except Exception as exc:
        raise SourceError(f"source kind {spec!r}: {class_name}(settings) failed: {_first_line(exc)}") from None
    return _check(obj, repr(spec))


def load_source(settings: SourceSettings) -> IssueSource:
    """Build the issue source ``settings.kind`` names; raise :class:`SourceError` (one line) if it can't."""
    kind = settings.kind
    if kind == "file":
        return FileSource(settings.path, settings.ready_states)
    if kind in ("github", "linear"):
        return _load_tracker(kind, settings)
    if ":" in kind:
        return _load_class(kind, settings)
    raise SourceError(f"unknown source kind {kind!r}: expected 'file', 'github', 'linear' or 'module:Class'")
