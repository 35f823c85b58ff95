#!/usr/bin/env python3
"""The repository example's agent (stdlib only): a stand-in for a coding agent, run by the factory in a git
worktree of the example repository, on the issue's branch (``FACTORY_EXAMPLE=repo bash scripts/run-example.sh``).

It reads the issue from ``$FACTORY_ISSUE_JSON``, writes ``notes/<id>.md`` (the title and body, as data) in its
working directory (the worktree, ``$FACTORY_REPO_DIR``), commits it on ``$FACTORY_BRANCH`` and writes what it
did to ``$FACTORY_RESULT``. The factory then pushes the branch: this agent has no credential and never pushes.
A retried issue finds its note committed already (its branch continues) and adds nothing. It exits 1 for the
``always-fails`` label (backoff, then parked).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path


def main() -> int:
    issue = json.loads(Path(os.environ["FACTORY_ISSUE_JSON"]).read_text(encoding="utf-8"))
    issue_id, title = str(issue.get("id", "")), str(issue.get("title", ""))
    if "always-fails" in (issue.get("labels") or []):
        print(f"giving up on {issue_id} (always-fails)")
        return 1
    repo = Path(os.environ.get("FACTORY_REPO_DIR") or ".")
    note = repo / "notes" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', issue_id).lstrip('.') or '_'}.md"
    if note.exists():
        print(f"{note.relative_to(repo)} is there already (an earlier attempt): nothing to add")
    else:
        note.parent.mkdir(exist_ok=True)
        note.write_text(f"# {title}\n\n{issue.get('body') or ''}\n", encoding="utf-8")
        git = ["git", "-c", "user.name=example agent", "-c", "user.email=agent@example.invalid"]
        subprocess.run([*git, "add", "--", str(note)], cwd=repo, check=True)
        subprocess.run([*git, "commit", "--quiet", "-m", f"Add a note for {issue_id}"], cwd=repo, check=True)
        print(f"committed {note.relative_to(repo)} on {os.environ.get('FACTORY_BRANCH')}")
    result = {"summary": f"Wrote {note.relative_to(repo)} for {issue_id}.", "title": f"{issue_id}: {title}"[:200]}
    Path(os.environ["FACTORY_RESULT"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
