"""``factory-worker doctor``: check a deployment's Redis, broker and timing settings.

Each check yields findings ``{check, severity, message}``; severity is ``error`` or ``warn`` (a problem:
exit 1) or ``info`` (a note: exit 0). The message is one line: what is wrong and what to set. An
unreachable Redis is not a finding: :func:`run_doctor` raises :class:`redis.ConnectionError` and the CLI
prints one line and exits 2.

Beats announce themselves with :func:`publish_beat` (a ``{ns}:beat:<host>/<pid>`` key with expiry), so the
doctor can tell when more than one ``celery beat`` is running.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from .config import Settings
from .loop import Factory
from .redis_client import client as make_client
from .redis_client import server_now_ms

log = logging.getLogger(__name__)

Finding = dict[str, str]
PROBLEMS = ("error", "warn")
#: Local clock vs Redis TIME (and a beat host's clock vs Redis) beyond this is reported.
MAX_SKEW_S = 1.0
#: A dispatch lease shorter than this is lost by an ordinary GC pause or Redis failover.
MIN_LEASE_S = 5.0
BROKER_TIMEOUT_S = 3.0


@dataclass
class Ctx:
    settings: Settings
    r: redis.Redis
    f: Factory
    clock: Callable[[], float]
    check_broker: bool


def _finding(check: str, severity: str, message: str) -> Finding:
    return {"check": check, "severity": severity, "message": message}


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


# -- beat presence -------------------------------------------------------------------------------------
def beat_ttl_s(settings: Settings) -> float:
    return max(30.0, 3 * settings.loop.interval_s)


def beat_node(hostname: str | None = None, pid: int | None = None) -> str:
    return f"{hostname or socket.gethostname()}/{pid or os.getpid()}"


def publish_beat(f: Factory, hostname: str | None = None, pid: int | None = None,
                 ttl_s: float | None = None) -> str:
    """Announce a live beat (call it at beat start and on every tick/kickoff); returns the key.

    The value carries both the host clock and the Redis clock, so the doctor can see a skewed beat host.
    """
    node = beat_node(hostname, pid)
    key = f.keys.beat(node)
    value = {"node": node, "hostname": hostname or socket.gethostname(), "pid": pid or os.getpid(),
             "host_ms": int(time.time() * 1000), "updated_ms": server_now_ms(f.r)}
    f.r.set(key, json.dumps(value), px=max(1, int((ttl_s or beat_ttl_s(f.settings)) * 1000)))
    return key


def clear_beat(f: Factory, hostname: str | None = None, pid: int | None = None) -> None:
    """Remove this beat's presence key (on clean shutdown)."""
    f.r.delete(f.keys.beat(beat_node(hostname, pid)))


def beat_seen(f: Factory) -> list[dict[str, Any]]:
    """The beats whose presence key is live, sorted by node."""
    out = []
    for key in f.r.scan_iter(match=f.keys.beat("*"), count=500):
        raw = f.r.get(key)
        try:
            rec = json.loads(raw) if raw else None
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
    return sorted(out, key=lambda b: str(b.get("node", "")))


# -- checks --------------------------------------------------------------------------------------------
class _NoConfig(Exception):
    """CONFIG GET is disabled or not permitted (managed Redis, ACLs)."""


def _config_get(r: redis.Redis, name: str) -> str:
    try:
        got = r.config_get(name)
    except redis.ResponseError as exc:  # unknown command (renamed), NOPERM
        raise _NoConfig(str(exc).splitlines()[0].split(",")[0]) from None
    if name not in got:
        raise _NoConfig(f"CONFIG GET {name} returned nothing")
    return str(got[name])


def _info(r: redis.Redis, section: str) -> dict[str, Any]:
    try:
        return r.info(section)
    except redis.ResponseError:
        return {}


def check_eviction(c: Ctx) -> Iterator[Finding]:
    try:
        policy = _config_get(c.r, "maxmemory-policy")
    except _NoConfig as exc:
        policy = str(_info(c.r, "memory").get("maxmemory_policy", "")) or None
        if policy is None:
            yield _finding("eviction", "info", f"maxmemory-policy unknown (CONFIG unavailable: {exc}); make "
                           "sure your Redis uses maxmemory-policy noeviction")
            return
    if policy == "noeviction":
        return
    if policy.startswith("allkeys-"):
        yield _finding("eviction", "error", f"maxmemory-policy is {policy}: under memory pressure Redis drops "
                       "ledger keys (done markers, fences, claims); set maxmemory-policy noeviction")
    else:
        yield _finding("eviction", "warn", f"maxmemory-policy is {policy}: claims, leases and heartbeats carry "
                       "TTLs and may be evicted early (double dispatch); set maxmemory-policy noeviction")


def check_persistence(c: Ctx) -> Iterator[Finding]:
    try:
        aof = _config_get(c.r, "appendonly")
        save = _config_get(c.r, "save")
    except _NoConfig as exc:
        if int(_info(c.r, "persistence").get("aof_enabled", 0) or 0):
            return
        yield _finding("persistence", "info", f"persistence unknown (CONFIG unavailable: {exc}); make sure "
                       "your Redis persists (appendonly yes) or a restart forgets done markers")
        return
    if aof == "yes":
        return
    if not save.strip():
        yield _finding("persistence", "warn", "Redis does not persist (appendonly no, save \"\"): a restart "
                       "forgets done markers and re-dispatches finished issues; set appendonly yes")
    else:
        yield _finding("persistence", "info", f"RDB snapshots only (save \"{save}\"): a crash loses the writes "
                       "since the last snapshot; appendonly yes (appendfsync everysec) is recommended")


def check_visibility(c: Ctx) -> Iterator[Finding]:
    s = c.settings
    need = s.agent.timeout_s + s.worker.soft_shutdown_s
    vt = s.worker.visibility_timeout_s
    if vt < need:
        yield _finding("visibility-timeout", "warn", f"broker visibility timeout {vt:g}s is shorter than agent "
                       f"timeout {s.agent.timeout_s:g}s + soft shutdown {s.worker.soft_shutdown_s:g}s: unacked "
                       f"messages are redelivered while still running; set FACTORY_WORKER__VISIBILITY_TIMEOUT_S"
                       f" >= {need:g}")


def check_beats(c: Ctx) -> Iterator[Finding]:
    beats = beat_seen(c.f)
    if len(beats) > 1:
        nodes = ", ".join(str(b.get("node")) for b in beats)
        yield _finding("beat", "warn", f"{len(beats)} beats are live ({nodes}): run exactly one "
                       "`celery -A factory_worker beat` (replicas 1, strategy Recreate)")
    for b in beats:
        try:
            skew = (int(b["host_ms"]) - int(b["updated_ms"])) / 1000
        except (KeyError, TypeError, ValueError):
            continue
        if abs(skew) > MAX_SKEW_S:
            yield _finding("clock-skew", "warn", f"beat {b.get('node')} host clock is {skew:+.1f}s off the "
                           "Redis clock: run NTP (chrony/systemd-timesyncd) on that host")


def check_clock(c: Ctx) -> Iterator[Finding]:
    t0 = c.clock()
    sec, usec = c.r.time()
    t1 = c.clock()
    skew = (int(sec) + int(usec) / 1e6) - (t0 + t1) / 2
    if abs(skew) > MAX_SKEW_S + (t1 - t0) / 2:
        yield _finding("clock-skew", "warn", f"this host's clock is {-skew:+.1f}s off the Redis clock: run NTP "
                       "(chrony/systemd-timesyncd); leases use Redis time but logs and agents use local time")


def check_broker(c: Ctx) -> Iterator[Finding]:
    if not c.check_broker:
        return
    from kombu import Connection

    url = c.settings.effective_broker_url
    try:
        with Connection(url, connect_timeout=BROKER_TIMEOUT_S) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0.2, interval_step=0.2,
                                   timeout=BROKER_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the finding
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        yield _finding("broker", "error", f"broker {redact(url)} unreachable ({detail}); set "
                       "FACTORY_BROKER_URL (defaults to FACTORY_REDIS_URL) to a reachable Redis")


def check_leases(c: Ctx) -> Iterator[Finding]:
    s = c.settings
    lease = s.dispatch.lease_ttl_s
    if lease < MIN_LEASE_S:
        yield _finding("lease", "warn", f"dispatch lease {lease:g}s is renewed every {lease / 3:.2g}s: a GC pause "
                       f"or Redis failover longer than that re-dispatches a running issue; set "
                       f"FACTORY_DISPATCH__LEASE_TTL_S >= {MIN_LEASE_S:g}")
    w = s.worker
    if w.heartbeat_ttl_s <= w.heartbeat_interval_s:
        yield _finding("worker-heartbeat", "warn", f"worker heartbeat TTL {w.heartbeat_ttl_s:g}s is not above "
                       f"its interval {w.heartbeat_interval_s:g}s: live workers flicker out; set "
                       f"FACTORY_WORKER__HEARTBEAT_TTL_S >= {2 * w.heartbeat_interval_s:g}")
    lp = s.loop
    if lp.heartbeat_ttl_s <= lp.stale_after_s:
        yield _finding("loop-heartbeat", "info", f"loop heartbeat TTL {lp.heartbeat_ttl_s:g}s <= stale_after "
                       f"{lp.stale_after_s:g}s: a stuck loop reads as missing, never as stale; set "
                       "FACTORY_LOOP__HEARTBEAT_TTL_S above FACTORY_LOOP__STALE_AFTER_S")


CHECKS: tuple[tuple[str, Callable[[Ctx], Iterator[Finding]]], ...] = (
    ("eviction", check_eviction), ("persistence", check_persistence), ("visibility-timeout", check_visibility),
    ("beat", check_beats), ("clock-skew", check_clock), ("broker", check_broker), ("leases", check_leases),
)


def run_doctor(settings: Settings, *, client: redis.Redis | None = None, clock: Callable[[], float] = time.time,
               check_broker: bool = True) -> tuple[dict[str, Any], int]:
    """Run every check; returns (report, exit code 0 no problems / 1 problems). Redis down -> ConnectionError."""
    r = client or make_client(settings)
    r.ping()  # unreachable or wrong password: redis.ConnectionError / AuthenticationError -> exit 2
    ctx = Ctx(settings, r, Factory(settings, r=r), clock, check_broker)
    findings: list[Finding] = []
    for _name, check in CHECKS:
        findings.extend(check(ctx))
    server = _info(r, "server")
    problems = [x for x in findings if x["severity"] in PROBLEMS]
    data = {
        "redis_url": redact(settings.effective_redis_url),
        "broker_url": redact(settings.effective_broker_url),
        "redis_version": server.get("redis_version"),
        "namespace": settings.namespace,
        "checks": [name for name, _ in CHECKS],
        "findings": findings,
        "problems": len(problems),
    }
    code = 1 if problems else 0
    data["exit"] = code
    return data, code


def format_report(data: dict[str, Any]) -> str:
    """One line per finding, then a summary line."""
    lines = [f"{x['severity'].upper():<5} {x['check']}: {x['message']}" for x in data["findings"]]
    by = {s: sum(1 for x in data["findings"] if x["severity"] == s) for s in ("error", "warn", "info")}
    where = f"{len(data['checks'])} checks on {data['redis_url']} (redis {data.get('redis_version') or '?'})"
    if data["problems"]:
        lines.append(f"doctor: {data['problems']} problem(s) ({by['error']} error(s), {by['warn']} warning(s), "
                     f"{by['info']} note(s)); {where}")
    else:
        lines.append(f"doctor: ok ({by['info']} note(s)); {where}")
    return "\n".join(lines)
