"""``factory-worker metrics``: the exporter on a real Redis, scraped over HTTP while the ledger moves."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from factory_worker.context import Context
from factory_worker.loop import heartbeat
from factory_worker.ops.embedded import free_port
from factory_worker.ops.metrics import parse_addr, render, snapshot

log = logging.getLogger(__name__)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, frozenset], float]


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def val(sm: Samples, metric: str, /, **labels: str) -> float | None:
    return sm.get((metric, frozenset(labels.items())))


@pytest.fixture
def factory(real_redis, redis_url, make_settings) -> Context:
    return Context(
        make_settings(redis_url=redis_url, dispatch={"lease_ttl_s": 30, "backoff_base_s": 60, "backoff_max_s": 60})
    )


def do_work(ctx: Context, issues: list[str], fail: list[str] = ()) -> None:
    batch = ctx.ledger.claim(issues)
    assert len(batch.claims) == len(issues)
    for c in batch.claims:
        if c.issue in fail:
            ctx.ledger.fail(c.issue, c.token, "boom")
        else:
            ctx.ledger.complete(c.issue, c.token)


def a_run(ctx: Context) -> str:
    """A run with one recorded iteration (whose report carries duration_s) and a live heartbeat + worker."""
    kick = ctx.control.start_run(3, by="test")
    assert kick.started
    ctx.control.record_iteration(kick.run_id, 0, {"pulled": 4, "dispatched": 4, "duration_s": 1.5}, False, "w1@h")
    heartbeat.write(ctx.redis, ctx.keys, kick.run_id, "running", 1, 3, 60)
    ctx.redis.set(ctx.keys.worker("w1@h"), json.dumps({"hostname": "w1@h", "updated_ms": 1}), px=60_000)
    return kick.run_id


@pytest.fixture
def exporter(factory: Context) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = free_port()
    exe = Path(sys.executable).parent / "factory-worker"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "factory_worker.ctl"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACTORY_")}
    env.update(
        FACTORY_REDIS_URL=factory.settings.effective_redis_url,
        FACTORY_NAMESPACE=factory.settings.namespace,
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    proc = subprocess.Popen(
        argv + ["metrics", "--serve", f"127.0.0.1:{port}"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            httpx.get(url, timeout=2)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "exporter did not come up"
            time.sleep(0.05)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def scrape(url: str) -> Samples:
    resp = httpx.get(url, timeout=5)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return samples(resp.text)


def test_serve_scrape_move_and_stop(factory: Context, exporter) -> None:
    proc, url = exporter
    do_work(factory, ["A", "B", "C"], fail=["C"])
    a_run(factory)
    sm = scrape(url)
    assert val(sm, "factory_redis_up") == 1
    assert val(sm, "factory_ledger_events_total", event="claimed") == 3
    assert val(sm, "factory_ledger_events_total", event="completed") == 2
    assert val(sm, "factory_ledger_events_total", event="backed_off") == 1
    assert val(sm, "factory_ledger_events_total", event="parked") == 0
    assert val(sm, "factory_issues", state="done") == 2
    assert val(sm, "factory_issues", state="backoff") == 1
    assert val(sm, "factory_issues", state="in_flight") == 0
    assert val(sm, "factory_loop_live") == 1 and val(sm, "factory_loop_status", status="live") == 1
    assert val(sm, "factory_loop_status", status="missing") == 0
    assert 0 <= val(sm, "factory_heartbeat_age_seconds") < 30
    assert val(sm, "factory_iteration_duration_seconds") == 1.5
    assert val(sm, "factory_workers_live") == 1
    assert val(sm, "factory_loop_counters_total", name="runs_started") == 1
    assert val(sm, "factory_loop_counters_total", name="iterations") == 1
    assert val(sm, "factory_ledger_events_total", event="runs_started") is None  # loop counters kept apart

    do_work(factory, ["D", "E"])
    factory.control.start_run(3, by="test")  # a run is live: SKIP, counted
    sm = scrape(url)
    assert val(sm, "factory_ledger_events_total", event="completed") == 4
    assert val(sm, "factory_ledger_events_total", event="claimed") == 5
    assert val(sm, "factory_issues", state="done") == 4
    assert val(sm, "factory_loop_counters_total", name="kickoffs_skipped_overlap") == 1

    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
    assert time.monotonic() - t0 < 3
    _, err = proc.communicate()
    assert "Traceback" not in err


def test_sigint_also_exits_0(exporter) -> None:
    proc, url = exporter
    assert val(scrape(url), "factory_loop_live") == 0
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=5) == 0


def test_render_and_snapshot_in_process(factory: Context) -> None:
    do_work(factory, ["X"])
    snap = snapshot(factory)
    assert snap["ledger_events"]["completed"] == 1 and snap["issues"]["done"] == 1
    assert snap["liveness"] == "missing" and snap["heartbeat_age_s"] is None
    assert snap["iteration_duration_s"] is None
    sm = samples(render(factory))
    assert val(sm, "factory_ledger_events_total", event="completed") == 1
    assert val(sm, "factory_loop_status", status="missing") == 1
    names = {n for n, _ in sm}
    assert "factory_heartbeat_age_seconds" not in names and "factory_iteration_duration_seconds" not in names


def test_scrape_while_redis_is_down_reports_redis_up_0(make_settings) -> None:
    ctx = Context(make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    sm = samples(render(ctx))
    assert val(sm, "factory_redis_up") == 0 and len(sm) == 1


def test_metrics_cli_once_and_json(factory: Context) -> None:
    do_work(factory, ["Y"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACTORY_")}
    env.update(FACTORY_REDIS_URL=factory.settings.effective_redis_url, FACTORY_NAMESPACE=factory.settings.namespace)
    base = [sys.executable, "-m", "factory_worker.ctl", "metrics"]
    proc = subprocess.run(base, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and val(samples(proc.stdout), "factory_issues", state="done") == 1
    proc = subprocess.run(base + ["--json"], check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and json.loads(proc.stdout)["issues"]["done"] == 1


@pytest.mark.parametrize(
    "addr,expected",
    [
        (":9108", ("0.0.0.0", 9108)),
        ("127.0.0.1:9108", ("127.0.0.1", 9108)),
        ("9108", ("127.0.0.1", 9108)),
        ("[::1]:9108", ("::1", 9108)),
        ("[::]:9108", ("::", 9108)),
        ("0.0.0.0:9108", ("0.0.0.0", 9108)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_parse_addr(addr: str, expected: tuple[str, int]) -> None:
    """A bare port binds loopback only; every interface is bound only when written (``:PORT``, 0.0.0.0, ::)."""
    assert parse_addr(addr) == expected


@pytest.mark.parametrize("addr", ["", ":", "host:", ":0", ":65536", ":http", "a:b:9108", "::1:9108", "-1"])
def test_parse_addr_rejects(addr: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_addr(addr)


def test_bad_serve_address_exits_2(factory: Context) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACTORY_")}
    env.update(FACTORY_REDIS_URL=factory.settings.effective_redis_url)
    proc = subprocess.run(
        [sys.executable, "-m", "factory_worker.ctl", "metrics", "--serve", ":nope"],
        check=False,
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
