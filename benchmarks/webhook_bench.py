#!/usr/bin/env python
"""Webhook benchmark: a signed GitHub ``issues.labeled`` delivery to the agent's start, through real processes.

One redis-server (started here on a free port), a local fake of GitHub's REST API (``tests/fake_github.py``) as
the source, one agent worker (``celery -A factory_worker worker -Q <ns>.agents -c 4``, no beat: nothing polls)
and the receiver as its own process (``factory-worker webhooks --serve 127.0.0.1:<port>``). ``--n`` issues
(default 50) are labelled one at a time, each delivery signed as GitHub signs it, ``--gap`` s apart (default
0.3 s, so a slot is always free: the agent only records the time and exits). Figures:

  answer_p50_ms / answer_p99_ms       the receiver's answer (POST sent -> response read)
  start_p50_ms / start_p99_ms         webhook sent -> agent started (the agent's time.time() at start)
  source_calls_per_event              GitHub API requests the receiver made per event (it re-reads the issue;
                                      a poll lists the labelled open issues instead, a page per 100, every
                                      interval, and stays the reconciler)

Worker and receiver start-up are never timed. Every subprocess runs in its own process group and is killed
with it; the temp dir is removed (``--keep-tmp`` keeps the logs).

    .venv/bin/python benchmarks/webhook_bench.py            # human-readable figures
    .venv/bin/python benchmarks/webhook_bench.py --json     # one JSON object on stdout (progress on stderr)

This is a script that prints figures, not a test: nothing is asserted.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import redis
from _harness import (
    PY,
    Group,
    Proc,
    add_keep_tmp,
    emit,
    factory_env,
    make_parser,
    make_say,
    percentile,
    run_session,
    wait_for,
    worker_argv,
)

from factory_worker.ledger.keys import Keys
from factory_worker.ops.embedded import free_port
from tests import fake_webhooks as fw
from tests.fake_github import FakeGitHub

AGENT = """
import os, time
t = time.time()
with open(os.environ["BENCH_WEBHOOK_OUT"], "a") as fh:
    fh.write("%.6f %s\\n" % (t, os.environ["FACTORY_ISSUE_ID"]))
"""

say = make_say("webhook_bench")


def bench(tmp: Path, redis_url: str, n: int, gap_s: float) -> dict:
    work = tmp / "webhooks"
    work.mkdir()
    (work / "issues.jsonl").write_text("")
    agent, out = work / "agent.py", work / "starts.txt"
    agent.write_text(AGENT)
    namespace = "bench" + uuid.uuid4().hex[:8]
    keys = Keys(namespace)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    port = free_port()
    with FakeGitHub(fw.REPO) as gh:
        env = factory_env(
            redis_url,
            namespace,
            work,
            [PY, str(agent)],
            {
                "FACTORY_SOURCE__KIND": "github",
                "FACTORY_SOURCE__GITHUB_REPO": gh.repo,
                "FACTORY_SOURCE__GITHUB_API_URL": gh.url,
                "FACTORY_SOURCE__GITHUB_LABELS": json.dumps(["agent"]),
                "FACTORY_WEBHOOKS__GITHUB_SECRET": fw.GITHUB_SECRET,
                "FACTORY_WEBHOOKS__INBOX": "false",
                "FACTORY_DISPATCH__MAX_IN_FLIGHT": "8",
                "FACTORY_AGENT__TERM_GRACE_S": "1",
                "FACTORY_WORKER__SOFT_SHUTDOWN_S": "1",
                "BENCH_WEBHOOK_OUT": str(out),
            },
        )
        group = Group()
        try:
            say(f"starting an agent worker and the receiver (namespace {namespace})")
            group.add(Proc("w1", worker_argv("w1", 4, queues=keys.agent_queue), env, work, "ready."))
            receiver = ["-m", "factory_worker.ctl", "webhooks", "--serve", f"127.0.0.1:{port}"]
            group.add(Proc("webhooks", [PY, *receiver], env, work, "receiving webhooks"))
            group.wait_ready()
            wait_for(lambda: r.hlen(keys.slots), 30, "the worker's agent slots")
            for i in range(1, 3):  # warm-up: the receiver's first send opens its broker connection
                gh.add(10_000 + i, "warm-up", labels=("agent",))
                fw.post(port, "/webhooks/github", *fw.github("issues", fw.github_issue(10_000 + i)))
            wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 2, 30, "the warm-up agents")
            before = len(gh.requests)
            sent: dict[str, float] = {}
            answers = []
            say(f"go: {n} labelled issues, {gap_s} s apart")
            for i in range(1, n + 1):
                gh.add(i, f"issue {i}", labels=("agent",))
                headers, body = fw.github("issues", fw.github_issue(i))
                t0 = time.time()
                status, _, _ = fw.post(port, "/webhooks/github", headers, body)
                answers.append((time.time() - t0) * 1000)
                sent[str(i)] = t0
                if status != 200:
                    say(f"issue {i}: answered {status}")
                time.sleep(gap_s)
            wait_for(lambda: len(out.read_text().splitlines()) >= n + 2, 60, "every agent started")
            calls = len(gh.requests) - before
        finally:
            group.stop()
    starts = {}
    for line in out.read_text().splitlines():
        t, issue = line.split()
        starts.setdefault(issue, float(t))
    lat = [(starts[i] - sent[i]) * 1000 for i in sent if i in starts]
    return {
        "n": n,
        "answer_p50_ms": round(percentile(answers, 50), 1),
        "answer_p99_ms": round(percentile(answers, 99), 1),
        "start_p50_ms": round(percentile(lat, 50), 1),
        "start_p99_ms": round(percentile(lat, 99), 1),
        "started": len(lat),
        "source_calls_per_event": round(calls / n, 2),
    }


def main() -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--n", type=int, default=50, help="labelled issues (default 50)")
    ap.add_argument("--gap", type=float, default=0.3, help="seconds between deliveries (default 0.3)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_keep_tmp(ap)
    args = ap.parse_args()
    result: dict = {}

    def phases(tmp: Path, url: str) -> None:
        result.update(bench(tmp, url, args.n, args.gap))

    code = run_session("webhook_bench", "webhook-bench-", args.keep_tmp, phases)
    if code:
        return code

    def human() -> None:
        print(f"webhook -> answer:        p50 {result['answer_p50_ms']} ms, p99 {result['answer_p99_ms']} ms")
        print(f"webhook -> agent started: p50 {result['start_p50_ms']} ms, p99 {result['start_p99_ms']} ms")
        print(f"  ({result['started']}/{result['n']} started; no beat: nothing polled)")
        print(f"source calls per event: {result['source_calls_per_event']} (the issue re-read from GitHub)")

    return emit(result, args.json, human)


if __name__ == "__main__":
    raise SystemExit(main())
