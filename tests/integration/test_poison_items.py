"""End to end, poisoned issues (issue 12): a real `celery worker` + `celery beat` over a file source where
normal issues sit between items built to stall the loop. Every normal issue is done exactly once, every
poison item is skipped with a reason (never claimed, so never re-dispatched), no iteration fails, the loop
stays live, and the CLI shows the odd ids without crashing."""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict

import pytest

from factory_worker.context import Context
from factory_worker.ledger.core import Ledger
from tests.support import CeleryProc, assert_audit_clean, ctl, read_events, settings_from, stack_env, wait_until

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


#: line text -> (id, the reason the loop must give). Raw JSON lines: the surrogate is written as its escape.
POISON = {
    "depth bomb": (
        '{"id": "P-depth", "title": "t", "state": "ready", "x": ' + _nested(1000) + "}",
        "nested too deeply",
    ),
    "serialization bomb": (
        '{"id": "P-ser", "title": "t", "state": "ready", "x": ' + _nested(900) + "}",
        "nested deeper than",
    ),
    "lone surrogate": ('{"id": "P-sur", "title": "\\ud800 boom", "state": "ready"}', "lone surrogate"),
    "10 MB title": (json.dumps({"id": "P-big", "title": "x" * 10_000_000, "state": "ready"}), "larger than"),
    "option-like id": (json.dumps({"id": "-rf", "title": "t", "state": "ready"}), "must not start with '-'"),
}
#: Odd but valid ids: dispatched like any issue, and the CLI must show them as text.
ODD = ["[/oops]", "{title}", "../escape", "*"]
NORMAL = [f"N-{n}" for n in range(8)]


def _lines() -> list[str]:
    normal = [json.dumps({"id": i, "title": f"normal {i}", "state": "ready"}) for i in NORMAL]
    odd = [json.dumps({"id": i, "title": "[bold red]x[/] $(id)", "state": "ready"}) for i in ODD]
    poison = [text for text, _ in POISON.values()]
    out = []
    for n, line in enumerate(normal):  # poison between normal issues, never all at the end
        out.append(line)
        if n < len(poison):
            out.append(poison[n])
    return out + odd


def _by_issue(tmp_path) -> dict[str, list[dict]]:
    by_issue: dict[str, list[dict]] = defaultdict(list)
    for e in read_events(tmp_path / "out"):
        by_issue[e["issue"]].append(e)
    return by_issue


def _assert_each_poison_item_is_reported(env, log_text: str, run: dict) -> None:
    report = run["last_report"]
    assert report["skipped_by_reason"].get("source") == len(POISON), report  # counted on every iteration
    dry = ctl(env, "run-once", "--dry-run", "--json")  # the same poll, every skip listed with its reason
    assert dry.returncode == 0, dry.stderr
    reasons = [s["reason"] for s in json.loads(dry.stdout)["skipped"] if s["reason"].startswith("source:")]
    assert len(reasons) == len(POISON), reasons
    for what, (_, why) in POISON.items():
        assert any(why in r for r in reasons), (what, reasons)
        assert why in log_text, what  # and in the loop worker's log


def _assert_cli_survives_odd_ids(env) -> dict[str, str]:
    shown = {}
    for args in (
        ["dispatches"],
        ["dispatches", "--json"],
        ["explain", "[/oops]"],
        ["explain", "--json", "[/oops]"],
        ["explain", "--", "-rf"],
        ["explain", "*"],
        ["explain", "P-sur"],
        ["loop-status"],
    ):
        res = ctl(env, *args)
        assert res.returncode == 0, (args, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr, (args, res.stderr)
        shown[" ".join(args)] = res.stdout
    assert "[/oops]" in shown["dispatches"] and "[/oops]" in shown["explain [/oops]"]
    assert json.loads(shown["explain --json [/oops]"])["state"] == "done"
    return shown


def test_poison_items_are_skipped_with_a_reason_and_the_loop_stays_live(
    redis_url, real_redis, namespace, tmp_path, procs
):
    (tmp_path / "issues.jsonl").write_text("\n".join(_lines()) + "\n")
    env = stack_env(redis_url, namespace, tmp_path, AGENT_SLEEP="0.05")
    worker = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "4"])
    beat = CeleryProc("beat", env, tmp_path, "beat")
    procs.extend([worker, beat])
    for p in procs:
        p.wait_ready()
    settings = settings_from(env)
    ledger = Ledger.from_settings(settings, real_redis)
    ctx = Context(settings, real_redis)
    began = time.monotonic()
    wait_until(
        lambda: ledger.gauges()["done"] == len(NORMAL) + len(ODD),
        90,
        interval=0.5,
        what="every normal and odd issue done",
    )
    iterations = int(ledger.counters().get("iterations", 0))
    wait_until(
        lambda: int(ledger.counters().get("iterations", 0)) >= iterations + 3,
        30,
        interval=0.5,
        what="three more iterations over the poison",
    )
    elapsed = time.monotonic() - began

    by_issue = _by_issue(tmp_path)
    for issue in NORMAL + ODD:  # done exactly once
        ends = [e for e in by_issue[issue] if e["event"] == "end"]
        assert [e["code"] for e in ends] == [0], (issue, by_issue[issue])
    poison_ids = [text_id for text_id in ("P-depth", "P-ser", "P-sur", "P-big", "-rf")]
    for issue in poison_ids:  # never claimed, so never dispatched (0 <= max_attempts) nor re-dispatched
        assert issue not in by_issue, issue
        assert real_redis.hget(ctx.keys.fences, issue) is None and real_redis.hget(ctx.keys.attempts, issue) is None
        assert ledger.explain(issue).state != "done"
    assert set(by_issue) == set(NORMAL + ODD)
    counters = ledger.counters()
    assert int(counters.get("iterations_failed", 0)) == 0, counters  # poison never failed an iteration
    assert ledger.gauges()["parked"] == 0 and ledger.gauges()["in_flight"] == 0
    run = ctx.control.run(ctx.control.current_run_id())
    _assert_each_poison_item_is_reported(env, worker.log(), run)
    _assert_cli_survives_odd_ids(env)
    status = ctl(env, "loop-status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr  # live
    assert not list(tmp_path.glob("escape*")) + list(tmp_path.parent.glob("escape*")), "an id escaped the log dir"
    assert_audit_clean(redis_url, namespace)
    log.info(
        "poison e2e: %d normal + %d odd done once, %d poison skipped, %.1fs, %s iterations",
        len(NORMAL),
        len(ODD),
        len(POISON),
        elapsed,
        counters.get("iterations"),
    )
    print(
        f"poison e2e: all done in {elapsed:.1f}s; iterations={counters.get('iterations')} "
        f"failed={counters.get('iterations_failed', 0)}; skipped_by_reason={run['last_report']['skipped_by_reason']}"
    )
