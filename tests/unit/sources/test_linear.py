"""The Linear source and its writer against a local fake of Linear's GraphQL API (``tests/fake_linear.py``):
pagination, ready states and labels, rate-limit hold-off, errors in one line without the key; state moves
and one comment per (dispatch, event)."""

from __future__ import annotations

import logging

import pytest

from factory_worker.config.settings import ConfigError, load_settings
from factory_worker.sources import SourceError, load_source
from factory_worker.sources.linear import LinearSource
from factory_worker.sources.linear_api import LinearAPI
from factory_worker.sources.rules import Rules
from factory_worker.writeback.events import DeliveryError, Event, marker
from factory_worker.writeback.linear import LinearWriter
from factory_worker.writeback.writers import writer_for
from tests.fake_linear import FakeLinear

TOKEN = "lin_api_test"


@pytest.fixture
def linear():
    with FakeLinear(TOKEN) as fake:
        yield fake


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("LINEAR_API_KEY", TOKEN)


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def settings(linear, write_back=False, **lin):
    return load_settings(
        source={"kind": "linear", "linear": {"team": "ENG", "api_url": linear.url, **lin}},
        tracker={"write_back": write_back},
    )


def source(linear, clock=None, **lin) -> LinearSource:
    s = settings(linear, **lin)
    cfg = s.source.linear
    api = LinearAPI(cfg.api_url, TOKEN, 5, cfg.max_retry_after_s, clock=clock or Clock())
    return LinearSource(cfg, s.source.ready_states, api=api)


def test_poll_pages_through_the_team_in_its_ready_states(linear):
    for n in range(230):
        linear.add(f"ENG-{n}", f"issue {n}", state="Todo" if n % 2 == 0 else "Backlog")
    linear.add("OPS-1", "another team", team="OPS")
    src = load_source(settings(linear).source)
    result = src.poll()
    assert [i.id for i in result.issues] == [f"ENG-{n}" for n in range(0, 230, 2)]
    assert linear.ops("Issues") == 2 and result.errors == []  # 115 ready issues: two pages of 100
    first = result.issues[0]
    assert (first.state, first.title, first.linear_id) == ("ready", "issue 0", linear.issues["ENG-0"].id)
    assert {auth for _, auth in linear.requests} == {TOKEN}


def test_labels_done_states_and_the_factory_labels(linear):
    linear.add("ENG-1", "labelled", labels=("Agent",))
    linear.add("ENG-2", "not labelled")
    linear.add("ENG-3", "finished", state="Done", labels=("agent",))
    linear.add("ENG-4", "done by the factory", labels=("agent", "factory:done"))
    src = source(linear, labels=["agent"], states=["Todo", "Done"])
    polled = src.poll()
    assert [i.id for i in polled.issues] == ["ENG-1", "ENG-4"]  # a completed state is never ready
    screened = Rules.from_settings(settings(linear).source).screen(polled.issues)
    assert [i.id for i in screened.issues] == ["ENG-1"]  # the tracker alone keeps finished work finished
    assert src.get("ENG-3").state == "Done" and src.get("ENG-404") is None


def test_a_malformed_node_is_reported_and_skipped(linear):
    linear.add("ENG-1", "good")
    linear.add("ENG-2", "x" * 2000)  # longer than an issue title may be
    polled = source(linear).poll()
    assert [i.id for i in polled.issues] == ["ENG-1"]
    assert len(polled.errors) == 1 and polled.errors[0].startswith("linear:ENG#1 (ENG-2): title")


def test_a_rate_limit_holds_every_call_off_until_its_reset(linear):
    clock = Clock()
    linear.add("ENG-1", "t")
    reset_ms = int((clock.t + 40) * 1000)
    linear.fail("Issues", status=400, code="RATELIMITED", headers={"X-RateLimit-Requests-Reset": str(reset_ms)})
    src = source(linear, clock)
    with pytest.raises(SourceError, match="rate limited"):
        src.poll()
    clock.t += 39
    with pytest.raises(SourceError, match="next call in 1s"):
        src.poll()
    assert linear.ops("Issues") == 1  # held off: the server was not asked again
    clock.t += 2
    assert [i.id for i in src.poll().issues] == ["ENG-1"]


def test_a_429_waits_at_most_max_retry_after(linear):
    clock = Clock()
    linear.fail("Issues", status=429, headers={"Retry-After": "999999"})
    src = source(linear, clock, max_retry_after_s=30)
    with pytest.raises(SourceError):
        src.poll()
    clock.t += 31
    assert src.poll().issues == []


def test_errors_are_one_line_and_never_carry_the_key(linear, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    linear.fail("Issues", status=502)
    src = source(linear)
    with pytest.raises(SourceError) as e1:
        src.poll()
    monkeypatch.setenv("LINEAR_API_KEY", "wrong-key")
    with pytest.raises(SourceError) as e2:
        load_source(settings(linear).source).poll()
    down = source(linear)
    down.api.api_url = "http://127.0.0.1:9/graphql"  # nothing listens: a connection error
    with pytest.raises(SourceError) as e3:
        down.poll()
    texts = [str(e.value) for e in (e1, e2, e3)]
    assert "HTTP 502" in texts[0] and "HTTP 401" in texts[1] and "ConnectError" in texts[2]
    assert all("\n" not in t and TOKEN not in t for t in texts)
    assert TOKEN not in caplog.text and TOKEN not in repr(src) and TOKEN not in repr(src.api)


def test_settings_name_what_is_missing(linear):
    with pytest.raises(ConfigError, match=r"source.linear.team \(FACTORY_SOURCE__LINEAR__TEAM\)"):
        load_settings(source={"kind": "linear"})
    with pytest.raises(ConfigError, match="team key"):
        load_settings(source={"kind": "linear", "linear": {"team": "ENG; drop"}})
    assert isinstance(writer_for(settings(linear, write_back=True).source, settings(linear).tracker), LinearWriter)


# -- the writer -------------------------------------------------------------------------------------------
def event(kind: str, issue: str = "ENG-1", token: str = "3:abc.0", **fields) -> Event:
    return Event("1-0", kind, issue, token, {k: str(v) for k, v in fields.items()})


@pytest.fixture
def writer(linear):
    s = settings(linear, write_back=True)
    return LinearWriter(s.source, s.tracker)


def test_each_event_moves_the_issue_and_comments_once(linear, writer):
    issue = linear.add("ENG-1", "t")
    writer.deliver(event("dispatched", attempt=1))
    writer.deliver(event("dispatched", attempt=1))  # redelivered (the ack was lost): nothing new
    assert issue.state == "In Progress" and len(issue.comments) == 1
    assert marker(event("dispatched")) in issue.comments[0] and "dispatch 3" in issue.comments[0]
    writer.deliver(event("backoff", attempt=1, error="exit 1"))
    assert issue.state == "Todo" and "exit 1" in issue.comments[-1]  # ready again after its backoff
    writer.deliver(event("dispatched", token="4:abc.0"))
    writer.deliver(event("done", token="4:abc.0"))
    assert issue.state == "Done" and len(issue.comments) == 4
    writer.deliver(event("dispatched", token="4:abc.0"))  # a late retry cannot reopen a done issue
    assert issue.state == "Done" and len(issue.comments) == 4
    assert linear.ops("States") == 1  # state ids resolved once


def test_a_slow_linear_times_out_in_one_line_and_the_next_call_works(linear):
    linear.add("ENG-1", "t")
    s = settings(linear)
    src = LinearSource(
        s.source.linear, s.source.ready_states, api=LinearAPI(s.source.linear.api_url, TOKEN, 0.2, clock=Clock())
    )
    linear.stall_s = 1.0
    with pytest.raises(SourceError) as err:
        src.poll()
    assert "Timeout" in str(err.value) and "\n" not in str(err.value) and TOKEN not in str(err.value)
    linear.stall_s = 0.0
    assert [i.id for i in src.poll().issues] == ["ENG-1"]


def test_a_timed_out_write_is_retried_and_the_marker_keeps_it_to_one_comment(linear):
    linear.add("ENG-1", "t")
    s = settings(linear, write_back=True)
    writer = LinearWriter(s.source, s.tracker, api=LinearAPI(s.source.linear.api_url, TOKEN, 0.3, clock=Clock()))
    linear.delay_comment_s = 1.0  # Linear creates the comment, its answer comes too late
    with pytest.raises(DeliveryError) as slow:
        writer.deliver(event("done"))
    assert not slow.value.permanent and len(linear.issues["ENG-1"].comments) == 1
    linear.delay_comment_s = 0.0
    writer.deliver(event("done"))  # the outbox's retry finds the marker: no second comment
    assert len(linear.issues["ENG-1"].comments) == 1 and linear.issues["ENG-1"].state == "Done"


def test_writer_errors_retry_or_park(linear, writer):
    linear.add("ENG-1", "t")
    with pytest.raises(DeliveryError) as gone:
        writer.deliver(event("done", issue="ENG-404"))
    assert gone.value.permanent
    linear.fail("IssueForWrite", status=503)
    with pytest.raises(DeliveryError) as busy:
        writer.deliver(event("done"))
    assert not busy.value.permanent and busy.value.retry_after is None
    linear.fail("Comment", status=200, code="RATELIMITED", headers={"Retry-After": "7"})
    with pytest.raises(DeliveryError) as limited:
        writer.deliver(event("done"))
    assert limited.value.retry_after == 7 and linear.issues["ENG-1"].state == "Todo"  # comment first, then move
    linear.add("ENG-2", "t")
    s = settings(linear, write_back=True, done_state="Shipped")
    with pytest.raises(DeliveryError, match="no workflow state 'Shipped'") as unknown:
        LinearWriter(s.source, s.tracker).deliver(event("done", issue="ENG-2"))
    assert unknown.value.permanent and len(linear.issues["ENG-2"].comments) == 1  # the comment is there


def test_with_write_back_the_working_state_is_polled_too(linear):
    """Write-back moves a dispatched issue to "In Progress"; if its worker dies the claim just expires (no
    event), so the source must still list it: the ledger, not the state, says whether an agent has it."""
    linear.add("ENG-1", "its worker died", state="In Progress")
    with_wb = load_source(settings(linear, write_back=True).source)
    assert [i.id for i in with_wb.poll().issues] == ["ENG-1"]
    assert load_source(settings(linear).source).poll().issues == []  # a human's "In Progress" is not ours


def test_the_marker_is_found_in_one_request_however_many_comments_an_issue_has(linear, writer):
    """2,050 comments from others: the writer asks Linear for the comment carrying its marker (a filter on
    the body), one request per delivery, instead of paging through them."""
    issue = linear.add("ENG-1", "a busy issue", comments=[f"human {n}" for n in range(2050)])
    linear.delay_comment_s = 1.0
    s = settings(linear, write_back=True)
    slow = LinearWriter(s.source, s.tracker, api=LinearAPI(linear.url, TOKEN, 0.3, clock=Clock()))
    with pytest.raises(DeliveryError):  # created, its answer lost
        slow.deliver(event("dispatched"))
    linear.delay_comment_s = 0.0
    issue.comments.extend(f"later {n}" for n in range(500))
    before = len(linear.requests)
    writer.deliver(event("dispatched"))  # the retry
    assert sum(marker(event("dispatched")) in c for c in issue.comments) == 1
    assert [op for op, _ in linear.requests[before:]] == ["IssueForWrite", "States", "Move"]


def test_an_issue_in_any_closed_state_is_never_moved(linear, writer):
    """Linear's schema names the state types completed, canceled and duplicate (and may add more): a state
    of any type but triage/backlog/unstarted/started is closed. Late events of every kind leave a duplicate
    where it is (once back in Todo it would be polled as ready and an agent would run on it)."""
    dup = linear.add("ENG-1", "marked duplicate", state="Duplicate")
    for kind in ("dispatched", "backoff", "released", "retried", "done", "parked"):
        writer.deliver(event(kind))
        assert dup.state == "Duplicate", kind
    writer.settle("ENG-1", "backoff")
    assert dup.state == "Duplicate" and linear.ops("Move") == 0
    linear.add("ENG-2", "triaged", state="Triage")
    writer.deliver(event("dispatched", issue="ENG-2"))
    assert linear.issues["ENG-2"].state == "In Progress"  # triage is open: moved


def test_an_issue_in_any_closed_state_is_never_ready(linear):
    dup = linear.add("ENG-1", "marked duplicate", state="Duplicate")
    src = source(linear, states=["Todo", "Duplicate"])
    assert src.poll().issues == []  # a duplicate is not ready even when its state's name is listed
    for kind in ("duplicate", "archived-someday", None):  # nor is any type that is not an open one
        node = {**linear._node(dup), "state": {"name": "Todo", "type": kind}}
        assert src._issue(node).state == "Todo", kind
    for kind in ("triage", "backlog", "unstarted", "started"):
        node = {**linear._node(dup), "state": {"name": "Todo", "type": kind}}
        assert src._issue(node).state == "ready", kind
