"""Eligibility rules in the loop and in ``explain`` (fakeredis): out-of-scope issues are never candidates,
the factory's done/parked labels make an issue not ready, and the run record only counts what was left out."""

from __future__ import annotations

import json

import pytest

from factory_worker.context import Context
from factory_worker.loop.iteration import iterate, run_iteration
from factory_worker.ops.operations import explain
from factory_worker.sources import FileSource
from factory_worker.sources.github import GitHubSource
from tests.conftest import roomy_fleet
from tests.support import Recorder, write_issues
from tests.unit.github_fake import Reply, gh, item  # noqa: F401 (gh: the fixture)

RULES = {
    "required_labels": ["factory"],
    "excluded_labels": ["wontfix"],
    "title_prefix": "[factory]",
    "id_pattern": r"F-\d+",
}


def row(id: str, title: str = "[factory] do it", labels: tuple[str, ...] = ("factory",), state: str = "ready"):
    return {"id": id, "title": title, "state": state, "labels": list(labels)}


ROWS = [
    row("F-1"),
    row("F-2", labels=()),
    row("F-3", labels=("factory", "WontFix")),
    row("F-4", title="do it"),
    row("X-5"),
    row("F-6", labels=("factory", "factory:done")),
    row("F-7", labels=("factory", "factory:parked")),
    row("F-8", state="blocked"),
    row("F-9", labels=("Factory", "bug")),
]


@pytest.fixture
def ruled(fake_redis, make_settings, tmp_path):
    path = tmp_path / "issues.jsonl"
    write_issues(path, ROWS)
    s = make_settings(source={"path": str(path), **RULES}, dispatch={"max_in_flight": 100})
    ctx = Context(s, fake_redis, FileSource(path))
    roomy_fleet(fake_redis, ctx.keys)
    return ctx


def test_only_issues_within_the_rules_are_dispatched(ruled):
    send = Recorder()
    report = iterate(ruled, send)
    assert sorted(s[1] for s in send.sent) == ["F-1", "F-9"]
    assert report.pulled == 2 and report.dispatched == 2 and report.skipped == []
    assert report.ruled_out == {
        'out of scope: lacks required label "factory"': 1,
        'out of scope: has excluded label "wontfix"': 1,
        'out of scope: title lacks prefix "[factory]"': 1,
        'out of scope: id does not match id_pattern "F-\\d+"': 1,
        'not ready: it carries the factory\'s done label "factory:done"': 1,
        'not ready: it carries the factory\'s parked label "factory:parked"': 1,
    }  # F-8 (blocked) is not ready in the file source itself: it never reaches the rules
    assert [e["issue"] for e in report.ruled_out_examples] == ["F-2", "F-3", "F-4", "X-5", "F-6"]


def test_a_dry_run_applies_the_same_rules(ruled):
    report = iterate(ruled, None, dry_run=True)
    assert sorted(d["issue"] for d in report.dispatches) == ["F-1", "F-9"]
    assert sum(report.ruled_out.values()) == 6


@pytest.mark.parametrize(
    "issue, state, text",
    [
        ("F-1", "claimable", "claimable now"),
        ("F-2", "out-of-scope", 'lacks required label "factory"'),
        ("F-3", "out-of-scope", 'has excluded label "wontfix"'),
        ("F-4", "out-of-scope", 'title lacks prefix "[factory]"'),
        ("X-5", "out-of-scope", 'id does not match id_pattern "F-\\d+" (it is "X-5")'),
        ("F-6", "not-ready", 'it carries the factory\'s done label "factory:done"'),
        ("F-7", "not-ready", 'it carries the factory\'s parked label "factory:parked"'),
        ("F-8", "not-ready", 'its state in the source is not one of "ready" (it is "blocked")'),
        ("F-404", "unknown", "neither the ledger nor the source has this id"),  # known to the ledger: not-in-source
    ],
)
def test_explain_names_the_rule(ruled, issue, state, text):
    e = explain(ruled, issue)
    assert e.state == state and e.text.startswith(text), e.text
    if state in ("out-of-scope", "not-ready"):  # the rule's own words, and what the run record counts by
        assert e.text.endswith("(the ledger alone says: claimable)")
        assert (
            e.detail["rule"]
            == ("out of scope: " if state == "out-of-scope" else "not ready: ") + (text.split(" (it is")[0])
        )


def test_the_ledger_answers_first(ruled):
    ruled.ledger.claim(["F-6"])  # e.g. claimed before someone added the label
    assert explain(ruled, "F-6").state == "in-flight"


def test_the_run_record_counts_by_reason_and_does_not_grow_with_the_backlog(fake_redis, make_settings, tmp_path):
    sizes = {}
    for n in (50, 5000):
        path = tmp_path / f"issues-{n}.jsonl"
        write_issues(path, [row("F-1")] + [row(f"F-{i}", labels=()) for i in range(2, n + 2)])
        s = make_settings(namespace=f"n{n}", source={"path": str(path), **RULES}, dispatch={"max_in_flight": 100})
        ctx = Context(s, fake_redis, FileSource(path))
        roomy_fleet(fake_redis, ctx.keys)
        kick = ctx.control.start_run(1, by="test")
        report, _ = run_iteration(ctx, Recorder(), kick.run_id, 0)
        assert report.dispatched == 1
        stored = ctx.control.run(kick.run_id)["last_report"]
        assert stored["ruled_out"] == {'out of scope: lacks required label "factory"': n}
        assert len(stored["ruled_out_examples"]) == 5 and stored["skipped_total"] == 0
        sizes[n] = len(fake_redis.hget(ctx.keys.run(kick.run_id), "last_report"))
    assert abs(sizes[5000] - sizes[50]) < 20, sizes  # a few digits more, not 4950 ids more


def test_github_author_association_rule_in_the_loop_and_explain(gh, fake_redis, make_settings):
    items = [
        item(1, author_association="OWNER"),
        item(2, author_association="NONE"),
        item(3, author_association="MEMBER"),
        item(4),
    ]
    by_number = {str(i["number"]): i for i in items}
    gh.route = lambda req: (
        Reply(200, items) if req.path.endswith("/issues") else Reply(200, by_number[req.path.rsplit("/", 1)[-1]])
    )
    s = make_settings(
        source={
            "kind": "github",
            "github_repo": "o/r",
            "github_api_url": gh.url,
            "github_labels": ["agent"],
            "author_associations": ["OWNER", "MEMBER"],
        }
    )
    ctx = Context(s, fake_redis, GitHubSource.from_settings(s.source))
    roomy_fleet(fake_redis, ctx.keys)
    send = Recorder()
    report = iterate(ctx, send)
    assert sorted(x[1] for x in send.sent) == ["1", "3"]
    assert report.ruled_out == {"out of scope: author association not one of OWNER, MEMBER": 2}
    stranger = explain(ctx, "2")
    assert stranger.state == "out-of-scope"
    assert stranger.text.startswith('author association not one of OWNER, MEMBER (it is "NONE")')
    assert explain(ctx, "4").text.startswith("author association not one of OWNER, MEMBER (it is missing)")
    json.dumps(report.as_dict())  # the report stays JSON (it is stored on the run)
