"""A process that prepares one worktree and then waits to be killed: ``python -m tests.workspace_proc ROOT URL
ISSUE``. It prints the worktree's paths as one JSON line once the worktree is ready."""

from __future__ import annotations

import json
import sys
import time

from factory_worker.config.settings import load_settings
from factory_worker.sources.base import Issue
from factory_worker.workspace import Workspace


def main() -> None:
    root, url, issue_id = sys.argv[1:4]
    ws = Workspace.from_settings(load_settings(workspace={"repo_url": url, "root": root}))
    p = ws.prepare(Issue(id=issue_id, title="held", state="ready"), 1)
    print(json.dumps({"cwd": str(p.cwd), "admin": str(p.tree.admin), "lock": str(p.tree.lock_path)}), flush=True)
    if len(sys.argv) > 4 and sys.argv[4] == "release":
        ws.release(p)
        return
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
