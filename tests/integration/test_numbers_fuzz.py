"""Readers tolerate any number (issue 20, item 8): ``1e999``, ``inf``, huge ints and garbage in every counter,
score, marker and record the CLI reads (``keys.py`` names them) never make ``loop-status`` (the early path of
``quick.py`` and the full one), ``metrics``, ``dispatches`` or ``explain`` raise: each exits 0/1 with the value
shown as ``invalid``, or 2 with one line. Hypothesis writes the values into a real Redis; the CLI runs
in-process (``ctl.main``, both loop-status paths)."""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factory_worker import ctl
from factory_worker.cli import quick
from factory_worker.ledger.keys import Keys

pytestmark = [pytest.mark.integration]

ISSUES = ["EX-1", "EX-10", "²", "9" * 40, "<b>x</b>"]
#: what a stored number may look like: non-finite, huge, not a number at all
NUMBERISH = st.one_of(
    st.sampled_from(
        [
            "inf",
            "-inf",
            "nan",
            "1e999",
            "-1e999",
            "Infinity",
            "1e308",
            "1e20",
            "9" * 20,
            "9" * 400,
            "9" * 5000,
            "9223372036854775808",
            "-9223372036854775809",
            "",
            " 7 ",
            "0x10",
            "²",
            "١٢",
            "1.5",
            "-1",
            "0",
            "12",
            "abc",
            "1:2",
            "\x00",
            "1_000",
        ]
    ),
    st.integers().map(str),
    st.floats().map(repr),
    st.text(max_size=6),
)
#: JSON number tokens (a heartbeat, a worker's presence, a run's last report)
JSON_NUMBER = st.one_of(
    st.sampled_from(
        [
            "1e999",
            "-1e999",
            "1e308",
            "9" * 400,
            "9" * 30,
            "-1",
            "0",
            "3",
            "1.5",
            "NaN",
            "Infinity",
            "-Infinity",
            "12345678901234567890123",
        ]
    ),
    st.integers().map(str),
)
SCORE = st.one_of(
    st.sampled_from([float("inf"), float("-inf"), 1e308, -1e308, 2.0**63, 2.0**64, 1e20, 5.5]),
    st.floats(allow_nan=False),
)
ISSUE = st.sampled_from(ISSUES)


def _write(r: Any, keys: Keys, op: tuple) -> None:
    kind, *args = op
    if kind == "zadd":
        key, member, score = args
        r.zadd(key, {member: score})
    elif kind == "hset":
        r.hset(*args)
    else:
        r.set(*args)


def _heartbeat(n1: str, n2: str, n3: str) -> str:
    return (
        '{"run_id": "r1", "status": "running", "iteration": %s, "max_iterations": %s, "hostname": "h", '
        '"pid": 1, "updated_at": "x", "updated_at_ms": %s}' % (n1, n2, n3)
    )


def ops(keys: Keys) -> st.SearchStrategy:
    """One write of a garbage number into one of the keys the CLI reads."""
    field = st.sampled_from(["claimed", "completed", "iterations", "dispatched", "kickoffs_skipped", "x"])
    return st.one_of(
        st.tuples(st.just("hset"), st.just(keys.counters), field, NUMBERISH),
        st.tuples(st.just("set"), st.just(keys.done_count), NUMBERISH),
        st.tuples(st.just("hset"), st.just(keys.attempts), ISSUE, NUMBERISH),
        st.tuples(st.just("hset"), st.just(keys.parked), ISSUE, NUMBERISH),
        st.tuples(st.just("hset"), st.just(keys.errors), ISSUE, st.text(max_size=20)),
        st.tuples(st.just("hset"), st.just(keys.fences), ISSUE, NUMBERISH),
        st.tuples(st.just("zadd"), st.just(keys.inflight), ISSUE, SCORE),
        st.tuples(st.just("zadd"), st.just(keys.backoff), ISSUE, SCORE),
        st.tuples(st.just("zadd"), st.just(keys.queued), st.just("agent-1"), SCORE),
        ISSUE.flatmap(
            lambda i: st.tuples(
                st.just("hset"),
                st.just(keys.done_bucket(i)),
                st.just(i),
                st.builds(lambda a, b: f"{a}:{b}", NUMBERISH, NUMBERISH),
            )
        ),
        st.tuples(st.just("hset"), st.just(keys.done), ISSUE, st.builds(lambda a, b: f"{a}:{b}", NUMBERISH, NUMBERISH)),
        ISSUE.flatmap(
            lambda i: st.tuples(st.just("set"), st.just(keys.claim(i)), st.builds(lambda a: f"{a}:owner.1", NUMBERISH))
        ),
        ISSUE.flatmap(
            lambda i: st.tuples(
                st.just("hset"), st.just(keys.stages(i)), st.sampled_from(["step", "round", "stage"]), NUMBERISH
            )
        ),
        st.tuples(
            st.just("hset"),
            st.just(keys.run("r1")),
            st.sampled_from(
                [
                    "max_iterations",
                    "iterations_done",
                    "failures",
                    "consecutive_failures",
                    "started_ms",
                    "finished_ms",
                    "status",
                ]
            ),
            NUMBERISH,
        ),
        st.tuples(
            st.just("hset"),
            st.just(keys.run("r1")),
            st.just("last_report"),
            JSON_NUMBER.map(lambda n: '{"duration_s": %s, "pulled": %s}' % (n, n)),
        ),
        st.tuples(
            st.just("set"), st.just(keys.heartbeat), st.builds(_heartbeat, JSON_NUMBER, JSON_NUMBER, JSON_NUMBER)
        ),
        st.tuples(st.just("hset"), st.just(keys.kill), st.just("at_ms"), NUMBERISH),
        st.tuples(st.just("hset"), st.just(keys.paused), st.just("at_ms"), NUMBERISH),
        st.tuples(
            st.just("hset"),
            st.just(keys.slots),
            st.just("agents@h"),
            st.builds(lambda a, b: f"{a}:{b}", NUMBERISH, NUMBERISH),
        ),
        st.tuples(st.just("hset"), st.just(keys.slots), st.just("agents@ok"), st.just(f"4:{2**53}")),  # a live slot
        st.tuples(
            st.just("set"),
            st.just(keys.worker("h")),
            JSON_NUMBER.map(lambda n: '{"hostname": "h", "pid": %s, "at_ms": %s}' % (n, n)),
        ),
    )


COMMANDS = [
    ["loop-status"],
    ["loop-status", "--json"],
    ["metrics"],
    ["metrics", "--json"],
    ["dispatches"],
    ["dispatches", "--json"],
    *[["dispatches", "--state", s] for s in ("in-flight", "backoff", "parked", "done")],
    *[["explain", i] for i in ISSUES],
    ["explain", "--json", "EX-1"],
    ["audit"],
    ["audit", "--json"],
]


def run(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """``factory-worker ARGV`` in this process with ``env`` as its only FACTORY_* settings."""
    out, err = io.StringIO(), io.StringIO()
    saved = {k: v for k, v in os.environ.items() if k.startswith("FACTORY_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = ctl.main(argv)  # an exception here is the finding: a traceback
    finally:
        for k in env:
            os.environ.pop(k, None)
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


def check(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    code, out, err = run(argv, env)
    errors = [line for line in err.splitlines() if line.startswith("factory-worker:")]
    assert code in (0, 1, 2), (argv, code, out, err)
    assert "Traceback" not in out + err, (argv, err)
    if code == 2:
        assert len(errors) == 1, (argv, err)
    else:
        assert not errors, (argv, err)
    return code, out


@pytest.fixture
def env(redis_url, real_redis, namespace):
    yield {"FACTORY_REDIS_URL": redis_url, "FACTORY_NAMESPACE": namespace}
    for key in real_redis.scan_iter(match=Keys(namespace).pattern()):  # what the test wrote goes, pass or fail
        real_redis.delete(key)


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_every_reader_of_numbers_answers_whatever_redis_holds(real_redis, namespace, env, data):
    keys = Keys(namespace)
    for key in real_redis.scan_iter(match=keys.pattern()):
        real_redis.delete(key)
    real_redis.hset(keys.ledger, "generation", "g1")
    real_redis.set(keys.current_run, "r1")
    real_redis.hset(keys.run("r1"), mapping={"status": "running", "task_ids": "[]"})
    for op in data.draw(st.lists(ops(keys), min_size=1, max_size=8)):
        _write(real_redis, keys, op)
    # the early path answers whole (never falls back because of a number) and the full path says the same
    quick_out = io.StringIO()
    early = quick.status_first(["loop-status", "--json"], env, out=quick_out)
    assert early in (0, 1), early  # None: the early path gave up on what it read
    full_env = {**env, "FACTORY_LOOP__STALE_AFTER_S": "60"}  # any other setting: the full path answers
    code, out = check(["loop-status", "--json"], full_env)
    full, fast = json.loads(out), json.loads(quick_out.getvalue())
    assert code == early and {**full, "age_s": None} == {**fast, "age_s": None}  # the age moves on between them
    for argv in COMMANDS:
        code, _ = check(argv, env)
        if argv[0] in ("loop-status", "metrics", "dispatches"):
            assert code in (0, 1), argv  # these only read: a bad value is shown as invalid, never an error
        check(argv, full_env) if argv[0] == "loop-status" else None


@pytest.mark.parametrize("value", ["inf", "1e999", "9" * 400])
def test_a_non_finite_counter_or_done_count_is_shown_invalid_by_status_and_left_out_of_metrics(
    real_redis, namespace, env, value
):
    keys = Keys(namespace)
    real_redis.hset(keys.counters, mapping={"completed": value, "claimed": "3"})
    real_redis.set(keys.done_count, value)
    for argv in (["loop-status", "--json"], ["loop-status"]):
        for e in (env, {**env, "FACTORY_LOOP__STALE_AFTER_S": "60"}):
            code, out = check(argv, e)  # was: OverflowError (a traceback) on both paths
            assert code == 1
            if "--json" in argv:
                d = json.loads(out)
                assert d["counters"]["completed"] == "invalid" and d["ledger"]["done"] == "invalid", out
            else:
                assert "completed=invalid" in out and "done=invalid" in out, out
    code, out = check(["metrics"], env)
    assert code == 0 and 'factory_ledger_events_total{event="claimed"} 3.0' in out and 'event="completed"' not in out
    assert 'factory_issues{state="done"}' not in out and 'factory_issues{state="parked"} 0.0' in out
    snap = json.loads(check(["metrics", "--json"], env)[1])
    assert snap["ledger_events"]["completed"] == "invalid" and snap["issues"]["done"] == "invalid"


@pytest.mark.parametrize("value", ["inf", "1e999", "9" * 400])
def test_non_finite_scores_and_markers_are_shown_invalid_by_dispatches_and_explain(real_redis, namespace, env, value):
    keys = Keys(namespace)
    real_redis.zadd(keys.backoff, {"EX-1": float("inf")})
    real_redis.hset(keys.attempts, "EX-1", value)
    real_redis.hset(keys.parked, "EX-2", value)
    real_redis.hset(keys.done_bucket("EX-3"), "EX-3", f"{value}:{value}")
    real_redis.zadd(keys.inflight, {"EX-4": float("inf")})
    real_redis.set(keys.claim("EX-4"), f"{value}:owner.1")
    rows = {r["issue"]: r for r in json.loads(check(["dispatches", "--json"], env)[1])}  # was: OverflowError
    assert rows["EX-1"]["until_ms"] == "invalid" and rows["EX-1"]["attempts"] == "invalid"
    assert rows["EX-2"]["parked_ms"] == "invalid" and rows["EX-3"]["completed_ms"] == "invalid"
    assert rows["EX-4"]["until_ms"] == "invalid" and rows["EX-4"]["fence"] == "invalid"
    code, text = check(["dispatches"], {**env, "COLUMNS": "200"})
    assert code == 0 and "invalid" in text
    for issue, word in (("EX-1", "backoff"), ("EX-2", "parked"), ("EX-3", "done"), ("EX-4", "in-flight")):
        code, out = check(["explain", "--json", issue], env)
        e = json.loads(out)
        assert code == 0 and e["state"] == word and "invalid" in e["text"], e


def test_audit_reports_numbers_that_are_not_numbers_instead_of_failing(real_redis, namespace, env):
    keys = Keys(namespace)
    real_redis.hset(keys.fences, mapping={"EX-1": "-inf", "EX-2": "3"})
    real_redis.hset(keys.done_bucket("EX-2"), "EX-2", "1e999:5")
    real_redis.zadd(keys.backoff, {"EX-3": float("inf")})
    code, out = check(["audit", "--json"], env)  # was: "error: ValueError: invalid literal for int()", exit 2
    found = {(v["check"], v["subject"]) for v in json.loads(out)["violations"]}
    assert code == 1 and {("invalid-number", "EX-1"), ("invalid-number", "EX-2"), ("invalid-number", "EX-3")} <= found
