"""`papermail deliveries list`: who got an edition, who did not, and why."""

from __future__ import annotations

import json
import os
import re
import sys
from datetime import date, datetime

import click

from worker import reports
from worker.cli.common import require_schema
from worker.clock import utcnow
from worker.db import session_scope
from worker.errors import InvalidInput

WIDTH = 100  # the human listing fits a 100-column terminal
EMAIL_WIDTH = 30
STATE_WIDTH = 10  # "complained"
TIME_WIDTH = 11  # "11-27 07:00", local time
DETAIL_WIDTH = WIDTH - (EMAIL_WIDTH + 2 + STATE_WIDTH + 2 + 5 + 2 + TIME_WIDTH + 2)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_COLOURS = {
    "failed": "red",
    "unknown": "yellow",
    "bounced": "red",
    "complained": "red",
    "skipped": "cyan",
    "pending": "blue",
    "sending": "blue",
    "sent": "green",
    "delivered": "green",
}


@click.group("deliveries")
def command() -> None:
    """Per-recipient answers: one row per delivery of an edition."""


def _edition(value: str | None) -> date:
    if value is None or value == "today":
        return utcnow().date()
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"--date: {value!r} is not a date; use YYYY-MM-DD or today") from None


@command.command("list")
@click.option(
    "--date", "date_", metavar="D", help="Edition date, YYYY-MM-DD or today (default: today, UTC)."
)
@click.option(
    "--state",
    "states",
    metavar="S",
    multiple=True,
    help=f"Only this state (repeatable, or comma-separated): {', '.join(reports.LIST_ORDER)}.",
)
@click.option(
    "--reason", metavar="TEXT", help="Only deliveries whose reason holds TEXT (any case)."
)
@click.option(
    "--limit", type=click.IntRange(min=0), default=0, help="At most N rows (default 0: all)."
)
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one object per delivery.")
def list_(
    date_: str | None, states: tuple[str, ...], reason: str | None, limit: int, as_json: bool
) -> None:
    """One row per delivery of edition D: address, state, reason in words (the skip reason
    or the last error), attempts, last attempt, the provider's message id.

    Problems come first (failed, unknown, bounced, complained, skipped, pending, sending),
    then sent and delivered; each state in planning order. The list is streamed: the first
    rows of a filtered list of a million deliveries arrive at once. Times are this
    machine's local time in the table, UTC (ISO 8601) in --json. --json prints JSON Lines
    (one object per line, as they come; `jq` reads it as it is).

    \b
    Example:
      papermail deliveries list --date today --state failed --state unknown
      papermail deliveries list --date 2026-11-27 --reason throttl --limit 20
      papermail deliveries list --date 2026-11-27 --state failed --json | jq -r .email
    """
    edition = _edition(date_)
    wanted = reports.parse_states(states)
    require_schema()
    # Plain writes (block-buffered into a pipe, line-buffered on a terminal), not one
    # flushed click.echo per row: a million rows are a million lines.
    out = sys.stdout
    colour = out.isatty()
    count = 0
    try:
        with session_scope() as session:
            rows = reports.iter_deliveries(
                session, edition, wanted or None, reason=reason, limit=limit or None
            )
            for row in rows:
                if as_json:
                    out.write(json.dumps(row.to_json(), ensure_ascii=False) + "\n")
                    continue
                if not count:
                    out.write(_header())
                count += 1
                out.write(_line(row, colour))
        out.flush()
    except BrokenPipeError:
        # `| head`: the reader has what it wanted; no traceback, no second error at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return
    if as_json:
        return
    if not count:
        what = f" in state {', '.join(wanted)}" if wanted else ""
        what += f" with a reason holding {reason!r}" if reason else ""
        click.echo(f"no deliveries for {edition.isoformat()}{what}")
        return
    click.echo(f"{count} deliver{'y' if count == 1 else 'ies'}", nl=False)
    click.echo(f" (first {limit}; --limit 0 for all)" if limit and count == limit else "")


def _fit(text: str, width: int) -> str:
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _header() -> str:
    zone = utcnow().astimezone().tzname() or "local"
    return (
        f"{'ADDRESS':<{EMAIL_WIDTH}}  {'STATE':<{STATE_WIDTH}}  TRIES  "
        f"{_fit('LAST ' + zone, TIME_WIDTH):<{TIME_WIDTH}}  REASON / MESSAGE ID\n"
    )


def _local(value: datetime | None) -> str:
    return value.astimezone().strftime("%m-%d %H:%M") if value else "-"


def _line(row: reports.DeliveryRow, colour: bool) -> str:
    """One row of the table: the reason when there is one, else the provider's id."""
    detail = row.reason or row.message_id or "-"
    state = f"{row.state:<{STATE_WIDTH}}"
    if colour:
        state = click.style(state, fg=_COLOURS.get(row.state))
    return (
        f"{_fit(row.email, EMAIL_WIDTH):<{EMAIL_WIDTH}}  {state}  {row.attempts:>5}  "
        f"{_local(row.last_attempt_at):<{TIME_WIDTH}}  {_fit(detail, DETAIL_WIDTH)}\n"
    )
