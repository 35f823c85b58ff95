"""Agent isolation (issue 12): a hostile agent, run through the real CommandAgent and a real `celery worker`,
cannot reach the worker's credentials or change its files when agent.user and the env allowlist are set.

The hostile agent (``tests/hostile_agent.py``) tries: /proc/$PPID/environ, every /proc/*/environ, the
worker's config file and env file (0600, the worker's), credentials in its own environment, the worker's cwd
through /proc, writing ./factory.toml in the worker's cwd, writing into the issue source directory, signalling
the worker. The "worker" is a real process started with the secrets in its environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from factory_worker.agents.pidns import unavailable
from factory_worker.ledger.core import Ledger
from tests.support import AGENT_USER, CeleryProc, ctl, settings_from, stack_env, wait_until, write_issues

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = ROOT / "tests" / "hostile_agent.py"
PY3 = shutil.which("python3", path="/usr/bin:/bin")  # an interpreter the agent's user can run (stdlib only)
NOBODY = 65534

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="agent isolation is Linux-only (/proc, setpriv)"),
]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="running agents as another user needs root")
needs_py3 = pytest.mark.skipif(PY3 is None, reason="no /usr/bin/python3 for the agent's user to run")
NO_PIDNS = unavailable()
needs_pidns = pytest.mark.skipif(NO_PIDNS is not None, reason=f"no PID namespace for agents here: {NO_PIDNS}")
ATTEMPTS = (
    "read /proc/$PPID/environ",
    "find a credential in any /proc/*/environ",
    "read the worker's config file",
    "read the worker's env file",
    "find a credential in its own environment",
    "list the worker's cwd through /proc/$PPID/cwd",
    "write factory.toml in the worker's cwd",
    "create a file in the issue source directory",
    "append to the issue source file",
    "signal the worker",
    "list the worker's processes",
)
GIVEN_ENV = {"PATH", "HOME", "FACTORY_ISSUE_ID", "FACTORY_ISSUE_JSON", "FACTORY_DISPATCH_TOKEN", "FACTORY_USAGE"}


@dataclass
class Site:
    """A worker's directory as deployed: traversable (0755), its config and env file 0600 (the worker's)."""

    root: Path
    marker: str  # a secret that must never reach the agent

    @property
    def config(self) -> Path:
        return self.root / "factory.conf.toml"

    @property
    def env_file(self) -> Path:
        return self.root / "worker.env"

    @property
    def source_dir(self) -> Path:
        return self.root / "issues"

    @property
    def out(self) -> Path:
        return self.root / "out"

    def secrets(self) -> dict[str, str]:
        return {
            "GITHUB_TOKEN": f"ghp_{self.marker}",
            "FLOWER_BASIC_AUTH": f"admin:{self.marker}",
            "DEPLOY_API_TOKEN": self.marker,
        }

    def agent_settings(self, user: str | None, pidns: str = "auto") -> dict[str, str]:
        argv = [
            PY3 or "python3",
            str(HOSTILE),
            str(self.out),
            str(self.config),
            str(self.env_file),
            str(self.root),
            str(self.source_dir),
        ]
        env = {
            "FACTORY_CONFIG": str(self.config),
            "FACTORY_AGENT__COMMAND": json.dumps(argv),
            "FACTORY_AGENT__WORKDIR_ROOT": str(self.root / "work"),
            "FACTORY_AGENT__LOG_DIR": str(self.root / "logs"),
            "FACTORY_AGENT__ENV_ALLOWLIST": json.dumps(["PATH"]),
            "FACTORY_AGENT__PID_NAMESPACE": pidns,
        }
        if user is not None:
            env["FACTORY_AGENT__USER"] = user
        return env

    def report(self) -> dict:
        return json.loads((self.out / "attempts.json").read_text())


@pytest.fixture
def site():
    root = Path(tempfile.mkdtemp(prefix="fw-site-"))
    os.chmod(root, 0o755)
    s = Site(root, "s3cret-" + uuid.uuid4().hex)
    for path, text in (
        (s.config, f"# deploy key {s.marker}\n[dispatch]\nmax_attempts = 3\n"),
        (s.env_file, f"GITHUB_TOKEN=ghp_{s.marker}\n"),
        (root / "redis_url", ""),
    ):
        path.write_text(text)
        os.chmod(path, 0o600)
    s.source_dir.mkdir(mode=0o755)
    write_issues(s.source_dir / "issues.jsonl", [{"id": "H-1", "title": "hostile", "state": "ready"}])
    s.out.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(s.out, NOBODY, NOBODY)  # the only place the agent's user may write (its report)
    yield s
    shutil.rmtree(root, ignore_errors=True)


def results(report: dict) -> dict[str, dict]:
    by = {r["attempt"]: r for r in report["results"]}
    assert set(by) == set(ATTEMPTS), report
    return by


def assert_contained(site: Site, report: dict) -> None:
    """Every attempt failed, nothing secret reached the report, the worker's files are as they were (the
    worker's processes are out of sight where the agent gets a PID namespace of its own)."""
    by = results(report)
    seen = [a for a, r in by.items() if r["succeeded"]]
    assert seen == ([] if NO_PIDNS is None else ["list the worker's processes"]), json.dumps(report, indent=1)
    assert site.marker not in json.dumps(report)
    assert (report["uid"], report["gid"], report["groups"]) == (NOBODY, NOBODY, [])
    assert set(report["env"]) - {"LC_CTYPE"} == GIVEN_ENV  # Python sets LC_CTYPE itself under the C locale
    assert Path(report["cwd"]).parent == site.root / "work" and not Path(report["cwd"]).exists()
    assert not (site.root / "factory.toml").exists() and sorted(os.listdir(site.source_dir)) == ["issues.jsonl"]
    assert "EVIL" not in (site.source_dir / "issues.jsonl").read_text()


SUPERVISOR = """
import json
from factory_worker.agents import CommandAgent, Dispatch
from factory_worker.config.settings import load_settings
from factory_worker.sources import Issue

settings = load_settings()
result = CommandAgent(settings.agent, 5).run(Dispatch(Issue(id="H-1", title="hostile", state="ready"), "1:w", "d-h1"),
                                             lambda: None, lambda: None)
print(json.dumps({"outcome": result.outcome, "error": result.error}))
"""


def run_supervised(site: Site, user: str | None, pidns: str = "auto") -> dict:
    """A worker process (secrets in its environment, cwd = the site) runs the hostile agent via CommandAgent."""
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        **site.secrets(),
        **site.agent_settings(user, pidns),
        "FACTORY_REDIS_URL": f"redis://:{site.marker}@127.0.0.1:1/0",
    }  # never connected to
    proc = subprocess.run(
        [sys.executable, "-c", SUPERVISOR], env=env, cwd=site.root, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["outcome"] == "ok", proc.stdout
    return site.report()


@needs_root
@needs_py3
def test_a_hostile_agent_run_as_nobody_reaches_nothing(site):
    assert_contained(site, run_supervised(site, "nobody"))


@needs_py3
def test_without_agent_user_the_allowlist_still_holds_but_proc_environ_leaks(site):
    """The control: the same agent as the worker's own user (root written as such on a root worker), without
    a PID namespace, finds the secrets in /proc/$PPID/environ (which is why doctor warns), though its own
    environment is clean and it runs in its own directory."""
    by = results(run_supervised(site, AGENT_USER.get("user"), pidns="off"))
    assert by["read /proc/$PPID/environ"]["succeeded"] and site.marker in by["read /proc/$PPID/environ"]["detail"]
    assert by["list the worker's processes"]["succeeded"]
    assert not by["find a credential in its own environment"]["succeeded"]
    assert site.marker in by["read the worker's config file"]["detail"]  # same user: only agent.user stops this


@needs_py3
@needs_pidns
def test_in_its_own_pid_namespace_an_agent_sees_no_process_of_the_worker(site):
    """Issue 20: as the worker's own user still, but PID 1 of its own namespace with its own /proc: no
    /proc/<worker>/environ to read, no process of the worker to list or signal (the files stay readable: only
    agent.user stops that)."""
    by = results(run_supervised(site, AGENT_USER.get("user"), pidns="required"))
    for what in (
        "read /proc/$PPID/environ",
        "find a credential in any /proc/*/environ",
        "list the worker's processes",
        "list the worker's cwd through /proc/$PPID/cwd",
        "signal the worker",
    ):
        assert not by[what]["succeeded"] and site.marker not in by[what]["detail"], (what, by[what])
    assert not by["find a credential in its own environment"]["succeeded"]


@needs_root
@needs_py3
@pytest.mark.e2e
def test_a_hostile_agent_dispatched_by_a_celery_worker_reaches_nothing(
    site, redis_url, real_redis, namespace, tmp_path, procs
):
    """The whole path: beat-less run-once -> real `celery worker` (as root, secrets in its env, the Redis URL
    read from FACTORY_REDIS_URL_FILE) -> agent task -> the hostile agent as nobody."""
    (site.root / "redis_url").write_text(redis_url + "\n")
    env = stack_env(
        redis_url,
        namespace,
        tmp_path,
        **site.secrets(),
        **site.agent_settings("nobody"),
        FACTORY_SOURCE__PATH=str(site.source_dir / "issues.jsonl"),
        FACTORY_REDIS_URL_FILE=str(site.root / "redis_url"),
    )
    del env["FACTORY_REDIS_URL"]
    worker = CeleryProc("worker", env, tmp_path, "w1", extra=["-c", "1"], cwd=site.root)
    procs.append(worker)
    worker.wait_ready()
    assert "agents run as nobody (uid 65534, gid 65534)" in worker.log()
    res = ctl(env, "run-once", "--json")
    assert res.returncode == 0, res.stderr
    ledger = Ledger.from_settings(settings_from(env), real_redis)
    wait_until(lambda: ledger.explain("H-1").state == "done", 30, what="H-1 done")
    assert_contained(site, site.report())


@needs_root
@pytest.mark.e2e
def test_a_worker_that_cannot_switch_users_refuses_to_start(site, redis_url, namespace, tmp_path):
    """Root without CAP_SETUID (a container's dropped capability): the agent worker exits 2 with one line
    naming agent.user; a loop-only worker, which never runs agents, starts."""
    env = stack_env(redis_url, namespace, tmp_path, **site.agent_settings("nobody"))
    celery = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "factory_worker",
        "worker",
        "-l",
        "INFO",
        "--without-mingle",
        "--without-gossip",
        "-c",
        "1",
    ]
    no_setuid = [shutil.which("setpriv") or "setpriv", "--bounding-set=-setuid", "--"]
    proc = subprocess.run(
        no_setuid + celery + ["-Q", f"{namespace}.agents"],
        env=env,
        cwd=site.root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("factory_worker:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert "agent.user (FACTORY_AGENT__USER=nobody)" in lines[0] and "CAP_SETUID" in lines[0]
    log_path = tmp_path / "loop-worker.log"
    with open(log_path, "wb") as log:
        loop_only = subprocess.Popen(
            no_setuid + celery + ["-Q", f"{namespace}.loop"],
            env=env,
            cwd=site.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: loop_only.poll() is not None or "ready." in log_path.read_text(), 30, what="loop worker ready"
        )
        assert loop_only.poll() is None, log_path.read_text()
    finally:
        loop_only.terminate()
        loop_only.wait(30)


def _agent_worker(env: dict, cwd: Path, wrap: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A `celery worker` consuming the agent queue, run to its end (it is expected to refuse to start)."""
    celery = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "factory_worker",
        "worker",
        "-l",
        "INFO",
        "--without-mingle",
        "--without-gossip",
        "-c",
        "1",
        "-Q",
        f"{env['FACTORY_NAMESPACE']}.agents",
    ]
    return subprocess.run(wrap + celery, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@needs_root
@pytest.mark.e2e
def test_a_root_worker_without_agent_user_refuses_to_start(site, redis_url, namespace, tmp_path):
    """Issue 20: a root agent worker with agent.user unset once ran agents as root; now it exits 2 with one
    line naming FACTORY_AGENT__USER (agent.user = root, written, runs them: the rest of the suite)."""
    env = stack_env(redis_url, namespace, tmp_path, **site.agent_settings(None))
    env.pop("FACTORY_AGENT__USER", None)
    proc = _agent_worker(env, site.root, [])
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("factory_worker:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert "FACTORY_AGENT__USER" in lines[0] and "runs as root" in lines[0]


@needs_root
@pytest.mark.e2e
def test_a_worker_that_cannot_make_pid_namespaces_says_so_at_start(site, redis_url, namespace, tmp_path, procs):
    """Root without CAP_SYS_ADMIN (a container's usual root): one warning at start naming the setting; with
    agent.pid_namespace = required it refuses to start (exit 2, one line); where it can, the start line says
    agents get their own namespace."""
    no_sys_admin = [shutil.which("setpriv") or "setpriv", "--bounding-set=-sys_admin", "--"]
    env = stack_env(redis_url, namespace, tmp_path, **site.agent_settings("nobody", pidns="required"))
    proc = _agent_worker(env, site.root, no_sys_admin)
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("factory_worker:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert "FACTORY_AGENT__PID_NAMESPACE=required" in lines[0] and "CAP_SYS_ADMIN" in lines[0]
    env = stack_env(redis_url, namespace, tmp_path, **site.agent_settings("nobody"))
    worker = CeleryProc("worker", env, tmp_path, "w-nosysadmin", extra=["-c", "1"], cwd=site.root, prefix=no_sys_admin)
    procs.append(worker)
    worker.wait_ready()
    warned = [x for x in worker.log().splitlines() if "cannot get their own PID namespace here" in x]
    assert len(warned) == 1 and "FACTORY_AGENT__PID_NAMESPACE" in warned[0] and "WARNING" in warned[0], worker.log()
    if NO_PIDNS is None:
        contained = CeleryProc("worker", env, tmp_path, "w-contained", extra=["-c", "1"], cwd=site.root)
        procs.append(contained)
        contained.wait_ready()
        assert "each as PID 1 of its own PID namespace" in contained.log()
        assert "cannot get their own PID namespace" not in contained.log()
