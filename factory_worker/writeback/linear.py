"""Write-back to Linear: what the outbox (``outbox.py``) delivers, as workflow-state moves and a comment.

Per event, on issue ``<identifier>`` of ``source.linear.team`` (GraphQL, ``linear_api.py``):

- ``dispatched``: moved to ``working_state`` ("In Progress"); comment with the dispatch (its fence)
- ``done``: moved to ``done_state`` ("Done"); comment
- ``parked``: moved to ``parked_state`` when set (else it stays where it is: out of the ready states, so the
  source does not list it again); comment with the attempt and the error
- ``backoff``, ``released``, ``retried``: moved back to the first ready state (``states[0]``, "Todo"), so
  the loop sees it again; comment (not for ``retried``)

An event retried after a newer event of its issue (``Event.superseded``) comments and moves the issue where
the newer event puts it (``Event.shows``; :meth:`LinearWriter.settle` moves alone). Idempotent, so
at-least-once delivery is exactly-once on the tracker: a move to the state the issue is in is skipped; an
issue in a closed state (any type but ``triage``, ``backlog``, ``unstarted``, ``started``: ``completed``,
``canceled``, ``duplicate``... see ``linear_api.is_open``) is never moved (a late or retried event cannot
reopen a done or duplicate issue); every comment carries the marker ``<!-- factory-worker:<dispatch
id>:<event> -->`` (``tracker.marker``) and is created only when none of the issue's comments has it: the
issue is read with its comments filtered by that marker (``body: {contains}``), one request however many
comments it has.

Errors: rate limits -> retry after Linear's reset; 5xx, timeouts, connection errors, 401/403 -> retry with
backoff; an unknown issue or state name -> permanent (the event is parked).
"""

from __future__ import annotations

import logging
from typing import Any

from factory_worker.config.settings import SourceSettings, TrackerSettings, secret_from_env
from factory_worker.sources.linear_api import LinearAPI, LinearError, is_open
from factory_worker.writeback.events import DeliveryError, Event, comment_body, marker

log = logging.getLogger(__name__)

ISSUE = (
    "query IssueForWrite($id: String!, $marker: String!) { issue(id: $id) { id identifier state { name type } "
    "comments(first: 1, filter: {body: {contains: $marker}}) { nodes { id } } } }"
)
STATE = "query IssueState($id: String!) { issue(id: $id) { id identifier state { name type } } }"
STATES = "query States($team: String!) { workflowStates(filter: {team: {key: {eq: $team}}}) { nodes { id name } } }"
MOVE = "mutation Move($id: String!, $state: String!) { issueUpdate(id: $id, input: {stateId: $state}) { success } }"
COMMENT = (
    "mutation Comment($issue: String!, $body: String!) { commentCreate(input: {issueId: $issue, body: $body}) "
    "{ success } }"
)


class LinearWriter:
    """Delivers outbox events to one Linear team."""

    def __init__(self, source: SourceSettings, tracker: TrackerSettings, api: LinearAPI | None = None) -> None:
        cfg = source.linear
        if not cfg.team:
            raise ValueError("tracker write-back needs source.linear.team (FACTORY_SOURCE__LINEAR__TEAM)")
        self.cfg, self.tracker = cfg, tracker
        self.api = api or LinearAPI(
            cfg.api_url, secret_from_env(cfg.token_env), tracker.timeout_s, cfg.max_retry_after_s
        )
        self._state_ids: dict[str, str] | None = None

    def target_state(self, event: str) -> str | None:
        c = self.cfg
        return {
            "dispatched": c.working_state,
            "done": c.done_state,
            "parked": c.parked_state,
            "backoff": c.ready_state,
            "released": c.ready_state,
            "retried": c.ready_state,
        }.get(event)

    def deliver(self, event: Event) -> None:
        issue = self._issue(ISSUE, {"id": event.issue, "marker": marker(event)})
        if self.tracker.comments and event.event != "retried":  # first: a state that cannot be set keeps it
            found = issue.get("comments")
            if not (isinstance(found, dict) and found.get("nodes")):
                self._call(COMMENT, {"issue": issue["id"], "body": comment_body(event)})
        self._move(issue, event.shows)

    def settle(self, issue_id: str, event: str) -> None:
        """Move ``issue_id`` where ``event`` puts it, without a comment."""
        self._move(self._issue(STATE, {"id": issue_id}), event)

    def _issue(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        issue = self._call(query, variables).get("issue")
        if not isinstance(issue, dict) or not issue.get("id"):
            raise DeliveryError(f"linear issue {variables['id']!r} not found", permanent=True)
        return issue

    def _move(self, issue: dict[str, Any], event: str) -> None:
        state = issue.get("state")
        state = state if isinstance(state, dict) else {}
        target = self.target_state(event)
        if target and state.get("name") != target and is_open(state.get("type")):
            self._call(MOVE, {"id": issue["id"], "state": self._state_id(target)})

    def _state_id(self, name: str) -> str:
        if self._state_ids is None or name not in self._state_ids:
            nodes = (self._call(STATES, {"team": self.cfg.team}).get("workflowStates") or {}).get("nodes") or []
            self._state_ids = {str(n.get("name")): str(n.get("id")) for n in nodes if isinstance(n, dict)}
        if name not in self._state_ids:
            raise DeliveryError(f"linear team {self.cfg.team} has no workflow state {name!r}", permanent=True)
        return self._state_ids[name]

    def _call(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.api.call(query, variables)
        except LinearError as exc:
            raise DeliveryError(str(exc), exc.retry_after, exc.permanent, exc.status) from None
