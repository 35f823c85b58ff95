"""``factory-worker up``: the dev stack in one process tree, logs prefixed per process.

Redis is embedded under ``./.factory/redis`` when ``FACTORY_REDIS_URL`` is not set. Ctrl-C (or SIGTERM)
only sets a flag; the main loop then stops the children once: SIGTERM (warm shutdown), SIGKILL after the
soft-shutdown window. A second Ctrl-C forces.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from .config import Settings
from .embedded import RedisServer

log = logging.getLogger(__name__)

STATE_DIR = Path(".factory")
STATUS_EVERY_S = 5.0


class _Flags:
    stop = 0  # number of stop signals received


def _pump(name: str, stream: IO[bytes]) -> None:
    for raw in iter(stream.readline, b""):
        sys.stdout.write(f"[{name}] {raw.decode(errors='replace').rstrip()}\n")
        sys.stdout.flush()


def _spawn(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    threading.Thread(target=_pump, args=(name, proc.stdout), daemon=True).start()
    print(f"[up] started {name} (pid {proc.pid}): {' '.join(argv[2:])}", flush=True)
    return proc


def _status_line(settings: Settings, url: str) -> str:
    from .context import Context
    from .operations import loop_status

    ctx = Context(settings.model_copy(update={"redis_url": url}))
    data, _ = loop_status(ctx)
    hb = data["heartbeat"] or {}
    g = data["ledger"]
    run = f" run {hb.get('run_id')} {hb.get('status')} {hb.get('iteration')}/{hb.get('max_iterations')}" if hb else ""
    return (f"[status] loop {data['liveness']}{run} | in_flight={g['in_flight']} backoff={g['backoff']} "
            f"parked={g['parked']} done={g['done']} | workers={len(data['workers'])}")


def stack_commands(settings: Settings, flower: bool, workers: int, concurrency: int) -> dict[str, list[str]]:
    """The stack's processes by name: one loop worker (``loop``, only ``<ns>.loop``, 2 processes) so the
    loop's kickoff/iteration tasks never wait behind agents, then ``workers`` agent workers (``worker1..N``,
    only ``<ns>.agents``, ``concurrency`` processes each), beat and (when installed) Flower."""
    from .app import agent_queue, loop_queue

    celery = [sys.executable, "-m", "celery", "-A", "factory_worker"]
    cmds = {"loop": celery + ["worker", "-l", "INFO", "-n", "loop@%h", "-c", "2", "-Q", loop_queue(settings.namespace)]}
    cmds.update({
        f"worker{i + 1}": celery + ["worker", "-l", "INFO", "-n", f"worker{i + 1}@%h", "-c", str(concurrency),
                                    "-Q", agent_queue(settings.namespace)]
        for i in range(workers)
    })
    cmds["beat"] = celery + ["beat", "-l", "INFO", "--schedule", str(STATE_DIR / "celerybeat-schedule")]
    if flower and importlib.util.find_spec("flower") is not None:
        auth = os.environ.get("FLOWER_BASIC_AUTH")
        cmds["flower"] = celery + ["flower", "--address=127.0.0.1", "--port=5555"] + (
            [f"--basic-auth={auth}"] if auth else [])
    return cmds


def run_stack(settings: Settings, flower: bool = True, workers: int = 1, concurrency: int = 4) -> int:
    """Run Redis (if needed), workers, beat and Flower until Ctrl-C; returns the exit code."""
    STATE_DIR.mkdir(exist_ok=True)
    redis_server = None
    url = settings.redis_url
    if url is None:
        redis_server = RedisServer(STATE_DIR / "redis", appendonly=True).start()
        url = redis_server.url
        (STATE_DIR / "redis.url").write_text(url + "\n")
        print(f"[up] embedded Redis at {url} (data in {STATE_DIR / 'redis'}); for the CLI in another shell:\n"
              f"[up]   export FACTORY_REDIS_URL={url}", flush=True)
    env = {**os.environ, "FACTORY_REDIS_URL": url, "PYTHONUNBUFFERED": "1"}
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def on_signal(signum: int, frame: object) -> None:
        _Flags.stop += 1  # flag only; the loop below acts

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        for name, argv in stack_commands(settings, flower, workers, concurrency).items():
            procs[name] = _spawn(name, argv, env)
        next_status = time.monotonic() + STATUS_EVERY_S
        while not _Flags.stop:
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                print(f"[up] {', '.join(dead)} exited unexpectedly; stopping the stack", flush=True)
                code = 1
                break
            if time.monotonic() >= next_status:
                try:
                    print(_status_line(settings, url), flush=True)
                except Exception as exc:  # noqa: BLE001
                    print(f"[status] unavailable: {exc}", flush=True)
                next_status = time.monotonic() + STATUS_EVERY_S
            time.sleep(0.2)
    finally:
        _shutdown(procs, settings.worker.soft_shutdown_s + 5)
        if redis_server is not None:
            redis_server.stop()
            print("[up] embedded Redis stopped", flush=True)
        for s, h in old.items():
            signal.signal(s, h)
    return code


def _shutdown(procs: dict[str, subprocess.Popen[bytes]], grace_s: float) -> None:
    """Stop children once: SIGTERM, then SIGKILL after ``grace_s`` or on a second Ctrl-C."""
    print("[up] stopping (Ctrl-C again to force)", flush=True)
    seen = _Flags.stop
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in procs.values()):
        if time.monotonic() > deadline or _Flags.stop > max(seen, 1):
            for p in procs.values():
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            break
        time.sleep(0.1)
    for name, p in procs.items():
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        print(f"[up] {name} exited ({p.returncode})", flush=True)
