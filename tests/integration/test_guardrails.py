"""End to end, guardrails (issue 24): a real `celery worker` + `celery beat` over a file source, agents that
report usage lines (``FACTORY_USAGE``), stay silent or keep talking.

* an agent reporting 0.30 USD a line with a 1.00 USD issue budget is stopped within 1 s of its 4th line and
  its issue parked ``needs-human: budget`` (no further attempt); ``retry`` grants a fresh budget;
* an agent silent past ``agent.stall_s`` (2 s) is stopped as a failed attempt and backs off, one that prints
  keeps running to its end;
* three agents racing a 1.00 USD day budget (hard) overshoot it by at most one line each, and nothing more
  is claimed that day (``explain``: day budget spent).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import pytest

from factory_worker.ledger.core import Ledger
from factory_worker.ledger.usage import day_spend, issue_usage
from tests.support import CeleryProc, ctl, settings_from, stack_env, wait_until, write_issues

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

LINE_USD = 0.30
#: The test agent: by label, "spends" (a usage line of LINE_USD every AGENT_EVERY s, 20 at most; SIGTERM
#: recorded), "brief" (AGENT_EVERY s, then exit 0), "silent" (no output for 30 s), "talks" (a line of output every 0.5 s for 4 s, then exit 0).
GUARD_AGENT = r"""
import json, os, signal, sys, time
out = os.path.join(os.environ["AGENT_OUT"], "guard.jsonl")
iid = os.environ["FACTORY_ISSUE_ID"]
labels = json.load(open(os.environ["FACTORY_ISSUE_JSON"])).get("labels", [])
def rec(event, **kw):
    with open(out, "a") as fh:
        fh.write(json.dumps({"issue": iid, "event": event, "t": time.time(), **kw}) + "\n")
def on_term(*_):
    rec("term")
    os._exit(143)
signal.signal(signal.SIGTERM, on_term)
rec("start")
if "spends" in labels:
    every = float(os.environ.get("AGENT_EVERY", "0.5"))
    for n in range(1, 21):
        with open(os.environ["FACTORY_USAGE"], "a") as fh:
            fh.write(json.dumps({"cost_usd": %(usd)r, "tokens": 100}) + "\n")
        rec("line", n=n)
        time.sleep(every)
elif "silent" in labels:
    time.sleep(30)
elif "brief" in labels:
    time.sleep(float(os.environ.get("AGENT_EVERY", "0.3")))
elif "talks" in labels:
    for n in range(8):
        print("working", n, flush=True)
        time.sleep(0.5)
rec("end")
""" % {"usd": LINE_USD}


def _events(tmp_path: Path) -> list[dict]:
    p = tmp_path / "out" / "guard.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def _stack(redis_url, namespace, tmp_path, procs, issues, concurrency, **extra):
    agent = tmp_path / "guard_agent.py"
    agent.write_text(GUARD_AGENT)
    write_issues(tmp_path / "issues.jsonl", issues)
    env = stack_env(
        redis_url,
        namespace,
        tmp_path,
        FACTORY_AGENT__COMMAND=json.dumps([sys.executable, str(agent), "{id}"]),
        FACTORY_AGENT__ENV_ALLOWLIST=json.dumps(["PATH", "AGENT_OUT", "AGENT_EVERY"]),
        FACTORY_LOOP__MAX_ITERATIONS="1000",
        **extra,
    )
    procs.append(CeleryProc("worker", env, tmp_path, "w1", extra=["-c", str(concurrency)]))
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    for p in procs:
        p.wait_ready()
    return env


def test_issue_budget_parks_needs_human_and_a_silent_agent_stalls_while_a_talking_one_runs(
    redis_url, real_redis, namespace, tmp_path, procs
):
    issues = [
        {"id": "B-1", "title": "spends", "state": "ready", "labels": ["spends"]},
        {"id": "S-silent", "title": "silent", "state": "ready", "labels": ["silent"]},
        {"id": "S-talks", "title": "talks", "state": "ready", "labels": ["talks"]},
    ]
    env = _stack(
        redis_url,
        namespace,
        tmp_path,
        procs,
        issues,
        4,  # three agent slots and the loop's
        FACTORY_BUDGET__ISSUE_USD="1.00",
        FACTORY_AGENT__STALL_S="2",
        FACTORY_DISPATCH__BACKOFF_BASE_S="30",
        FACTORY_DISPATCH__BACKOFF_MAX_S="30",
    )
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    wait_until(lambda: ledger.explain("B-1").state == "parked", 30, what="B-1 parked for its budget")
    wait_until(lambda: ledger.explain("S-silent").state == "backoff", 30, what="the silent agent stalled")
    wait_until(lambda: ledger.explain("S-talks").state == "done", 30, what="the talking agent done")

    ev = _events(tmp_path)
    lines = [e for e in ev if e["issue"] == "B-1" and e["event"] == "line"]
    term = [e for e in ev if e["issue"] == "B-1" and e["event"] == "term"]
    fourth = next(e for e in lines if e["n"] == 4)
    assert term and term[0]["t"] - fourth["t"] < 1.0, (lines, term)  # stopped within 1 s of the crossing line
    usage = issue_usage(real_redis, ledger.keys, "B-1")
    assert usage["cost_usd"] == pytest.approx(4 * LINE_USD) and usage["lines"] == 4, usage
    why = ledger.explain("B-1")
    assert why.detail.get("reason") == "needs-human" and "budget" in why.text, why
    assert real_redis.hget(ledger.keys.attempts, "B-1") is None  # no attempt counted, none further
    assert sum(e["event"] == "start" for e in ev if e["issue"] == "B-1") == 1

    silent = ledger.explain("S-silent")
    assert "stalled: no output for 2 s" in silent.text, silent
    silent_start = next(e["t"] for e in ev if e["issue"] == "S-silent" and e["event"] == "start")
    silent_term = next(e["t"] for e in ev if e["issue"] == "S-silent" and e["event"] == "term")
    assert 1.5 <= silent_term - silent_start < 4.0, silent_term - silent_start  # stall clock: from the spawn
    talks = [e["event"] for e in ev if e["issue"] == "S-talks"]
    assert talks == ["start", "end"], talks  # ran 4 s (past stall_s 2) to its end: its output kept it alive

    shown = ctl(env, "explain", "--json", "B-1")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["detail"]["usage"]["cost_usd"] == pytest.approx(4 * LINE_USD)
    res = ctl(env, "retry", "B-1")
    assert res.returncode == 0, res.stdout + res.stderr
    wait_until(
        lambda: (
            sum(e["event"] == "start" for e in _events(tmp_path) if e["issue"] == "B-1") == 2
            and ledger.explain("B-1").state == "parked"
        ),
        20,
        what="B-1 dispatched again after retry, and parked again",
    )
    again = issue_usage(real_redis, ledger.keys, "B-1")  # a fresh budget: 4 lines again, not 1 more
    assert again["cost_usd"] == pytest.approx(4 * LINE_USD) and again["lines"] == 4, again


def test_three_agents_racing_a_hard_day_budget_overshoot_by_at_most_a_line_each(
    redis_url, real_redis, namespace, tmp_path, procs
):
    issues = [{"id": f"D-{n}", "title": "spends", "state": "ready", "labels": ["spends"]} for n in range(3)]
    env = _stack(
        redis_url,
        namespace,
        tmp_path,
        procs,
        issues,
        4,  # three agent slots and the loop's
        FACTORY_DISPATCH__MAX_IN_FLIGHT="3",
        FACTORY_BUDGET__DAY_USD="1.00",
        FACTORY_BUDGET__DAY_HARD="true",
        AGENT_EVERY="0.1",
    )
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    keys = ledger.keys

    def all_stopped() -> bool:
        ev = _events(tmp_path)
        started = {e["issue"] for e in ev if e["event"] == "start"}
        ended = {e["issue"] for e in ev if e["event"] in ("term", "end")}
        return len(started) == 3 and started <= ended

    wait_until(all_stopped, 40, what="the three spending agents stopped")
    time.sleep(1.0)  # a line read after the stop would still be counted: none is
    spend = day_spend(real_redis, keys)
    assert 1.00 <= spend["cost_usd"] < 1.00 + 3 * LINE_USD + 1e-9, spend
    for n in range(3):  # released (no attempt counted) and not claimed again today
        e = ledger.explain(f"D-{n}")
        assert e.state == "day-budget" and "day budget spent" in e.text, e
    status = ctl(env, "loop-status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["spend_today"]["cost_usd"] == pytest.approx(spend["cost_usd"])
    log.info("day race: spent %.2f USD of 1.00 (lines %s)", spend["cost_usd"], spend.get("lines"))


def _intervals(ev: list[dict]) -> dict[str, list[tuple[float, float, str]]]:
    """Per key (the issue's repo: label), each agent's (start, end) from its records."""
    starts: dict[str, float] = {}
    out: dict[str, list[tuple[float, float, str]]] = {}
    for e in ev:
        if e["event"] == "start":
            starts[e["issue"]] = e["t"]
        elif e["event"] in ("end", "term") and e["issue"] in starts:
            key = e["issue"].split("-")[0]
            out.setdefault(key, []).append((starts.pop(e["issue"]), e["t"], e["issue"]))
    return out


def _most_at_once(spans: list[tuple[float, float, str]]) -> int:
    edges = sorted([(a, 1) for a, _, _ in spans] + [(b, -1) for _, b, _ in spans], key=lambda x: (x[0], x[1]))
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_concurrency_keys_cap_each_key_and_share_the_fleet_fairly(redis_url, real_redis, namespace, tmp_path, procs):
    """40 issues, 30 of key A listed first, then 10 of key B; key limits 2, a fleet of 4: A never has more
    than 2 in flight, and B's issues start long before A's backlog drains."""
    issues = [{"id": f"A-{n}", "title": "a", "state": "ready", "labels": ["brief", "repo:a"]} for n in range(30)]
    issues += [{"id": f"B-{n}", "title": "b", "state": "ready", "labels": ["brief", "repo:b"]} for n in range(10)]
    env = _stack(
        redis_url,
        namespace,
        tmp_path,
        procs,
        issues,
        5,  # four agent slots and the loop's
        FACTORY_DISPATCH__MAX_IN_FLIGHT="4",
        FACTORY_DISPATCH__CONCURRENCY=json.dumps({"label:repo:*": 2}),
        AGENT_EVERY="0.3",
    )
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    wait_until(lambda: ledger.gauges()["done"] == 40, 90, interval=0.3, what="all 40 issues done")
    ev = _events(tmp_path)
    spans = _intervals(ev)
    assert sorted(len(v) for v in spans.values()) == [10, 30], {k: len(v) for k, v in spans.items()}  # once each
    assert _most_at_once(spans["A"]) <= 2 and _most_at_once(spans["B"]) <= 2
    first_b = min(a for a, _, _ in spans["B"])
    last_a = max(a for a, _, _ in spans["A"])
    assert first_b < last_a, "B waited for A's backlog to drain"
    t0 = min(a for v in spans.values() for a, _, _ in v)
    end = max(b for v in spans.values() for _, b, _ in v)
    timeline, last, t = [], None, t0
    while t <= end + 0.05:  # every change of the in-flight counts, at 50 ms resolution
        row = tuple(sum(a <= t < b for a, b, _ in spans[k]) for k in ("A", "B"))
        if row != last:
            timeline.append(f"t={t - t0:5.2f}s A={row[0]} B={row[1]}")
            last = row
        t += 0.05
    print("fairness timeline (in flight per key):\n" + "\n".join(timeline))
    print(f"first B start at {first_b - t0:.2f}s, last A start at {last_a - t0:.2f}s, all done at {end - t0:.2f}s")
    shown = ctl(env, "dispatches", "--json")
    assert shown.returncode == 0, shown.stderr


def test_a_sigkilled_workers_key_slots_come_back_after_the_lease(redis_url, real_redis, namespace, tmp_path, procs):
    issues = [{"id": f"K-{n}", "title": "k", "state": "ready", "labels": ["silent", "repo:k"]} for n in range(2)]
    env = _stack(
        redis_url,
        namespace,
        tmp_path,
        procs,
        issues,
        3,
        FACTORY_DISPATCH__CONCURRENCY=json.dumps({"label:repo:*": 1}),
        FACTORY_DISPATCH__LEASE_TTL_S="4",
        FACTORY_DISPATCH__QUEUE_LEASE_S="4",
    )
    wait_until(lambda: any(e["event"] == "start" for e in _events(tmp_path)), 20, what="one agent started")
    time.sleep(1.0)
    starts = [e["issue"] for e in _events(tmp_path) if e["event"] == "start"]
    assert len(starts) == 1, starts  # the key's one slot
    other = "K-1" if starts[0] == "K-0" else "K-0"
    assert ctl(env, "explain", other).stdout.count("concurrency key repo:k at its limit 1") == 1
    worker = procs[0]
    worker.kill()  # SIGKILL: nothing releases its claim; its lease runs out
    killed_at = time.monotonic()
    procs.append(CeleryProc("worker", env, tmp_path, "w2", extra=["-c", "3"]))
    procs[-1].wait_ready()
    wait_until(
        lambda: len([e for e in _events(tmp_path) if e["event"] == "start"]) >= 2,
        30,
        what="the key's slot back after the dead worker's lease",
    )
    back_after = time.monotonic() - killed_at
    assert back_after < 4 + 10, back_after
    log.info("key slot back %.1fs after the SIGKILL (lease 4 s)", back_after)
