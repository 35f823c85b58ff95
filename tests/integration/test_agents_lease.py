"""Dead before the lease ends (issue 9): Redis stops answering while an agent runs; the agent's whole group
is gone before its claim could expire, however long the blocked Redis calls hang."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from factory_worker.agents import CommandAgent, Dispatch
from factory_worker.config.settings import load_settings
from factory_worker.ledger.core import Ledger
from factory_worker.ledger.keys import Keys
from factory_worker.ops.embedded import RedisServer
from factory_worker.sources.base import Issue
from tests.support import AGENT_USER, marked_alive, pid_alive

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

# An agent that writes its pid and then takes 0.5 s to die on SIGTERM (cleanup), with a child of its own.
AGENT = r"""
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", sys.argv[2]])
open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid}")
def on_term(*_):
    time.sleep(0.5)
    sys.exit(1)
signal.signal(signal.SIGTERM, on_term)
time.sleep(60)
"""


def test_a_frozen_redis_cannot_keep_an_agent_alive_past_its_lease(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        lease_s, grace_s = 3.0, 1.0
        s = load_settings(
            redis_url=server.url,
            namespace="keeper",
            dispatch={"lease_ttl_s": lease_s, "queue_lease_s": lease_s},
            agent={
                "term_grace_s": grace_s,
                "log_dir": str(tmp_path / "logs"),
                "workdir_root": str(tmp_path / "work"),
                **AGENT_USER,
            },
        )
        ledger = Ledger(server.client(), Keys("keeper"), s.dispatch)
        ledger.r.hset(ledger.keys.slots, "w@test", f"10:{2**53}")
        claim = ledger.claim(["F-1"]).claims[0]
        assert ledger.begin("F-1", claim.token, "agent-f1") == "started"
        agent_file, pids = tmp_path / "agent.py", tmp_path / "pids"
        agent_file.write_text(AGENT)
        mark = f"fw-lease-child-{os.getpid()}-{time.monotonic_ns()}"  # finds the child, in a PID namespace too
        settings = s.agent.model_copy(update={"command": [sys.executable, str(agent_file), str(pids), mark]})
        started: list[int] = []
        renews: list[float] = []

        def renew():
            sent = time.monotonic()
            ledger.renew("F-1", claim.token)  # blocks for the whole socket timeout once Redis is frozen
            renews.append(sent)

        frozen_at: list[float] = []

        def should_stop():
            if not frozen_at and len(renews) >= 1 and pids.exists():
                os.kill(server.proc.pid, signal.SIGSTOP)  # Redis stops answering (a partition, a pause)
                frozen_at.append(time.monotonic())
            return None

        began = time.monotonic()
        result = CommandAgent(settings, lease_s / 3, lease_s).run(
            Dispatch(Issue(id="F-1", title="t", state="ready"), claim.token, "agent-f1"),
            renew,
            should_stop,
            on_start=started.append,
        )
        gone_at = time.monotonic()
        assert pids.exists()  # the child had started
        assert result.outcome == "lease-lost" and "could not be renewed" in result.error
        assert not pid_alive(started[0]) and not marked_alive(mark)  # the whole group, the forked child too
        last_renew_sent = max(renews) if renews else began
        lease_end = last_renew_sent + lease_s  # the earliest the claim could expire in Redis
        assert gone_at < lease_end, f"agent outlived its lease by {gone_at - lease_end:.2f}s"
        print(
            f"dead {lease_end - gone_at:.2f}s before the lease could end "
            f"(frozen {gone_at - frozen_at[0]:.2f}s after the last renew)"
        )
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
