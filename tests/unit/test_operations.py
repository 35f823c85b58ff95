"""Operator actions behind the CLI (fakeredis)."""

from __future__ import annotations






def test_explain_says_when_the_source_does_not_have_the_issue_or_it_is_not_ready(ctx):
    from factory_worker.operations import explain

    assert explain(ctx, "I-0").state == "claimable"
    gone = explain(ctx, "NOPE-1")
    assert gone.state == "not-in-source" and "not in the source" in gone.text
    blocked = explain(ctx, "B-1")
    assert blocked.state == "not-ready" and '"blocked"' in blocked.text
    claim = ctx.ledger.claim(["I-1"]).claims[0]
    assert explain(ctx, "I-1").detail["token"] == claim.token  # the ledger's answer wins when it says no
