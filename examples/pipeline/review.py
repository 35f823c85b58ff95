#!/usr/bin/env python3
"""Example reviewer (stdlib only): accepts (exit 0) or rejects (exit 3) the implementer's work.

It reads ``$FACTORY_WORKDIR/CHANGES.md``. Without a ``Tests:`` line it rejects: it prints its verdict (the
factory hands that output to the implementer of the next round as ``$FACTORY_FEEDBACK``) and exits 3. So
every reviewed issue of the example takes two rounds. Exit codes: 0 accept, 3 reject, anything else fails.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)
REJECT = 3


def main() -> int:
    work = Path(os.environ["FACTORY_WORKDIR"]) / "CHANGES.md"
    text = work.read_text(encoding="utf-8") if work.is_file() else ""
    if not text:
        print("Nothing to review: CHANGES.md is missing.")
        return REJECT
    if "Tests:" not in text:
        print(f"Please add tests for the change (round {os.environ.get('FACTORY_ROUND', '?')} has none).")
        return REJECT
    print("LGTM")
    return 0


if __name__ == "__main__":
    sys.exit(main())
