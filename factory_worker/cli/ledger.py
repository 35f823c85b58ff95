"""The control CLI's ledger commands: audit, ledger accept, dispatches, explain, retry (registered on
:data:`factory_worker.cli.group.cli`, a thin view over the ledger like the rest)."""

from __future__ import annotations

import re
from typing import Any

import click

from factory_worker.cli.group import cli, json_opt, open_context
from factory_worker.cli.output import emit, printable, table, ts
from factory_worker.ledger.core import STATES
from factory_worker.ledger.records import step_text
from factory_worker.ledger.states import Gate


@cli.command("audit")
@json_opt
def audit_cmd(as_json: bool) -> None:
    """Check the ledger's invariants; print every violation. Exit 0 clean, 1 violations, 2 error."""
    from factory_worker.ops.audit import audit

    ctx = open_context()
    data = audit(ctx.redis, ctx.keys)

    def human(d: dict[str, Any]) -> None:
        for v in d["violations"]:
            click.echo(f"VIOLATION {v['check']}: {v['subject']}: {v['detail']}")
        click.echo(
            f"audit: {'clean' if d['clean'] else str(len(d['violations'])) + ' violation(s)'} "
            f"(namespace {d['namespace']})"
        )

    emit(data, as_json, human, 0 if data["clean"] else 1)


@cli.group("ledger")
def ledger_group() -> None:
    """The ledger's identity (the ledger-loss guard)."""


@ledger_group.command("accept")
@json_opt
def ledger_accept_cmd(as_json: bool) -> None:
    """Adopt the current ledger after a loss: safe mode ends (done issues it lost may run again). Exit 0."""
    from factory_worker.ledger import guard

    ctx = open_context()
    data = guard.accept(ctx.redis, ctx.keys)
    emit(
        data,
        as_json,
        lambda d: click.echo(
            f"accepted ledger generation {d['generation']}"
            + (f" in place of {', '.join(d['superseded'])}" if d["superseded"] else " (nothing was lost)")
        ),
    )


def _clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, keeping its start (what failed), marked with "..."."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


@cli.command("dispatches")
@click.option("--state", type=click.Choice(STATES), default=None, help="only this state")
@json_opt
def dispatches_cmd(state: str | None, as_json: bool) -> None:
    """The ledger, issue by issue. Exit 0."""
    ctx = open_context()
    rows = ctx.ledger.entries(state) if state else ctx.ledger.all_entries()
    rows.sort(key=lambda r: (STATES.index(r["state"]), _natural(r["issue"])))
    from factory_worker.ledger.usage import costs

    spent = costs(ctx.redis, ctx.keys, [r["issue"] for r in rows])
    last = ctx.ledger.view.last_steps(r["issue"] for r in rows)  # a staged issue's last kept step
    for r in rows:
        r["cost_usd"] = spent.get(r["issue"])
        if r["issue"] in last:
            r["last_step"] = step_text(last[r["issue"]])

    def human(d: list[dict[str, Any]]) -> None:
        shown = [
            {
                **r,
                "since/until": ts(r.get("until_ms") or r.get("parked_ms") or r.get("completed_ms")),
                "last_error": _clip(r.get("last_error") or "", 80) or None,
                "last_step": _clip(r.get("last_step") or "", 60) or None,
            }
            for r in d
        ]
        columns = ["issue", "state", "since/until", "attempts", "fence", "cost_usd", "last_error"]
        table("dispatches", shown, columns + (["last_step"] if last else []))

    emit(rows, as_json, human)


def _natural(text: str) -> list[Any]:
    """Sort key: EX-2 before EX-10. Runs of digits compare by value without int() (any length, any script's
    digits: an id from the ledger is whatever is stored), the rest as text."""
    return [(len(p.lstrip("0")), p.lstrip("0")) if n % 2 else (0, p) for n, p in enumerate(re.split(r"(\d+)", text))]


@cli.command("explain")
@click.argument("issue")
@json_opt
def explain_cmd(issue: str, as_json: bool) -> None:
    """Why ISSUE is or is not dispatched now. Exit 0; 1 when neither the ledger nor the source has it."""
    from factory_worker.ops.operations import explain

    e = explain(open_context(), _issue_arg(issue))
    code = 1 if e.state == Gate.UNKNOWN else 0
    emit(e.as_dict(), as_json, lambda d: click.echo(printable(f"{d['issue']}: {d['state']}: {d['text']}")), code)


@cli.command("retry")
@click.argument("issue")
@json_opt
def retry_cmd(issue: str, as_json: bool) -> None:
    """Give a parked or backing-off ISSUE a fresh attempt budget. Exit 0; 1 when neither the ledger nor the source
    has it; a done ISSUE is refused (2)."""
    from factory_worker.ops.operations import retry

    data, code = retry(open_context(), _issue_arg(issue))

    def human(d: dict[str, Any]) -> None:
        if d["unknown"]:
            click.echo(printable(f"{issue}: unknown: neither the ledger nor the source has this id"))
        elif d["was_parked"]:
            click.echo(f"{issue}: unparked (had {d['attempts_before']} attempts); it is claimable again")
        elif d["had_backoff"] or d["attempts_before"]:
            click.echo(f"{issue}: backoff cleared (had {d['attempts_before']} attempts)")
        else:
            click.echo(f"{issue}: nothing to retry (not parked, not backing off, no failed attempts)")

    emit(data, as_json, human, code)


def _issue_arg(issue: str) -> str:
    if not issue.strip():
        raise click.BadParameter("must not be empty", param_hint="ISSUE")
    return issue
