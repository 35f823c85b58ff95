"""The Linear issue source (``FACTORY_SOURCE__KIND=linear``): one team's issues over Linear's GraphQL API.

Polling: the ``Issues`` query below, filtered by the team's key, the ready workflow states
(``source.linear.states``, by name; with write-back also ``working_state``: an issue moved there whose agent
died with its worker must be found again, and the ledger says whether an agent has it) and, when set, the
project's name; 100 issues a page, following
``pageInfo.endCursor`` while ``hasNextPage`` (at most :data:`MAX_PAGES`). ``source.linear.labels`` must all
be on an issue (any case); the eligibility rules (``sources/rules.py``) apply on top, as for every source,
so an issue carrying the factory's done or parked label is not ready.

Issue fields: ``id`` = the identifier (``ENG-123``, what people write and what ``explain`` takes),
``title``, ``body`` (the description), ``labels`` (names), ``updated_at``, ``url``; ``linear_id`` (the UUID)
and ``team``/``project`` ride along. A ready issue gets ``state = ready_states[0]`` like GitHub's, other
issues (only from :meth:`LinearSource.get`) keep Linear's state name; an issue in a closed state (any type
but ``triage``, ``backlog``, ``unstarted``, ``started``: ``completed``, ``canceled``, ``duplicate``...) is
never ready, whatever the settings say.

Rate limits and errors (``linear_api.py``): a rate-limited reply holds every call off until its reset,
``poll()`` raising :class:`SourceError` meanwhile (the loop's breaker backs off); 5xx, timeouts and GraphQL
errors raise :class:`SourceError` with one line, never the key, and so does a malformed page (no
``issues.nodes`` list, a ``pageInfo`` of the wrong shape). A malformed node (any field of the wrong type at any
level: ``"state": "Todo"``, a label that is not an object, a title too long...) is one skipped issue, reported in
``PollResult.errors`` as ``linear:<team>#<index> (<identifier>): reason`` (the identifier when it can be read);
whatever fails on one node never ends the poll. :meth:`LinearSource.get` of such an issue raises
:class:`MalformedIssue` with the same reason (``explain`` says it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from factory_worker.config.settings import secret_from_env
from factory_worker.sources.base import Issue, MalformedIssue, PollResult, SourceError, validation_reason
from factory_worker.sources.linear_api import LinearAPI, LinearError, is_open

if TYPE_CHECKING:
    from factory_worker.config.linear import LinearSettings
    from factory_worker.config.settings import SourceSettings

log = logging.getLogger(__name__)

PER_PAGE = 100
MAX_PAGES = 100

NODE = (
    "id identifier title description url updatedAt state { name type } labels { nodes { name } } "
    "team { key } project { name }"
)
ISSUES = (
    "query Issues($filter: IssueFilter, $first: Int, $after: String) { issues(filter: $filter, "
    f"first: $first, after: $after) {{ nodes {{ {NODE} }} pageInfo {{ hasNextPage endCursor }} }} }}"
)
ISSUE = f"query Issue($id: String!) {{ issue(id: $id) {{ {NODE} }} }}"


class LinearSource:
    """One team's issues in the ready states, as :class:`Issue` objects (see the module docstring)."""

    def __init__(
        self,
        cfg: LinearSettings,
        ready_states: Iterable[str] = ("ready",),
        api: LinearAPI | None = None,
        token: str | None = None,
    ) -> None:
        if not cfg.team:
            raise SourceError("linear: source.linear.team (FACTORY_SOURCE__LINEAR__TEAM) is not set")
        self.cfg = cfg
        self.ready_state = list(ready_states)[0]
        self.api = api or LinearAPI(cfg.api_url, token, cfg.timeout_s, cfg.max_retry_after_s)
        self._ready = {s.casefold() for s in cfg.polled_states}
        self._labels = {x.casefold() for x in cfg.labels}

    @classmethod
    def from_settings(cls, settings: SourceSettings) -> LinearSource:
        cfg = settings.linear
        return cls(cfg, settings.ready_states, token=secret_from_env(cfg.token_env))

    def __repr__(self) -> str:
        return f"LinearSource(team={self.cfg.team!r})"

    def _filter(self) -> dict[str, Any]:
        f: dict[str, Any] = {"team": {"key": {"eq": self.cfg.team}}, "state": {"name": {"in": self.cfg.polled_states}}}
        if self.cfg.project:
            f["project"] = {"name": {"eq": self.cfg.project}}
        return f

    def _query(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.api.call(query, variables)
        except LinearError as exc:
            raise SourceError(f"{exc} (team {self.cfg.team})") from None

    # -- IssueSource ---------------------------------------------------------------------------------
    def poll(self) -> PollResult:
        out, after, index = PollResult(), None, 0
        for _ in range(MAX_PAGES):
            data = self._query(ISSUES, {"filter": self._filter(), "first": PER_PAGE, "after": after})
            page = data.get("issues") if isinstance(data.get("issues"), dict) else None
            if page is None or not isinstance(page.get("nodes"), list):
                raise SourceError(f"linear Issues: the reply has no issues.nodes list (team {self.cfg.team})")
            info = page.get("pageInfo")
            info = {} if info is None else info
            if (
                not isinstance(info, dict)
                or not isinstance(info.get("hasNextPage", False), bool)
                or not isinstance(info.get("endCursor"), (str, type(None)))
            ):
                raise SourceError(f"linear Issues: the reply's pageInfo is malformed (team {self.cfg.team})")
            for node in page["nodes"]:
                out.seen += 1
                try:
                    issue = self._issue(node)
                except Exception as exc:
                    out.errors.append(f"linear:{self.cfg.team}#{index}{_named(node)}: {_reason(exc)}; skipped")
                    log.warning("issue source: %s", out.errors[-1])
                else:
                    if issue.state == self.ready_state:
                        out.issues.append(issue)
                index += 1
            after = info.get("endCursor")
            if not info.get("hasNextPage") or not after:
                return out
        log.warning("linear: stopped after %d pages of issues (team %s)", MAX_PAGES, self.cfg.team)
        return out

    def get(self, issue_id: str) -> Issue | None:
        """The issue, whatever its state; None when Linear has no such issue. A malformed node raises
        :class:`MalformedIssue` (the reason every poll skips it), a malformed reply :class:`SourceError`."""
        try:
            data = self.api.call(ISSUE, {"id": issue_id})
        except LinearError as exc:
            if exc.permanent:  # "Entity not found": the team has no such issue
                return None
            raise SourceError(f"{exc} (team {self.cfg.team})") from None
        node = data.get("issue")
        if node is None:
            return None
        try:
            return self._issue(node)
        except Exception as exc:
            raise MalformedIssue(f"linear:{self.cfg.team}{_named(node)}: {_reason(exc)}") from None

    # -- one node -------------------------------------------------------------------------------------
    def _issue(self, node: Any) -> Issue:
        """One node as an :class:`Issue`; ValueError naming the field when any part has the wrong type (the
        schema's types: ``Issue.state``, ``team`` and ``labels`` objects, ``project`` an object or null)."""
        if not isinstance(node, dict):
            raise ValueError(f"expected an object, got {_kind(node)}")
        state = _field(node, "state", dict)
        name, kind = _field(state, "name", str, "state."), _field(state, "type", str, "state.", optional=True)
        label_nodes = (
            _field(_field(node, "labels", dict, optional=True) or {}, "nodes", list, "labels.", optional=True) or []
        )
        labels = [
            _field(_item(lb, f"labels.nodes[{n}]"), "name", str, f"labels.nodes[{n}].")
            for n, lb in enumerate(label_nodes)
        ]
        team = _field(node, "team", dict, optional=True) or {}
        project = _field(node, "project", dict, optional=True) or {}
        ready = name.casefold() in self._ready and is_open(kind) and self._labels <= {x.casefold() for x in labels}
        return Issue.model_validate(
            {
                "id": _field(node, "identifier", str),
                "title": _field(node, "title", str),
                "state": self.ready_state if ready else name,
                "body": _field(node, "description", str, optional=True) or "",
                "labels": labels,
                "updated_at": _field(node, "updatedAt", str, optional=True),
                "url": _field(node, "url", str, optional=True),
                "linear_id": _field(node, "id", str, optional=True),
                "team": _field(team, "key", str, "team.", optional=True),
                "project": _field(project, "name", str, "project.", optional=True),
            }
        )


_KINDS: dict[type, str] = {dict: "an object", list: "a list", str: "a string"}


def _kind(value: Any) -> str:
    """A JSON value's type, as the schema would name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return _KINDS.get(type(value), type(value).__name__)


def _field(obj: dict[str, Any], name: str, want: type, where: str = "", optional: bool = False) -> Any:
    """``obj[name]`` when it is a ``want`` (or null/missing and ``optional``); else ValueError naming it."""
    value = obj.get(name)
    if value is None and optional:
        return None
    if value is None and name not in obj:
        raise KeyError(f"{where}{name}")
    if not isinstance(value, want):
        raise ValueError(f"{where}{name}: expected {_KINDS[want]}, got {_kind(value)}")
    return value


def _item(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object, got {_kind(value)}")
    return value


def _named(node: Any) -> str:
    """`` (ENG-7)`` when the node's identifier can be read: the skip names the issue people know."""
    ident = node.get("identifier") if isinstance(node, dict) else None
    if isinstance(ident, str) and ident.isprintable() and 0 < len(ident) <= 64:
        return f" ({ident})"
    return ""


def _reason(exc: BaseException) -> str:
    """One line: the field and what is wrong with it (any exception: a node is never more than one skip)."""
    if isinstance(exc, ValidationError):
        return validation_reason(exc)
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    if isinstance(exc, ValueError):
        return (str(exc).splitlines() or [type(exc).__name__])[0]
    return f"rejected: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}".rstrip(": ")
