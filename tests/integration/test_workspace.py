"""The workspace across processes, with real git: a SIGKILLed process's worktree is reclaimed (a live one's
never), processes share one cold mirror, and the push credential reaches only the factory's own git."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from tests.git_http import GitHTTPServer
from tests.git_support import NOBODY, agent_commits, git, issue, make_remote, remote_branches, workspace

REPO = Path(__file__).resolve().parents[2]
TOKEN = "ghp_FactorySecret0123456789abcdefXYZ"


def hold(root: Path, url: str, issue_id: str, *extra: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.workspace_proc", str(root), url, issue_id, *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line, "the holder died before its worktree was ready"
    return proc, json.loads(line)


def test_a_sigkilled_processs_worktree_is_reclaimed_and_a_live_ones_is_not(tmp_path):
    remote = tmp_path / "r.git"
    url = make_remote(remote)
    root = tmp_path / "ws"
    dead, d = hold(root, url, "dead")
    live, lv = hold(root, url, "live")
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(10)
        assert Path(d["cwd"]).is_dir() and Path(d["lock"]).exists()  # what the killed process left
        ws = workspace(tmp_path, repo_url=url)
        gone = ws.reclaim()
        assert gone == [Path(d["cwd"]).name]
        assert not Path(d["cwd"]).exists() and not Path(d["admin"]).exists() and not Path(d["lock"]).exists()
        assert Path(lv["cwd"]).is_dir() and Path(lv["admin"]).is_dir()  # its process is alive: untouched
        again = ws.prepare(issue("dead"), 2)  # the branch is free again
        ws.release(again)
    finally:
        live.kill()
        live.wait(10)
    # the live one died too: the next process's first use of the mirror reclaims it
    ws = workspace(tmp_path, repo_url=url)
    p = ws.prepare(issue("other"), 1)
    ws.release(p)
    assert not Path(lv["cwd"]).exists()
    assert sorted(x.name for x in (root / "trees").iterdir()) == []


def test_processes_share_one_cold_mirror(tmp_path):
    url = make_remote(tmp_path / "r.git")
    root = tmp_path / "ws"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.workspace_proc", str(root), url, f"p{n}", "release"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len({o["cwd"] for o in outs}) == 4
    mirrors = list((root / "mirrors").glob("*.git*"))
    assert len(mirrors) == 1 and mirrors[0].suffix == ".git"
    assert sorted(x.name for x in (root / "trees").iterdir()) == []


# -- the credential ------------------------------------------------------------------------------------------
def scan() -> list[dict]:
    """Every process whose argv or environment holds the token: pid, uid, comm, where, and its parents."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        where = [w for w, data in (("argv", cmdline), ("env", environ)) if TOKEN.encode() in data]
        if where:
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            found.append(
                {
                    "pid": int(pid),
                    "ppid": int(fields["PPid"]),
                    "uid": int(fields["Uid"].split()[0]),
                    "comm": fields["Name"].strip(),
                    "argv": cmdline.split(b"\0")[:3],
                    "where": where,
                }
            )
    return found


@pytest.fixture
def open_dir():
    path = Path(tempfile.mkdtemp(prefix="fw-cred-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def git_spy(open_dir, monkeypatch):
    """A ``git`` first on PATH that logs its uid, argv and environment, then runs the real git: every git the
    workspace starts, as the worker or as the agent, is seen."""
    log = open_dir / "git-calls.jsonl"
    log.touch()
    os.chmod(log, 0o666)
    bindir = open_dir / "bin"
    bindir.mkdir()
    os.chmod(bindir, 0o755)
    spy = bindir / "git"  # sh, not Python: the agent's uid must be able to run it too
    spy.write_text(
        "#!/bin/sh\n"
        "args=$(printf '%s\\0' \"$@\" | base64 -w0); envs=$(env -0 | base64 -w0)\n"
        f'printf \'%s %s %s\\n\' "$(id -u)" "$args" "$envs" >> {log}\n'
        f'exec {shutil.which("git")} "$@"\n'
    )
    os.chmod(spy, 0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return log


def spied(line: str) -> dict:
    uid, args, envs = line.split(" ")
    env = dict(x.split("=", 1) for x in base64.b64decode(envs).decode().split("\0") if "=" in x)
    argv = base64.b64decode(args).decode().split("\0")[:-1]
    rest = list(argv)
    while rest and rest[0].startswith("-"):  # -c key=value pairs, --git-dir=...
        rest = rest[2:] if rest[0] == "-c" else rest[1:]
    return {"uid": int(uid), "argv": argv, "command": rest[0] if rest else "", "env": env}


def test_the_token_reaches_only_the_factorys_own_git(open_dir, git_spy, caplog, monkeypatch):
    caplog.set_level("DEBUG")
    served = open_dir / "served"
    served.mkdir()
    make_remote(served / "widgets.git")
    git("--git-dir", str(served / "widgets.git"), "config", "http.receivepack", "true")
    seen: list[list[dict]] = []
    stop = threading.Event()

    def sample() -> None:  # every process on the machine, all the time the workspace works
        while not stop.is_set():
            seen.append(scan())

    with GitHTTPServer(served, "x-access-token", TOKEN, probe=lambda: seen.append(scan())) as server:
        url = server.url("widgets.git")
        owner = NOBODY if os.geteuid() == 0 else None
        monkeypatch.setenv("GITHUB_TOKEN", TOKEN)  # the worker's own credential, in its environment
        ws = workspace(open_dir, repo_url=url, push=True)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        i = issue("c1")
        p = ws.prepare(i, 1, *(owner or (None, None)))
        assert TOKEN not in json.dumps(p.env)
        agent_commits(p, {"a.txt": "a"}, "agent", owner=owner)
        (p.cwd / "left.txt").write_text("left")
        out = ws.publish(p, i)
        ws.release(p)
        stop.set()
        sampler.join(10)
        assert out.pushed and "factory/c1" in remote_branches(served / "widgets.git")
        assert server.requests and server.refused  # it asked for the token, and got it
        monkeypatch.delenv("GITHUB_TOKEN")
        no_token = workspace(open_dir, repo_url=url, root=str(open_dir / "ws2"))
        with pytest.raises(Exception) as exc:
            no_token.prepare(issue("c2"), 1)
        assert "terminal prompts disabled" in str(exc.value) or "Authentication failed" in str(exc.value)

    holders = [h for snapshot in seen for h in snapshot]
    assert holders, "the scan saw no process holding the token: it proves nothing"
    assert not [h for h in holders if "argv" in h["where"]]  # never in any argv
    spy_helpers = {"sh", "base64", "id", "env"}  # the git spy's own shell, before it execs git
    assert {h["comm"] for h in holders} <= {"git", "git-remote-http", "askpass", *spy_helpers}, holders
    assert {"git", "git-remote-http"} <= {h["comm"] for h in holders}  # the scan did see the network git
    assert not [h for h in holders if h["uid"] == NOBODY[0]]  # never a process of the agent's uid
    calls = [spied(line) for line in git_spy.read_text().splitlines()]
    with_token = [c for c in calls if TOKEN in json.dumps(c["env"])]
    assert with_token
    for c in calls:
        assert TOKEN not in " ".join(c["argv"])
        if TOKEN in json.dumps(c["env"]):
            assert c["command"] in ("fetch", "push", "remote"), c["argv"]  # the network calls only
            assert c["uid"] != NOBODY[0]
    agent_side = [c for c in calls if c["command"] in ("add", "diff", "commit")]
    assert agent_side and all(TOKEN not in json.dumps(c["env"]) for c in agent_side)
    if owner:
        assert {c["uid"] for c in agent_side} == {NOBODY[0]}  # the leftovers were committed as the agent
    assert TOKEN not in caplog.text
    for path in (open_dir / "ws").rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert TOKEN.encode() not in path.read_bytes(), path  # not in the mirror's config, not in a file
