"""`papermail subscribers ...`: add, import, list, show, suppress, unsuppress."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from worker import subscribers as subs
from worker.cli.common import FullHelpGroup, echo_json, require_schema
from worker.db import session_scope
from worker.models import WEEKDAYS, SubscriberStatus

_STATUS_COLOURS = {
    "active": "green",
    "pending": "yellow",
    "paused": "cyan",
    "unsubscribed": "red",
    "bounced": "red",
    "complained": "red",
}
_STATE_COLOURS = {
    "delivered": "green",
    "sent": "green",
    "pending": "yellow",
    "sending": "yellow",
    "skipped": "cyan",
    "unknown": "magenta",
    "failed": "red",
    "bounced": "red",
    "complained": "red",
}
# Long lists of existing/merged addresses are cut here in the text output (--json has all).
_LIST_LIMIT = 20
# Show a progress bar for imports of files of at least this many bytes (about 5,000
# rows), on a terminal.
_PROGRESS_MIN_BYTES = 256 * 1024


@click.group("subscribers", cls=FullHelpGroup)
def command() -> None:
    """Add, import, inspect and suppress subscribers.

    \b
    Example:
      papermail subscribers add ada@example.org --topics "llm agents, diffusion" --confirmed
      papermail subscribers import people.csv --confirmed
      papermail subscribers show ada@example.org
    """


@command.command("add")
@click.argument("email")
@click.option("--topics", metavar="TEXT", help='Topic phrases, comma-separated: "llm, robotics".')
@click.option(
    "--max-papers", metavar="N", help=f"Papers per email, 1-50 (default {subs.DEFAULT_MAX_PAPERS})."
)
@click.option(
    "--frequency",
    metavar="daily|weekly",
    help=f"How often (default {subs.DEFAULT_FREQUENCY}).",
)
@click.option("--weekday", metavar="W", help="Weekly only: monday … sunday (default monday).")
@click.option(
    "--send-hour",
    metavar="H",
    help=f"Local hour of delivery, 0-23 (default {subs.DEFAULT_SEND_HOUR}).",
)
@click.option("--timezone", metavar="TZ", help=f"IANA time zone (default {subs.DEFAULT_TIMEZONE}).")
@click.option(
    "--categories",
    metavar="LIST",
    help="Only papers whose primary arXiv category is one of these, comma-separated: "
    '"cs.LG,cs.CL"; an archive ("math") means all its categories (default: all).',
)
@click.option(
    "--exclude-categories",
    metavar="LIST",
    help='Never papers listed in any of these arXiv categories: "cs.CV,physics" (default: none).',
)
@click.option(
    "--confirmed",
    is_flag=True,
    help="You vouch for their consent: active at once, no confirmation email.",
)
def add(
    email: str,
    topics: str | None,
    max_papers: str | None,
    frequency: str | None,
    weekday: str | None,
    send_hour: str | None,
    timezone: str | None,
    categories: str | None,
    exclude_categories: str | None,
    confirmed: bool,
) -> None:
    """Add one subscriber.

    Without --confirmed they stay `pending` and get nothing until they confirm by email.
    An address that is already subscribed is refused and left unchanged.

    \b
    Example:
      papermail subscribers add ada@example.org --topics "llm agents, diffusion" \\
          --frequency weekly --weekday fri --send-hour 8 --timezone Europe/London --confirmed
      papermail subscribers add grace@example.org --topics "graph neural networks" \
          --categories cs.LG,stat.ML --exclude-categories cs.CV --confirmed
    """
    require_schema()
    data = subs.SubscriberInput(
        email,
        topics=topics,
        max_papers=max_papers,
        frequency=frequency,
        weekday=weekday,
        send_hour=send_hour,
        timezone=timezone,
        categories=categories,
        exclude_categories=exclude_categories,
    )
    with session_scope() as session:
        sub, _ = subs.add_subscriber(session, data, confirmed=confirmed, actor="cli")
        status = sub.status
    if weekday and data.frequency != "weekly":
        click.secho(
            "note: --weekday applies to weekly subscribers only; add --frequency weekly",
            fg="yellow",
            err=True,
        )
    click.secho(f"added {data.email} ", nl=False)
    click.secho(status, fg=_STATUS_COLOURS.get(status), nl=False)
    click.echo(f": {data.describe()}")
    if status == SubscriberStatus.PENDING:
        click.echo(
            "they receive nothing until they confirm by email (or add them with --confirmed)"
        )


@contextmanager
def _progress_bar() -> Iterator[Any]:
    """A progress callback for import_csv (bytes read of the file's size): a bar on a
    terminal for big files, else nothing."""
    bar: Any = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            if total < _PROGRESS_MIN_BYTES or not sys.stderr.isatty():
                return
            bar = click.progressbar(length=total, label="reading the file", file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)

    try:
        yield update
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


def _print_report(report: subs.ImportReport) -> None:
    for row in report.rejected:
        click.secho(str(row), fg="red", err=True)
    for item in report.merged[:_LIST_LIMIT]:
        lines = ", ".join(str(n) for n in item["lines"])
        click.echo(f"merged: {item['email']} on lines {lines} (later non-empty values win)")
    if len(report.merged) > _LIST_LIMIT:
        click.echo(f"merged: … and {len(report.merged) - _LIST_LIMIT} more (--json lists all)")
    for item in report.existing[:_LIST_LIMIT]:
        click.echo(
            f"existing: {item['email']} (line {item['line']}) is already a subscriber "
            f"({item['status']}); left unchanged"
        )
    if len(report.existing) > _LIST_LIMIT:
        click.echo(f"existing: … and {len(report.existing) - _LIST_LIMIT} more (--json lists all)")


def _summary(report: subs.ImportReport) -> str:
    status = "active" if report.confirmed else "pending"
    return (
        f"{report.rows} rows: {report.created} added ({status}), "
        f"{len(report.existing)} existing left unchanged, "
        f"{len(report.merged)} merged from duplicate rows, {len(report.rejected)} rejected"
    )


@command.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--confirmed", is_flag=True, help="You vouch for their consent: active at once.")
@click.option(
    "--skip-invalid", is_flag=True, help="Import the good rows even when some rows are bad."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def import_(file: str, confirmed: bool, skip_invalid: bool, as_json: bool) -> None:
    """Import subscribers from a CSV file (`-` reads standard input).

    A header row is required; the columns are email (required), topics, max_papers,
    frequency, weekday, send_hour, timezone, categories and exclude_categories
    (docs/subscribers-csv.md). Every address
    is validated and normalised; rows with the same address are merged; addresses that
    are already subscribers are left unchanged. Each bad row is reported with its line
    number. Without --skip-invalid one bad row means nothing is imported (exit 2); with
    it the good rows are imported and the exit status is 1 if any row was rejected.

    \b
    Example:
      papermail subscribers import people.csv --confirmed
      papermail subscribers import people.csv --skip-invalid --json > report.json
    """
    require_schema()
    source: Path | Any = sys.stdin if file == "-" else Path(file)
    rejected: subs.ImportRejected | None = None
    with _progress_bar() as progress:
        try:
            with session_scope() as session:
                report = subs.import_csv(
                    session,
                    source,
                    confirmed=confirmed,
                    skip_invalid=skip_invalid,
                    actor="cli",
                    progress=progress,
                )
        except subs.ImportRejected as exc:
            rejected, report = exc, exc.report
    if as_json:
        echo_json(report.to_dict())
    else:
        _print_report(report)
    if rejected is not None:
        click.secho(f"error: {rejected}", fg="red", err=True)
        sys.exit(rejected.exit_code)
    if not as_json:
        colour = "yellow" if report.rejected else "green"
        click.secho(_summary(report), fg=colour)
    if report.rejected:
        sys.exit(1)


def _schedule(sub: dict[str, Any]) -> str:
    if sub["frequency"] == "weekly":
        return f"weekly {str(sub['weekday'])[:3]} {sub['send_hour']:02d}:00"
    return f"daily {sub['send_hour']:02d}:00"


@command.command("list")
@click.option(
    "--status",
    type=click.Choice([*(s.value for s in SubscriberStatus), subs.SUPPRESSED_FILTER]),
    help="Only this status (`suppressed`: everyone who gets nothing for good).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of subscribers).")
def list_(status: str | None, as_json: bool) -> None:
    """List subscribers in the order they were added.

    \b
    Example:
      papermail subscribers list --status pending
      papermail subscribers list --json | jq -r '.[].email'
    """
    require_schema()
    with session_scope() as session:
        rows = subs.iter_subscriber_dicts(session, status)
        if as_json:  # streamed row by row: a million subscribers never sit in memory
            echo_json(rows)
            return
        width = min(subs.longest_email(session, status), 48)
        total, suppressed = 0, False
        for r in rows:
            if not total:
                click.echo(
                    f"{'EMAIL':<{width}}  {'STATUS':<12}  {'SCHEDULE':<16}  {'TIME ZONE':<20}  "
                    "N  TOPICS"
                )
            total += 1
            suppressed = suppressed or bool(r["suppressed_at"])
            _print_row(r, width)
    if not total:
        click.echo("no subscribers" + (f" with status {status}" if status else ""))
        return
    click.echo(f"{total} subscriber{'s' if total != 1 else ''}", nl=False)
    if suppressed:
        click.echo(" (* suppressed by an operator)", nl=False)
    click.echo()


def _print_row(r: dict[str, Any], width: int) -> None:
    flag = "*" if r["suppressed_at"] else " "
    click.echo(f"{r['email']:<{width}}  ", nl=False)
    click.secho(f"{r['status']:<11}", fg=_STATUS_COLOURS.get(r["status"]), nl=False)
    topics = ", ".join(r["topics"])
    if len(topics) > 40:
        topics = topics[:39] + "…"
    click.echo(f"{flag}  {_schedule(r):<16}  {r['timezone']:<20}  {r['max_papers']:<2} {topics}")


def _ts(value: str | None) -> str:
    if not value:
        return "-"
    return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _print_history(history: dict[str, Any]) -> None:
    s = history["subscriber"]
    click.secho(s["email"], bold=True, nl=False)
    click.echo("  ", nl=False)
    click.secho(s["status"], fg=_STATUS_COLOURS.get(s["status"]))
    click.echo(
        "  "
        + subs.describe_preferences(
            s["frequency"],
            WEEKDAYS.index(s["weekday"]) if s["weekday"] else None,
            s["send_hour"],
            s["timezone"],
            s["max_papers"],
            s["topics"],
            s["categories"],
            s["exclude_categories"],
        )
    )
    click.echo(f"  added {_ts(s['created_at'])} UTC via {s['source']}", nl=False)
    click.echo(f"; confirmed {_ts(s['confirmed_at'])}" if s["confirmed_at"] else "; not confirmed")
    if s["unsubscribed_at"]:
        click.echo(f"  unsubscribed {_ts(s['unsubscribed_at'])}")
    if s["paused_until"]:
        click.echo(f"  paused until {s['paused_until']} (inclusive)")
    if s["suppressed_at"]:
        click.secho(
            f"  suppressed by an operator since {_ts(s['suppressed_at'])}: "
            f"{s['suppression_reason']}",
            fg="red",
        )
    if s["soft_bounce_count"]:
        click.echo(f"  soft bounces: {s['soft_bounce_count']}")

    deliveries = history["deliveries"]
    click.echo()
    click.secho(f"Deliveries ({len(deliveries)})", bold=True)
    for d in deliveries:
        click.echo(f"  {d['edition_date']}  ", nl=False)
        click.secho(f"{d['state']:<10}", fg=_STATE_COLOURS.get(d["state"]), nl=False)
        extra = f"  {d['attempt_count']} attempt{'s' if d['attempt_count'] != 1 else ''}"
        if d["message_id"]:
            extra += f"  message {d['message_id']}"
        click.echo(extra)
        for reason in (d["skip_reason"], d["last_error"]):
            if reason:
                click.echo(f"      {reason}")
        for p in d["papers"]:
            topic = f"  [{p['matched_topic']}]" if p["matched_topic"] else ""
            click.echo(f"      {p['position'] + 1}. {p['paper_id']}  {p['title']}{topic}")
        for a in d["attempts"]:
            line = f"      {a['kind']} {_ts(a['started_at'])} -> {a['outcome'] or '…'}"
            if a["error"]:
                line += f": {a['error']}"
            if a["reason"]:
                line += f" (reason: {a['reason']}, by {a['actor'] or '?'})"
            click.echo(line)
        for e in d["events"]:
            kind = e["event_type"] + (f"/{e['subtype']}" if e["subtype"] else "")
            click.echo(f"      event {kind} {_ts(e['occurred_at'] or e['received_at'])}")
    if history["feedback"]:
        click.echo()
        click.secho(f"Feedback ({len(history['feedback'])})", bold=True)
        for f in history["feedback"]:
            vote = "more like this" if f["vote"] > 0 else "less like this"
            click.echo(f"  {_ts(f['updated_at'])}  {vote}: {f['paper_id']}  {f['title']}")
    click.echo()
    click.secho(f"Log ({len(history['log'])})", bold=True)
    for entry in history["log"]:
        click.echo(
            f"  {_ts(entry['at'])}  {entry['action']} by {entry['actor']}: {entry['detail']}"
        )


@command.command("show")
@click.argument("email")
@click.option("--json", "as_json", is_flag=True, help="Print the full history as JSON.")
def show(email: str, as_json: bool) -> None:
    """Show a subscriber: preferences, every delivery with its papers, attempts and
    provider events, feedback, and the log of changes.

    \b
    Example:
      papermail subscribers show ada@example.org
      papermail subscribers show ada@example.org --json | jq '.deliveries[-1]'
    """
    require_schema()
    with session_scope() as session:
        history = subs.subscriber_history(session, email)
    if as_json:
        echo_json(history)
    else:
        _print_history(history)


@command.command("suppress")
@click.argument("email")
@click.option("--reason", required=True, help="Why; kept in the subscriber's log.")
def suppress(email: str, reason: str) -> None:
    """Send nothing more to EMAIL until `unsuppress` (e.g. a legal request).

    \b
    Example:
      papermail subscribers suppress ada@example.org --reason "asked by phone, ticket 42"
    """
    require_schema()
    with session_scope() as session:
        result = subs.suppress(session, email, reason, actor="cli")
    click.secho(result.message, fg="yellow" if result.changed else None)


@command.command("unsuppress")
@click.argument("email")
@click.option("--reason", required=True, help="Why; kept in the subscriber's log.")
def unsuppress(email: str, reason: str) -> None:
    """Lift every suppression of EMAIL: the operator's, and an unsubscribed, bounced or
    complained status (back to active, or pending if they never confirmed).

    \b
    Example:
      papermail subscribers unsuppress ada@example.org --reason "mailbox fixed, ticket 43"
    """
    require_schema()
    with session_scope() as session:
        result = subs.unsuppress(session, email, reason, actor="cli")
    click.secho(result.message, fg="green" if result.changed else None)
