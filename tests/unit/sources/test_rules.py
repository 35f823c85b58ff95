"""The eligibility rules (``sources/rules.py``): every rule, its order and its one-line reason (no Redis)."""

from __future__ import annotations

import pytest

from factory_worker.config.settings import SourceSettings
from factory_worker.ledger.states import Gate
from factory_worker.sources.base import Issue
from factory_worker.sources.rules import Rules, Verdict


def issue(
    id: str = "A-1",
    title: str = "[factory] fix it",
    state: str = "ready",
    labels: tuple[str, ...] = (),
    author: str | None = None,
) -> Issue:
    return Issue(id=id, title=title, state=state, labels=list(labels), author_association=author)


def rules(**settings) -> Rules:
    return Rules.from_settings(SourceSettings(**settings))


def test_default_rules_let_every_ready_issue_through():
    r = rules()
    assert r.verdict(issue(title="no prefix at all", labels=("anything",))) is None
    assert r.check(issue(id="weird id ☕")) is None


@pytest.mark.parametrize(
    "settings, the_issue, text",
    [
        ({"required_labels": ["factory", "ok"]}, issue(labels=("FACTORY",)), 'out of scope: lacks required label "ok"'),
        (
            {"excluded_labels": ["wontfix", "security"]},
            issue(labels=("bug", "Security")),
            'out of scope: has excluded label "security"',
        ),
        (
            {"title_prefix": "[factory]"},
            issue(title="fix it [factory]"),
            'out of scope: title lacks prefix "[factory]"',
        ),
        (
            {"title_prefix": "[factory]"},
            issue(title="[Factory] fix it"),  # case-sensitive
            'out of scope: title lacks prefix "[factory]"',
        ),
        (
            {"id_pattern": r"EX-\d+"},
            issue(id="EX-1x"),
            'out of scope: id does not match id_pattern "EX-\\d+" (it is "EX-1x")',
        ),
        (
            {"author_associations": ["OWNER", "member"]},
            issue(author="NONE"),
            'out of scope: author association not one of OWNER, MEMBER (it is "NONE")',
        ),
        (
            {"author_associations": ["OWNER"]},
            issue(author=None),
            "out of scope: author association not one of OWNER (it is missing)",
        ),
        ({}, issue(state="blocked"), 'not ready: its state in the source is not one of "ready" (it is "blocked")'),
        ({}, issue(labels=("Factory:Done",)), 'not ready: it carries the factory\'s done label "factory:done"'),
        (
            {"parked_label": "bot:gave-up"},
            issue(labels=("bot:gave-up",)),
            'not ready: it carries the factory\'s parked label "bot:gave-up"',
        ),
    ],
)
def test_each_rule_names_itself(settings, the_issue, text):
    r = rules(**settings)
    assert r.verdict(the_issue) == text
    gate = Gate.NOT_READY if text.startswith("not ready") else Gate.OUT_OF_SCOPE
    assert r.check(the_issue).gate == gate


@pytest.mark.parametrize(
    "settings, the_issue",
    [
        ({"required_labels": ["factory", "ok"]}, issue(labels=("Ok", "factory", "more"))),
        ({"excluded_labels": ["wontfix"]}, issue(labels=("bug",))),
        ({"title_prefix": "[factory]"}, issue(title="  [factory] leading blanks are ignored")),
        ({"id_pattern": r"EX-\d+"}, issue(id="EX-12")),
        ({"author_associations": ["OWNER", "MEMBER", "COLLABORATOR"]}, issue(author="member")),
        ({"parked_label": ""}, issue(labels=("factory:parked",))),  # an empty label setting checks nothing
        ({"ready_states": ["todo", "ready"]}, issue(state="todo")),
    ],
)
def test_each_rule_lets_a_matching_issue_through(settings, the_issue):
    assert rules(**settings).check(the_issue) is None


def test_linear_team_and_project_are_rules_explain_can_name():
    r = rules(kind="linear", linear={"team": "ENG", "project": "Factory"})
    ours = Issue(id="ENG-1", title="t", state="ready", team="ENG", project="Factory")
    assert r.check(ours) is None
    assert (
        r.verdict(Issue(id="OPS-1", title="t", state="ready", team="OPS", project="Factory"))
        == 'out of scope: not in Linear team "ENG" (it is "OPS")'
    )
    assert (
        r.verdict(Issue(id="ENG-2", title="t", state="ready", team="ENG"))
        == 'out of scope: not in Linear project "Factory" (it is missing)'
    )
    assert (
        rules(kind="linear", linear={"team": "ENG"}).check(Issue(id="ENG-3", title="t", state="ready", team="eng"))
        is None
    )
    assert rules().check(Issue(id="X-1", title="t", state="ready", team="OPS")) is None  # other kinds: no rule


def test_id_pattern_must_match_the_whole_id():
    r = rules(id_pattern=r"\d+")
    assert r.check(issue(id="12")) is None
    assert r.check(issue(id="12a")) is not None and r.check(issue(id="a12")) is not None


def test_scope_is_decided_before_readiness():
    r = rules(title_prefix="[factory]")
    v = r.check(issue(title="x", state="closed", labels=("factory:done",)))
    assert v == Verdict(Gate.OUT_OF_SCOPE, 'title lacks prefix "[factory]"')
    assert v.reason == str(v) == 'out of scope: title lacks prefix "[factory]"' and v.text == v.rule


def test_the_reason_never_carries_the_issue_text_only_the_detail_does():
    r = rules(author_associations=["OWNER"])
    hostile = issue(author="X" * 64)
    v = r.check(hostile)
    assert "X" not in v.reason and v.detail == 'it is "' + "X" * 60 + '"...'  # shortened
    blocked = rules().check(issue(state="line1\nline2"))
    assert "\n" not in str(blocked) and "\\n" in str(blocked)


def test_screen_counts_by_reason_and_keeps_a_few_examples():
    r = rules(required_labels=["factory"], title_prefix="[factory]")
    issues = (
        [issue(id=f"N-{i}") for i in range(1000)]  # no label
        + [issue(id=f"T-{i}", title="t", labels=("factory",)) for i in range(30)]
        + [issue(id=f"D-{i}", labels=("factory", "factory:done")) for i in range(7)]
        + [issue(id="OK-1", labels=("factory",))]
    )
    s = r.screen(issues)
    assert [i.id for i in s.issues] == ["OK-1"]
    assert s.ruled_out == {
        'out of scope: lacks required label "factory"': 1000,
        'out of scope: title lacks prefix "[factory]"': 30,
        'not ready: it carries the factory\'s done label "factory:done"': 7,
    }
    assert len(s.examples) == 5 and s.examples[0] == {
        "issue": "N-0",
        "reason": 'out of scope: lacks required label "factory"',
    }
