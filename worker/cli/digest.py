"""`papermail digest ...`: send an edition now, or preview one subscriber's."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from worker import delivery
from worker.cli.common import FullHelpGroup, date_option, echo_json, parse_date, require_schema
from worker.config import get_settings
from worker.db import session_scope
from worker.errors import PapermailError


@click.group("digest", cls=FullHelpGroup)
def command() -> None:
    """Send or preview the digest.

    \b
    Example:
      papermail digest run --date 2026-11-27
      papermail digest preview ada@example.org -o ada.html
    """


@command.command("run")
@date_option()
@click.option("--dry-run", is_flag=True, help="Select and render, but send and record nothing.")
@click.option("--wait", is_flag=True, help="With a broker: follow the edition until it is done.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def run(date_: str | None, dry_run: bool, wait: bool, as_json: bool) -> None:
    """Send edition D now to every subscriber due that day.

    Daily subscribers are due every day, weekly ones on their weekday; their delivery hour
    is ignored here (the hourly beat is what waits for it). Running it twice for the same
    date sends nothing the second time.

    \b
    Example:
      papermail digest run                   # today's edition (UTC date)
      papermail digest run --date 2026-11-27 --dry-run
    """
    require_schema()
    settings = get_settings()
    edition = parse_date(date_)
    if dry_run:
        _dry_run(edition, as_json)
        return
    if not settings.in_process:
        from worker.tasks import enqueue_edition

        planned = enqueue_edition(edition)
        if not as_json:
            click.echo(
                f"edition {edition}: {planned.due} due, {planned.created} new deliveries, "
                f"{len(planned.pending_ids)} queued in chunks of {settings.chunk_size}"
            )
        if wait:
            _follow(edition, planned.pending_ids, show_progress=not as_json)
        _summary(edition, None, as_json)
        return

    bar_holder: dict[str, object] = {}

    def on_planned(n: int) -> None:
        bar = click.progressbar(length=n, label=f"edition {edition}", file=sys.stderr)
        bar.__enter__()
        bar_holder["bar"] = bar

    def on_progress(n: int) -> None:
        bar = bar_holder.get("bar")
        if bar is not None:
            bar.update(n)  # type: ignore[attr-defined]

    try:
        plan, outcome = delivery.run_in_process(
            edition,
            settings=settings,
            on_planned=on_planned if not as_json else None,
            on_progress=on_progress,
        )
    finally:
        bar = bar_holder.get("bar")
        if bar is not None:
            bar.__exit__(None, None, None)  # type: ignore[attr-defined]
    _summary(edition, (plan, outcome), as_json)


def _follow(edition: object, planned_ids: list[int], show_progress: bool) -> None:
    """Poll the database until every delivery of the edition has a final state."""
    from worker.tasks import EditionProgress, follow_edition

    if not planned_ids:
        return
    stderr = click.get_text_stream("stderr")
    if show_progress:
        click.echo("following the edition; Ctrl-C stops following, not sending", err=True)
    bar = click.progressbar(
        length=len(planned_ids), label=f"edition {edition}", file=stderr, show_pos=True
    )
    shown = 0

    def on_progress(progress: EditionProgress) -> None:
        nonlocal shown
        if show_progress and progress.done > shown:
            bar.length = progress.total
            bar.update(progress.done - shown)
            shown = progress.done

    try:
        with bar if show_progress else contextlib.nullcontext():
            follow_edition(edition, planned_ids=planned_ids, on_progress=on_progress)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        click.echo("\nstopped following; the workers carry on", err=True)


def _summary(
    edition: object,
    result: tuple[delivery.PlanResult, delivery.ChunkOutcome] | None,
    as_json: bool,
) -> None:
    with session_scope() as session:
        counts = delivery.edition_counts(session, edition)  # type: ignore[arg-type]
        paused = delivery.sending_paused(session)
    data: dict[str, object] = {"edition": str(edition), "states": counts, "paused": paused}
    if result is not None:
        plan, outcome = result
        data["this_run"] = {
            "due": plan.due,
            "planned": plan.created,
            "sent": outcome.sent,
            "skipped": outcome.skipped,
            "failed": outcome.failed,
            "unknown": outcome.unknown,
            "retry_later": len(outcome.retry),
        }
    if as_json:
        echo_json(data)
    else:
        if result is not None:
            run_counts = data["this_run"]
            click.echo(f"\nedition {edition}: this run")
            for key, value in run_counts.items():  # type: ignore[union-attr]
                click.echo(f"  {key:<12} {value:>8}")
        click.echo(f"\nedition {edition}: all deliveries by state")
        for key, value in counts.items():
            if value:
                click.echo(f"  {key:<12} {value:>8}")
        if paused:
            click.secho(
                f"\nsending is PAUSED: {paused}\n"
                "the rest stays pending; fix the cause, then `papermail sending resume`",
                fg="red",
                err=True,
            )
    if paused or (result is not None and (result[1].failed or result[1].unknown)):
        raise SystemExit(1)


def _dry_run(edition: object, as_json: bool) -> None:
    """Render what would go out, write nothing, send nothing."""
    from worker.previews import dry_run_edition

    with session_scope() as session:
        result = dry_run_edition(session, edition)  # type: ignore[arg-type]
    rows = [
        {
            "email": p.email,
            "papers": len(p.papers),
            "subject": p.subject,
            "bytes": p.size,
            "skip": p.skip_reason,
        }
        for p in result.previews
    ]
    if as_json:
        echo_json(
            {
                "edition": str(edition),
                "dry_run": True,
                "due": result.due,
                "already_planned": result.already_planned,
                "would_send": result.would_send,
                "would_skip": result.would_skip,
                "emails": rows,
            }
        )
        return
    for row in rows:
        if row["papers"]:
            click.echo(f"  send  {row['email']:<40} {row['papers']:>2} papers  {row['subject']}")
        else:
            click.echo(f"  skip  {row['email']:<40} {row['skip']}")
    click.echo(
        f"dry run of edition {edition}: {result.due} due, {result.already_planned} already "
        f"planned, would send {result.would_send}, skip {result.would_skip}; nothing written"
    )


@command.command("preview")
@click.argument("email")
@date_option()
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the HTML here (default: print it).",
)
@click.option(
    "--explain",
    is_flag=True,
    help="Print every candidate's scores (relevance per topic, field weight, matched terms, "
    "topics its title names, trending, final) instead of the email.",
)
@click.option("--json", "as_json", is_flag=True, help="With --explain: JSON lines, one a paper.")
def preview(
    email: str, date_: str | None, output: Path | None, explain: bool, as_json: bool
) -> None:
    """Render the digest EMAIL would get for edition D, without sending or recording.

    \b
    Examples:
      papermail digest preview ada@example.org -o ada.html
      papermail digest preview ada@example.org --explain
    """
    require_schema()
    from worker.previews import explain_digest, preview_digest

    edition = parse_date(date_)
    if as_json and not explain:
        raise click.UsageError("--json goes with --explain")
    if explain:
        with session_scope() as session:
            rows = explain_digest(session, email, edition)
        _print_explained(rows, as_json)
        return
    with session_scope() as session:
        result = preview_digest(session, email, edition)
    if result.html is None:
        raise PapermailError(f"{email} would get no email on {edition}: {result.skip_reason}")
    if result.state:
        click.echo(
            f"edition {edition} is already {result.state}: showing the papers it carries", err=True
        )
    if result.note:
        click.secho(result.note, fg="yellow", err=True)
    if output:
        output.write_text(result.html, encoding="utf-8")
        click.echo(f"wrote {output} ({len(result.papers)} papers)")
    else:
        click.echo(result.html)


def _print_explained(rows: list, as_json: bool) -> None:
    import json

    if as_json:
        for r in rows:
            click.echo(
                json.dumps(
                    {
                        "paper_id": r.paper_id,
                        "title": r.title,
                        "categories": list(r.categories),
                        "topics": [
                            {
                                "topic": t,
                                "relevance": round(rel, 4),
                                "field_weight": w,
                                "matched_terms": list(terms),
                            }
                            for t, rel, w, terms in r.topics
                        ],
                        "trending": round(r.trending, 4),
                        "freshness": round(r.freshness, 4),
                        "score": None if r.score is None else round(r.score, 4),
                        "picked": r.picked,
                        "why_not": r.why_not,
                        "title_names": list(r.title_names),
                    }
                )
            )
        return
    if not rows:
        click.echo("no candidate papers in the window")
        return
    for r in rows:
        mark = "*" if r.picked else " "
        final = "     -" if r.score is None else f"{r.score:6.3f}"
        cats = ",".join(r.categories[:3]) or "-"
        click.echo(f"{mark} {final}  {r.paper_id:<14} [{cats}] {r.title[:70]}")
        for topic, rel, weight, terms in r.topics:
            said = ", ".join(terms) or "-"
            click.echo(f"      {topic}: relevance {rel:.3f}  field {weight:.1f}  matched: {said}")
        tail = f"      trending {r.trending:.3f}  freshness {r.freshness:.3f}"
        if r.title_names:
            tail += "  title names: " + ", ".join(r.title_names)
        click.echo(tail + (f"  ({r.why_not})" if r.why_not else ""))
    click.echo(f"{sum(r.picked for r in rows)} picked (*) of {len(rows)} candidates")
