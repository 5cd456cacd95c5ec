"""`papermail resend`: send an edition again, without ever duplicating by accident."""

from __future__ import annotations

import sys

import click

from worker import operations
from worker.cli.common import date_option, echo_json, parse_date, require_schema
from worker.config import get_settings
from worker.db import session_scope
from worker.delivery import sending_paused
from worker.errors import PapermailError


@click.command("resend")
@date_option("Edition date, YYYY-MM-DD (required).")
@click.option("--subscriber", "email", metavar="EMAIL", help="Re-send this subscriber's edition.")
@click.option(
    "--state",
    type=click.Choice(operations.RESENDABLE_STATES),
    help="Re-send every delivery of the date in this state.",
)
@click.option(
    "--reason",
    default="operator resend",
    show_default=True,
    help="Why; recorded in the delivery's attempt history.",
)
@click.option("--dry-run", is_flag=True, help="List who would get what; change nothing.")
@click.option("--force", is_flag=True, help="Also re-send editions already sent or delivered.")
@click.option(
    "--include-suppressed",
    is_flag=True,
    help="Also send to suppressed addresses (asks for confirmation).",
)
@click.option("--yes", is_flag=True, help="Confirm --include-suppressed without asking.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(
    date_: str | None,
    email: str | None,
    state: str | None,
    reason: str,
    dry_run: bool,
    force: bool,
    include_suppressed: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Re-send one subscriber's edition, or every failed/unknown/skipped/bounced one of a date.

    The resend carries the papers the edition originally had (re-rendered with today's
    template), goes through the same queue and rate limit, and is recorded in the
    delivery's attempt history. An edition already sent or delivered needs --force; a
    suppressed address needs --include-suppressed, confirmed.

    \b
    Example:
      papermail resend --date 2026-11-27 --state unknown --dry-run
      papermail resend --date 2026-11-27 --subscriber ada@example.org --reason "lost mail"
    """
    if date_ is None:
        raise click.UsageError("--date is required (the edition to re-send)")
    require_schema()
    settings = get_settings()
    edition = parse_date(date_)
    with session_scope() as session:
        paused = sending_paused(session)
        if paused and not dry_run:
            raise PapermailError(
                f"sending is paused ({paused}); nothing re-queued. "
                "Fix the cause, `papermail sending resume`, then resend"
            )
        plan = operations.plan_resend(
            session,
            edition,
            subscriber_email=email,
            state=state,
            force=force,
            include_suppressed=include_suppressed,
        )
    to_send = plan.to_send
    if include_suppressed and not dry_run and any(i.suppressed for i in to_send) and not yes:
        names = ", ".join(i.email for i in to_send if i.suppressed)
        if not click.confirm(f"send to suppressed address(es) {names}?", default=False):
            raise PapermailError("nothing sent: sending to suppressed addresses was not confirmed")
    if dry_run:
        # The real resend's own code, in a transaction rolled back: the same subscriber
        # re-check, address check and selection ("nothing new" is skipped, not sent).
        operations.forecast_resend(
            plan, settings=settings, reason=reason, include_suppressed=include_suppressed
        )
    if dry_run or not to_send:
        _report(plan, [], None, dry_run, as_json)
        if dry_run and paused:
            click.echo(
                f"note: sending is paused ({paused}); the real resend refuses until "
                "`papermail sending resume`",
                err=True,
            )
        if plan.refused and not to_send:
            raise SystemExit(1)
        return
    with session_scope() as session:
        ids = operations.requeue_for_resend(session, to_send, reason=reason)
    lost = {i.delivery_id for i in to_send} - set(ids)
    for item in to_send:
        if item.delivery_id in lost:
            item.action, item.why = "refused", "changed meanwhile (a running edition has it)"
    outcome = None
    if settings.in_process:
        from worker.delivery import send_in_process

        with click.progressbar(
            length=len(ids), label="resending", file=sys.stderr, hidden=as_json
        ) as bar:
            outcome = send_in_process(
                ids,
                settings=settings,
                attempt_kind="resend",
                reason=reason,
                actor="cli",
                include_suppressed=include_suppressed,
                on_progress=bar.update,
            )
    else:
        from worker.tasks import enqueue_chunks

        enqueue_chunks(ids, kind="resend", reason=reason, include_suppressed=include_suppressed)
    if outcome is not None:
        with session_scope() as session:
            operations.record_resend_results(session, plan)
    _report(plan, ids, outcome, False, as_json)
    if outcome is not None and (
        outcome.failed or outcome.unknown or outcome.paused or outcome.retry
    ):
        raise SystemExit(1)


# How a dry run names each forecast state.
_VERBS = {"sent": "resend", "skipped": "skip", "failed": "fail"}


def _report(
    plan: operations.ResendPlan, queued: list[int], outcome: object, dry_run: bool, as_json: bool
) -> None:
    data: dict[str, object] = {
        "edition": plan.edition_date.isoformat(),
        "dry_run": dry_run,
        "items": [
            {
                "delivery_id": i.delivery_id,
                "email": i.email,
                "state": i.state,
                "papers": i.papers,
                "suppressed": i.suppressed,
                "action": i.action,
                "why": i.why,
                # dry run: what the resend would do; after an in-process resend: what it did
                "result": i.result or None,
                "result_why": i.result_why or None,
            }
            for i in plan.items
        ],
        "queued": len(queued),
    }
    if outcome is not None:
        data["sent"] = outcome.sent  # type: ignore[attr-defined]
        data["failed"] = outcome.failed  # type: ignore[attr-defined]
        data["unknown"] = outcome.unknown  # type: ignore[attr-defined]
        data["skipped"] = outcome.skipped  # type: ignore[attr-defined]
        data["still_pending"] = len(outcome.retry)  # type: ignore[attr-defined]
        data["paused"] = outcome.paused  # type: ignore[attr-defined]
    if as_json:
        echo_json(data)
        return
    for i in plan.items:
        if i.action == "resend" and i.result:
            verb = f"would {_VERBS.get(i.result, i.result)}" if dry_run else i.result
            why = i.result_why
        else:
            verb, why = i.action, i.why
        line = f"  {verb:<12} {i.email:<36} was {i.state:<9} {len(i.papers)} papers"
        click.echo(line + (f"  ({why})" if why else ""))
    if dry_run:
        counts = {r: sum(1 for i in plan.to_send if i.result == r) for r in _VERBS}
        other = len(plan.to_send) - sum(counts.values())
        click.echo(
            f"dry run: {counts['sent']} would be re-sent, {counts['skipped']} skipped,"
            f" {counts['failed']} failed, {len(plan.refused)} refused"
            + (f", {other} left pending" if other else "")
        )
    elif outcome is not None:
        click.echo(
            f"re-sent {data['sent']}, failed {data['failed']}, unknown {data['unknown']},"
            f" skipped {data['skipped']}, still pending {data['still_pending']}"
        )
    else:
        click.echo(f"queued {len(queued)} for the workers")
