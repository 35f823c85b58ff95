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
errors raise :class:`SourceError` with one line, never the key. A malformed node is reported in
``PollResult.errors`` as ``linear:<team>#<index>: reason`` and skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from factory_worker.config.settings import secret_from_env
from factory_worker.sources.base import Issue, PollResult, SourceError, validation_reason
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
            for node in page["nodes"]:
                out.seen += 1
                try:
                    issue = self._issue(node)
                except (ValueError, ValidationError, TypeError, KeyError) as exc:
                    out.errors.append(f"linear:{self.cfg.team}#{index}: {_reason(exc)}; skipped")
                    log.warning("issue source: %s", out.errors[-1])
                else:
                    if issue.state == self.ready_state:
                        out.issues.append(issue)
                index += 1
            info = page.get("pageInfo") or {}
            after = info.get("endCursor")
            if not info.get("hasNextPage") or not after:
                return out
        log.warning("linear: stopped after %d pages of issues (team %s)", MAX_PAGES, self.cfg.team)
        return out

    def get(self, issue_id: str) -> Issue | None:
        try:
            data = self.api.call(ISSUE, {"id": issue_id})
        except LinearError as exc:
            if exc.permanent:  # "Entity not found": the team has no such issue
                return None
            raise SourceError(f"{exc} (team {self.cfg.team})") from None
        node = data.get("issue")
        if not isinstance(node, dict):
            return None
        try:
            return self._issue(node)
        except (ValueError, ValidationError, TypeError, KeyError):
            return None

    # -- one node -------------------------------------------------------------------------------------
    def _issue(self, node: Any) -> Issue:
        if not isinstance(node, dict):
            raise ValueError("not an object")
        state = node.get("state") or {}
        labels = [str(lb.get("name")) for lb in (node.get("labels") or {}).get("nodes") or [] if isinstance(lb, dict)]
        name, kind = str(state.get("name") or ""), str(state.get("type") or "")
        ready = name.casefold() in self._ready and is_open(kind) and self._labels <= {x.casefold() for x in labels}
        return Issue.model_validate(
            {
                "id": node["identifier"],
                "title": node["title"],
                "state": self.ready_state if ready else name,
                "body": node.get("description") or "",
                "labels": labels,
                "updated_at": node.get("updatedAt"),
                "url": node.get("url"),
                "linear_id": node.get("id"),
                "team": (node.get("team") or {}).get("key"),
                "project": (node.get("project") or {}).get("name"),
            }
        )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return validation_reason(exc)
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    return str(exc) or type(exc).__name__
