"""A Redis Sentinel deployment on loopback for tests: a primary, a replica and three sentinels, each a real
``redis-server`` process (sentinels run as ``redis-server <conf> --sentinel``)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis

from factory_worker.ops.embedded import RedisServer, find_redis_server, free_port
from harness import wait_until

MASTER = "factory-master"


def replica_acks(client: redis.Redis) -> bool:
    """True once a replica acknowledges a write made now (a write and WAIT on one connection)."""
    pipe = client.pipeline(transaction=False)
    pipe.set("replica-ack-probe", "1").execute_command("WAIT", 1, 200)
    return pipe.execute()[-1] >= 1


class SentinelCluster:
    """Primary + replica + ``n_sentinels`` sentinels (quorum 2, down after 2 s) under ``directory``.

    Down after 2 s, not 1: sentinels ping every second, and with a 1 s window a master just promoted could be
    judged down before its first ping was answered; on a loaded CI machine that started a second failover
    back to the old primary, restarted empty, and Redis lost the ledger.
    """

    def __init__(self, directory: Path, n_sentinels: int = 3, down_after_ms: int = 2000) -> None:
        self.directory = Path(directory)
        self.primary = RedisServer(self.directory / "primary", extra=["--repl-diskless-sync-delay", "0"])
        self.replica = RedisServer(
            self.directory / "replica", extra=["--replicaof", "127.0.0.1", str(self.primary.port)]
        )
        self.sentinel_ports = [free_port() for _ in range(n_sentinels)]
        self.down_after_ms = down_after_ms
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"sentinel://{hosts}/{MASTER}/0"

    def start(self) -> SentinelCluster:
        self.primary.start()
        self.replica.start()
        wait_until(lambda: replica_acks(self.primary.client()), 15, what="replica acknowledging")
        for port in self.sentinel_ports:
            d = self.directory / f"sentinel-{port}"
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "sentinel.conf"  # sentinel rewrites its config: a file of its own, writable
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {d}\nlogfile {d / 'sentinel.log'}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    [find_redis_server(), str(conf), "--sentinel"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        for port in self.sentinel_ports:
            wait_until(lambda port=port: self._sentinel_sees_replica(port), 20, what=f"sentinel {port} ready")
        return self

    def _sentinel_sees_replica(self, port: int) -> bool:
        try:
            c = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=2)
            return bool(c.sentinel_slaves(MASTER)) and len(c.sentinel_sentinels(MASTER)) >= len(self.sentinels) - 1
        except redis.RedisError:
            return False

    def master_port(self) -> int | None:
        """The master's port as the first answering sentinel sees it."""
        for port in self.sentinel_ports:
            try:
                c = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=2)
                return int(c.sentinel_get_master_addr_by_name(MASTER)[1])
            except (redis.RedisError, TypeError):
                continue
        return None

    def wait_failover(self, timeout_s: float = 30) -> float:
        """Wait until the sentinels name the replica as master; returns the seconds it took."""
        t0 = time.monotonic()
        wait_until(lambda: self.master_port() == self.replica.port, timeout_s, what="sentinel failover")
        return time.monotonic() - t0

    def rejoin_old_primary(self, timeout_s: float = 20) -> None:
        """Restart the killed primary as a replica of the promoted one, as the configuration Sentinel rewrites
        on a failover would (these servers keep no config file), and wait until it acknowledges a write.
        Restarted as a master instead, it is an empty candidate for the next failover."""
        base = list(self.primary.extra)
        self.primary.extra = [*base, "--replicaof", "127.0.0.1", str(self.replica.port)]
        try:
            self.primary.start()
        finally:
            self.primary.extra = base
        wait_until(lambda: replica_acks(self.replica.client()), timeout_s, what="old primary replicating")

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.sentinels:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.replica.stop()
        self.primary.stop()

    def __enter__(self) -> SentinelCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
