"""A hostile agent (stdlib only): tries to reach its worker's credentials and to tamper with the worker's files.

Usage: ``hostile_agent.py OUT_DIR CONFIG_FILE ENV_FILE WORKER_CWD SOURCE_DIR``. Every attempt is recorded in
``OUT_DIR/attempts.json`` as ``{attempt, succeeded, detail}`` (``detail``: what it got, or why it failed),
with the uid, gid, groups, cwd and variable names it ran with. It always exits 0, so the dispatch completes.
"""

from __future__ import annotations

import glob
import json
import os
import sys

#: what an agent is given on purpose; any other FACTORY_* variable would be the worker's own
#: what the agent is given by its documented contract (README, "The agent"): ids and paths, no credential
GIVEN = {
    "FACTORY_ISSUE_ID",
    "FACTORY_ISSUE_JSON",
    "FACTORY_DISPATCH_TOKEN",
    "FACTORY_USAGE",
    "FACTORY_INBOX",
    "FACTORY_WORKDIR",
    "FACTORY_FEEDBACK",
    "FACTORY_RESULT",
    "FACTORY_REPO_DIR",
    "FACTORY_BRANCH",
    "FACTORY_BASE_SHA",
    "FACTORY_ROUND",
}
CREDENTIAL_NAMES = ("FACTORY_REDIS_URL=", "FACTORY_BROKER_URL=", "GITHUB_TOKEN=", "FLOWER_BASIC_AUTH=", "_TOKEN=")


def read(path: str) -> str:
    with open(path, "rb") as fh:
        return fh.read().decode("utf-8", "replace")


def write(path: str, text: str) -> str:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
    return f"wrote {path}"


def credentials_in_own_environment() -> dict[str, str]:
    found = {
        k: v
        for k, v in os.environ.items()
        if k not in GIVEN
        and (
            k.startswith("FACTORY_")
            or k in ("GITHUB_TOKEN", "FLOWER_BASIC_AUTH")
            or k.endswith(("_TOKEN", "_PASSWORD", "_SECRET"))
        )
    }
    if not found:
        raise LookupError(f"no credential among its variables {sorted(os.environ)}")
    return found


def credentials_in_any_environ() -> dict[str, str]:
    """Every /proc/*/environ it can read but its own; succeeds when one holds a credential-looking name."""
    readable, found = [], {}
    for path in glob.glob("/proc/[0-9]*/environ"):
        pid = path.split("/")[2]
        if pid == str(os.getpid()):
            continue
        try:
            text = read(path).replace("\0", "\n")
        except OSError:
            continue
        readable.append(pid)
        if any(name in text for name in CREDENTIAL_NAMES):
            found[pid] = text
    if not found:
        raise PermissionError(f"no credential in the {len(readable)} other environ(s) it could read {readable}")
    return found


def signal_parent(ppid: int) -> str:
    if ppid <= 0:  # its parent is outside its PID namespace (kill(0) would signal its own group)
        raise ProcessLookupError(f"no parent in sight (ppid {ppid})")
    os.kill(ppid, 0)
    return f"signalled {ppid}"


def other_processes() -> list[str]:
    """The processes /proc shows besides this one (in a PID namespace of its own, with its own /proc: none)."""
    others = [p for p in os.listdir("/proc") if p.isdigit() and p != str(os.getpid())]
    if not others:
        raise LookupError("/proc shows no process but this one")
    return others


def main() -> int:
    out, config, env_file, worker_cwd, source_dir = sys.argv[1:6]
    ppid = os.getppid()
    results = []

    def attempt(name, fn) -> None:
        try:
            got = fn()
            results.append({"attempt": name, "succeeded": True, "detail": str(got)[:4000]})
        except Exception as exc:
            results.append({"attempt": name, "succeeded": False, "detail": f"{type(exc).__name__}: {exc}"[:4000]})

    attempt("read /proc/$PPID/environ", lambda: read(f"/proc/{ppid}/environ"))
    attempt("find a credential in any /proc/*/environ", credentials_in_any_environ)
    attempt("read the worker's config file", lambda: read(config))
    attempt("read the worker's env file", lambda: read(env_file))
    attempt("find a credential in its own environment", credentials_in_own_environment)
    attempt("list the worker's cwd through /proc/$PPID/cwd", lambda: os.listdir(f"/proc/{ppid}/cwd"))
    attempt(
        "write factory.toml in the worker's cwd",
        lambda: write(os.path.join(worker_cwd, "factory.toml"), '[source]\npath = "/tmp/evil"\n'),
    )
    evil = '{"id": "EVIL", "title": "x", "state": "ready"}\n'
    attempt(
        "create a file in the issue source directory", lambda: write(os.path.join(source_dir, "injected.jsonl"), evil)
    )
    attempt("append to the issue source file", lambda: write(os.path.join(source_dir, "issues.jsonl"), evil))
    attempt("signal the worker", lambda: signal_parent(ppid))
    attempt("list the worker's processes", other_processes)
    report = {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "cwd": os.getcwd(),
        "env": sorted(os.environ),
        "results": results,
    }
    with open(os.path.join(out, "attempts.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
