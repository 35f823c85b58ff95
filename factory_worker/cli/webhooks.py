"""The control CLI's ``webhooks`` command (registered on :data:`factory_worker.cli.group.cli`): the webhook
receiver of :mod:`factory_worker.webhooks`, with the Celery sender and the agent stopper handed in here."""

from __future__ import annotations

from typing import Any

import click

from factory_worker.cli.group import cli, json_opt, load, open_context, tasks_for
from factory_worker.cli.output import Exit, emit


@cli.command("webhooks")
@click.option(
    "--serve",
    "serve_addr",
    default=None,
    metavar="[HOST:]PORT",
    help="receive webhooks over HTTP until interrupted: PORT on 127.0.0.1, HOST:PORT, or :PORT on every interface",
)
@json_opt
def webhooks_cmd(serve_addr: str | None, as_json: bool) -> None:
    """Receive signed GitHub, Linear and Slack webhooks (--serve PORT, 127.0.0.1): an issue event dispatches at
    once through the gate, a comment reaches the running agent or is a command. Without --serve: which
    endpoints are configured. Exit 0."""
    from factory_worker.webhooks.events import Service

    if serve_addr is None:
        cfg = load().webhooks
        data = {
            "endpoints": {f"/webhooks/{s}": cfg.secret(s) is not None for s in Service},
            "comments_to_inbox": cfg.relays_comments,
            "command_associations": cfg.command_associations,
        }

        def human(d: dict[str, Any]) -> None:
            for path, on in d["endpoints"].items():
                click.echo(f"{path}: {'configured' if on else 'not configured (404)'}")
            click.echo(f"comments to the running agent's FACTORY_INBOX: {'on' if d['comments_to_inbox'] else 'off'}")

        emit(data, as_json, human)
        return
    from factory_worker.ops.metrics import parse_addr
    from factory_worker.ops.operations import stop_agents
    from factory_worker.webhooks.server import serve

    host, port = parse_addr(serve_addr)
    ctx = open_context()
    send = tasks_for(ctx).send_agent
    raise Exit(serve(ctx, host, port, send=send, stop=stop_agents))
