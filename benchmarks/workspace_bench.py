"""Time from claim to worktree ready (``Workspace.prepare``), with a cold and a warm mirror, and disk per dispatch.

No Celery, no Redis: the workspace alone, on a synthetic repository served as a local bare remote (``file://``),
so the figures are git's and the workspace's own work, not a network's. ``prepare`` is what a dispatch does
between its claim's begin and the agent's start: fetch (or clone) the mirror under its lock, make the
worktree on the issue's branch, give it to the agent's uid/gid, make the result file.

Phases:
  cold     a fresh workspace root for every sample: the mirror is cloned, then the worktree made
  warm     one root, the mirror already cloned: a fetch, then the worktree (each sample a new issue)
  release  removing a worktree after its run
  dispatch the wired dispatch (``dispatch.single.execute`` on fakeredis, the configured command agent): from
           the claim to the agent's first instruction (a ``sh`` that stamps the time): begin, prepare (cold: a
           fresh root, so a clone; warm: a fetch), the agent's environment and spawn
Disk: a worktree's allocated bytes (``du``: the checkout; objects live once in the mirror) and the mirror's.

Options: --files, --file-kb, --commits (the repository), --cold-runs, --warm-runs, --uid (give worktrees to this
uid, e.g. 65534 when running as root: adds the chown walk), --no-dispatch (skip the dispatch phase), --json.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import emit, make_parser, make_say, stats

from factory_worker.config.settings import load_settings
from factory_worker.sources.base import Issue
from factory_worker.workspace import Workspace

say = make_say("workspace_bench")
GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.com",
}


def git(*args: str, cwd: Path | None = None) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True)


def make_repo(work: Path, files: int, file_kb: int, commits: int, seed: int = 7) -> str:
    """A bare remote with ``files`` files of about ``file_kb`` KiB in 20 directories and ``commits`` commits."""
    rnd = random.Random(seed)
    src, bare = work / "src", work / "remote.git"
    git("init", "--quiet", "--initial-branch=main", str(src))
    words = [f"word{n}" for n in range(500)]
    for n in range(files):
        path = src / f"dir{n % 20}" / f"file{n}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(" ".join(rnd.choice(words) for _ in range(file_kb * 150)) + "\n")
    git("add", "--all", cwd=src)
    git("commit", "--quiet", "-m", "initial", cwd=src)
    for c in range(commits - 1):
        for n in rnd.sample(range(files), min(10, files)):
            path = src / f"dir{n % 20}" / f"file{n}.txt"
            path.write_text(path.read_text() + f"change {c}\n")
        git("commit", "--quiet", "--all", "-m", f"change {c}", cwd=src)
    git("clone", "--quiet", "--bare", str(src), str(bare))
    return f"file://{bare}"


def du(path: Path) -> int:
    """Allocated bytes of a tree (st_blocks), as ``du`` counts them."""
    total = 0
    for here, dirs, names in os.walk(path):
        for name in (*dirs, *names):
            try:
                total += os.lstat(os.path.join(here, name)).st_blocks * 512
            except OSError:
                pass
    return total + os.lstat(path).st_blocks * 512


def dispatch_to_start(work: Path, url: str, runs: int, cold: bool) -> list[float]:
    """Seconds from the claim to the agent's first instruction, through ``execute`` (each run a new issue)."""
    import fakeredis

    from factory_worker.context import Context
    from factory_worker.dispatch.job import Job
    from factory_worker.dispatch.single import execute
    from factory_worker.loop.presence import publish_slots

    stamps = work / "stamps"
    stamps.mkdir(exist_ok=True)
    agent = ["sh", "-c", f'date +%s.%N > "{stamps}/$FACTORY_ISSUE_ID"']
    r = fakeredis.FakeRedis(decode_responses=True)
    kind = "cold" if cold else "warm"

    def context(n: int) -> Context:
        settings = load_settings(
            namespace=f"bench-{kind}-{n}",
            workspace={"repo_url": url, "root": str(work / f"dispatch-{kind}-{n if cold else 0}")},
            agent={"command": agent, "log_dir": str(work / "logs"), "workdir_root": str(work / "agents")},
            dispatch={"max_in_flight": 1000},
        )
        ctx = Context(settings, r)
        publish_slots(ctx, "bench", 1000)
        return ctx

    out, ctx = [], context(0)
    for n in range(runs + (0 if cold else 1)):  # warm: a first dispatch clones the mirror
        if cold:
            ctx = context(n)
        iid = f"d{kind}-{n}"
        t = time.time()
        claim = ctx.ledger.claim([iid]).claims[0]
        res = execute(Job(ctx, f"task-{iid}", {"id": iid, "title": "bench", "state": "ready"}, claim.token))
        if res.get("settled") != "done":
            raise RuntimeError(f"dispatch {iid}: {res}")
        if cold or n:
            out.append(float((stamps / iid).read_text()) - t)
    return out


def workspace(root: Path, url: str) -> Workspace:
    return Workspace.from_settings(load_settings(workspace={"repo_url": url, "root": str(root)}))


def main() -> int:
    ap = make_parser(__doc__)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--file-kb", type=int, default=2)
    ap.add_argument("--commits", type=int, default=50)
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--warm-runs", type=int, default=10)
    ap.add_argument("--uid", type=int, default=None, help="give the worktrees to this uid (its group too)")
    ap.add_argument("--no-dispatch", action="store_true", help="skip the dispatch phase (claim to agent start)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="workspace-bench-"))
    os.chmod(work, 0o755)  # an agent's uid must reach its worktree
    try:
        say(f"building a repository: {args.files} files of ~{args.file_kb} KiB, {args.commits} commits")
        url = make_repo(work, args.files, args.file_kb, args.commits)
        owner = (args.uid, None) if args.uid is not None else (None, None)
        cold, warm, release = [], [], []
        for n in range(args.cold_runs):
            ws = workspace(work / f"cold{n}", url)
            t = time.perf_counter()
            p = ws.prepare(Issue(id=f"cold-{n}", title="bench", state="ready"), 1, *owner)
            cold.append(time.perf_counter() - t)
            ws.release(p)
        ws = workspace(work / "warm", url)
        ws.release(ws.prepare(Issue(id="warm-up", title="bench", state="ready"), 1, *owner))
        tree_bytes = mirror_bytes = 0
        for n in range(args.warm_runs):
            t = time.perf_counter()
            p = ws.prepare(Issue(id=f"warm-{n}", title="bench", state="ready"), 1, *owner)
            warm.append(time.perf_counter() - t)
            if n == 0:
                tree_bytes, mirror_bytes = du(p.cwd) + du(p.tree.admin), du(p.mirror)
            t = time.perf_counter()
            ws.release(p)
            release.append(time.perf_counter() - t)
        dispatch: dict[str, list[float]] = {"cold": [], "warm": []}
        if not args.no_dispatch:
            dispatch["cold"] = dispatch_to_start(work, url, args.cold_runs, cold=True)
            dispatch["warm"] = dispatch_to_start(work, url, args.warm_runs, cold=False)
        summary = {
            "repository": {"files": args.files, "file_kb": args.file_kb, "commits": args.commits},
            "uid": args.uid,
            "cold_prepare_s": stats(cold),
            "warm_prepare_s": stats(warm),
            "release_s": stats(release),
            **({} if args.no_dispatch else {"claim_to_agent_cold_s": stats(dispatch["cold"])}),
            **({} if args.no_dispatch else {"claim_to_agent_warm_s": stats(dispatch["warm"])}),
            "disk_per_dispatch_mib": round(tree_bytes / 2**20, 2),
            "mirror_mib": round(mirror_bytes / 2**20, 2),
        }

        def human() -> None:
            r = summary["repository"]
            print(f"repository: {r['files']} files of ~{r['file_kb']} KiB, {r['commits']} commits (file://)")
            for key, label in (
                ("cold_prepare_s", "claim -> worktree ready, cold mirror (clone)"),
                ("warm_prepare_s", "claim -> worktree ready, warm mirror (fetch)"),
                ("release_s", "worktree removed after the run"),
                ("claim_to_agent_cold_s", "dispatch: claim -> agent started, cold mirror"),
                ("claim_to_agent_warm_s", "dispatch: claim -> agent started, warm mirror"),
            ):
                if key not in summary:
                    continue
                s = summary[key]
                print(f"{label:48s} median {s['median']:.3f} s (min {s['min']:.3f}, max {s['max']:.3f})")
            print(f"{'disk per dispatch (worktree + admin dir)':48s} {summary['disk_per_dispatch_mib']} MiB")
            print(f"{'mirror (once per repository)':48s} {summary['mirror_mib']} MiB")

        return emit(summary, args.json, human)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
