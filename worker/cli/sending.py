"""`papermail sending ...`: see, pause and resume sending (provider pause, reputation guard)."""

from __future__ import annotations

import sys
from datetime import timedelta

import click
from sqlalchemy import or_, select

from worker import delivery
from worker.cli.common import FullHelpGroup, echo_json, require_schema
from worker.config import get_settings
from worker.db import session_scope
from worker.models import Delivery, DeliveryState, utcnow


@click.group("sending", cls=FullHelpGroup)
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
    from worker.alerts import check_quietly

    check_quietly(kinds=["paused"])


@command.command("resume")
@click.option("--no-send", is_flag=True, help="Only lift the pause; send nothing now.")
@click.option(
    "--days",
    default=2,
    show_default=True,
    type=click.IntRange(1, 30),
    help="Send the deliveries left pending by editions of this many recent days.",
)
def resume(no_send: bool, days: int) -> None:
    """Lift a pause, then send what it left pending (never plans anyone new).

    With a broker the pending deliveries go back on the queue; without one they are sent
    here, through the same rate limit.

    \b
    Example:
      papermail sending resume
      papermail sending resume --no-send
    """
    require_schema()
    settings = get_settings()
    with session_scope() as session:
        changed = delivery.resume_sending(session)
    click.echo("sending resumed" if changed else "sending was not paused")
    if no_send:
        return
    since = utcnow().date() - timedelta(days=days - 1)
    with session_scope() as session:
        ids = list(
            session.scalars(
                select(Delivery.id)
                .where(
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.edition_date >= since,
                    or_(Delivery.scheduled_at.is_(None), Delivery.scheduled_at <= utcnow()),
                )
                .order_by(Delivery.id)
            )
        )
    if not ids:
        click.echo("no pending deliveries to send")
        return
    if not settings.in_process:
        from worker.tasks import enqueue_ids

        enqueue_ids(ids, settings)
        click.echo(f"{len(ids)} pending deliveries queued for the workers")
        return
    with click.progressbar(length=len(ids), label="sending", file=sys.stderr) as bar:
        out = delivery.send_in_process(ids, settings=settings, on_progress=bar.update)
    click.echo(
        f"sent {out.sent}, skipped {out.skipped}, failed {out.failed}, "
        f"unknown {out.unknown}, still pending {len(out.retry)}"
    )
    if out.paused:
        click.secho(f"sending paused again: {out.paused}", fg="red", err=True)
    if out.failed or out.unknown or out.paused:
        raise SystemExit(1)
