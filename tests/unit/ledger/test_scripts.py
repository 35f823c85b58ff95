"""The Lua catalogue: contracts parsed from the scripts' headers, one reply convention, typed errors."""

from __future__ import annotations

import pytest

from factory_worker.ledger import scripts
from factory_worker.ledger.keys import Keys
from factory_worker.ledger.scripts import BoundScript, ScriptReplyError, StaleClaimError, checked, contract
from factory_worker.loop.iteration import iterate


def test_every_script_is_found_by_glob_and_declares_keys_args_and_replies():
    assert set(scripts.NAMES) >= {
        "claim",
        "begin",
        "renew",
        "complete",
        "fail",
        "release",
        "retry",
        "iteration_begin",
        "kill_clear",
        "lease_release",
        "run_end",
    }
    for name in scripts.NAMES:
        c = contract(name)
        assert c.replies, name
        for spec in c.keys:  # every declared key is a Keys member, so Python builds KEYS from the same list
            assert hasattr(Keys, spec.member), (name, spec)
        assert scripts.source(name).startswith("local K = {"), name  # the generated header comes first


def test_the_shared_prelude_is_written_once():
    for name in scripts.NAMES:
        text = scripts.source(name)
        assert text.count("local function not_holder") == 1
        assert text.count("redis.call('TIME')") == 1, f"{name}.lua reads TIME itself instead of now_ms()"


def test_a_reply_word_outside_the_contract_raises(fake_redis, keys):
    bound = BoundScript(fake_redis, "lease_release")
    bound._script = lambda keys, args: ["expired"]  # a script answering a word it did not declare
    with pytest.raises(ScriptReplyError, match="does not declare"):
        bound(keys, run_id="r1")


def test_gone_and_held_become_stale_claim_errors():
    with pytest.raises(StaleClaimError) as gone:
        checked(scripts.Reply("gone", []), "I-1", "1:a.1")
    assert gone.value.expired
    with pytest.raises(StaleClaimError) as held:
        checked(scripts.Reply("held", [b"2:b.1"]), "I-1", "1:a.1")
    assert held.value.current == "2:b.1"


def test_a_dry_run_and_explain_agree_with_the_claim_when_the_loop_is_killed(fake_redis, make_settings, tmp_path):
    """The disagreement that motivated one gate: with the kill flag set a dry run reported a dispatch."""
    from factory_worker.context import Context
    from factory_worker.sources import FileSource

    path = tmp_path / "issues.jsonl"
    path.write_text('{"id": "I-1", "title": "t", "state": "ready"}\n')
    s = make_settings(source={"path": str(path)})
    ctx = Context(s, fake_redis, FileSource(path, s.source.ready_states))
    ctx.control.set_kill(None, "test")
    dry = iterate(ctx, None, dry_run=True)
    assert dry.dispatched == 0 and dry.skipped == [{"issue": "I-1", "reason": "killed"}]
    assert ctx.ledger.explain("I-1").state == "killed"
    assert [s.reason for s in ctx.ledger.claim(["I-1"]).skipped] == ["killed"]
