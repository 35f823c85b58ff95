"""What an agent is given (agents/sandbox.py): allowlisted environment, identity, working directory, and the
doctor's agent-isolation check. Real files, real uids (root-only parts skip elsewhere), no mocks."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from factory_worker.agents import CommandAgent, Dispatch
from factory_worker.agents.sandbox import (
    Identity,
    agent_env,
    agent_identity,
    check_isolation,
    check_workdir_root,
    make_workdir,
    remove_workdir,
    resolve_identity,
    secret_like,
)
from factory_worker.config.settings import AgentSettings, ConfigError
from factory_worker.ops.doctor import Checkup, check_agent_isolation
from factory_worker.sources import Issue

ROOT = Path(__file__).resolve().parents[3]
NOBODY = Identity(65534, 65534, "nobody")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing file owners and uids needs root")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc, setpriv")


@pytest.fixture
def open_dir():
    """A directory other users can traverse (pytest's tmp_path is 0700 under root)."""
    path = Path(tempfile.mkdtemp(prefix="fw-sandbox-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


# -- environment -------------------------------------------------------------------------------------------
def test_the_environment_is_the_allowlist_plus_what_the_agent_is_given(tmp_path):
    worker = {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "HOME": "/root",
        "FACTORY_REDIS_URL": "redis://:pw@r/0",
        "GITHUB_TOKEN": "t",
        "FLOWER_BASIC_AUTH": "a:b",
        "FACTORY_AGENT__USER": "x",
        "MY_AGENT_FLAG": "1",
    }
    agent = AgentSettings(env_allowlist=["PATH", "LANG", "MY_AGENT_FLAG", "TZ"])
    env = agent_env(agent, worker, tmp_path, tmp_path / "issue.json", "EX-1", "7:w.1")
    assert env == {
        "PATH": "/usr/bin",
        "LANG": "C.UTF-8",
        "MY_AGENT_FLAG": "1",
        "HOME": str(tmp_path),
        "FACTORY_ISSUE_ID": "EX-1",
        "FACTORY_ISSUE_JSON": str(tmp_path / "issue.json"),
        "FACTORY_DISPATCH_TOKEN": "7:w.1",
    }


def test_home_is_the_workers_only_when_listed(tmp_path):
    agent = AgentSettings(env_allowlist=["HOME"])
    assert agent_env(agent, {"HOME": "/srv"}, tmp_path, tmp_path / "i", "1", "1")["HOME"] == "/srv"
    assert agent_env(agent, {}, tmp_path, tmp_path / "i", "1", "1")["HOME"] == str(tmp_path)


def test_the_default_allowlist_holds_no_secret_and_not_home():
    names = AgentSettings().env_allowlist
    assert names == ["PATH", "LANG", "LC_ALL", "TZ", "TMPDIR"]
    assert not [n for n in names if secret_like(n)]


@pytest.mark.parametrize(
    "name,value,secret",
    [
        ("GITHUB_TOKEN", None, True),
        ("GH_TOKEN", None, True),
        ("DB_PASSWORD", None, True),
        ("MYSECRET", None, True),
        ("FLOWER_BASIC_AUTH", None, True),
        ("OPENAI_API_KEY", None, True),
        ("FACTORY_REDIS_URL", None, True),
        ("FACTORY_AGENT__USER", None, True),
        ("FACTORY_REDIS_URL_FILE", None, True),
        ("DATABASE_URL", "postgres://u:pw@db/x", True),
        ("DATABASE_URL", "postgres://db/x", False),
        ("PATH", "/usr/bin", False),
        ("TOKENIZERS_PARALLELISM", "false", False),
        ("GIT_AUTHOR_NAME", "a", False),
        ("FACTORY_AGENT_OUTPUT_DIR", "/tmp", False),
        ("LANG", None, False),
    ],
)
def test_secret_like(name, value, secret):
    assert secret_like(name, value) is secret


# -- identity ----------------------------------------------------------------------------------------------
def test_identity_by_name_number_and_group():
    assert resolve_identity(AgentSettings()) is None
    assert resolve_identity(AgentSettings(user="nobody")) == NOBODY
    assert resolve_identity(AgentSettings(user="65534")) == Identity(65534, 65534, "65534")
    assert resolve_identity(AgentSettings(user=54321, group=54322)) == Identity(54321, 54322, "54321")
    assert resolve_identity(AgentSettings(user="nobody", group="daemon")).gid == 1


@pytest.mark.parametrize(
    "kw,names",
    [
        ({"user": "no-such-user-fw"}, "agent.user (FACTORY_AGENT__USER=no-such-user-fw): no such user"),
        ({"user": "54321"}, "agent.user (FACTORY_AGENT__USER=54321): uid not in the user database"),
        ({"user": "nobody", "group": "no-such-group-fw"}, "agent.group (FACTORY_AGENT__GROUP=no-such-group-fw)"),
        ({"user": "nobody", "group": "0"}, "agent.group"),
    ],
)
def test_identity_errors_are_one_line_naming_the_field(kw, names):
    with pytest.raises(ConfigError) as exc:
        resolve_identity(AgentSettings.model_construct(**{**AgentSettings().model_dump(), **kw}))
    assert names in one_line(exc)


def test_the_workers_own_uid_needs_no_switch():
    own = AgentSettings(user=str(os.geteuid()), group=str(os.getegid())) if os.geteuid() else None
    assert own is None or agent_identity(own) is None


@needs_root
@linux_only
def test_a_worker_without_cap_setuid_refuses_with_one_line_naming_agent_user():
    code = (
        "from factory_worker.agents import CommandAgent; from factory_worker.config.settings import AgentSettings\n"
        "CommandAgent(AgentSettings(user='nobody', command=['true']), 1)"
    )
    proc = subprocess.run(
        ["setpriv", "--bounding-set=-setuid,-setgid", "--", sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith(
        "factory_worker.config.files.ConfigError: invalid setting agent.user (FACTORY_AGENT__USER=nobody)"
    ), proc.stderr
    assert "CAP_SETGID, CAP_SETUID" in last and "never run as the worker" in last


@needs_root
def test_a_root_worker_refuses_agents_unless_agent_user_says_who(tmp_path):
    """Issue 20: agent.user unset on a root worker once ran agents as root; now one line naming the setting,
    and agents as root only when agent.user = root is written."""
    settings = dict(command=["true"], log_dir=tmp_path / "logs", workdir_root=tmp_path / "work")
    with pytest.raises(ConfigError) as exc:
        CommandAgent(AgentSettings(**settings), 1)
    assert "FACTORY_AGENT__USER" in one_line(exc) and "runs as root" in one_line(exc)
    agent = CommandAgent(AgentSettings(user="root", **settings), 1)
    result = agent.run(Dispatch(Issue(id="R-1", title="t", state="ready"), "1", "d-r"), lambda: None, lambda: None)
    assert result.outcome == "ok" and 'user="the worker\'s own user (uid 0)"' in result.log_path.read_text()
    with pytest.raises(ConfigError) as exc:  # and check_isolation, which a starting worker runs, says the same
        check_isolation(AgentSettings(**settings))
    assert "FACTORY_AGENT__USER" in one_line(exc)


@pytest.mark.skipif(os.geteuid() == 0, reason="a worker that is not root (the root case: the test above)")
def test_a_worker_that_is_not_root_still_runs_agents_as_itself_by_default(tmp_path):
    result = CommandAgent(
        AgentSettings(command=["true"], log_dir=tmp_path / "logs", workdir_root=tmp_path / "w"), 1
    ).run(Dispatch(Issue(id="N-1", title="t", state="ready"), "1", "d-n"), lambda: None, lambda: None)
    assert result.outcome == "ok"


# -- working directory -------------------------------------------------------------------------------------
@needs_root
def test_a_fresh_private_directory_owned_by_the_agent_with_the_issue(open_dir):
    agent = AgentSettings(workdir_root=open_dir / "work", user="nobody")
    issue = Issue(id="EX-1", title="t", state="ready", body="b")
    a, issue_json = make_workdir(agent, "task-1", issue, NOBODY, "task-1")
    b, _ = make_workdir(agent, "task-1", issue, NOBODY, "task-1")
    assert a != b and a.parent == b.parent == open_dir / "work" and a.name.startswith("task-1-")
    assert stat.S_IMODE(os.stat(open_dir / "work").st_mode) == 0o711  # enter your own, list nobody's
    st = os.stat(a)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o700)
    st = os.stat(issue_json)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (65534, 0o600)
    assert json.loads(issue_json.read_text()) == issue.as_json_dict()
    remove_workdir(a, NOBODY)
    remove_workdir(b, NOBODY)
    assert not a.exists() and not b.exists()


@needs_root
def test_a_workdir_root_the_agent_cannot_reach_is_refused(open_dir):
    closed = open_dir / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(ConfigError) as exc:
        check_workdir_root(AgentSettings(workdir_root=closed / "work", user="nobody"), NOBODY)
    assert f"agent.workdir_root (FACTORY_AGENT__WORKDIR_ROOT={closed / 'work'})" in one_line(exc)
    assert f"{closed} is not searchable by agent.user nobody" in str(exc.value)


@needs_root
@linux_only
def test_what_the_agent_left_is_removed_even_without_cap_dac_override(open_dir):
    """A worker with CAP_SETUID but not CAP_DAC_OVERRIDE cannot remove the agent's mode-000 leftovers
    itself: it removes them as the agent's user."""
    agent = AgentSettings(workdir_root=open_dir / "work", user="nobody")
    workdir, _ = make_workdir(agent, "d", Issue(id="1", title="t", state="ready"), NOBODY, "d")
    locked = workdir / "locked" / "deeper"
    locked.mkdir(parents=True)
    (locked / "f").write_text("x")
    for path in (locked / "f", locked, locked.parent):
        os.chown(path, 65534, 65534)
    os.chmod(locked, 0)
    os.chmod(locked.parent, 0)
    code = (
        "import sys; from pathlib import Path; from factory_worker.agents.sandbox import remove_workdir, Identity\n"
        "remove_workdir(Path(sys.argv[1]), Identity(65534, 65534, 'nobody'))"
    )
    proc = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-dac_override,-dac_read_search,-fowner",
            "--",
            sys.executable,
            "-c",
            code,
            str(workdir),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert not workdir.exists()


@needs_root
@linux_only
def test_the_agent_runs_as_nobody_and_dies_with_its_sigkilled_supervisor(open_dir):
    """PDEATHSIG survives the uid switch (setpriv sets it after changing ids)."""
    pidfile = open_dir / "agent.pid"
    agent = open_dir / "sleeper.py"
    agent.write_text(
        f"import os, time\nopen({str(pidfile)!r}, 'w').write(f'{{os.getpid()}} {{os.getuid()}}\\n')\ntime.sleep(60)\n"
    )
    os.chmod(open_dir, 0o777)  # the agent writes its pid file here
    supervisor = textwrap.dedent(f"""
        from factory_worker.agents import CommandAgent, Dispatch
        from factory_worker.config.settings import AgentSettings
        from factory_worker.sources import Issue
        s = AgentSettings(command=["/usr/bin/python3", {str(agent)!r}], log_dir={str(open_dir / "logs")!r},
                          workdir_root={str(open_dir / "work")!r}, user="nobody", timeout_s=120)
        CommandAgent(s, 5).run(Dispatch(Issue(id="P-1", title="t", state="ready"), "1", "d-1"), lambda: None,
                               lambda: None, on_start=lambda pid: open({str(pidfile) + ".host"!r}, "w").write(str(pid)))
    """)
    proc = subprocess.Popen([sys.executable, "-c", supervisor], env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 15
        while not (pidfile.exists() and pidfile.read_text().endswith("\n")) and time.monotonic() < deadline:
            time.sleep(0.05)
        _, uid = map(int, pidfile.read_text().split())
        pid = int(Path(f"{pidfile}.host").read_text())  # as seen here (in its own PID namespace it is 1)
        assert uid == 65534
        proc.kill()
        proc.wait(5)
        deadline = time.monotonic() + 2
        while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] not in "ZX":
            assert time.monotonic() < deadline, "the agent outlived its SIGKILLed supervisor"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- doctor ------------------------------------------------------------------------------------------------
def isolation_findings(monkeypatch, **agent) -> list[dict]:
    from factory_worker.config.settings import load_settings

    monkeypatch.setenv("GITHUB_TOKEN", "t")
    settings = load_settings(agent={"command": ["true"], **agent})
    found = check_agent_isolation(Checkup(settings, None, None, time.time, False))  # type: ignore[arg-type]
    return [x for x in found if "PID namespace here" not in x["message"]]  # (a note where it is not root)


def test_doctor_warns_when_agents_run_as_the_workers_user(monkeypatch):
    """(An error as root: a root agent worker refuses to run agents with agent.user unset.)"""
    [finding] = [x for x in isolation_findings(monkeypatch) if "FACTORY_AGENT__USER" in x["message"]]
    assert finding["severity"] == ("error" if os.geteuid() == 0 else "warn")


def test_doctor_warns_about_secret_looking_allowlist_names(monkeypatch):
    findings = isolation_findings(
        monkeypatch, user="nobody", env_allowlist=["PATH", "GITHUB_TOKEN", "FACTORY_REDIS_URL"]
    )
    assert [f["severity"] for f in findings] == ["warn"]
    assert "GITHUB_TOKEN, FACTORY_REDIS_URL" in findings[0]["message"]


@pytest.mark.skipif(os.geteuid() == 65534, reason="runs as nobody itself")
def test_doctor_notes_full_isolation(monkeypatch):
    [finding] = isolation_findings(monkeypatch, user="nobody")
    assert finding["severity"] == "info" and "nobody (uid 65534" in finding["message"]


def test_doctor_warns_when_agent_user_is_unknown_here(monkeypatch):
    [finding] = isolation_findings(monkeypatch, user="no-such-user-fw")
    assert finding["severity"] == "warn" and "agent.user" in finding["message"]
