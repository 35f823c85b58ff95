"""backlog_bench: capacity-true dispatch on a backlog bigger than the fleet, against plain Celery (issue 8).

One worker ``-c 4`` on both queues (3 agent slots: one process stays free for the loop) + beat, ``--n``
ready issues (default 3000), agent ``true``, lease 5 s, interval 1 s:

  run A  the in-flight cap at the fleet's size (4)
  run B  the in-flight cap at n
  peer   the same worker layout running plain Celery tasks that do ``subprocess.run(["true"])``; and the
         same peer with task events on, as the factory's workers send them (Flower): a second reference
  refill one agent slot (worker ``-c 2``), ``--refill-n`` issues, an agent that stamps its start and its
         end: slot freed (an agent's end) -> next agent started, p50/p99

Prints each rate and its ratio to the peer, the broker agent queue's longest length, the number of agent
tasks that did nothing (a claim lost while queued), and the refill latency. ``--json``: one JSON object.
Targets (issue 8): both ratios >= 0.8, queue <= 2x the fleet, no-op tasks 0, refill p99 <= 50 ms.

Usage: .venv/bin/python benchmarks/backlog_bench.py [--n 3000] [--refill-n 200] [--json] [--keep-tmp]
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from _harness import (
    CpuMeter,
    Group,
    Proc,
    add_keep_tmp,
    beat_argv,
    drop_namespace,
    emit,
    factory_env,
    factory_queues,
    issue_line,
    make_parser,
    make_say,
    percentile,
    run_session,
    wait_count,
    worker_argv,
)
from e2e_bench import bench_plain

from factory_worker.ledger.keys import Keys

say = make_say("backlog_bench")
CONCURRENCY = 4
#: the roles CpuMeter reports, in print order
ROLE_ORDER = ["worker", "worker pool", "worker agents", "beat", "beat pool", "beat agents", "redis-server"]
SLOTS = CONCURRENCY - 1
STAMP_AGENT = ["sh", "-c", 'date +%s.%N >> "$1"; date +%s.%N >> "$1"', "stamp-agent"]


class QueueWatch:
    """Polls the agent queue's length every few ms in a thread; ``longest`` is the maximum seen."""

    def __init__(self, r: redis.Redis, queue: str) -> None:
        self.r, self.queue, self.longest = r, queue, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.longest = max(self.longest, int(self.r.llen(self.queue)))
            time.sleep(0.005)

    def __enter__(self) -> QueueWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(2)


def run_factory(
    redis_url: str,
    tmp: Path,
    name: str,
    n: int,
    cap: int,
    concurrency: int = CONCURRENCY,
    agent: list[str] | None = None,
    timeout: float = 900,
) -> dict[str, Any]:
    """One factory run over ``n`` fresh issues; returns its rate, longest queue and counters."""
    work = tmp / name
    work.mkdir()
    namespace = f"backlog{name}" + uuid.uuid4().hex[:6]
    keys = Keys(namespace)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    (work / "issues.jsonl").write_text("".join(issue_line(f"B-{i:05d}") for i in range(n)))
    r.hset(keys.paused, mapping={"by": "backlog_bench", "at_ms": int(time.time() * 1000)})
    env = factory_env(
        redis_url,
        namespace,
        work,
        agent or ["true"],
        {
            "FACTORY_LOOP__INTERVAL_S": "1",
            "FACTORY_LOOP__STALE_AFTER_S": "10",
            "FACTORY_DISPATCH__MAX_IN_FLIGHT": str(cap),
            "FACTORY_DISPATCH__LEASE_TTL_S": "5",
            "FACTORY_AGENT__TERM_GRACE_S": "1",
            "FACTORY_WORKER__SOFT_SHUTDOWN_S": "1",
        },
    )
    group = Group()
    try:
        say(f"run {name}: worker -c {concurrency} + beat, {n} issues, cap {cap} (namespace {namespace})")
        worker = group.add(Proc("w1", worker_argv("w1", concurrency, queues=factory_queues(env)), env, work, "ready."))
        beat = group.add(Proc("beat", beat_argv(work), env, work, "beat: Starting"))
        group.wait_ready()
        with QueueWatch(r, factory_queues(env, "agents")) as watch:
            cpu = CpuMeter(r, [worker.pid, beat.pid], ["worker", "beat"])
            t0 = time.perf_counter()
            r.delete(keys.paused)
            wait_count(
                lambda: int(r.get(keys.done_count) or 0),
                n,
                timeout,
                lambda done: f"run {name}: only {done}/{n} done after {timeout:.0f}s\n{group.tails()}",
                0.05,
            )
            elapsed = time.perf_counter() - t0
            cpu_ms = cpu.per_item_ms(n)
        counters = {k: int(v) for k, v in r.hgetall(keys.counters).items() if v.lstrip("-").isdigit()}
    finally:
        group.stop()
        drop_namespace(r, keys)
        r.close()
    return {
        "elapsed_s": elapsed,
        "dispatches_per_s": n / elapsed,
        "queue_max": watch.longest,
        "noop_agent_tasks": counters.get("agent_tasks_noop", 0),
        "refilled": counters.get("refilled", 0),
        "cpu_ms_per_issue": cpu_ms,
        "work": work,
    }


def refill_latency(redis_url: str, tmp: Path, n: int) -> dict[str, Any]:
    """One slot (worker -c 2), agents that stamp start and end: next start - previous end, in ms."""
    stamps = tmp / "stamps.txt"
    res = run_factory(redis_url, tmp, "R", n, cap=4, concurrency=2, agent=[*STAMP_AGENT, str(stamps)])
    t = [float(line) for line in stamps.read_text().split()]
    starts, ends = t[0::2], t[1::2]
    gaps = sorted((s - e) * 1000 for e, s in zip(ends, starts[1:]))
    return {
        "samples": len(gaps),
        "p50_ms": percentile(gaps, 50),
        "p99_ms": percentile(gaps, 99),
        "max_ms": gaps[-1] if gaps else None,
        "dispatches_per_s": res["dispatches_per_s"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--n", type=int, default=3000, help="ready issues per run (default 3000)")
    ap.add_argument("--refill-n", type=int, default=200, help="issues of the refill-latency run (default 200)")
    ap.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    add_keep_tmp(ap)
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"n": args.n, "concurrency": CONCURRENCY, "agent_slots": SLOTS}

    def phases(tmp: Path, redis_url: str) -> None:
        out["A_cap_fleet"] = run_factory(redis_url, tmp, "A", args.n, cap=CONCURRENCY)
        out["B_cap_n"] = run_factory(redis_url, tmp, "B", args.n, cap=args.n)
        say(f"peer: plain Celery, 1 worker -c {CONCURRENCY}, {args.n} tasks")
        out["peer_plain_celery"] = bench_plain(redis_url, tmp, args.n, 1, CONCURRENCY, 900)
        say("peer with task events on (as the factory's workers, for Flower)")
        out["peer_plain_celery_events"] = bench_plain(redis_url, tmp, args.n, 1, CONCURRENCY, 900, events=True)
        out["refill"] = refill_latency(redis_url, tmp, args.refill_n)

    code = run_session("backlog_bench", "backlog-bench-", args.keep_tmp, phases, args.redis_url)
    if code:
        return code
    peer = out["peer_plain_celery"]["tasks_per_s"]
    peer_events = out["peer_plain_celery_events"]["tasks_per_s"]
    for run in ("A_cap_fleet", "B_cap_n"):
        out[run].pop("work", None)
        out[run]["ratio_to_peer"] = out[run]["dispatches_per_s"] / peer
        out[run]["ratio_to_peer_with_events"] = out[run]["dispatches_per_s"] / peer_events

    def human() -> None:
        print(f"backlog_bench: {args.n} issues, 1 worker -c {CONCURRENCY} ({SLOTS} agent slots) + beat")
        print(f"  peer (plain Celery, subprocess true): {peer:8.1f} tasks/s  (with task events on: {peer_events:.1f})")
        for run, label in (("A_cap_fleet", f"run A, cap {CONCURRENCY}"), ("B_cap_n", f"run B, cap {args.n}")):
            x = out[run]
            print(
                f"  {label:<18} {x['dispatches_per_s']:8.1f} dispatches/s  ratio {x['ratio_to_peer']:.2f} "
                f"({x['ratio_to_peer_with_events']:.2f} to the peer with events)  "
                f"queue max {x['queue_max']}  no-op agent tasks {x['noop_agent_tasks']}  refilled {x['refilled']}"
            )
        cpu = (
            ", ".join(
                f"{label} {out[k]['cpu_ms_per_issue']['total']:.2f}"
                for k, label in (("A_cap_fleet", "A"), ("B_cap_n", "B"))
            )
            + ", "
            + ", ".join(
                f"{label} {out[k]['cpu_ms_per_task']['total']:.2f}"
                for k, label in (("peer_plain_celery", "peer"), ("peer_plain_celery_events", "peer with events"))
            )
        )
        print(f"  CPU per issue (workers + beat + redis-server, ms): {cpu}")
        runs = (
            ("A_cap_fleet", "A"),
            ("B_cap_n", "B"),
            ("peer_plain_celery", "peer"),
            ("peer_plain_celery_events", "peer+ev"),
        )
        roles = [
            (label, (out[k].get("cpu_ms_per_issue") or out[k].get("cpu_ms_per_task"))["by_role"]) for k, label in runs
        ]
        names = sorted({name for _, r in roles for name in r}, key=ROLE_ORDER.index)
        print("    by role (ms per issue): " + "  ".join(f"{label:>8}" for label, _ in roles))
        for name in names:
            print(f"    {name:<22}" + "  ".join(f"{r.get(name, 0.0):8.2f}" for _, r in roles))
        rf = out["refill"]
        print(
            f"  slot freed -> next agent started ({rf['samples']} samples, 1 slot): "
            f"p50 {rf['p50_ms']:.1f} ms  p99 {rf['p99_ms']:.1f} ms  max {rf['max_ms']:.1f} ms"
        )

    return emit(out, args.json, human)


if __name__ == "__main__":
    raise SystemExit(main())
