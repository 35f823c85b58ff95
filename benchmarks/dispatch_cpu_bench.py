"""dispatch_cpu_bench: where one dispatch's CPU goes on the worker, without Celery (issue 8).

``backlog_bench`` shows that the factory's pool processes spend ~3 ms of CPU per issue against ~0.5 ms for
plain Celery. This takes the agent task's own part apart, in this process, on a fresh redis-server:
``dispatch.single.execute`` for ``--n`` issues in a row (agent ``true``, the refill's send recorded instead of
published, so each execute refills the next as on a worker), timing each part with ``time.process_time``
(CPU of this process; the agent's own CPU is reported apart, as reaped children).

Prints CPU per execute and per part (parts nest: ``CommandAgent.run`` holds ``_spawn``, and so on), then
what PDEATHSIG costs per spawn, three ways (none, ``setpriv``, a ``preexec_fn``), and what an agent's own PID
namespace adds (``agent.pid_namespace``: the namespace, ``unshare --mount-proc``, its end), side by side,
with a uid switch too when run as root. The executes use ``--pid-namespace`` (default auto: a namespace
where one can be made). The wrapper adds ~2 us per timed call. ``--json``: one JSON object.

Usage: .venv/bin/python benchmarks/dispatch_cpu_bench.py [--n 1000] [--pid-namespace auto|off] [--json] [--keep-tmp]
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


def measure(redis_url: str, tmp: Path, n: int, pid_namespace: str = "auto") -> dict[str, Any]:
    work = tmp / "work"
    work.mkdir()
    (work / "issues.jsonl").write_text("".join(issue_line(f"D-{i:05d}") for i in range(n + WARMUP + 1)))
    env = factory_env(
        redis_url,
        "dispatchcpu",
        work,
        ["true"],
        {
            "FACTORY_DISPATCH__MAX_IN_FLIGHT": "4",
            "FACTORY_AGENT__PID_NAMESPACE": pid_namespace,
            # the slots published once below outlive the run
            "FACTORY_WORKER__HEARTBEAT_TTL_S": "3600",
        },
    )
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
    from factory_worker.agents.pidns import use_namespace

    return {
        "n": n,
        "pid_namespace": pid_namespace,
        "agents_in_own_pid_namespace": use_namespace(ctx.settings.agent),
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
    full fork); then what agents get with a PID namespace of their own (:func:`process.launch` with
    ``pidns``: ``setpriv --pdeathsig``, ``unshare --mount-proc``, in a new namespace), and both with the
    uid switch of agent.user when root. (parent ms, child ms, wall ms) each, and this process's RSS, which a
    fork copies the page tables of. The kernel's work to tear a namespace down runs partly outside the child
    (RCU, workers): the wall time shows what a spawn waits for it."""
    import contextlib
    import shutil
    import subprocess

    from factory_worker.agents.pidns import new_namespace, unavailable
    from factory_worker.agents.process import _preexec, launch
    from factory_worker.agents.sandbox import Identity
    from factory_worker.agents.tools import setpriv as _setpriv

    true = shutil.which("true") or "/bin/true"
    plain = contextlib.nullcontext
    ways = {
        "true (no PDEATHSIG)": ([true], {}, plain),
        "preexec_fn prctl + true": ([true], {"preexec_fn": _preexec()}, plain),
    }
    if _setpriv():
        ways["setpriv --pdeathsig + true"] = ([_setpriv(), "--pdeathsig", "KILL", "--", true], {}, plain)
    nobody = Identity(65534, 65534, "nobody") if os.geteuid() == 0 else None
    if _setpriv() and nobody:
        ways["setpriv --reuid --pdeathsig + true"] = (launch([true], nobody)[0], {}, plain)
    out: dict[str, Any] = {"rss_mb": round(_rss_kb() / 1024, 1), "pid_namespace_unavailable": unavailable()}
    if unavailable() is None:
        ways["pid namespace: setpriv + unshare --mount-proc + true"] = (
            launch([true], None, True)[0],
            {},
            new_namespace,
        )
        if nobody:
            ways["pid namespace: ... + setpriv --reuid + true"] = (launch([true], nobody, True)[0], {}, new_namespace)
    for label, (argv, extra, around) in ways.items():
        t0, w0 = os.times(), time.perf_counter()
        for _ in range(n):
            with around():
                proc = subprocess.Popen(argv, **extra)
            if proc.wait() != 0:
                raise SystemExit(f"dispatch_cpu_bench: {argv} exited {proc.returncode}")
        t1, wall = os.times(), time.perf_counter() - w0
        out[label] = {
            "parent_ms": round((t1.user + t1.system - t0.user - t0.system) * 1000 / n, 3),
            "child_ms": round(
                (t1.children_user + t1.children_system - t0.children_user - t0.children_system) * 1000 / n, 3
            ),
            "wall_ms": round(wall * 1000 / n, 3),
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
    ap.add_argument(
        "--pid-namespace",
        default="auto",
        choices=("auto", "off"),
        help="agent.pid_namespace of the executes (default auto: their own where one can be made)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    add_keep_tmp(ap)
    args = ap.parse_args(argv)
    out: dict[str, Any] = {}

    def phases(tmp: Path, redis_url: str) -> None:
        say(f"{args.n} executes in this process (after {WARMUP} to warm up), agent true")
        out.update(measure(redis_url, tmp, args.n, args.pid_namespace))
        out["spawn"] = spawn_costs()

    code = run_session("dispatch_cpu_bench", "dispatch-cpu-bench-", args.keep_tmp, phases, args.redis_url)
    if code:
        return code
    labels = out.pop("_labels")

    def human() -> None:
        print(
            f"dispatch_cpu_bench: dispatch.single.execute x {out['n']} (agent true, "
            f"{'in its own PID namespace' if out['agents_in_own_pid_namespace'] else 'no PID namespace'}), "
            "CPU of this process"
        )
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
                print(
                    f"    {label:<52} parent {v['parent_ms']:.3f} ms  child {v['child_ms']:.3f} ms  "
                    f"wall {v['wall_ms']:.3f} ms"
                )
        if sp["pid_namespace_unavailable"]:
            print(f"    (no PID namespace here: {sp['pid_namespace_unavailable']})")

    return emit(out, args.json, human)


if __name__ == "__main__":
    raise SystemExit(main())
