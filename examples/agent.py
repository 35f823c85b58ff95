#!/usr/bin/env python3
"""A tiny example agent (stdlib only) for factory_worker's command runner.

It reads the issue from ``$FACTORY_ISSUE_JSON``, "works" for a short random time (0.2-1.0 s, or exactly
``$FACTORY_AGENT_SLEEP_S``), appends one line saying what it did to
``$FACTORY_AGENT_OUTPUT_DIR/<id>.txt`` (default ``./.factory/agent-output``), prints it, and exits 1 when
the issue has the ``always-fails`` label. Issue text is only ever treated as data.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)


def main() -> int:
    path = os.environ.get("FACTORY_ISSUE_JSON")
    if not path:
        print("agent.py: FACTORY_ISSUE_JSON is not set (run me through factory_worker)", file=sys.stderr)
        return 2
    issue = json.loads(Path(path).read_text(encoding="utf-8"))
    issue_id = str(issue.get("id", ""))
    title = str(issue.get("title", ""))
    labels = [str(x) for x in issue.get("labels") or []]

    pause = os.environ.get("FACTORY_AGENT_SLEEP_S")
    time.sleep(float(pause) if pause else random.uniform(0.2, 1.0))

    out_dir = Path(os.environ.get("FACTORY_AGENT_OUTPUT_DIR") or ".factory/agent-output")
    out_dir.mkdir(parents=True, exist_ok=True)
    safe_id = re.sub(r"[^A-Za-z0-9._-]", "_", issue_id).lstrip(".") or "_"
    fails = "always-fails" in labels
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    what = "gave up (always-fails)" if fails else "worked on"
    line = (
        f"{stamp} pid={os.getpid()} token={os.environ.get('FACTORY_DISPATCH_TOKEN', '?')} {what} {issue_id}: {title!r}"
    )
    with open(out_dir / f"{safe_id}.txt", "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    print(line, flush=True)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
