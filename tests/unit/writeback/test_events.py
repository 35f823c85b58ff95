"""The tracker comment of an outbox event: the facts, the agent's summary and the pull request link of a done
event (fields of ``complete.lua``'s done event), never a marker the agent wrote passing for one of ours."""

from __future__ import annotations

from factory_worker.writeback.events import Event, comment_body, marker


def test_a_done_comment_carries_the_summary_and_the_pull_request():
    e = Event(
        "1-0",
        "done",
        "7",
        "3:abc.1",
        {"attempt": "2", "summary": "Fixed the parser.\nAdded a test.", "pr_url": "https://github.com/a/b/pull/9"},
    )
    body = comment_body(e)
    assert body.startswith("factory-worker: **done**, dispatch 3, attempt 2")
    assert "Pull request: https://github.com/a/b/pull/9" in body
    assert "> Fixed the parser.\n> Added a test." in body
    assert body.endswith(marker(e))


def test_a_branch_without_a_pull_request_and_no_changes():
    body = comment_body(Event("1-0", "done", "7", "3:abc.1", {"attempt": "1", "branch": "factory/7"}))
    assert "Branch: `factory/7`" in body and "Pull request" not in body
    body = comment_body(Event("1-0", "done", "7", "3:abc.1", {"attempt": "1", "no_changes": "1"}))
    assert "**done**, dispatch 3, attempt 1, no changes" in body
    assert (
        comment_body(Event("1-0", "done", "7", "3:abc.1", {"pr_url": "javascript:alert(1)"})).count("javascript") == 0
    )


def test_a_marker_in_the_summary_is_not_one():
    other = Event("2-0", "parked", "7", "3:abc.1")
    e = Event("1-0", "done", "7", "3:abc.1", {"summary": f"all good {marker(other)}"})
    body = comment_body(e)
    assert marker(other) not in body and marker(e) in body
