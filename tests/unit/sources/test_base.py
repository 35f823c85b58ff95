"""The Issue model and untrusted input (issue 12): no poisoned item can stall the loop."""

from __future__ import annotations

import json

import pytest

from factory_worker.context import Context
from factory_worker.loop.iteration import iterate
from factory_worker.sources import FileSource
from factory_worker.sources.base import Issue
from tests.conftest import roomy_fleet


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


POISON_LINES = {
    "depth bomb": '{"id": "P-1", "title": "t", "state": "ready", "x": ' + _nested(1000) + "}",
    "serialization bomb": '{"id": "P-2", "title": "t", "state": "ready", "x": ' + _nested(900) + "}",
    "lone surrogate": '{"id": "P-3", "title": "\\ud800 boom", "state": "ready"}',
    "10 MB title": json.dumps({"id": "P-4", "title": "x" * 10_000_000, "state": "ready"}),
    "option-like id": json.dumps({"id": "-rf", "title": "t", "state": "ready"}),
}


def test_poison_items_are_skipped_with_a_reason_and_every_other_issue_is_dispatched(
    fake_redis, make_settings, tmp_path
):
    path = tmp_path / "issues.jsonl"
    good = [json.dumps({"id": f"G-{i}", "title": "fine", "state": "ready"}) for i in range(3)]
    markup = json.dumps({"id": "[/oops]", "title": "[link=http://evil]x[/link]", "state": "ready"})
    path.write_text("\n".join([good[0], *POISON_LINES.values(), good[1], markup, good[2]]) + "\n")
    s = make_settings(source={"path": str(path)}, dispatch={"max_in_flight": 100})
    ctx = Context(s, fake_redis, FileSource(path))
    roomy_fleet(fake_redis, ctx.keys)
    sent = []
    report = iterate(ctx, lambda task_id, issue, claim, run_id: sent.append(issue))
    assert sorted(i.id for i in sent) == ["G-0", "G-1", "G-2", "[/oops]"]
    reasons = [x["reason"] for x in report.skipped]
    assert len(reasons) == len(POISON_LINES), reasons
    for line in (2, 3, 4, 5, 6):  # each poison line is named with its reason
        assert any(f"issues.jsonl:{line}:" in r for r in reasons), (line, reasons)
    text = " ".join(reasons)
    for why in (
        "nested too deeply",
        "nested deeper than",
        "lone surrogate",
        "larger than 1048576 characters",
        "must not start with '-'",
    ):
        assert why in text, (why, text)
    for issue in sent:  # what is dispatched can always be handed to an agent
        json.dumps(issue.as_json_dict()).encode("utf-8")


def test_an_issue_that_validates_always_serializes():
    with pytest.raises(ValueError, match="lone surrogate"):
        Issue.model_validate({"id": "a", "title": "t", "state": "ready", "extra": {"k": "\udc00"}})
    with pytest.raises(ValueError, match="nested deeper"):
        Issue.model_validate({"id": "a", "title": "t", "state": "ready", "extra": json.loads(_nested(40))})
