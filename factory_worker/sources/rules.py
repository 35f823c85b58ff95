"""Eligibility rules: which of a source's issues the factory may work on, decided in one place.

A source's ``poll()`` returns the issues in a ready state; the loop then keeps only those :class:`Rules`
let through, and ``explain`` asks the same object why an issue is left out. The rules come from the
``source.*`` settings and apply to every source kind:

* **out of scope** (:data:`Gate.OUT_OF_SCOPE`), checked in this order: ``required_labels`` (every one
  present), ``excluded_labels`` (none present), ``title_prefix`` (the title, leading blanks ignored, starts
  with it; case-sensitive), ``id_pattern`` (a regex the id must fullmatch), ``author_associations``
  (GitHub's ``author_association`` is one of them; an issue without one is out), and for
  ``kind=linear`` its ``linear.team`` and ``linear.project`` (the poll already asks Linear for them only;
  ``explain`` of another team's or project's issue says so), and with a workspace (``workspace.repo_url`` /
  ``repos``) its repository (:meth:`WorkspaceSettings.route <factory_worker.config.workspace.WorkspaceSettings.route>`:
  an issue whose repository cannot be resolved never runs). An empty rule lets everything through. Labels
  compare case-insensitively, as on GitHub.
* **not ready** (:data:`Gate.NOT_READY`): the state is not one of ``ready_states``, or the issue carries
  the factory's own ``done_label`` / ``parked_label`` (what the factory wrote back is respected).

A :class:`Verdict`'s ``rule`` (and ``reason``, which adds the gate's words) depends only on the settings,
never on the issue, so counting skips by reason keeps the run record's size bounded however large the
backlog; the issue's own offending value (untrusted text, quoted and shortened) goes in ``detail``, which
only ``explain`` and the few examples show.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from factory_worker.ledger.states import Gate
from factory_worker.sources.base import Issue

if TYPE_CHECKING:
    from factory_worker.config.settings import SourceSettings, WorkspaceSettings

log = logging.getLogger(__name__)

#: How many ruled-out issues a poll keeps as examples (the rest are only counted).
EXAMPLES = 5


_PREFIX = {Gate.OUT_OF_SCOPE: "out of scope", Gate.NOT_READY: "not ready"}


@dataclass(frozen=True)
class Verdict:
    """Why an issue is not a candidate: the gate word, the rule it breaks, and the issue's own value."""

    gate: Gate  # OUT_OF_SCOPE or NOT_READY
    rule: str  # e.g. 'title lacks prefix "[factory]"': settings text only
    detail: str = ""  # e.g. 'it is "NONE"': the issue's value, quoted and shortened

    @property
    def reason(self) -> str:
        """What the run record counts by: ``out of scope: <rule>`` / ``not ready: <rule>``."""
        return f"{_PREFIX[self.gate]}: {self.rule}"

    @property
    def text(self) -> str:
        """The rule and the issue's value: what ``explain`` says after the gate word."""
        return f"{self.rule} ({self.detail})" if self.detail else self.rule

    def __str__(self) -> str:
        return f"{_PREFIX[self.gate]}: {self.text}"


@dataclass
class Screened:
    """A poll's issues after the rules: the candidates, and the others counted by reason (a few examples)."""

    issues: list[Issue] = field(default_factory=list)
    ruled_out: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)


def _q(text: str) -> str:
    """``text`` in double quotes, as is when printable without a quote, else as a JSON string (escaped):
    a message stays one line, and unambiguous, whatever it holds."""
    if text.isprintable() and '"' not in text:
        return f'"{text}"'
    return json.dumps(text, ensure_ascii=False)


def _shown(value: object, limit: int = 60) -> str:
    """An untrusted value for a one-line message: quoted and shortened (None: ``missing``)."""
    if value is None:
        return "missing"
    text = str(value)
    return _q(text[:limit]) + ("..." if len(text) > limit else "")


@dataclass(frozen=True)
class Rules:
    """The eligibility rules of ``source.*`` (see the module docstring); build with :meth:`from_settings`."""

    ready_states: tuple[str, ...] = ("ready",)
    required_labels: tuple[str, ...] = ()
    excluded_labels: tuple[str, ...] = ()
    title_prefix: str = ""
    id_pattern: re.Pattern[str] | None = None
    author_associations: tuple[str, ...] = ()
    done_label: str = "factory:done"
    parked_label: str = "factory:parked"
    linear_team: str | None = None
    linear_project: str | None = None
    #: the workspace's settings when it is on: an issue must route to a repository
    workspace: WorkspaceSettings | None = None

    @classmethod
    def from_settings(cls, s: SourceSettings, workspace: WorkspaceSettings | None = None) -> Rules:
        """The rules of ``source.*`` and, when ``workspace`` is given and on, its routing."""
        return cls(
            ready_states=tuple(s.ready_states),
            required_labels=tuple(s.required_labels),
            excluded_labels=tuple(s.excluded_labels),
            title_prefix=s.title_prefix.lstrip(),
            id_pattern=re.compile(s.id_pattern) if s.id_pattern else None,
            author_associations=tuple(a.upper() for a in s.author_associations),
            done_label=s.done_label,
            parked_label=s.parked_label,
            linear_team=s.linear.team if s.kind == "linear" else None,
            linear_project=s.linear.project if s.kind == "linear" else None,
            workspace=workspace if workspace is not None and workspace.enabled else None,
        )

    # -- the rules ---------------------------------------------------------------------------------------
    def scope(self, issue: Issue) -> Verdict | None:
        """The first scope rule ``issue`` breaks, or None when it is in scope."""
        have = {lb.casefold() for lb in issue.labels}
        for label in self.required_labels:
            if label.casefold() not in have:
                return Verdict(Gate.OUT_OF_SCOPE, f"lacks required label {_q(label)}")
        for label in self.excluded_labels:
            if label.casefold() in have:
                return Verdict(Gate.OUT_OF_SCOPE, f"has excluded label {_q(label)}")
        if self.title_prefix and not issue.title.lstrip().startswith(self.title_prefix):
            return Verdict(Gate.OUT_OF_SCOPE, f"title lacks prefix {_q(self.title_prefix)}")
        if self.id_pattern is not None and not self.id_pattern.fullmatch(issue.id):
            return Verdict(
                Gate.OUT_OF_SCOPE,
                f"id does not match id_pattern {_q(self.id_pattern.pattern)}",
                f"it is {_shown(issue.id)}",
            )
        author = issue.author_association
        if self.author_associations and (author or "").upper() not in self.author_associations:
            return Verdict(
                Gate.OUT_OF_SCOPE,
                f"author association not one of {', '.join(self.author_associations)}",
                f"it is {_shown(author)}",
            )
        extra = issue.model_extra or {}
        team, project = extra.get("team"), extra.get("project")
        if self.linear_team and str(team or "").casefold() != self.linear_team.casefold():
            return Verdict(Gate.OUT_OF_SCOPE, f"not in Linear team {_q(self.linear_team)}", f"it is {_shown(team)}")
        if self.linear_project and project != self.linear_project:
            return Verdict(
                Gate.OUT_OF_SCOPE, f"not in Linear project {_q(self.linear_project)}", f"it is {_shown(project)}"
            )
        if self.workspace is not None and (route := self.workspace.route(issue.labels)).url is None:
            return Verdict(Gate.OUT_OF_SCOPE, route.reason)  # the reason names settings only
        return None

    def readiness(self, issue: Issue) -> Verdict | None:
        """Why ``issue`` is not ready (its state, or a label the factory wrote), or None when it is."""
        if issue.state not in self.ready_states:
            return Verdict(
                Gate.NOT_READY,
                f"its state in the source is not one of {', '.join(map(_q, self.ready_states))}",
                f"it is {_shown(issue.state)}",
            )
        have = {lb.casefold() for lb in issue.labels}
        for label, what in ((self.done_label, "done"), (self.parked_label, "parked")):
            if label and label.casefold() in have:
                return Verdict(Gate.NOT_READY, f"it carries the factory's {what} label {_q(label)}")
        return None

    def check(self, issue: Issue) -> Verdict | None:
        """Scope first (an issue out of scope stays out whatever its state), then readiness."""
        return self.scope(issue) or self.readiness(issue)

    def verdict(self, issue: Issue) -> str | None:
        """:meth:`check` as one line naming the rule, e.g. ``out of scope: title lacks prefix "[factory]"``."""
        v = self.check(issue)
        return None if v is None else str(v)

    # -- a poll --------------------------------------------------------------------------------------------
    def screen(self, issues: Iterable[Issue], examples: int = EXAMPLES) -> Screened:
        """Keep the candidates; count the others by reason and keep the first ``examples`` of them."""
        out = Screened()
        for issue in issues:
            v = self.check(issue)
            if v is None:
                out.issues.append(issue)
                continue
            out.ruled_out[v.reason] = out.ruled_out.get(v.reason, 0) + 1
            if len(out.examples) < examples:
                out.examples.append({"issue": issue.id, "reason": str(v)})
        if out.ruled_out:
            log.debug("eligibility rules left out %d issues: %s", sum(out.ruled_out.values()), out.ruled_out)
        return out
