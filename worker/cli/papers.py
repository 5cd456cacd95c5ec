"""`papermail papers ...`: ingest paper sources and list what is stored."""

from __future__ import annotations

import click
from sqlalchemy import func, select

from worker.cli.common import echo_json, parse_date, require_schema
from worker.db import session_scope
from worker.models import Paper
from worker.papers import FORMATS, ingest_source
from worker.papers.ingest import iter_papers, papers_query
from worker.papers.sources import DEFAULT_TIMEOUT

TITLE_WIDTH = 70


@click.group("papers")
def command() -> None:
    """Paper sources: Hugging Face daily papers, arXiv Atom feeds, JSON Lines.

    \b
    Example:
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
