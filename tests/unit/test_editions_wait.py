"""Editions wait for the day's papers: held while the fetch has not succeeded, let go when
it does (with the papers that arrived meanwhile), and at the deadline skipped with "no papers
fetched today" (FETCH_MISSED=skip) or sent with what arrived (send) — never with older papers
only. The fetch runs against a local HTTP server serving the recorded Hugging Face list."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from tests.unit.fetch_server import Answer, FakeTime, Script, serve
from worker import config, db, delivery, scheduling, tasks
from worker.cli import main as cli
from worker.models import Delivery, DeliveryPaper, PaperFetch, Subscriber
from worker.papers import PaperRecord, upsert_papers
from worker.papers.fetch import fetch_due, fetch_source

DATA = Path(__file__).resolve().parent.parent / "data"
D = datetime(2031, 3, 14, tzinfo=UTC).date()
SEND = datetime(2031, 3, 14, 7, 0, tzinfo=UTC)  # the subscriber's 07:00 UTC
TODAY_IDS = ["2403.17006", "2404.12754", "2212.11279"]  # the recorded list


def todays_list() -> bytes:
    """The recorded daily-papers list, featured on D (its dates moved to that morning; the
    last one featured at 07:20, after the 07:00 send time, while the edition waited)."""
    items = json.loads((DATA / "hf_daily_papers.json").read_text(encoding="utf-8"))
    for item, at in zip(items, ("01:10", "02:10", "07:20"), strict=True):
        item["publishedAt"] = f"2031-03-14T{at}:00.000Z"
    return json.dumps(items).encode()


@pytest.fixture
def wait_settings(settings: Any, monkeypatch: pytest.MonkeyPatch) -> config.Settings:
    monkeypatch.setenv("PAPERMAIL_SOURCES", "hf")
    monkeypatch.setenv("PAPERMAIL_FETCH_WAIT_MINUTES", "60")
    config.reset_settings()
    return config.get_settings()


def use(monkeypatch: pytest.MonkeyPatch, **values: str) -> config.Settings:
    for key, value in values.items():
        monkeypatch.setenv(f"PAPERMAIL_{key.upper()}", value)
    config.reset_settings()
    return config.get_settings()


def add_subscriber(email: str = "ada@example.org", timezone: str = "UTC", hour: int = 7) -> int:
    with db.session_scope() as s:
        sub = Subscriber(email=email, status="active", send_hour=hour, timezone=timezone)
        s.add(sub)
        s.flush()
        return sub.id


def add_stale_papers() -> None:
    """Yesterday's papers: inside a daily edition's 48-hour window, but not today's."""
    with db.session_scope() as s:
        upsert_papers(
            s,
            [
                PaperRecord(
                    id="2403.00001",
                    title="Yesterday's first",
                    published_at=SEND - timedelta(hours=20),
                ),
                PaperRecord(
                    id="2403.00002",
                    title="Yesterday's second",
                    published_at=SEND - timedelta(hours=22),
                ),
            ],
            "hf",
            now=SEND - timedelta(hours=20),
        )


def plan(now: datetime, s: config.Settings) -> list[int]:
    with db.session_scope() as session:
        return scheduling.plan_due(session, now, s)


def row(delivery_id: int) -> dict[str, Any]:
    with db.session_scope() as session:
        d = session.get(Delivery, delivery_id)
        assert d is not None
        return {
            "state": d.state,
            "waiting_for": d.waiting_for,
            "scheduled_at": d.scheduled_at,
            "skip_reason": d.skip_reason,
        }


def only_delivery() -> int:
    with db.session_scope() as session:
        (delivery_id,) = session.scalars(select(Delivery.id)).all()
        return delivery_id


def fetch_today(s: config.Settings, script: Script) -> None:
    report = fetch_source("hf", D, settings=s, sleep=FakeTime().sleep)
    assert report.status == "ok", report.error


def sent_papers(delivery_id: int) -> list[str]:
    with db.session_scope() as session:
        return list(
            session.scalars(
                select(DeliveryPaper.paper_id)
                .where(DeliveryPaper.delivery_id == delivery_id)
                .order_by(DeliveryPaper.position)
            )
        )


def test_the_edition_waits_for_the_fetch_then_goes_with_todays_papers(
    wait_settings: config.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_subscriber()
    add_stale_papers()
    assert plan(SEND + timedelta(minutes=5), wait_settings) == []  # nothing to send yet
    held = only_delivery()
    waiting = row(held)
    assert (waiting["state"], waiting["waiting_for"]) == ("pending", "papers")
    assert waiting["scheduled_at"] == SEND + timedelta(minutes=60)  # the deadline
    # Nothing picks it up meanwhile: not `digest run`, not the sweep, not a stray chunk.
    with db.session_scope() as session:
        assert delivery.pending_delivery_ids(session, D) == []
        late = SEND + timedelta(minutes=90)
        assert session.scalars(select(Delivery.id).where(*tasks._sweepable(late))).all() == []
    stray = delivery.process_deliveries(
        [held], settings=wait_settings, now=SEND + timedelta(hours=2)
    )
    assert (stray.sent, stray.not_claimed) == (0, 1)
    assert plan(SEND + timedelta(minutes=20), wait_settings) == []  # still no papers
    shown = CliRunner().invoke(cli, ["stats", "--date", D.isoformat(), "--json"])
    (edition,) = json.loads(shown.output)["editions"]
    assert (edition["states"]["pending"], edition["waiting_for_papers"]) == (1, 1)
    shown = CliRunner().invoke(cli, ["stats", "--date", D.isoformat()])
    assert "1 waiting for the day's papers" in shown.output

    with serve(Script().on("/api/daily_papers", Answer(body=todays_list()))) as script:
        s = use(monkeypatch, hf_api_url=f"{script.url}/api/daily_papers")
        fetch_today(s, script)
    released_at = SEND + timedelta(minutes=35)
    assert plan(released_at, s) == [held]
    assert row(held)["waiting_for"] is None and row(held)["scheduled_at"] == released_at
    outcome = delivery.process_deliveries([held], settings=s, now=released_at)
    assert outcome.sent == 1
    papers = sent_papers(held)
    # Today's papers lead, the one featured while the edition waited (07:20) included.
    assert set(papers[: len(TODAY_IDS)]) == set(TODAY_IDS)


def test_at_the_deadline_it_is_skipped_not_sent_with_stale_papers(
    wait_settings: config.Settings,
) -> None:
    delivery_id = None
    add_subscriber()
    add_stale_papers()
    with db.session_scope() as session:  # a failed fetch is no fetch
        session.add(PaperFetch(source="hf", fetch_date=D, status="failed", error="HTTP 503"))
    assert plan(SEND + timedelta(minutes=5), wait_settings) == []
    delivery_id = only_delivery()
    assert plan(SEND + timedelta(minutes=59), wait_settings) == []
    assert row(delivery_id)["state"] == "pending"
    assert plan(SEND + timedelta(minutes=60), wait_settings) == []
    skipped = row(delivery_id)
    assert (skipped["state"], skipped["skip_reason"], skipped["waiting_for"]) == (
        "skipped",
        "no papers fetched today",
        None,
    )
    assert sent_papers(delivery_id) == []


def test_send_mode_goes_with_what_arrived_and_skips_when_nothing_did(
    wait_settings: config.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = use(monkeypatch, sources="hf,arxiv", arxiv_categories="cs.LG", fetch_missed="send")
    add_subscriber("ada@example.org")
    add_stale_papers()
    assert plan(SEND + timedelta(minutes=5), s) == []
    with serve(Script().on("/api/daily_papers", Answer(body=todays_list()))) as script:
        s = use(monkeypatch, hf_api_url=f"{script.url}/api/daily_papers")
        fetch_today(s, script)
    with db.session_scope() as session:  # arXiv failed: the day is not complete
        session.add(PaperFetch(source="arxiv", fetch_date=D, status="failed", error="HTTP 500"))
    assert plan(SEND + timedelta(minutes=30), s) == []  # waits for arXiv until the deadline
    held = only_delivery()
    assert plan(SEND + timedelta(minutes=61), s) == [held]  # goes with Hugging Face's
    outcome = delivery.process_deliveries([held], settings=s, now=SEND + timedelta(minutes=61))
    assert outcome.sent == 1 and set(TODAY_IDS) <= set(sent_papers(held))

    # The next day nothing arrives at all: even in send mode, no email of old papers only.
    next_send = SEND + timedelta(days=1)
    assert plan(next_send + timedelta(minutes=5), s) == []
    with db.session_scope() as session:
        tomorrow = session.scalar(
            select(Delivery.id).where(Delivery.edition_date == D + timedelta(days=1))
        )
    assert tomorrow is not None
    assert plan(next_send + timedelta(minutes=60), s) == []
    assert row(tomorrow)["state"] == "skipped"
    assert row(tomorrow)["skip_reason"] == "no papers fetched today"


def test_an_edition_needs_the_fetch_before_its_own_send_time(
    wait_settings: config.Settings,
) -> None:
    """Kiritimati (UTC+14): 07:00 local on the 15th is 17:00 UTC on the 14th, so the 14th's
    fetch is its day's papers; London's 07:00 on the 15th needs the 15th's."""
    add_subscriber("kiri@example.org", timezone="Pacific/Kiritimati")
    with db.session_scope() as session:
        session.add(PaperFetch(source="hf", fetch_date=D, status="ok", papers=3))
    ids = plan(datetime(2031, 3, 14, 17, 5, tzinfo=UTC), wait_settings)
    assert len(ids) == 1 and row(ids[0])["waiting_for"] is None
    add_subscriber("london@example.org", timezone="Europe/London")
    assert plan(datetime(2031, 3, 15, 7, 5, tzinfo=UTC), wait_settings) == []  # the 15th's


def test_without_sources_nothing_waits(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s = use(monkeypatch, sources="")
    add_subscriber()
    ids = plan(SEND + timedelta(minutes=5), s)
    assert len(ids) == 1 and row(ids[0])["waiting_for"] is None
    # Editions held before fetching was switched off are let go by the next tick.
    with db.session_scope() as session:
        session.execute(
            Delivery.__table__.update().values(
                waiting_for="papers", scheduled_at=SEND + timedelta(hours=1)
            )
        )
    assert plan(SEND + timedelta(minutes=20), s) == ids


def test_the_beats_fetch_runs_from_fetch_at_for_the_missing_sources(
    wait_settings: config.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve(Script().on("/api/daily_papers", Answer(body=todays_list()))) as script:
        s = use(monkeypatch, hf_api_url=f"{script.url}/api/daily_papers", fetch_at="05:00")
        fake = FakeTime()
        assert fetch_due(settings=s, now=datetime(2031, 3, 14, 4, 59, tzinfo=UTC)) == []
        (report,) = fetch_due(
            settings=s, now=datetime(2031, 3, 14, 5, 0, tzinfo=UTC), sleep=fake.sleep
        )
        assert (report.source, report.fetch_date, report.status) == ("hf", D, "ok")
        # Every 15 minutes after, until the day ends: nothing more to ask once it succeeded.
        assert fetch_due(settings=s, now=datetime(2031, 3, 14, 5, 15, tzinfo=UTC)) == []
    assert len(script.requests()) == 1


def test_the_fetch_task_lets_the_waiting_editions_go_at_once(
    wait_settings: config.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The beat's task (run here in-process, its chunks published to Celery's in-memory
    broker): fetch, then the editions that waited are released and queued."""
    from worker.clock import installed

    add_subscriber()
    assert plan(SEND + timedelta(minutes=5), wait_settings) == []
    held = only_delivery()
    with serve(Script().on("/api/daily_papers", Answer(body=todays_list()))) as script:
        use(monkeypatch, hf_api_url=f"{script.url}/api/daily_papers")
        with installed(lambda: SEND + timedelta(minutes=10)):
            summary = tasks.fetch_papers()
    assert summary == {"fetched": {"hf": "ok"}, "papers": 3, "released": 1}
    assert row(held)["waiting_for"] is None
    with db.session_scope() as session:
        assert session.get(Delivery, held).queued_epoch == "static"  # published
