"""``factory-worker doctor`` against real redis-servers configured well and badly."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from factory_worker.context import Context
from factory_worker.loop.presence import beat_seen, clear_beat, publish_beat
from factory_worker.ops.doctor import format_report, run_doctor
from factory_worker.ops.embedded import RedisServer, free_port

log = logging.getLogger(__name__)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="agents as root, and their namespaces, need a root worker")


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start a dedicated redis-server: ``start_redis(appendonly=True, extra=[...])``."""
    started: list[RedisServer] = []

    def _start(appendonly: bool = False, extra: list[str] | None = None) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(started)}", appendonly=appendonly, extra=extra)
        started.append(server)
        return server.start()

    yield _start
    for s in started:
        s.stop()


@pytest.fixture
def make_settings(make_settings):
    """Agents run as their own user (agent.user) unless a test says otherwise, so the agent-isolation warning
    shows only where it is tested."""

    def _make(**overrides):
        overrides.setdefault("agent", {"command": ["true"], "user": "nobody"})
        return make_settings(**overrides)

    return _make


def good(start_redis: Callable[..., RedisServer]) -> RedisServer:
    return start_redis(appendonly=True, extra=["--maxmemory-policy", "noeviction"])


def by_check(data: dict, check: str) -> list[dict]:
    return [x for x in data["findings"] if x["check"] == check]


def cli(
    args: list[str], env: dict[str, str], timeout: float = 30, wrap: list[str] = ()
) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "factory-worker"
    argv = [*wrap, str(exe)] if exe.exists() else [*wrap, sys.executable, "-m", "factory_worker.ctl"]
    full = {k: v for k, v in os.environ.items() if not k.startswith("FACTORY_")} | env
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
    return subprocess.run(argv + args, check=False, env=full, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_good_config_exits_0(start_redis, make_settings) -> None:
    server = good(start_redis)
    data, code = run_doctor(make_settings(redis_url=server.url))  # broker = the same Redis
    assert code == 0, format_report(data)
    assert data["problems"] == 0 and not [x for x in data["findings"] if x["severity"] != "info"]
    assert "broker" in data["checks"] and data["redis_version"]
    report = format_report(data)
    assert report.splitlines()[-1].startswith("doctor: ok")


def test_good_config_cli_exits_0(start_redis, namespace) -> None:
    server = good(start_redis)
    proc = cli(
        ["doctor"], {"FACTORY_REDIS_URL": server.url, "FACTORY_NAMESPACE": namespace, "FACTORY_AGENT__USER": "nobody"}
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("doctor: ok")


@pytest.mark.parametrize(
    "policy,severity",
    [("allkeys-lru", "error"), ("allkeys-random", "error"), ("volatile-lru", "warn"), ("volatile-ttl", "warn")],
)
def test_eviction_policy_that_drops_ledger_keys(start_redis, make_settings, policy, severity) -> None:
    server = start_redis(appendonly=True, extra=["--maxmemory-policy", policy, "--maxmemory", "100mb"])
    data, code = run_doctor(make_settings(redis_url=server.url))
    (ctx,) = by_check(data, "eviction")
    assert code == 1 and ctx["severity"] == severity
    assert policy in ctx["message"] and "noeviction" in ctx["message"]


def test_no_persistence(start_redis, make_settings) -> None:
    server = start_redis(appendonly=False)  # RedisServer also passes --save ""
    data, code = run_doctor(make_settings(redis_url=server.url))
    (ctx,) = by_check(data, "persistence")
    assert code == 1 and ctx["severity"] == "warn" and "appendonly yes" in ctx["message"]


def test_rdb_only_is_a_note(start_redis, make_settings) -> None:
    server = start_redis(appendonly=False, extra=["--save", "60 1"])
    data, code = run_doctor(make_settings(redis_url=server.url))
    (ctx,) = by_check(data, "persistence")
    assert code == 0 and ctx["severity"] == "info" and "RDB" in ctx["message"]


def test_config_disabled_is_unknown_not_a_crash(start_redis, make_settings) -> None:
    server = start_redis(appendonly=False, extra=["--rename-command", "CONFIG", ""])
    data, code = run_doctor(make_settings(redis_url=server.url))
    assert by_check(data, "eviction") == []  # read from INFO instead: noeviction
    (ctx,) = by_check(data, "persistence")
    assert ctx["severity"] == "info" and "unknown" in ctx["message"] and code == 0
    server2 = start_redis(extra=["--rename-command", "CONFIG", "", "--rename-command", "INFO", ""])
    data, code = run_doctor(make_settings(redis_url=server2.url))
    assert [x["severity"] for x in by_check(data, "eviction")] == ["info"]
    assert "unknown" in by_check(data, "eviction")[0]["message"] and code == 0


def test_visibility_timeout_shorter_than_agent_timeout(start_redis, make_settings, tmp_path) -> None:
    server = good(start_redis)
    s = make_settings(
        redis_url=server.url,
        worker={"visibility_timeout_s": 60, "soft_shutdown_s": 20},
        agent={"command": ["true"], "log_dir": str(tmp_path), "timeout_s": 600},
    )
    data, code = run_doctor(s)
    (ctx,) = by_check(data, "visibility-timeout")
    assert code == 1 and "FACTORY_WORKER__VISIBILITY_TIMEOUT_S" in ctx["message"] and "620" in ctx["message"]


def test_two_beats_are_reported(start_redis, make_settings) -> None:
    server = good(start_redis)
    s = make_settings(redis_url=server.url)
    ctx = Context(s)
    publish_beat(ctx, "host-a", 101)
    data, code = run_doctor(s)
    assert code == 0 and by_check(data, "beat") == []
    publish_beat(ctx, "host-b", 202)
    assert [b["node"] for b in beat_seen(ctx)] == ["host-a/101", "host-b/202"]
    data, code = run_doctor(s)
    (finding,) = by_check(data, "beat")
    assert code == 1 and "2 beats" in finding["message"] and "host-b/202" in finding["message"]
    clear_beat(ctx, "host-b", 202)
    assert run_doctor(s)[1] == 0
    assert ctx.redis.pttl(ctx.keys.beat("host-a/101")) > 0  # presence expires by itself


def test_beat_host_clock_skew(start_redis, make_settings) -> None:
    server = good(start_redis)
    s = make_settings(redis_url=server.url)
    ctx = Context(s)
    key = publish_beat(ctx, "skewed", 7)
    rec = json.loads(ctx.redis.get(key))
    rec["host_ms"] = rec["updated_ms"] + 5000
    ctx.redis.set(key, json.dumps(rec), px=30_000)
    data, code = run_doctor(s)
    (finding,) = by_check(data, "clock-skew")
    assert code == 1 and "skewed/7" in finding["message"] and "+5.0s" in finding["message"]


def test_local_clock_skew(start_redis, make_settings) -> None:
    server = good(start_redis)
    s = make_settings(redis_url=server.url)
    assert run_doctor(s, clock=time.time)[1] == 0
    data, code = run_doctor(s, clock=lambda: time.time() - 3.0)
    (finding,) = by_check(data, "clock-skew")
    assert code == 1 and "-3.0s" in finding["message"]


def test_unreachable_broker(start_redis, make_settings) -> None:
    server = good(start_redis)
    s = make_settings(redis_url=server.url, broker_url=f"redis://:secret@127.0.0.1:{free_port()}/0")
    t0 = time.monotonic()
    data, code = run_doctor(s)
    assert time.monotonic() - t0 < 15
    (finding,) = by_check(data, "broker")
    assert code == 1 and finding["severity"] == "error" and "FACTORY_BROKER_URL" in finding["message"]
    assert "secret" not in json.dumps(data) and "***" in finding["message"]


def test_lease_and_heartbeat_sanity(start_redis, make_settings) -> None:
    server = good(start_redis)
    s = make_settings(
        redis_url=server.url,
        dispatch={"lease_ttl_s": 1},
        agent={"term_grace_s": 0.2, "command": ["true"]},  # settings load; the doctor still warns
        worker={"heartbeat_interval_s": 5, "heartbeat_ttl_s": 5},
        loop={"interval_s": 10, "stale_after_s": 60, "heartbeat_ttl_s": 30},
    )
    data, code = run_doctor(s)
    assert code == 1
    assert "FACTORY_DISPATCH__LEASE_TTL_S" in by_check(data, "lease")[0]["message"]
    assert by_check(data, "worker-heartbeat")[0]["severity"] == "warn"
    assert by_check(data, "loop-heartbeat")[0]["severity"] == "info"


def test_report_lines_and_json_cli(start_redis, namespace) -> None:
    server = start_redis(appendonly=False, extra=["--maxmemory-policy", "allkeys-lru"])
    env = {"FACTORY_REDIS_URL": server.url, "FACTORY_NAMESPACE": namespace, "FACTORY_AGENT__USER": "nobody"}
    proc = cli(["doctor"], env)
    # (not root: a note that this doctor cannot make the agents' PID namespaces; a root agent worker can)
    lines = [x for x in proc.stdout.strip().splitlines() if not x.startswith("INFO  agent-isolation: agents cannot")]
    assert proc.returncode == 1 and len(lines) == 4, proc.stdout  # 2 problems + the isolation note + the summary
    assert lines[0].startswith("ERROR eviction:") and lines[1].startswith("WARN  persistence:")
    assert lines[2].startswith("INFO  agent-isolation: agents run as nobody")
    assert lines[3].startswith("doctor: 2 problem(s)")
    proc = cli(["doctor", "--json"], env)
    data = json.loads(proc.stdout)
    assert proc.returncode == 1 and data["problems"] == 2 and data["exit"] == 1
    assert {x["check"] for x in data["findings"]} == {"eviction", "persistence", "agent-isolation"}


def test_agents_as_the_workers_own_user_are_a_warning(start_redis, make_settings) -> None:
    """As root it is an error: a root agent worker with agent.user unset refuses to run agents."""
    server = good(start_redis)
    data, code = run_doctor(make_settings(redis_url=server.url, agent={"command": ["true"]}))
    [finding] = [x for x in by_check(data, "agent-isolation") if "FACTORY_AGENT__USER" in x["message"]]
    assert code == 1 and finding["severity"] == ("error" if os.geteuid() == 0 else "warn")


@needs_root
def test_agents_as_root_when_written_are_a_warning_and_a_namespace_is_noted(start_redis, make_settings) -> None:
    server = good(start_redis)
    data, code = run_doctor(make_settings(redis_url=server.url, agent={"command": ["true"], "user": "root"}))
    [finding] = by_check(data, "agent-isolation")
    assert code == 1 and finding["severity"] == "warn" and "agents run as root" in finding["message"]
    data, code = run_doctor(make_settings(redis_url=server.url))  # agents as nobody, in their own namespaces
    [finding] = by_check(data, "agent-isolation")
    assert code == 0 and finding["severity"] == "info" and "own PID namespace" in finding["message"]


def test_agents_without_a_pid_namespace_are_reported(start_redis, make_settings, namespace) -> None:
    """agent.pid_namespace = off is a warning; so is a root doctor that cannot make one (no CAP_SYS_ADMIN,
    as in a container), each naming FACTORY_AGENT__PID_NAMESPACE (a doctor that is not root: a note)."""
    server = good(start_redis)
    data, code = run_doctor(
        make_settings(redis_url=server.url, agent={"command": ["true"], "user": "nobody", "pid_namespace": "off"})
    )
    [finding] = [x for x in by_check(data, "agent-isolation") if "FACTORY_AGENT__PID_NAMESPACE" in x["message"]]
    assert code == 1 and finding["severity"] == "warn" and "outlive it" in finding["message"]
    env = {"FACTORY_REDIS_URL": server.url, "FACTORY_NAMESPACE": namespace, "FACTORY_AGENT__USER": "nobody"}
    drop = [shutil.which("setpriv") or "setpriv", "--bounding-set=-sys_admin", "--"] if os.geteuid() == 0 else []
    proc = cli(["doctor", "--json"], env, wrap=drop)
    findings = [x for x in json.loads(proc.stdout)["findings"] if "PID namespace here" in x["message"]]
    assert len(findings) == 1 and "FACTORY_AGENT__PID_NAMESPACE" in findings[0]["message"], proc.stdout
    assert findings[0]["severity"] == ("warn" if os.geteuid() == 0 else "info")
    assert "CAP_SYS_ADMIN" in findings[0]["message"]


def test_unreachable_redis_exits_2_with_one_line(namespace) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    proc = cli(["doctor"], {"FACTORY_REDIS_URL": url, "FACTORY_NAMESPACE": namespace})
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach Redis" in lines[0] and "Traceback" not in proc.stderr


def test_run_doctor_raises_connection_error_when_redis_is_down(make_settings) -> None:
    import redis

    with pytest.raises(redis.ConnectionError):
        run_doctor(make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))


def test_replica_acks_without_enough_replicas_is_an_error(start_redis, make_settings) -> None:
    server = good(start_redis)
    data, code = run_doctor(make_settings(redis_url=server.url, dispatch={"min_replica_acks": 1}))
    (finding,) = by_check(data, "replicas")
    assert code == 1 and finding["severity"] == "error" and "0 connected replica" in finding["message"]


def test_a_replica_as_the_ledger_is_an_error_and_a_replica_without_acks_a_note(start_redis, make_settings) -> None:
    primary = good(start_redis)
    replica = start_redis(
        appendonly=True, extra=["--maxmemory-policy", "noeviction", "--replicaof", "127.0.0.1", str(primary.port)]
    )
    wait = time.monotonic() + 15
    while primary.client().info("replication")["connected_slaves"] < 1 and time.monotonic() < wait:
        time.sleep(0.1)
    data, code = run_doctor(make_settings(redis_url=primary.url), check_broker=False)
    (finding,) = by_check(data, "replicas")
    assert code == 0 and finding["severity"] == "info" and "MIN_REPLICA_ACKS=1" in finding["message"]
    data, code = run_doctor(make_settings(redis_url=replica.url), check_broker=False)
    assert code == 1 and "not the primary" in by_check(data, "replicas")[0]["message"]


def test_a_rabbitmq_broker_is_checked_and_explained(start_redis, make_settings, amqp_broker) -> None:
    """doctor connects to the AMQP broker: reachable -> a note on what RabbitMQ means (no error); a dead port
    -> the broker error, password masked."""
    server = good(start_redis)
    data, code = run_doctor(make_settings(redis_url=server.url, broker_url=amqp_broker))
    (finding,) = by_check(data, "broker")
    assert finding["severity"] == "info" and "acknowledged at begin" in finding["message"]
    assert "guest:guest" not in json.dumps(data)
    dead = f"amqp://guest:secret@127.0.0.1:{free_port()}/x"
    t0 = time.monotonic()
    data, code = run_doctor(make_settings(redis_url=server.url, broker_url=dead))
    assert time.monotonic() - t0 < 15
    (finding,) = by_check(data, "broker")
    assert code == 1 and finding["severity"] == "error" and "RabbitMQ" in finding["message"]
    assert "secret" not in json.dumps(data)
