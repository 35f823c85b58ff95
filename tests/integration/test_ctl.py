"""The control CLI as users run it: subprocesses, exit codes, one-line errors, --json everywhere."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from factory_worker.cli.quick import kill_first
from factory_worker.context import Context
from factory_worker.ledger.core import Ledger
from factory_worker.ledger.keys import Keys
from factory_worker.loop.kill import kill_record
from factory_worker.ops.embedded import free_port
from tests.conftest import roomy_fleet
from tests.support import ROOT, ctl, factory_env, pid_alive, settings_from, stack_env, wait_until, write_issues

pytestmark = pytest.mark.integration


@pytest.fixture
def env(redis_url, real_redis, namespace, tmp_path):
    write_issues(
        tmp_path / "issues.jsonl",
        [
            {"id": "C-1", "title": "one", "state": "ready"},
            {"id": "C-2", "title": "two", "state": "ready"},
        ],
    )
    roomy_fleet(real_redis, Keys(namespace))  # explain answers for a fleet with room (no worker runs here)
    return stack_env(redis_url, namespace, tmp_path)


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ["loop-status"],
        ["kill-loop"],
        ["dispatches"],
        ["explain", "X"],
        ["retry", "X"],
        ["pause"],
        ["run-once", "--dry-run"],
        ["start-loop"],
    ],
)
def test_unreachable_redis_is_one_line_and_exit_2(args, tmp_path):
    env = factory_env({"FACTORY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    line = one_line_error(ctl(env, *args))
    assert "Redis" in line


def test_with_json_an_error_is_also_a_json_object_on_stdout(env, tmp_path):
    """A script reading stdout of a --json command gets an object even on failure (the line stays on stderr)."""
    down = factory_env({"FACTORY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    for res in (
        ctl(down, "dispatches", "--json"),
        ctl({**env, "FACTORY_LOOP__INTERVAL_S": "abc"}, "explain", "X", "--json"),
        ctl(env, "dispatches", "--state", "bogus", "--json"),
    ):
        line = one_line_error(res)
        assert json.loads(res.stdout) == {"error": line.removeprefix("factory-worker: "), "exit": 2}
    assert ctl(down, "dispatches").stdout == ""  # without --json, stdout stays empty


def test_bad_config_and_bad_arguments_are_one_line_and_exit_2(env):
    """(loop-status, kill-loop, pause and resume need only their own settings: test_recovery.py.)"""
    line = one_line_error(ctl({**env, "FACTORY_DISPATCH__LEASE_TTL_S": "-1"}, "dispatches"))
    assert "dispatch.lease_ttl_s" in line and "FACTORY_DISPATCH__LEASE_TTL_S" in line
    line = one_line_error(ctl({**env, "FACTORY_AGENT__COMMAND": "rm -rf / ; echo"}, "explain", "C-1"))
    assert "agent.command" in line
    line = one_line_error(ctl({**env, "FACTORY_LOOP__STALE_AFTER_S": "soon"}, "loop-status"))  # one of its own
    assert "loop.stale_after_s" in line and "FACTORY_LOOP__STALE_AFTER_S" in line
    assert "state" in one_line_error(ctl(env, "dispatches", "--state", "bogus"))
    assert one_line_error(ctl(env, "start-loop", "--max-iterations", "0"))
    assert one_line_error(ctl(env, "no-such-command"))


def test_status_explain_dispatches_retry_pause(env, real_redis):
    status = ctl(env, "loop-status", "--json")
    assert status.returncode == 1  # nothing live yet
    assert json.loads(status.stdout)["liveness"] == "missing"
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    claim = ledger.claim(["C-1"]).claims[0]
    for _ in range(3):
        ledger.fail("C-1", claim.token, "boom")
        if ledger.explain("C-1").state == "parked":
            break
        real_redis.zadd(ledger.keys.backoff, {"C-1": 0})  # let the window pass
        claim = ledger.claim(["C-1"]).claims[0]
    explained = json.loads(ctl(env, "explain", "C-1", "--json").stdout)
    assert explained["state"] == "parked" and explained["detail"]["last_error"] == "boom"
    human = ctl(env, "explain", "C-1")
    assert human.returncode == 0 and "parked after 3 attempts" in human.stdout
    parked = json.loads(ctl(env, "dispatches", "--state", "parked", "--json").stdout)
    assert [e["issue"] for e in parked] == ["C-1"]
    assert ctl(env, "dispatches").returncode == 0
    assert json.loads(ctl(env, "retry", "C-1", "--json").stdout)["was_parked"] is True
    assert ledger.explain("C-1").state == "claimable"
    assert ctl(env, "pause").returncode == 0
    assert json.loads(ctl(env, "loop-status", "--json").stdout)["paused"]["by"]
    assert json.loads(ctl(env, "run-once", "--json").stdout)["dispatched"] == 0
    assert ctl(env, "resume").returncode == 0
    assert json.loads(ctl(env, "loop-status", "--json").stdout)["paused"] is None


def test_retry_of_a_done_issue_is_refused(env, real_redis):
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    claim = ledger.claim(["C-2"]).claims[0]
    ledger.complete("C-2", claim.token)
    line = one_line_error(ctl(env, "retry", "C-2"))
    assert line == "factory-worker: error: issue 'C-2' is done; done is final and cannot be retried"


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [d for k in kids for d in descendants(k)]


def test_up_runs_the_example_loop_and_stops_cleanly_on_ctrl_c(tmp_path):
    """`factory-worker up` with no FACTORY_REDIS_URL: embedded Redis, loop worker, worker, beat; Ctrl-C stops all."""
    work = tmp_path / "proj"
    (work / "examples").mkdir(parents=True)
    for name in ("issues.jsonl", "agent.py"):
        (work / "examples" / name).write_text((ROOT / "examples" / name).read_text())
    env = factory_env(
        {
            "FACTORY_LOOP__INTERVAL_S": "1",
            "FACTORY_LOOP__STALE_AFTER_S": "10",
            "FACTORY_DISPATCH__BACKOFF_BASE_S": "1",
            "FACTORY_DISPATCH__BACKOFF_MAX_S": "2",
            "FACTORY_AGENT__COMMAND": json.dumps([sys.executable, "examples/agent.py", "{id}"]),
            "FACTORY_WORKER__SOFT_SHUTDOWN_S": "3",
            "FACTORY_AGENT_SLEEP_S": "0.1",
        }
    )
    log = open(tmp_path / "up.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "factory_worker.ctl", "up", "--no-flower"],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: "parked=1" in (tmp_path / "up.log").read_text(),
            90,
            interval=0.5,
            what="the failing example issue parked",
        )
        text = (tmp_path / "up.log").read_text()
        assert "embedded Redis at redis://:***@127.0.0.1:" in text  # its password never printed
        assert "[loop]" in text and "[worker1]" in text and "[beat]" in text and "[status] loop live" in text
        assert "done=9" in text or "done=10" in text
        assert (work / ".factory" / "redis").is_dir()
        children = descendants(proc.pid)
        assert len(children) >= 4  # redis-server, worker + its pool, beat
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 3 + 10
        assert "embedded Redis stopped" in (tmp_path / "up.log").read_text()
        wait_until(lambda: not any(pid_alive(p) for p in children), 5, what="every child gone")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_eligibility_rules_through_the_cli(env):
    ruled = {**env, "FACTORY_SOURCE__TITLE_PREFIX": "one"}
    res = ctl(ruled, "explain", "C-2")
    assert res.returncode == 0 and res.stdout.strip() == (
        'C-2: out-of-scope: title lacks prefix "one" (the ledger alone says: claimable)'
    )
    assert json.loads(ctl(ruled, "explain", "C-1", "--json").stdout)["state"] == "claimable"
    report = json.loads(ctl(ruled, "run-once", "--dry-run", "--json").stdout)
    assert [d["issue"] for d in report["dispatches"]] == ["C-1"]
    assert report["ruled_out"] == {'out of scope: title lacks prefix "one"': 1}
    assert "left out by the eligibility rules" in ctl(ruled, "run-once", "--dry-run").stdout
    line = one_line_error(
        ctl({**env, "FACTORY_SOURCE__KIND": "github", "FACTORY_SOURCE__GITHUB_REPO": "o/r"}, "explain", "C-1")
    )
    assert "FACTORY_SOURCE__GITHUB_LABELS" in line and "FACTORY_SOURCE__GITHUB_ALL_OPEN_ISSUES" in line
    line = one_line_error(ctl({**env, "FACTORY_SOURCE__ID_PATTERN": "C-("}, "dispatches"))
    assert line.startswith("factory-worker: invalid setting source.id_pattern (FACTORY_SOURCE__ID_PATTERN): ")


# -- kill-loop's early kill (quick.py) ----------------------------------------------------------------------
def _live_run(env: dict[str, str]) -> tuple[Context, str]:
    ctx = Context(settings_from(env))
    kick = ctx.control.start_run(3, by="test")
    assert kick.started
    return ctx, kick.run_id


def test_kill_loop_writes_the_kill_before_the_full_cli_loads(env, real_redis):
    ctx, run_id = _live_run(env)
    early = kill_first(["kill-loop", "--json"], env, ROOT)
    assert early is not None and early.run_id == run_id
    assert real_redis.hgetall(ctx.keys.kill) == kill_record(run_id, early.by, early.at_ms)
    assert ctx.control.start_run(3).started is False  # beat's next kickoff sees it at once
    real_redis.delete(ctx.keys.kill)
    res = ctl(env, "kill-loop", "--json")  # the CLI as users run it: early kill, then the rest
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["killed"] == run_id
    assert real_redis.hget(ctx.keys.kill, "by") == out["by"]
    assert ctx.control.run(run_id)["status"] == "killed"


def test_no_early_kill_without_a_live_loop_or_with_a_wrong_password(env, real_redis, redis_server):
    ctx = Context(settings_from(env))
    assert kill_first(["kill-loop"], env, ROOT) is None  # no heartbeat: the full CLI refuses (exit 1)
    assert not real_redis.exists(ctx.keys.kill)
    res = ctl(env, "kill-loop")
    assert res.returncode == 1 and "no live run" in res.stderr
    _, run_id = _live_run(env)
    wrong = {**env, "FACTORY_REDIS_URL": env["FACTORY_REDIS_URL"].replace("redis://", "redis://:nope@")}
    assert kill_first(["kill-loop"], wrong, ROOT) is None  # the AUTH error is the full CLI's to report
    assert not real_redis.exists(ctx.keys.kill)
    stopped = {**env, "FACTORY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    assert kill_first(["kill-loop"], stopped, ROOT) is None


def test_an_error_after_the_early_kill_says_the_kill_stands(env, real_redis, monkeypatch, capsys):
    """Once the early path wrote the kill, an error of the full command (here: Redis gone) says the kill stands."""
    from factory_worker.cli.commands import main

    ctx, run_id = _live_run(env)
    early = kill_first(["kill-loop"], env, ROOT)
    assert early is not None and real_redis.hget(ctx.keys.kill, "run_id") == run_id
    for name, value in {**env, "FACTORY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}.items():
        if name.startswith("FACTORY_"):
            monkeypatch.setenv(name, value)
    assert main(["kill-loop"], early_kill=early) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "cannot reach Redis" in line
    assert f"the kill itself was written: run {run_id} is stopped" in line
    assert real_redis.hget(ctx.keys.kill, "run_id") == run_id


# -- loop-status answered before the full CLI loads (quick.py + status.py) ------------------------------------
def _without_age(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "age_s"}


def test_loop_status_answered_early_is_the_full_commands_answer(redis_url, real_redis, namespace, tmp_path):
    import io

    from factory_worker.cli.quick import status_first
    from factory_worker.loop import presence
    from factory_worker.ops.operations import loop_status

    env = factory_env({"FACTORY_REDIS_URL": redis_url, "FACTORY_NAMESPACE": namespace})
    ctx = Context(settings_from(env))
    assert ctx.control.start_run(3, by="test").started  # a live run: heartbeat, lease, run record
    for node, slots in (("w2@b", 3), ("w1@a", 2)):
        presence.publish_worker(ctx, node, 1)
        presence.publish_slots(ctx, node, slots)
    a, b = ctx.ledger.claim(["A", "B"], fleet_slots=True).claims
    ctx.ledger.complete("A", a.token)
    ctx.ledger.fail("B", b.token, "boom")
    ctx.control.set_paused(True, "op[red]\x1b[2J")
    real_redis.hset(ctx.keys.ledger_lost, "old-gen", '{"by": "w1", "at_ms": 1}')
    full, code = loop_status(ctx)
    out = io.StringIO()
    assert status_first(["loop-status", "--json"], env, tmp_path, out=out) == code == 1  # ledger lost: exit 1
    early = json.loads(out.getvalue())
    assert _without_age(early) == _without_age(full)
    assert early["agent_slots"] == 5 and [w["hostname"] for w in early["workers"]] == ["w1@a", "w2@b"]
    assert early["ledger"] == {"in_flight": 0, "backoff": 1, "parked": 0, "done": 1}
    assert early["run"]["status"] == "running" and early["paused"]["by"] == "op[red]\x1b[2J"
    # as users run it: answered early, and the same text as the full command (a URL option the early path leaves
    # to redis-py forces it)
    res = ctl(env, "loop-status")
    forced = ctl({**env, "FACTORY_REDIS_URL": redis_url + "?socket_read_size=65536"}, "loop-status")
    assert res.returncode == forced.returncode == 1, (res.stderr, forced.stderr)
    drop_age = lambda text: [ln for ln in text.splitlines() if not ln.startswith(("loop: ", "redis: "))]  # noqa: E731
    assert drop_age(res.stdout) == drop_age(forced.stdout)
    assert "\x1b" not in res.stdout and "paused at" in res.stdout and "by op[red]\\x1b[2J" in res.stdout


def test_loop_status_is_answered_early_whatever_the_other_settings_say(redis_url, namespace, tmp_path):
    from factory_worker.cli.quick import status_first

    env = factory_env({"FACTORY_REDIS_URL": redis_url, "FACTORY_NAMESPACE": namespace})
    for extra in (
        {"FACTORY_DISPATCH__LEASE_TTL_S": "-1"},
        {"FACTORY_TRACKER__WRITE_BACK": "true"},
        {"FACTORY_LOOP__STALE_AFTER_S": "5"},
    ):
        assert status_first(["loop-status"], {**env, **extra}, tmp_path, out=io.StringIO()) == 1  # nothing live
    assert (
        status_first(
            ["loop-status", "--json"], {**env, "FACTORY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, tmp_path
        )
        is None
    )  # Redis unreachable: the full command says so (exit 2)
    res = ctl({**env, "FACTORY_DISPATCH__LEASE_TTL_S": "-1"}, "loop-status", "--json")
    assert res.returncode == 1 and json.loads(res.stdout)["liveness"] == "missing", res.stderr


def test_a_long_lived_status_reader_survives_a_redis_restart(tmp_path, namespace):
    """metrics and `up` read loop-status through one client for hours: a restart must not break it."""
    from factory_worker.loop import presence
    from factory_worker.ops.embedded import RedisServer
    from factory_worker.ops.operations import loop_status

    server = RedisServer(tmp_path / "r").start()
    try:
        ctx = Context(settings_from(factory_env({"FACTORY_REDIS_URL": server.url, "FACTORY_NAMESPACE": namespace})))
        assert loop_status(ctx)[0]["liveness"] == "missing"
        server.stop()
        server.start()  # the same port: the pooled connection is dead now
        assert loop_status(ctx)[0]["liveness"] == "missing"  # through the dead connection first
        assert ctx.control.start_run(3).started
        presence.publish_worker(
            ctx, "w@h", 1, facts=presence.WorkerFacts((ctx.keys.loop_queue, ctx.keys.agent_queue), 2)
        )
        presence.publish_slots(ctx, "w@h", 1)
        presence.publish_beat(ctx)  # a fleet that can make progress: a worker on both queues, a beat
        data, code = loop_status(ctx)
        assert (data["liveness"], code) == ("live", 0)
    finally:
        server.stop()


def test_a_setting_spelt_in_lower_case_means_the_same_loop_on_both_paths(env, real_redis, redis_url, namespace):
    """The full loader reads ``factory_namespace`` as FACTORY_NAMESPACE: the early path must not kill the
    default namespace's loop meanwhile."""
    other = namespace + "-b"
    mine, _ = _live_run(env)
    theirs, their_run = _live_run({**env, "FACTORY_NAMESPACE": other})
    lower = {k: v for k, v in env.items() if k != "FACTORY_NAMESPACE"} | {"factory_namespace": other}
    res = ctl(lower, "kill-loop", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["killed"] == their_run
    assert real_redis.exists(theirs.keys.kill) and not real_redis.exists(mine.keys.kill)


def test_an_early_answer_that_cannot_be_written_is_one_line_and_exit_2(redis_url, namespace, tmp_path, capsys):
    from factory_worker.cli.quick import status_first

    class Closed:
        encoding = "utf-8"

        def isatty(self) -> bool:
            return False

        def write(self, text: str) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    env = factory_env({"FACTORY_REDIS_URL": redis_url, "FACTORY_NAMESPACE": namespace})
    assert status_first(["loop-status"], env, tmp_path, out=Closed()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the answer: BrokenPipeError" in err[0]


def test_start_loop_without_a_live_worker_warns(env):
    """The run's tasks wait in the loop queue until a worker comes: start-loop says so (exit 0: it started)."""
    res = ctl(env, "start-loop")
    assert res.returncode == 0 and res.stdout.startswith("started run "), res.stdout + res.stderr
    assert "warning: no live worker" in res.stderr and ".loop" in res.stderr
    assert json.loads(ctl(env, "start-loop", "--json").stdout)["live_workers"] == 0  # skipped: a run is live


def test_explain_and_retry_of_an_id_known_nowhere_say_unknown_and_exit_1(env, real_redis, tmp_path):
    res = ctl(env, "explain", "NOPE-1")
    assert (
        res.returncode == 1 and res.stdout.strip() == "NOPE-1: unknown: neither the ledger nor the source has this id"
    )
    assert json.loads(ctl(env, "explain", "NOPE-1", "--json").stdout)["state"] == "unknown"
    res = ctl(env, "retry", "NOPE-1")
    assert res.returncode == 1 and "NOPE-1: unknown" in res.stdout
    assert ctl(env, "retry", "C-1").returncode == 0  # in the source: nothing to retry, but known
    assert ctl(env, "kill-loop", "--force").returncode == 0
    assert ctl(env, "explain", "NOPE-1").returncode == 1  # a killed loop does not make it "killed"
    assert ctl(env, "explain", "C-1").stdout.startswith("C-1: killed:")


def test_an_issue_skipped_as_invalid_is_explained_with_the_validation_reason(env, tmp_path):
    with open(tmp_path / "issues.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "BIG-1", "title": "x" * 100_000, "state": "ready"}) + "\n")
    res = ctl(env, "explain", "BIG-1")
    assert res.returncode == 0 and res.stdout.startswith("BIG-1: malformed: malformed in the source"), res.stdout
    assert "title: String should have at most 1000 characters" in res.stdout
    report = json.loads(ctl(env, "run-once", "--dry-run", "--json").stdout)
    assert any(s["reason"].endswith("title: String should have at most 1000 characters") for s in report["skipped"])
