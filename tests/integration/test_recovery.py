"""The recovery commands need only Redis (issue 21, item 3): loop-status, kill-loop, pause and resume read only
their own settings, from wherever users put them (the environment, FACTORY_CONFIG, *_FILE, sentinel://), and
work when any other setting is invalid, the source is down or the broker unreachable; every other command still
refuses a bad setting (exit 2). Their early path (no redis-py, pydantic or click loaded) takes every form."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from factory_worker.context import Context
from factory_worker.ledger.keys import Keys
from factory_worker.ops.embedded import find_redis_server, free_port
from tests.support import ROOT, ctl, factory_env, settings_from, wait_until

pytestmark = pytest.mark.integration

BROKEN = {  # each breaks every other command
    "FACTORY_AGENT__COMMAND": "rm -rf / ; echo",
    "FACTORY_DISPATCH__LEASE_TTL_S": "-1",
    "FACTORY_SOURCE__KIND": "github",  # and no repository, no label filter
}


def secret(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o400)
    return str(path)


def live_run(redis_url: str, namespace: str) -> tuple[Context, str]:
    ctx = Context(settings_from(factory_env({"FACTORY_REDIS_URL": redis_url, "FACTORY_NAMESPACE": namespace})))
    kick = ctx.control.start_run(3, by="test")
    assert kick.started
    return ctx, kick.run_id


def early(env: dict[str, str], *args: str, cwd: Path = ROOT) -> tuple[int, str, bool]:
    """``ctl.main(args)`` in a fresh interpreter: (exit code, stdout, whether redis-py/pydantic/click got loaded)."""
    code = (
        "import sys\nfrom factory_worker.ctl import main\nrc = main(sys.argv[1:])\n"
        "heavy = sorted(m for m in ('redis', 'pydantic', 'click') if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\nsys.exit(rc)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    heavy = res.stderr.strip().splitlines()[-1].removeprefix("HEAVY=")
    return res.returncode, res.stdout, bool(heavy)


@pytest.fixture
def forms(redis_url, namespace, tmp_path) -> dict[str, dict[str, str]]:
    """The recovery commands' settings in each form users configure, each beside settings that are invalid."""
    toml = tmp_path / "factory.toml"
    toml.write_text(f'redis_url = "{redis_url}"\nnamespace = "{namespace}"\n[agent]\ncommand = "not a list"\n')
    toml.chmod(0o600)
    return {
        "env": factory_env({"FACTORY_REDIS_URL": redis_url, "FACTORY_NAMESPACE": namespace, **BROKEN}),
        "toml": factory_env({"FACTORY_CONFIG": str(toml), **BROKEN}),
        "file": factory_env(
            {
                "FACTORY_REDIS_URL_FILE": secret(tmp_path / "url", redis_url + "\n"),
                "factory_namespace": namespace,
                "FACTORY_LOOP": '{"stale_after_s": 30, "interval_s": "soon"}',
                **BROKEN,
            }
        ),
    }


@pytest.mark.parametrize("form", ["env", "toml", "file"])
def test_the_recovery_commands_work_whatever_else_is_invalid(form, forms, real_redis, redis_url, namespace):
    env = forms[form]
    one_line = ctl(env, "dispatches")  # every other command refuses
    assert one_line.returncode == 2 and len(one_line.stderr.strip().splitlines()) == 1, one_line.stderr
    ctx, run_id = live_run(redis_url, namespace)
    code, out, heavy = early(env, "loop-status", "--json")
    assert (code, json.loads(out)["liveness"], heavy) == (1, "live", False)  # no worker here: exit 1, by its reasons
    assert early(env, "pause") == (0, "paused\n", False)
    assert real_redis.hget(ctx.keys.paused, "by")
    assert early(env, "resume") == (0, "resumed\n", False)
    assert not real_redis.exists(ctx.keys.paused)
    res = ctl(env, "kill-loop", "--json")  # the early kill, then the full command with the settings it can use
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["killed"] == run_id and out["settings_error"]
    assert ctx.control.run(run_id)["status"] == "killed" and real_redis.hget(ctx.keys.kill, "run_id") == run_id
    assert "warning: " in res.stderr and "kill-loop used only the Redis URL, namespace and broker" in res.stderr
    data = json.loads(ctl(env, "loop-status", "--json").stdout)
    assert data["liveness"] == "killed"


def test_kill_loop_with_the_broker_unreachable_says_the_revoke_was_not_sent(real_redis, redis_url, namespace):
    env = factory_env(
        {
            "FACTORY_REDIS_URL": redis_url,
            "FACTORY_NAMESPACE": namespace,
            "FACTORY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
            "FACTORY_SOURCE__PATH": "/nonexistent/issues.jsonl",  # the source is down too
        }
    )
    ctx, run_id = live_run(redis_url, namespace)
    res = ctl(env, "kill-loop")
    assert res.returncode == 0, res.stderr
    assert f"killed run {run_id}" in res.stdout
    assert "the Celery revoke was not sent" in res.stderr and "the Redis kill holds" in res.stderr
    assert ctx.control.run(run_id)["status"] == "killed" and real_redis.exists(ctx.keys.kill)
    assert ctx.control.is_revoked(f"{run_id}-iter-0")  # the durable revoke list every iteration checks
    res = ctl({**env, "FACTORY_BROKER_URL": "ftp://nowhere"}, "kill-loop", "--force", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["celery_revoke_sent"] is False, res.stderr


@pytest.fixture
def sentinel(redis_url, tmp_path):
    """One ``redis-server --sentinel`` watching the session's server."""
    port, master = free_port(), "recovery-master"
    d = tmp_path / "sentinel"
    d.mkdir()
    (d / "sentinel.conf").write_text(
        f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {d}\n"
        f"sentinel monitor {master} 127.0.0.1 {redis_url.rsplit(':', 1)[1].split('/')[0]} 1\n"
    )
    proc = subprocess.Popen(
        [find_redis_server(), str(d / "sentinel.conf"), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    import redis

    def named() -> bool:
        try:
            return bool(redis.Redis(port=port, socket_timeout=1).sentinel_get_master_addr_by_name(master))
        except redis.RedisError:
            return False

    try:
        wait_until(named, 20, what="the sentinel naming the master")
        yield f"sentinel://127.0.0.1:{free_port()},127.0.0.1:{port}/{master}/0"  # the first sentinel is down
    finally:
        proc.terminate()
        proc.wait(10)


def test_through_sentinel_early(sentinel, real_redis, redis_url, namespace):
    env = factory_env({"FACTORY_REDIS_URL": sentinel, "FACTORY_NAMESPACE": namespace, **BROKEN})
    ctx, run_id = live_run(redis_url, namespace)
    code, out, heavy = early(env, "loop-status", "--json")
    assert (code, json.loads(out)["heartbeat"]["run_id"], heavy) == (1, run_id, False)
    assert early(env, "pause", "--json")[::2] == (0, False) and real_redis.exists(ctx.keys.paused)
    res = ctl(env, "kill-loop", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["killed"] == run_id, res.stderr
    assert Keys(namespace).kill and real_redis.hget(ctx.keys.kill, "run_id") == run_id


def test_a_user_limited_to_the_namespaces_keys_still_gets_an_answer(real_redis, redis_url, namespace):
    """An ACL that grants only ``{ns}:*`` keys refuses LLEN of the broker's queue: the count is then unknown."""
    user = f"ops-{namespace}"
    real_redis.execute_command("ACL", "SETUSER", user, "on", ">pw", f"~{{{namespace}}}:*", "+@all")
    try:
        limited = redis_url.replace("redis://", f"redis://{user}:pw@")
        env = factory_env({"FACTORY_REDIS_URL": limited, "FACTORY_NAMESPACE": namespace})
        live_run(redis_url, namespace)
        code, out, heavy = early(env, "loop-status", "--json")
        data = json.loads(out)
        assert (code, heavy, data["liveness"], data["loop_queue"]["waiting"]) == (1, False, "live", None)
        full = ctl({**env, "FACTORY_REDIS_URL": limited + "?socket_read_size=65536"}, "loop-status", "--json")
        assert full.returncode == 1 and json.loads(full.stdout)["loop_queue"]["waiting"] is None, full.stderr
    finally:
        real_redis.execute_command("ACL", "DELUSER", user)
