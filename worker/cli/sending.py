"""`papermail sending ...`: see, pause and resume sending (provider pause, reputation guard)."""

from __future__ import annotations

import click

from worker import delivery
from worker.cli.common import echo_json, require_schema
from worker.db import session_scope


@click.group("sending")
def command() -> None:
    """Pause or resume all sending.

    Sending pauses by itself when the provider refuses to send (account paused, quota) or
    when an edition's bounce or complaint rate passes SES's review thresholds.

    \b
    Example:
      papermail sending status
      papermail sending resume
    """


@command.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def status(as_json: bool) -> None:
    """Whether sending is paused, and why.

    \b
    Example:
      papermail sending status --json
    """
    require_schema()
    with session_scope() as session:
        paused = delivery.sending_paused(session)
    if as_json:
        echo_json({"paused": paused is not None, "reason": paused})
    elif paused:
        click.secho(f"PAUSED: {paused}", fg="red")
    else:
        click.echo("sending is active")


@command.command("pause")
@click.option("--reason", required=True, help="Why (recorded).")
def pause(reason: str) -> None:
    """Stop all sending until resumed; queued deliveries stay pending.

    \b
    Example:
      papermail sending pause --reason "investigating bounces"
    """
    require_schema()
    with session_scope() as session:
        delivery.pause_sending(session, reason, by="cli")
    click.echo(f"sending paused: {reason}")


@command.command("resume")
def resume() -> None:
    """Resume sending after a pause; pending deliveries go out on the next run.

    \b
    Example:
      papermail sending resume && papermail digest run
    """
    require_schema()
    with session_scope() as session:
        changed = delivery.resume_sending(session)
    click.echo("sending resumed" if changed else "sending was not paused")
