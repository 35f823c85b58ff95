"""Hosts for multi-host fault tests: Linux network namespaces joined to the root namespace by veth pairs.

Each host is a namespace ``fw-<pid>-<n>`` with its own /30 (``10.77.<o>.<4n+1>`` on the root side,
``<4n+2>`` inside); its agent worker reaches Redis through a :class:`~tests.delay_proxy.DelayProxy` listening
on the root-side address, so taking the root side of the veth down cuts that host alone off Redis and the
broker. Needs root and iproute2 (``ip``). Names carry the test process's pid: parallel runs do not collide,
and :func:`sweep_stale` removes what a killed run of a pid that no longer exists left behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import redis
from celery.app.defaults import NAMESPACES

from factory_worker.ops.embedded import RedisServer
from tests.delay_proxy import DelayProxy
from tests.support import CeleryProc, pid_alive, stack_env

# A worker whose processes are all busy still reserves up to its prefetch count of messages (Celery acks them
# early, on start), so one host may take 4 of 6 dispatches while another takes none. The faults here are to hit
# running agents on every host, so agent workers take only what they can start (Celery >= 5.6).
_NO_PREFETCH = ["--disable-prefetch"] if "disable_prefetch" in NAMESPACES["worker"] else []
_NAME = re.compile(r"^fw-(\d+)-\d+$")
_LINK = re.compile(r"^fw(\d+)-\d+r\b")


class NetnsUnavailable(RuntimeError):
    """This machine does not let us create a network namespace (e.g. a container without CAP_SYS_ADMIN)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=15)


@dataclass
class Host:
    """One network namespace ("host") and the root-side end of its veth."""

    name: str
    veth: str
    root_addr: str
    addr: str

    @property
    def prefix(self) -> list[str]:
        """argv that runs a command inside this host."""
        return ["ip", "netns", "exec", self.name]

    def cut(self) -> None:
        """The host loses the network: the root side of its veth goes down (packets dropped both ways)."""
        ip("link", "set", self.veth, "down")

    def heal(self) -> None:
        ip("link", "set", self.veth, "up")


def _free_octet(pid: int) -> int:
    """A third octet o such that no address of 10.77.o.0/24 is in use in the root namespace."""
    used = ip("-o", "-4", "addr", "show").stdout
    for attempt in range(250):
        octet = (pid + attempt) % 250 + 1
        if f" 10.77.{octet}." not in used:
            return octet
    raise RuntimeError("no free 10.77.x.0/24 for the test hosts")


def create_hosts(n: int) -> list[Host]:
    """``n`` namespaces, each with a veth pair and a /30; torn down with :func:`destroy_hosts`."""
    pid = os.getpid()
    octet = _free_octet(pid)
    hosts: list[Host] = []
    try:
        for i in range(n):
            h = Host(f"fw-{pid}-{i}", f"fw{pid}-{i}r", f"10.77.{octet}.{4 * i + 1}", f"10.77.{octet}.{4 * i + 2}")
            peer = f"fw{pid}-{i}n"
            added = ip("netns", "add", h.name, check=False)
            if added.returncode != 0:
                raise (NetnsUnavailable if i == 0 else RuntimeError)(added.stderr.strip() or "ip netns add failed")
            hosts.append(h)
            ip("link", "add", h.veth, "type", "veth", "peer", "name", peer)
            ip("link", "set", peer, "netns", h.name)
            ip("addr", "add", f"{h.root_addr}/30", "dev", h.veth)
            ip("link", "set", h.veth, "up")
            ip("-n", h.name, "addr", "add", f"{h.addr}/30", "dev", peer)
            ip("-n", h.name, "link", "set", peer, "up")
            ip("-n", h.name, "link", "set", "lo", "up")
    except BaseException:
        destroy_hosts(hosts)
        raise
    return hosts


def destroy_hosts(hosts: list[Host]) -> None:
    """Delete each host's veth (both ends go) and namespace; quiet about what is already gone."""
    for h in hosts:
        ip("link", "del", h.veth, check=False)
        ip("netns", "del", h.name, check=False)


def sweep_stale() -> None:
    """Remove namespaces and veths left by an earlier run whose process no longer exists."""
    for line in ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m and not pid_alive(int(m.group(1))):
            ip("netns", "del", name, check=False)
    for line in ip("-o", "link", "show").stdout.splitlines():
        m = _LINK.match(line.split(":", 2)[1].strip()) if line.count(":") >= 2 else None
        if m and not pid_alive(int(m.group(1))):
            ip("link", "del", m.group(0), check=False)


@dataclass
class Fleet:
    """Redis, beat and a loop-only worker in the root namespace; an agent-only worker in each host, reaching
    Redis through its own delay proxy. :meth:`close` removes all of it (processes, proxies, hosts, Redis)."""

    root: Path
    namespace: str
    n_hosts: int = 3
    delay_s: float = 0.003
    redis: RedisServer | None = None
    hosts: list[Host] = field(default_factory=list)
    proxies: list[DelayProxy] = field(default_factory=list)
    procs: list[CeleryProc] = field(default_factory=list)
    workers: dict[str, CeleryProc] = field(default_factory=dict)  # host name -> its agent worker
    clients: list[redis.Redis] = field(default_factory=list)

    def build(self) -> Fleet:
        sweep_stale()
        self.redis = RedisServer(self.root / "redis").start()
        self.hosts = create_hosts(self.n_hosts)
        for h in self.hosts:
            self.proxies.append(DelayProxy(h.root_addr, self.redis.port, self.delay_s).start())
        return self

    @property
    def url(self) -> str:
        assert self.redis is not None
        return self.redis.url

    def start(self, concurrency: int, **settings: str) -> dict[str, str]:
        """Start beat, the loop worker and one agent worker per host; returns the root namespace's env."""
        env = stack_env(self.url, self.namespace, self.root, **settings)
        self._add(CeleryProc("worker", env, self.root, "loop", extra=["-c", "1"], queues=[f"{self.namespace}.loop"]))
        self._add(CeleryProc("beat", env, self.root, "beat"))
        for h, proxy in zip(self.hosts, self.proxies):
            host_env = {**env, "FACTORY_REDIS_URL": f"redis://{h.root_addr}:{proxy.port}/0", "AGENT_HOST": h.name}
            self.workers[h.name] = self._add(
                CeleryProc(
                    "worker",
                    host_env,
                    self.root,
                    h.name,
                    extra=["-c", str(concurrency), *_NO_PREFETCH],
                    queues=[f"{self.namespace}.agents"],
                    prefix=h.prefix,
                )
            )
        for p in self.procs:
            p.wait_ready(60)
        return env

    def client(self) -> redis.Redis:
        """A client of Redis from the root namespace (closed with the fleet)."""
        assert self.redis is not None
        self.clients.append(self.redis.client())
        return self.clients[-1]

    def _add(self, proc: CeleryProc) -> CeleryProc:
        self.procs.append(proc)
        return proc

    def hold(self) -> None:
        """Nothing from any host reaches Redis until :meth:`release`."""
        for p in self.proxies:
            p.hold()

    def release(self) -> None:
        for p in self.proxies:
            p.release()

    def close(self) -> None:
        """Everything goes, in order, even if a step fails (the first error is raised at the end)."""
        steps = [
            self._thaw,
            *(lambda h=h: ip("link", "set", h.veth, "up", check=False) for h in self.hosts),
            *(lambda p=p: p.signal(signal.SIGTERM) for p in self.procs),  # all shut down at once
            *(lambda p=p: p.stop(timeout=20) for p in self.procs),
            *(p.stop for p in self.proxies),
            *(c.close for c in self.clients),
            lambda: destroy_hosts(self.hosts),
            lambda: self.redis and self.redis.stop(),
        ]
        errors = []
        for step in steps:
            try:
                step()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def _thaw(self) -> None:
        """A frozen Redis (SIGSTOP) would hang the workers' shutdown."""
        if self.redis is not None and self.redis.proc is not None and self.redis.proc.poll() is None:
            os.kill(self.redis.proc.pid, signal.SIGCONT)
