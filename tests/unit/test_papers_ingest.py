"""Upsert into a real database, whole-source atomicity, the bundled sample, listing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker import db, papers
from worker.errors import InvalidInput
from worker.models import Paper
from worker.papers import (
    PaperRecord,
    PaperSourceError,
    ingest_source,
    list_papers,
    load_sample_papers,
    looks_like_arxiv_id,
    parse,
    parse_hf,
    sample_path,
    sample_records,
    upsert_papers,
)
from worker.resources import data_dir

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
HF_FILE = DATA / "hf_daily_papers.json"
ARXIV_FILE = DATA / "arxiv_feed.xml"
SEED = DATA / "trending_page.txt"
T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def snapshot() -> list[dict[str, Any]]:
    """Every column of every paper, from a fresh session."""
    with db.session_scope() as s:
        rows = s.scalars(select(Paper).order_by(Paper.id)).all()
        return [{c.name: getattr(p, c.key) for c in Paper.__table__.columns} for p in rows]


def count() -> int:
    with db.session_scope() as s:
        return s.scalar(select(func.count()).select_from(Paper)) or 0


def ingest_file(
    path: Path | str, now: datetime = T0, fmt: str | None = None
) -> papers.IngestResult:
    with db.session_scope() as s:
        return ingest_source(s, str(path), fmt, now=now)


# --------------------------------------------------------------------------- upsert


def _reingest_updates_without_duplicates(tmp_path: Path) -> None:
    first = ingest_file(HF_FILE)
    assert (first.new, first.updated, first.total, first.format) == (3, 0, 3, "hf")
    before = {row["id"]: row for row in snapshot()}
    assert all(row["source"] == "hf" for row in before.values())
    assert all(row["ingested_at"] == T0 for row in before.values())

    items = json.loads(HF_FILE.read_text(encoding="utf-8"))
    for item in items:
        item["paper"]["upvotes"] += 100
    items[0]["paper"]["title"] = "Invertible Diffusion Models for Compressed Sensing (v2)"
    changed = tmp_path / "daily2.json"
    changed.write_text(json.dumps(items), encoding="utf-8")
    later = T0 + timedelta(hours=5)
    second = ingest_file(changed, now=later)
    assert (second.new, second.updated) == (0, 3)

    after = {row["id"]: row for row in snapshot()}
    assert after.keys() == before.keys()  # no duplicate rows
    for paper_id, row in after.items():
        assert row["upvotes"] == before[paper_id]["upvotes"] + 100
        assert row["ingested_at"] == T0  # kept from the first ingest
        assert row["updated_at"] == later
    assert after[items[0]["paper"]["id"]]["title"].endswith("(v2)")

    # A different source adds its own papers and leaves the others alone.
    third = ingest_file(ARXIV_FILE, now=later)
    assert (third.new, third.updated, third.format) == (2, 0, "arxiv")
    assert count() == 5


def test_reingest_updates_upvotes_and_metadata_sqlite(settings: Any, tmp_path: Path) -> None:
    _reingest_updates_without_duplicates(tmp_path)


@pytest.mark.postgres
def test_reingest_updates_upvotes_and_metadata_postgres(pg_env: Any, tmp_path: Path) -> None:
    _reingest_updates_without_duplicates(tmp_path)


def _duplicate_ids_last_wins() -> None:
    records = [
        PaperRecord(id="2401.00001", title="First", upvotes=1),
        PaperRecord(id="2401.00002", title="Other", upvotes=5),
        PaperRecord(id="2401.00001", title="First, again", upvotes=9),
    ]
    with db.session_scope() as s:
        result = upsert_papers(s, records, "jsonl", now=T0)
    assert (result.new, result.updated) == (2, 0)
    rows = {row["id"]: row for row in snapshot()}
    assert rows["2401.00001"]["title"] == "First, again"
    assert rows["2401.00001"]["upvotes"] == 9


def test_duplicate_ids_within_a_source_count_once_sqlite(settings: Any) -> None:
    _duplicate_ids_last_wins()


@pytest.mark.postgres
def test_duplicate_ids_within_a_source_count_once_postgres(pg_env: Any) -> None:
    # PostgreSQL refuses to touch one row twice in an INSERT ... ON CONFLICT DO UPDATE.
    _duplicate_ids_last_wins()


# --------------------------------------------------------------------------- one paper, one record

# The Hugging Face paper object of 2002.08797 (the shape of /api/papers/{id}; the values are
# this test's), and the paper's real entry in the recorded arXiv feed.
HF_PRUNING = {
    "id": "2002.08797",
    "title": "Robust Pruning at Initialization",
    "summary": "Overparameterized Neural Networks (NN) display state-of-the-art performance.",
    "authors": [{"_id": "a1", "name": "Soufiane Hayou", "hidden": False}],
    "publishedAt": "2020-02-20T15:12:40.000Z",
    "submittedOnDailyAt": "2026-11-24T06:00:00.000Z",
    "upvotes": 77,
    "discussionId": "d1",
}


def _merge_both_orders(tmp_path: Path) -> None:
    hf = tmp_path / "paper.json"
    hf.write_text(json.dumps(HF_PRUNING, indent=2), encoding="utf-8")
    for order in ((hf, ARXIV_FILE), (ARXIV_FILE, hf)):
        with db.session_scope() as s:
            s.query(Paper).delete()
        for path in order:
            ingest_file(path, now=T0)
        rows = {row["id"]: row for row in snapshot()}
        assert len(rows) == 2  # the feed's two papers; 2002.08797 once
        row = rows["2002.08797"]
        assert row["upvotes"] == 77  # not 0: arXiv says nothing about upvotes
        assert row["hf_url"] == "https://huggingface.co/papers/2002.08797"
        assert row["url"] == "http://arxiv.org/abs/2002.08797v5"  # the page arXiv gave
        assert row["pdf_url"] == "http://arxiv.org/pdf/2002.08797v5"
        assert row["categories"] == ["stat.ML", "cs.LG"]  # primary first
        assert row["arxiv_version"] == 5
        assert row["comment"] == "Published as a conference paper at ICLR 2021"
        # arXiv's four authors and full abstract; the day Hugging Face featured it.
        assert len(row["authors"]) == 4 and row["abstract"].endswith("architectures.")
        assert row["published_at"] == datetime(2026, 11, 24, 6, tzinfo=UTC)
        assert row["sources"] == ["hf", "arxiv"]


def test_hf_and_arxiv_records_of_one_paper_merge_sqlite(settings: Any, tmp_path: Path) -> None:
    _merge_both_orders(tmp_path)


@pytest.mark.postgres
def test_hf_and_arxiv_records_of_one_paper_merge_postgres(pg_env: Any, tmp_path: Path) -> None:
    _merge_both_orders(tmp_path)


def test_versioned_ids_are_one_paper_and_fields_not_given_are_kept(settings: Any) -> None:
    with db.session_scope() as s:
        upsert_papers(
            s,
            [PaperRecord(id="2401.12345", title="T", upvotes=12, categories=["cs.CL"])],
            "hf",
            now=T0,
        )
    with db.session_scope() as s:
        result = upsert_papers(
            s,
            [
                PaperRecord(id="2401.12345v3", title="T", doi="10.1/x"),
                PaperRecord(id="2401.12345v2", title="T"),  # an older version: not lower
            ],
            "jsonl",
            now=T0,
        )
    assert (result.new, result.updated) == (0, 1)
    (row,) = snapshot()
    assert (row["id"], row["arxiv_version"], row["upvotes"], row["doi"]) == (
        "2401.12345",
        3,
        12,
        "10.1/x",
    )
    assert row["categories"] == ["cs.CL"]
    # A source that does give upvotes replaces them, even with 0.
    with db.session_scope() as s:
        upsert_papers(s, [PaperRecord(id="2401.12345", title="T", upvotes=0)], "hf", now=T0)
    assert snapshot()[0]["upvotes"] == 0


def test_stored_values_roundtrip(settings: Any) -> None:
    ingest_file(HF_FILE)
    parsed = {r.id: r for r in parse_hf(HF_FILE.read_text(encoding="utf-8"))}
    for row in snapshot():
        record = parsed[row["id"]]
        for name in ("title", "abstract", "authors", "upvotes", "published_at", "url", "pdf_url"):
            assert row[name] == getattr(record, name), name
        assert row["published_at"].tzinfo is not None


# --------------------------------------------------------------------------- atomicity


def test_bad_source_leaves_database_unchanged(settings: Any, tmp_path: Path) -> None:
    ingest_file(HF_FILE)
    before = snapshot()
    good = {"id": "2611.99999", "title": "Would be new", "upvotes": 1}
    known = {"id": "2403.17006", "title": "Would overwrite", "upvotes": 999}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "\n".join([json.dumps(good), json.dumps(known), '{"id": "x", "upvotes": "abc"}']),
        encoding="utf-8",
    )
    with pytest.raises(PaperSourceError) as info:
        ingest_file(bad, now=T0 + timedelta(days=1))
    assert "record 3 (line 3): field 'title' is missing" in str(info.value)
    assert snapshot() == before


def test_database_error_midway_rolls_back_everything(settings: Any) -> None:
    # More rows than one INSERT batch, the poison one in the last batch: the first batch
    # has already been executed when the database refuses, and must vanish too.
    records = [PaperRecord(id=f"bulk-{i:05d}", title=f"Paper {i}") for i in range(3000)]
    records.append(replace(PaperRecord(id="bulk-poison", title="x"), title=None))  # type: ignore[arg-type]
    with pytest.raises(Exception, match=r"(?i)not null"), db.session_scope() as s:
        upsert_papers(s, records, "jsonl")
    assert count() == 0


# --------------------------------------------------------------------------- sample data


def _seed_pairs_independently() -> list[tuple[str, str]]:
    """Title/abstract pairs counted without the generator's logic: an abstract is a long
    line, its title the line before it (the first one glued to "Subscribe")."""
    lines = SEED.read_text(encoding="utf-8").splitlines()
    pairs = []
    for i, line in enumerate(lines):
        if len(line) > 300:
            title = lines[i - 1]
            pairs.append((re.sub(r"^Subscribe", "", title), line))
    return pairs


def test_sample_file_has_the_seed_papers_with_real_ids_and_no_invented_data() -> None:
    pairs = _seed_pairs_independently()
    assert len(pairs) >= 20
    raw = [json.loads(line) for line in sample_path().read_text(encoding="utf-8").splitlines()]
    # Every sample paper is a paper of the seed page, in page order, verbatim; the one whose
    # arXiv id was not found is left out rather than given a made-up one.
    kept = {(r["title"], r["abstract"]) for r in raw}
    assert [(r["title"], r["abstract"]) for r in raw] == [p for p in pairs if p in kept]
    assert len(raw) >= len(pairs) - 1
    assert pairs[0][0] == "Robust Pruning at Initialization" == raw[0]["title"]
    assert all(r["sample"] is True for r in raw)
    ids = [r["id"] for r in raw]
    assert len(set(ids)) == len(ids)
    assert all(looks_like_arxiv_id(i) and not i.startswith("2611.") for i in ids)
    # The links are those of the id, never a search page.
    for r in raw:
        assert r["url"] == f"https://arxiv.org/abs/{r['id']}"
        assert r["pdf_url"] == f"https://arxiv.org/pdf/{r['id']}"
        assert r["hf_url"] == f"https://huggingface.co/papers/{r['id']}"
    # Nothing that was not recorded anywhere: no upvotes, no dates.
    assert not any("upvotes" in r or r.get("published_at") for r in raw)
    # Where a recorded feed in tests/data has the paper, the sample says the same.
    feed = {r.id: r for r in parse(ARXIV_FILE.read_text(encoding="utf-8"), "arxiv").records}
    for r in raw:
        if r["id"] in feed:
            assert r["authors"] == feed[r["id"]].authors
            assert r["categories"] == feed[r["id"]].categories
    # The papermail parser accepts the file as it is.
    assert [r.title for r in sample_records()] == [r["title"] for r in raw]


def test_sample_path_is_inside_the_package() -> None:
    assert sample_path() == data_dir() / "sample_papers.jsonl"
    assert sample_path().is_file()
    assert papers.sample_path() == sample_path()


def test_generator_is_deterministic_and_committed_file_is_current() -> None:
    script = ROOT / "scripts" / "make_sample_papers.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert f"up to date ({len(sample_records())} papers)" in done.stdout
    assert "left out (no arXiv id found)" in done.stderr


def test_generator_refuses_a_seed_without_the_glued_header(tmp_path: Path) -> None:
    seed = tmp_path / "seed.txt"
    seed.write_text("Header\nA title\n" + "An abstract. " * 40 + "\n", encoding="utf-8")
    script = ROOT / "scripts" / "make_sample_papers.py"
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [sys.executable, str(script), "--seed", str(seed), "--output", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "header word 'Subscribe'" in done.stderr
    assert not out.exists()


def test_load_sample_papers_counts_them_from_now(settings: Any) -> None:
    original = sample_records()
    now = datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC)
    with db.session_scope() as s:
        result = load_sample_papers(s, now=now)
    assert (result.new, result.updated) == (len(original), 0)
    rows = {row["id"]: row for row in snapshot()}
    # Undated papers count from their ingestion: the demo's are always today's.
    assert all(row["published_at"] is None and row["ingested_at"] == now for row in rows.values())
    for record in original:
        assert rows[record.id]["source"] == "sample"
        assert rows[record.id]["title"] == record.title

    with db.session_scope() as s:
        again = load_sample_papers(s, now=now + timedelta(days=1))
    assert (again.new, again.updated) == (0, len(original))
    assert count() == len(original)


def test_sample_records_keep_the_spacing_of_dated_records(tmp_path: Path, monkeypatch: Any) -> None:
    """sample_records(now) still moves dated records so the newest is now (a sample file
    with dates, e.g. an operator's own)."""
    from worker.papers import ingest

    path = tmp_path / "sample.jsonl"
    path.write_text(
        '{"id": "a", "title": "A", "published_at": "2026-01-01T00:00:00Z"}\n'
        '{"id": "b", "title": "B", "published_at": "2026-01-03T00:00:00Z"}\n'
        '{"id": "c", "title": "C"}\n',
        encoding="utf-8",
    )
    monkeypatch.setattr(ingest, "sample_path", lambda: path)
    now = datetime(2031, 2, 3, tzinfo=UTC)
    shifted = {r.id: r.published_at for r in ingest.sample_records(now)}
    assert shifted == {"a": now - timedelta(days=2), "b": now, "c": None}


def test_load_sample_papers_refuses_naive_now(settings: Any) -> None:
    with pytest.raises(InvalidInput, match="timezone-aware"), db.session_scope() as s:
        load_sample_papers(s, now=datetime(2030, 1, 1))
    assert count() == 0


# --------------------------------------------------------------------------- listing


def test_list_papers_by_date_uses_ingestion_for_undated(settings: Any) -> None:
    day = date(2026, 11, 25)
    noon = datetime(2026, 11, 25, 12, tzinfo=UTC)
    with db.session_scope() as s:
        upsert_papers(
            s,
            [
                PaperRecord(id="on-day", title="A", published_at=noon, upvotes=3),
                PaperRecord(
                    id="late-on-day", title="B", published_at=noon.replace(hour=23, minute=59)
                ),
                PaperRecord(id="day-before", title="C", published_at=noon - timedelta(days=1)),
                PaperRecord(
                    id="next-midnight", title="D", published_at=datetime(2026, 11, 26, tzinfo=UTC)
                ),
            ],
            "jsonl",
            now=noon - timedelta(days=3),
        )
        upsert_papers(
            s, [PaperRecord(id="undated-today", title="E")], "jsonl", now=noon + timedelta(hours=1)
        )
        upsert_papers(
            s, [PaperRecord(id="undated-old", title="F")], "jsonl", now=noon - timedelta(days=2)
        )
    with db.session_scope() as s:
        assert [p.id for p in list_papers(s, on_date=day)] == [
            "late-on-day",
            "undated-today",
            "on-day",
        ]
        everything = [p.id for p in list_papers(s)]
        assert everything[0] == "next-midnight" and len(everything) == 6
        assert [p.id for p in list_papers(s, limit=2)] == everything[:2]
        assert list_papers(s, on_date=date(2020, 1, 1)) == []


def test_session_fixture_sees_upserts(session: Session) -> None:
    result = upsert_papers(session, [PaperRecord(id="a", title="A")], "jsonl")
    assert result.new == 1
    assert session.get(Paper, "a").hf_url == "https://huggingface.co/papers/a"  # type: ignore[union-attr]


@pytest.mark.parametrize("hour", [3, 17])
def test_demo_sends_the_undated_sample_whatever_the_hour(settings: Any, hour: int) -> None:
    """The sample has no dates (none is made up); the demo counts them as ingested before
    the edition's first send time, so its editions find them early or late in the day."""
    from worker import clock
    from worker.demo import run_demo

    at = datetime(2031, 3, 14, hour, 0, tzinfo=UTC)
    with clock.installed(clock.anchored(at)):
        result = run_demo(settings)
    assert result.outcome.sent == 4, result.skipped
    assert list(result.skipped) == ["katherine@example.org"]  # her topic matches nothing
