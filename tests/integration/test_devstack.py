"""``factory-worker up`` keeps its secrets: the embedded Redis has a password (kept 0600, reused), its files are
private, Flower's credentials reach Flower alone through its environment, and nothing secret is printed."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from factory_worker.config.settings import Settings
from factory_worker.config.urls import mask_url
from factory_worker.ops import devstack
from tests.support import ctl, factory_env, wait_until

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.integration]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_embedded_redis_has_a_private_reused_password(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    devstack.state_dir()
    server = devstack.start_embedded_redis()
    try:
        password = (tmp_path / ".factory/redis.password").read_text().strip()
        url = (tmp_path / ".factory/redis.url").read_text().strip()
        assert len(password) >= 32 and url == server.url and password in url
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, socket_timeout=2).set("k", "v")
        server.client().set("k", "v")
    finally:
        server.stop()
    out = capsys.readouterr().out
    assert password not in out and mask_url(url) in out and ".factory/redis.url" in out
    again = devstack.start_embedded_redis()  # the next `up`: same password, same data
    try:
        assert again.password == password and again.client().get("k") == "v"
    finally:
        again.stop()
    assert _mode(tmp_path / ".factory") == 0o711
    for name in ("redis.password", "redis.url"):
        assert _mode(tmp_path / ".factory" / name) == 0o600, name
    data = tmp_path / ".factory/redis"
    assert _mode(data) == 0o700
    found = list(data.rglob("*"))
    assert any(p.name.endswith(".aof") for p in found), found
    for p in found:
        assert _mode(p) == (0o700 if p.is_dir() else 0o600), p


def test_a_world_readable_leftover_is_tightened(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    devstack.state_dir()
    (tmp_path / ".factory/redis").mkdir(mode=0o755)
    (tmp_path / ".factory/redis/redis.log").write_text("old\n")
    os.chmod(tmp_path / ".factory/redis/redis.log", 0o644)
    (tmp_path / ".factory/redis.url").write_text("redis://:old@127.0.0.1:1/0\n")
    os.chmod(tmp_path / ".factory/redis.url", 0o644)
    server = devstack.start_embedded_redis()
    server.stop()
    assert _mode(tmp_path / ".factory/redis") == 0o700 and _mode(tmp_path / ".factory/redis/redis.log") == 0o600
    assert _mode(tmp_path / ".factory/redis.url") == 0o600


def test_flower_credentials_go_to_flower_alone_through_its_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    devstack.state_dir()
    creds, where = devstack.flower_auth()
    user, _, password = creds.partition(":")
    assert user == devstack.FLOWER_USER and len(password) >= 16 and password not in where
    assert _mode(tmp_path / ".factory/flower.env") == 0o600
    assert devstack.flower_auth()[0] == creds  # reused by the next `up`
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "me:given")
    assert devstack.flower_auth()[0] == "me:given"
    for name in ("loop", "worker1", "beat"):  # agents inherit their worker's environment
        assert "FLOWER_BASIC_AUTH" not in devstack.child_env(name, "redis://x", creds)
    assert devstack.child_env("flower", "redis://x", creds)["FLOWER_BASIC_AUTH"] == creds
    cmds = devstack.stack_commands(Settings(), flower=True, workers=1, concurrency=1)
    assert not any("basic-auth" in a or password in a for argv in cmds.values() for a in argv)


def _up_env(tmp_path: Path) -> dict[str, str]:
    issues = tmp_path / "issues.jsonl"
    issues.write_text(json.dumps({"id": "UP-1", "title": "t", "state": "ready"}) + "\n")
    return factory_env(
        {
            "FACTORY_SOURCE__PATH": str(issues),
            "FACTORY_LOOP__INTERVAL_S": "1",
            "FACTORY_LOOP__STALE_AFTER_S": "10",
            "FACTORY_AGENT__COMMAND": json.dumps([sys.executable, "-c", "pass"]),
            "FACTORY_AGENT__LOG_DIR": str(tmp_path / "logs"),
            "FACTORY_WORKER__SOFT_SHUTDOWN_S": "2",
        }
    )


@pytest.mark.e2e
def test_up_runs_prints_no_secret_and_the_cli_works_from_the_url_file(tmp_path):
    env = _up_env(tmp_path)
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "factory_worker.ctl", "up", "--no-flower"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: "[status] loop live" in log_path.read_text() or proc.poll() is not None,
            60,
            what="up reports a live loop",
        )
        assert proc.poll() is None, log_path.read_text()
        url = (tmp_path / ".factory/redis.url").read_text().strip()
        status = ctl({**env, "FACTORY_REDIS_URL": url}, "loop-status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert mask_url(url) in status.stdout and redis.Redis.from_url(url).get("nothing") is None
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(60)
    text = log_path.read_text()
    password = (tmp_path / ".factory/redis.password").read_text().strip()
    assert code == 0 and password not in text and password not in status.stdout + status.stderr, text[-2000:]
    assert "embedded Redis stopped" in text
    # as root with agent.user unset, up says its agents run as root (its workers get agent.user = root, which
    # a root worker requires: without it they would refuse to run agents and up would stop)
    assert ("agents run as root too" in text) == (os.geteuid() == 0)


def test_up_writes_agent_user_root_for_its_workers_only_when_root_left_it_unset(monkeypatch):
    from factory_worker.config.settings import load_settings

    for name in [n for n in os.environ if n.startswith("FACTORY_")]:
        monkeypatch.delenv(name)
    unset, nobody = load_settings(), load_settings(agent={"user": "nobody"})
    assert devstack.agents_as_root(unset) == (os.geteuid() == 0) and not devstack.agents_as_root(nobody)
    assert devstack.child_env("worker1", "redis://x", None, True)["FACTORY_AGENT__USER"] == "root"
    assert "FACTORY_AGENT__USER" not in devstack.child_env("worker1", "redis://x", None, False)


def test_a_second_ctrl_c_forces_the_stop_and_says_so(monkeypatch, capsys):
    """`up`'s shutdown: SIGTERM to each child's group; a second Ctrl-C sends SIGKILL, says so, and returns True
    (run_stack then exits 130, not 0)."""
    import threading

    stubborn = subprocess.Popen(
        ["sh", "-c", 'trap "" TERM; echo ready; exec sleep 30'],
        start_new_session=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert stubborn.stdout.readline().strip() == "ready"  # SIGTERM is ignored from here on
        monkeypatch.setattr(devstack._Flags, "stop", 1)
        threading.Timer(0.5, lambda: setattr(devstack._Flags, "stop", 2)).start()  # the second Ctrl-C
        assert devstack._shutdown({"worker1": stubborn}, grace_s=30) is True
        assert stubborn.poll() == -signal.SIGKILL
        assert "[up] forced by a second Ctrl-C: SIGKILL to worker1" in capsys.readouterr().out
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
            stubborn.wait()
        stubborn.stdout.close()
