#!/usr/bin/env python3
"""A recipe, not run by the tests (it needs the ``claude`` CLI and a model API key): Claude Code as the factory's
coding agent. Give it as the agent command::

    FACTORY_AGENT__COMMAND='["python3", "examples/repo/claude_code.py"]'
    FACTORY_AGENT__ENV_ALLOWLIST='["PATH", "LANG", "ANTHROPIC_API_KEY"]'   # the model's key only

It runs ``claude -p <prompt> --output-format json`` in the worktree (its cwd; ``HOME`` is a directory of its
own beside it, so the CLI's own files are never committed), with edits allowed and only the ``git`` commands a
commit needs, and turns the CLI's JSON answer into ``$FACTORY_RESULT`` (the summary, cost and tokens the
factory records and puts in the pull request). It does not push: the factory does, with the worker's token,
which the agent never gets. The issue's text goes to the model as the task, never to a shell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

#: What the CLI may do without asking: edit files, and stage and commit them (not push, not anything else).
ALLOWED_TOOLS = "Read Edit Write Glob Grep Bash(git status:*) Bash(git diff:*) Bash(git add:*) Bash(git commit:*)"
TIMEOUT_S = float(os.environ.get("CLAUDE_TIMEOUT_S", "1500"))  # below agent.timeout_s


def prompt(issue: dict) -> str:
    return (
        "You are working on the git repository in the current directory, on the branch "
        f"{os.environ.get('FACTORY_BRANCH', '')}. Resolve the issue below: change the code, run what checks you "
        "can, and commit your changes with a clear message (git add, git commit). Do not push and do not switch "
        "branches. End with a short summary of what you changed.\n\n"
        f"Issue {issue.get('id')}: {issue.get('title')}\n\n{issue.get('body') or ''}"
    )


def main() -> int:
    issue = json.loads(Path(os.environ["FACTORY_ISSUE_JSON"]).read_text(encoding="utf-8"))
    argv = [
        "claude",
        "-p",
        prompt(issue),
        "--output-format",
        "json",
        "--permission-mode",
        "acceptEdits",
        "--allowedTools",
        ALLOWED_TOOLS,
    ]
    git_identity = {
        "GIT_AUTHOR_NAME": "Claude Code (factory-worker)",
        "GIT_AUTHOR_EMAIL": "agent@example.invalid",
        "GIT_COMMITTER_NAME": "Claude Code (factory-worker)",
        "GIT_COMMITTER_EMAIL": "agent@example.invalid",
    }
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=TIMEOUT_S, env={**os.environ, **git_identity}, check=False
    )
    sys.stderr.write(proc.stderr[-20000:])
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        print(proc.stdout[-20000:])
        return proc.returncode or 1
    usage = answer.get("usage") or {}
    tokens = sum(v for k, v in usage.items() if k.endswith("_tokens") and isinstance(v, int))
    result = {"summary": str(answer.get("result") or "")[:60000], "tokens": tokens}
    if isinstance(answer.get("total_cost_usd"), (int, float)):
        result["cost_usd"] = answer["total_cost_usd"]
    Path(os.environ["FACTORY_RESULT"]).write_text(json.dumps(result), encoding="utf-8")
    print(result["summary"])
    return 1 if proc.returncode or answer.get("is_error") else 0


if __name__ == "__main__":
    sys.exit(main())
