"""dispatch_cpu_bench: where one dispatch's CPU goes on the worker, without Celery (issue 8).

``backlog_bench`` shows that the factory's pool processes spend ~3 ms of CPU per issue against ~0.5 ms for
plain Celery. This takes the agent task's own part apart, in this process, on a fresh redis-server:
``dispatch.single.execute`` for ``--n`` issues in a row (agent ``true``, the refill's send recorded instead of
published, so each execute refills the next as on a worker), timing each part with ``time.process_time``
(CPU of this process; the agent's own CPU is reported apart, as reaped children).

Prints CPU per execute and per part (parts nest: ``CommandAgent.run`` holds ``_spawn``, and so on), then
what PDEATHSIG costs per spawn, three ways (none, ``setpriv``, a ``preexec_fn``).
The wrapper adds ~2 us per timed call. ``--json``: one JSON object.

Usage: .venv/bin/python benchmarks/dispatch_cpu_bench.py [--n 1000] [--json] [--keep-tmp]
"""

from __future__ import annotations

import functools
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _harness import add_keep_tmp, emit, factory_env, issue_line, make_parser, make_say, redis_cpu_s, run_session

say = make_say("dispatch_cpu_bench")
WARMUP = 50


def _parts() -> list[tuple[Any, str, str]]:
    """(owner, attribute, label) of each timed part, imported only once the environment is set."""
    from factory_worker.agents import command
    from factory_worker.dispatch import lifecycle
    from factory_worker.ledger import core as ledger
    from factory_worker.loop import iteration as loop

    return [
        (ledger.Ledger, "begin", "ledger.begin (begin.lua)"),
        (command.CommandAgent, "run", "CommandAgent.run"),
        (command, "make_workdir", "  make_workdir"),
        (command, "remove_workdir", "  remove_workdir"),
        (command.CommandAgent, "_spawn", "  _spawn"),
        (command.subprocess.Popen, "__init__", "    Popen (setpriv, vfork, exec)"),
        (command, "open_log", "    open_log"),
        (command.CommandAgent, "_supervise", "  _supervise"),
        (command.CommandAgent, "_result", "  _result"),
        (lifecycle, "settle", "settle (complete.lua + clean-up + pop)"),
        (lifecycle, "refill", "refill"),
        (ledger.Ledger, "claim", "  ledger.claim (claim.lua)"),
        (loop, "_remember_agent_tasks", "  queue_tasks.lua"),
    ]


def _timed(fn: Callable[..., Any], label: str, acc: Counter, calls: Counter) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[label] += time.process_time() - t0
            calls[label] += 1

    return wrapper


def measure(redis_url: str, tmp: Path, n: int) -> dict[str, Any]:
    work = tmp / "work"
    work.mkdir()
    (work / "issues.jsonl").write_text("".join(issue_line(f"D-{i:05d}") for i in range(n + WARMUP + 1)))
    env = factory_env(redis_url, "dispatchcpu", work, ["true"], {"FACTORY_DISPATCH__MAX_IN_FLIGHT": "4"})
    os.environ.update({k: v for k, v in env.items() if k.startswith("FACTORY_")})

    from factory_worker.config.settings import load_settings
    from factory_worker.context import Context
    from factory_worker.dispatch.job import Job
    from factory_worker.dispatch.single import execute
    from factory_worker.loop.iteration import dispatch_claims
    from factory_worker.loop.presence import publish_slots
    from factory_worker.sources.base import Issue

    ctx = Context(load_settings())
    publish_slots(ctx, "bench", 4)
    issues = [Issue(id=f"D-{i:05d}", title="bench", state="ready") for i in range(n + WARMUP + 1)]
    ctx.redis.rpush(ctx.keys.backlog, *[i.model_dump_json() for i in issues[1:]])
    queued: list[tuple[str, Issue, Any]] = []

    def send(task_id: str, issue: Issue, claim: Any, run_id: str | None, producer: Any = None) -> None:
        queued.append((task_id, issue, claim))

    first = ctx.ledger.claim([issues[0].id], fleet_slots=True)
    dispatch_claims(ctx, send, first.claims, {issues[0].id: issues[0]}, "bench")

    def one() -> None:
        task_id, issue, claim = queued.pop(0)
        res = execute(Job(ctx, task_id, issue.as_json_dict(), claim.token, "bench", hostname="bench", send=send))
        if res.get("settled") != "done" or not queued:
            raise SystemExit(f"dispatch_cpu_bench: an execute did not complete and refill: {res}")

    for _ in range(WARMUP):
        one()
    acc: Counter = Counter()
    calls: Counter = Counter()
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in _parts()]
    for (owner, attr, label), (_, _, fn) in zip(_parts(), originals):
        setattr(owner, attr, _timed(fn, label, acc, calls))
    try:
        server0 = redis_cpu_s(ctx.redis)
        children0, cpu0, wall0 = _children_s(), time.process_time(), time.perf_counter()
        for _ in range(n):
            one()
        cpu, wall, children = time.process_time() - cpu0, time.perf_counter() - wall0, _children_s() - children0
        server = redis_cpu_s(ctx.redis) - server0
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)
    labels = [label for _, _, label in _parts()]
    return {
        "n": n,
        "execute_cpu_ms": round(cpu * 1000 / n, 3),
        "execute_wall_ms": round(wall * 1000 / n, 3),
        "agent_process_cpu_ms": round(children * 1000 / n, 3),
        "redis_server_cpu_ms": round(server * 1000 / n, 3),
        # a dispatch with no Celery at all (no message, no trace, no events): a floor for any dispatch model
        # that keeps this task's work per issue
        "without_celery_cpu_ms": round((cpu + children + server) * 1000 / n, 3),
        "parts_cpu_ms": {label.strip(): round(acc[label] * 1000 / max(1, calls[label]), 3) for label in labels},
        "parts_calls_per_execute": {label.strip(): round(calls[label] / n, 2) for label in labels},
        "_labels": labels,
    }


def spawn_costs(n: int = 300) -> dict[str, Any]:
    """CPU per spawn of ``true`` from this process, three ways an agent could get PDEATHSIG: none (the floor),
    ``setpriv --pdeathsig`` (what agents use: vfork, then a second exec), ``prctl`` in a ``preexec_fn`` (a
    full fork). (parent ms, child ms) each, and this process's RSS, which a fork copies the page tables of."""
    import shutil
    import subprocess

    from factory_worker.agents.process import _preexec, _setpriv

    true = shutil.which("true") or "/bin/true"
    ways = {"true (no PDEATHSIG)": ([true], {}), "preexec_fn prctl + true": ([true], {"preexec_fn": _preexec()})}
    if _setpriv():
        ways["setpriv --pdeathsig + true"] = ([_setpriv(), "--pdeathsig", "KILL", "--", true], {})
    out: dict[str, Any] = {"rss_mb": round(_rss_kb() / 1024, 1)}
    for label, (argv, extra) in ways.items():
        t0 = os.times()
        for _ in range(n):
            subprocess.run(argv, check=True, **extra)
        t1 = os.times()
        out[label] = {
            "parent_ms": round((t1.user + t1.system - t0.user - t0.system) * 1000 / n, 3),
            "child_ms": round(
                (t1.children_user + t1.children_system - t0.children_user - t0.children_system) * 1000 / n, 3
            ),
        }
    return out


def _rss_kb() -> int:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    return next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS")), 0)


def _children_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--n", type=int, default=1000, help="timed executes (default 1000)")
    ap.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    add_keep_tmp(ap)
    args = ap.parse_args(argv)
    out: dict[str, Any] = {}

    def phases(tmp: Path, redis_url: str) -> None:
        say(f"{args.n} executes in this process (after {WARMUP} to warm up), agent true")
        out.update(measure(redis_url, tmp, args.n))
        out["spawn"] = spawn_costs()

    code = run_session("dispatch_cpu_bench", "dispatch-cpu-bench-", args.keep_tmp, phases, args.redis_url)
    if code:
        return code
    labels = out.pop("_labels")

    def human() -> None:
        print(f"dispatch_cpu_bench: dispatch.single.execute x {out['n']} (agent true), CPU of this process")
        print(
            f"  per execute: {out['execute_cpu_ms']:.3f} ms CPU ({out['execute_wall_ms']:.3f} ms wall); "
            f"the agent's own process: {out['agent_process_cpu_ms']:.3f} ms; redis-server: "
            f"{out['redis_server_cpu_ms']:.3f} ms"
        )
        print(f"  a dispatch without any Celery (the three together): {out['without_celery_cpu_ms']:.3f} ms CPU")
        for label in labels:
            key = label.strip()
            print(f"  {label:<44} {out['parts_cpu_ms'][key]:7.3f} ms  x {out['parts_calls_per_execute'][key]}")
        sp = out["spawn"]
        print(f"  spawning `true` from this process ({sp['rss_mb']} MB RSS), CPU per spawn:")
        for label, v in sp.items():
            if isinstance(v, dict):
                print(f"    {label:<42} parent {v['parent_ms']:.3f} ms  child {v['child_ms']:.3f} ms")

    return emit(out, args.json, human)


if __name__ == "__main__":
    raise SystemExit(main())
