"""The command agent: outcomes, process-group teardown, env, placeholders, logs, renewal, PDEATHSIG."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from factory_worker.agents import AgentResult, CommandAgent, Dispatch
from factory_worker.agents.command import safe_name, substitute_argv
from factory_worker.agents.pidns import unavailable
from factory_worker.config.settings import AgentSettings
from factory_worker.ledger.scripts import StaleClaimError
from factory_worker.sources import Issue
from tests.support import AGENT_USER

ROOT = Path(__file__).resolve().parents[3]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc and prctl")


def gone(pid: int) -> bool:
    """No such process, or only a zombie left (pid 1 in a container may never reap it)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return data[data.rfind(")") + 2] in "ZX"


def wait_gone(pid: int, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.02)
    return gone(pid)


def survivors(marker: str) -> list[int]:
    """Live processes (as this process sees them) whose command line holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and not gone(int(entry)):
            found.append(int(entry))
    return found


def wait_none(marker: str, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while survivors(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not survivors(marker)


@pytest.fixture
def marks():
    """Two unique ``sleep`` durations (about 60 s) to find an agent's children by; what is left is killed."""
    made = [f"6{n}.{uuid.uuid4().int % 10**8:08d}" for n in (0, 1)]
    yield made
    for marker in made:
        for pid in survivors(marker):
            os.kill(pid, signal.SIGKILL)


NO_PIDNS = unavailable()
needs_pidns = pytest.mark.skipif(NO_PIDNS is not None, reason=f"no PID namespace for agents here: {NO_PIDNS}")


@pytest.fixture(params=["off", "own"])
def pidns(request) -> str:
    """agent.pid_namespace for a test run both ways: off, and each agent in its own (where one can be made)."""
    if request.param == "own" and NO_PIDNS is not None:
        pytest.skip(f"no PID namespace for agents here: {NO_PIDNS}")
    return "off" if request.param == "off" else "required"


def wait_file(path: Path, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


@pytest.fixture
def script(tmp_path):
    def _write(body: str, name: str = "agent.py") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(body))
        return path

    return _write


def make_agent(
    tmp_path: Path, argv: list[str], renew_interval_s: float = 5.0, lease_ttl_s: float | None = None, **kw
) -> CommandAgent:
    kw.setdefault("workdir_root", tmp_path / "work")
    settings = AgentSettings(command=argv, log_dir=tmp_path / "logs", **{**AGENT_USER, **kw})
    return CommandAgent(settings, renew_interval_s, lease_ttl_s)


def dispatch(issue_id: str = "EX-1", title: str = "a title", **extra) -> Dispatch:
    issue = Issue(id=issue_id, title=title, state="ready", **extra)
    return Dispatch(issue=issue, token="17", dispatch_id="task-123")


def run(agent: CommandAgent, d: Dispatch | None = None, renew=lambda: None, should_stop=lambda: None, **kw):
    return agent.run(d or dispatch(), renew, should_stop, **kw)


def test_exit_zero_is_ok_with_log(tmp_path, script):
    path = script("""
        import sys
        print("hello from agent", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
    """)
    started = []
    result = run(make_agent(tmp_path, [sys.executable, str(path)]), on_start=started.append)
    assert isinstance(result, AgentResult)
    assert (result.outcome, result.exit_code, result.error, result.ok) == ("ok", 0, "", True)
    assert len(started) == 1 and gone(started[0])
    assert result.log_path == tmp_path / "logs" / "EX-1" / "task-123.log"
    lines = result.log_path.read_text().splitlines()
    assert lines[0].startswith("# factory agent: issue='EX-1' dispatch='task-123'")
    assert "hello from agent" in lines and "to stderr" in lines
    assert lines[-1].startswith("# exit: outcome=ok code=0")


def test_nonzero_exit_is_failed(tmp_path, script):
    path = script("import sys; print('nope'); sys.exit(3)")
    result = run(make_agent(tmp_path, [sys.executable, str(path)]))
    assert (result.outcome, result.exit_code) == ("failed", 3)
    assert "code 3" in result.error and str(result.log_path) in result.error


def test_killed_by_own_signal_is_signalled(tmp_path, script):
    """Outside a PID namespace (inside one, an init's own signal without a handler does nothing: the next
    test)."""
    path = script("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    result = run(make_agent(tmp_path, [sys.executable, str(path)], pid_namespace="off"))
    assert (result.outcome, result.exit_code) == ("signalled", -9) and "SIGKILL" in result.error


@needs_pidns
def test_in_its_own_namespace_the_signal_that_ended_the_agent_is_recorded(tmp_path, script):
    """The agent is the worker's own child, PID 1 of its namespace: a crash, and a SIGKILL from outside (the
    OOM killer, an operator), are what the factory records (no ``unshare --fork`` in between to turn them
    into an exit code)."""
    crash = script("import ctypes; ctypes.string_at(0)", name="crash.py")
    result = run(make_agent(tmp_path, [sys.executable, str(crash)], pid_namespace="required"))
    assert (result.outcome, result.exit_code) == ("signalled", -signal.SIGSEGV) and "SIGSEGV" in result.error
    sleeper = script("import time; time.sleep(30)", name="sleeper.py")

    def kill_soon(pid: int) -> None:
        threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()

    result = run(make_agent(tmp_path, [sys.executable, str(sleeper)], pid_namespace="required"), on_start=kill_soon)
    assert (result.outcome, result.exit_code) == ("signalled", -9) and "SIGKILL" in result.error


GROUP_AGENT = """
    import glob, signal, subprocess, sys, time
    if "--ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the grandchild too
    if "--catch-term" in sys.argv:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
    child = subprocess.Popen(["sleep", sys.argv[2]])
    escaped = ""
    if "--escape" in sys.argv:  # a grandchild in a session of its own: out of the agent's process group
        mark = sys.argv[sys.argv.index("--escape") + 1]
        subprocess.run(["setsid", "-f", "sleep", mark], check=True)
        def cmdline(path):
            try:
                return open(path, "rb").read()
            except OSError:
                return b""
        for _ in range(200):  # until it runs (as this agent's /proc shows it)
            if any(mark.encode() in cmdline(p) for p in glob.glob("/proc/[0-9]*/cmdline")):
                escaped = " escaped"
                break
            time.sleep(0.01)
    with open(sys.argv[1], "w") as fh:
        fh.write(f"{__import__('os').getpid()} {child.pid}{escaped}\\n")
    if "--exit-now" not in sys.argv:
        time.sleep(60)
"""


@linux_only
@pytest.mark.parametrize("ignore_term", [False, True])
def test_timeout_kills_the_whole_group(tmp_path, script, ignore_term, pidns, marks):
    pids = tmp_path / "pids"
    path = script(GROUP_AGENT)
    argv = [sys.executable, str(path), str(pids), marks[0]] + (["--ignore-term"] if ignore_term else [])
    started: list[int] = []
    t0 = time.monotonic()
    result = run(
        make_agent(tmp_path, argv, timeout_s=1.0, term_grace_s=0.5, pid_namespace=pidns), on_start=started.append
    )
    elapsed = time.monotonic() - t0
    assert result.outcome == "timeout" and "longer than 1s" in result.error
    assert pids.exists() and gone(started[0])  # the child had started; the agent is gone
    assert wait_none(marks[0], 1.0) and not survivors(str(path))
    assert elapsed < (3.0 if ignore_term else 2.5)
    if ignore_term:
        assert result.exit_code == -signal.SIGKILL


@needs_pidns
def test_a_namespaced_agent_that_handles_sigterm_gets_its_grace(tmp_path, script, marks):
    """The init gets SIGTERM when it has a handler (an init gets no other): it ends as it chooses."""
    pids = tmp_path / "pids"  # written once its handler is in place: then it is stopped
    argv = [sys.executable, str(script(GROUP_AGENT)), str(pids), marks[0], "--catch-term"]
    result = run(
        make_agent(tmp_path, argv, term_grace_s=5, pid_namespace="required"),
        should_stop=lambda: "stop" if pids.exists() else None,
    )
    assert (result.outcome, result.exit_code) == ("interrupted", 7) and result.duration_s < 4
    assert wait_none(marks[0], 1.0)


@linux_only
def test_leftover_children_are_stopped_after_a_clean_exit(tmp_path, script, pidns, marks):
    pids = tmp_path / "pids"
    argv = [sys.executable, str(script(GROUP_AGENT)), str(pids), marks[0], "--exit-now"]
    result = run(make_agent(tmp_path, argv, term_grace_s=2, pid_namespace=pidns))
    assert result.outcome == "ok" and pids.exists()
    assert wait_none(marks[0], 1.0)


@needs_pidns
@pytest.mark.parametrize("how", ["exits", "timeout"])
def test_in_its_own_namespace_nothing_the_agent_started_survives_it(tmp_path, script, marks, how):
    """A grandchild in a session of its own (``setsid -f``) is out of the agent's process group, which is
    all a stop could reach before: in the agent's namespace it ends with the agent, however the agent ends."""
    pids = tmp_path / "pids"
    argv = [sys.executable, str(script(GROUP_AGENT)), str(pids), marks[0], "--escape", marks[1]]
    if how == "exits":
        argv.append("--exit-now")
    result = run(make_agent(tmp_path, argv, timeout_s=3.0, term_grace_s=0.5, pid_namespace="required"))
    assert result.outcome == ("ok" if how == "exits" else "timeout") and "escaped" in pids.read_text()
    assert not survivors(marks[1]) and not survivors(marks[0])  # gone at once: the kernel ended them


def test_without_a_namespace_an_escaped_grandchild_survives(tmp_path, script, marks):
    """The control: with agent.pid_namespace = off the same grandchild outlives the agent (the fixture ends
    it)."""
    pids = tmp_path / "pids"
    argv = [sys.executable, str(script(GROUP_AGENT)), str(pids), marks[0], "--escape", marks[1], "--exit-now"]
    assert run(make_agent(tmp_path, argv, pid_namespace="off")).outcome == "ok" and "escaped" in pids.read_text()
    assert wait_none(marks[0], 1.0) and survivors(marks[1])


def test_env_vars_and_issue_json(tmp_path, script, monkeypatch):
    out = tmp_path / "env.json"
    path = script(f"""
        import json, os, sys
        env = {{k: v for k, v in os.environ.items() if k.startswith(("FACTORY_", "FW_")) or k == "HOME"}}
        issue = json.load(open(os.environ["FACTORY_ISSUE_JSON"]))
        json.dump({{"env": env, "issue": issue, "argv": sys.argv[1:], "cwd": os.getcwd()}}, open({str(out)!r}, "w"))
    """)
    monkeypatch.setenv("FW_INHERITED", "yes")  # listed: passed
    monkeypatch.setenv("FW_NOT_LISTED", "no")  # not listed: not passed
    d = dispatch("EX-9", "docs", body="the body", labels=["docs"], updated_at="2024-01-01")
    agent = make_agent(tmp_path, [sys.executable, str(path), "{id}"], env_allowlist=["PATH", "FW_INHERITED"])
    result = run(agent, d)
    assert result.outcome == "ok"
    seen = json.loads(out.read_text())
    env = seen["env"]
    assert env["FACTORY_ISSUE_ID"] == "EX-9" and env["FACTORY_DISPATCH_TOKEN"] == "17"
    assert env["FW_INHERITED"] == "yes" and "FW_NOT_LISTED" not in env
    issue_json = Path(env["FACTORY_ISSUE_JSON"])
    assert issue_json.is_absolute() and issue_json.name == "issue.json"
    workdir = Path(seen["cwd"])  # the agent's own directory: its cwd, its HOME, the issue file's folder
    assert issue_json.parent == workdir and env["HOME"] == str(workdir)
    assert workdir.parent == (tmp_path / "work").resolve() and workdir.name.startswith("task-123-")
    assert not workdir.exists()  # removed after the run
    assert seen["issue"] == d.issue.as_json_dict()
    assert seen["argv"] == ["EX-9"] and "17" not in seen["argv"]


def test_placeholders_are_literal_and_nothing_runs(tmp_path, script):
    out = tmp_path / "argv.json"
    m1, m2, m3 = (tmp_path / f"pwned{n}" for n in (1, 2, 3))
    title = f"$(touch {m1}); touch {m2} `touch {m3}` && rm -rf {tmp_path}/x 'q\" {{id}} {{title}}\n"
    path = script(f"import json, sys; json.dump(sys.argv[1:], open({str(out)!r}, 'w'))")
    argv = [sys.executable, str(path), "{id}", "--title={title}", "{title}{id}", "{other}", "{{id}}"]
    result = run(make_agent(tmp_path, argv), dispatch("EX-8", title))
    assert result.outcome == "ok"
    assert json.loads(out.read_text()) == [
        "EX-8",
        f"--title={title}",
        f"{title}EX-8",
        "{other}",
        "{EX-8}",
    ]
    assert not any(m.exists() for m in (m1, m2, m3))
    assert "\n" not in result.log_path.read_text().splitlines()[0]


def test_substitute_argv_one_pass():
    issue = Issue(id="{title}", title="{id}", state="ready")
    assert substitute_argv(["a{id}b", "{title}", "x"], issue) == ["a{title}b", "{id}", "x"]


def test_log_path_is_filesystem_safe(tmp_path, script):
    path = script("pass")
    d = Dispatch(issue=Issue(id="../../etc/passwd", title="t", state="ready"), token="1", dispatch_id="../d/x")
    result = run(make_agent(tmp_path, [sys.executable, str(path)]), d)
    logs = (tmp_path / "logs").resolve()
    assert result.outcome == "ok" and result.log_path.resolve().parent.parent == logs
    assert safe_name("a/b") != safe_name("a_b") and safe_name("EX-1") == "EX-1"


def test_renew_called_periodically(tmp_path, script):
    calls = []
    path = script("import time; time.sleep(0.75)")
    result = run(
        make_agent(tmp_path, [sys.executable, str(path)], renew_interval_s=0.1),
        renew=lambda: calls.append(time.monotonic()),
    )
    assert result.outcome == "ok"
    assert 4 <= len(calls) <= 9
    assert all(b - a >= 0.09 for a, b in zip(calls, calls[1:]))


def test_renew_errors_other_than_stale_are_retried(tmp_path, script):
    calls = []

    def renew():
        calls.append(1)
        raise ConnectionError("redis down")

    path = script("import time; time.sleep(0.5)")
    agent = make_agent(tmp_path, [sys.executable, str(path)], renew_interval_s=0.1, lease_ttl_s=30)
    result = run(agent, renew=renew)  # the lease (30 s) outlives the blip: the agent goes on
    assert result.outcome == "ok" and len(calls) >= 3


@linux_only
def test_stale_claim_on_renew_is_lease_lost(tmp_path, script, marks):
    pids = tmp_path / "pids"
    calls = []

    def renew():
        calls.append(1)
        if len(calls) >= 2:
            raise StaleClaimError("EX-1", "17", "18")

    argv = [sys.executable, str(script(GROUP_AGENT)), str(pids), marks[0]]
    started: list[int] = []
    result = run(make_agent(tmp_path, argv, renew_interval_s=0.1, term_grace_s=1), renew=renew, on_start=started.append)
    assert result.outcome == "lease-lost" and "superseded" in result.error and len(calls) == 2
    assert pids.exists() and gone(started[0]) and wait_none(marks[0], 1.0)


def test_should_stop_interrupts(tmp_path, script):
    marker = tmp_path / "started"
    path = script(f"import time; open({str(marker)!r}, 'w').write('x\\n'); time.sleep(60)")
    started = []

    def should_stop():
        return "kill-loop --release-agents" if marker.exists() else None

    t0 = time.monotonic()
    result = run(
        make_agent(tmp_path, [sys.executable, str(path)], term_grace_s=1),
        should_stop=should_stop,
        on_start=started.append,
    )
    assert (result.outcome, result.error) == ("interrupted", "kill-loop --release-agents")
    assert time.monotonic() - t0 < 5 and gone(started[0])


def test_missing_executable_is_failed(tmp_path):
    started = []
    result = run(make_agent(tmp_path, [str(tmp_path / "no-such-agent"), "{id}"]), on_start=started.append)
    assert result.outcome == "failed" and result.exit_code is None
    assert "cannot start agent" in result.error and "No such file" in result.error
    assert started == [] and "cannot start agent" in result.log_path.read_text()


SUPERVISOR = """
    import os, sys
    from factory_worker.agents import CommandAgent, Dispatch
    from factory_worker.config.settings import AgentSettings
    from factory_worker.sources import Issue

    agent_script, pidfile, log_dir, pidns, mark = sys.argv[1:6]
    settings = AgentSettings(command=[sys.executable, agent_script, pidfile, mark], log_dir=log_dir, timeout_s=120,
                             workdir_root=log_dir + "-work", user=os.environ.get("FW_AGENT_USER") or None,
                             pid_namespace=pidns)
    issue = Issue(id="P-1", title="pdeathsig", state="ready")
    CommandAgent(settings, 5).run(Dispatch(issue, "1", "d-1"), lambda: None, lambda: None,
                                  on_start=lambda pid: open(pidfile + ".host", "w").write(f"{pid}\\n"))
"""


@linux_only
def test_agent_dies_with_its_sigkilled_supervisor(tmp_path, script, pidns, marks):
    """PDEATHSIG: the agent dies with the thread that started it, SIGKILLed; in its own namespace, so does
    a grandchild that left the agent's process group (``setsid -f``)."""
    agent = script(
        """
        import os, subprocess, sys, time
        subprocess.run(["setsid", "-f", "sleep", sys.argv[2]], check=True)
        open(sys.argv[1], "w").write(f"{os.getpid()}\\n")
        time.sleep(60)
    """,
        name="sleeper.py",
    )
    supervisor = script(SUPERVISOR, name="supervisor.py")
    pidfile = tmp_path / "agent.pid"
    proc = subprocess.Popen(
        [sys.executable, str(supervisor), str(agent), str(pidfile), str(tmp_path / "logs"), pidns, marks[0]],
        cwd=ROOT,
        env={**os.environ, "FW_AGENT_USER": AGENT_USER.get("user", "")},
    )
    try:
        wait_file(pidfile, 10)
        agent_pid = int(wait_file(Path(f"{pidfile}.host"), 10).strip())
        assert not gone(agent_pid) and survivors(marks[0])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        assert wait_gone(agent_pid, 1.0), "the agent outlived its SIGKILLed supervisor"
        if pidns != "off":
            assert wait_none(marks[0], 1.0), "the agent's grandchild outlived its SIGKILLed supervisor"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_example_agent(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("FACTORY_AGENT_OUTPUT_DIR", str(out))
    monkeypatch.setenv("FACTORY_AGENT_SLEEP_S", "0")
    for issue_id, labels, code in (("EX-1", ["docs"], 0), ("EX-7", ["always-fails"], 1)):
        settings = AgentSettings(
            command=[sys.executable, str(ROOT / "examples" / "agent.py"), "{id}"],
            log_dir=tmp_path / "logs",
            workdir_root=tmp_path / "work",
            env_allowlist=["PATH", "FACTORY_AGENT_OUTPUT_DIR", "FACTORY_AGENT_SLEEP_S"],
            **AGENT_USER,
        )
        result = CommandAgent(settings, 5).run(dispatch(issue_id, "t", labels=labels), lambda: None, lambda: None)
        assert result.exit_code == code
        assert issue_id in (out / f"{issue_id}.txt").read_text()
        assert issue_id in result.log_path.read_text()


def test_an_agent_whose_lease_cannot_be_renewed_is_stopped_before_the_lease_ends(tmp_path):
    """Redis unreachable from this worker: after one lease TTL without a renew the issue may be someone
    else's, so the agent must not go on (no two agents on one issue)."""
    settings = AgentSettings(
        command=[sys.executable, "-c", "import time; time.sleep(30)"],
        log_dir=str(tmp_path / "logs"),
        workdir_root=tmp_path / "work",
        timeout_s=60,
        term_grace_s=1,
        **AGENT_USER,
    )
    calls = []

    def renew():
        calls.append(time.monotonic())
        raise ConnectionError("redis down")

    t0 = time.monotonic()
    result = CommandAgent(settings, 0.3, lease_ttl_s=1.0).run(
        Dispatch(Issue(id="L-1", title="t", state="ready"), "1:x", "d-lease"), renew, lambda: None
    )
    took = time.monotonic() - t0
    assert result.outcome == "lease-lost" and "could not be renewed" in result.error
    assert took < 1.0 + 1.5  # stopped before (a safety margin ahead of) the lease end, plus the stop
    assert len(calls) >= 3  # failed renews are retried every tick, not once per interval


@pytest.mark.parametrize("lease_s,grace_s", [(3, 1), (3, 0.5), (4, 1.5), (30, 5), (30, 18), (60, 5)])
def test_with_any_accepted_settings_an_unrenewed_agent_is_killed_before_its_claim_can_expire(lease_s, grace_s):
    """Stopping starts ``lease - margin - grace`` after the last renew sent and SIGKILL follows ``grace``
    later: both before the lease ends, for every pair settings validation accepts. (A floor of two renew
    intervals once pushed a 3 s lease with a 1 s grace to a SIGKILL exactly at the lease's end: seen in
    tests/integration/test_partition.py as an agent alive 0.1 s after its claim expired.)"""
    from factory_worker.agents.lease import LeaseKeeper
    from factory_worker.config.settings import load_settings

    s = load_settings(dispatch={"lease_ttl_s": lease_s}, agent={"term_grace_s": grace_s})  # accepted
    keeper = LeaseKeeper(lambda: None, lambda: None, lease_s / 3, lease_s, s.agent.term_grace_s, "I-1", 100.0)
    killed_at = keeper.stop_at + grace_s
    assert keeper.stop_at > 100.0 + lease_s / 3  # the first renew could happen before it
    assert killed_at < 100.0 + lease_s, f"SIGKILL {killed_at - 100.0:g}s after the renew, lease {lease_s}s"


def test_the_agent_gets_only_its_allowlist_never_the_workers_credentials(tmp_path, script, monkeypatch):
    secrets = {
        "FACTORY_REDIS_URL": "redis://:s3cret@redis:6379/0",
        "FACTORY_DISPATCH__LEASE_TTL_S": "30",
        "GITHUB_TOKEN": "ghp_s3cret",
        "FLOWER_BASIC_AUTH": "admin:s3cret",
        "SOME_API_TOKEN": "s3cret",
        "FACTORY_REDIS_URL_FILE": "/run/secrets/redis_url",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.setenv("FACTORY_AGENT_OUTPUT_DIR", "/tmp/out")  # an agent's own variable: passed when listed
    dump = tmp_path / "env.json"
    path = script(f"import json, os; json.dump(dict(os.environ), open({str(dump)!r}, 'w'))")
    agent = make_agent(
        tmp_path,
        [sys.executable, str(path)],
        env_allowlist=["PATH", "LANG", "FACTORY_AGENT_OUTPUT_DIR", "NOT_SET_ANYWHERE"],
    )
    assert run(agent).outcome == "ok"
    env = json.loads(dump.read_text())
    assert not set(secrets) & set(env) and "s3cret" not in json.dumps(env)
    assert set(env) == {
        "PATH",
        "LANG",
        "FACTORY_AGENT_OUTPUT_DIR",
        "HOME",
        "FACTORY_ISSUE_ID",
        "FACTORY_ISSUE_JSON",
        "FACTORY_DISPATCH_TOKEN",
        "FACTORY_USAGE",  # where it appends its usage lines (issue 24)
    }
    assert env["FACTORY_AGENT_OUTPUT_DIR"] == "/tmp/out" and env["FACTORY_ISSUE_ID"] == "EX-1"
    assert env["PATH"] == os.environ["PATH"] and env["LANG"] == "C.UTF-8"


def test_command_paths_relative_to_the_workers_cwd_still_work(tmp_path, script, monkeypatch):
    """The agent runs in its own directory: the command's relative paths (never issue text) are anchored."""
    out = tmp_path / "argv.json"
    script(f"import json, sys; json.dump(sys.argv[1:], open({str(out)!r}, 'w'))", name="rel_agent.py")
    monkeypatch.chdir(tmp_path)
    argv = [sys.executable, "./rel_agent.py", "{id}", "no/such/file", "plain"]
    result = run(make_agent(tmp_path, argv), dispatch("./rel_agent.py", "t"))
    assert result.outcome == "ok"
    assert json.loads(out.read_text()) == ["./rel_agent.py", "no/such/file", "plain"]


def _count_thread_starts(monkeypatch) -> list[str]:
    import threading

    names: list[str] = []
    real = threading.Thread.start

    def start(self):
        names.append(self.name)
        return real(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    return names


def test_a_short_agent_costs_no_thread_and_its_output_is_all_logged(tmp_path, monkeypatch):
    threads = _count_thread_starts(monkeypatch)
    result = run(make_agent(tmp_path, ["sh", "-c", "echo quick; echo err >&2"]))
    assert result.outcome == "ok"
    assert threads == []  # nothing to renew or read yet: the pipe's buffer held its output
    lines = result.log_path.read_text().splitlines()
    assert "quick" in lines and "err" in lines and lines[-1].startswith("# exit: outcome=ok")


def test_a_longer_agent_gets_its_keeper_and_relay_and_a_fast_writer_is_not_held_up(tmp_path, script, monkeypatch):
    threads = _count_thread_starts(monkeypatch)
    path = script("""
        import sys, time
        sys.stdout.write("x" * 300_000 + "\\n")  # more than a pipe holds: written once the relay runs
        sys.stdout.flush()
        time.sleep(0.3)
        print("the end", flush=True)
    """)
    renewed = []
    result = run(
        make_agent(tmp_path, [sys.executable, str(path)], renew_interval_s=0.1, lease_ttl_s=5.0),
        renew=lambda: renewed.append(time.monotonic()),
    )
    assert result.outcome == "ok" and result.duration_s < 3
    assert any(n.startswith("lease-") for n in threads) and "factory-agent-log" in threads
    assert renewed  # the keeper renewed while it ran
    text = result.log_path.read_text()
    assert "x" * 300_000 in text and "the end" in text
