"""A Slack thread per dispatch, end to end: a real worker and beat, a local fake of Slack's Web API. A
human's reply reaches the running agent's inbox; the thread is told how the dispatch ended (done, failed with
its error, stopped); once it ended (done, failure, kill-loop --release-agents, warm shutdown, the worker
SIGKILLed) the thread is never read again."""

from __future__ import annotations

import signal
import time

import pytest

from factory_worker.ledger.core import Ledger
from tests.fake_slack import CHANNEL, FakeSlack
from tests.support import CeleryProc, ctl, read_events, settings_from, stack_env, wait_until, write_issues

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@pytest.fixture
def slack():
    with FakeSlack() as fake:
        yield fake


def _stack(redis_url, namespace, tmp_path, procs, slack, issue):
    write_issues(tmp_path / "issues.jsonl", [issue])
    env = stack_env(
        redis_url,
        namespace,
        tmp_path,
        FACTORY_SLACK__CHANNEL=CHANNEL,
        FACTORY_SLACK__API_URL=slack.url,
        FACTORY_SLACK__POLL_S="0.2",
        SLACK_BOT_TOKEN="xoxb-test",
        AGENT_SLEEP="0",
    )
    worker = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "2"])
    procs.append(worker)
    worker.wait_ready()
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    thread_ts = wait_until(lambda: next(iter(slack.threads), None), 30, what="the dispatch's Slack thread")
    return env, worker, thread_ts


def _quiet_after_end(slack: FakeSlack, thread_ts: str) -> None:
    wait_until(
        lambda: (
            slack.threads[thread_ts][-1]["text"].startswith("factory-worker: ") and len(slack.threads[thread_ts]) > 1
        ),
        20,
        what="the end told in the thread",
    )
    ended = time.time()
    time.sleep(1.5)  # seven poll intervals
    assert slack.reads_of(thread_ts, after=ended) == 0, "the thread was read after its dispatch ended"


def test_a_reply_reaches_the_agent_and_done_ends_the_watch(redis_url, real_redis, namespace, tmp_path, procs, slack):
    env, _, thread_ts = _stack(
        redis_url,
        namespace,
        tmp_path,
        procs,
        slack,
        {"id": "S-1", "title": "talk to me", "state": "ready", "labels": ["waits-for-human"]},
    )
    assert "S-1" in slack.threads[thread_ts][0]["text"]
    slack.reply(thread_ts, "use the blue one")
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    wait_until(lambda: ledger.explain("S-1").state == "done", 30, what="the agent done")
    (inbox,) = [e for e in read_events(tmp_path / "out") if e["event"] == "inbox"]
    assert [m["text"] for m in inbox["lines"]] == ["use the blue one"]
    _quiet_after_end(slack, thread_ts)
    assert slack.threads[thread_ts][-1]["text"] == "factory-worker: done"


def test_kill_loop_release_agents_ends_the_watch(redis_url, real_redis, namespace, tmp_path, procs, slack):
    env, _, thread_ts = _stack(
        redis_url,
        namespace,
        tmp_path,
        procs,
        slack,
        {"id": "S-2", "title": "slow", "state": "ready", "labels": ["slow"]},
    )
    res = ctl(env, "kill-loop", "--release-agents", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    _quiet_after_end(slack, thread_ts)
    assert "stopped" in slack.threads[thread_ts][-1]["text"]


def test_a_warm_shutdown_ends_the_watch(redis_url, real_redis, namespace, tmp_path, procs, slack):
    env, worker, thread_ts = _stack(
        redis_url,
        namespace,
        tmp_path,
        procs,
        slack,
        {"id": "S-3", "title": "slow", "state": "ready", "labels": ["slow"]},
    )
    worker.signal(signal.SIGTERM)
    worker.proc.wait(30)
    _quiet_after_end(slack, thread_ts)
    assert "stopped" in slack.threads[thread_ts][-1]["text"]


def test_a_failed_attempt_is_told_with_its_error_and_ends_the_watch(
    redis_url, real_redis, namespace, tmp_path, procs, slack
):
    env, _, thread_ts = _stack(
        redis_url,
        namespace,
        tmp_path,
        procs,
        slack,
        {"id": "S-4", "title": "broken", "state": "ready", "labels": ["always-fails"]},
    )
    _quiet_after_end(slack, thread_ts)
    text = slack.threads[thread_ts][-1]["text"]
    assert text.startswith("factory-worker: failed: backing off") and "exit" in text, text


def test_a_sigkilled_worker_leaves_no_watcher_reading_the_thread(
    redis_url, real_redis, namespace, tmp_path, procs, slack
):
    """The watcher is a thread of the worker: SIGKILL (nothing can be told) ends its reads with the process."""
    env, worker, thread_ts = _stack(
        redis_url,
        namespace,
        tmp_path,
        procs,
        slack,
        {"id": "S-5", "title": "slow", "state": "ready", "labels": ["slow"]},
    )
    wait_until(lambda: slack.reads_of(thread_ts) >= 2, 10, what="the thread being watched")
    worker.signal(signal.SIGKILL)
    worker.proc.wait(10)
    killed = time.time()
    time.sleep(1.5)  # seven poll intervals
    assert slack.reads_of(thread_ts, after=killed + 0.3) == 0, "the thread was read after the worker died"
