"""A recording stage agent for the staged-dispatch tests: ``stage_agent.py <stage> <issue id>``.

Appends start/end records to ``$AGENT_OUT/stages.jsonl``. By stage and the issue's labels:
- ``triage``: prints ``{"stages": ["implement", "review"], "confidence": ..., "reason": ...}``; confidence 0.1
  with ``unsure``, else 0.9; ``bad-triage`` prints something that is not JSON.
- ``implement``: appends ``round <n>`` to ``$FACTORY_WORKDIR/work.txt``; ``slow-implement``: sleeps
  ``$AGENT_SLOW_S`` (default 3) first; ``slow-implement-once``: the first implementation sleeps 60 s (to be
  stopped).
- ``review``: ``reject-once``: the first review prints a verdict and exits 3 (rejected); ``slow-review-once``:
  the first review sleeps 60 s (to be killed); ``wait-inbox``: the review waits (10 s at most) for a line
  in ``$FACTORY_INBOX`` (a Slack reply).
The start record carries the inbox's content (None without one).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    stage, iid = sys.argv[1], sys.argv[2]
    out = Path(os.environ["AGENT_OUT"])
    issue = json.loads(Path(os.environ["FACTORY_ISSUE_JSON"]).read_text())
    labels = issue.get("labels") or []
    workdir = Path(os.environ["FACTORY_WORKDIR"])
    feedback = (
        Path(os.environ["FACTORY_FEEDBACK"]).read_text() if os.path.exists(os.environ["FACTORY_FEEDBACK"]) else None
    )

    since = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # see tests.support.host_pid

    def rec(event: str, **kw: object) -> None:
        with open(out / "stages.jsonl", "a") as fh:
            fh.write(
                json.dumps(
                    {
                        "issue": iid,
                        "stage": stage,
                        "event": event,
                        "t": time.time(),
                        "pid": os.getpid(),
                        "pidns": os.readlink("/proc/self/ns/pid"),
                        "since": since,
                        "round": int(os.environ["FACTORY_ROUND"]),
                        "step": int(os.environ["FACTORY_STEP"]),
                        "env_stage": os.environ["FACTORY_STAGE"],
                        "cwd": os.getcwd(),
                        "workdir": str(workdir),
                        "token": os.environ["FACTORY_DISPATCH_TOKEN"],
                        **kw,
                    }
                )
                + "\n"
            )

    inbox = os.environ.get("FACTORY_INBOX")
    if inbox and "wait-inbox" in labels and stage == "review":  # a human's reply reaches the running stage
        deadline = time.time() + 10
        while time.time() < deadline and not (os.path.exists(inbox) and Path(inbox).read_text().strip()):
            time.sleep(0.05)
    rec("start", feedback=feedback, inbox=Path(inbox).read_text() if inbox and os.path.exists(inbox) else None)
    code = 0
    if stage == "triage":
        if "bad-triage" in labels:
            print("I think this is fine")
        else:
            conf = 0.1 if "unsure" in labels else 0.9
            print(json.dumps({"stages": ["implement", "review"], "confidence": conf, "reason": f"labels {labels}"}))
    elif stage == "implement":
        if "slow-implement" in labels:
            time.sleep(float(os.environ.get("AGENT_SLOW_S", "3")))
        if "slow-implement-once" in labels and not (out / f"slow-implement-{iid}").exists():
            (out / f"slow-implement-{iid}").write_text("x")
            time.sleep(60)
        with open(workdir / "work.txt", "a") as fh:
            fh.write(f"round {os.environ['FACTORY_ROUND']}\n")
    elif stage == "review":
        work = (workdir / "work.txt").read_text() if (workdir / "work.txt").exists() else ""
        rec("read", work=work)
        if "slow-review-once" in labels and not (out / f"slow-review-{iid}").exists():
            (out / f"slow-review-{iid}").write_text("x")
            time.sleep(60)
        if "reject-once" in labels and not (out / f"rejected-{iid}").exists():
            (out / f"rejected-{iid}").write_text("x")
            print("REVIEW: please add a test for the empty case")
            code = 3
    rec("end", code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
