"""One bad delivery fails alone: whatever the mix of subscribers and edition dates in a
chunk, an address the mailer cannot send to, bad data, a selection or a render error fails
(or skips) only its own delivery, with the reason, and the rest of the chunk goes out.
Real SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import select, text

from worker import delivery, selection
from worker.config import Settings, get_settings
from worker.db import session_scope
from worker.mailers.base import SendResult
from worker.mailers.ses import SesMailer
from worker.message import OutgoingMessage
from worker.models import Delivery, DeliveryAttempt, DeliveryPaper, Paper, Subscriber
from worker.ratelimit import LocalBucket

NOW = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
TODAY = NOW.date()
YESTERDAY = TODAY - timedelta(days=1)


class Mailer:
    """A provider double that knows SES's address rule (and raises on request)."""

    name = "double"

    def __init__(self, explode_for: str | None = None) -> None:
        self.sent: list[OutgoingMessage] = []
        self.explode_for = explode_for

    address_problem = staticmethod(SesMailer.address_problem)

    def send(self, message: OutgoingMessage) -> SendResult:
        if message.recipient == self.explode_for:
            raise RuntimeError("the SDK fell over")
        self.sent.append(message)
        return SendResult(message_id=f"m-{len(self.sent)}")

    def close(self) -> None:
        pass


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_settings(request: pytest.FixtureRequest) -> Iterator[Settings]:
    if request.param == "postgres":
        request.getfixturevalue("pg_env")
    else:
        request.getfixturevalue("settings")
    yield get_settings()


def paper(s, pid: str, title: str, hours_ago: float, **kw) -> None:
    s.add(
        Paper(
            id=pid,
            title=title,
            abstract=f"{title}. We study it in depth. " * 2,
            authors=kw.pop("authors", ["Ada Lovelace"]),
            upvotes=kw.pop("upvotes", 10),
            published_at=NOW - timedelta(hours=hours_ago),
            url=f"https://example.org/{pid}",
        )
    )


def sub(s, email: str, topics: list[str], **kw) -> int:
    row = Subscriber(email=email, status="active", topics=topics, **kw)
    s.add(row)
    s.flush()
    return row.id


def edition(s, subscriber_id: int, day: date) -> int:
    row = Delivery(subscriber_id=subscriber_id, edition_date=day, state="pending", scheduled_at=NOW)
    s.add(row)
    s.flush()
    return row.id


def run(ids: list[int], mailer: Mailer, settings: Settings) -> delivery.ChunkOutcome:
    return delivery.process_deliveries(
        ids,
        settings=settings,
        mailer=mailer,
        limiter=LocalBucket(rate=10_000, burst=10_000),
        now=NOW,
    )


def papers_of(s, delivery_id: int) -> set[str]:
    return set(
        s.scalars(select(DeliveryPaper.paper_id).where(DeliveryPaper.delivery_id == delivery_id))
    )


@pytest.fixture
def mixed_chunk(db_settings: Settings) -> dict[str, int]:
    """Every kind of trouble in one chunk, next to rows that must go out."""
    with session_scope() as s:
        # Four pruning papers in the overlap of yesterday's and today's windows
        # (yesterday 07:00 UTC and today 07:00 UTC, 48 h each).
        for i in range(4):
            paper(s, f"2611.0010{i}", f"Pruning neural networks, part {i}", 28 + i, upvotes=50 - i)
        for i in range(3):
            paper(s, f"2611.0020{i}", f"Gaussian processes, part {i}", 3 + i)
        # Authors that are not names: rendering this paper raises.
        paper(s, "2611.00300", "Cursed topology of knots", 4, authors=[42, None])
        ada = sub(s, "ada@example.org", ["pruning"], max_papers=2)
        grace = sub(s, "grace@example.org", ["gaussian processes"], max_papers=1)
        bad = sub(s, "tést@example.com", ["pruning"])  # stored before addresses were checked
        cursed = sub(s, "kat@example.org", ["cursed topology"])
        mars = sub(s, "mars@example.org", ["gaussian processes"])
        ids = {
            "ada_yesterday": edition(s, ada, YESTERDAY),
            "ada_today": edition(s, ada, TODAY),
            "grace_resend": edition(s, grace, YESTERDAY),
            "grace_today": edition(s, grace, TODAY),
            "bad": edition(s, bad, TODAY),
            "cursed": edition(s, cursed, TODAY),
            "mars": edition(s, mars, TODAY),
        }
        # Grace's edition of yesterday is a retry: its paper is recorded, it goes out again.
        s.add(DeliveryPaper(delivery_id=ids["grace_resend"], paper_id="2611.00200", position=0))
    with session_scope() as s:  # a zone that no longer exists (bad data, not input)
        zone = text("UPDATE subscribers SET timezone = 'Mars/Olympus' WHERE id = :i")
        s.execute(zone, {"i": mars})
    return ids


def test_a_mixed_chunk_sends_the_good_rows_and_fails_each_bad_one_alone(
    mixed_chunk: dict[str, int], db_settings: Settings
) -> None:
    ids = mixed_chunk
    mailer = Mailer()
    out = run(sorted(ids.values()), mailer, db_settings)

    assert (out.sent, out.failed, out.unknown) == (4, 3, 0), out
    with session_scope() as s:
        rows = {d.id: d for d in s.scalars(select(Delivery))}
        state = {name: rows[i].state for name, i in ids.items()}
        assert state == {
            "ada_yesterday": "sent",
            "ada_today": "sent",
            "grace_resend": "sent",
            "grace_today": "sent",
            "bad": "failed",
            "cursed": "failed",
            "mars": "failed",
        }
        assert "only ASCII before the @" in rows[ids["bad"]].last_error
        assert "Amazon SES" in rows[ids["bad"]].last_error
        assert rows[ids["cursed"]].last_error.startswith("could not render the digest: ")
        assert "Mars/Olympus" in rows[ids["mars"]].last_error
        for name in ("bad", "cursed", "mars"):
            assert rows[ids[name]].finished_at is not None
            [attempt] = s.scalars(
                select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == ids[name])
            )
            assert attempt.outcome == "failed" and attempt.finished_at is not None
            assert attempt.error == rows[ids[name]].last_error

        # Two editions of one subscriber in one chunk: each its own window, no paper twice.
        first, second = papers_of(s, ids["ada_yesterday"]), papers_of(s, ids["ada_today"])
        assert len(first) == 2 and len(second) == 2 and not first & second
        assert first == {"2611.00100", "2611.00101"}  # the earlier edition chooses first
        # The retry keeps its recorded paper; today's edition does not repeat it.
        assert papers_of(s, ids["grace_resend"]) == {"2611.00200"}
        assert "2611.00200" not in papers_of(s, ids["grace_today"])
    assert sorted(m.recipient for m in mailer.sent) == [
        "ada@example.org",
        "ada@example.org",
        "grace@example.org",
        "grace@example.org",
    ]

    # Nothing is left pending, so a rerun (a redelivered task, the sweep) sends nothing.
    again = run(sorted(ids.values()), mailer, db_settings)
    assert (again.sent, again.failed, again.not_claimed) == (0, 0, 7)
    assert len(mailer.sent) == 4


def test_a_failing_batch_selection_falls_back_to_one_edition_at_a_time(
    mixed_chunk: dict[str, int], db_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = selection.select_for_subscribers

    def fragile(session, subscribers, *args, **kwargs):  # type: ignore[no-untyped-def]
        if any(s.email == "grace@example.org" for s in subscribers):
            raise ValueError("a scoring bug")
        return real(session, subscribers, *args, **kwargs)

    monkeypatch.setattr(selection, "select_for_subscribers", fragile)
    ids = mixed_chunk
    out = run(sorted(ids.values()), Mailer(), db_settings)
    with session_scope() as s:
        rows = {d.id: d for d in s.scalars(select(Delivery))}
    assert rows[ids["grace_today"]].state == "failed"
    assert rows[ids["grace_today"]].last_error == (
        "could not select papers: ValueError: a scoring bug"
    )
    # Grace's retry needs no selection; everyone else was selected one by one.
    for name in ("ada_yesterday", "ada_today", "grace_resend"):
        assert rows[ids[name]].state == "sent", name
    assert out.sent == 3 and out.failed == 4


def test_an_unexpected_mailer_exception_is_unknown_for_that_row_only(
    mixed_chunk: dict[str, int], db_settings: Settings
) -> None:
    ids = mixed_chunk
    out = run(sorted(ids.values()), Mailer(explode_for="grace@example.org"), db_settings)
    with session_scope() as s:
        rows = {d.id: d for d in s.scalars(select(Delivery))}
    # It may or may not have left: never re-sent by itself, and the chunk went on.
    assert {rows[ids["grace_resend"]].state, rows[ids["grace_today"]].state} == {"unknown"}
    assert "unexpected RuntimeError while sending: the SDK fell over" in (
        rows[ids["grace_today"]].last_error
    )
    assert rows[ids["ada_yesterday"]].state == rows[ids["ada_today"]].state == "sent"
    assert (out.sent, out.unknown) == (2, 2)


def test_edition_rounds_put_each_subscriber_once_per_round_earliest_first(
    db_settings: Settings,
) -> None:
    with session_scope() as s:
        a = s.get(Subscriber, sub(s, "a@example.org", []))
        b = s.get(Subscriber, sub(s, "b@example.org", []))
    eds = [
        selection.Edition(3, a, TODAY, NOW),
        selection.Edition(1, a, YESTERDAY, NOW),
        selection.Edition(2, b, TODAY, NOW),
        selection.Edition(4, a, TODAY + timedelta(days=1), NOW),
    ]
    rounds = selection.edition_rounds(eds)
    assert [[e.key for e in r] for r in rounds] == [[1, 2], [3], [4]]
