"""Helpers for end-to-end tests: real `celery worker` / `celery beat` subprocesses, waiting, agents."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from unittest import mock

from factory_worker.config.settings import Settings, load_settings
from harness import ROOT, pid_alive, wait_until
from harness import run_ctl as ctl  # noqa: F401

#: A worker running as root runs agents only with agent.user written (issue 20): the suite, root in CI, writes
#: root (its agents are its own scripts under tmp_path, which another user could not read).
AGENT_USER: dict[str, str] = {"user": "root"} if os.geteuid() == 0 else {}
AGENT_USER_ENV: dict[str, str] = {"FACTORY_AGENT__USER": "root"} if os.geteuid() == 0 else {}


@dataclass
class Stack:
    """The worker pool and broker the stack helpers start (set per test by the ``stack`` fixture, tests/conftest.py):
    :class:`CeleryProc` runs workers with ``-P pool`` and :func:`stack_env` points the broker at ``broker_url``
    (None: the ledger's Redis)."""

    pool: str = "prefork"
    broker_url: str | None = None


STACK = Stack()


def factory_env(settings_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACTORY_")}
    env.update(settings_env)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class CeleryProc:
    """A real `celery -A factory_worker worker|beat` subprocess with its log in a file."""

    def __init__(
        self,
        kind: str,
        env: dict[str, str],
        log_dir: Path,
        name: str,
        extra: list[str] | None = None,
        cwd: Path | None = None,
        queues: list[str] | None = None,
        prefix: list[str] | None = None,
        no_queues: bool = False,
        pool: str | None = None,
    ) -> None:
        """``queues``: a worker's queue names (default both of the namespace's; ``no_queues``: no ``-Q`` at all,
        the README's plain command); ``prefix``: argv run before ``python -m celery`` that execs it, e.g.
        ``ip netns exec <name>`` (the pid stays celery's); ``pool``: the worker's ``-P`` (default
        :data:`STACK`'s)."""
        self.kind, self.name = kind, name
        self.log_path = log_dir / f"{name}.log"
        argv = [*(prefix or []), sys.executable, "-m", "celery", "-A", "factory_worker", kind, "-l", "INFO"]
        if kind == "worker":
            ns = env.get("FACTORY_NAMESPACE", "factory")
            argv += [
                "-n",
                f"{name}@%h",
                *([] if no_queues else ["-Q", ",".join(queues or [f"{ns}.loop", f"{ns}.agents"])]),
                "--without-mingle",
                "--without-gossip",
                "-P",
                pool or STACK.pool,
            ]
        else:
            argv += ["--schedule", str(log_dir / f"{name}-schedule")]
        argv += extra or []
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd or ROOT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> None:
        needle = "ready." if self.kind == "worker" else "beat: Starting"
        wait_until(lambda: needle in self.log() or self.proc.poll() is not None, timeout, what=f"{self.name} ready")
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited early:\n{self.log()[-3000:]}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> int | None:
        """SIGKILL the process group (the worker and its pool), wait, close the log."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


# Every record names the agent: its pid, PID namespace and start tick (``since``; see host_pid). Optional, by
# environment: AGENT_HOST is added to every record; AGENT_HEARTBEAT_S > 0 appends the time to the file named by
# ``hb`` in AGENT_OUT that often (the last line bounds when a SIGKILLed agent died); AGENT_TERM_CLEANUP_S > 0
# makes SIGTERM record "term", take that long to clean up, then record end with code 143 and exit. Label
# "waits-for-human": wait up to 30 s for a line in $FACTORY_INBOX (the Slack thread's replies), record "inbox".
RECORDING_AGENT = r"""
import json, os, signal, sys, threading, time, pathlib
issue = json.load(open(os.environ["FACTORY_ISSUE_JSON"]))
out = pathlib.Path(os.environ["AGENT_OUT"])
iid = os.environ["FACTORY_ISSUE_ID"]
host = {"host": os.environ["AGENT_HOST"]} if os.environ.get("AGENT_HOST") else {}
me = {"pid": os.getpid(), "pidns": os.readlink("/proc/self/ns/pid"),
      "since": int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])}
me["hb"] = f"hb-{me['pid']}-{me['pidns'][5:-1]}-{me['since']}"
def rec(event, **kw):
    with open(out / "events.jsonl", "a") as fh:
        fh.write(json.dumps({"issue": iid, "event": event, "t": time.time(), **me,
                             "token": os.environ["FACTORY_DISPATCH_TOKEN"], **host, **kw}) + "\n")
def heartbeat(every):
    with open(out / me["hb"], "a") as fh:
        while True:
            fh.write(f"{time.time()}\n")
            fh.flush()
            time.sleep(every)
if float(os.environ.get("AGENT_HEARTBEAT_S", "0")) > 0:
    threading.Thread(target=heartbeat, args=(float(os.environ["AGENT_HEARTBEAT_S"]),), daemon=True).start()
def on_term(*_):
    rec("term")
    time.sleep(float(os.environ["AGENT_TERM_CLEANUP_S"]))
    rec("end", code=143)
    os._exit(143)
if float(os.environ.get("AGENT_TERM_CLEANUP_S", "0")) > 0:
    signal.signal(signal.SIGTERM, on_term)
rec("start", argv=sys.argv[1:])
labels = issue.get("labels", [])
sleep = float(os.environ.get("AGENT_SLEEP", "0.1"))
if "slow" in labels:
    sleep = 60.0
elif "slow-once" in labels:
    slow_marker = out / f"slow-once-{iid}"
    if not slow_marker.exists():
        slow_marker.write_text("x")
        sleep = 60.0
if "waits-for-human" in labels:
    inbox, deadline = os.environ.get("FACTORY_INBOX"), time.time() + 30
    while inbox and time.time() < deadline and not open(inbox).read().strip():
        time.sleep(0.05)
    rec("inbox", lines=[json.loads(line) for line in open(inbox)] if inbox else None)
time.sleep(sleep)
code = 0
if "always-fails" in labels:
    code = 1
elif "fails-once" in labels:
    marker = out / f"failed-once-{iid}"
    if not marker.exists():
        marker.write_text("x")
        code = 1
rec("end", code=code)
sys.exit(code)
"""


def write_issues(path: Path, issues: list[dict]) -> None:
    path.write_text("".join(json.dumps(i) + "\n" for i in issues))


def read_events(out: Path) -> list[dict]:
    """The recording agent's events; each ``pid`` as this process sees it (:func:`host_pid`)."""
    p = out / "events.jsonl"
    if not p.exists():
        return []
    events = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    for e in events:
        e["pid"] = host_pid(e)
    return events


#: a test agent's (PID namespace, start tick, pid in it) -> its pid here, once seen
_HOST_PIDS: dict[tuple, int] = {}
_OWN_PIDNS = os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else None


def host_pid(record: dict) -> int:
    """The pid of the test agent that wrote ``record`` (``pid``, ``pidns``, ``since``: its start tick), as this
    process sees it. In a PID namespace of its own (``agent.pid_namespace``, a root worker) every agent is pid
    1: its pid here is found in /proc, by namespace and start tick, while it lives; an agent first looked up
    once gone gets a negative number (never alive). The same number for every record of one agent."""
    ns = record.get("pidns")
    if ns is None or ns == _OWN_PIDNS:
        return int(record["pid"])
    key = (ns, record.get("since"), record["pid"])
    if key not in _HOST_PIDS:
        _HOST_PIDS[key] = _find_in_proc(ns, record.get("since"), record["pid"]) or -(len(_HOST_PIDS) + 1)
    return _HOST_PIDS[key]


def marked_alive(marker: str) -> list[int]:
    """Live processes (as this process sees them, zombies aside) whose command line holds ``marker``: how a
    test finds what an agent started, in a PID namespace of the agent's or not."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def _find_in_proc(ns: str, since: int | None, pid: int) -> int | None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != ns:
                continue
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            nspid = next(x for x in Path(f"/proc/{entry}/status").read_text().splitlines() if x.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if int(stat[19]) == since and int(nspid.split()[-1]) == pid:
            return int(entry)
    return None


def warm_shutdown(worker: CeleryProc, window_s: float) -> float:
    """SIGTERM ``worker`` and wait for it to exit (at most ``window_s`` + 10 s); returns how long it took."""
    t0 = time.monotonic()
    worker.signal(signal.SIGTERM)
    worker.proc.wait(window_s + 10)
    return time.monotonic() - t0


def stack_env(redis_url: str, namespace: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    agent = tmp_path / "agent.py"
    agent.write_text(RECORDING_AGENT)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = {
        "FACTORY_REDIS_URL": redis_url,
        "FACTORY_NAMESPACE": namespace,
        "FACTORY_LOOP__INTERVAL_S": "1",
        "FACTORY_LOOP__MAX_ITERATIONS": "3",
        "FACTORY_LOOP__STALE_AFTER_S": "10",
        "FACTORY_DISPATCH__LEASE_TTL_S": "5",
        "FACTORY_DISPATCH__MAX_IN_FLIGHT": "8",
        "FACTORY_DISPATCH__MAX_ATTEMPTS": "3",
        "FACTORY_DISPATCH__BACKOFF_BASE_S": "1",
        "FACTORY_DISPATCH__BACKOFF_MAX_S": "2",
        "FACTORY_DISPATCH__BACKOFF_JITTER": "0",
        "FACTORY_SOURCE__PATH": str(tmp_path / "issues.jsonl"),
        "FACTORY_AGENT__COMMAND": json.dumps([sys.executable, str(agent), "{id}", "{title}"]),
        "FACTORY_AGENT__LOG_DIR": str(tmp_path / "logs"),
        "FACTORY_WORKER__SOFT_SHUTDOWN_S": "5",
        "FACTORY_AGENT__TERM_GRACE_S": "1",  # short leases (a few s) leave room for a 1 s grace only
        "FACTORY_AGENT__WORKDIR_ROOT": str(tmp_path / "work"),
        # the recording agent's own variables (an agent gets only its allowlist of the worker's environment)
        "FACTORY_AGENT__ENV_ALLOWLIST": json.dumps(
            ["PATH", "AGENT_OUT", "AGENT_SLEEP", "AGENT_HOST", "AGENT_HEARTBEAT_S", "AGENT_TERM_CLEANUP_S"]
        ),
        "AGENT_OUT": str(out),
        **AGENT_USER_ENV,
    }
    if STACK.broker_url:
        env["FACTORY_BROKER_URL"] = STACK.broker_url
    env.update(extra)
    return factory_env(env)


def settings_from(env: dict[str, str]) -> Settings:
    fields = {k: v for k, v in env.items() if k.startswith("FACTORY_")}
    with mock.patch.dict(os.environ, fields, clear=False):
        return load_settings()


class Recorder:
    def __init__(self, fail_after: int | None = None) -> None:
        self.sent: list[tuple] = []
        self.fail_after = fail_after

    def __call__(self, task_id, issue, claim, run_id):
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise ConnectionError("broker down")
        self.sent.append((task_id, issue.id, claim.token, run_id))


def assert_audit_clean(redis_url: str, namespace: str) -> None:
    """The ledger's invariants hold (``factory-worker audit``): every chaos test ends with this."""
    from factory_worker.ledger.keys import Keys
    from factory_worker.ledger.redis_client import client_from_url
    from factory_worker.ops.audit import audit

    client = client_from_url(redis_url)
    try:
        result = audit(client, Keys(namespace))
    finally:
        client.close()
    assert result["clean"], f"ledger invariants violated: {result['violations']}"


class AgentLife(NamedTuple):
    """One agent process from its records: ``end`` is when it exited if that was watched, else its end
    record's time, or for an agent that died without one (SIGKILL) its last heartbeat plus one heartbeat
    interval (about when it died)."""

    issue: str
    token: str
    pid: int
    host: str | None
    start: float
    end: float
    code: int | None  # None: killed without an end record
    termed: bool  # got SIGTERM (recorded "term")


class DeathWatch:
    """When processes exit, to the millisecond: a thread polls pidfds (any process, not only children)."""

    def __init__(self, pids: list[int]) -> None:
        self.died: dict[int, float] = {}
        self._fds: dict[int, int] = {}
        for pid in pids:
            try:
                self._fds[os.pidfd_open(pid)] = pid
            except OSError:  # ProcessLookupError; EINVAL for an agent looked up once gone (host_pid)
                pass  # already gone: when is unknown here
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="death-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._fds and not self._closing.is_set():
            ready, _, _ = select.select(list(self._fds), [], [], 0.05)
            now = time.time()
            for fd in ready:
                self.died[self._fds.pop(fd)] = now
                os.close(fd)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(1)
        for fd in list(self._fds):
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> DeathWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def agent_lives(out: Path, heartbeat_s: float, died: dict[int, float] | None = None) -> list[AgentLife]:
    """Every agent's life from the recording agent's events and heartbeats (AGENT_HEARTBEAT_S); ``died``
    (pid -> exit time, e.g. :class:`DeathWatch`) overrides the records' estimate for the pids it has."""
    events = read_events(out)
    ends = {e["pid"]: e for e in events if e["event"] == "end"}
    termed = {e["pid"] for e in events if e["event"] == "term"}
    lives = []
    for s in (e for e in events if e["event"] == "start"):
        end, code = ends.get(s["pid"], {}).get("t"), ends.get(s["pid"], {}).get("code")
        if died and s["pid"] in died:
            end = died[s["pid"]]
        elif end is None:
            hb = out / s.get("hb", f"hb-{s['pid']}")
            beats = [float(x) for x in hb.read_text().split()] if hb.exists() else []
            end = max([s["t"], *beats]) + heartbeat_s
        lives.append(AgentLife(s["issue"], s["token"], s["pid"], s.get("host"), s["t"], end, code, s["pid"] in termed))
    return lives


def max_overlap_s(lives: list[AgentLife]) -> tuple[float, str | None]:
    """The longest time two agents of one issue were alive together, and that issue (0.0, None if never)."""
    worst: tuple[float, str | None] = (0.0, None)
    by_issue: dict[str, list[AgentLife]] = {}
    for life in lives:
        by_issue.setdefault(life.issue, []).append(life)
    for issue, group in by_issue.items():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                both = min(a.end, b.end) - max(a.start, b.start)
                if both > worst[0]:
                    worst = (both, issue)
    return worst


def start_worker_and_beat(procs: list, env: dict[str, str], tmp_path: Path, concurrency: int = 2) -> None:
    """One worker ``w1`` (``-c concurrency``) and beat, added to ``procs`` (stopped by its fixture), ready."""
    procs.append(CeleryProc("worker", env, tmp_path, "w1", extra=["-c", str(concurrency)]))
    procs.append(CeleryProc("beat", env, tmp_path, "beat"))
    for p in procs:
        p.wait_ready()
