"""``factory-worker doctor``: check a deployment's Redis, broker and timing settings.

Each check yields findings ``{check, severity, message}``; severity is ``error`` or ``warn`` (a problem:
exit 1) or ``info`` (a note: exit 0). The message is one line: what is wrong and what to set. An
unreachable Redis is not a finding: :func:`run_doctor` raises :class:`redis.ConnectionError` and the CLI
prints one line and exits 2.

Beats announce themselves (:mod:`factory_worker.loop.presence`), so the doctor can tell when more than one
``celery beat`` is running; workers say which queues they consume, so it reports what ``loop-status`` says
stops the loop (``loop:<reason>`` findings: no worker on the loop queue, the loop starved, no beat...).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from factory_worker.config.settings import Settings
from factory_worker.config.urls import is_amqp, mask_url
from factory_worker.context import Context
from factory_worker.ledger import guard
from factory_worker.ledger.redis_client import client as make_client
from factory_worker.ledger.states import Stuck
from factory_worker.loop.presence import beat_seen

log = logging.getLogger(__name__)

Finding = dict[str, str]
PROBLEMS = ("error", "warn")
#: Local clock vs Redis TIME (and a beat host's clock vs Redis) beyond this is reported.
MAX_SKEW_S = 1.0
#: A dispatch lease shorter than this is lost by an ordinary GC pause or Redis failover.
MIN_LEASE_S = 5.0
BROKER_TIMEOUT_S = 3.0


@dataclass
class Checkup:
    settings: Settings
    r: redis.Redis
    ctx: Context
    clock: Callable[[], float]
    check_broker: bool


def _finding(check: str, severity: str, message: str) -> Finding:
    return {"check": check, "severity": severity, "message": message}


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


def check_eviction(c: Checkup) -> Iterator[Finding]:
    try:
        policy = _config_get(c.r, "maxmemory-policy")
    except _NoConfig as exc:
        policy = str(_info(c.r, "memory").get("maxmemory_policy", ""))
        if not policy:
            yield _finding(
                "eviction",
                "info",
                f"maxmemory-policy unknown (CONFIG unavailable: {exc}); make "
                "sure your Redis uses maxmemory-policy noeviction",
            )
            return
    if policy == "noeviction":
        return
    if policy.startswith("allkeys-"):
        yield _finding(
            "eviction",
            "error",
            f"maxmemory-policy is {policy}: under memory pressure Redis drops "
            "ledger keys (done markers, fences, claims); set maxmemory-policy noeviction",
        )
    else:
        yield _finding(
            "eviction",
            "warn",
            f"maxmemory-policy is {policy}: claims, leases and heartbeats carry "
            "TTLs and may be evicted early (double dispatch); set maxmemory-policy noeviction",
        )


def check_persistence(c: Checkup) -> Iterator[Finding]:
    try:
        aof = _config_get(c.r, "appendonly")
        save = _config_get(c.r, "save")
    except _NoConfig as exc:
        if int(_info(c.r, "persistence").get("aof_enabled", 0) or 0):
            return
        yield _finding(
            "persistence",
            "info",
            f"persistence unknown (CONFIG unavailable: {exc}); make sure "
            "your Redis persists (appendonly yes) or a restart forgets done markers",
        )
        return
    if aof == "yes":
        return
    if not save.strip():
        yield _finding(
            "persistence",
            "warn",
            'Redis does not persist (appendonly no, save ""): a restart '
            "forgets done markers and re-dispatches finished issues; set appendonly yes",
        )
    else:
        yield _finding(
            "persistence",
            "info",
            f'RDB snapshots only (save "{save}"): a crash loses the writes '
            "since the last snapshot; appendonly yes (appendfsync everysec) is recommended",
        )


def check_visibility(c: Checkup) -> Iterator[Finding]:
    s = c.settings
    need = s.agent.timeout_s + s.worker.soft_shutdown_s
    vt = s.worker.visibility_timeout_s
    if vt < need:
        yield _finding(
            "visibility-timeout",
            "warn",
            f"broker visibility timeout {vt:g}s is shorter than agent "
            f"timeout {s.agent.timeout_s:g}s + soft shutdown {s.worker.soft_shutdown_s:g}s: unacked "
            f"messages are redelivered while still running; set FACTORY_WORKER__VISIBILITY_TIMEOUT_S"
            f" >= {need:g}",
        )


def check_beats(c: Checkup) -> Iterator[Finding]:
    beats = beat_seen(c.ctx)
    if len(beats) > 1:
        nodes = ", ".join(str(b.get("node")) for b in beats)
        yield _finding(
            "beat",
            "warn",
            f"{len(beats)} beats are live ({nodes}): run exactly one "
            "`celery -A factory_worker beat` (replicas 1, strategy Recreate)",
        )
    for b in beats:
        try:
            skew = (int(b["host_ms"]) - int(b["updated_ms"])) / 1000
        except (KeyError, TypeError, ValueError):
            continue
        if abs(skew) > MAX_SKEW_S:
            yield _finding(
                "clock-skew",
                "warn",
                f"beat {b.get('node')} host clock is {skew:+.1f}s off the "
                "Redis clock: run NTP (chrony/systemd-timesyncd) on that host",
            )


def check_clock(c: Checkup) -> Iterator[Finding]:
    t0 = c.clock()
    sec, usec = c.r.time()
    t1 = c.clock()
    skew = (int(sec) + int(usec) / 1e6) - (t0 + t1) / 2
    if abs(skew) > MAX_SKEW_S + (t1 - t0) / 2:
        yield _finding(
            "clock-skew",
            "warn",
            f"this host's clock is {-skew:+.1f}s off the Redis clock: run NTP "
            "(chrony/systemd-timesyncd); leases use Redis time but logs and agents use local time",
        )


def check_broker(c: Checkup) -> Iterator[Finding]:
    if not c.check_broker:
        return
    from kombu import Connection

    from factory_worker.worker.transport import broker_options

    url = c.settings.effective_broker_url
    kombu_url, options = broker_options(url)
    try:
        with Connection(kombu_url, connect_timeout=BROKER_TIMEOUT_S, transport_options=options) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0.2, interval_step=0.2, timeout=BROKER_TIMEOUT_S)
    except Exception as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        yield _finding(
            "broker",
            "error",
            f"broker {mask_url(url)} unreachable ({detail}); set "
            "FACTORY_BROKER_URL (defaults to FACTORY_REDIS_URL) to a reachable Redis or RabbitMQ (amqp://)",
        )
        return
    if is_amqp(url):
        yield _finding(
            "broker",
            "info",
            f"broker {mask_url(url)} is RabbitMQ: agent tasks are acknowledged at begin (a dead consumer's "
            "unstarted messages are redelivered by RabbitMQ; running agents hold no delivery, so "
            "consumer_timeout never closes their channel); run agent workers with -P threads",
        )


def check_leases(c: Checkup) -> Iterator[Finding]:
    s = c.settings
    lease = s.dispatch.lease_ttl_s
    if lease < MIN_LEASE_S:
        yield _finding(
            "lease",
            "warn",
            f"dispatch lease {lease:g}s is renewed every {lease / 3:.2g}s: a GC pause "
            f"or Redis failover longer than that re-dispatches a running issue; set "
            f"FACTORY_DISPATCH__LEASE_TTL_S >= {MIN_LEASE_S:g}",
        )
    w = s.worker
    if w.heartbeat_ttl_s <= w.heartbeat_interval_s:
        yield _finding(
            "worker-heartbeat",
            "warn",
            f"worker heartbeat TTL {w.heartbeat_ttl_s:g}s is not above "
            f"its interval {w.heartbeat_interval_s:g}s: live workers flicker out; set "
            f"FACTORY_WORKER__HEARTBEAT_TTL_S >= {2 * w.heartbeat_interval_s:g}",
        )
    lp = s.loop
    if lp.heartbeat_ttl_s <= lp.stale_after_s:
        yield _finding(
            "loop-heartbeat",
            "info",
            f"loop heartbeat TTL {lp.heartbeat_ttl_s:g}s <= stale_after "
            f"{lp.stale_after_s:g}s: a stuck loop reads as missing, never as stale; set "
            "FACTORY_LOOP__HEARTBEAT_TTL_S above FACTORY_LOOP__STALE_AFTER_S",
        )


def check_ledger(c: Checkup) -> Iterator[Finding]:
    lost = guard.status(c.r, c.ctx.keys)["lost"]
    if lost:
        yield _finding(
            "ledger-lost",
            "error",
            f"ledger lost: processes worked in generation "
            f"{', '.join(sorted(lost))}, which Redis no longer holds (emptied, evicted or a stale "
            "replica); they claim and start nothing: find the cause, then `factory-worker ledger accept`",
        )


def check_replicas(c: Checkup) -> Iterator[Finding]:
    """Replicas against ``dispatch.min_replica_acks``: with fewer connected replicas than that, no claim can
    be acknowledged, so nothing is dispatched; with none at all, a failover has nothing to promote."""
    info = _info(c.r, "replication")
    if info.get("role") not in (None, "master"):
        yield _finding(
            "replicas",
            "error",
            f"the ledger's Redis is a {info.get('role')}, not the primary: point "
            "FACTORY_REDIS_URL at the primary, or use sentinel://",
        )
        return
    connected = int(info.get("connected_slaves", 0) or 0)
    acks = c.settings.dispatch.min_replica_acks
    if acks > connected:
        yield _finding(
            "replicas",
            "error",
            f"dispatch.min_replica_acks is {acks} but the primary has {connected} "
            "connected replica(s): no claim can be acknowledged, nothing is dispatched; add replicas or "
            "lower FACTORY_DISPATCH__MIN_REPLICA_ACKS",
        )
    elif connected and not acks:
        yield _finding(
            "replicas",
            "info",
            f"{connected} replica(s), but dispatch.min_replica_acks is 0: a failover "
            "can lose the last claims and done markers; set FACTORY_DISPATCH__MIN_REPLICA_ACKS=1",
        )


def check_loop(c: Checkup) -> Iterator[Finding]:
    """Why the loop cannot make progress, as ``loop-status`` says it (:mod:`factory_worker.loop.reasons`: no
    worker on the loop queue, no live worker, no agent slot, the loop starved, no beat, the source failing...);
    a lost ledger and refused replica acknowledgements are the ``ledger-lost`` and ``replicas`` checks'. Only
    once the namespace has seen its fleet (a run, a worker, a kill or loop tasks waiting): before a deployment
    starts, the doctor checks its configuration alone."""
    from factory_worker.ops.operations import loop_status

    data, _ = loop_status(c.ctx)
    seen = (data["run"], data["heartbeat"], data["workers"], data["killed"])
    if not any(seen) and not data["loop_queue"]["waiting"]:
        return
    for code, why in zip(data["reason_codes"], data["reasons"]):
        if code in (Stuck.LEDGER_LOST, Stuck.REPLICA_ACKS):
            continue
        yield _finding(f"loop:{code}", "warn" if code == Stuck.KILLED else "error", why)


def check_agent_isolation(c: Checkup) -> Iterator[Finding]:
    """Agents run untrusted-steered code: they should run as their own user, with no secret in their env, in
    a PID namespace of their own (checked on this host: doctor may not run where the agent workers do)."""
    from factory_worker.agents.pidns import describe
    from factory_worker.agents.sandbox import resolve_identity, secret_like
    from factory_worker.config.settings import ConfigError

    agent = c.settings.agent
    leaks = [n for n in agent.env_allowlist if secret_like(n, os.environ.get(n))]
    if leaks:
        yield _finding(
            "agent-isolation",
            "warn",
            f"agent.env_allowlist passes names that look like secrets to "
            f"agents: {', '.join(leaks)}; issue text steers agents: remove them "
            "(FACTORY_AGENT__ENV_ALLOWLIST)",
        )
    contained, uncontained = describe(agent)
    if uncontained:  # a doctor that is not root cannot make one where a root agent worker could: a note then
        severity = "warn" if agent.pid_namespace == "off" or os.geteuid() == 0 else "info"
        yield _finding("agent-isolation", severity, f"{uncontained} (checked on this host, as uid {os.geteuid()})")
    try:
        ident = resolve_identity(agent)
    except ConfigError as exc:
        yield _finding("agent-isolation", "warn", f"{exc} (checked on this host)")
        return
    if ident is not None and ident.uid == 0:
        yield _finding(
            "agent-isolation",
            "warn",
            "agent.user is root: agents run as root, with every credential "
            "of the worker and the host; set FACTORY_AGENT__USER to an unprivileged user (e.g. nobody)",
        )
    elif ident is None and os.geteuid() == 0:
        yield _finding(
            "agent-isolation",
            "error",
            "agent.user is unset: an agent worker running as root (as this "
            "doctor does) refuses to run agents; set FACTORY_AGENT__USER to an unprivileged user (e.g. "
            "nobody), or to root to run them as root anyway",
        )
    elif ident is None or ident.uid == os.geteuid():
        yield _finding(
            "agent-isolation",
            "warn",
            "agents run as the worker's own user: they can read its "
            "environment (/proc/<pid>/environ: the Redis URL, tokens), config and env files; set "
            "FACTORY_AGENT__USER (e.g. nobody) and run agent workers as root",
        )
    elif not leaks:
        yield _finding(
            "agent-isolation",
            "info",
            f"agents run as {ident} in fresh directories under "
            f"{agent.workdir_root}, with {len(agent.env_allowlist)} allowlisted variable(s), {contained}",
        )


CHECKS: tuple[tuple[str, Callable[[Checkup], Iterator[Finding]]], ...] = (
    ("eviction", check_eviction),
    ("persistence", check_persistence),
    ("visibility-timeout", check_visibility),
    ("beat", check_beats),
    ("clock-skew", check_clock),
    ("broker", check_broker),
    ("leases", check_leases),
    ("ledger-lost", check_ledger),
    ("replicas", check_replicas),
    ("loop", check_loop),
    ("agent-isolation", check_agent_isolation),
)


def run_doctor(
    settings: Settings,
    *,
    client: redis.Redis | None = None,
    clock: Callable[[], float] = time.time,
    check_broker: bool = True,
) -> tuple[dict[str, Any], int]:
    """Run every check; returns (report, exit code 0 no problems / 1 problems). Redis down -> ConnectionError."""
    r = client or make_client(settings)
    r.ping()  # unreachable or wrong password: redis.ConnectionError / AuthenticationError -> exit 2
    checkup = Checkup(settings, r, Context(settings, redis_client=r), clock, check_broker)
    findings: list[Finding] = []
    for _name, check in CHECKS:
        findings.extend(check(checkup))
    server = _info(r, "server")
    problems = [x for x in findings if x["severity"] in PROBLEMS]
    data = {
        "redis_url": mask_url(settings.effective_redis_url),
        "broker_url": mask_url(settings.effective_broker_url),
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
        lines.append(
            f"doctor: {data['problems']} problem(s) ({by['error']} error(s), {by['warn']} warning(s), "
            f"{by['info']} note(s)); {where}"
        )
    else:
        lines.append(f"doctor: ok ({by['info']} note(s)); {where}")
    return "\n".join(lines)
