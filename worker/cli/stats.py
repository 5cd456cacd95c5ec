"""`papermail stats`: how the editions went."""

from __future__ import annotations

from datetime import datetime

import click

from worker import operations, reports
from worker.cli.common import echo_json, is_tty, parse_date, require_schema
from worker.clock import utcnow
from worker.db import session_scope
from worker.delivery import sending_paused


@click.command("stats")
@click.option("--date", "date_", metavar="D", help="One edition, YYYY-MM-DD (default: the last 7).")
@click.option("--json", "as_json", is_flag=True, help="Stable JSON for scripts.")
def command(date_: str | None, as_json: bool) -> None:
    """Per edition: counts by state, bounce and complaint rates against SES's review
    thresholds, when sending started and ended, achieved rate, oldest pending, and why:
    the top reasons of the failed, skipped and unknown deliveries, with counts (addresses
    in reasons counted as one; `papermail deliveries list --state S` names them); with SES,
    the account's 24-hour quota used and left (GetAccount).

    Times are this machine's local time. Exits 1 when the newest edition shown (or --date
    D) has failed or unknown deliveries or a rate over its threshold, when sending is
    paused, or when there is no edition on D ("no edition on D"). Rates are SES's: hard bounces and
    complaints over accepted emails, judged once the edition has the minimum sample
    (a rate marked * is on fewer).

    \b
    Example:
      papermail stats
      papermail stats --date 2026-11-27 --json | jq .states
    """
    from worker.papers.fetch import fetch_json, recent_fetches

    require_schema()
    with session_scope() as session:
        dates = [parse_date(date_)] if date_ else operations.recent_editions(session)
        editions = [
            {**operations.edition_stats(session, d), "why": reports.why_breakdown(session, d)}
            for d in dates
        ]
        if date_ and not editions[0]["total"]:
            # Nothing was planned that day: say so instead of a row of zeros (exit 1, like
            # any other question about something that does not exist), with that day's
            # paper fetches, which may say why.
            fetches = [fetch_json(r) for r in recent_fetches(session, dates)]
            if as_json:
                echo_json({"paused": sending_paused(session), "editions": [], "fetches": fetches})
            click.echo(
                f"no edition on {dates[0]}: nothing was planned that day; "
                "`papermail stats` lists the recent ones",
                err=as_json,
            )
            if fetches and not as_json:
                _fetch_table(fetches)
            raise SystemExit(1)
        paused = sending_paused(session)
        # The fetches of the dates shown (and today's): what the editions had to go on.
        fetch_dates = sorted({*dates, utcnow().date()}) if not date_ else dates
        fetches = [fetch_json(r) for r in recent_fetches(session, fetch_dates)]
    account = operations.account_quota()
    if as_json:
        echo_json({"paused": paused, "editions": editions, "fetches": fetches, "account": account})
    else:
        _table(editions, paused)
        _why(editions)
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


# Short headings so the table fits 100 columns (the longest state name is 10 letters).
_COLUMNS = [
    ("pending", "pend"),
    ("sending", "sndg"),
    ("sent", "sent"),
    ("delivered", "deliv"),
    ("bounced", "bounce"),
    ("complained", "compl"),
    ("skipped", "skip"),
    ("failed", "fail"),
    ("unknown", "unkn"),
]


def _paint(text: str, red: bool) -> str:
    # Colour only on a terminal, and only where it means something: no stray codes.
    return click.style(text, fg="red") if red and is_tty() else text


def human_time(stamp: str | None) -> str:
    """An ISO timestamp as this machine's local time: ``Tue 1 Dec 19:51 CET``."""
    if not stamp:
        return "-"
    local = datetime.fromisoformat(stamp).astimezone()
    return f"{local:%a} {local.day} {local:%b %H:%M} {local.tzname() or ''}".rstrip()


def _table(editions: list[dict[str, object]], paused: str | None) -> None:
    if paused:
        click.echo(_paint(f"sending is PAUSED: {paused}  (resume: papermail sending resume)", True))
    if not editions:
        click.echo("no editions yet; run `papermail digest run`")
        return
    head = f"{'edition':<10}" + "".join(f"{short:>7}" for _, short in _COLUMNS)
    click.echo(head + f"{'bounce%':>9}{'compl%':>9}{'rate/s':>8}")
    small = False
    for e in editions:
        states = e["states"]
        line = f"{e['edition']:<10}" + "".join(f"{states[c]:>7}" for c, _ in _COLUMNS)  # type: ignore[index]
        # A rate on fewer accepted emails than the minimum sample is not judged: marked *.
        mark = "" if e["sample_ok"] else "*"
        small = small or not e["sample_ok"]
        bounce = f"{100 * e['bounce_rate']:.2f}{mark}"  # type: ignore[operator]
        compl = f"{100 * e['complaint_rate']:.3f}{mark}"  # type: ignore[operator]
        rate = e["send_rate_per_second"]
        click.echo(
            line
            + _paint(f"{bounce:>9}", bool(e["bounce_over"]))
            + _paint(f"{compl:>9}", bool(e["complaint_over"]))
            + f"{rate if rate is not None else '-':>8}"
        )
    for e in editions:
        extra = []
        if e["started_at"]:
            extra.append(f"started {human_time(e['started_at'])}")  # type: ignore[arg-type]
        if e["ended_at"]:
            extra.append(f"ended {human_time(e['ended_at'])}")  # type: ignore[arg-type]
        if e["oldest_pending_at"]:
            extra.append(f"oldest pending since {human_time(e['oldest_pending_at'])}")  # type: ignore[arg-type]
        if e.get("waiting_for_papers"):
            extra.append(f"{e['waiting_for_papers']} waiting for the day's papers")
        if extra:
            click.echo(f"{e['edition']}: " + ", ".join(extra))
    t = editions[0]
    click.echo(
        f"thresholds: bounce {100 * t['bounce_threshold']:.1f}%, "  # type: ignore[operator]
        f"complaint {100 * t['complaint_threshold']:.2f}% (SES review levels)"  # type: ignore[operator]
    )
    if small:
        click.echo(
            f"* fewer than {t['min_sample']} accepted emails: the rate is not judged yet "
            "(PAPERMAIL_REPUTATION_MIN_SAMPLE)"
        )


def _why(editions: list[dict[str, object]]) -> None:
    """The top reasons of each edition that has failed, skipped or unknown deliveries."""
    for e in editions:
        why: dict[str, list[dict[str, object]]] = e["why"]  # type: ignore[assignment]
        if not any(why.values()):
            continue
        click.echo(
            f"why, {e['edition']} (papermail deliveries list --date {e['edition']} --state S):"
        )
        for state, entries in why.items():
            for n, entry in enumerate(entries):
                label = state if n == 0 else ""
                reason = str(entry["reason"])
                if len(reason) > 76:
                    reason = reason[:75] + "…"
                line = f"  {label:<8} {entry['count']:>10,}  {reason}"
                click.echo(_paint(line, red=state != "skipped" and n == 0))


WIDTH = 100  # columns every line of `papermail stats` fits in


def fit(text: str, width: int = WIDTH) -> str:
    """At most ``width`` characters: a longer text is cut, ending in "…"."""
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _fetch_table(fetches: list[dict[str, object]]) -> None:
    if not fetches:
        click.echo("paper fetches: none yet (`papermail papers fetch`, or the beat at FETCH_AT)")
        return
    click.echo("paper fetches (the latest of each source and date):")
    for f in fetches:
        line = f"  {f['date']} {f['source']:<6} {f['status']:<13}"
        if f["status"] == "failed":
            # The whole error is in `stats --json` and the fetch's log line.
            # One line even for a multi-line error (a traceback's last lines).
            error = fit(" " + " ".join(str(f["error"] or "").split()), WIDTH - len(line))
            click.echo(line + _paint(error, True))
            continue
        click.echo(
            fit(
                f"{line} {f['papers']} papers ({f['new']} new, {f['updated']} updated), "
                f"{f['requests']} request{'' if f['requests'] == 1 else 's'}, "
                f"{f['bytes']:,} bytes, at {human_time(f['finished_at'])}"  # type: ignore[arg-type]
            )
        )


def _account_line(account: dict[str, object] | None) -> None:
    if account is None:
        return
    if "error" in account:
        text = f"{account['mailer']} quota: cannot ask the provider: {account['error']}"
        click.echo(click.style(text, fg="yellow") if is_tty() else text)
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
