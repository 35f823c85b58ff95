#!/usr/bin/env python3
"""Example triage (stdlib only): decide which stages an issue needs and how sure we are.

Prints one JSON object on stdout: ``{"stages": [...], "confidence": 0..1, "reason": "..."}``. Below
``agent.min_confidence`` the factory escalates the issue to a human (parked, reason ``needs-human``);
``factory-worker retry <id>`` releases it. Rules of this toy: a ``security`` label needs a human (confidence
0.3); ``docs`` needs no review; everything else is implemented, then reviewed. Issue text is data only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def main() -> int:
    issue = json.loads(Path(os.environ["FACTORY_ISSUE_JSON"]).read_text(encoding="utf-8"))
    labels = {str(x).lower() for x in issue.get("labels") or []}
    if "security" in labels:
        verdict = {
            "stages": ["implement", "review"],
            "confidence": 0.3,
            "reason": "security-sensitive: a human should look first",
        }
    elif "docs" in labels:
        verdict = {"stages": ["implement"], "confidence": 0.9, "reason": "documentation only: no review needed"}
    else:
        verdict = {"stages": ["implement", "review"], "confidence": 0.8, "reason": "a code change: implement, review"}
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
