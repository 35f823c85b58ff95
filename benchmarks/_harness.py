"""Shared plumbing of the benchmark scripts in this folder (not a benchmark itself).

``e2e_bench.py``, ``kill_bench.py`` and ``ledger_bench.py`` import it as ``_harness`` (they run as plain
scripts, so this folder is on ``sys.path``). Importing it also puts the repository root on ``sys.path``, so
``factory_worker`` imports from the checkout. What lives here:

- ``make_say``: progress lines ``[<script>] ...`` on stderr (stdout is kept for the figures);
- ``BenchError``, ``wait_for``, ``wait_count``: a failed or timed-out benchmark step, and the poll loops
  (until a predicate is true, until a counter reaches n);
- ``Proc``, ``Group``, ``worker_argv``, ``beat_argv``: ``celery`` subprocesses, each in its own process group
  (pgid == pid) logging to a file, stopped with SIGTERM then SIGKILL of the whole group;
- ``pythonpath``, ``base_env``, ``factory_env``, ``issue_line``, ``drop_namespace``, ``unlink_matching``: the
  environment of a factory worker, a file-source issue line, clean-up of a namespace's keys;
- ``make_parser``, ``session``, ``run_session``, ``emit``: the ``--help`` taken from a script's docstring,
  the temp dir + redis-server (+ signal and error handling) around the phases, and printing one JSON
  object or the human-readable figures;
- ``percentile``, ``stats``: p50/p99 and median/min/max of samples.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from factory_worker.ops.embedded import RedisServer  # noqa: E402
from harness import pid_alive, wait_until  # noqa: E402,F401  (shared with the test suite)

PY = sys.executable
#: Variables of the caller's environment that never reach a benchmark's subprocesses.
STRIPPED_ENV_PREFIXES = ("FACTORY_", "BENCH_", "KILL_BENCH_")


# -- progress and waiting ------------------------------------------------------------------------------------
def make_say(prog: str) -> Callable[[str], None]:
    """A ``say(msg)`` printing ``[prog] msg`` on stderr, flushed."""

    def say(msg: str) -> None:
        print(f"[{prog}] {msg}", file=sys.stderr, flush=True)

    return say


class BenchError(RuntimeError):
    pass


def wait_for(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``pred`` every ``interval`` s until it returns something true (returned); BenchError on timeout."""
    return wait_until(pred, timeout, what, interval, error=BenchError)


def wait_count(
    count: Callable[[], int], n: int, timeout: float, failure: Callable[[int], str], interval: float
) -> None:
    """Poll ``count`` every ``interval`` s until it reaches ``n``; BenchError(``failure(last count)``) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        done = count()
        if done >= n:
            return
        if time.monotonic() > deadline:
            raise BenchError(failure(done))
        time.sleep(interval)


# -- processes ---------------------------------------------------------------------------------------------
class Proc:
    """A subprocess in its own session (pgid == pid) logging to a file; stop() kills the whole group."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, ready_needle: str, cwd: Path = ROOT
    ) -> None:
        self.name, self.needle = name, ready_needle
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return self.needle in self.log()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15.0) -> None:
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of the group (pool processes, agents): SIGKILL
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


class Group:
    """Processes started together, stopped together (SIGTERM all, then wait, then SIGKILL each group)."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def add(self, p: Proc) -> Proc:
        self.procs.append(p)
        return p

    def wait_ready(self, timeout: float = 60.0) -> None:
        for p in self.procs:
            wait_for(p.ready, timeout, f"{p.name} to be ready")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.stop()
        self.procs.clear()

    def tails(self, n: int = 2000) -> str:
        return "\n".join(f"--- {p.name} ({p.log_path}) ---\n{p.log()[-n:]}" for p in self.procs)


def factory_queues(env: dict[str, str], which: str = "loop,agents") -> str:
    """The queues of the namespace in ``env`` (queue names are ``<namespace>.loop`` / ``<namespace>.agents``)."""
    ns = env.get("FACTORY_NAMESPACE", "factory")
    return ",".join(f"{ns}.{q}" for q in which.split(","))


def worker_argv(
    name: str,
    concurrency: int,
    app: str = "factory_worker",
    queues: str = "factory.loop,factory.agents",
    pool: str = "prefork",
) -> list[str]:
    """``celery -A app worker`` (``pool``, no mingle/gossip) consuming ``queues``; ready when "ready." is logged."""
    return [
        PY,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-l",
        "INFO",
        "-n",
        f"{name}@%h",
        "-Q",
        queues,
        "-c",
        str(concurrency),
        "-P",
        pool,
        "--without-mingle",
        "--without-gossip",
    ]


def beat_argv(work: Path) -> list[str]:
    """``celery -A factory_worker beat`` with its schedule file in ``work``; ready at "beat: Starting"."""
    return [PY, "-m", "celery", "-A", "factory_worker", "beat", "-l", "INFO", "--schedule", str(work / "beat-schedule")]


# -- environment and keys ------------------------------------------------------------------------------------
def pythonpath(*dirs: Path) -> str:
    """``dirs`` ahead of the caller's PYTHONPATH."""
    return os.pathsep.join([*(str(d) for d in dirs), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def base_env(extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment without factory/benchmark settings, unbuffered, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(STRIPPED_ENV_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def factory_env(
    redis_url: str, namespace: str, work: Path, agent: list[str], settings: dict[str, str], path: tuple[Path, ...] = ()
) -> dict[str, str]:
    """A factory worker's environment: file source ``work/issues.jsonl``, agent logs in ``work/agent-logs``
    (agents run in ``work/agent-work``; they get PATH and the non-``FACTORY_*`` variables of ``settings``),
    the given agent command, then ``settings`` (``FACTORY_*`` and benchmark variables) on top."""
    env = {
        "FACTORY_REDIS_URL": redis_url,
        "FACTORY_NAMESPACE": namespace,
        "FACTORY_SOURCE__KIND": "file",
        "FACTORY_SOURCE__PATH": str(work / "issues.jsonl"),
        "FACTORY_AGENT__COMMAND": json.dumps(agent),
        "FACTORY_AGENT__LOG_DIR": str(work / "agent-logs"),
        "FACTORY_AGENT__WORKDIR_ROOT": str(work / "agent-work"),
        # an agent gets only its allowlist of the worker's environment: PATH and the benchmark's own variables
        "FACTORY_AGENT__ENV_ALLOWLIST": json.dumps(
            ["PATH", *sorted(k for k in settings if not k.startswith("FACTORY_"))]
        ),
        "PYTHONPATH": pythonpath(ROOT, *path),
        # a root worker runs agents only with agent.user written (the benchmark's agents are its own commands)
        **({"FACTORY_AGENT__USER": "root"} if os.geteuid() == 0 else {}),
    }
    env.update(settings)
    return base_env(env)


def issue_line(issue_id: str, title: str = "bench") -> str:
    """One ready issue of the file source, a whole line."""
    return json.dumps({"id": issue_id, "title": f"{title} {issue_id}", "state": "ready"}) + "\n"


def unlink_matching(r: redis.Redis, pattern: str, chunk: int = 1000) -> None:
    """UNLINK every key matching ``pattern`` (SCAN, ``chunk`` keys a call)."""
    batch = []
    for key in r.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= chunk:
            r.unlink(*batch)
            batch = []
    if batch:
        r.unlink(*batch)


def drop_namespace(r: redis.Redis, keys: Any) -> None:
    """Best-effort removal of every key of a ``Keys`` namespace (Redis errors ignored)."""
    try:
        unlink_matching(r, keys.pattern())
    except redis.RedisError:
        pass


# -- command line, session, output ------------------------------------------------------------------------------
def make_parser(doc: str, epilog: bool = True) -> argparse.ArgumentParser:
    """``--help``: the docstring's first paragraph, and (``epilog``) the rest of it verbatim."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(doc.split("\n\n", 1)[1]) if epilog else None,
    )


def add_keep_tmp(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs) and print its path")


@contextmanager
def session(
    tmp_prefix: str, keep_tmp: bool = False, redis_url: str | None = None, say: Callable[[str], None] | None = None
) -> Iterator[tuple[Path, str]]:
    """``(tmp, redis_url)``: a fresh temp dir, and ``redis_url`` or else a redis-server started in ``tmp/redis``.
    On the way out the server is stopped and the temp dir removed (unless ``keep_tmp``), whatever happened."""
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix))
    server: RedisServer | None = None
    try:
        if not redis_url:
            server = RedisServer(tmp / "redis")
            server.start()
            redis_url = server.url
            if say:
                say(f"redis-server on {redis_url}")
        yield tmp, redis_url
    finally:
        if server is not None:
            server.stop()
        if keep_tmp:
            if say:
                say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run_session(
    prog: str, tmp_prefix: str, keep_tmp: bool, phases: Callable[[Path, str], None], redis_url: str | None = None
) -> int:
    """``phases(tmp, redis_url)`` inside ``session()``, SIGTERM counting as an interrupt.
    Returns 0, 1 after a BenchError, 130 when interrupted (the reason on stderr)."""

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        with session(tmp_prefix, keep_tmp, redis_url, make_say(prog)) as (tmp, url):
            phases(tmp, url)
    except BenchError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def emit(summary: dict[str, Any], as_json: bool, human: Callable[[], None]) -> int:
    """One JSON object on stdout (``--json``), else ``human()`` prints the figures. Returns 0."""
    if as_json:
        print(json.dumps(summary))
    else:
        human()
    return 0


# -- CPU accounting (Linux /proc) ----------------------------------------------------------------------------
def _stat_fields(pid: str | int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data[data.rfind(")") + 2 :].split()  # from the state field on: pgrp is [2], utime..cstime [11:15]


def redis_cpu_s(r: redis.Redis) -> float:
    """CPU seconds the Redis server behind ``r`` has used (it must run on this machine)."""
    fields = _stat_fields(r.info("server")["process_id"])
    return sum(int(x) for x in fields[11:13]) / os.sysconf("SC_CLK_TCK") if fields else 0.0


class CpuMeter:
    """CPU per item of a timed window: process groups (workers, beat) and the Redis server, in ms, in total and
    by role: ``<name>`` (the group's leader: a worker's main process, beat), ``<name> pool`` (the other
    processes of the group: pool processes), ``<name> agents`` (the children they reaped: an agent's time
    lands in the pool process that waited for it) and ``redis-server``. Read from /proc (0 where it is not)."""

    def __init__(self, r: redis.Redis, groups: list[int], names: list[str] | None = None) -> None:
        self.r, self.groups = r, groups
        self.names = names or [f"group{i}" for i in range(len(groups))]
        self.start_roles = self._roles()

    def _roles(self) -> dict[str, float]:
        """CPU seconds by role, from every live process of the groups and the Redis server."""
        tck = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        out = {"redis-server": redis_cpu_s(self.r)}
        names = dict(zip(self.groups, self.names))
        for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
            fields = _stat_fields(entry) if entry.isdigit() else None
            name = names.get(int(fields[2])) if fields else None
            if name is None:
                continue
            own, reaped = (sum(int(x) for x in fields[11:13]) / tck, sum(int(x) for x in fields[13:15]) / tck)
            if int(entry) == int(fields[2]):
                out[name] = out.get(name, 0.0) + own + reaped
            else:
                out[f"{name} pool"] = out.get(f"{name} pool", 0.0) + own
                out[f"{name} agents"] = out.get(f"{name} agents", 0.0) + reaped
        return out

    def per_item_ms(self, n: int) -> dict[str, Any]:
        used = {k: v - self.start_roles.get(k, 0.0) for k, v in self._roles().items()}
        server = used["redis-server"]
        procs = sum(used.values()) - server
        return {
            "processes": round(procs * 1000 / n, 2),
            "redis": round(server * 1000 / n, 2),
            "total": round((procs + server) * 1000 / n, 2),
            "by_role": {k: round(v * 1000 / n, 2) for k, v in used.items()},
        }


# -- statistics -------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats(values: list[float]) -> dict[str, float | None]:
    """Median, min and max rounded to the millisecond; all None without samples."""
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}
