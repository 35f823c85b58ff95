"""cli_bench: how soon the control CLI takes effect (issue 8: kill-loop and loop-status within 0.15 s).

On one redis-server started here (or ``--redis-url``), each command is run ``--repeat`` times as users run
it (``python -m factory_worker.ctl ...``, plain environment settings, a live loop: a heartbeat and a run):

  kill-loop effective  Redis server time of the command's kill record minus the server time read just
                       before the command was started: when the loop is stopped (the claim script and
                       ``begin`` refuse from then on), whatever the command still does after it
  kill-loop wall       start to exit (revoke, end of the run, notify and the report included)
  loop-status wall     start to exit (its answer is the output, so its wall time is its effect)
  python floor         ``python -c pass``, and ``import redis, pydantic_settings, click`` (what the full CLI
                       cannot avoid importing)

Prints medians and p90 in ms. ``--json``: one JSON object. Nothing is asserted.

Usage: .venv/bin/python benchmarks/cli_bench.py [--repeat 10] [--json]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import redis
from _harness import emit, make_parser, make_say, percentile, session

from factory_worker.ledger.keys import Keys
from factory_worker.loop import heartbeat

PY = sys.executable
say = make_say("cli_bench")
TARGET_MS = 150.0


def server_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return int(sec) * 1000 + int(usec) // 1000


def live_loop(r: redis.Redis, keys: Keys) -> None:
    """A live loop as kill-loop sees it: a fresh heartbeat and no kill (no worker needed)."""
    r.delete(keys.kill)
    heartbeat.write(r, keys, "bench-run", "running", 1, 3, 60)


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return (time.perf_counter() - t0) * 1000


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(values, 50), 1), "p90_ms": round(percentile(values, 90), 1)}


def measure(redis_url: str, repeat: int) -> dict[str, Any]:
    keys = Keys("clibench")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACTORY_")}
    env.update(FACTORY_REDIS_URL=redis_url, FACTORY_NAMESPACE=keys.namespace)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    ctl = [PY, "-m", "factory_worker.ctl"]
    effective, kill_wall, status_wall, floor, imports = [], [], [], [], []
    for i in range(repeat):
        say(f"round {i + 1}/{repeat}")
        live_loop(r, keys)
        before = server_ms(r)
        kill_wall.append(timed([*ctl, "kill-loop", "--json"], env))
        at = r.hget(keys.kill, "at_ms")
        if at is None:
            raise RuntimeError("kill-loop wrote no kill record")
        effective.append(float(int(at) - before))
        live_loop(r, keys)
        status_wall.append(timed([*ctl, "loop-status", "--json"], env))
        floor.append(timed([PY, "-c", "pass"], env))
        imports.append(timed([PY, "-c", "import redis, pydantic_settings, click"], env))
    r.delete(keys.kill, keys.heartbeat)
    for k in r.scan_iter(match=keys.pattern()):
        r.delete(k)
    r.close()
    return {
        "repeat": repeat,
        "target_ms": TARGET_MS,
        "kill_loop_effective": summary(effective),
        "kill_loop_wall": summary(kill_wall),
        "loop_status_wall": summary(status_wall),
        "python_floor": summary(floor),
        "import_redis_pydantic_settings_click": summary(imports),
    }


def main() -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--repeat", type=int, default=10, help="runs of each command (default 10)")
    ap.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    with session("cli-bench-", redis_url=args.redis_url, say=say) as (_tmp, url):
        out = measure(url, args.repeat)

    def human() -> None:
        print(f"cli_bench: {args.repeat} runs each, medians (p90), target {TARGET_MS:g} ms")
        for name in (
            "kill_loop_effective",
            "kill_loop_wall",
            "loop_status_wall",
            "python_floor",
            "import_redis_pydantic_settings_click",
        ):
            print(f"  {name:<38} {out[name]['p50_ms']:7.1f} ms  ({out[name]['p90_ms']:.1f})")

    return emit(out, args.json, human)


if __name__ == "__main__":
    sys.exit(main())
