#!/usr/bin/env python
"""Kill and teardown benchmark: how fast ``kill-loop`` stops a live run, and how fast SIGTERM tears a worker down.

One run, one redis-server (started here on a free port, in a temp dir), two phases:

(a) kill-loop    1 x ``celery -A factory_worker worker -c 4`` (both queues) + 1 beat, loop interval 1 s,
                 ``loop.max_iterations`` 200, a file source that sleeps ``--iteration-cost-s`` (default 0.1)
                 per poll so a run stays live for a while, and an agent that sleeps ``--agent-sleep-s``
                 (default 0.2). The worker and beat are reused across ``--trials`` (default 10) trials in one
                 namespace; the loop is killed before they start, so beat's kickoffs are no-ops and every trial
                 begins with ``ctl start-loop`` (which clears the kill and starts a run). A trial appends a
                 handful of new ready issues, runs ``start-loop --json``, waits until ``ctl loop-status --json``
                 exits 0 with the run ``running`` and ``iterations_done >= 2``, then runs ``ctl kill-loop
                 --json``: t_start = just before it is spawned, t0 = the moment it returns. The run's loop
                 tasks (``<run>-iter-<i>`` / ``<run>-finish``) are watched through Celery task events (an
                 in-process ``app.events.Receiver`` on the same broker: task-succeeded / -failed / -revoked);
                 the worker's ``-l INFO`` log is parsed as a cross-check and a fallback.
                 -> kill_effect_s = max(0, last loop task finished - t0)   (median / min / max; target <= 1 s)
                    kill_effect_from_start_s = last loop task finished - t_start,  kill_cmd_s = t0 - t_start
(b) SIGTERM      per ``--term-trials`` (default 3) trial: a fresh namespace, 1 worker -c 1 with
                 ``worker.soft_shutdown_s`` = ``--soft-shutdown-s`` (default 5), an agent that sleeps 60 s and
                 writes its pid to a file. ``ctl run-once --json`` dispatches the one issue; once the agent
                 has started, SIGTERM goes to the worker's main process and the clock runs until it exits.
                 Then: is the agent pid gone, is the claim released (``Ledger.explain(issue).state`` is not
                 ``in-flight``), was the attempt counted (it must not be: interrupted, not failed).
                 -> teardown_s (median / min / max; target <= soft_shutdown_s + 1)

Worker and beat start-up is never timed. Every subprocess runs in its own process group and is killed with
it (SIGTERM, then SIGKILL of the group); temp dirs are removed. A default run takes about 2 minutes.

    .venv/bin/python benchmarks/kill_bench.py            # human-readable figures
    .venv/bin/python benchmarks/kill_bench.py --json     # one JSON object on stdout (progress on stderr)

This is a script that prints figures, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from _harness import (
    PY,
    BenchError,
    Group,
    Proc,
    add_keep_tmp,
    beat_argv,
    drop_namespace,
    emit,
    factory_queues,
    make_parser,
    make_say,
    pid_alive,
    run_session,
    stats,
    wait_for,
    worker_argv,
)
from _harness import factory_env as harness_factory_env
from _harness import issue_line as harness_issue_line

from factory_worker.config.settings import load_settings
from factory_worker.ledger.core import Ledger
from factory_worker.ledger.keys import Keys
from harness import run_ctl

KILL_TARGET_S = 1.0

#: The phase (a) source: the file source plus a fixed cost per poll, so each iteration takes a while.
SLOW_SOURCE = '''
"""kill_bench's issue source: FileSource plus KILL_BENCH_POLL_COST_S of sleep per poll."""
import os
import time

from factory_worker.sources.file import FileSource


class SlowFileSource(FileSource):
    def __init__(self, settings):
        super().__init__(settings.path, settings.ready_states)
        self.cost_s = float(os.environ.get("KILL_BENCH_POLL_COST_S", "0"))

    def poll(self):
        time.sleep(self.cost_s)
        return super().poll()
'''

#: The agent: writes its pid to $KILL_BENCH_PIDS/<issue>.pid, then sleeps $KILL_BENCH_AGENT_SLEEP_S.
AGENT = """
import os, time
with open(os.path.join(os.environ["KILL_BENCH_PIDS"], os.environ["FACTORY_ISSUE_ID"] + ".pid"), "w") as fh:
    fh.write(str(os.getpid()))
time.sleep(float(os.environ.get("KILL_BENCH_AGENT_SLEEP_S", "0.2")))
"""

LOOP_END_EVENTS = ("task-succeeded", "task-failed", "task-revoked")
# [2025-01-01 12:00:00,123: INFO/MainProcess] Task factory.loop.iteration[<id>] succeeded in 0.1s: ...
_LOG_TS = r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/[^\]]*\] "
_LOG_END = re.compile(
    _LOG_TS + r"(?:Task (factory\.loop\.\w+)\[([^\]]+)\] (succeeded|raised|failed)"
    r"|Discarding revoked task: (factory\.loop\.\w+)\[([^\]]+)\])",
    re.M,
)


say = make_say("kill_bench")


def fmt(st: dict[str, float | None]) -> str:
    if st["median"] is None:
        return "no samples"
    return f"median {st['median']:.3f} s   min {st['min']:.3f}   max {st['max']:.3f}"


def _cell(v: object) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


# -- environment and ctl ---------------------------------------------------------------------------------
def factory_env(redis_url: str, namespace: str, work: Path, extra: dict[str, str]) -> dict[str, str]:
    agent = work / "agent.py"
    agent.write_text(AGENT)
    (work / "pids").mkdir(exist_ok=True)
    (work / "issues.jsonl").touch()
    return harness_factory_env(
        redis_url,
        namespace,
        work,
        [PY, "-S", str(agent), "{id}"],
        {
            "FACTORY_LOOP__INTERVAL_S": "1",
            "FACTORY_LOOP__STALE_AFTER_S": "10",
            "FACTORY_LOOP__MAX_ITERATIONS": "3",
            "FACTORY_DISPATCH__MAX_IN_FLIGHT": "8",
            "FACTORY_DISPATCH__LEASE_TTL_S": "10",
            "KILL_BENCH_PIDS": str(work / "pids"),
            **extra,
        },
        path=(work,),
    )


def ctl(env: dict[str, str], *args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """``python -m factory_worker.ctl ARGS``: (result, wall-clock start, wall-clock end)."""
    t_start = time.time()
    res = run_ctl(env, *args, timeout=timeout)
    return res, t_start, time.time()


def ctl_json(env: dict[str, str], *args: str, ok: tuple[int, ...] = (0,)) -> tuple[dict, float, float, int]:
    res, t_start, t_end = ctl(env, *args, "--json")
    if res.returncode not in ok:
        raise BenchError(f"ctl {' '.join(args)} exited {res.returncode}: {res.stderr.strip() or res.stdout[-500:]}")
    try:
        data = json.loads(res.stdout) if res.stdout.strip() else {}
    except ValueError:
        raise BenchError(f"ctl {' '.join(args)} printed no JSON: {res.stdout[-500:]}") from None
    return data, t_start, t_end, res.returncode


def issue_line(issue_id: str) -> str:
    return harness_issue_line(issue_id, "kill bench")


# -- task events -----------------------------------------------------------------------------------------
class EventTap:
    """Celery task events of the broker, captured by an in-process ``app.events.Receiver`` thread."""

    def __init__(self, broker_url: str) -> None:
        from celery import Celery

        self.app = Celery("kill_bench_events", broker=broker_url, set_as_current=False)
        self.app.conf.update(event_serializer="json", accept_content=["json"], broker_connection_retry=True)
        self.events: list[dict[str, Any]] = []
        self.names: dict[str, str] = {}
        self.worker_events = 0
        self.lock = threading.Lock()
        self.receiver = None
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name="kill-bench-events", daemon=True)

    def start(self) -> EventTap:
        self.thread.start()
        return self

    def _on(self, event: dict[str, Any]) -> None:
        kind = event.get("type", "")
        with self.lock:
            if kind.startswith("worker-"):
                self.worker_events += 1
                return
            uid = event.get("uuid")
            if kind == "task-received" and uid:
                self.names[uid] = event.get("name", "")
            self.events.append(
                {
                    "type": kind,
                    "uuid": uid,
                    "timestamp": float(event.get("timestamp") or 0),
                    "local_received": float(event.get("local_received") or time.time()),
                }
            )

    def _run(self) -> None:
        try:
            with self.app.connection_for_read() as conn:
                self.receiver = self.app.events.Receiver(conn, handlers={"*": self._on})
                self.receiver.capture(limit=None, timeout=None, wakeup=False)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(timeout=5)

    def seen_worker(self) -> bool:
        with self.lock:
            return self.worker_events > 0 or bool(self.events)

    def loop_ends(self, run_id: str) -> list[dict[str, Any]]:
        prefix = f"{run_id}-"
        with self.lock:
            return [e for e in self.events if e["type"] in LOOP_END_EVENTS and (e["uuid"] or "").startswith(prefix)]

    def agents_received_after(self, t: float) -> int:
        with self.lock:
            return sum(
                1
                for e in self.events
                if e["type"] == "task-received"
                and e["timestamp"] > t
                and self.names.get(e["uuid"] or "") == "factory.agent.run"
            )


def log_loop_ends(log_text: str, run_id: str) -> list[dict[str, Any]]:
    """The run's loop task ends as the worker logged them (millisecond, local-time stamps)."""
    out = []
    for m in _LOG_END.finditer(log_text):
        stamp, name, uid, outcome, rname, ruid = m.groups()
        uid = uid or ruid
        if not uid.startswith(f"{run_id}-"):
            continue
        ts = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        out.append({"type": "revoked" if ruid else outcome, "uuid": uid, "name": name or rname, "timestamp": ts})
    return out


# -- (a) kill-loop -----------------------------------------------------------------------------------------
@dataclass
class KillRig:
    """Phase (a)'s fixed parts, shared by its trials: the namespace's keys, Redis, the env, the worker."""

    work: Path
    keys: Keys
    r: redis.Redis
    env: dict[str, str]
    tap: EventTap
    worker: Proc


def start_kill_stack(procs: Group, env: dict[str, str], work: Path, tap: EventTap) -> Proc:
    """1 worker -c 4 + beat, ready; then the first Celery event (or a note that the log is the fallback)."""
    worker = procs.add(Proc("w1", worker_argv("w1", 4, queues=factory_queues(env)), env, work, "ready."))
    procs.add(Proc("beat", beat_argv(work), env, work, "beat: Starting"))
    procs.wait_ready(60)
    try:
        wait_for(tap.seen_worker, 10, "the first Celery event")
    except BenchError:
        say(f"kill: no Celery event seen ({tap.error or 'receiver silent'}): falling back to the worker log")
    return worker


def start_trial_run(rig: KillRig, trial: int, issues_per_trial: int) -> tuple[str, float, float]:
    """Append the trial's issues and ``ctl start-loop``: (run id, command start, command end)."""
    with open(rig.work / "issues.jsonl", "a") as fh:
        fh.write("".join(issue_line(f"K-{trial:02d}-{n}") for n in range(issues_per_trial)))
    started, s0, s1, _ = ctl_json(rig.env, "start-loop")
    if not started.get("started"):
        raise BenchError(f"start-loop did not start a run: {started}")
    return started["run_id"], s0, s1


def wait_run_live(rig: KillRig, run_id: str) -> dict:
    """Until the run is ``running`` with 2 iterations done, in Redis and then in ``ctl loop-status``: the status."""

    def run_live() -> bool:
        raw = rig.r.hmget(rig.keys.run(run_id), "status", "iterations_done")
        return raw[0] == "running" and int(raw[1] or 0) >= 2

    wait_for(run_live, 30, f"run {run_id} to reach 2 iterations", 0.02)

    def status_live() -> dict | None:
        res, _, _ = ctl(rig.env, "loop-status", "--json")
        if res.returncode != 0:
            return None
        st = json.loads(res.stdout)
        run = st.get("run") or {}
        ok = run.get("run_id") == run_id and run.get("status") == "running" and run.get("iterations_done", 0) >= 2
        return st if ok else None

    return wait_for(status_live, 30, f"loop-status to report run {run_id} live", 0.05)


def kill_run(rig: KillRig, run_id: str) -> tuple[float, float, float | None]:
    """``ctl kill-loop``: (command start, command end = t0, when the kill flag was set per Redis or None)."""
    killed, t_start, t0, code = ctl_json(rig.env, "kill-loop", ok=(0, 1))
    if code != 0 or killed.get("killed") != run_id:
        raise BenchError(f"kill-loop did not kill run {run_id} (exit {code}): {killed}")
    kill_flag = rig.r.hgetall(rig.keys.kill)  # at_ms: when kill-loop set the flag (Redis clock, same host)
    flag_t = int(kill_flag["at_ms"]) / 1000 if kill_flag.get("at_ms") else None
    return t_start, t0, flag_t


def kill_row(
    rig: KillRig,
    trial: int,
    run_id: str,
    status: dict,
    start_cmd: tuple[float, float],
    t_start: float,
    t0: float,
    flag_t: float | None,
) -> dict[str, Any]:
    """One trial's figures, from the run's loop task ends (events, else the worker log) and its record."""
    s0, s1 = start_cmd
    ev = rig.tap.loop_ends(run_id)
    lg = log_loop_ends(rig.worker.log(), run_id)
    source, ends = ("events", ev) if ev else ("log", lg)
    last = max((e["timestamp"] for e in ends), default=None)
    rec = rig.r.hgetall(rig.keys.run(run_id))
    after = [e for e in ends if e["timestamp"] > t0]
    return {
        "trial": trial,
        "run_id": run_id,
        "source": source if ends else None,
        "kill_effect_s": None if last is None else round(max(0.0, last - t0), 4),
        "kill_effect_signed_s": None if last is None else round(last - t0, 4),
        "kill_effect_from_start_s": None if last is None else round(last - t_start, 4),
        "kill_effect_from_flag_s": None if last is None or flag_t is None else round(last - flag_t, 4),
        "kill_flag_set_after_start_s": None if flag_t is None else round(flag_t - t_start, 4),
        "kill_cmd_s": round(t0 - t_start, 4),
        "start_loop_cmd_s": round(s1 - s0, 4),
        "log_last_minus_t0_s": (round(max(e["timestamp"] for e in lg) - t0, 3) if lg else None),
        "loop_task_ends": len(ends),
        "loop_task_ends_after_kill": len(after),
        "revoked_events": sum(1 for e in ends if e["type"] in ("task-revoked", "revoked")),
        "iterations_at_status": (status.get("run") or {}).get("iterations_done"),
        "iterations_done_final": int(rec.get("iterations_done", 0)),
        "run_status": rec.get("status"),
        "agent_tasks_received_after_kill": rig.tap.agents_received_after(t0),
    }


def kill_trial(rig: KillRig, trial: int, trials: int, issues_per_trial: int, settle_s: float) -> dict[str, Any]:
    """Start a run, wait until it is live, kill it, collect its loop task ends for ``settle_s``: the trial's row."""
    run_id, s0, s1 = start_trial_run(rig, trial, issues_per_trial)
    status = wait_run_live(rig, run_id)
    t_start, t0, flag_t = kill_run(rig, run_id)
    time.sleep(settle_s)  # collect whatever the run still does after the kill
    row = kill_row(rig, trial, run_id, status, (s0, s1), t_start, t0, flag_t)
    say(
        f"kill trial {trial + 1}/{trials}: run {run_id} effect {row['kill_effect_signed_s']} s after "
        f"kill-loop returned ({row['kill_cmd_s']:.3f} s command, {row['loop_task_ends_after_kill']} loop task "
        f"end(s) after it, status {row['run_status']}, via {row['source']})"
    )
    return row


def kill_summary(rows: list[dict[str, Any]], receiver_error: str | None, counters: dict[str, str]) -> dict:
    effects = [x["kill_effect_s"] for x in rows if x["kill_effect_s"] is not None]
    return {
        "trials": rows,
        "kill_effect_s": stats(effects),
        "kill_effect_from_start_s": stats(
            [x["kill_effect_from_start_s"] for x in rows if x["kill_effect_from_start_s"] is not None]
        ),
        "kill_effect_from_flag_s": stats(
            [x["kill_effect_from_flag_s"] for x in rows if x["kill_effect_from_flag_s"] is not None]
        ),
        "kill_cmd_s": stats([x["kill_cmd_s"] for x in rows]),
        "within_target": sum(1 for e in effects if e <= KILL_TARGET_S),
        "measured": len(effects),
        "event_receiver_error": receiver_error,
        "counters": {k: int(v) for k, v in counters.items() if v.lstrip("-").isdigit()},
    }


def bench_kill(
    redis_url: str,
    tmp: Path,
    trials: int,
    iteration_cost_s: float,
    agent_sleep_s: float,
    issues_per_trial: int,
    settle_s: float,
    max_iterations: int,
) -> dict:
    work = tmp / "kill"
    work.mkdir()
    namespace = "killbench" + uuid.uuid4().hex[:8]
    keys = Keys(namespace)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    (work / "kill_bench_source.py").write_text(SLOW_SOURCE)
    env = factory_env(
        redis_url,
        namespace,
        work,
        {
            "FACTORY_LOOP__MAX_ITERATIONS": str(max_iterations),
            "FACTORY_SOURCE__KIND": "kill_bench_source:SlowFileSource",
            "KILL_BENCH_POLL_COST_S": str(iteration_cost_s),
            "KILL_BENCH_AGENT_SLEEP_S": str(agent_sleep_s),
        },
    )
    # Killed before anything starts: beat's kickoffs are counted no-ops, every trial begins with start-loop.
    r.hset(
        keys.kill,
        mapping={"run_id": "", "by": "kill_bench", "at_ms": int(time.time() * 1000), "reason": "kill_bench set-up"},
    )
    tap = EventTap(redis_url).start()
    procs = Group()
    rows: list[dict[str, Any]] = []
    try:
        say(
            f"kill: starting 1 worker -c 4 + beat (namespace {namespace}, {max_iterations} iterations/run, "
            f"{iteration_cost_s:g} s per iteration, agent {agent_sleep_s:g} s)"
        )
        rig = KillRig(work, keys, r, env, tap, start_kill_stack(procs, env, work, tap))
        for trial in range(trials):
            rows.append(kill_trial(rig, trial, trials, issues_per_trial, settle_s))
        counters = r.hgetall(keys.counters)
    finally:
        procs.stop()
        tap.stop()
        drop_namespace(r, keys)
        r.close()
    return kill_summary(rows, tap.error, counters)


# -- (b) SIGTERM teardown -------------------------------------------------------------------------------------
def start_agent(worker: Proc, env: dict[str, str], work: Path, issue: str) -> int:
    """Worker ready, ``ctl run-once`` dispatches ``issue``, its agent has started (and ran 0.2 s): the agent pid."""
    wait_for(worker.ready, 60, "the worker to be ready")
    report, _, _, _ = ctl_json(env, "run-once")
    if report.get("dispatched") != 1:
        raise BenchError(f"run-once did not dispatch {issue}: {report}")
    pid_file = work / "pids" / f"{issue}.pid"
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 30, "the agent to start", 0.02)
    agent_pid = int(pid_file.read_text())
    time.sleep(0.2)  # the agent is running, its supervisor is in its loop
    return agent_pid


def sigterm_until_exit(worker: Proc, agent_pid: int, soft_shutdown_s: float) -> tuple[float | None, float | None, bool]:
    """SIGTERM the worker's main process and watch it exit: (teardown s or None, agent gone s or None,
    agent alive when the worker exited)."""
    t0 = time.monotonic()
    os.kill(worker.pid, signal.SIGTERM)
    agent_gone_s = None
    deadline = t0 + soft_shutdown_s + 60
    while worker.proc.poll() is None and time.monotonic() < deadline:
        if agent_gone_s is None and not pid_alive(agent_pid):
            agent_gone_s = time.monotonic() - t0
        time.sleep(0.01)
    exited = worker.proc.poll() is not None
    teardown = time.monotonic() - t0 if exited else None
    agent_alive_at_exit = pid_alive(agent_pid)
    if agent_gone_s is None and not agent_alive_at_exit:
        agent_gone_s = time.monotonic() - t0
    return teardown, agent_gone_s, agent_alive_at_exit


def term_trial(
    redis_url: str, r: redis.Redis, tmp: Path, trial: int, trials: int, soft_shutdown_s: float, concurrency: int
) -> dict[str, Any]:
    """One SIGTERM trial in a fresh namespace: its row."""
    work = tmp / f"term-{trial}"
    work.mkdir()
    namespace = "termbench" + uuid.uuid4().hex[:8]
    keys = Keys(namespace)
    issue = f"T-{trial}"
    env = factory_env(
        redis_url,
        namespace,
        work,
        {
            "FACTORY_WORKER__SOFT_SHUTDOWN_S": str(soft_shutdown_s),
            "FACTORY_DISPATCH__LEASE_TTL_S": "30",
            "KILL_BENCH_AGENT_SLEEP_S": "60",
        },
    )
    (work / "issues.jsonl").write_text(issue_line(issue))
    settings = load_settings(redis_url=redis_url, namespace=namespace)
    ledger = Ledger.from_settings(settings, r)
    worker = Proc("w1", worker_argv("w1", concurrency, queues=factory_queues(env)), env, work, "ready.")
    try:
        agent_pid = start_agent(worker, env, work, issue)
        state_before = ledger.explain(issue).state
        teardown, agent_gone_s, agent_alive_at_exit = sigterm_until_exit(worker, agent_pid, soft_shutdown_s)
        expl = ledger.explain(issue)
        counters = ledger.counters()
        row = {
            "trial": trial,
            "teardown_s": None if teardown is None else round(teardown, 3),
            "worker_exit_code": worker.proc.returncode,
            "agent_gone_s": None if agent_gone_s is None else round(agent_gone_s, 3),
            "exit_after_agent_gone_s": (
                round(teardown - agent_gone_s, 3) if teardown is not None and agent_gone_s is not None else None
            ),
            "agent_alive_at_worker_exit": agent_alive_at_exit,
            "claim_state_before": state_before,
            "claim_state_after": expl.state,
            "claim_released": expl.state != "in-flight",
            "attempts_after": int(expl.detail.get("attempts") or 0),
            "released_interrupted": int(counters.get("released_interrupted", 0)),
            "worker_key_left": bool(r.exists(keys.worker(f"w1@{os.uname().nodename}"))),
        }
        say(
            f"term trial {trial + 1}/{trials}: worker exited {row['teardown_s']} s after SIGTERM "
            f"(code {row['worker_exit_code']}), agent gone after {row['agent_gone_s']} s, claim "
            f"{state_before} -> {expl.state}"
        )
        return row
    finally:
        worker.stop()
        drop_namespace(r, keys)


def term_summary(rows: list[dict[str, Any]], soft_shutdown_s: float) -> dict:
    teardowns = [x["teardown_s"] for x in rows if x["teardown_s"] is not None]
    return {
        "trials": rows,
        "teardown_s": stats(teardowns),
        "agent_gone_s": stats([x["agent_gone_s"] for x in rows if x["agent_gone_s"] is not None]),
        "exit_after_agent_gone_s": stats(
            [x["exit_after_agent_gone_s"] for x in rows if x["exit_after_agent_gone_s"] is not None]
        ),
        "within_target": sum(1 for t in teardowns if t <= soft_shutdown_s + 1),
        "agents_gone": sum(1 for x in rows if not x["agent_alive_at_worker_exit"]),
        "claims_released": sum(1 for x in rows if x["claim_released"]),
        "attempts_counted": sum(1 for x in rows if x["attempts_after"]),
    }


def bench_term(redis_url: str, tmp: Path, trials: int, soft_shutdown_s: float, concurrency: int) -> dict:
    rows: list[dict[str, Any]] = []
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for trial in range(trials):
            rows.append(term_trial(redis_url, r, tmp, trial, trials, soft_shutdown_s, concurrency))
    finally:
        r.close()
    return term_summary(rows, soft_shutdown_s)


# -- main ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = make_parser(__doc__)
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--trials", type=int, default=10, help="kill-loop trials (phase a); default 10")
    ap.add_argument(
        "--iteration-cost-s",
        type=float,
        default=0.1,
        help="sleep per source poll, i.e. per iteration, in phase a; default 0.1",
    )
    ap.add_argument("--agent-sleep-s", type=float, default=0.2, help="agent run time in phase a; default 0.2")
    ap.add_argument("--issues-per-trial", type=int, default=5, help="ready issues appended per trial; default 5")
    ap.add_argument("--max-iterations", type=int, default=200, help="loop.max_iterations in phase a; default 200")
    ap.add_argument(
        "--settle-s",
        type=float,
        default=2.5,
        help="how long loop task ends are collected after kill-loop returns; default 2.5",
    )
    ap.add_argument("--term-trials", type=int, default=3, help="SIGTERM trials (phase b); default 3")
    ap.add_argument(
        "--soft-shutdown-s", type=float, default=5.0, help="FACTORY_WORKER__SOFT_SHUTDOWN_S in phase b; default 5"
    )
    ap.add_argument("--term-concurrency", type=int, default=1, help="-c of the phase b worker; default 1")
    ap.add_argument("--skip", choices=("kill", "term"), action="append", default=[], help="skip a phase (repeatable)")
    add_keep_tmp(ap)
    return ap.parse_args(argv)


def make_summary(args: argparse.Namespace, results: dict, t_start: float) -> dict:
    k, t = results.get("kill"), results.get("term")
    return {
        "trials": args.trials if k else 0,
        "loop_interval_s": 1.0,
        "max_iterations": args.max_iterations,
        "iteration_cost_s": args.iteration_cost_s,
        "agent_sleep_s": args.agent_sleep_s,
        "kill_effect_s_median": k and k["kill_effect_s"]["median"],
        "kill_effect_s_min": k and k["kill_effect_s"]["min"],
        "kill_effect_s_max": k and k["kill_effect_s"]["max"],
        "kill_effect_from_start_s_median": k and k["kill_effect_from_start_s"]["median"],
        "kill_effect_from_flag_s_median": k and k["kill_effect_from_flag_s"]["median"],
        "kill_cmd_s_median": k and k["kill_cmd_s"]["median"],
        "kill_target_s": KILL_TARGET_S,
        "kill_within_target": k and f"{k['within_target']}/{k['measured']}",
        "term_trials": args.term_trials if t else 0,
        "soft_shutdown_s": args.soft_shutdown_s,
        "teardown_s_median": t and t["teardown_s"]["median"],
        "teardown_s_min": t and t["teardown_s"]["min"],
        "teardown_s_max": t and t["teardown_s"]["max"],
        "teardown_target_s": args.soft_shutdown_s + 1,
        "term_agents_gone": t and f"{t['agents_gone']}/{len(t['trials'])}",
        "term_claims_released": t and f"{t['claims_released']}/{len(t['trials'])}",
        "details": results,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def print_kill(args: argparse.Namespace, k: dict) -> None:
    print(
        f"  (a) kill-loop -> last loop task of the run finished, {k['measured']}/{args.trials} trials "
        f"(1 worker -c 4 + beat, interval 1 s, {args.iteration_cost_s:g} s/iteration):"
    )
    print(
        f"      after kill-loop returned      {fmt(k['kill_effect_s'])}   "
        f"({k['within_target']}/{k['measured']} within the {KILL_TARGET_S:g} s target)"
    )
    print(f"      after kill-loop started       {fmt(k['kill_effect_from_start_s'])}")
    print(f"      after kill-loop set the flag  {fmt(k['kill_effect_from_flag_s'])}   (signed)")
    print(f"      kill-loop command duration    {fmt(k['kill_cmd_s'])}")
    cols = [
        ("trial", "trial", 5),
        ("effect_s", "kill_effect_s", 8),
        ("signed_s", "kill_effect_signed_s", 8),
        ("start_s", "kill_effect_from_start_s", 7),
        ("flag_s", "kill_effect_from_flag_s", 7),
        ("cmd_s", "kill_cmd_s", 6),
        ("ends>t0", "loop_task_ends_after_kill", 7),
        ("revoked", "revoked_events", 7),
        ("iters", "iterations_done_final", 5),
        ("status", "run_status", 7),
        ("via", "source", 6),
    ]
    print("      " + " ".join(f"{h:>{w}}" for h, _, w in cols))
    for x in k["trials"]:
        print("      " + " ".join(f"{_cell(x[key]):>{w}}" for _, key, w in cols))


def print_term(args: argparse.Namespace, t: dict) -> None:
    n = len(t["trials"])
    print(
        f"  (b) SIGTERM -> worker exit with a 60 s agent running, soft_shutdown_s {args.soft_shutdown_s:g}, {n} trials:"
    )
    print(
        f"      teardown (SIGTERM -> exit)    {fmt(t['teardown_s'])}   "
        f"({t['within_target']}/{n} within the {args.soft_shutdown_s + 1:g} s target)"
    )
    print(f"      SIGTERM -> agent gone         {fmt(t['agent_gone_s'])}")
    print(f"      agent gone -> worker exit     {fmt(t['exit_after_agent_gone_s'])}")
    print(
        f"      agents gone at worker exit {t['agents_gone']}/{n}, "
        f"claims released {t['claims_released']}/{n}, attempts counted {t['attempts_counted']}/{n}"
    )
    for x in t["trials"]:
        print(
            f"      trial {x['trial']}: teardown {x['teardown_s']} s, exit code {x['worker_exit_code']}, "
            f"agent gone {x['agent_gone_s']} s, claim {x['claim_state_before']} -> {x['claim_state_after']}, "
            f"worker key left {x['worker_key_left']}"
        )


def print_human(args: argparse.Namespace, summary: dict) -> None:
    k, t = summary["details"].get("kill"), summary["details"].get("term")
    print(f"kill/teardown benchmark: one redis-server, wall {summary['wall_s']} s")
    if k:
        print_kill(args, k)
    if t:
        print_term(args, t)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict = {}

    def phases(tmp: Path, redis_url: str) -> None:
        if "kill" not in args.skip:
            results["kill"] = bench_kill(
                redis_url,
                tmp,
                args.trials,
                args.iteration_cost_s,
                args.agent_sleep_s,
                args.issues_per_trial,
                args.settle_s,
                args.max_iterations,
            )
        if "term" not in args.skip:
            results["term"] = bench_term(redis_url, tmp, args.term_trials, args.soft_shutdown_s, args.term_concurrency)

    t_start = time.perf_counter()
    code = run_session("kill_bench", "factory-kill-bench-", args.keep_tmp, phases)
    if code:
        return code
    summary = make_summary(args, results, t_start)
    return emit(summary, args.json, lambda: print_human(args, summary))


if __name__ == "__main__":
    sys.exit(main())
