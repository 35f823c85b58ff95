"""Webhooks end to end: a real agent worker (no beat: nothing polls), the receiver as its own process
(``factory-worker webhooks --serve``), a local fake of GitHub's REST API as the source, and deliveries signed
as GitHub signs them. A labelled-issue webhook starts the agent at once; a bad signature, a replay or an
event of another repository starts nothing; a comment reaches the running agent's FACTORY_INBOX within a
second with its source; ``/factory stop`` from a member stops the agent and releases its claim (no attempt
counted), from a stranger does nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from factory_worker.ledger.core import Ledger
from factory_worker.ops.embedded import free_port
from tests import fake_webhooks as fw
from tests.fake_github import FakeGitHub
from tests.support import ROOT, CeleryProc, read_events, settings_from, stack_env, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@pytest.fixture
def gh():
    with FakeGitHub(fw.REPO) as fake:
        yield fake


@pytest.fixture
def stack(redis_url, real_redis, namespace, tmp_path, procs, gh):
    env = stack_env(
        redis_url,
        namespace,
        tmp_path,
        AGENT_SLEEP="0.2",
        FACTORY_LOOP__INTERVAL_S="30",  # a poll could not start anything during the test (and none runs)
        FACTORY_LOOP__STALE_AFTER_S="60",
        FACTORY_SOURCE__KIND="github",
        FACTORY_SOURCE__GITHUB_REPO=gh.repo,
        FACTORY_SOURCE__GITHUB_API_URL=gh.url,
        FACTORY_SOURCE__GITHUB_LABELS=json.dumps(["agent"]),
        FACTORY_WEBHOOKS__GITHUB_SECRET=fw.GITHUB_SECRET,
        FACTORY_DISPATCH__LEASE_TTL_S="10",
    )
    worker = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "2"], queues=[f"{namespace}.agents"])
    procs.append(worker)
    worker.wait_ready()
    port = free_port()
    log = open(tmp_path / "webhooks.log", "wb")
    receiver = subprocess.Popen(
        [sys.executable, "-m", "factory_worker.ctl", "-v", "webhooks", "--serve", f"127.0.0.1:{port}"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: b"receiving webhooks" in (tmp_path / "webhooks.log").read_bytes() or receiver.poll() is not None,
            30,
            what="the receiver listening",
        )
        assert receiver.poll() is None, (tmp_path / "webhooks.log").read_text()
        ledger = Ledger.from_settings(settings_from(env), real_redis)
        wait_until(lambda: real_redis.hlen(ledger.keys.slots), 15, what="the worker's agent slots")
        yield port, ledger, tmp_path / "out"
    finally:
        receiver.terminate()
        code = receiver.wait(15)
        log.close()
        assert code == 0, (tmp_path / "webhooks.log").read_text()[-3000:]


def _post(port: int, event: str, payload: dict, secret: str = fw.GITHUB_SECRET, delivery: str | None = None):
    h, b = fw.github(event, payload, secret=secret, delivery=delivery)
    return fw.post(port, "/webhooks/github", h, b)


def _starts(out) -> list[dict]:
    return [e for e in read_events(out) if e["event"] == "start"]


def test_a_labelled_issue_starts_its_agent_at_once_and_nothing_else_does(stack, gh):
    port, ledger, out = stack
    gh.add(1, "first", labels=("agent",))
    gh.add(2, "second", labels=("agent",))
    assert _post(port, "issues", fw.github_issue(2), secret="wrong")[0] == 401
    assert _post(port, "issues", fw.github_issue(2, repo="evil/fork"))[1] == {"ok": True, "did": "ignored"}
    t0 = time.time()
    status, answer, _ = _post(port, "issues", fw.github_issue(1), delivery="d-1")
    answered = time.time() - t0
    assert status == 200 and answer == {"ok": True, "queued": "issue"} and answered < 1.0
    wait_until(lambda: _starts(out), 15, interval=0.02, what="the agent of issue 1 started")
    (start,) = _starts(out)
    assert start["issue"] == "1" and start["t"] - t0 < 5.0  # long before a poll (interval 30 s) could
    assert _post(port, "issues", fw.github_issue(1), delivery="d-1")[1] == {"ok": True, "duplicate": True}
    wait_until(lambda: ledger.gauges()["done"] == 1, 15, what="issue 1 done")
    time.sleep(1.0)
    assert [e["issue"] for e in _starts(out)] == ["1"]  # not the replay, not issue 2 (bad signature, other repo)
    assert ledger.counters()["dispatched_by_webhook"] == 1


def test_comments_reach_the_running_agent_and_factory_stop_needs_a_member(stack, gh, real_redis):
    port, ledger, out = stack
    gh.add(3, "talk to me", labels=("agent", "waits-for-human"))
    gh.add(4, "long one", labels=("agent", "slow"))
    assert _post(port, "issues", fw.github_issue(3))[0] == 200
    assert _post(port, "issues", fw.github_issue(4))[0] == 200
    wait_until(lambda: len(_starts(out)) == 2, 15, interval=0.02, what="both agents started")
    time.sleep(0.3)
    t0 = time.time()
    status, _, _ = _post(port, "issue_comment", fw.github_comment(3, "use the blue one", "NONE", "bob"))
    assert status == 200
    wait_until(lambda: [e for e in read_events(out) if e["event"] == "inbox"], 10, interval=0.02, what="the inbox read")
    (inbox,) = [e for e in read_events(out) if e["event"] == "inbox"]
    assert inbox["t"] - t0 < 1.0, inbox["t"] - t0
    assert [(m["source"], m["user"], m["text"], m["issue"]) for m in inbox["lines"]] == [
        ("github", "bob", "use the blue one", "3")
    ]
    token = ledger.current_token("4")
    assert token
    assert _post(port, "issue_comment", fw.github_comment(4, "/factory stop", "NONE", "mallory"))[0] == 200
    time.sleep(1.5)  # three stop-flag polls: a stranger's command changes nothing
    assert ledger.current_token("4") == token
    assert not [e for e in read_events(out) if e["issue"] == "4" and e["event"] == "end"]
    assert _post(port, "issue_comment", fw.github_comment(4, "/factory stop", "MEMBER", "alice"))[0] == 200
    wait_until(lambda: ledger.current_token("4") is None, 15, what="the claim of issue 4 released")
    assert ledger.explain("4").state == "claimable"  # released, no attempt counted, no backoff
    assert int(real_redis.hget(ledger.keys.attempts, "4") or 0) == 0
    assert ledger.counters()["released_interrupted"] == 1
