"""Upsert parsed papers into the ``papers`` table, load the bundled sample, list papers."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import IO, Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select

from worker.clock import utcnow
from worker.db import insert_ignore_or_update
from worker.errors import InvalidInput
from worker.models import Paper
from worker.papers.sources import (
    DEFAULT_TIMEOUT,
    URL_FIELDS,
    PaperRecord,
    load_source,
    parse,
)
from worker.resources import data_dir
from worker.urls import url_problem

SAMPLE_FILE = "sample_papers.jsonl"

# The upsert writes every column but the key and the first-ingest timestamp; the values
# are merged in Python first (see merge_paper), so a source never wipes another's fields.
_UPDATE_COLS = [
    "title",
    "abstract",
    "authors",
    "upvotes",
    "published_at",
    "url",
    "pdf_url",
    "hf_url",
    "categories",
    "arxiv_version",
    "comment",
    "doi",
    "source",
    "sources",
    "updated_at",
]
_LOOKUP_CHUNK = 500  # ids per IN (...) query
_SOURCE_ORDER = ("hf", "arxiv", "jsonl", "sample")


@dataclass(frozen=True)
class IngestResult:
    new: int
    updated: int
    format: str = ""
    name: str = ""

    @property
    def total(self) -> int:
        return self.new + self.updated


def _row(record: PaperRecord, source: str, now: datetime) -> dict[str, Any]:
    """The row of a paper seen for the first time (what the source did not say: defaults)."""
    return {
        "id": record.id,
        "title": record.title,
        "abstract": record.abstract,
        "authors": list(record.authors),
        "upvotes": record.upvotes or 0,
        "published_at": record.published_at,
        "url": record.url,
        "pdf_url": record.pdf_url,
        "hf_url": record.hf_url,
        "categories": list(record.categories),
        "arxiv_version": record.version,
        "comment": record.comment,
        "doi": record.doi,
        "source": source[:16],
        "sources": [source[:16]],
        "ingested_at": now,
        "updated_at": now,
    }


def merge_paper(
    old: Mapping[str, Any], record: PaperRecord, source: str, now: datetime
) -> dict[str, Any]:
    """The stored row ``old`` updated with what ``record`` (from ``source``) says.

    One paper, one record, whatever the order of its sources: a field the source leaves
    out (no upvotes in an arXiv feed, no categories from Hugging Face, an empty abstract
    or author list) keeps its stored value; a link made up from the id never replaces a
    link a source gave; ``published_at`` keeps the latest date any source gave (the day
    Hugging Face featured it is what makes a paper news, and is later than the arXiv
    submission); the arXiv version only goes up; the title, abstract and authors arXiv
    gave are not replaced by Hugging Face's copy of them. Everything else takes the new
    value.
    """
    merged = _row(record, source, now)
    del merged["ingested_at"]
    if source == "hf" and "arxiv" in (old["sources"] or []):
        for name in ("title", "abstract", "authors"):
            merged[name] = old[name]
    if record.upvotes is None:
        merged["upvotes"] = old["upvotes"] or 0
    if not record.abstract:
        merged["abstract"] = old["abstract"] or ""
    if not record.authors:
        merged["authors"] = list(old["authors"] or [])
    if not record.categories:
        merged["categories"] = list(old["categories"] or [])
    for name in ("comment", "doi"):
        if merged[name] is None:
            merged[name] = old[name]
    for name in URL_FIELDS:
        if name in record.derived and old[name]:
            merged[name] = old[name]
    dates = [d for d in (old["published_at"], record.published_at) if d is not None]
    merged["published_at"] = max(dates) if dates else None
    versions = [v for v in (old["arxiv_version"], record.version) if v is not None]
    merged["arxiv_version"] = max(versions) if versions else None
    sources = set(old["sources"] or []) | {old["source"], source[:16]}
    merged["sources"] = sorted(
        (s for s in sources if s),
        key=lambda s: (_SOURCE_ORDER.index(s) if s in _SOURCE_ORDER else len(_SOURCE_ORDER), s),
    )
    return merged


def upsert_papers(
    session: Session,
    records: Sequence[PaperRecord],
    source: str,
    *,
    now: datetime | None = None,
) -> IngestResult:
    """Insert new papers and merge known ones (by id) in the caller's transaction.

    A paper id repeated within ``records`` counts once; its occurrences are merged in
    order (as if the source had been ingested record by record). Known papers are merged
    field by field (:func:`merge_paper`), their rows locked while that happens. The caller
    commits or rolls back, so a failure part-way leaves nothing behind when used inside
    ``session_scope``.
    """
    now = now or utcnow()
    _refuse_bad_links(records)
    by_id: dict[str, list[PaperRecord]] = {}
    for record in records:
        by_id.setdefault(record.id, []).append(record)
    ids = list(by_id)
    table = Paper.__table__
    stored: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), _LOOKUP_CHUNK):
        chunk = ids[start : start + _LOOKUP_CHUNK]
        query = select(table).where(table.c.id.in_(chunk)).with_for_update()
        stored.update({row.id: dict(row._mapping) for row in session.execute(query)})
    existing = set(stored)
    rows = []
    for paper_id, seen in by_id.items():
        current = stored.get(paper_id)
        for record in seen:
            if current is None:
                current = _row(record, source, now)
            else:
                ingested = current.get("ingested_at")
                current = merge_paper(current, record, source, now)
                current["ingested_at"] = ingested or now
        assert current is not None
        rows.append(current)
    insert_ignore_or_update(session, table, rows, ["id"], _UPDATE_COLS)
    session.flush()
    # Paper objects already loaded in this session would show the values before the merge.
    session.expire_all()
    return IngestResult(new=len(ids) - len(existing), updated=len(existing), format=source)


def _refuse_bad_links(records: Sequence[PaperRecord]) -> None:
    """InvalidInput, before anything is written, if any link is not an http(s) URL.

    The parsers already refuse such records; this guards every other caller (the sample,
    scripts, tests) so the table only ever holds links that `worker.urls` allows."""
    bad = [
        f"paper {record.id!r}: field '{name}' {getattr(record, name)!r}: {problem}"
        for record in records
        for name in URL_FIELDS
        if getattr(record, name) is not None and (problem := url_problem(getattr(record, name)))
    ]
    if bad:
        shown = "; ".join(bad[:5]) + (f"; ... and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise InvalidInput(
            f"{len(bad)} paper link(s) are not http:// or https:// URLs, nothing was "
            f"ingested: {shown}"
        )


def ingest_source(
    session: Session,
    source: str,
    fmt: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    stdin: IO[bytes] | None = None,
    now: datetime | None = None,
) -> IngestResult:
    """Read, parse and upsert SOURCE (path, http(s) URL or ``-``).

    The whole source is parsed before anything is written: a malformed source raises
    PaperSourceError and the database is not touched.
    """
    parsed = load_source(source, fmt, timeout=timeout, stdin=stdin)
    result = upsert_papers(session, parsed.records, parsed.format, now=now)
    return replace(result, name=parsed.name)


def sample_path() -> Path:
    """The bundled sample papers (JSON Lines, generated by scripts/make_sample_papers.py)."""
    return data_dir() / SAMPLE_FILE


def sample_records(now: datetime | None = None) -> list[PaperRecord]:
    """The sample papers; with ``now``, dates shifted so the newest is ``now``.

    Relative spacing is kept, so a demo run always finds a few days of fresh papers in its
    look-back window whatever day it is.
    """
    path = sample_path()
    records = parse(path.read_text(encoding="utf-8"), "jsonl", str(path)).records
    if now is None:
        return records
    if now.tzinfo is None:
        raise InvalidInput("now must be timezone-aware (UTC)")
    dated = [r.published_at for r in records if r.published_at is not None]
    if not dated:
        return records
    shift = now.astimezone(UTC) - max(dated)
    return [
        replace(r, published_at=r.published_at + shift) if r.published_at else r for r in records
    ]


def load_sample_papers(session: Session, now: datetime | None = None) -> IngestResult:
    """Upsert the bundled sample papers, the newest published at ``now`` (default: now)."""
    now = now or utcnow()
    result = upsert_papers(session, sample_records(now), "sample", now=now)
    return replace(result, name=str(sample_path()))


def list_papers(
    session: Session, on_date: date | None = None, limit: int | None = None
) -> list[Paper]:
    """Papers, newest first; ``on_date`` keeps those published that UTC day (undated papers:
    ingested that day), the same rule as the look-back window."""
    return list(session.scalars(papers_query(on_date, limit)))


def iter_papers(
    session: Session, on_date: date | None = None, limit: int | None = None, batch: int = 500
) -> Iterator[Paper]:
    """:func:`list_papers`, streamed (a server-side cursor on PostgreSQL)."""
    for paper in session.scalars(papers_query(on_date, limit).execution_options(yield_per=batch)):
        yield paper
        session.expunge(paper)


def papers_query(on_date: date | None = None, limit: int | None = None) -> Select[tuple[Paper]]:
    query = select(Paper)
    if on_date is not None:
        start = datetime.combine(on_date, time.min, tzinfo=UTC)
        end = start + timedelta(days=1)
        query = query.where(
            or_(
                and_(Paper.published_at >= start, Paper.published_at < end),
                and_(
                    Paper.published_at.is_(None),
                    Paper.ingested_at >= start,
                    Paper.ingested_at < end,
                ),
            )
        )
    # Undated papers sort by ingestion, like Paper.effective_date.
    effective = func.coalesce(Paper.published_at, Paper.ingested_at)
    query = query.order_by(effective.desc(), Paper.upvotes.desc(), Paper.id)
    if limit:
        query = query.limit(limit)
    return query


def count_papers(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Paper)) or 0
