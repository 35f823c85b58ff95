"""What a dispatch does once a step has ended: the next stage, a round back with feedback, done, a failed
attempt, an escalation to a human. Pure decisions (no Redis, no Celery); ``lifecycle.finish`` acts on them.
A single agent is the one-stage case (:func:`decide_single`): done, failed, released or lost.

* Triage (optional, step 1) prints JSON ``{"stages": [...], "confidence": 0..1, "reason": "..."}`` (validated by
  :class:`TriageVerdict`); invalid output is a failed attempt with a clear error; a confidence below
  ``agent.min_confidence`` escalates (parked ``needs-human``, no attempt counted).
* A stage that exits :data:`~factory_worker.config.stages.REJECT_EXIT` (3) rejects: the attempt goes back to
  its ``back_to`` stage (default: the one before it) with its output as feedback, starting the next round;
  more than ``agent.max_rounds`` rounds fail the attempt.
* Any other failure follows the stage's ``on_failure``: ``fail`` the attempt, ``retry`` the stage (up to
  ``retries`` times), or go ``back`` like a rejection.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator

from factory_worker.config.settings import AgentSettings
from factory_worker.config.stages import REJECT_EXIT, TRIAGE
from factory_worker.ledger.stages import Progress
from factory_worker.ledger.states import Outcome, StageOutcome

log = logging.getLogger(__name__)

#: Where the worker's own lines in an agent log start (header and exit trailer, see agents/command.py).
_HEADER, _TRAILER = b"# factory agent:", b"# exit:"


class TriageVerdict(BaseModel):
    """A triage's answer: which stages to run, in order, how sure it is, and why."""

    stages: list[str] = Field(min_length=1, max_length=20)
    confidence: float = Field(ge=0, le=1)
    reason: str = Field(default="", max_length=2000)

    @field_validator("stages")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("names a stage twice")
        return v


class Move(StrEnum):
    """A :class:`Decision`'s kind: what the claim does after a step."""

    NEXT = "next"  # hand over to the next stage (the claim stays held)
    COMPLETE = "complete"  # done for good
    FAIL = "fail"  # a failed attempt: backoff, parked after max_attempts
    ESCALATE = "escalate"  # parked for a human (needs-human), no attempt counted
    RELEASE = "release"  # interrupted: no attempt counted, progress kept
    LOST = "lost"  # the claim is not ours: nothing is written


@dataclass(frozen=True)
class Decision:
    """What to do after a step (:class:`Move`), and with what: the next ``stage`` and its round, retries,
    plan and feedback; the error of a failure or an escalation; what the dispatch made in its workspace
    (``record``, ``ledger/results.py``: written with the settle)."""

    kind: Move
    outcome: str = ""  # the finished step's outcome for the history: an Outcome or a StageOutcome word
    stage: str = ""
    round: int = 1
    retries: int = 0
    plan: list[str] | None = None
    feedback: str = ""
    error: str = ""
    record: dict[str, Any] | None = None


def parse_triage(output: str, known: list[str]) -> TriageVerdict:
    """The verdict in a triage's output (all of it, else its last line that is a JSON object); ValueError
    with a one-line reason when there is none or it is invalid."""
    text = output.strip()
    candidates = [text] + [line.strip() for line in reversed(text.splitlines()) if line.strip().startswith("{")]
    data = None
    for candidate in candidates:
        try:
            data = json.loads(candidate)
            break
        except ValueError:
            continue
    if not isinstance(data, dict):
        snippet = text[:200].replace("\n", " ") or "(no output)"
        raise ValueError(f"triage output is not a JSON object: {snippet}")
    try:
        verdict = TriageVerdict.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "output"
        raise ValueError(f"triage output invalid: {where}: {first.get('msg', 'invalid')}") from None
    unknown = [s for s in verdict.stages if s not in known]
    if unknown:
        raise ValueError(f"triage output invalid: unknown stage {unknown[0]!r} (configured: {', '.join(known)})")
    return verdict


def following(plan: list[str], stage: str) -> str | None:
    """The stage after ``stage`` in ``plan`` (None: it was the last)."""
    if stage not in plan:
        return None
    i = plan.index(stage)
    return plan[i + 1] if i + 1 < len(plan) else None


def back_target(back_to: str | None, plan: list[str], stage: str) -> str:
    """Where a rejection of ``stage`` goes: its ``back_to`` when the plan has it, else the stage before it."""
    if back_to and back_to in plan:
        return back_to
    i = plan.index(stage) if stage in plan else 0
    return plan[i - 1] if i > 0 else stage


def decide_single(outcome: str, error: str) -> Decision:
    """The move after a single agent's run (the one-stage case of :func:`decide`, without progress)."""
    if outcome == Outcome.LEASE_LOST:
        return Decision(Move.LOST, outcome, error=error)
    if outcome == Outcome.INTERRUPTED:
        return Decision(Move.RELEASE, outcome, error=error)
    if outcome == Outcome.BUDGET:
        return Decision(Move.ESCALATE, outcome, error=error)
    return Decision(Move.COMPLETE if outcome == Outcome.OK else Move.FAIL, outcome, error=error)


def decide(
    agent: AgentSettings, prog: Progress, outcome: str, exit_code: int | None, error: str, output: str
) -> Decision:
    """The next move after step ``prog.step`` (stage ``prog.stage``) ended with ``outcome``."""
    if outcome == Outcome.LEASE_LOST:
        return Decision(Move.LOST, outcome)
    if outcome == Outcome.INTERRUPTED:
        return Decision(Move.RELEASE, outcome, error=error)
    if outcome == Outcome.BUDGET:
        return Decision(Move.ESCALATE, outcome, error=error)
    names = [s.name for s in agent.pipeline()]
    if prog.stage == TRIAGE:
        if outcome != Outcome.OK:
            return Decision(Move.FAIL, outcome, error=f"triage failed: {error or outcome}")
        try:
            verdict = parse_triage(output, names)
        except ValueError as exc:
            return Decision(Move.FAIL, StageOutcome.INVALID, error=str(exc))
        if verdict.confidence < agent.min_confidence:
            why = (
                f"needs-human: triage confidence {verdict.confidence:g} < agent.min_confidence "
                f"{agent.min_confidence:g}: {verdict.reason or 'no reason given'}"
            )
            return Decision(Move.ESCALATE, StageOutcome.ESCALATED, error=why)
        return Decision(Move.NEXT, Outcome.OK, stage=verdict.stages[0], plan=list(verdict.stages))
    plan = prog.plan or names
    cfg = agent.stage(prog.stage)
    if cfg is None:
        return Decision(Move.FAIL, outcome, error=f"stage {prog.stage!r} is no longer configured (agent.stages)")
    if outcome == Outcome.OK:
        nxt = following(plan, prog.stage)
        if nxt is None:
            return Decision(Move.COMPLETE, Outcome.OK)
        return Decision(Move.NEXT, Outcome.OK, stage=nxt, round=prog.round, feedback=prog.feedback)
    rejected = outcome == Outcome.FAILED and exit_code == REJECT_EXIT
    if rejected or cfg.on_failure == "back":
        word = StageOutcome.REJECTED if rejected else outcome
        if prog.round >= agent.max_rounds:
            return Decision(
                Move.FAIL,
                word,
                error=f"stage {prog.stage!r} {word} in round {prog.round} of "
                f"agent.max_rounds={agent.max_rounds}: {error or outcome}",
            )
        return Decision(
            Move.NEXT, word, stage=back_target(cfg.back_to, plan, prog.stage), round=prog.round + 1, feedback=output
        )
    if cfg.on_failure == "retry" and prog.retries < cfg.retries:
        return Decision(
            Move.NEXT, outcome, stage=prog.stage, round=prog.round, retries=prog.retries + 1, feedback=prog.feedback
        )
    return Decision(Move.FAIL, outcome, error=f"stage {prog.stage!r}: {error or outcome}")


def read_output(log_path: Path | None, limit: int) -> str:
    """What an agent printed (its log without the worker's header and exit lines): the last ``limit`` bytes."""
    if log_path is None:
        return ""
    try:
        data = log_path.read_bytes()
    except OSError:
        return ""
    if data.startswith(_HEADER):
        data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    cut = data.rfind(b"\n" + _TRAILER)
    if cut >= 0:
        data = data[: cut + 1]
    elif data.startswith(_TRAILER):
        data = b""
    return data[-limit:].decode("utf-8", "replace")
