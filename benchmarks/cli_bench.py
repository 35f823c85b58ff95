"""cli_bench: how soon the recovery commands take effect (issues 8 and 21: within 0.15 s of the command's start).

On one redis-server started here (or ``--redis-url``), each command is run ``--repeat`` times as users run it
(``python -m factory_worker.ctl ...`` against a live loop: a heartbeat and a run), in several environments:

  plain        ``FACTORY_REDIS_URL`` and ``FACTORY_NAMESPACE`` only
  production   a typical deployment: 12 ``FACTORY_*`` variables (GitHub source with write-back, agent command,
               timings...) and a TOML file (``FACTORY_CONFIG``) with more (dispatch, Slack, workspace)
  secret-file  production, the Redis URL (with its password) in ``FACTORY_REDIS_URL_FILE`` (0400)
  toml         the URL and namespace in the TOML file only (``FACTORY_CONFIG``), nothing else in the environment
  sentinel     production with ``sentinel://`` (one ``redis-server --sentinel`` started here watching the server)

and measures:

  kill-loop effective  Redis server time of the command's kill record minus the server time read just before
                       the command was started: when the loop is stopped (the claim script and ``begin`` refuse
                       from then on), whatever the command still does after it
  kill-loop wall       start to exit (revoke, end of the run, notify and the report included)
  pause effective      the same for ``pause``'s record
  loop-status wall     start to exit (its answer is the output, so its wall time is its effect)
  python floor         ``python -c pass``, and ``import redis, pydantic_settings, click`` (what the full CLI
                       cannot avoid importing)

Prints medians and p90 in ms, per environment. ``--json``: one JSON object. Nothing is asserted.

Usage: .venv/bin/python benchmarks/cli_bench.py [--repeat 10] [--only production,toml] [--json]
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
from _harness import emit, make_parser, make_say, percentile, session, wait_for

from factory_worker.ledger.keys import Keys
from factory_worker.loop import heartbeat
from factory_worker.ops.embedded import find_redis_server, free_port

PY = sys.executable
say = make_say("cli_bench")
TARGET_MS = 150.0
ENVIRONMENTS = ("plain", "production", "secret-file", "toml", "sentinel")
MASTER = "bench-master"


def server_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return int(sec) * 1000 + int(usec) // 1000


def live_loop(r: redis.Redis, keys: Keys) -> None:
    """A live loop as kill-loop sees it: a fresh heartbeat and no kill or pause (no worker needed)."""
    r.delete(keys.kill, keys.paused)
    heartbeat.write(r, keys, "bench-run", "running", 1, 3, 60)


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return (time.perf_counter() - t0) * 1000


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(values, 50), 1), "p90_ms": round(percentile(values, 90), 1)}


def production_settings(tmp: Path, namespace: str) -> dict[str, str]:
    """12 variables of a typical deployment (the Redis URL and FACTORY_CONFIG aside)."""
    return {
        "FACTORY_NAMESPACE": namespace,
        "FACTORY_LOOP__INTERVAL_S": "15",
        "FACTORY_LOOP__STALE_AFTER_S": "90",
        "FACTORY_DISPATCH__MAX_IN_FLIGHT": "16",
        "FACTORY_DISPATCH__LEASE_TTL_S": "60",
        "FACTORY_SOURCE__KIND": "github",
        "FACTORY_SOURCE__GITHUB_REPO": "acme/widgets",
        "FACTORY_SOURCE__GITHUB_LABELS": '["agent"]',
        "FACTORY_AGENT__COMMAND": '["my-coding-agent", "--", "{id}"]',
        "FACTORY_AGENT__TIMEOUT_S": "1800",
        "FACTORY_AGENT__LOG_DIR": str(tmp / "logs"),
        "FACTORY_TRACKER__WRITE_BACK": "true",
        "FACTORY_WORKER__SOFT_SHUTDOWN_S": "30",
    }


TOML = """\
[dispatch]
max_attempts = 5
backoff_base_s = 10
backoff_max_s = 600

[agent]
env_allowlist = ["PATH", "LANG", "TZ"]

[slack]
channel = "C0123456789"

[notify]
events = ["parked", "stale", "killed", "ledger-lost"]
"""


def secret(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o400)
    return path


def environments(tmp: Path, url: str, sentinel_url: str | None, namespace: str) -> dict[str, dict[str, str]]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FACTORY_")}
    prod = production_settings(tmp, namespace)
    toml = secret(tmp / "factory.toml", TOML)
    only_toml = secret(tmp / "only.toml", f'redis_url = "{url}"\nnamespace = "{namespace}"\n\n{TOML}')
    url_file = secret(tmp / "redis-url", url + "\n")
    out = {
        "plain": {**base, "FACTORY_REDIS_URL": url, "FACTORY_NAMESPACE": namespace},
        "production": {**base, **prod, "FACTORY_REDIS_URL": url, "FACTORY_CONFIG": str(toml)},
        "secret-file": {**base, **prod, "FACTORY_REDIS_URL_FILE": str(url_file), "FACTORY_CONFIG": str(toml)},
        "toml": {**base, "FACTORY_CONFIG": str(only_toml)},
    }
    if sentinel_url:
        out["sentinel"] = {**base, **prod, "FACTORY_REDIS_URL": sentinel_url, "FACTORY_CONFIG": str(toml)}
    return out


def start_sentinel(tmp: Path, url: str) -> tuple[subprocess.Popen[bytes], str]:
    """One sentinel watching the bench's server (a master without replicas is enough to be named)."""
    r = redis.Redis.from_url(url)
    port = r.connection_pool.connection_kwargs["port"]
    password = r.connection_pool.connection_kwargs.get("password")
    sport = free_port()
    d = tmp / "sentinel"
    d.mkdir()
    conf = d / "sentinel.conf"
    conf.write_text(
        f"port {sport}\nbind 127.0.0.1\ndaemonize no\ndir {d}\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {port} 1\n"
        + (f"sentinel auth-pass {MASTER} {password}\n" if password else "")
    )
    proc = subprocess.Popen(
        [find_redis_server(), str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def named() -> bool:
        try:
            s = redis.Redis(host="127.0.0.1", port=sport, socket_timeout=1)
            return s.sentinel_get_master_addr_by_name(MASTER) is not None
        except redis.RedisError:
            return False

    wait_for(named, 20, "the sentinel to name the master")
    auth = f":{password}@" if password else ""
    return proc, f"sentinel://{auth}127.0.0.1:{sport}/{MASTER}/0"


def measure_env(r: redis.Redis, keys: Keys, env: dict[str, str], cwd: Path, repeat: int) -> dict[str, Any]:
    ctl = [PY, "-m", "factory_worker.ctl"]
    effective, kill_wall, status_wall, pause_effective, pause_wall = [], [], [], [], []
    for _ in range(repeat):
        live_loop(r, keys)
        before = server_ms(r)
        kill_wall.append(timed([*ctl, "kill-loop", "--json"], env, cwd))
        at = r.hget(keys.kill, "at_ms")
        effective.append(float(int(at) - before) if at is not None else float("nan"))
        live_loop(r, keys)
        status_wall.append(timed([*ctl, "loop-status", "--json"], env, cwd))
        before = server_ms(r)
        pause_wall.append(timed([*ctl, "pause", "--json"], env, cwd))
        at = r.hget(keys.paused, "at_ms")
        pause_effective.append(float(int(at) - before) if at is not None else float("nan"))
    ok = [x for x in effective if x == x]
    return {
        "kill_loop_effective": summary(ok) if ok else None,
        "kill_loop_failed": len(effective) - len(ok),
        "kill_loop_wall": summary(kill_wall),
        "pause_effective": summary([x for x in pause_effective if x == x] or [float("nan")]),
        "pause_wall": summary(pause_wall),
        "loop_status_wall": summary(status_wall),
    }


def measure(tmp: Path, redis_url: str, repeat: int, only: list[str]) -> dict[str, Any]:
    keys = Keys("clibench")
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    sentinel, sentinel_url = (None, None)
    if "sentinel" in only:
        sentinel, sentinel_url = start_sentinel(tmp, redis_url)
    cwd = tmp / "cwd"  # no ./factory.toml here
    cwd.mkdir()
    try:
        envs = environments(tmp, redis_url, sentinel_url, keys.namespace)
        out: dict[str, Any] = {"repeat": repeat, "target_ms": TARGET_MS, "environments": {}}
        for name in only:
            if name not in envs:
                continue
            n = sum(1 for k in envs[name] if k.startswith("FACTORY_"))
            say(f"{name}: {n} FACTORY_* variable(s), {repeat} round(s)")
            out["environments"][name] = {"factory_variables": n, **measure_env(r, keys, envs[name], cwd, repeat)}
        floor, imports = [], []
        for _ in range(repeat):
            floor.append(timed([PY, "-c", "pass"], envs["plain"], cwd))
            imports.append(timed([PY, "-c", "import redis, pydantic_settings, click"], envs["plain"], cwd))
        out["python_floor"] = summary(floor)
        out["import_redis_pydantic_settings_click"] = summary(imports)
        return out
    finally:
        for k in r.scan_iter(match=keys.pattern()):
            r.delete(k)
        r.close()
        if sentinel is not None:
            sentinel.send_signal(signal.SIGTERM)
            sentinel.wait(10)
            shutil.rmtree(tmp / "sentinel", ignore_errors=True)


def main() -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--repeat", type=int, default=10, help="runs of each command in each environment (default 10)")
    ap.add_argument("--only", default=",".join(ENVIRONMENTS), help="environments to measure (comma-separated)")
    ap.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    with session("cli-bench-", redis_url=args.redis_url, say=say) as (tmp, url):
        out = measure(tmp, url, args.repeat, only)

    def human() -> None:
        print(f"cli_bench: {args.repeat} runs each, medians (p90) in ms, target {TARGET_MS:g} ms")
        cols = ("kill_loop_effective", "kill_loop_wall", "pause_effective", "pause_wall", "loop_status_wall")
        print(f"  {'environment':<13}" + "".join(f"{c:>22}" for c in cols))
        for name, figs in out["environments"].items():
            cells = []
            for c in cols:
                f = figs.get(c)
                cells.append(f"{f['p50_ms']:.1f} ({f['p90_ms']:.1f})" if f else "-")
            print(f"  {name:<13}" + "".join(f"{cell:>22}" for cell in cells))
            if figs["kill_loop_failed"]:
                print(f"    ({figs['kill_loop_failed']} kill-loop run(s) wrote no kill record)")
        for name in ("python_floor", "import_redis_pydantic_settings_click"):
            print(f"  {name:<38} {out[name]['p50_ms']:7.1f} ms  ({out[name]['p90_ms']:.1f})")

    return emit(out, args.json, human)


if __name__ == "__main__":
    sys.exit(main())
