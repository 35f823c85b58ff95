"""Benchmark: the ledger's batched gate against per-item locking and the raw Redis ceiling, in one run.

On one real Redis (``--redis-url``, else a redis-server started here in a temp dir) it measures the time to
gate ``--n`` candidate issues three ways, on an empty database each time:

(a) batched   ``Ledger.claim`` in batches of ``--batch`` (one Lua call per batch: done marker, lease,
              backoff, parking, in-flight cap, fencing token);
(b) per-item  one redis-py ``Lock(name, timeout=...).acquire(blocking=False)`` per issue, the way
              celery-once guards a task: one round trip per issue and no ledger logic at all;
(c) ceiling   pipelined ``SET key val NX PX`` of the same keys in chunks of ``--batch``, no logic.

and the memory a done issue costs: Redis ``used_memory`` before/after claiming and completing
``--done-n`` issues through the Ledger, per issue. Each speed phase runs ``--repeat`` times and the best
run counts (this is a throughput ceiling, noise only ever slows it down).

    python benchmarks/ledger_bench.py [--n 10000] [--batch 1000] [--done-n 100000] [--json]

Targets (reported, not asserted): batched >= 20x per-item, >= 0.3 of the raw ceiling, <= 100 bytes per
done issue. With ``--redis-url`` only the benchmark's own keys are deleted between phases (it never
flushes a database it did not start), so point it at an otherwise idle Redis for meaningful figures.
"""

from __future__ import annotations

import argparse
import fnmatch
import platform
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from _harness import emit, make_parser, session, unlink_matching

from factory_worker.config.settings import load_settings
from factory_worker.ledger.core import Ledger
from factory_worker.ledger.keys import Keys

TARGETS = {"speedup_vs_per_item": 20.0, "fraction_of_ceiling": 0.3, "done_marker_bytes_per_issue": 100.0}
LEASE_S = 300


class Bench:
    def __init__(self, client: redis.Redis, owns_server: bool, n: int, batch: int) -> None:
        self.r = client
        self.owns_server = owns_server
        self.n = n
        self.batch = batch
        tag = uuid.uuid4().hex[:8]
        self.keys = Keys(f"bench-{tag}")
        self.prefix = f"bench-{tag}"
        self.issues = [f"ISSUE-{i}" for i in range(n)]
        settings = load_settings(
            namespace=self.keys.namespace, dispatch={"max_in_flight": 10 * max(n, 1), "lease_ttl_s": LEASE_S}
        )
        self.dispatch = settings.dispatch
        self.ledger = Ledger(client, self.keys, self.dispatch)

    # -- housekeeping -------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Empty the database between phases (only our own keys on a server we did not start)."""
        if self.owns_server:
            self.r.flushall()
        else:
            for pattern in (self.keys.pattern(), self.prefix + ":*"):
                unlink_matching(self.r, pattern)
        self.r.ping()
        # an emptied ledger is a new ledger: a fresh Ledger (its guard would rightly refuse the old one's loss)
        self.ledger = Ledger(self.r, self.keys, self.dispatch)

    def best(self, phase: Callable[[], int], repeat: int) -> tuple[float, int]:
        """Run ``phase`` ``repeat`` times on an empty database; the fastest run's ops/s and its count."""
        rates = []
        count = 0
        for _ in range(repeat):
            self.flush()
            t0 = time.perf_counter()
            count = phase()
            rates.append(self.n / (time.perf_counter() - t0))
        self.flush()
        return max(rates), count

    # -- the three gates ----------------------------------------------------------------------------------
    def batched(self) -> int:
        claimed = 0
        claim = self.ledger.claim
        for start in range(0, self.n, self.batch):
            claimed += len(claim(self.issues[start : start + self.batch]).claims)
        return claimed

    def per_item(self) -> int:
        acquired = 0
        lock = self.r.lock
        for issue in self.issues:
            if lock(f"{self.prefix}:lock:{issue}", timeout=LEASE_S).acquire(blocking=False):
                acquired += 1
        return acquired

    def raw(self) -> int:
        ok = 0
        px = LEASE_S * 1000
        for start in range(0, self.n, self.batch):
            p = self.r.pipeline(transaction=False)
            for issue in self.issues[start : start + self.batch]:
                p.set(f"{self.prefix}:raw:{issue}", "1", nx=True, px=px)
            ok += sum(1 for res in p.execute() if res)
        return ok

    def warm_up(self) -> None:
        """Connections, script registration, lock script loading: nothing of that is measured."""
        few = self.issues[:10]
        self.ledger.claim(few)
        self.r.lock(f"{self.prefix}:warm", timeout=1).acquire(blocking=False)
        p = self.r.pipeline(transaction=False)
        p.set(f"{self.prefix}:warm2", "1", nx=True, px=1000)
        p.execute()
        self.flush()

    # -- memory per done issue ----------------------------------------------------------------------------
    def done_memory(self, done_n: int, threads: int) -> dict[str, Any]:
        self.flush()
        ledger = Ledger(self.r, self.keys, self.dispatch)
        ledger.claim(["warm-up"])  # counters hash and friends exist before the baseline is taken
        ledger.complete("warm-up", ledger.current_token("warm-up") or "")
        time.sleep(0.05)
        before = int(self.r.info("memory")["used_memory"])
        issues = [f"DONE-{i}" for i in range(done_n)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for start in range(0, done_n, 1000):
                claims = ledger.claim(issues[start : start + 1000]).claims
                if len(claims) != len(issues[start : start + 1000]):
                    raise RuntimeError("done-memory phase: not every issue was claimed")
                list(pool.map(lambda c: ledger.complete(c.issue, c.token), claims))
        elapsed = time.perf_counter() - t0
        time.sleep(0.05)
        after = int(self.r.info("memory")["used_memory"])
        done = int(self.r.get(self.keys.done_count) or 0)
        usage = sum(
            self.r.memory_usage(b, samples=0) or 0
            for b in self.r.scan_iter(match=self.keys.done_bucket_pattern(), count=1000)
        )
        buckets = self.keys.done_bucket_pattern()
        leftover = sorted(
            k for k in self.r.scan_iter(match=self.keys.pattern(), count=1000) if not fnmatch.fnmatchcase(k, buckets)
        )
        n_buckets = sum(1 for _ in self.r.scan_iter(match=buckets, count=1000))
        self.flush()
        if done != done_n + 1:
            raise RuntimeError(f"done-memory phase: {done} done markers, expected {done_n + 1}")
        return {
            "done_n": done_n,
            "done_marker_bytes_per_issue": round((after - before) / done_n, 1),
            "done_hash_bytes_per_issue": round(usage / (done_n + 1), 1),
            "done_claim_complete_per_s": round(done_n / elapsed),
            "done_buckets": n_buckets,
            "other_keys_left_after_done": [k.removeprefix(self.keys.prefix + ":") for k in leftover],
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with session("ledger-bench-", redis_url=args.redis_url) as (_tmp, redis_url):
        client = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=60)
        try:
            return measure(args, client, redis_url)
        finally:
            client.close()


def measure(args: argparse.Namespace, client: redis.Redis, redis_url: str) -> dict[str, Any]:
    bench = Bench(client, owns_server=not args.redis_url, n=args.n, batch=args.batch)
    bench.warm_up()
    batched, n_batched = bench.best(bench.batched, args.repeat)
    per_item, n_per_item = bench.best(bench.per_item, args.repeat)
    raw, n_raw = bench.best(bench.raw, args.repeat)
    for name, count in (("batched", n_batched), ("per-item", n_per_item), ("raw", n_raw)):
        if count != args.n:
            raise RuntimeError(f"{name} phase gated {count} of {args.n} issues (database not empty?)")
    mem = bench.done_memory(args.done_n, args.threads) if args.done_n > 0 else {}
    info = client.info("server")
    result: dict[str, Any] = {
        "n": args.n,
        "batch": args.batch,
        "repeat": args.repeat,
        "batched_claims_per_s": round(batched),
        "per_item_claims_per_s": round(per_item),
        "raw_ceiling_ops_per_s": round(raw),
        "speedup_vs_per_item": round(batched / per_item, 2),
        "fraction_of_ceiling": round(batched / raw, 3),
        **mem,
        "redis_version": info.get("redis_version"),
        "redis_url": args.redis_url or f"embedded ({redis_url})",
        "python": platform.python_version(),
        "hiredis": _has_hiredis(),
        "targets": TARGETS,
    }
    result["targets_met"] = {
        "speedup_vs_per_item": result["speedup_vs_per_item"] >= TARGETS["speedup_vs_per_item"],
        "fraction_of_ceiling": result["fraction_of_ceiling"] >= TARGETS["fraction_of_ceiling"],
    }
    if mem:
        result["targets_met"]["done_marker_bytes_per_issue"] = (
            mem["done_marker_bytes_per_issue"] <= TARGETS["done_marker_bytes_per_issue"]
        )
    return result


def _has_hiredis() -> bool:
    try:
        import hiredis  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


def table(res: dict[str, Any]) -> str:
    tgt, met = res["targets"], res["targets_met"]

    def mark(name: str) -> str:
        return "" if name not in met else ("  ok" if met[name] else "  MISSED")

    rows = [
        ("gate", "ops/s", "vs per-item", "of ceiling"),
        (
            "batched Ledger.claim",
            f"{res['batched_claims_per_s']:,}",
            f"{res['speedup_vs_per_item']:.1f}x",
            f"{res['fraction_of_ceiling']:.2f}",
        ),
        (
            "per-item Lock.acquire",
            f"{res['per_item_claims_per_s']:,}",
            "1.0x",
            f"{res['per_item_claims_per_s'] / res['raw_ceiling_ops_per_s']:.2f}",
        ),
        (
            "raw SET NX PX pipeline",
            f"{res['raw_ceiling_ops_per_s']:,}",
            f"{res['raw_ceiling_ops_per_s'] / res['per_item_claims_per_s']:.1f}x",
            "1.00",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        f"ledger gate benchmark: n={res['n']:,} batch={res['batch']} best of {res['repeat']}, "
        f"Redis {res['redis_version']} ({res['redis_url']}), hiredis={'yes' if res['hiredis'] else 'no'}",
        "",
    ]
    for n, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(
        f"speedup vs per-item   {res['speedup_vs_per_item']:>8.1f}x   target >= "
        f"{tgt['speedup_vs_per_item']:.0f}x{mark('speedup_vs_per_item')}"
    )
    lines.append(
        f"fraction of ceiling   {res['fraction_of_ceiling']:>8.2f}    target >= "
        f"{tgt['fraction_of_ceiling']}{mark('fraction_of_ceiling')}"
    )
    if "done_marker_bytes_per_issue" in res:
        lines.append(
            f"bytes per done issue  {res['done_marker_bytes_per_issue']:>8.1f}    target <= "
            f"{tgt['done_marker_bytes_per_issue']:.0f}{mark('done_marker_bytes_per_issue')}   "
            f"(used_memory delta over {res['done_n']:,} done issues; the done hash alone: "
            f"{res['done_hash_bytes_per_issue']:.1f})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = make_parser(__doc__, epilog=False)
    ap.add_argument("--redis-url", help="an idle Redis to use (default: start a redis-server in a temp dir)")
    ap.add_argument("--n", type=int, default=10_000, help="candidate issues per phase (default 10000)")
    ap.add_argument("--batch", type=int, default=1000, help="issues per Ledger.claim / pipeline (default 1000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per speed phase, best counts (default 3)")
    ap.add_argument(
        "--done-n",
        type=int,
        default=100_000,
        help="issues claimed+completed for the memory figure (default 100000; 0 skips it)",
    )
    ap.add_argument("--threads", type=int, default=8, help="threads completing issues in the memory phase")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    if args.n < 1 or args.batch < 1 or args.repeat < 1 or args.done_n < 0 or args.threads < 1:
        ap.error("--n, --batch, --repeat and --threads must be >= 1, --done-n >= 0")
    try:
        res = run(args)
    except (redis.RedisError, RuntimeError, OSError) as exc:
        print(f"ledger_bench: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    return emit(res, args.json, lambda: print(table(res)))


if __name__ == "__main__":
    sys.exit(main())
