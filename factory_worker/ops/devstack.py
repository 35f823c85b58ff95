"""``factory-worker up``: the dev stack in one process tree, logs prefixed per process. For development only.

Redis is embedded under ``./.factory/redis`` when ``FACTORY_REDIS_URL`` is not set: on 127.0.0.1, with a
random password kept in ``.factory/redis.password`` (0600, reused by the next ``up``), its files 0700/0600.
The full URL goes to ``.factory/redis.url`` (0600); ``up`` prints it masked. Flower gets basic auth through
its environment (``FLOWER_BASIC_AUTH``, else credentials generated once into ``.factory/flower.env``, 0600),
never on a command line, and ``up`` never prints a secret. Ctrl-C (or SIGTERM) only sets a flag; the main
loop then stops the children once: SIGTERM (warm shutdown), SIGKILL after the soft-shutdown window. A second
Ctrl-C forces.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from factory_worker.config.settings import Settings
from factory_worker.config.urls import mask_url
from factory_worker.ops.embedded import RedisServer

log = logging.getLogger(__name__)

STATE_DIR = Path(".factory")
STATUS_EVERY_S = 5.0
FLOWER_USER = "admin"
#: Secrets the children must not inherit (Flower's is given to Flower alone, agents never see it).
PRIVATE_ENV = ("FLOWER_BASIC_AUTH",)


class _Flags:
    stop = 0  # number of stop signals received


def _pump(name: str, stream: IO[bytes]) -> None:
    for raw in iter(stream.readline, b""):
        sys.stdout.write(f"[{name}] {raw.decode(errors='replace').rstrip()}\n")
        sys.stdout.flush()


def _spawn(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    threading.Thread(target=_pump, args=(name, proc.stdout), daemon=True).start()
    print(f"[up] started {name} (pid {proc.pid}): {' '.join(argv[2:])}", flush=True)
    return proc


def _status_line(settings: Settings, url: str) -> str:
    from factory_worker.context import Context
    from factory_worker.ops.operations import loop_status

    ctx = Context(settings.model_copy(update={"redis_url": url}))
    data, _ = loop_status(ctx)
    hb = data["heartbeat"] or {}
    g = data["ledger"]
    run = f" run {hb.get('run_id')} {hb.get('status')} {hb.get('iteration')}/{hb.get('max_iterations')}" if hb else ""
    return (
        f"[status] loop {data['liveness']}{run} | in_flight={g['in_flight']} backoff={g['backoff']} "
        f"parked={g['parked']} done={g['done']} | workers={len(data['workers'])}"
    )


def stack_commands(settings: Settings, flower: bool, workers: int, concurrency: int) -> dict[str, list[str]]:
    """The stack's processes by name: one loop worker (``loop``, only ``<ns>.loop``, 2 processes) so the
    loop's kickoff/iteration tasks never wait behind agents, then ``workers`` agent workers (``worker1..N``,
    only ``<ns>.agents``, the threads pool with ``concurrency`` slots each: one supervising thread per agent),
    beat and (when installed) Flower."""
    from factory_worker.worker.app import agent_queue, loop_queue

    celery = [sys.executable, "-m", "celery", "-A", "factory_worker"]
    cmds = {"loop": celery + ["worker", "-l", "INFO", "-n", "loop@%h", "-c", "2", "-Q", loop_queue(settings.namespace)]}
    cmds.update(
        {
            f"worker{i + 1}": celery
            + [
                "worker",
                "-l",
                "INFO",
                "-n",
                f"worker{i + 1}@%h",
                "-P",
                "threads",
                "-c",
                str(concurrency),
                "-Q",
                agent_queue(settings.namespace),
            ]
            for i in range(workers)
        }
    )
    cmds["beat"] = celery + ["beat", "-l", "INFO", "--schedule", str(STATE_DIR / "celerybeat-schedule")]
    if flower and importlib.util.find_spec("flower") is not None:
        cmds["flower"] = celery + ["flower", "--address=127.0.0.1", "--port=5555"]  # auth: FLOWER_BASIC_AUTH env
    return cmds


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (0600, also when the file existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with open(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)


def private_secret(path: Path, make: Callable[[], str], valid: Callable[[str], bool] = bool) -> str:
    """The secret kept in ``path`` (0600): created with ``make()`` the first time (or when what the file holds
    is not ``valid``), read (and re-tightened to 0600) after that, so a restarted stack keeps its password."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        value = ""
    if not valid(value):
        value = make()
    write_private(path, value + "\n")
    return value


def state_dir() -> Path:
    """``.factory`` (0711: entered, not listed, by others; what it holds protects itself)."""
    STATE_DIR.mkdir(exist_ok=True)
    os.chmod(STATE_DIR, 0o711)
    return STATE_DIR


def start_embedded_redis() -> RedisServer:
    """The embedded Redis: password from ``.factory/redis.password``, files private, URL in ``.factory/redis.url``
    (0600). Prints the URL masked and where the full one is."""
    password = private_secret(STATE_DIR / "redis.password", lambda: secrets.token_urlsafe(32))
    server = RedisServer(STATE_DIR / "redis", appendonly=True, password=password, private=True).start()
    url_file = STATE_DIR / "redis.url"
    write_private(url_file, server.url + "\n")
    print(
        f"[up] embedded Redis at {mask_url(server.url)} (data in {STATE_DIR / 'redis'}, 0700); the full URL, "
        f"with its password, is in {url_file} (0600). For the CLI in another shell:\n"
        f'[up]   export FACTORY_REDIS_URL="$(cat {url_file.resolve()})"',
        flush=True,
    )
    return server


def flower_auth() -> tuple[str, str]:
    """Flower's ``user:password`` and where it comes from: ``FLOWER_BASIC_AUTH``, else ``.factory/flower.env``
    (generated once, 0600)."""
    given = os.environ.get("FLOWER_BASIC_AUTH")
    if given:
        return given, "FLOWER_BASIC_AUTH from your environment"
    path = STATE_DIR / "flower.env"
    line = private_secret(
        path,
        lambda: f"FLOWER_BASIC_AUTH={FLOWER_USER}:{secrets.token_urlsafe(16)}",
        valid=lambda text: re.fullmatch(r"FLOWER_BASIC_AUTH=[^:\s]+:\S+", text) is not None,
    )
    return line.partition("=")[2], f"{path} (0600)"


def child_env(name: str, url: str, flower_credentials: str | None, agents_as_root: bool = False) -> dict[str, str]:
    """A child's environment: ours with the Redis URL; Flower's credentials for Flower only; agent.user = root
    when ``up`` runs as root with agent.user unset (see :func:`agents_as_root`)."""
    env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
    env.update(FACTORY_REDIS_URL=url, PYTHONUNBUFFERED="1")
    if agents_as_root:
        env["FACTORY_AGENT__USER"] = "root"
    if name == "flower" and flower_credentials:
        env["FLOWER_BASIC_AUTH"] = flower_credentials
    return env


def agents_as_root(settings: Settings) -> bool:
    """``up`` run as root with agent.user unset: its agents run as root, as they run as you under your own
    user (development only), written for its workers as agent.user = root, which a root worker requires."""
    return os.geteuid() == 0 and settings.agent.user is None


def run_stack(settings: Settings, flower: bool = True, workers: int = 1, concurrency: int = 4) -> int:
    """Run Redis (if needed), workers, beat and Flower until Ctrl-C; returns the exit code."""
    state_dir()
    redis_server = None
    url = settings.redis_url
    if url is None:
        redis_server = start_embedded_redis()
        url = redis_server.url
    else:
        print(f"[up] Redis at {mask_url(url)} (FACTORY_REDIS_URL)", flush=True)
    commands = stack_commands(settings, flower, workers, concurrency)
    as_root = agents_as_root(settings)
    if as_root:
        print(
            "[up] running as root with agent.user unset: agents run as root too (development only; set "
            "FACTORY_AGENT__USER, e.g. nobody, to isolate them)",
            flush=True,
        )
    credentials = None
    if "flower" in commands:
        credentials, where = flower_auth()
        print(f"[up] Flower on http://127.0.0.1:5555 with basic auth; user and password: {where}", flush=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def on_signal(signum: int, frame: object) -> None:
        _Flags.stop += 1  # flag only; the loop below acts

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        for name, argv in commands.items():
            procs[name] = _spawn(name, argv, child_env(name, url, credentials, as_root))
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
                except Exception as exc:
                    print(f"[status] unavailable: {exc}", flush=True)
                next_status = time.monotonic() + STATUS_EVERY_S
            time.sleep(0.2)
    finally:
        if _shutdown(procs, settings.worker.soft_shutdown_s + 5):
            code = 130  # a forced stop: not a clean exit
        if redis_server is not None:
            redis_server.stop()
            print("[up] embedded Redis stopped", flush=True)
        for s, h in old.items():
            signal.signal(s, h)
    return code


def _shutdown(procs: dict[str, subprocess.Popen[bytes]], grace_s: float) -> bool:
    """Stop children once: SIGTERM, then SIGKILL after ``grace_s`` or on a second Ctrl-C. Returns True when a
    second Ctrl-C forced it."""
    print("[up] stopping (Ctrl-C again to force)", flush=True)
    seen = _Flags.stop
    forced = False
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in procs.values()):
        forced = _Flags.stop > max(seen, 1)
        if time.monotonic() > deadline or forced:
            left = ", ".join(n for n, p in procs.items() if p.poll() is None)
            why = "forced by a second Ctrl-C" if forced else f"still running after {grace_s:g}s"
            print(f"[up] {why}: SIGKILL to {left}", flush=True)
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
    return forced
