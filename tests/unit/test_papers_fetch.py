"""The scheduled fetch against a local HTTP server serving recorded responses
(tests/data/hf_daily_papers.json, tests/data/arxiv_feed.xml): success, 304, 429 with
Retry-After, 500 then success, a body cut short, a timeout, a size limit, arXiv paging at
arXiv's pace, and one paper from both sources. Waiting is injected (FakeTime): nothing
here sleeps for real except the server of the timeout test."""

from __future__ import annotations

import email.utils
import itertools
import json
import re
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from tests.unit.fetch_server import Answer, FakeTime, Script, serve
from worker import config, db
from worker.cli import main as cli
from worker.clock import utcnow
from worker.models import FetchValidator, Paper, PaperFetch
from worker.papers.fetch import (
    arxiv_query,
    fetch_papers,
    fetch_source,
    retry_after_seconds,
    succeeded_sources,
)
from worker.rendering import paper_view

DATA = Path(__file__).resolve().parent.parent / "data"
HF_BODY = (DATA / "hf_daily_papers.json").read_bytes()
ARXIV_FEED = (DATA / "arxiv_feed.xml").read_text(encoding="utf-8")
DAY = date(2031, 3, 14)


def settings_for(script: Script, monkeypatch: pytest.MonkeyPatch, **extra: str) -> config.Settings:
    monkeypatch.setenv("PAPERMAIL_HF_API_URL", f"{script.url}/api/daily_papers")
    monkeypatch.setenv("PAPERMAIL_ARXIV_API_URL", f"{script.url}/api/query")
    monkeypatch.setenv("PAPERMAIL_ARXIV_CATEGORIES", "stat.ML,cs.LG")
    monkeypatch.setenv("PAPERMAIL_SOURCES", "hf")  # the tests' default is none
    for key, value in extra.items():
        monkeypatch.setenv(f"PAPERMAIL_{key.upper()}", value)
    config.reset_settings()
    return config.get_settings()


def fetches() -> list[dict[str, Any]]:
    with db.session_scope() as s:
        rows = s.scalars(select(PaperFetch).order_by(PaperFetch.id)).all()
        return [{c.name: getattr(r, c.key) for c in PaperFetch.__table__.columns} for r in rows]


def paper_count() -> int:
    with db.session_scope() as s:
        return s.scalar(select(func.count()).select_from(Paper)) or 0


def hf(fake: FakeTime, settings: config.Settings, **kw: Any):  # type: ignore[no-untyped-def]
    return fetch_source(
        "hf", DAY, settings=settings, sleep=fake.sleep, monotonic=fake.monotonic, **kw
    )


# --------------------------------------------------------------------------- Hugging Face


def test_success_stores_papers_and_records_the_fetch(settings: Any, monkeypatch: Any) -> None:
    with serve(Script().on("/api/daily_papers", Answer(body=HF_BODY, etag='"v1"'))) as script:
        s = settings_for(script, monkeypatch)
        fake = FakeTime()
        report = hf(fake, s)
    assert (report.status, report.papers, report.new, report.updated) == ("ok", 3, 3, 0)
    (seen,) = script.requests()
    assert seen.query == {"date": "2031-03-14"}
    assert re.match(
        r"papermail/\S+ \(self-hosted paper digest; \+http://papermail\.test\)",
        seen.headers["User-Agent"],
    )
    assert "If-None-Match" not in seen.headers
    assert paper_count() == 3
    (row,) = fetches()
    assert (row["source"], row["fetch_date"], row["status"], row["requests"]) == (
        "hf",
        DAY,
        "ok",
        1,
    )
    assert (row["papers"], row["new"], row["bytes"], row["etag"]) == (3, 3, len(HF_BODY), '"v1"')
    assert row["url"] == f"{script.url}/api/daily_papers?date=2031-03-14"
    assert fake.sleeps == []
    with db.session_scope() as session:
        assert succeeded_sources(session, DAY) == {"hf"}
        assert succeeded_sources(session, DAY - timedelta(days=1)) == set()


def test_a_repeated_fetch_is_conditional_and_costs_nothing(settings: Any, monkeypatch: Any) -> None:
    with serve(Script().on("/api/daily_papers", Answer(body=HF_BODY, etag='"v1"'))) as script:
        s = settings_for(script, monkeypatch)
        hf(FakeTime(), s)
        with db.session_scope() as session:
            before = {p.id: p.updated_at for p in session.scalars(select(Paper))}
        again = hf(FakeTime(), s)
    assert (again.status, again.papers, again.new, again.updated, again.bytes) == (
        "not_modified",
        0,
        0,
        0,
        0,
    )
    assert script.requests()[1].headers["If-None-Match"] == '"v1"'
    with db.session_scope() as session:
        assert {p.id: p.updated_at for p in session.scalars(select(Paper))} == before
    assert [r["status"] for r in fetches()] == ["ok", "not_modified"]
    with db.session_scope() as session:
        assert succeeded_sources(session, DAY) == {"hf"}


def test_last_modified_is_sent_back(settings: Any, monkeypatch: Any) -> None:
    stamp = "Fri, 14 Mar 2031 05:00:00 GMT"
    answer = Answer(body=HF_BODY, headers={"Last-Modified": stamp})
    with serve(Script().on("/api/daily_papers", answer)) as script:
        s = settings_for(script, monkeypatch)
        hf(FakeTime(), s)
        hf(FakeTime(), s)
    assert script.requests()[1].headers["If-Modified-Since"] == stamp
    with db.session_scope() as session:
        (validator,) = session.scalars(select(FetchValidator)).all()
        assert (validator.source, validator.last_modified) == ("hf", stamp)


def test_429_waits_what_retry_after_asks(settings: Any, monkeypatch: Any) -> None:
    busy = Answer(429, b'{"error": "slow down"}', headers={"Retry-After": "7"})
    with serve(Script().on("/api/daily_papers", busy, Answer(body=HF_BODY))) as script:
        fake = FakeTime()
        report = hf(fake, settings_for(script, monkeypatch))
    assert (report.status, report.requests, report.papers) == ("ok", 2, 3)
    assert fake.sleeps == [7.0]


def test_retry_after_as_an_http_date_is_read_against_the_clock() -> None:
    now = utcnow()
    later = email.utils.format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert retry_after_seconds(later, now) == pytest.approx(90, abs=1)
    assert retry_after_seconds("12", now) == 12
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds(email.utils.format_datetime(now - timedelta(hours=1)), now) == 0


def test_a_retry_after_too_long_fails_now(settings: Any, monkeypatch: Any) -> None:
    busy = Answer(503, b"maintenance", headers={"Retry-After": "3600"})
    with serve(Script().on("/api/daily_papers", busy)) as script:
        fake = FakeTime()
        report = hf(fake, settings_for(script, monkeypatch))
    assert report.status == "failed" and report.requests == 1
    assert "asks to wait 3600 s (Retry-After)" in (report.error or "")
    assert fake.sleeps == []


def test_500_then_success_backs_off(settings: Any, monkeypatch: Any) -> None:
    answers = (Answer(500, b"oops"), Answer(503, b"busy"), Answer(body=HF_BODY))
    with serve(Script().on("/api/daily_papers", *answers)) as script:
        fake = FakeTime()
        report = hf(fake, settings_for(script, monkeypatch))
    assert (report.status, report.requests, report.http_status) == ("ok", 3, 200)
    assert fake.sleeps == [2.0, 4.0]  # exponential backoff


def test_a_server_that_keeps_failing_fails_the_fetch_and_changes_nothing(
    settings: Any, monkeypatch: Any
) -> None:
    with serve(Script().on("/api/daily_papers", Answer(502, b"bad gateway"))) as script:
        fake = FakeTime()
        report = hf(fake, settings_for(script, monkeypatch, fetch_retries="3"))
    assert report.status == "failed" and report.requests == 4
    assert "HTTP 502 Bad Gateway (gave up after 4 attempts)" in (report.error or "")
    assert fake.sleeps == [2.0, 4.0, 8.0]
    assert paper_count() == 0
    (row,) = fetches()
    assert (row["status"], row["http_status"], row["papers"]) == ("failed", 502, 0)
    with db.session_scope() as session:
        assert succeeded_sources(session, DAY) == set()


def test_a_client_error_is_not_retried(settings: Any, monkeypatch: Any) -> None:
    with serve(Script().on("/elsewhere", Answer(body=HF_BODY))) as script:
        report = hf(FakeTime(), settings_for(script, monkeypatch))
    assert report.status == "failed" and report.requests == 1
    assert "HTTP 404" in (report.error or "")


def test_a_body_cut_short_is_retried(settings: Any, monkeypatch: Any) -> None:
    cut = Answer(body=HF_BODY, truncate=True)
    with serve(Script().on("/api/daily_papers", cut, Answer(body=HF_BODY))) as script:
        fake = FakeTime()
        report = hf(fake, settings_for(script, monkeypatch))
    assert (report.status, report.requests, report.papers) == ("ok", 2, 3)
    assert fake.sleeps == [2.0]


def test_a_body_always_cut_short_fails_without_a_partial_write(
    settings: Any, monkeypatch: Any
) -> None:
    with serve(Script().on("/api/daily_papers", Answer(body=HF_BODY, truncate=True))) as script:
        report = hf(FakeTime(), settings_for(script, monkeypatch, fetch_retries="1"))
    assert report.status == "failed"
    assert "the answer was cut short" in (report.error or "")
    assert paper_count() == 0


def test_a_timeout_is_retried(settings: Any, monkeypatch: Any) -> None:
    slow = Answer(body=HF_BODY, stall=2.5)  # a loaded machine still answers the rest in 1 s
    with serve(Script().on("/api/daily_papers", slow, Answer(body=HF_BODY))) as script:
        fake = FakeTime()
        report = hf(fake, settings_for(script, monkeypatch, fetch_timeout_seconds="1"))
    assert (report.status, report.requests) == ("ok", 2)
    assert fake.sleeps == [2.0]
    with serve(Script().on("/api/daily_papers", slow)) as script:
        s = settings_for(script, monkeypatch, fetch_timeout_seconds="1", fetch_retries="0")
        report = hf(FakeTime(), s)
    assert report.status == "failed" and "no answer within 1 s" in (report.error or "")


def test_a_response_over_the_size_limit_is_refused(settings: Any, monkeypatch: Any) -> None:
    with serve(Script().on("/api/daily_papers", Answer(body=HF_BODY))) as script:
        report = hf(FakeTime(), settings_for(script, monkeypatch, fetch_max_bytes="2048"))
    assert report.status == "failed" and report.requests == 1  # not retried
    assert "8,516 bytes, more than the limit of 2,048" in (report.error or "")
    # Without a Content-Length the limit is counted as the body arrives.
    with serve(Script().on("/api/daily_papers", Answer(body=HF_BODY, no_length=True))) as script:
        report = hf(FakeTime(), settings_for(script, monkeypatch, fetch_max_bytes="2048"))
    assert report.status == "failed" and report.requests == 1
    assert "more than the limit of 2,048 bytes (PAPERMAIL_FETCH_MAX_BYTES)" in (report.error or "")
    assert paper_count() == 0
    with serve(Script().on("/api/daily_papers", Answer(body=HF_BODY, no_length=True))) as script:
        report = hf(FakeTime(), settings_for(script, monkeypatch, fetch_max_bytes="9000"))
    assert (report.status, report.papers) == ("ok", 3)


def test_a_bad_record_rejects_the_whole_fetch_as_ingest_does(
    settings: Any, monkeypatch: Any
) -> None:
    items = json.loads(HF_BODY)
    items[2]["paper"]["upvotes"] = "many"
    body = json.dumps(items).encode()
    with serve(Script().on("/api/daily_papers", Answer(body=body, etag='"bad"'))) as script:
        report = hf(FakeTime(), settings_for(script, monkeypatch))
    assert report.status == "failed"
    assert "record 3 (JSON index 2): expected a number for 'paper.upvotes'" in (report.error or "")
    assert paper_count() == 0
    with db.session_scope() as session:  # a 304 must never stand for papers not stored
        assert session.scalars(select(FetchValidator)).all() == []


def test_leading_whitespace_and_pretty_printing_as_real_servers_send(
    settings: Any, monkeypatch: Any
) -> None:
    body = b"\n" + json.dumps(json.loads(HF_BODY), indent=2).encode()
    with serve(Script().on("/api/daily_papers", Answer(body=body))) as script:
        report = hf(FakeTime(), settings_for(script, monkeypatch))
    assert (report.status, report.papers) == ("ok", 3)


# --------------------------------------------------------------------------- arXiv


def _feed_page(entry_index: int, start: int, total: int) -> bytes:
    """The recorded feed cut to one of its entries, with the paging figures of that page."""
    head, *entries = ARXIV_FEED.split("<entry>")
    entries = ["<entry>" + e for e in entries]
    entries[-1] = entries[-1].replace("</feed>", "")
    head = re.sub(r"(<opensearch:totalResults[^>]*>)\d+", rf"\g<1>{total}", head)
    head = re.sub(r"(<opensearch:startIndex[^>]*>)\d+", rf"\g<1>{start}", head)
    return (head + entries[entry_index] + "</feed>\n").encode()


def arxiv_pages(seen: Any) -> Answer:
    start = int(seen.query["start"])
    return Answer(body=_feed_page(start, start, 2), content_type="application/atom+xml")


def test_arxiv_pages_through_the_day_at_arxivs_pace(settings: Any, monkeypatch: Any) -> None:
    with serve(Script().on("/api/query", arxiv_pages)) as script:
        s = settings_for(script, monkeypatch)
        fake = FakeTime()
        script.clock = fake
        report = fetch_source(
            "arxiv", DAY, settings=s, sleep=fake.sleep, monotonic=fake.monotonic, page_size=1
        )
    assert (report.status, report.pages, report.requests, report.papers) == ("ok", 2, 2, 2)
    first, second = script.requests()
    assert [first.query["start"], second.query["start"]] == ["0", "1"]
    assert first.query["max_results"] == "1"
    assert first.query["search_query"] == (
        "(cat:stat.ML OR cat:cs.LG) AND submittedDate:[203103130000 TO 203103132359]"
    )
    assert (first.query["sortBy"], first.query["sortOrder"]) == ("submittedDate", "descending")
    assert second.fake_at is not None and first.fake_at is not None
    assert second.fake_at - first.fake_at >= 3.0  # at most one request every 3 s
    with db.session_scope() as session:
        row = session.get(Paper, "2002.08797")
        assert row is not None and row.categories == ["stat.ML", "cs.LG"] and row.arxiv_version == 5


def test_arxiv_retries_keep_the_pace_too(settings: Any, monkeypatch: Any) -> None:
    busy = Answer(503, b"busy", headers={"Retry-After": "1"})
    script = Script().on("/api/query", busy, lambda seen: arxiv_pages(seen))
    with serve(script):
        s = settings_for(script, monkeypatch)
        fake = FakeTime()
        script.clock = fake
        report = fetch_source(
            "arxiv", DAY, settings=s, sleep=fake.sleep, monotonic=fake.monotonic, page_size=1
        )
    assert report.status == "ok" and report.requests == 3
    times = [seen.fake_at for seen in script.requests()]
    assert all(b - a >= 3.0 for a, b in itertools.pairwise(times))
    # Retry-After said 1 s: the remaining 2 s of arXiv's interval come on top of it.
    assert fake.sleeps[:2] == [1.0, 2.0]


def test_arxiv_reports_the_apis_own_error(settings: Any, monkeypatch: Any) -> None:
    error_feed = ARXIV_FEED.split("<entry>")[0] + (
        "<entry><id>http://arxiv.org/api/errors#incorrect_id_format</id>"
        "<summary>incorrect id format for 1234</summary></entry></feed>"
    )
    with serve(Script().on("/api/query", Answer(body=error_feed.encode()))) as script:
        s = settings_for(script, monkeypatch)
        report = fetch_source("arxiv", DAY, settings=s, sleep=FakeTime().sleep)
    assert report.status == "failed"
    assert "the arXiv API returned an error: incorrect id format for 1234" in (report.error or "")


def test_arxiv_query_is_the_day_before_in_the_categories(monkeypatch: Any, env: Any) -> None:
    monkeypatch.setenv("PAPERMAIL_ARXIV_CATEGORIES", "cs.CL")
    config.reset_settings()
    assert arxiv_query(config.get_settings(), date(2031, 1, 1)) == (
        "cat:cs.CL AND submittedDate:[203012310000 TO 203012312359]"
    )


# --------------------------------------------------------------------------- both sources


def test_one_paper_from_both_sources_is_one_record(settings: Any, monkeypatch: Any) -> None:
    """Hugging Face's paper object of 2002.08797 (its shape; upvotes 77) and the recorded
    arXiv entry of the same paper, fetched by the same run: one row with both."""
    paper = {
        "id": "2002.08797",
        "title": "Robust Pruning at Initialization",
        "summary": "Overparameterized Neural Networks (NN) display state-of-the-art performance.",
        "authors": [{"_id": "a1", "name": "Soufiane Hayou", "hidden": False}],
        "publishedAt": "2020-02-20T15:12:40.000Z",
        "submittedOnDailyAt": "2031-03-14T01:00:00.000Z",
        "upvotes": 77,
    }
    script = (
        Script()
        .on("/api/daily_papers", Answer(body=json.dumps([paper]).encode()))
        .on("/api/query", Answer(body=ARXIV_FEED.encode(), content_type="application/atom+xml"))
    )
    with serve(script):
        s = settings_for(script, monkeypatch, sources="hf,arxiv")
        fake = FakeTime()
        reports = fetch_papers(settings=s, on_date=DAY, sleep=fake.sleep, monotonic=fake.monotonic)
    assert [(r.source, r.status, r.new, r.updated) for r in reports] == [
        ("hf", "ok", 1, 0),
        ("arxiv", "ok", 1, 1),
    ]
    with db.session_scope() as session:
        row = session.get(Paper, "2002.08797")
        assert row is not None
        assert row.upvotes == 77  # not 0
        assert row.hf_url == "https://huggingface.co/papers/2002.08797"
        assert row.url == "http://arxiv.org/abs/2002.08797v5"
        assert (row.categories, row.primary_category) == (["stat.ML", "cs.LG"], "stat.ML")
        assert row.comment == "Published as a conference paper at ICLR 2021"
        assert row.sources == ["hf", "arxiv"]
        assert succeeded_sources(session, DAY) == {"hf", "arxiv"}
        # What the email can show of it (the templates are issue 14's).
        view = paper_view(row, None)
        assert (view.arxiv_id, view.primary_category, view.upvotes) == ("2002.08797", "stat.ML", 77)
        assert view.abs_url == "https://arxiv.org/abs/2002.08797"
        assert (view.pdf_url, view.hf_url) == (row.pdf_url, row.hf_url)
    # The beat's retries leave alone the sources that succeeded.
    assert fetch_papers(settings=s, on_date=DAY, only_missing=True) == []


# --------------------------------------------------------------------------- the command


def test_papers_fetch_command(settings: Any, monkeypatch: Any) -> None:
    answers = (Answer(body=HF_BODY, etag='"v1"'),)
    with serve(Script().on("/api/daily_papers", *answers)) as script:
        settings_for(script, monkeypatch)
        runner = CliRunner()
        done = runner.invoke(cli, ["papers", "fetch", "--date", "2031-03-14", "--json"])
        assert done.exit_code == 0, done.output
        (report,) = json.loads(done.output)
        assert (report["source"], report["status"], report["papers"], report["new"]) == (
            "hf",
            "ok",
            3,
            3,
        )
        done = runner.invoke(cli, ["papers", "fetch", "--date", "2031-03-14"])
        assert done.exit_code == 0, done.output
        assert "hf 2031-03-14: not modified" in done.output
        listed = runner.invoke(cli, ["papers", "list"])
        assert "fetched for 2031-03-14: hf not modified" in listed.output
    with serve(Script().on("/api/daily_papers", Answer(500, b"down"))) as script:
        settings_for(script, monkeypatch, fetch_retries="0")
        done = runner.invoke(cli, ["papers", "fetch", "--source", "hf", "--date", "2031-03-15"])
        assert done.exit_code == 1
        assert "hf 2031-03-15: FAILED" in done.output and "HTTP 500" in done.output


def test_papers_fetch_without_sources_says_how_to_configure(
    settings: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("PAPERMAIL_SOURCES", "")
    config.reset_settings()
    done = CliRunner().invoke(cli, ["papers", "fetch"])
    assert done.exit_code != 0
    assert "PAPERMAIL_SOURCES is empty" in done.output


def test_stats_shows_the_fetches(settings: Any, monkeypatch: Any) -> None:
    with serve(Script().on("/api/daily_papers", Answer(body=HF_BODY))) as script:
        settings_for(script, monkeypatch, fetch_retries="0")
        hf(FakeTime(), config.get_settings())
    with serve(Script().on("/api/daily_papers", Answer(503, b"busy"))) as script:
        s = settings_for(script, monkeypatch, fetch_retries="0")
        fetch_source("hf", DAY + timedelta(days=1), settings=s, sleep=FakeTime().sleep)
    runner = CliRunner()
    done = runner.invoke(cli, ["stats", "--json"])
    fetched = json.loads(done.output)["fetches"]
    assert [(f["date"], f["source"], f["status"], f["papers"]) for f in fetched] == [
        ("2031-03-14", "hf", "ok", 3)
    ]  # today's (the fixed clock's) only: no edition dates yet, and the 15th is not today
    # No edition on the 15th (exit 1, said first), and its failed fetch, which may be why.
    done = runner.invoke(cli, ["stats", "--date", "2031-03-15"])
    assert done.exit_code == 1 and done.output.startswith("no edition on 2031-03-15")
    assert "2031-03-15 hf     failed" in done.output and "HTTP 503" in done.output
    done = runner.invoke(cli, ["stats"])
    assert "2031-03-14 hf     ok            3 papers (3 new, 0 updated)" in done.output
