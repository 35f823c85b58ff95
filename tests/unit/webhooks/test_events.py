"""What a verified delivery means (events.py), commands and the factory's own comments (comments.py), the
signature checks on their own (verify.py), and the webhooks settings (secrets never shown, ``_FILE`` forms)."""

from __future__ import annotations

import json
import time

import pytest

from factory_worker.config.settings import ConfigError, load_settings
from factory_worker.webhooks import events, verify
from factory_worker.webhooks.comments import command_of, is_own
from factory_worker.webhooks.events import Kind
from tests import fake_webhooks as fw


def _gh(event: str, payload: dict, kind: str = "github", repo: str | None = fw.REPO) -> events.Event:
    headers, _ = fw.github(event, payload)
    return events.github_event(headers, payload, kind, repo)


def test_github_events():
    e = _gh("issues", fw.github_issue(7, action="labeled"))
    assert (e.kind, e.issue, e.action) == (Kind.ISSUE, "7", "labeled")
    for action in ("opened", "reopened", "edited", "unlabeled"):
        assert _gh("issues", fw.github_issue(7, action=action)).kind == Kind.ISSUE
    for action in ("closed", "assigned", "deleted"):
        assert _gh("issues", fw.github_issue(7, action=action)).kind == Kind.IGNORED
    c = _gh("issue_comment", fw.github_comment(7, "hello", association="member"))
    assert c.kind == Kind.COMMENT and c.comment is not None
    assert (c.comment.body, c.comment.author, c.comment.association) == ("hello", "alice", "MEMBER")
    edited = {**fw.github_comment(7, "x"), "action": "edited"}
    assert _gh("issue_comment", edited).kind == Kind.IGNORED
    assert _gh("ping", {"zen": "Keep it logically awesome."}).kind == Kind.PING
    assert _gh("push", {}).kind == Kind.IGNORED
    assert _gh("issues", fw.github_issue(7), kind="linear").kind == Kind.IGNORED  # not the configured source
    assert _gh("issues", fw.github_issue(7), repo=None).kind == Kind.IGNORED
    assert _gh("issues", fw.github_issue(7, repo="ACME/Widgets")).kind == Kind.ISSUE  # GitHub names: any case
    bad = fw.github_issue(7)
    bad["issue"]["number"] = "7; rm -rf"
    with pytest.raises(verify.Refused) as exc:
        _gh("issues", bad)
    assert exc.value.status == 400


def test_linear_events():
    def ev(payload: dict, kind: str = "linear") -> events.Event:
        headers, body = fw.linear(payload)
        return events.linear_event(headers, json.loads(body), body, kind)

    assert ev(fw.linear_issue("ENG-1", action="create")).issue == "ENG-1"
    assert ev(fw.linear_issue("ENG-1", updated_from={"stateId": "s0"})).kind == Kind.ISSUE
    assert ev(fw.linear_issue("ENG-1", updated_from={"labelIds": []})).kind == Kind.ISSUE
    assert ev(fw.linear_issue("ENG-1", updated_from={"priority": 2})).kind == Kind.IGNORED  # rules don't read it
    assert ev(fw.linear_issue("ENG-1", action="remove")).kind == Kind.IGNORED
    assert ev(fw.linear_issue("ENG-1"), kind="github").kind == Kind.IGNORED
    c = ev(fw.linear_comment("ENG-1", "hi", user_id="u-9", name="Gus"))
    assert c.kind == Kind.COMMENT and c.issue == "ENG-1" and c.comment is not None
    assert (c.comment.author, c.comment.author_id) == ("Gus", "u-9")
    no_identifier = fw.linear_comment("ENG-1", "hi")
    del no_identifier["data"]["issue"]
    assert len(ev(no_identifier).issue) == 36  # the issue's UUID: resolved through the source


def test_delivery_ids_are_fixed_length_digests():
    assert len(events.digest("x" * 10_000)) == 40 and events.digest("a") != events.digest("b")


@pytest.mark.parametrize(
    "body,word",
    [
        ("/factory stop", "stop"),
        ("  /Factory RETRY please\nmore", "retry"),
        ("\n\n/factory stop", "stop"),
        ("/factory", ""),
        ("please /factory stop", None),
        ("/factoryx stop", None),
        ("lgtm", None),
    ],
)
def test_command_of(body, word):
    assert command_of(body) == word


def test_the_factorys_own_comments():
    assert is_own("factory-worker: **done**, dispatch 3\n\n<!-- factory-worker:3:abc:done -->")
    assert is_own("anything <!-- factory-worker:1:x:released -->")
    assert not is_own("the factory-worker did well")


def test_verify_each_service():
    secret, body = b"s3cret", b'{"a": 1}'
    good = "sha256=" + verify.hmac_hex(secret, body)
    verify.check_github(secret, {"X-Hub-Signature-256": good}, body)
    for headers in ({}, {"X-Hub-Signature-256": good.upper()}, {"X-Hub-Signature-256": "sha256=ü"}):
        with pytest.raises(verify.Refused) as exc:
            verify.check_github(secret, headers, body)
        assert exc.value.status == 401
    verify.check_linear(secret, {"Linear-Signature": verify.hmac_hex(secret, body)}, body)
    now = time.time()
    verify.check_linear_age({"webhookTimestamp": int(now * 1000) - 59_000}, now, 60)
    for stamp, status in ((int(now * 1000) - 61_000, 401), (int(now * 1000) + 61_000, 401), ("x", 400), (None, 400)):
        with pytest.raises(verify.Refused) as exc:
            verify.check_linear_age({"webhookTimestamp": stamp}, now, 60)
        assert exc.value.status == status
    stamp = str(int(now))
    sig = "v0=" + verify.hmac_hex(secret, b"v0:" + stamp.encode() + b":" + body)
    verify.check_slack(secret, {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": sig}, body, now, 300)
    with pytest.raises(verify.Refused) as exc:
        verify.check_slack(secret, {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": sig}, body, now + 301, 300)
    assert exc.value.status == 401
    with pytest.raises(verify.Refused) as exc:
        verify.check_slack(secret, {"X-Slack-Request-Timestamp": "nan", "X-Slack-Signature": sig}, body, now, 300)
    assert exc.value.status == 400


def test_settings_secrets_are_never_shown_and_may_come_from_files(tmp_path, monkeypatch):
    secret_file = tmp_path / "gh"
    secret_file.write_text("from-a-file\n")
    secret_file.chmod(0o400)
    monkeypatch.setenv("FACTORY_WEBHOOKS__GITHUB_SECRET_FILE", str(secret_file))
    monkeypatch.setenv("FACTORY_WEBHOOKS__SLACK_SIGNING_SECRET", "plain-secret")
    s = load_settings()
    assert s.webhooks.secret("github") == b"from-a-file" and s.webhooks.secret("slack") == b"plain-secret"
    assert s.webhooks.secret("linear") is None
    assert "from-a-file" not in repr(s) and "plain-secret" not in repr(s) and "plain-secret" not in str(s.model_dump())
    assert s.webhooks.relays_comments  # a tracker secret is set
    assert s.webhooks.command_associations == ["OWNER", "MEMBER", "COLLABORATOR"]
    monkeypatch.setenv("FACTORY_WEBHOOKS__COMMAND_ASSOCIATIONS", '["owner", "NONE"]')
    with pytest.raises(ConfigError, match="FACTORY_WEBHOOKS__COMMAND_ASSOCIATIONS"):
        load_settings()
    monkeypatch.setenv("FACTORY_WEBHOOKS__COMMAND_ASSOCIATIONS", '["owner"]')
    assert load_settings().webhooks.command_associations == ["OWNER"]


def test_what_is_not_ours_is_acknowledged_not_refused():
    """A refusal makes the service retry (and Linear disables a webhook that keeps failing): a well-formed
    delivery that is not for the factory is a 200 with nothing done, never a 4xx."""
    comment = fw.linear_comment("ENG-1", "on a project update")
    del comment["data"]["issue"], comment["data"]["issueId"]
    headers, body = fw.linear(comment)
    assert events.linear_event(headers, json.loads(body), body, "linear").kind == Kind.IGNORED
    rate_limited = {
        "token": "t",
        "team_id": "T1",
        "minute_rate_limited": 1518467820,
        "api_app_id": "A1",
        "type": "app_rate_limited",
    }
    e = events.slack_event(rate_limited)
    assert e.kind == Kind.IGNORED and e.delivery == ""
