"""`papermail papers ...`: ingest paper sources and list what is stored."""

from __future__ import annotations

from datetime import date

import click
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker.cli.common import (
    FullHelpGroup,
    date_option,
    echo_json,
    parse_date,
    require_schema,
)
from worker.config import get_settings
from worker.db import session_scope
from worker.models import Paper
from worker.papers import FORMATS, ingest_source
from worker.papers.ingest import iter_papers, papers_query
from worker.papers.sources import DEFAULT_TIMEOUT

SOURCES = ("hf", "arxiv")

TITLE_WIDTH = 70


@click.group("papers", cls=FullHelpGroup)
def command() -> None:
    """Paper sources: Hugging Face daily papers, arXiv Atom feeds, JSON Lines.

    \b
    Example:
      papermail papers fetch                   # today's papers from PAPERMAIL_SOURCES
      papermail papers ingest https://huggingface.co/api/daily_papers
      papermail papers list --date 2026-11-25
    """


@command.command("ingest")
@click.argument("source")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="Source format (default: detected from the content).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for a URL source.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def ingest(source: str, fmt: str | None, timeout: float, as_json: bool) -> None:
    """Insert or update papers from SOURCE: a file, an http(s) URL, or - for stdin.

    Papers are matched by id: a known paper gets the new upvotes and metadata, never a
    second row. A malformed source is rejected as a whole, naming each bad record and
    field; the database is then unchanged. JSON Lines format: docs/papers-jsonl.md.

    \b
    Example:
      papermail papers ingest https://huggingface.co/api/daily_papers
      papermail papers ingest 'http://export.arxiv.org/api/query?search_query=cat:cs.LG&max_results=50'
      papermail papers ingest papers.jsonl --format jsonl
      curl -s https://huggingface.co/api/daily_papers | papermail papers ingest -
    """
    require_schema()
    with session_scope() as session:
        result = ingest_source(session, source, fmt, timeout=timeout)
    if as_json:
        echo_json(
            {
                "source": result.name,
                "format": result.format,
                "total": result.total,
                "new": result.new,
                "updated": result.updated,
            }
        )
    else:
        click.echo(
            f"ingested {result.total} paper{'' if result.total == 1 else 's'} "
            f"({result.new} new, {result.updated} updated) "
            f"from {result.name} [{result.format}]"
        )


@command.command("fetch")
@click.option(
    "--source",
    type=click.Choice(SOURCES),
    default=None,
    help="Fetch only this source (default: every one in PAPERMAIL_SOURCES).",
)
@date_option("The day whose papers to fetch, YYYY-MM-DD (default: today, UTC).")
@click.option("--json", "as_json", is_flag=True, help="Print each source's fetch as JSON.")
def fetch(source: str | None, date_: str | None, as_json: bool) -> None:
    """Fetch the day's papers from the configured sources, as the beat does at FETCH_AT.

    Hugging Face daily papers (PAPERMAIL_HF_API_URL?date=D) and arXiv's submissions of
    the day before D in PAPERMAIL_ARXIV_CATEGORIES; with timeouts, retries (429, 5xx,
    network errors; Retry-After honoured), conditional requests (a repeated fetch is
    answered 304 and costs nothing), arXiv's 3 s between requests, a size limit, and the
    validation of `papers ingest` (one bad record: nothing stored). Every run is recorded
    and shown in `papermail stats` and `papers list`. Exits 1 when a source failed.

    \b
    Example:
      papermail papers fetch
      papermail papers fetch --source arxiv --date 2026-11-25 --json
    """
    from worker.papers.fetch import fetch_papers

    on_date = parse_date(date_)
    settings = get_settings()
    require_schema()
    reports = fetch_papers(settings=settings, sources=[source] if source else None, on_date=on_date)
    if as_json:
        echo_json([r.as_json() for r in reports])
    else:
        for r in reports:
            click.echo(
                _fetch_line(
                    r.source,
                    r.fetch_date,
                    r.status,
                    r.papers,
                    r.new,
                    r.updated,
                    r.requests,
                    r.bytes,
                    r.error,
                )
            )
    if any(not r.succeeded for r in reports):
        raise SystemExit(1)


def _fetch_line(
    source: str,
    on: date,
    status: str,
    papers: int,
    new: int,
    updated: int,
    requests: int,
    size: int,
    error: str | None,
) -> str:
    head = f"{source} {on.isoformat()}:"
    asked = f"{requests} request{'s' if requests != 1 else ''}"
    if status == "failed":
        return f"{head} FAILED after {asked}: {error}"
    if status == "not_modified":
        return f"{head} not modified since the last fetch ({asked}, nothing stored)"
    return (
        f"{head} {papers} paper{'s' if papers != 1 else ''} ({new} new, {updated} updated), "
        f"{asked}, {size:,} bytes"
    )


def _paper_json(paper: Paper) -> dict[str, object]:
    return {
        "id": paper.id,
        "title": paper.title,
        "abstract": paper.abstract,
        "authors": paper.authors,
        "upvotes": paper.upvotes,
        "published_at": paper.published_at,
        "ingested_at": paper.ingested_at,
        "updated_at": paper.updated_at,
        "source": paper.source,
        "url": paper.url,
        "pdf_url": paper.pdf_url,
        "hf_url": paper.hf_url,
        "categories": paper.categories or [],
        "arxiv_version": paper.arxiv_version,
        "comment": paper.comment,
        "doi": paper.doi,
        "sources": paper.sources or [],
    }


def _truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@command.command("list")
@click.option(
    "--date",
    "date_",
    metavar="D",
    default=None,
    help="Only papers published on D (YYYY-MM-DD, UTC); undated papers: ingested on D.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="At most N papers, newest first (0: all).",
)
@click.option("--json", "as_json", is_flag=True, help="Print full records as JSON.")
def list_(date_: str | None, limit: int, as_json: bool) -> None:
    """List stored papers, newest first.

    \b
    Example:
      papermail papers list --date 2026-11-25
      papermail papers list --json --limit 0 > papers.json
    """
    on_date = parse_date(date_) if date_ is not None else None
    require_schema()
    with session_scope() as session:
        papers = iter_papers(session, on_date=on_date, limit=limit or None)
        if as_json:  # streamed paper by paper (--limit 0 lists every stored paper)
            echo_json(_paper_json(p) for p in papers)
            return
        _echo_fetches(session, on_date)
        listed = papers_query(on_date, limit or None).subquery()
        id_width = max(len("id"), session.scalar(select(func.max(func.length(listed.c.id)))) or 0)
        count = 0
        for p in papers:
            if not count:
                click.echo(f"{'id':<{id_width}}  {'published':<16}  {'upvotes':>7}  title")
            count += 1
            published = p.published_at.strftime("%Y-%m-%d %H:%M") if p.published_at else "-"
            click.echo(
                f"{p.id:<{id_width}}  {published:<16}  {p.upvotes:>7}  "
                f"{_truncate(p.title, TITLE_WIDTH)}"
            )
        if not count:
            where = f" for {on_date.isoformat()}" if on_date else ""
            click.echo(f"no papers{where}; add some with `papermail papers ingest SOURCE`")
            return
        if limit and count == limit:
            click.echo(f"(first {limit}; use --limit N or --limit 0 for more)")


def _echo_fetches(session: Session, on_date: date | None) -> None:
    """One line on the latest fetch of each source: for D with --date, else the newest."""
    from worker.papers.fetch import recent_fetches

    rows = recent_fetches(session, [on_date] if on_date else None, limit=10)
    if not rows:
        return
    newest = rows[0].fetch_date
    parts = [
        f"{r.source} "
        + (
            f"failed ({(r.error or '')[:80]})"
            if r.status == "failed"
            else "not modified"
            if r.status == "not_modified"
            else f"{r.papers} papers"
        )
        for r in rows
        if r.fetch_date == newest
    ]
    click.echo(f"fetched for {newest.isoformat()}: " + "; ".join(parts))
