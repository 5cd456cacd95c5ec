"""`papermail demo`: schema, sample papers, sample subscribers, one edition in the outbox."""

from __future__ import annotations

import click

from worker.config import get_settings
from worker.errors import PapermailError


@click.command("demo")
def command() -> None:
    """Run the whole job once on the embedded default (SQLite + outbox).

    Creates the schema, loads the bundled sample papers (dated to now), adds a few sample
    subscribers with different topics, sends today's edition into the outbox as .eml files,
    and writes an HTML preview of each email. Run again the same day, it says so and
    changes nothing: nobody gets a second copy of the same edition.

    \b
    Example:
      papermail demo && ls outbox/
    """
    from worker.demo import run_demo

    settings = get_settings()
    if settings.mailer != "outbox":
        raise PapermailError("the demo only writes to the outbox; unset PAPERMAIL_MAILER")
    result = run_demo(settings)
    o = result.outcome
    from sqlalchemy.engine import make_url

    shown = make_url(settings.database_url).render_as_string(hide_password=True)
    click.echo(f"database:     {shown}")
    if result.already_done:
        earlier = ", ".join(f"{n} {state}" for state, n in sorted(result.states.items()))
        click.echo(
            f"edition {result.edition_date}: already done by an earlier run ({earlier}); "
            "nothing new was sent and nothing changed"
        )
    else:
        assert o is not None
        click.echo(
            f"papers:       {result.papers_new} new, {result.papers_updated} updated (sample)"
        )
        click.echo(f"subscribers:  {result.subscribers_added} added")
        click.echo(
            f"edition {result.edition_date}: {o.sent} sent, {o.skipped} skipped, {o.failed} failed"
        )
        for email, why in result.skipped.items():
            click.echo(f"  skipped {email}: {why}")
    click.echo(f"emails (.eml): {result.outbox / result.edition_date.isoformat()}")
    click.echo("HTML previews:")
    for path in result.previews:
        click.echo(f"  {path}")
    if o is not None and (o.failed or o.unknown):
        raise SystemExit(1)
