"""Prometheus metrics of a factory loop, read from Redis at scrape time (``factory-worker metrics``).

A counter or gauge whose stored value is not a number (``invalid`` in ``loop-status``) is left out of the
scrape and logged. No global state: every scrape runs :func:`snapshot` (the same data as ``loop-status``) through a
:class:`FactoryCollector` registered in its own :class:`~prometheus_client.CollectorRegistry`. A scrape
while Redis is down answers ``factory_redis_up 0`` instead of failing. :func:`serve` runs the HTTP
endpoint until SIGINT/SIGTERM (on 127.0.0.1 unless an address is given: ``:PORT`` or ``0.0.0.0:PORT`` for every
interface); the signal handler only sets a flag.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any, cast

import click
import redis
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from factory_worker.context import Context
from factory_worker.ledger.keys import Keys
from factory_worker.ledger.states import Liveness, Stuck

log = logging.getLogger(__name__)

#: Counter names in the shared counters hash that describe the loop rather than the ledger.
LOOP_COUNTER_PREFIXES = ("kickoffs_", "runs_", "iterations", "dispatched", "webhook_")
LIVENESS_STATES = tuple(Liveness)
#: Counters that sum what the agents' results reported (``ledger/results.py``): their own metrics.
USAGE_COUNTERS = (Keys.COST_COUNTER, Keys.TOKENS_COUNTER)


def _is_loop_counter(name: str) -> bool:
    return name.startswith(LOOP_COUNTER_PREFIXES)


def snapshot(ctx: Context) -> dict[str, Any]:
    """Everything the metrics show, as plain data (what ``metrics --json`` prints)."""
    from factory_worker.ops.operations import loop_status

    status, _ = loop_status(ctx)
    counters = status["counters"]
    report = (status.get("run") or {}).get("last_report")
    duration = _seconds(report.get("duration_s")) if isinstance(report, dict) else None
    usage = {k: counters.get(k, 0) for k in USAGE_COUNTERS}
    return {
        "ledger_events": {
            k: v for k, v in sorted(counters.items()) if not _is_loop_counter(k) and k not in USAGE_COUNTERS
        },
        "loop_counters": {k: v for k, v in sorted(counters.items()) if _is_loop_counter(k)},
        "issues": dict(status["ledger"]),
        "liveness": status["liveness"],
        "live": bool(status["live"]),
        "heartbeat_age_s": status["age_s"],
        "iteration_duration_s": duration,
        "workers_live": len(status["workers"]),
        "killed": bool(status["killed"]),
        "ledger_lost": bool(status["ledger_lost"]),
        "paused": bool(status["paused"]),
        "outbox": status.get("outbox"),
        "spend_today": status.get("spend_today"),
        "usage": {  # a stored value that is not a number stays as read ("invalid"), and is left out
            "cost_usd": cost / 1_000_000 if isinstance(cost := usage[Keys.COST_COUNTER], int) else cost,
            "tokens": usage[Keys.TOKENS_COUNTER],
        },
        "stuck": list(status["reason_codes"]),
    }


def _seconds(value: Any) -> float | None:
    """A stored duration as a finite float, else None (a huge int, ``inf`` or text is left out)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


def _samples(values: dict[str, Any], what: str) -> Iterator[tuple[str, int]]:
    """The integer values; one that is not (``invalid``: see ``records.shown``) is left out of the scrape and
    logged, as Prometheus has no sample for "not a number we can trust"."""
    for name, v in values.items():
        if isinstance(v, int) and not isinstance(v, bool):
            yield name, v
        else:
            log.warning("metrics: %s %r holds no valid number (%r); left out", what, name, v)


class FactoryCollector(Collector):
    """Reads Redis on every ``collect()``; nothing is cached between scrapes."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def describe(self) -> list[Metric]:
        return []  # metrics depend on Redis contents; do not collect at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("factory_redis_up", "1 when the last scrape could read Redis")
        try:
            snap = snapshot(self.ctx)
        except redis.RedisError as exc:
            log.warning("scrape could not read Redis: %s", str(exc).splitlines()[0] if str(exc) else exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families(snap)


def families(snap: dict[str, Any]) -> Iterator[Metric]:
    """Metric families for one :func:`snapshot`."""
    events = CounterMetricFamily(
        "factory_ledger_events", "Ledger events since the namespace was created", labels=["event"]
    )
    for name, v in _samples(snap["ledger_events"], "counter"):
        events.add_metric([name], v)
    yield events
    loop = CounterMetricFamily(
        "factory_loop_counters", "Loop counters (kickoffs skipped, runs, iterations, webhook events)", labels=["name"]
    )
    for name, v in _samples(snap["loop_counters"], "counter"):
        loop.add_metric([name], v)
    yield loop
    issues = GaugeMetricFamily("factory_issues", "Issues in each ledger state now", labels=["state"])
    for state, v in _samples(snap["issues"], "gauge"):
        issues.add_metric([state], v)
    yield issues
    yield GaugeMetricFamily("factory_loop_live", "1 when the loop heartbeat is live", value=int(snap["live"]))
    status = GaugeMetricFamily("factory_loop_status", "Loop liveness (1 for the current state)", labels=["status"])
    for s in LIVENESS_STATES:
        status.add_metric([s], int(snap["liveness"] == s))
    yield status
    if snap["heartbeat_age_s"] is not None:
        yield GaugeMetricFamily(
            "factory_heartbeat_age_seconds", "Age of the loop heartbeat (Redis clock)", value=snap["heartbeat_age_s"]
        )
    if snap["iteration_duration_s"] is not None:
        yield GaugeMetricFamily(
            "factory_iteration_duration_seconds", "Duration of the last iteration", value=snap["iteration_duration_s"]
        )
    yield GaugeMetricFamily("factory_workers_live", "Workers with a live heartbeat key", value=snap["workers_live"])
    yield GaugeMetricFamily("factory_loop_killed", "1 while the loop is killed", value=int(snap["killed"]))
    stuck = GaugeMetricFamily(
        "factory_loop_stuck", "1 for each reason the loop cannot make progress (loop-status)", labels=["reason"]
    )
    for reason in Stuck:
        stuck.add_metric([reason], int(reason in snap["stuck"]))
    yield stuck
    yield GaugeMetricFamily("factory_loop_paused", "1 while the loop is paused", value=int(snap["paused"]))
    yield GaugeMetricFamily(
        "factory_ledger_lost",
        "1 while a process reports its ledger lost (safe mode)",
        value=int(snap.get("ledger_lost", False)),
    )
    spend = (snap.get("spend_today") or {}).get("cost_usd")
    if isinstance(spend, int | float):
        yield GaugeMetricFamily(
            "factory_spend_today_usd", "What the agents reported spending in this UTC day (FACTORY_USAGE)", value=spend
        )
    usage = snap.get("usage") or {}
    for name, what in (("cost_usd", "Cost (USD)"), ("tokens", "Tokens")):
        value = usage.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield CounterMetricFamily(
                f"factory_agent_{name}", f"{what} the agents reported in their results (FACTORY_RESULT)", value=value
            )
        elif value is not None:
            log.warning("metrics: agent %s %r holds no valid number; left out", name, value)
    if snap.get("outbox"):
        yield GaugeMetricFamily(
            "factory_outbox_pending", "Tracker events not yet delivered (write-back)", value=snap["outbox"]["pending"]
        )
        yield GaugeMetricFamily(
            "factory_outbox_parked", "Tracker events given up after their attempts", value=snap["outbox"]["parked"]
        )


def registry_for(ctx: Context) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FactoryCollector(ctx))
    return reg


def render(ctx: Context) -> str:
    """The metrics in the Prometheus text exposition format."""
    return generate_latest(registry_for(ctx)).decode("utf-8")


#: Hosts that mean "every interface": only ever bound when the user wrote one of them (or ``:PORT``).
ALL_INTERFACES = ("0.0.0.0", "::")
DEFAULT_HOST = "127.0.0.1"


def parse_addr(addr: str) -> tuple[str, int]:
    """``"9108"`` -> ``("127.0.0.1", 9108)`` (loopback unless asked otherwise); ``":9108"`` -> ``("0.0.0.0",
    9108)`` (every interface, stated by the empty host); ``"10.0.0.5:9108"``, ``"[::1]:9108"`` as written."""
    text = (addr or "").strip()
    host, sep, port_s = text.rpartition(":")
    if not sep:
        host, port_s = DEFAULT_HOST, text
    elif not host:
        host = ALL_INTERFACES[0]
    host = host.strip("[]") if host.startswith("[") and host.endswith("]") else host
    if not port_s.isdigit() or not 0 < int(port_s) < 65536 or (":" in host and not text.startswith("[")):
        raise click.BadParameter(
            f"{addr!r}: expected PORT (127.0.0.1), HOST:PORT, or :PORT for every interface", param_hint="--serve"
        )
    return host, int(port_s)


class _Stop:
    requested = False


def serve(ctx: Context, host: str, port: int, poll_s: float = 0.2) -> int:
    """Serve ``/metrics`` on ``host:port`` until SIGINT/SIGTERM; returns 0."""
    server, thread = start_http_server(port, addr=host, registry=registry_for(ctx))
    stop = _Stop()

    def _on_signal(signum: int, _frame: Any) -> None:
        stop.requested = True  # only a flag: the loop below does the stopping

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    # the bound socket's name: a str host (typeshed types it as what bind() accepts, bytes too)
    bound = cast("tuple[str, int] | tuple[str, int, int, int]", server.server_address)
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]  # an IPv6 address in a URL is bracketed
    print(f"factory-worker: serving metrics on http://{shown}:{bound[1]}/metrics", file=sys.stderr, flush=True)
    if host in ALL_INTERFACES:
        log.warning(
            "metrics are served on every interface (%s): whoever reaches port %d reads them; "
            "bind 127.0.0.1 or firewall it unless that is intended",
            host,
            port,
        )
    try:
        while not stop.requested:
            time.sleep(poll_s)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        server.shutdown()
        server.server_close()
        thread.join(5)
    log.info("metrics server stopped")
    return 0
