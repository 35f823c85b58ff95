#!/usr/bin/env python3
"""Example implementer (stdlib only): "works" on the issue in the attempt's shared directory.

It appends to ``$FACTORY_WORKDIR/CHANGES.md`` (the directory every stage of this attempt shares). In a later
round it reads the reviewer's verdict from ``$FACTORY_FEEDBACK`` (a file: empty in round 1) and addresses it.
Exits 1 for an issue labelled ``always-fails`` (watch the attempt back off and park).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def main() -> int:
    issue = json.loads(Path(os.environ["FACTORY_ISSUE_JSON"]).read_text(encoding="utf-8"))
    if "always-fails" in (issue.get("labels") or []):
        print("cannot do this one", file=sys.stderr)
        return 1
    work = Path(os.environ["FACTORY_WORKDIR"]) / "CHANGES.md"
    feedback_path = Path(os.environ.get("FACTORY_FEEDBACK", ""))
    feedback = feedback_path.read_text(encoding="utf-8").strip() if feedback_path.is_file() else ""
    rnd = os.environ.get("FACTORY_ROUND", "1")
    time.sleep(float(os.environ.get("FACTORY_AGENT_SLEEP_S") or 0.5))
    with open(work, "a", encoding="utf-8") as fh:
        fh.write(f"## Round {rnd}: {issue.get('title', '')!r}\n- changed the code\n")
        if feedback:
            fh.write(f"- addressed the review: {feedback.splitlines()[0]}\n- Tests: added\n")
    print(f"round {rnd}: wrote {work.name}" + (" (addressing the review)" if feedback else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
