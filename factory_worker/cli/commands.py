"""The control CLI's commands (click), a thin view over the core; :mod:`.ctl` is the entry point.

Every command has ``--json``. Errors (unreachable Redis, bad config, bad argument) are one line on
stderr and exit 2, never a traceback. Only Redis is needed, plus the broker for revoke and start-loop.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click
import redis

from factory_worker.cli import ledger as _ledger_commands  # noqa: F401  (registers the ledger's commands on ``cli``)
from factory_worker.cli import webhooks as _webhooks_command  # noqa: F401  (registers ``webhooks`` on ``cli``)
from factory_worker.cli.group import cli, json_opt, load, open_context, recovery_context, tasks_for
from factory_worker.cli.output import Exit, console, emit, table, ts
from factory_worker.cli.text import one_line
from factory_worker.config import essentials
from factory_worker.config.essentials import Essentials
from factory_worker.config.settings import MAX_ITERATIONS_CEILING, ConfigError
from factory_worker.context import Context
from factory_worker.ledger.core import LedgerError
from factory_worker.loop import status
from factory_worker.sources.base import SourceError

log = logging.getLogger(__name__)


@cli.command("loop-status")
@json_opt
def loop_status_cmd(as_json: bool) -> None:
    """Heartbeat, liveness, run, counters, and why the loop cannot make progress. Exit 0 live, 1 not, 2 error."""
    from factory_worker.ledger.redis_client import client_from_url
    from factory_worker.ops.operations import recovery_status

    e = essentials.read()  # only the settings it uses: it answers whatever the others say, as the early path
    r = client_from_url(e.redis_url)
    r.ping()
    data, code = recovery_status(r, e)

    def human(d: dict[str, Any]) -> None:
        from rich.markup import escape

        for line in status.lines(d, lambda t, tag: f"[{tag}]{t}[/{tag}]", lambda v: escape(one_line(v)), ts):
            console.print(line, highlight=False, soft_wrap=True)  # one line each, as the early path prints

    emit(data, as_json, human, code)


@cli.command("kill-loop")
@click.option("--force", is_flag=True, help="kill even when no live run is seen")
@click.option(
    "--release-agents", is_flag=True, help="also stop every running agent (whichever run sent it) and free their claims"
)
@json_opt
@click.pass_obj
def kill_loop_cmd(obj: dict[str, Any] | None, force: bool, release_agents: bool, as_json: bool) -> None:
    """Kill the live run and keep the loop stopped until start-loop. Exit 0 killed, 1 refused, 2 error."""
    from factory_worker.ops.operations import kill_loop

    ctx, e, problem = recovery_context()
    data, code = kill_loop(
        ctx,
        force=force,
        release_agents=release_agents,
        revoke=_revoker(ctx, e, problem),
        early=(obj or {}).get("early_kill"),
    )
    if problem:
        data["settings_error"] = problem

    def human(d: dict[str, Any]) -> None:
        if d.get("refused"):
            click.echo(f"refused: {d['refused']}", err=True)
            return
        if d["killed"]:
            what = f"killed run {d['killed']}; revoked {len(d['revoked'])} task(s)"
        elif d["last_run"]:
            last = d["last_run"]
            what = (
                f"no run was active (the last, {last['run_id'] or '-'}, ended as {last['status']}); the loop is killed"
            )
        else:
            what = "no run to kill; the loop is killed"
        released = f"; released {len(d['released_agents'])} agent(s)" if release_agents else ""
        click.echo(f"{what}{released}. It stays stopped: run start-loop.")

    if data.get("celery_revoke_error"):  # on stderr with --json too (its field says it on stdout)
        click.echo(
            f"warning: the Celery revoke was not sent ({data['celery_revoke_error']}); the Redis kill holds: every "
            "iteration and agent checks it first",
            err=True,
        )
    if problem and not data.get("refused"):
        click.echo(f"warning: {problem}: kill-loop used only the Redis URL, namespace and broker", err=True)
    emit(data, as_json, human, code)


def _revoker(ctx: Context, e: Essentials, problem: str | None) -> Callable[[list[str]], None]:
    """Celery's revoke of task ids through the configured broker (the Celery app of the full settings, or when
    they are invalid one of ``ctx``'s settings); it raises when the broker is unreachable or its URL invalid (the
    revoke is then not sent: kill-loop says so, and the Redis kill holds)."""

    def revoke(task_ids: list[str]) -> None:
        bad = [p for p in e.problems if "broker_url" in p]
        if bad:
            raise ConfigError(bad[0])
        from factory_worker.worker import app as celery_app

        app = celery_app.app if problem is None else celery_app.create_app(ctx.settings)
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
            app.control.revoke(task_ids, connection=conn)

    return revoke


@cli.command("start-loop")
@click.option(
    "--max-iterations", type=click.IntRange(1, MAX_ITERATIONS_CEILING), default=None, help="iterations of this run"
)
@json_opt
def start_loop_cmd(max_iterations: int | None, as_json: bool) -> None:
    """Clear a kill and start a run now (overlap policy applies). Exit 0 started, 1 skipped."""
    from factory_worker.ops.operations import start_loop

    ctx = open_context()
    start_run = tasks_for(ctx).start_run
    data, code = start_loop(ctx, lambda n, by: start_run(n, by=by, clear_kill=True), max_iterations)

    def human(d: dict[str, Any]) -> None:
        if not d["started"]:
            click.echo(f"skipped: {d['reason']}")
            return
        click.echo(
            ("cleared the kill; " if d["cleared_kill"] else "")
            + f"started run {d['run_id']}"
            + (" (paused: it claims nothing until resume)" if d["paused"] else "")
        )
        if not d["live_workers"]:
            click.echo(
                f"warning: no live worker: the run's tasks wait in {ctx.keys.loop_queue} until one starts "
                "(loop-status says so: no-worker, exit 1)",
                err=True,
            )

    emit(data, as_json, human, code)


@cli.command("run-once")
@click.option("--dry-run", is_flag=True, help="gate without claiming or dispatching anything")
@json_opt
def run_once_cmd(dry_run: bool, as_json: bool) -> None:
    """One iteration in this process; prints the IterationReport. Exit 0."""
    ctx = open_context()
    send = None if dry_run else tasks_for(ctx).send_agent
    from factory_worker.loop.iteration import (
        iterate,  # here, not at the top: loop-status and kill-loop start faster without it
    )

    report = iterate(ctx, send, dry_run=dry_run).as_dict()

    def human(d: dict[str, Any]) -> None:
        click.echo(
            f"pulled {d['pulled']}, dispatched {d['dispatched']}{' (dry run)' if d['dry_run'] else ''}"
            + (f"; stopped: {d['stopped']} (nothing claimed)" if d["stopped"] else "")
        )
        if d["dispatches"]:
            table("dispatched" + (" (would)" if d["dry_run"] else ""), d["dispatches"], ["issue", "task_id", "fence"])
        if d["skipped"]:
            table("skipped", d["skipped"], ["issue", "reason"])
        if d["ruled_out"]:
            table(
                "left out by the eligibility rules (source.*)",
                [{"issues": n, "reason": r} for r, n in d["ruled_out"].items()],
                ["issues", "reason"],
            )
        if d["unexamined"]:
            click.echo(f"{d['unexamined']} more issue(s) not gated: the fleet is full and enough wait already")

    emit(report, as_json, human)


@cli.command("pause")
@json_opt
def pause_cmd(as_json: bool) -> None:
    """Claim nothing new; running agents go on; the run stays alive. Exit 0."""
    from factory_worker.ops.operations import set_paused

    data, code = set_paused(recovery_context()[0], True)
    emit(data, as_json, lambda d: click.echo("paused" if d["changed"] else "already paused"), code)


@cli.command("resume")
@json_opt
def resume_cmd(as_json: bool) -> None:
    """Undo pause. Exit 0."""
    from factory_worker.ops.operations import set_paused

    data, code = set_paused(recovery_context()[0], False)
    emit(data, as_json, lambda d: click.echo("resumed" if d["changed"] else "was not paused"), code)


@cli.command("doctor")
@json_opt
def doctor_cmd(as_json: bool) -> None:
    """Check a deployment's Redis and Celery settings. Exit 0 all good, 1 findings, 2 error."""
    from factory_worker.ops.doctor import format_report, run_doctor

    data, code = run_doctor(load())
    emit(data, as_json, lambda d: click.echo(format_report(d)), code)


@cli.command("metrics")
@click.option(
    "--serve",
    "serve_addr",
    default=None,
    metavar="[HOST:]PORT",
    help="serve Prometheus metrics over HTTP until interrupted: PORT on 127.0.0.1, HOST:PORT, "
    "or :PORT on every interface",
)
@json_opt
def metrics_cmd(serve_addr: str | None, as_json: bool) -> None:
    """Print the Prometheus metrics once, or serve them with --serve PORT (127.0.0.1). Exit 0."""
    from factory_worker.ops.metrics import parse_addr, render, serve, snapshot

    ctx = open_context()
    if serve_addr:
        host, port = parse_addr(serve_addr)
        raise Exit(serve(ctx, host, port))
    if as_json:
        emit(snapshot(ctx), True, lambda d: None)
    click.echo(render(ctx), nl=False)
    raise Exit(0)


@cli.command("up")
@click.option("--no-flower", is_flag=True, help="do not start Flower")
@click.option("--workers", type=click.IntRange(1, 16), default=1, help="worker processes to start")
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, help="pool size of each worker")
def up_cmd(no_flower: bool, workers: int, concurrency: int) -> None:
    """Dev stack in one process tree: Redis (embedded when none is configured), a loop worker, agent
    worker(s), beat, Flower (127.0.0.1:5555). Ctrl-C stops everything; exit 0."""
    from factory_worker.ops.devstack import run_stack

    raise Exit(run_stack(load(), flower=not no_flower, workers=workers, concurrency=concurrency))


def _broker_errors() -> tuple[type[BaseException], ...]:
    """kombu's errors, when a command imported kombu (only those that talk to the broker do)."""
    mod = sys.modules.get("kombu.exceptions")
    return (mod.KombuError,) if mod is not None else ()


def main(argv: list[str] | None = None, early_kill: Any = None) -> int:
    """Run the command: one line on stderr and exit 2 for any error; never a traceback. With ``--json`` the
    error is also a JSON object on stdout (``{"error": ..., "exit": 2}``). ``early_kill``: the kill record
    :func:`factory_worker.cli.quick.kill_first` wrote (``kill-loop`` does the rest for it; an error after it says
    that the kill itself stands)."""
    as_json = "--json" in (sys.argv[1:] if argv is None else argv)

    def error(message: str) -> int:
        return _error(message, early_kill, as_json)

    try:
        cli.main(args=argv, prog_name="factory-worker", standalone_mode=False, obj={"early_kill": early_kill})
        return 0
    except Exit as e:
        return e.code
    except click.exceptions.Abort:
        return error("aborted")
    except click.ClickException as e:
        return error(f"error: {e.format_message()}")
    except ConfigError as e:
        return error(str(e))
    except _broker_errors() as e:
        return error(f"cannot reach the broker: {_first_line(e)}")
    except (redis.ConnectionError, redis.TimeoutError) as e:
        return error(f"cannot reach Redis: {_first_line(e) or type(e).__name__}")
    except redis.exceptions.InvalidResponse as e:
        return error(f"cannot talk to Redis (is it a Redis server?): {_first_line(e)}")
    except LedgerError as e:  # the ledger's own refusals say what is wrong; their class name adds nothing
        return error(f"error: {_first_line(e) or type(e).__name__}")
    except (redis.RedisError, SourceError, OSError, ValueError) as e:
        return error(f"error: {type(e).__name__}: {_first_line(e)}")


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message ("" when it has none)."""
    return next(iter(str(exc).splitlines()), "")


def _error(message: str, early_kill: Any, as_json: bool = False) -> int:
    """The one stderr line of a failed command (and with ``--json`` the same as JSON on stdout); exit 2."""
    if early_kill is not None:
        message += (
            f" (the kill itself was written: run {early_kill.run_id} is stopped; revoke, release and "
            "notify did not run)"
        )
    click.echo(f"factory-worker: {message}", err=True)
    if as_json:
        click.echo(json.dumps({"error": message, "exit": 2}))
    return 2
