#!/usr/bin/env python
"""End-to-end benchmark: factory_worker through real Celery workers against plain Celery, on one Redis.

One run, one redis-server (started here on a free port unless ``--redis-url``), three phases:

(a) factory      ``--n`` issues in a .jsonl file, 2 x ``celery -A factory_worker worker -c 4`` (both queues)
                 + 1 beat, agent ``["true"]``, loop interval 0.5 s, 50 iterations per run, max_in_flight 64.
                 Timed from the first kickoff to ``Ledger.gauges()["done"] == n`` (polled every ~20 ms).
                 -> dispatches_per_s
(b) plain        a tiny Celery app (written to a temp dir; broker = the same Redis, another db and queue;
                 JSON, prefetch 1, default acks) whose one task runs ``subprocess.run(["true"])`` and INCRs
                 a counter; 2 workers -c 4; ``--n`` tasks sent, timed until the counter reaches n.
                 -> plain_celery_tasks_per_s, ratio = factory / plain (target >= 0.7: reported, not asserted)
(c) latency      factory workers + beat with loop interval 1 s (``--latency-max-iterations`` per run, default
                 the product default 3); ``--latency-n`` issues appended to the source file one at a time at
                 random moments; the agent is a tiny python script that records time.time() at start.
                 latency = agent start - append time. -> latency_p50_s, latency_p99_s

Worker and beat start-up is never timed: every phase waits for "ready." / "beat: Starting" in the logs.
Every subprocess runs in its own process group and is killed with it; temp dirs are removed.

    .venv/bin/python benchmarks/e2e_bench.py            # human-readable figures
    .venv/bin/python benchmarks/e2e_bench.py --json     # one JSON object on stdout (progress on stderr)

This is a script that prints figures, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import redis
from _harness import (
    PY,
    BenchError,
    CpuMeter,
    Group,
    Proc,
    add_keep_tmp,
    base_env,
    beat_argv,
    drop_namespace,
    emit,
    factory_queues,
    issue_line,
    make_parser,
    make_say,
    percentile,
    run_session,
    wait_count,
    wait_for,
    worker_argv,
)
from _harness import factory_env as harness_factory_env

from factory_worker.config.settings import DispatchSettings
from factory_worker.ledger.core import Ledger
from factory_worker.ledger.keys import Keys

POLL_S = 0.02

PLAIN_APP = '''
"""Plain Celery baseline for benchmarks/e2e_bench.py: one task that runs `true` and counts itself."""
import os
import subprocess

import redis
from celery import Celery

BROKER = os.environ["BENCH_BROKER_URL"]
QUEUE = os.environ["BENCH_QUEUE"]
COUNTER = os.environ["BENCH_COUNTER_KEY"]

app = Celery("bench_plain", broker=BROKER)
app.conf.update(
    task_serializer="json", result_serializer="json", accept_content=["json"], task_ignore_result=True,
    result_backend=None, worker_prefetch_multiplier=1, task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    # the factory sends task events (Flower needs them); BENCH_TASK_EVENTS=1 makes the peer do the same
    worker_send_task_events=os.environ.get("BENCH_TASK_EVENTS") == "1", task_send_sent_event=False,
)
_r = redis.Redis.from_url(BROKER)


@app.task(name="bench.plain.run_true")
def run_true():
    subprocess.run(["true"], check=True)
    _r.incr(COUNTER)
'''

LATENCY_AGENT = """
import os, time
t = time.time()
with open(os.environ["BENCH_LATENCY_OUT"], "a") as fh:
    fh.write("%.6f %s\\n" % (t, os.environ["FACTORY_ISSUE_ID"]))
"""


say = make_say("e2e_bench")


def with_db(url: str, db: int) -> str:
    u = urlparse(url)
    return urlunparse(u._replace(path=f"/{db}"))


def url_db(url: str) -> int:
    path = urlparse(url).path.strip("/")
    return int(path) if path.isdigit() else 0


# -- factory ---------------------------------------------------------------------------------------------
def factory_env(
    redis_url: str,
    namespace: str,
    work: Path,
    agent: list[str],
    interval_s: float,
    max_iterations: int,
    max_in_flight: int,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    return harness_factory_env(
        redis_url,
        namespace,
        work,
        agent,
        {
            "FACTORY_LOOP__INTERVAL_S": str(interval_s),
            "FACTORY_LOOP__STALE_AFTER_S": str(max(5.0, interval_s * 5)),
            "FACTORY_LOOP__MAX_ITERATIONS": str(max_iterations),
            "FACTORY_DISPATCH__MAX_IN_FLIGHT": str(max_in_flight),
            "FACTORY_DISPATCH__LEASE_TTL_S": "30",
            "FACTORY_DISPATCH__MAX_ATTEMPTS": "3",
            "FACTORY_AGENT__TERM_GRACE_S": "1",
            "FACTORY_WORKER__SOFT_SHUTDOWN_S": "1",
            **(extra or {}),
        },
    )


#: --loop-worker: a dedicated loop worker (-Q factory.loop -c 1) beside agent-only workers, as deployed
LOOP_WORKER = False


def start_factory(
    group: Group, env: dict[str, str], work: Path, workers: int, concurrency: int, beat: bool = True
) -> None:
    agent_queues = factory_queues(env)
    if LOOP_WORKER:
        group.add(Proc("fl", worker_argv("fl", 1, queues=factory_queues(env, "loop")), env, work, "ready."))
        agent_queues = factory_queues(env, "agents")
    for i in range(workers):
        name = f"fw{i + 1}"
        group.add(Proc(name, worker_argv(name, concurrency, queues=agent_queues), env, work, "ready."))
    if beat:
        group.add(Proc("beat", beat_argv(work), env, work, "beat: Starting"))
    group.wait_ready()


def set_paused(r: redis.Redis, keys: Keys, paused: bool) -> None:
    if paused:
        r.hset(keys.paused, mapping={"by": "e2e_bench", "at_ms": int(time.time() * 1000)})
    else:
        r.delete(keys.paused)


def bench_factory(redis_url: str, tmp: Path, n: int, workers: int, concurrency: int, timeout: float) -> dict:
    work = tmp / "factory"
    work.mkdir()
    namespace = "bench" + uuid.uuid4().hex[:8]
    keys = Keys(namespace)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    ledger = Ledger(r, keys, DispatchSettings())
    (work / "issues.jsonl").write_text("".join(issue_line(f"B-{i:05d}") for i in range(n)))
    # Paused until the clock starts: beat's kickoffs during start-up are counted no-ops.
    set_paused(r, keys, True)
    env = factory_env(redis_url, namespace, work, ["true"], interval_s=0.5, max_iterations=50, max_in_flight=64)
    group = Group()
    try:
        say(f"factory: starting {workers} workers -c {concurrency} + beat (namespace {namespace})")
        start_factory(group, env, work, workers, concurrency)
        from celery import Celery

        sender = Celery("e2e_bench_sender", broker=redis_url, set_as_current=False)
        sender.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry=False)
        say(f"factory: go ({n} issues)")
        t0 = time.perf_counter()
        set_paused(r, keys, False)
        sender.send_task("factory.loop.kickoff", kwargs={"by": "e2e_bench"}, queue=factory_queues(env, "loop"))
        first_done = None

        def done_count() -> int:
            nonlocal first_done
            done = ledger.gauges()["done"]
            if done and first_done is None:
                first_done = time.perf_counter() - t0
            return done

        wait_count(
            done_count,
            n,
            timeout,
            lambda done: f"factory: only {done}/{n} done after {timeout:.0f}s\n{group.tails()}",
            POLL_S,
        )
        elapsed = time.perf_counter() - t0
        counters = r.hgetall(keys.counters)
        sender.close()
    finally:
        group.stop()
        drop_namespace(r, keys)
        r.close()
    return {
        "elapsed_s": elapsed,
        "dispatches_per_s": n / elapsed,
        "first_done_s": first_done,
        "counters": {k: int(v) for k, v in counters.items() if v.lstrip("-").isdigit()},
    }


# -- plain Celery -------------------------------------------------------------------------------------------
def bench_plain(
    redis_url: str, tmp: Path, n: int, workers: int, concurrency: int, timeout: float, events: bool = False
) -> dict:
    """Plain Celery running ``true`` ``n`` times; ``events``: with task events on, as the factory's workers."""
    work = tmp / ("plain-events" if events else "plain")
    work.mkdir()
    (work / "bench_plain_app.py").write_text(PLAIN_APP)
    broker = with_db(redis_url, (url_db(redis_url) + 1) % 16)
    queue = "bench.plain." + uuid.uuid4().hex[:8]
    counter = f"{queue}:done"
    env = base_env(
        {
            "BENCH_BROKER_URL": broker,
            "BENCH_QUEUE": queue,
            "BENCH_COUNTER_KEY": counter,
            "PYTHONPATH": str(work),
            "BENCH_TASK_EVENTS": "1" if events else "0",
        }
    )
    r = redis.Redis.from_url(broker, decode_responses=True)
    r.delete(counter)
    group = Group()
    try:
        say(f"plain celery: starting {workers} workers -c {concurrency} (broker {broker}, queue {queue})")
        pids = []
        for i in range(workers):
            name = f"pw{i + 1}"
            argv = worker_argv(name, concurrency, app="bench_plain_app", queues=queue)
            pids.append(group.add(Proc(name, argv, env, work, "ready.", cwd=work)).pid)
        group.wait_ready()
        from celery import Celery

        sender = Celery("e2e_bench_plain_sender", broker=broker, set_as_current=False)
        sender.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry=False)
        say(f"plain celery: go ({n} tasks)")
        cpu = CpuMeter(r, pids, ["worker"] * len(pids))
        t0 = time.perf_counter()
        for _i in range(n):
            sender.send_task("bench.plain.run_true", queue=queue)
        wait_count(
            lambda: int(r.get(counter) or 0),
            n,
            timeout,
            lambda done: f"plain celery: only {done}/{n} ran after {timeout:.0f}s\n{group.tails()}",
            POLL_S,
        )
        elapsed = time.perf_counter() - t0
        cpu_ms = cpu.per_item_ms(n)  # the sender here (this process) is not counted: the factory sends in its workers
        sender.close()
    finally:
        group.stop()
        try:
            r.delete(counter, queue)
            for k in r.scan_iter(match="_kombu.binding.*"):
                if r.type(k) == "set" and any(queue in m for m in r.smembers(k)):
                    r.srem(k, *[m for m in r.smembers(k) if queue in m])
        except redis.RedisError:
            pass
        r.close()
    return {"elapsed_s": elapsed, "tasks_per_s": n / elapsed, "cpu_ms_per_task": cpu_ms}


# -- latency ---------------------------------------------------------------------------------------------
def append_at_random(source: Path, count: int, rng: random.Random, gap_min: float, gap_max: float) -> dict[str, float]:
    """Append ``count`` issues to ``source``, one whole line at a time after a random pause: issue -> append time."""
    ready_at: dict[str, float] = {}
    fd = os.open(source, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(count):
            time.sleep(rng.uniform(gap_min, gap_max))
            iid = f"L-{i:04d}"
            os.write(fd, issue_line(iid).encode())  # one write of a whole line: never a torn line
            ready_at[iid] = time.time()
    finally:
        os.close(fd)
    return ready_at


def agent_starts(out: Path) -> dict[str, float]:
    """issue -> the first start time its latency agent recorded in ``out``."""
    found: dict[str, float] = {}
    if out.exists():
        for line in out.read_text().splitlines():
            t, _, iid = line.partition(" ")
            if iid and iid not in found:
                found[iid] = float(t)
    return found


def latency_stats(lat: list[float], count: int) -> dict:
    return {
        "samples": len(lat),
        "missing": count - len(lat),
        "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99),
        "min_s": min(lat) if lat else float("nan"),
        "max_s": max(lat) if lat else float("nan"),
        "mean_s": sum(lat) / len(lat) if lat else float("nan"),
    }


def bench_latency(
    redis_url: str,
    tmp: Path,
    count: int,
    workers: int,
    concurrency: int,
    max_iterations: int,
    gap_min: float,
    gap_max: float,
    seed: int | None,
    timeout: float,
) -> dict:
    work = tmp / "latency"
    work.mkdir()
    namespace = "benchlat" + uuid.uuid4().hex[:8]
    keys = Keys(namespace)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    agent = work / "agent.py"
    agent.write_text(LATENCY_AGENT)
    out = work / "starts.txt"
    source = work / "issues.jsonl"
    source.write_text("")
    env = factory_env(
        redis_url,
        namespace,
        work,
        [PY, "-S", str(agent)],
        interval_s=1.0,
        max_iterations=max_iterations,
        max_in_flight=64,
        extra={"BENCH_LATENCY_OUT": str(out)},
    )
    rng = random.Random(seed)
    group = Group()
    try:
        say(
            f"latency: starting {workers} workers -c {concurrency} + beat (interval 1 s, "
            f"{max_iterations} iterations per run)"
        )
        start_factory(group, env, work, workers, concurrency)
        time.sleep(rng.uniform(0, 1.0))
        say(f"latency: appending {count} issues at random moments")
        ready_at = append_at_random(source, count, rng, gap_min, gap_max)
        try:
            wait_for(lambda: len(agent_starts(out)) >= count, timeout, "every latency issue's agent to start", 0.1)
        except BenchError:
            pass  # reported as missing
        started = agent_starts(out)
    finally:
        group.stop()
        drop_namespace(r, keys)
        r.close()
    return latency_stats([started[i] - ready_at[i] for i in ready_at if i in started], count)


# -- main ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = make_parser(__doc__)
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--n", type=int, default=200, help="issues (phase a) and tasks (phase b); default 200")
    ap.add_argument("--latency-n", type=int, default=30, help="issues appended in phase c; default 30")
    ap.add_argument(
        "--latency-max-iterations",
        type=int,
        default=3,
        help="FACTORY_LOOP__MAX_ITERATIONS in phase c; default 3 (the product default)",
    )
    ap.add_argument(
        "--latency-gap",
        type=float,
        nargs=2,
        default=(0.1, 0.9),
        metavar=("MIN", "MAX"),
        help="random pause between two appends in phase c, seconds; default 0.1 0.9",
    )
    ap.add_argument("--workers", type=int, default=2, help="workers per phase; default 2")
    ap.add_argument(
        "--loop-worker",
        action="store_true",
        help="factory phases: add a dedicated loop worker (-Q <ns>.loop -c 1), agent workers "
        "consume <ns>.agents only (the deployed layout)",
    )
    ap.add_argument("--concurrency", "-c", type=int, default=4, help="-c of each worker; default 4")
    ap.add_argument(
        "--redis-url",
        help="use this Redis (db N for factory, db N+1 for plain Celery) instead of "
        "starting one; a scratch Redis, never a production one",
    )
    ap.add_argument("--seed", type=int, default=None, help="seed of the random append moments")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-phase timeout, seconds; default 120")
    ap.add_argument(
        "--skip", choices=("factory", "plain", "latency"), action="append", default=[], help="skip a phase (repeatable)"
    )
    add_keep_tmp(ap)
    return ap.parse_args(argv)


def make_summary(args: argparse.Namespace, results: dict, t_start: float) -> dict:
    f, p, lat = results.get("factory"), results.get("plain"), results.get("latency")
    return {
        "n": args.n,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "dispatches_per_s": round(f["dispatches_per_s"], 2) if f else None,
        "plain_celery_tasks_per_s": round(p["tasks_per_s"], 2) if p else None,
        "ratio": round(f["dispatches_per_s"] / p["tasks_per_s"], 3) if f and p else None,
        "ratio_target": 0.7,
        "latency_n": args.latency_n,
        "latency_max_iterations": args.latency_max_iterations,
        "latency_p50_s": round(lat["p50_s"], 3) if lat else None,
        "latency_p99_s": round(lat["p99_s"], 3) if lat else None,
        "details": {
            "factory": f
            and {
                **f,
                "elapsed_s": round(f["elapsed_s"], 3),
                "dispatches_per_s": round(f["dispatches_per_s"], 2),
                "first_done_s": f["first_done_s"] and round(f["first_done_s"], 3),
            },
            "plain": p and {k: (round(v, 3) if isinstance(v, float) else v) for k, v in p.items()},
            "latency": lat and {k: (round(v, 3) if isinstance(v, float) else v) for k, v in lat.items()},
        },
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def print_human(args: argparse.Namespace, results: dict, summary: dict) -> None:
    f, p, lat = results.get("factory"), results.get("plain"), results.get("latency")
    print(
        f"e2e benchmark: n={args.n}, {args.workers} workers x -c {args.concurrency}, one redis-server "
        f"(wall {summary['wall_s']} s)"
    )
    if f:
        c = f["counters"]
        print(
            f"  (a) factory_worker      {f['dispatches_per_s']:8.1f} dispatches/s  "
            f"({args.n} issues in {f['elapsed_s']:.2f} s; first done after {f['first_done_s']:.3f} s; "
            f"runs {c.get('runs_started', 0)}, iterations {c.get('iterations', 0)})"
        )
    if p:
        print(
            f"  (b) plain Celery        {p['tasks_per_s']:8.1f} tasks/s       "
            f"({args.n} tasks in {p['elapsed_s']:.2f} s)"
        )
    if f and p:
        ratio = summary["ratio"]
        verdict = "meets" if ratio >= 0.7 else "below"
        print(f"      ratio factory/plain {ratio:8.3f}  ({verdict} the 0.7 target)")
    if lat:
        print(
            f"  (c) ready -> agent start, loop interval 1 s, {args.latency_max_iterations} iterations/run, "
            f"{lat['samples']} issues{' (' + str(lat['missing']) + ' never started)' if lat['missing'] else ''}:"
        )
        print(
            f"      p50 {lat['p50_s']:.3f} s   p99 {lat['p99_s']:.3f} s   "
            f"(min {lat['min_s']:.3f}, mean {lat['mean_s']:.3f}, max {lat['max_s']:.3f})"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global LOOP_WORKER
    LOOP_WORKER = args.loop_worker

    results: dict = {}

    def phases(tmp: Path, redis_url: str) -> None:
        if "factory" not in args.skip:
            results["factory"] = bench_factory(redis_url, tmp, args.n, args.workers, args.concurrency, args.timeout)
        if "plain" not in args.skip:
            results["plain"] = bench_plain(redis_url, tmp, args.n, args.workers, args.concurrency, args.timeout)
        if "latency" not in args.skip:
            results["latency"] = bench_latency(
                redis_url,
                tmp,
                args.latency_n,
                args.workers,
                args.concurrency,
                args.latency_max_iterations,
                args.latency_gap[0],
                args.latency_gap[1],
                args.seed,
                args.timeout,
            )

    t_start = time.perf_counter()
    code = run_session("e2e_bench", "factory-e2e-bench-", args.keep_tmp, phases, args.redis_url)
    if code:
        return code
    summary = make_summary(args, results, t_start)
    return emit(summary, args.json, lambda: print_human(args, results, summary))


if __name__ == "__main__":
    sys.exit(main())
