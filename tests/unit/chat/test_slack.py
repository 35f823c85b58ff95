"""The Slack conversation of a dispatch against a local fake of the Web API: the thread, replies into the
inbox, Retry-After honoured, and no read once it is closed."""

from __future__ import annotations

import email.utils
import json
import logging
import time

import pytest

from factory_worker.chat.slack import Conversation, SlackClient, SlackError, ended_text, open_conversation
from factory_worker.config.settings import SlackSettings
from harness import wait_until
from tests.fake_slack import CHANNEL, FakeSlack


@pytest.fixture
def slack(monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-s3cret")
    with FakeSlack() as fake:
        yield fake


def cfg(slack: FakeSlack, **kw) -> SlackSettings:
    return SlackSettings(**{"channel": CHANNEL, "api_url": slack.url, "poll_s": 0.1, "poll_max_s": 2, **kw})


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_replies_reach_the_inbox_in_order_and_the_bots_own_messages_do_not(slack, tmp_path):
    inbox = tmp_path / "inbox.jsonl"
    inbox.touch()
    conv = open_conversation(cfg(slack), inbox, "EX-1", "fix it", "agent-1")
    assert conv is not None and conv.thread_ts in slack.threads
    conv.post("a note from the factory")  # the bot's own: never delivered
    slack.reply(conv.thread_ts, "first")
    slack.reply(conv.thread_ts, "second", user="U2")
    wait_until(lambda: len(lines(inbox)) == 2, 5, interval=0.05, what="two replies in the inbox")
    assert [(m["user"], m["text"]) for m in lines(inbox)] == [("U0HUMAN", "first"), ("U2", "second")]
    assert {m["source"] for m in lines(inbox)} == {"slack"}  # the inbox format of every channel (chat/inbox.py)
    slack.reply(conv.thread_ts, "third")
    wait_until(lambda: len(lines(inbox)) == 3, 5, interval=0.05, what="a later reply")
    conv.close(ended_text("done"))
    closed_at = time.time()
    time.sleep(0.5)
    assert slack.reads_of(conv.thread_ts, after=closed_at) == 0  # no read after close returned
    assert slack.threads[conv.thread_ts][-1]["text"] == "factory-worker: done"


def test_every_page_of_a_long_thread_is_read(slack, tmp_path):
    slack.page_size = 2
    inbox = tmp_path / "inbox.jsonl"
    inbox.touch()
    conv = Conversation(cfg(slack), SlackClient(cfg(slack)), inbox)
    conv.thread_ts = conv.last_ts = slack._post({"channel": CHANNEL, "text": "t"})[1]["ts"]
    conv.channel = CHANNEL
    for n in range(5):
        slack.reply(conv.thread_ts, f"m{n}")
    assert conv.read_once() == 5 and conv.read_once() == 0
    assert [m["text"] for m in lines(inbox)] == [f"m{n}" for n in range(5)]


def test_retry_after_is_honoured_and_reads_go_on_afterwards(slack, tmp_path):
    inbox = tmp_path / "inbox.jsonl"
    inbox.touch()
    conv = open_conversation(cfg(slack), inbox, "EX-1", "t", "agent-1")
    slack.fail("conversations.replies", 429, headers={"Retry-After": "1"})
    wait_until(lambda: slack.reads_of(conv.thread_ts) >= 1, 5, interval=0.02, what="the rate-limited read")
    limited_at = time.time()
    slack.reply(conv.thread_ts, "after the limit")
    wait_until(lambda: inbox.read_text(), 5, interval=0.05, what="the reply after Retry-After")
    assert slack.reads_of(conv.thread_ts, after=limited_at + 0.05) >= 1
    first_after = min(t for t, ts in slack.reads if ts == conv.thread_ts and t > limited_at + 0.05)
    assert first_after - limited_at >= 0.9  # not before Retry-After
    conv.close()


@pytest.mark.parametrize(
    "retry_after, wait",
    [
        ("3", 3),
        ("inf", 2),
        ("-1", None),
        ("later", None),
        ("date", 1.5),
    ],
)
def test_slacks_retry_after_is_read_by_the_one_reader_within_poll_max(slack, retry_after, wait):
    """Seconds or an HTTP date, at most ``slack.poll_max_s`` (2 s here); an unusable one leaves the backoff."""
    if retry_after == "date":  # an HTTP date 1.5 s from now (made when the test runs)
        retry_after = email.utils.formatdate(time.time() + 1.5, usegmt=True)
    slack.fail("chat.postMessage", 429, headers={"Retry-After": retry_after})
    with pytest.raises(SlackError, match="rate limited") as limited:
        SlackClient(cfg(slack)).call("chat.postMessage", channel=CHANNEL, text="t")
    assert limited.value.status == 429
    assert limited.value.retry_after == (None if wait is None else pytest.approx(wait, abs=1))


def test_a_failed_open_is_logged_and_the_agent_runs_without_a_thread(slack, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    bad = cfg(slack).model_copy(update={"channel": "C0NOPE"})
    assert open_conversation(bad, tmp_path / "inbox.jsonl", "EX-1", "t", "agent-1") is None
    assert "channel_not_found" in caplog.text and "xoxb-s3cret" not in caplog.text
    assert open_conversation(SlackSettings(), tmp_path / "i", "EX-1", "t", "a") is None  # off: no channel


def test_a_stage_joining_an_open_thread_finds_the_replies_so_far_at_once(slack, tmp_path):
    """A staged dispatch's later stage: the thread's human replies so far are in its inbox before it starts
    (not one poll later: poll_s is 30 s here), new ones follow, and nothing is read after close."""
    from factory_worker.chat.slack import join_conversation, open_thread

    thread = open_thread(cfg(slack), "EX-1", "fix it", "agent-1", ["implement", "review"])
    channel, _, ts = thread.rpartition(":")
    assert channel == CHANNEL and ts in slack.threads
    slack.reply(ts, "earlier")
    inbox = tmp_path / "inbox.jsonl"
    inbox.touch()
    conv = join_conversation(cfg(slack, poll_s=30, poll_max_s=60), inbox, thread)
    assert conv is not None
    assert [m["text"] for m in lines(inbox)] == ["earlier"]
    conv.close()
    closed_at = time.time()
    time.sleep(0.3)
    assert slack.reads_of(ts, after=closed_at) == 0
    assert join_conversation(cfg(slack), inbox, "") is None  # no thread: no watcher


def test_a_hung_slack_times_out_the_agent_runs_without_a_thread_and_reads_go_on_later(slack, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    slack.stall_s = 1.0
    t0 = time.monotonic()
    assert open_conversation(cfg(slack, timeout_s=0.2), tmp_path / "inbox.jsonl", "EX-1", "t", "agent-1") is None
    assert time.monotonic() - t0 < 0.9 and "xoxb-s3cret" not in caplog.text  # bounded by the timeout
    slack.stall_s = 0.0
    inbox = tmp_path / "inbox2.jsonl"
    inbox.touch()
    conv = open_conversation(cfg(slack, timeout_s=0.2), inbox, "EX-1", "t", "agent-1")
    slack.stall_s = 0.5  # reads time out now: the watcher backs off and goes on
    slack.reply(conv.thread_ts, "while slack was slow")
    time.sleep(0.6)
    slack.stall_s = 0.0
    wait_until(lambda: inbox.read_text(), 5, interval=0.05, what="the reply once Slack answers again")
    conv.close()
    assert lines(inbox)[0]["text"] == "while slack was slow"
