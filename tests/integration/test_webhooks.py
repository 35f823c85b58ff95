"""The webhook receiver over real HTTP (a free port on 127.0.0.1) against a real redis-server: each service's
signatures (good, wrong, missing, stale, oversized, replay, unconfigured), an issue event's one gate pass
through the poll's rules, gate and caps, the answer never waiting for the source, a full queue, and tracker
comments (commands from those allowed, lines for the running agent's inbox). Sending an agent task is a
recorder here (the Celery path is tests/integration/test_webhooks_e2e.py)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from factory_worker.chat.inbox import TrackerRelay
from factory_worker.context import Context
from factory_worker.loop.iteration import dispatch_claims
from factory_worker.loop.presence import publish_slots
from factory_worker.ops.operations import stop_agents
from factory_worker.sources.base import Issue, PollResult
from factory_worker.webhooks.receiver import Receiver
from factory_worker.webhooks.server import make_server
from tests import fake_webhooks as fw
from tests.support import Recorder, wait_until

pytestmark = pytest.mark.integration

SECRETS = {
    "github_secret": fw.GITHUB_SECRET,
    "linear_secret": fw.LINEAR_SECRET,
    "slack_signing_secret": fw.SLACK_SECRET,
}


class Source:
    """An issue source whose ``get`` answers what the test put in ``issues`` (after ``delay_s``)."""

    def __init__(self, *issues: Issue, delay_s: float = 0.0) -> None:
        self.issues = {i.id: i for i in issues}
        self.delay_s = delay_s
        self.gets: list[str] = []

    def put(self, issue_id: str, labels: tuple[str, ...] = ("agent",), state: str = "ready", **kw: Any) -> Issue:
        issue = self.issues[issue_id] = Issue(
            id=issue_id, title=f"t {issue_id}", state=state, labels=list(labels), **kw
        )
        return issue

    def poll(self) -> PollResult:
        return PollResult(issues=list(self.issues.values()))

    def get(self, issue_id: str) -> Issue | None:
        self.gets.append(issue_id)
        time.sleep(self.delay_s)
        return self.issues.get(issue_id)


def github_settings(**webhooks: Any) -> dict[str, Any]:
    return {
        "source": {"kind": "github", "github_repo": fw.REPO, "github_labels": ["agent"]},
        "webhooks": {**SECRETS, **webhooks},
    }


@pytest.fixture
def make_ctx(real_redis, redis_url, make_settings):
    def _make(src: Any, **over: Any) -> Context:
        over.setdefault("dispatch", {"max_in_flight": 3, "lease_ttl_s": 10, "queue_lease_s": 10})
        ctx = Context(make_settings(redis_url=redis_url, **over), real_redis, src)
        publish_slots(ctx, "agents@test", 100)  # a live agent worker with room: the caps are what bind here
        return ctx

    return _make


@contextlib.contextmanager
def receiving(ctx: Context, send: Any = None, stop: Any = None) -> Iterator[tuple[Receiver, int]]:
    receiver = Receiver(ctx, send or Recorder(), stop or (lambda c, t: None)).start()
    server = make_server(receiver, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver, server.server_port
    finally:
        server.shutdown()
        server.server_close()
        receiver.close()


def snapshot(r) -> dict[str, Any]:
    return {k: r.dump(k) for k in sorted(r.keys("*"))}


def settle(receiver: Receiver) -> None:
    """Wait for the worker thread to act on everything queued."""
    receiver.queue.join()


# -- each service's signature, over HTTP ------------------------------------------------------------------------------
def _deliveries(service: str) -> dict[str, Any]:
    """(path, good, wrong, missing, stale or None, oversized) deliveries of one service."""
    if service == "github":
        good = lambda: fw.github("issues", fw.github_issue(1))  # noqa: E731
        h, b = good()
        wrong = ({**h, "X-Hub-Signature-256": "sha256=" + "0" * 64}, b)
        missing = ({k: v for k, v in h.items() if k != "X-Hub-Signature-256"}, b)
        big = fw.github_issue(1)
        big["issue"]["body"] = "x" * 5000
        return {
            "path": "/webhooks/github",
            "good": good,
            "wrong": wrong,
            "missing": missing,
            "stale": None,
            "big": fw.github("issues", big),
            "other_secret": fw.github("issues", fw.github_issue(1), secret="nope"),
        }
    if service == "linear":
        good = lambda: fw.linear(fw.linear_issue("ENG-1"))  # noqa: E731
        h, b = good()
        big = fw.linear_issue("ENG-1")
        big["data"]["description"] = "x" * 5000
        return {
            "path": "/webhooks/linear",
            "good": good,
            "wrong": ({**h, "Linear-Signature": "ab" * 32}, b),
            "missing": ({k: v for k, v in h.items() if k != "Linear-Signature"}, b),
            "stale": fw.linear(fw.linear_issue("ENG-1"), at_ms=int((time.time() - 61) * 1000)),
            "big": fw.linear(big),
            "other_secret": fw.linear(fw.linear_issue("ENG-1"), secret="nope"),
        }
    good = lambda: fw.slack(fw.slack_event())  # noqa: E731
    h, b = good()
    return {
        "path": "/webhooks/slack",
        "good": good,
        "wrong": ({**h, "X-Slack-Signature": "v0=" + "1" * 64}, b),
        "missing": ({k: v for k, v in h.items() if k != "X-Slack-Signature"}, b),
        "stale": fw.slack(fw.slack_event(), at_s=int(time.time()) - 301),
        "big": fw.slack(fw.slack_event(text="x" * 5000)),
        "other_secret": fw.slack(fw.slack_event(), secret="nope"),
    }


@pytest.mark.parametrize("service", ["github", "linear", "slack"])
def test_signatures_refuse_what_the_service_did_not_sign(service, make_ctx, real_redis):
    """Good -> 200; wrong, missing, another secret, stale -> 401; oversized -> 413 (before reading); a replay of
    a good delivery -> 200 and ignored. Nothing a refused request carries changes Redis or sends anything."""
    src = Source()
    src.put("1")
    src.put("ENG-1", team="ENG")
    kind = {"github": "github", "linear": "linear", "slack": "file"}[service]
    source = {"kind": kind, "github_repo": fw.REPO, "github_labels": ["agent"], "linear": {"team": "ENG"}}
    ctx = make_ctx(src, source=source, webhooks={**SECRETS, "max_body_bytes": 4096})
    d = _deliveries(service)
    send = Recorder()
    with receiving(ctx, send) as (receiver, port):
        before = snapshot(real_redis)
        refused = [("wrong", 401), ("missing", 401), ("other_secret", 401), ("big", 413)]
        if d["stale"] is not None:
            refused.append(("stale", 401))
        for name, status in refused:
            headers, body = d[name]
            got, answer, _ = fw.post(port, d["path"], headers, body)
            assert got == status, (name, got, answer)
            assert "error" in answer
        settle(receiver)
        assert snapshot(real_redis) == before and send.sent == [] and not receiver.done
        headers, body = d["good"]()
        got, answer, _ = fw.post(port, d["path"], headers, body)
        assert got == 200 and answer["ok"], answer
        settle(receiver)
        replayed, again, _ = fw.post(port, d["path"], headers, body)
        assert replayed == 200 and again == {"ok": True, "duplicate": True}
        settle(receiver)
    if service == "slack":  # acknowledged only: nothing is dispatched from Slack events
        assert send.sent == [] and not receiver.done
    else:
        assert [s[1] for s in send.sent] == ["1" if service == "github" else "ENG-1"]  # once, not twice
        assert [e["verdict"] for e in receiver.done] == ["dispatched"]


def test_an_endpoint_without_its_secret_is_not_served_and_bad_requests_are_refused(make_ctx, real_redis):
    ctx = make_ctx(
        Source(),
        source={"kind": "github", "github_repo": fw.REPO, "github_labels": ["agent"]},
        webhooks={"github_secret": fw.GITHUB_SECRET},
    )
    with receiving(ctx) as (receiver, port):
        before = snapshot(real_redis)
        h, b = fw.linear(fw.linear_issue("ENG-1"))
        assert fw.post(port, "/webhooks/linear", h, b)[0] == 404  # unsigned input is never accepted
        h, b = fw.slack(fw.slack_event())
        assert fw.post(port, "/webhooks/slack", h, b)[0] == 404
        assert fw.post(port, "/webhooks/nope", {}, b"{}")[0] == 404
        h, b = fw.github("issues", fw.github_issue(1))
        body = b"not json"
        signed = {**h, "X-Hub-Signature-256": "sha256=" + fw._hex(fw.GITHUB_SECRET, body)}
        assert fw.post(port, "/webhooks/github", signed, body)[0] == 400  # signed, but malformed
        no_id = {k: v for k, v in h.items() if k != "X-GitHub-Delivery"}
        assert fw.post(port, "/webhooks/github", no_id, b)[0] == 400
        settle(receiver)
        assert snapshot(real_redis) == before


def test_slack_url_verification_is_answered_with_its_challenge(make_ctx):
    ctx = make_ctx(Source(), webhooks=SECRETS)
    with receiving(ctx) as (_, port):
        h, b = fw.slack(
            {
                "token": "t",
                "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
                "type": "url_verification",
            }
        )
        status, answer, _ = fw.post(port, "/webhooks/slack", h, b)
        assert status == 200 and answer == {"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}
        h, b = fw.slack({"token": "t", "challenge": "x", "type": "url_verification"}, secret="nope")
        assert fw.post(port, "/webhooks/slack", h, b)[0] == 401


def test_github_events_of_another_repository_or_a_pull_request_dispatch_nothing(make_ctx):
    src = Source()
    src.put("1")
    ctx = make_ctx(src, **github_settings())
    send = Recorder()
    with receiving(ctx, send) as (receiver, port):
        for payload in (fw.github_issue(1, repo="evil/fork"), {**fw.github_issue(1), "action": "closed"}):
            h, b = fw.github("issues", payload)
            status, answer, _ = fw.post(port, "/webhooks/github", h, b)
            assert status == 200 and answer == {"ok": True, "did": "ignored"}
        pr = fw.github_comment(1, "hi")
        pr["issue"]["pull_request"] = {"url": "https://api.github.com/repos/acme/widgets/pulls/1"}
        h, b = fw.github("issue_comment", pr)
        assert fw.post(port, "/webhooks/github", h, b)[1] == {"ok": True, "did": "ignored"}
        settle(receiver)
    assert send.sent == [] and src.gets == []


# -- an issue event: one gate pass, through the poll's rules, gate and caps --------------------------------------------
def _event(port: int, number: int) -> None:
    h, b = fw.github("issues", fw.github_issue(number))
    status, answer, _ = fw.post(port, "/webhooks/github", h, b)
    assert status == 200 and answer == {"ok": True, "queued": "issue"}, answer


def test_an_issue_event_dispatches_at_once_only_where_the_gate_would(make_ctx, real_redis):
    src = Source()
    for n in range(1, 8):
        src.put(str(n))
    src.put("8", labels=("agent", "factory:done"))  # the factory's done label: not ready, whatever the ledger says
    src.put("9", labels=("agent",), state="open")  # the source says it is not ready (no filter label)
    ctx = make_ctx(
        src,
        **github_settings(),
        dispatch={
            "max_in_flight": 3,
            "lease_ttl_s": 10,
            "queue_lease_s": 10,
            "backoff_base_s": 300,
            "backoff_max_s": 300,
        },
    )
    # 2 is done in the ledger, 3 is backing off after a failed attempt
    for issue in ("2", "3"):
        (claim,) = ctx.ledger.claim([issue]).claims
        ctx.ledger.begin(issue, claim.token)
        if issue == "2":
            ctx.ledger.complete(issue, claim.token)
        else:
            ctx.ledger.fail(issue, claim.token, "boom")
    send = Recorder()
    with receiving(ctx, send) as (receiver, port):
        for n in (1, 1, 2, 3, 8, 9, 4, 5, 6, 42):
            _event(port, n)
        settle(receiver)
    got = [(e["issue"], e["verdict"], e["reason"].split(":")[0]) for e in receiver.done]
    assert got == [
        ("1", "dispatched", ""),
        ("1", "skipped", "in-flight"),
        ("2", "skipped", "done"),
        ("3", "skipped", "backoff"),
        ("8", "ruled-out", "not ready"),
        ("9", "ruled-out", "not ready"),
        ("4", "dispatched", ""),
        ("5", "dispatched", ""),
        ("6", "skipped", "max-in-flight"),  # the in-flight cap (3) binds an event as it binds a poll
        ("42", "not-in-source", "not in the source"),
    ]
    assert [s[1] for s in send.sent] == ["1", "4", "5"]
    for task_id, issue, token, _ in send.sent:  # the agent task is recorded as an iteration records it
        assert real_redis.hgetall(ctx.keys.agent_task(task_id))["token"] == token
        assert ctx.ledger.current_token(issue) == token
    counters = ctx.ledger.counters()
    assert counters["dispatched_by_webhook"] == 3 and counters["dispatched"] == 3
    assert src.gets.count("1") == 2  # every event re-reads its issue from the source


def test_no_free_slot_and_a_paused_or_killed_loop_dispatch_nothing(make_ctx, real_redis):
    src = Source()
    for n in (1, 2):
        src.put(str(n))
    ctx = make_ctx(src, **github_settings())
    real_redis.delete(ctx.keys.slots)
    publish_slots(ctx, "agents@test", 1)  # the fleet has one agent slot
    send = Recorder()
    with receiving(ctx, send) as (receiver, port):
        _event(port, 1)
        _event(port, 2)
        settle(receiver)
        ctx.control.set_paused(True, by="test")
        real_redis.delete(ctx.keys.slots)
        publish_slots(ctx, "agents@test", 100)
        _event(port, 2)
        settle(receiver)
        ctx.control.set_paused(False)
        ctx.control.set_kill(None, "test")
        _event(port, 2)
        settle(receiver)
    assert [(e["issue"], e["verdict"], e["reason"]) for e in receiver.done] == [
        ("1", "dispatched", ""),
        ("2", "skipped", "no-free-slot"),
        ("2", "skipped", "paused"),
        ("2", "skipped", "killed"),
    ]
    assert [s[1] for s in send.sent] == ["1"]


def test_a_failed_send_releases_the_claim(make_ctx):
    src = Source()
    src.put("1")
    ctx = make_ctx(src, **github_settings())
    with receiving(ctx, Recorder(fail_after=0)) as (receiver, port):
        _event(port, 1)
        settle(receiver)
    assert "ConnectionError" in receiver.done[-1]["error"]
    assert ctx.ledger.explain("1").state == "claimable"
    assert ctx.ledger.counters()["released_send-failed"] == 1


# -- the answer never waits ----------------------------------------------------------------------------------------------
def test_the_answer_does_not_wait_for_a_slow_source(make_ctx):
    src = Source(delay_s=3.0)
    for n in (1, 2, 3):
        src.put(str(n))
    ctx = make_ctx(src, **github_settings())
    send = Recorder()
    with receiving(ctx, send) as (receiver, port):
        took = []
        for n in (1, 2, 3):
            t0 = time.monotonic()
            _event(port, n)
            took.append(time.monotonic() - t0)
        assert max(took) < 1.0, took  # answered while the worker thread waits on the source
        assert send.sent == []  # nothing was done yet: the work goes on after the answer
        wait_until(lambda: len(send.sent) == 3, 15, interval=0.05, what="three dispatches after the answers")
    assert [d["ms"] >= 3000 for d in receiver.done] == [True, True, True]


def test_a_full_queue_answers_503_and_its_retry_is_accepted(make_ctx):
    src = Source(delay_s=1.0)
    for n in (1, 2, 3):
        src.put(str(n))
    ctx = make_ctx(src, **github_settings(queue_size=1))
    send = Recorder()
    with receiving(ctx, send) as (receiver, port):
        _event(port, 1)
        wait_until(lambda: src.gets, 5, interval=0.01, what="the worker thread busy with the first event")
        _event(port, 2)  # waits in the queue (size 1)
        h, b = fw.github("issues", fw.github_issue(3))
        t0 = time.monotonic()
        status, answer, headers = fw.post(port, "/webhooks/github", h, b)
        assert status == 503 and headers.get("Retry-After") == "5" and time.monotonic() - t0 < 0.5, answer
        settle(receiver)
        status, answer, _ = fw.post(port, "/webhooks/github", h, b)  # the service retries the same delivery
        assert status == 200 and answer == {"ok": True, "queued": "issue"}
        settle(receiver)
    assert [s[1] for s in send.sent] == ["1", "2", "3"]


# -- comments ----------------------------------------------------------------------------------------------------------
def _running(ctx: Context, issue: str, hostname: str = "gone@nowhere") -> tuple[str, str]:
    """Claim ``issue`` and start its agent task as a worker would; (task id, token)."""
    (claim,) = ctx.ledger.claim([issue], fleet_slots=True).claims
    (sent,) = dispatch_claims(ctx, Recorder(), [claim], {issue: ctx.source.get(issue)}, None)
    assert ctx.ledger.begin(issue, claim.token, sent["task_id"], hostname, 1) == "started"
    return sent["task_id"], claim.token


def _comment(port: int, number: int, body: str, association: str = "MEMBER", login: str = "alice") -> None:
    h, b = fw.github("issue_comment", fw.github_comment(number, body, association, login))
    status, answer, _ = fw.post(port, "/webhooks/github", h, b)
    assert status == 200 and answer == {"ok": True, "queued": "comment"}, answer


def test_factory_stop_from_a_member_stops_the_agent_and_from_a_stranger_does_nothing(make_ctx, real_redis):
    src = Source()
    src.put("1")
    ctx = make_ctx(src, **github_settings())
    task_id, token = _running(ctx, "1")
    stopped: list[list[str]] = []

    def stop(c: Context, tasks: list[str]) -> Any:
        stopped.append(tasks)
        return stop_agents(c, tasks, grace_s=0.3)  # its worker is dead: the claim is released by token

    with receiving(ctx, stop=stop) as (receiver, port):
        _comment(port, 1, "/factory stop", association="NONE", login="mallory")
        _comment(port, 1, "/factory stop", association="CONTRIBUTOR", login="mallory")
        settle(receiver)
        assert stopped == [] and ctx.ledger.current_token("1") == token
        assert real_redis.get(ctx.keys.agent_stop(task_id)) is None
        _comment(port, 1, "/factory stop\nplease", association="MEMBER")
        settle(receiver)
        wait_until(lambda: ctx.ledger.current_token("1") is None, 5, interval=0.05, what="the claim released")
    assert stopped == [[task_id]]
    assert [e["did"] for e in receiver.done] == ["refused", "refused", "stop"]
    assert ctx.ledger.counters().get("released_interrupted") == 1
    assert int(real_redis.hget(ctx.keys.attempts, "1") or 0) == 0  # no attempt counted
    assert not real_redis.lrange(ctx.keys.inbox(task_id), 0, -1)  # a command never reaches the agent


def test_factory_retry_unparks_and_dispatches_at_once(make_ctx):
    src = Source()
    src.put("1")
    ctx = make_ctx(
        src,
        **github_settings(),
        dispatch={"max_in_flight": 3, "lease_ttl_s": 10, "queue_lease_s": 10, "max_attempts": 1},
    )
    (claim,) = ctx.ledger.claim(["1"]).claims
    ctx.ledger.begin("1", claim.token)
    assert ctx.ledger.fail("1", claim.token, "boom").state == "parked"
    send = Recorder()
    with receiving(ctx, send) as (receiver, port):
        _comment(port, 1, "/factory retry", association="OWNER")
        settle(receiver)
    assert receiver.done[-1]["did"] == "retry" and receiver.done[-1]["detail"] == "dispatched"
    assert [s[1] for s in send.sent] == ["1"]


def test_a_comment_reaches_the_running_agents_inbox_within_a_second(make_ctx, real_redis, tmp_path):
    src = Source()
    src.put("1")
    src.put("2")
    ctx = make_ctx(src, **github_settings())
    task_id, _ = _running(ctx, "1")
    other, _ = _running(ctx, "2")
    inbox = tmp_path / "inbox.jsonl"
    inbox.touch()
    relay = TrackerRelay(real_redis, ctx.keys, task_id, inbox, poll_s=0.1).start()
    try:
        with receiving(ctx) as (receiver, port):
            _comment(port, 1, "factory-worker: **done**\n\n<!-- factory-worker:1:abc:done -->")  # the factory's own
            t0 = time.monotonic()
            _comment(port, 1, "use the blue one", association="NONE", login="bob")  # anyone may talk to it
            wait_until(lambda: inbox.read_text().strip(), 5, interval=0.02, what="the comment in the inbox")
            took = time.monotonic() - t0
            _comment(port, 3, "nobody runs issue 3")
            settle(receiver)
    finally:
        relay.close()
    (line,) = [json.loads(x) for x in inbox.read_text().splitlines()]
    assert took < 1.0, took
    assert line == {
        "source": "github",
        "ts": "2026-01-01T00:00:00Z",
        "user": "bob",
        "text": "use the blue one",
        "issue": "1",
        "url": "https://github.com/acme/widgets/issues/1#issuecomment-1001",
    }
    assert [e["did"] for e in receiver.done] == ["ignored", "inbox", "ignored"]
    assert not real_redis.exists(ctx.keys.inbox(task_id))  # drained and forgotten at close
    assert not real_redis.lrange(ctx.keys.inbox(other), 0, -1)  # the other issue's agent is not told


def test_linear_comments_commands_need_a_team_member(make_ctx, real_redis):
    from tests.fake_linear import FakeLinear

    with FakeLinear() as linear:
        linear.add("ENG-1", "t")
        linear.users = {
            "user-1": {"id": "user-1", "active": True, "guest": False, "teams": {"nodes": [{"key": "ENG"}]}},
            "guest-1": {"id": "guest-1", "active": True, "guest": True, "teams": {"nodes": [{"key": "ENG"}]}},
            "other-1": {"id": "other-1", "active": True, "guest": False, "teams": {"nodes": [{"key": "OPS"}]}},
        }
        from factory_worker.config.linear import LinearSettings
        from factory_worker.sources.linear import LinearSource

        source = LinearSource(LinearSettings(team="ENG", api_url=linear.url), token=linear.token)
        ctx = make_ctx(
            source, source={"kind": "linear", "linear": {"team": "ENG", "api_url": linear.url}}, webhooks=SECRETS
        )
        task_id, token = _running(ctx, "ENG-1")
        stopped: list[list[str]] = []
        with receiving(ctx, stop=lambda c, t: stopped.append(t)) as (receiver, port):
            for user in ("guest-1", "other-1", "nobody", "user-1"):
                h, b = fw.linear(fw.linear_comment("ENG-1", "/factory stop", user_id=user))
                assert fw.post(port, "/webhooks/linear", h, b)[:2] == (200, {"ok": True, "queued": "comment"})
            h, b = fw.linear(fw.linear_comment("ENG-1", "try the other endpoint", user_id="guest-1", name="Gus"))
            assert fw.post(port, "/webhooks/linear", h, b)[0] == 200
            settle(receiver)
            wait_until(lambda: stopped, 5, interval=0.05, what="the member's stop")
    assert [e["did"] for e in receiver.done] == ["refused", "refused", "refused", "stop", "inbox"]
    assert stopped == [[task_id]]
    (line,) = [json.loads(x) for x in real_redis.lrange(ctx.keys.inbox(task_id), 0, -1)]
    assert line["source"] == "linear" and line["user"] == "Gus" and line["text"] == "try the other endpoint"
    assert line["issue"] == "ENG-1"


def test_a_trickling_or_lengthless_request_is_cut_off(make_ctx, real_redis):
    """The body is due whole within webhooks.read_timeout_s, however slowly it trickles (408); a request without
    Content-Length is refused (411) before anything is read."""
    import socket

    ctx = make_ctx(Source(), **github_settings(read_timeout_s=1.0))
    with receiving(ctx) as (receiver, port):
        before = snapshot(real_redis)
        h, b = fw.github("issues", fw.github_issue(1))
        head = "".join(f"{k}: {v}\r\n" for k, v in h.items())
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                f"POST /webhooks/github HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(b)}\r\n\r\n".encode()
            )
            t0 = time.monotonic()
            answer = b""
            for i in range(len(b)):  # one byte every 0.3 s: each read is in time, the whole is not
                try:
                    sock.sendall(b[i : i + 1])
                except OSError:
                    break
                time.sleep(0.3)
                sock.setblocking(False)
                try:
                    answer += sock.recv(4096)
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
                if answer:
                    break
            took = time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.0 408"), answer[:80]
        assert took < 2.5, took
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"POST /webhooks/github HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.0 411")
        settle(receiver)
        assert snapshot(real_redis) == before and not receiver.done
