"""Staged dispatch settings and decisions (pure): validation, triage parsing, rejection rounds, retries, and
what Flower shows of a stage task."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest

from factory_worker.config.settings import ConfigError, load_settings
from factory_worker.dispatch.decisions import Progress, decide, parse_triage, read_output

STAGES = [
    {"name": "implement", "command": ["impl", "{id}"], "on_failure": "retry", "retries": 1},
    {"name": "review", "command": ["rev"], "back_to": "implement"},
]


def agent(**kw):
    return load_settings(agent={"command": ["true"], "stages": STAGES, **kw}).agent


def test_single_command_stays_the_one_stage_case():
    a = load_settings(agent={"command": ["true"]}).agent
    assert not a.staged and [s.name for s in a.pipeline()] == ["agent"]
    t = load_settings(agent={"command": ["true"], "triage": {"command": ["t"]}}).agent
    assert t.staged and [s.name for s in t.pipeline()] == ["agent"]


@pytest.mark.parametrize(
    "stages,needle",
    [
        ([{"name": "a", "command": ["x"]}, {"name": "a", "command": ["y"]}], "used twice"),
        ([{"name": "a", "command": ["x"], "back_to": "b"}, {"name": "b", "command": ["y"]}], "not this or an earlier"),
        ([{"name": "A b", "command": ["x"]}], "lower-case"),
        ([{"name": "a", "command": "x y"}], "not a shell string"),
        ([{"name": "a", "command": ["x"], "on_failure": "back"}], "needs back_to"),
        ([{"name": "a", "command": ["x"], "on_fail": "retry"}], "unknown setting"),
    ],
)
def test_bad_stage_settings_are_one_clear_line(stages, needle):
    with pytest.raises(ConfigError) as err:
        load_settings(agent={"command": ["true"], "stages": stages})
    msg = str(err.value)
    assert needle in msg and "\n" not in msg and "agent.stages" in msg


def test_stages_from_the_environment(monkeypatch):
    monkeypatch.setenv("FACTORY_AGENT__STAGES", json.dumps(STAGES))
    monkeypatch.setenv("FACTORY_AGENT__TRIAGE__COMMAND", '["triage", "{id}"]')
    monkeypatch.setenv("FACTORY_AGENT__MAX_ROUNDS", "2")
    a = load_settings().agent
    assert [s.name for s in a.stages] == ["implement", "review"] and a.triage.command == ["triage", "{id}"]
    assert a.max_rounds == 2


def test_triage_output_is_validated():
    v = parse_triage(
        'warming up\n{"stages": ["review"], "confidence": 0.7, "reason": "small"}\n', ["implement", "review"]
    )
    assert v.stages == ["review"] and v.confidence == 0.7
    for out, needle in [
        ("nope", "not a JSON object"),
        ('{"stages": [], "confidence": 1}', "stages"),
        ('{"stages": ["x"], "confidence": 1}', "unknown stage 'x'"),
        ('{"stages": ["review"], "confidence": 7}', "confidence"),
    ]:
        with pytest.raises(ValueError, match=needle):
            parse_triage(out, ["implement", "review"])


def test_decisions():
    a = agent(triage={"command": ["t"]}, min_confidence=0.5, max_rounds=2)
    tri = Progress(1, "triage")
    assert decide(a, tri, "ok", 0, "", '{"stages": ["implement", "review"], "confidence": 0.2}').kind == "escalate"
    d = decide(a, tri, "ok", 0, "", '{"stages": ["review"], "confidence": 0.9}')
    assert (d.kind, d.stage, d.plan) == ("next", "review", ["review"])
    assert decide(a, tri, "ok", 0, "", "garbage").kind == "fail"
    plan = ["implement", "review"]
    assert decide(a, Progress(2, "implement", plan=plan), "ok", 0, "", "").stage == "review"
    assert decide(a, Progress(3, "review", plan=plan), "ok", 0, "", "").kind == "complete"
    d = decide(a, Progress(3, "review", plan=plan), "failed", 3, "x", "fix it")
    assert (d.kind, d.stage, d.round, d.feedback, d.outcome) == ("next", "implement", 2, "fix it", "rejected")
    assert decide(a, Progress(5, "review", round=2, plan=plan), "failed", 3, "x", "").kind == "fail"  # max_rounds
    assert decide(a, Progress(3, "review", plan=plan), "failed", 1, "x", "").kind == "fail"  # on_failure fail
    d = decide(a, Progress(2, "implement", plan=plan), "timeout", None, "slow", "")
    assert (d.kind, d.stage, d.retries) == ("next", "implement", 1)
    assert decide(a, Progress(2, "implement", retries=1, plan=plan), "timeout", None, "", "").kind == "fail"
    assert decide(a, Progress(2, "implement", plan=plan), "interrupted", None, "", "").kind == "release"
    assert decide(a, Progress(2, "implement", plan=plan), "lease-lost", None, "", "").kind == "lost"


def test_read_output_drops_the_workers_lines(tmp_path: Path):
    log = tmp_path / "a.log"
    log.write_bytes(b"# factory agent: issue='x'\n# a markdown title\nline\n# exit: outcome=ok code=0\n")
    assert read_output(log, 1000) == "# a markdown title\nline\n"
    assert read_output(log, 5) == "line\n"
    assert read_output(tmp_path / "missing", 10) == ""


def test_flower_shows_the_issue_and_the_stage_never_the_token():
    from factory_worker.sources.base import Issue
    from factory_worker.worker import tasks

    with mock.patch.object(tasks.agent_stage, "apply_async") as send:
        tasks.send_stage("stage-1", Issue(id="I-9", title="secret plan", state="ready"), "4:owner.1", "review", 3, "r1")
    kw = send.call_args.kwargs
    assert kw["argsrepr"] == repr(["I-9", "review", "step=3", "fence=4", "r1"]) and kw["kwargsrepr"] == "{}"
    assert "owner" not in kw["argsrepr"] and json.dumps(kw["args"]) and json.dumps(kw["kwargs"])
