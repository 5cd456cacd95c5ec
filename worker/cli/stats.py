"""`papermail stats`: how the editions went."""

from __future__ import annotations

import click

from worker import operations
from worker.cli.common import echo_json, parse_date, require_schema
from worker.clock import utcnow
from worker.db import session_scope
from worker.delivery import sending_paused


@click.command("stats")
@click.option("--date", "date_", metavar="D", help="One edition, YYYY-MM-DD (default: the last 7).")
@click.option("--json", "as_json", is_flag=True, help="Stable JSON for scripts.")
def command(date_: str | None, as_json: bool) -> None:
    """Per edition: counts by state, bounce and complaint rates against SES's review
    thresholds, when sending started and ended, achieved rate, oldest pending; with SES,
    the account's 24-hour quota used and left (GetAccount).

    Exits 1 when the newest edition shown (or --date D) has failed or unknown deliveries or
    a rate over its threshold, or when sending is paused. Rates are SES's: hard bounces and
    complaints over accepted emails, judged once the edition has the minimum sample.

    \b
    Example:
      papermail stats
      papermail stats --date 2026-11-27 --json | jq .states
    """
    from worker.papers.fetch import fetch_json, recent_fetches

    require_schema()
    with session_scope() as session:
        dates = [parse_date(date_)] if date_ else operations.recent_editions(session)
        editions = [operations.edition_stats(session, d) for d in dates]
        paused = sending_paused(session)
        # The fetches of the dates shown (and today's): what the editions had to go on.
        fetch_dates = sorted({*dates, utcnow().date()}) if not date_ else dates
        fetches = [fetch_json(r) for r in recent_fetches(session, fetch_dates)]
    account = operations.account_quota()
    if as_json:
        echo_json({"paused": paused, "editions": editions, "fetches": fetches, "account": account})
    else:
        _table(editions, paused)
        _fetch_table(fetches)
        _account_line(account)
    newest = editions[0] if editions else None
    bad = bool(paused) or (
        newest is not None
        and bool(
            newest["states"]["failed"]  # type: ignore[index]
            or newest["states"]["unknown"]  # type: ignore[index]
            or newest["bounce_over"]
            or newest["complaint_over"]
        )
    )
    if bad:
        raise SystemExit(1)


def _table(editions: list[dict[str, object]], paused: str | None) -> None:
    if paused:
        click.secho(f"sending is PAUSED: {paused}  (resume: papermail sending resume)", fg="red")
    if not editions:
        click.echo("no editions yet; run `papermail digest run`")
        return
    cols = [
        "pending",
        "sending",
        "sent",
        "delivered",
        "bounced",
        "complained",
        "skipped",
        "failed",
        "unknown",
    ]
    head = f"{'edition':<11}" + "".join(f"{c:>11}" for c in cols)
    head += f"{'bounce%':>9}{'compl%':>8}{'rate/s':>8}"
    click.echo(head)
    for e in editions:
        states = e["states"]
        line = f"{e['edition']:<11}" + "".join(f"{states[c]:>11}" for c in cols)  # type: ignore[index]
        bounce = f"{100 * e['bounce_rate']:.2f}"  # type: ignore[operator]
        compl = f"{100 * e['complaint_rate']:.3f}"  # type: ignore[operator]
        rate = e["send_rate_per_second"]
        click.echo(line, nl=False)
        click.secho(f"{bounce:>9}", nl=False, fg="red" if e["bounce_over"] else None)
        click.secho(f"{compl:>8}", nl=False, fg="red" if e["complaint_over"] else None)
        click.echo(f"{rate if rate is not None else '-':>8}")
    for e in editions:
        extra = []
        if e["started_at"]:
            extra.append(f"started {e['started_at']}")
        if e["ended_at"]:
            extra.append(f"ended {e['ended_at']}")
        if e["oldest_pending_at"]:
            extra.append(f"oldest pending since {e['oldest_pending_at']}")
        if e.get("waiting_for_papers"):
            extra.append(f"{e['waiting_for_papers']} waiting for the day's papers")
        if extra:
            click.echo(f"{e['edition']}: " + ", ".join(extra))
    t = editions[0]
    click.echo(
        f"thresholds: bounce {100 * t['bounce_threshold']:.1f}%, "  # type: ignore[operator]
        f"complaint {100 * t['complaint_threshold']:.2f}% (SES review levels)"  # type: ignore[operator]
    )


def _fetch_table(fetches: list[dict[str, object]]) -> None:
    if not fetches:
        click.echo("paper fetches: none yet (`papermail papers fetch`, or the beat at FETCH_AT)")
        return
    click.echo("paper fetches (the latest of each source and date):")
    for f in fetches:
        line = f"  {f['date']} {f['source']:<6} {f['status']:<13}"
        if f["status"] == "failed":
            click.echo(line, nl=False)
            click.secho(f" {f['error']}", fg="red")
            continue
        click.echo(
            f"{line} {f['papers']} papers ({f['new']} new, {f['updated']} updated), "
            f"{f['requests']} request{'' if f['requests'] == 1 else 's'}, {f['bytes']:,} bytes, "
            f"at {f['finished_at']}"
        )


def _account_line(account: dict[str, object] | None) -> None:
    if account is None:
        return
    if "error" in account:
        click.secho(
            f"{account['mailer']} quota: cannot ask the provider: {account['error']}", fg="yellow"
        )
        return
    limit, sent, left = account["max_24h_send"], account["sent_last_24h"], account["remaining_24h"]
    rate = account["max_send_rate"]
    rate_text = f", max {rate:g}/s" if isinstance(rate, int | float) else ""
    if not isinstance(limit, int | float) or limit < 0:
        click.echo(f"{account['mailer']} 24 h quota: unlimited{rate_text}")
        return
    click.echo(
        f"{account['mailer']} 24 h quota: {sent or 0:,.0f} of {limit:,.0f} used, "  # type: ignore[str-format]
        f"{left or 0:,.0f} left{rate_text}"  # type: ignore[str-format]
    )
