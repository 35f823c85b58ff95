#!/usr/bin/env python3
"""Make the repository example's remote: a local bare repository with one commit on ``main``, so the example
runs with no network (``python3 examples/repo/make_remote.py PATH``; nothing happens when PATH exists). Prints
its ``file://`` URL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GIT_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": tempfile.gettempdir(),
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "factory-worker example",
    "GIT_AUTHOR_EMAIL": "example@example.invalid",
    "GIT_COMMITTER_NAME": "factory-worker example",
    "GIT_COMMITTER_EMAIL": "example@example.invalid",
}


def git(*args: str, cwd: Path | None = None) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True)


def make(path: Path) -> str:
    path = path.resolve()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        bare, seed = tmp / "bare.git", tmp / "seed"
        git("init", "--quiet", "--bare", "--initial-branch=main", str(bare))
        git("init", "--quiet", "--initial-branch=main", str(seed))
        (seed / "README.md").write_text(
            "# The factory-worker repository example\n\nEach issue's agent adds `notes/<id>.md` on its branch.\n"
        )
        git("add", "README.md", cwd=seed)
        git("commit", "--quiet", "-m", "Start the example repository", cwd=seed)
        git("push", "--quiet", str(bare), "main:main", cwd=seed)
        os.rename(bare, path)
        shutil.rmtree(tmp)
    return f"file://{path}"


if __name__ == "__main__":
    print(make(Path(sys.argv[1] if len(sys.argv) > 1 else ".factory/example-remote.git")))
