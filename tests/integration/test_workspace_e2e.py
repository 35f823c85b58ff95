"""Coding agents on a real repository, end to end: real git (local bare repositories as the remotes), three real
``celery worker`` s and a ``beat``, the fake GitHub as the tracker and the pulls API (every third answer on
``/pulls`` lost). Ten issues: each issue's branch on its remote holds exactly its agent's commit, each has one
pull request, the done comment links it; the agents never hold a credential and never see each other's files;
an issue routed by label lands in the other repository; a refused push backs off and the retry pushes once; a
SIGKILLed worker's worktree is reclaimed when it starts again, and nothing (worktree, process) is left."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from factory_worker.ledger.core import Ledger
from factory_worker.writeback.outbox import backlog
from tests.fake_github import FakeGitHub
from tests.git_support import make_remote, remote_branches, remote_log
from tests.support import CeleryProc, assert_audit_clean, host_pid, pid_alive, settings_from, stack_env, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.timeout(240)]

SECRET = "ghp_WorkerOnly0123456789abcdefXYZ"
SLOW, ROUTED, REFUSED = 3, 7, 5  # SIGKILLed once / labelled for the other repository / its first push refused

#: records what it is given and sees, then does what a coding agent does: writes <id>.txt and commits it (a retry
#: finds it committed already: the branch continues) and writes its result. ``slow-once``: the first run waits
#: to be killed with its worker.
AGENT = r"""
import json, os, pathlib, subprocess, sys, time
out = pathlib.Path(os.environ["AGENT_OUT"])
issue = json.load(open(os.environ["FACTORY_ISSUE_JSON"]))
iid, cwd = str(issue["id"]), pathlib.Path.cwd()
since = int(pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # tests.support.host_pid
def rec(event, **kw):
    with open(out / "runs.jsonl", "a") as fh:
        fh.write(json.dumps({"issue": iid, "event": event, "t": time.time(), "pid": os.getpid(),
                             "pidns": os.readlink("/proc/self/ns/pid"), "since": since,
                             "host": os.environ.get("AGENT_HOST"), **kw}) + "\n")
theirs = sorted(p.name for p in cwd.glob("*.txt") if p.name != iid + ".txt")
rec("start", cwd=str(cwd), env=dict(os.environ), theirs=theirs, remote=subprocess.run(
    ["git", "config", "remote.origin.url"], capture_output=True, text=True).stdout.strip())
if "slow-once" in issue.get("labels", []) and not (out / f"slow-{iid}").exists():
    (out / f"slow-{iid}").write_text("x")
    time.sleep(120)
time.sleep(float(os.environ.get("AGENT_SLEEP", "0.5")))
mine = cwd / (iid + ".txt")
if not mine.exists():
    mine.write_text(issue["title"] + "\n")
    git = ["git", "-c", "user.name=agent", "-c", "user.email=agent@example.com"]
    subprocess.run(git + ["add", iid + ".txt"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "agent: " + iid], check=True)
open(os.environ["FACTORY_RESULT"], "w").write(json.dumps({"summary": "wrote " + iid + ".txt", "cost_usd": 0.5,
                                                          "tokens": 1000, "title": "Issue " + iid}))
rec("end", theirs=sorted(p.name for p in cwd.glob("*.txt") if p.name != iid + ".txt"))
"""


def hooks(remote: Path, log: Path, refuse_branch: str | None = None) -> None:
    """``post-receive`` logs every branch update the remote accepted; ``pre-receive`` refuses the first push of
    ``refuse_branch``."""
    post = remote / "hooks" / "post-receive"
    post.write_text(f'#!/bin/sh\nwhile read old new ref; do echo "$ref $new" >> "{log}"; done\n')
    post.chmod(post.stat().st_mode | stat.S_IXUSR)
    if refuse_branch:
        mark = remote / "refused-once"
        pre = remote / "hooks" / "pre-receive"
        pre.write_text(
            "#!/bin/sh\nwhile read old new ref; do\n"
            f'  if [ "$ref" = "refs/heads/{refuse_branch}" ] && [ ! -e "{mark}" ]; then\n'
            f'    touch "{mark}"; echo "refused once, for the test" >&2; exit 1\n'
            "  fi\ndone\n"
        )
        pre.chmod(pre.stat().st_mode | stat.S_IXUSR)


def runs(out: Path) -> list[dict]:
    p = out / "runs.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def agent_processes(script: Path) -> list[int]:
    """Pids of live processes running the agent script."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if str(script).encode() in Path(f"/proc/{pid}/cmdline").read_bytes() and pid_alive(int(pid)):
                found.append(int(pid))
        except OSError:
            continue
    return found


def test_ten_issues_three_workers_one_pull_request_each(redis_url, real_redis, namespace, tmp_path, procs):
    widgets, gadgets = tmp_path / "remotes" / "widgets.git", tmp_path / "remotes" / "gadgets.git"
    widgets.parent.mkdir()
    wurl, gurl = make_remote(widgets), make_remote(gadgets)
    pushes = tmp_path / "pushes.log"
    hooks(widgets, pushes, refuse_branch=f"factory/{REFUSED}")
    hooks(gadgets, pushes)
    script = tmp_path / "repo_agent.py"
    script.write_text(AGENT)

    with FakeGitHub() as gh:
        for n in range(1, 11):
            labels = ("agent", *(("slow-once",) if n == SLOW else ()), *(("gadgets",) if n == ROUTED else ()))
            gh.add(n, f"issue {n}", labels)
        gh.drop_every, gh.drop_part = 3, "/pulls"  # every third answer of the pulls API is lost
        gh.branches = lambda head: head in remote_branches(widgets) or head in remote_branches(gadgets)
        env = stack_env(
            redis_url,
            namespace,
            tmp_path,
            GITHUB_TOKEN=SECRET,  # the worker's: the tracker, the pulls API (and an https push)
            AGENT_SLEEP="0.5",
            FACTORY_AGENT__COMMAND=json.dumps([sys.executable, str(script)]),
            FACTORY_AGENT__ENV_ALLOWLIST=json.dumps(["PATH", "AGENT_OUT", "AGENT_SLEEP", "AGENT_HOST"]),
            FACTORY_SOURCE__KIND="github",
            FACTORY_SOURCE__GITHUB_REPO=gh.repo,
            FACTORY_SOURCE__GITHUB_API_URL=gh.url,
            FACTORY_SOURCE__GITHUB_LABELS=json.dumps(["agent"]),
            FACTORY_TRACKER__WRITE_BACK="true",
            FACTORY_TRACKER__POLL_S="0.2",
            FACTORY_LOOP__LEASE_TTL_S="5",
            FACTORY_DISPATCH__MAX_IN_FLIGHT="6",
            FACTORY_WORKSPACE__REPO_URL=wurl,
            FACTORY_WORKSPACE__REPOS=json.dumps({"gadgets": gurl}),
            FACTORY_WORKSPACE__PUSH="true",
        )
        roots = {name: tmp_path / f"ws-{name}" for name in ("w1", "w2", "w3")}

        def worker(name: str, run: str = "") -> CeleryProc:
            own = {**env, "FACTORY_WORKSPACE__ROOT": str(roots[name]), "AGENT_HOST": name}
            return CeleryProc("worker", own, tmp_path, f"{name}{run}", extra=["-c", "2"])

        workers = {name: worker(name) for name in roots}
        procs.extend(workers.values())
        for w in workers.values():
            w.wait_ready()
        procs.append(CeleryProc("beat", env, tmp_path, "beat"))
        ledger = Ledger.from_settings(settings_from(env), real_redis)
        out = tmp_path / "out"

        # the slow issue's worker is SIGKILLed while its agent works in its worktree
        slow = wait_until(
            lambda: next((r for r in runs(out) if r["issue"] == str(SLOW) and r["event"] == "start"), None),
            60,
            what="the slow issue's agent started",
        )
        orphan = Path(slow["cwd"])
        assert orphan.is_dir() and orphan.parent == roots[slow["host"]] / "trees"
        slow_pid = host_pid(slow)  # as this process sees it (in its own PID namespace the agent is pid 1)
        workers[slow["host"]].kill()  # the worker and its pool; the agent dies with them (PDEATHSIG)
        wait_until(lambda: not pid_alive(slow_pid), 10, what="the killed worker's agent gone")
        assert orphan.is_dir()  # left behind
        again = worker(slow["host"], "-again")
        procs.append(again)
        again.wait_ready()
        wait_until(lambda: not orphan.exists(), 30, what="the orphan worktree reclaimed by the restarted worker")

        def settled() -> bool:
            g = ledger.gauges()
            return g["done"] == 10 and backlog(ledger.r, ledger.keys)["pending"] == 0

        wait_until(settled, 120, interval=0.5, what="ten issues done and written back")

        # each issue's branch on its remote holds exactly its agent's commit; the routed one only in the other
        for n in range(1, 11):
            remote = gadgets if n == ROUTED else widgets
            assert remote_log(remote, f"factory/{n}") == [f"agent: {n}"], n
        assert f"factory/{ROUTED}" not in remote_branches(widgets)
        assert {r["remote"] for r in runs(out) if r["issue"] == str(ROUTED) and r["event"] == "start"} == {gurl}

        # one pull request per issue, though every third answer was lost
        assert gh.dropped >= 3
        assert sorted(p.head for p in gh.pulls.values()) == sorted(f"factory/{n}" for n in range(1, 11))
        for n in range(1, 11):
            (pr,) = gh.open_pulls(f"factory/{n}")
            assert pr.title == f"Issue {n}" and f"Closes #{n}" in pr.body and f"wrote {n}.txt" in pr.body
            result = ledger.result(str(n))
            assert result is not None and result["pushed"] is True and result["pr_url"].endswith(f"/pull/{pr.number}")
            done = [c for c in gh.issues[n].comments if "**done**" in c]
            assert len(done) == 1 and result["pr_url"] in done[0] and f"> wrote {n}.txt" in done[0]
        finished = [r for r in runs(out) if r["event"] == "end"]  # each reported 1000 tokens, settled or not
        assert ledger.counters()["result_tokens"] == 1000 * len(finished), [(r["issue"], r["host"]) for r in finished]

        # the refused push: a failed attempt, backed off, and the retry pushed once
        refused = [
            line for line in pushes.read_text().splitlines() if line.startswith(f"refs/heads/factory/{REFUSED} ")
        ]
        assert len(refused) == 1  # accepted once (the refused push is not in the post-receive log)
        assert (widgets / "refused-once").exists()
        mine = sorted((r for r in runs(out) if r["issue"] == str(REFUSED)), key=lambda r: r["t"])
        first_end = next(r for r in mine if r["event"] == "end")  # then its push was refused
        retry = next(r for r in mine if r["event"] == "start" and r["t"] > first_end["t"])
        assert retry["t"] - first_end["t"] >= 1.0  # not before its backoff window (base 1 s) ended
        assert "publish failed: push" in (ledger.r.hget(ledger.keys.errors, str(REFUSED)) or "publish failed: push")
        assert sum(1 for line in pushes.read_text().splitlines()) == 10  # one accepted push per issue

        # the agents never held a credential and never saw each other's files
        started = [r for r in runs(out) if r["event"] == "start"]
        for r in started:
            assert SECRET not in json.dumps(r["env"]) and "GITHUB_TOKEN" not in r["env"], r["issue"]
            assert not [k for k in r["env"] if "TOKEN" in k and k != "FACTORY_DISPATCH_TOKEN"]
        for r in runs(out):
            assert r["theirs"] == [], r
        spans = sorted(
            (r["t"], e["t"]) for r in started for e in runs(out) if e["event"] == "end" and host_pid(e) == host_pid(r)
        )
        assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "no two agents ever ran at once"
        assert len({r["cwd"] for r in started}) == len(started)  # a worktree of its own, every dispatch

        # nothing is left: no worktree, no lock, no agent process
        for root in roots.values():
            left = sorted(os.listdir(root / "trees")) if (root / "trees").is_dir() else []
            assert left == [], left
        assert agent_processes(script) == []
    assert_audit_clean(redis_url, namespace)
