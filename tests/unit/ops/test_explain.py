"""explain, retry and dispatches tell the story (issue 21, item 5): an issue the source skips as invalid says why,
an id known nowhere is ``unknown`` (exit 1), a staged issue's steps (stage, round, outcome) and last result are
kept after its attempt ends (fakeredis; through the CLI: tests/integration/test_ctl.py)."""

from __future__ import annotations

import json

from factory_worker.context import Context
from factory_worker.ledger.keys import Keys
from factory_worker.ledger.stages import StageLedger
from factory_worker.ops.operations import explain, retry
from factory_worker.sources import FileSource
from factory_worker.sources.base import MAX_TITLE_CHARS, SourceError


def test_an_issue_the_source_skips_as_invalid_is_explained_with_the_validation_reason(ctx, issues_file):
    with open(issues_file, "a") as fh:
        fh.write(json.dumps({"id": "BIG-1", "title": "x" * 100_000, "state": "ready"}) + "\n")
    e = explain(ctx, "BIG-1")
    assert e.state == "malformed" and f"title: String should have at most {MAX_TITLE_CHARS} characters" in e.text
    ctx.control.set_kill(None, "op")  # a stopped loop does not hide it
    e = explain(ctx, "BIG-1")
    assert e.state == "malformed" and "(the ledger alone says: killed)" in e.text
    assert explain(ctx, "I-0").state == "killed"  # a valid one: the loop is why


def test_an_id_known_nowhere_is_unknown_even_while_the_loop_is_killed(ctx):
    e = explain(ctx, "NOPE-1")
    assert (e.state, e.text) == ("unknown", "neither the ledger nor the source has this id")
    ctx.control.set_kill(None, "op")
    assert explain(ctx, "NOPE-1").state == "unknown"
    data, code = retry(ctx, "NOPE-1")
    assert code == 1 and data["unknown"] and not data["was_parked"]
    data, code = retry(ctx, "I-0")  # in the source, never claimed: nothing to retry, not unknown
    assert code == 0 and not data["unknown"]


def test_an_unreachable_source_is_not_taken_for_unknown(fake_redis, make_settings, tmp_path):
    class Down:
        def poll(self):
            raise SourceError("down")

        def get(self, issue_id):
            raise SourceError("the tracker answered 503")

    ctx = Context(make_settings(), fake_redis, Down())
    e = explain(ctx, "NOPE-1")
    assert e.state != "unknown" and "503" in e.detail["source_error"]
    data, code = retry(ctx, "NOPE-1")
    assert code == 0 and not data["unknown"] and "503" in data["source_error"]


def staged_issue(ctx: Context, issue: str) -> StageLedger:
    """EX-2 as an operator saw it: implemented, rejected by the review, implemented again, accepted in round 2."""
    stages = StageLedger(ctx.ledger)
    claim = ctx.ledger.claim([issue]).claims[0]
    token = claim.token
    assert ctx.ledger.begin(issue, token) == "started"
    stages.open(issue, token, "s-1", None, "implement", ["implement", "review"], "w-1")
    moves = [
        ("implement", 1, "ok", "review", 1),
        ("review", 1, "rejected", "implement", 2),
        ("implement", 2, "ok", "review", 2),
    ]
    for step, (stage, _rnd, outcome, nxt, nxt_round) in enumerate(moves, start=1):
        assert stages.start(issue, token, f"s-{step}", step, stage, "h", 1)[0] == "ok"
        assert stages.next(issue, token, step, outcome, nxt, nxt_round, 0, "", f"s-{step + 1}", None) == step + 1
    assert stages.start(issue, token, "s-4", 4, "review", "h", 1)[0] == "ok"
    ctx.ledger.complete(issue, token)
    return stages


def test_a_staged_issues_steps_and_last_step_are_kept_after_the_attempt(ctx):
    staged_issue(ctx, "EX-2")
    assert not ctx.redis.exists(ctx.keys.stages("EX-2"))  # the progress ends with the attempt, the history not
    e = explain(ctx, "EX-2")
    assert e.state == "done"
    assert e.text.startswith("done (fence 1); never dispatched again; attempt 1's stages: ")
    assert e.text.endswith(
        "1 implement (round 1): ok, 2 review (round 1): rejected, 3 implement (round 2): ok, 4 review (round 2): done"
    )
    steps = e.detail["steps"]
    assert [(s["step"], s["stage"], s["round"], s["outcome"]) for s in steps] == [
        (1, "implement", 1, "ok"),
        (2, "review", 1, "rejected"),
        (3, "implement", 2, "ok"),
        (4, "review", 2, "done"),
    ]
    assert e.detail["last_step"] == "4 review (round 2): done"
    assert ctx.ledger.view.last_steps(["EX-2", "I-0"]) == {"EX-2": steps[-1]}


def test_a_failed_staged_attempt_keeps_its_error_and_the_history_is_bounded(ctx, clock):
    stages = StageLedger(ctx.ledger)
    token = ctx.ledger.claim(["EX-3"]).claims[0].token
    ctx.ledger.begin("EX-3", token)
    stages.open("EX-3", token, "s-1", None, "build", ["build"], "w-1")
    stages.start("EX-3", token, "s-1", 1, "build", "h", 1)
    ctx.ledger.fail("EX-3", token, "exit 2: could not compile widget.c")
    e = explain(ctx, "EX-3")
    assert (
        e.state == "backoff"
        and e.detail["last_step"] == "1 build (round 1): failed (exit 2: could not compile widget.c)"
    )
    key = ctx.keys.stage_history("EX-3")
    old = {"attempt": 0, "step": 1, "stage": "x", "round": 1, "outcome": "ok", "at_ms": 1}
    ctx.redis.rpush(key, *[json.dumps(old)] * (Keys.STAGE_HISTORY_MAX + 10))  # a long past
    clock.advance(600)
    token = ctx.ledger.claim(["EX-3"]).claims[0].token
    ctx.ledger.begin("EX-3", token)
    stages.open("EX-3", token, "u-1", None, "build", ["build"], "w-1")
    stages.start("EX-3", token, "u-1", 1, "build", "h", 1)
    ctx.ledger.fail("EX-3", token, "again")
    assert ctx.redis.llen(key) == Keys.STAGE_HISTORY_MAX  # the latest kept
    assert json.loads(ctx.redis.lindex(key, -1))["error"] == "again"
    assert 0 < ctx.redis.pttl(key) <= Keys.STAGE_HISTORY_TTL_S * 1000


def test_the_lua_history_limits_are_the_keys_limits():
    from factory_worker.ledger.contracts import source

    text = source("complete")
    limits = (
        f"local STAGE_HISTORY_MAX, STAGE_HISTORY_TTL_MS = {Keys.STAGE_HISTORY_MAX}, {Keys.STAGE_HISTORY_TTL_S * 1000}"
    )
    assert limits in text


def test_a_source_file_with_the_issue_is_read_for_explain(fake_redis, make_settings, tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"id": "A-1", "title": "t", "state": "ready"}) + "\n")
    ctx = Context(make_settings(source={"path": str(path)}), fake_redis, FileSource(path))
    fake_redis.hset(ctx.keys.slots, "w", f"5:{2**53}")
    assert explain(ctx, "A-1").state == "claimable"
