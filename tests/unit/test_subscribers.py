"""worker.subscribers on a real database: validation, add, CSV import, history, suppression."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker import db
from worker import subscribers as subs
from worker.errors import InvalidInput, NotFound
from worker.models import (
    Delivery,
    DeliveryAttempt,
    DeliveryPaper,
    Feedback,
    Paper,
    ProviderEvent,
    Subscriber,
    SubscriberLog,
    utcnow,
)

HEADER = "email,topics,max_papers,frequency,weekday,send_hour,timezone\n"


def count(session: Session, model: type[Any]) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def logs(session: Session, sub: Subscriber) -> list[SubscriberLog]:
    return list(
        session.scalars(
            select(SubscriberLog)
            .where(SubscriberLog.subscriber_id == sub.id)
            .order_by(SubscriberLog.id)
        )
    )


def snapshot(session: Session) -> list[dict[str, Any]]:
    """Every subscriber and log row, to prove a refused operation changed nothing."""
    session.expire_all()
    rows = [subs.subscriber_to_dict(s) for s in subs.list_subscribers(session)]
    log_rows = [
        (e.subscriber_id, e.action, e.detail) for e in session.scalars(select(SubscriberLog))
    ]
    return [*rows, {"log": log_rows}]


# --- validation -------------------------------------------------------------------------


def test_defaults_and_normalisation() -> None:
    data = subs.SubscriberInput("  Ada.Lovelace@EXAMPLE.Org ")
    assert data.email == "ada.lovelace@example.org"
    assert data.topics == ()
    assert (data.max_papers, data.frequency, data.weekday) == (5, "daily", None)
    assert (data.send_hour, data.timezone) == (7, "UTC")


def test_idn_domain_is_normalised_to_one_spelling() -> None:
    unicode_form = subs.SubscriberInput("Ada@MÜNCHEN.de").email
    assert unicode_form == "ada@münchen.de"
    assert subs.SubscriberInput("ada@xn--mnchen-3ya.de").email == unicode_form


def test_strings_as_typed_on_a_command_line() -> None:
    data = subs.SubscriberInput(
        "a@example.org",
        topics="LLM agents, diffusion; llm  AGENTS , ,  graph   neural nets",
        max_papers="12",
        frequency=" Weekly ",
        weekday="Fri",
        send_hour="0",
        timezone="Europe/Paris",
    )
    assert data.topics == ("LLM agents", "diffusion", "graph neural nets")
    assert (data.max_papers, data.frequency, data.weekday) == (12, "weekly", 4)
    assert (data.send_hour, data.timezone) == (0, "Europe/Paris")


def test_topics_from_a_list_are_not_split() -> None:
    data = subs.SubscriberInput(
        "a@example.org", topics=["vision, language", " ", "Vision, language"]
    )
    assert data.topics == ("vision, language",)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("monday", 0), ("MON", 0), ("tues", 1), ("wed", 2), ("thurs", 3), ("6", 6), (5, 5)],
)
def test_weekday_spellings(value: object, expected: int) -> None:
    data = subs.SubscriberInput("a@example.org", frequency="weekly", weekday=value)
    assert data.weekday == expected


def test_weekly_defaults_to_monday_and_daily_stores_no_weekday() -> None:
    assert subs.SubscriberInput("a@example.org", frequency="weekly").weekday == 0
    assert subs.SubscriberInput("a@example.org", frequency="daily", weekday="fri").weekday is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("email", "foo@", "invalid email 'foo@': There must be something after the @-sign."),
        ("email", "not an address", "invalid email 'not an address'"),
        ("email", "a@b", "invalid email 'a@b'"),
        ("email", "  ", "email is empty"),
        ("max_papers", 0, "max papers must be between 1 and 50, got 0"),
        ("max_papers", "51", "max papers must be between 1 and 50, got 51"),
        ("max_papers", "five", "max papers must be a whole number, got 'five'"),
        ("max_papers", True, "max papers must be a whole number, got True"),
        ("send_hour", 25, "hour must be 0-23, got 25"),
        ("send_hour", "-1", "hour must be 0-23, got -1"),
        ("send_hour", "7.5", "hour must be a whole number, got '7.5'"),
        ("timezone", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
        ("timezone", "../etc/passwd", "unknown time zone"),
        ("frequency", "monthly", "frequency must be daily or weekly, got 'monthly'"),
        ("weekday", "funday", "weekday must be a day name"),
        ("weekday", 7, "weekday must be a day name"),
        ("weekday", "t", "weekday must be a day name"),
        ("topics", "x" * 101, "a topic may have at most 100 characters, got 101"),
        ("topics", ", ".join(f"t{i}" for i in range(21)), "at most 20 topics are allowed, got 21"),
        ("topics", 42, "topics must be text or a list"),
    ],
)
def test_each_field_is_validated(field: str, value: object, message: str) -> None:
    values: dict[str, object] = {"email": "ok@example.org", field: value}
    with pytest.raises(subs.InvalidSubscriber) as info:
        subs.SubscriberInput(**values)
    assert message in str(info.value)
    assert len(info.value.problems) == 1
    assert isinstance(info.value, InvalidInput)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(subs.InvalidSubscriber) as info:
        subs.SubscriberInput("foo@", max_papers=0, send_hour=25, timezone="Mars/Olympus")
    assert len(info.value.problems) == 4
    assert "hour must be 0-23, got 25" in str(info.value)


def test_limits_are_inclusive() -> None:
    data = subs.SubscriberInput(
        "a@example.org",
        topics=[f"topic {i}" for i in range(20)],
        max_papers=50,
        send_hour=23,
    )
    assert (len(data.topics), data.max_papers, data.send_hour) == (20, 50, 23)
    assert subs.SubscriberInput("a@example.org", max_papers=1, topics="y" * 100).max_papers == 1


# --- add --------------------------------------------------------------------------------


def test_add_confirmed_is_active_and_logged(session: Session) -> None:
    data = subs.SubscriberInput("Ada@Example.org", topics="llm, diffusion", send_hour=8)
    sub, created = subs.add_subscriber(session, data, confirmed=True)
    assert created
    assert sub.status == "active"
    assert sub.confirmed_at is not None
    assert (sub.email, sub.topics, sub.send_hour, sub.source) == (
        "ada@example.org",
        ["llm", "diffusion"],
        8,
        "cli",
    )
    (entry,) = logs(session, sub)
    assert entry.action == "created"
    assert "status active" in (entry.detail or "")
    assert entry.actor == "cli"


def test_add_unconfirmed_is_pending(session: Session) -> None:
    sub, created = subs.add_subscriber(
        session, subs.SubscriberInput("b@example.org"), confirmed=False, actor="web"
    )
    assert created
    assert (sub.status, sub.confirmed_at, sub.source) == ("pending", None, "web")
    assert "status pending" in (logs(session, sub)[0].detail or "")


def test_adding_an_existing_address_is_refused_and_changes_nothing(session: Session) -> None:
    sub, _ = subs.add_subscriber(
        session, subs.SubscriberInput("ada@example.org", topics="llm"), confirmed=True
    )
    sub.status = "unsubscribed"
    session.flush()
    before = snapshot(session)
    again = subs.SubscriberInput("ADA@example.org", topics="robots", max_papers=9)
    with pytest.raises(subs.SubscriberExists) as info:
        subs.add_subscriber(session, again, confirmed=True)
    assert "already a subscriber (status unsubscribed)" in str(info.value)
    assert "papermail subscribers show ada@example.org" in str(info.value)
    assert snapshot(session) == before

    same, created = subs.add_subscriber(session, again, confirmed=True, exist_ok=True)
    assert (same.id, created, same.status, same.topics) == (sub.id, False, "unsubscribed", ["llm"])
    assert snapshot(session) == before


# --- look-ups, sendability --------------------------------------------------------------


def test_get_subscriber_normalises_and_explains_missing(session: Session) -> None:
    sub, _ = subs.add_subscriber(session, subs.SubscriberInput("ada@example.org"), True)
    assert subs.get_subscriber(session, "  ADA@Example.ORG ").id == sub.id
    with pytest.raises(NotFound) as info:
        subs.get_subscriber(session, "nobody@example.org")
    assert str(info.value) == (
        "no subscriber with address 'nobody@example.org'; see `papermail subscribers list`"
    )
    with pytest.raises(NotFound):
        subs.get_subscriber(session, "not an address")


def test_list_by_status(session: Session) -> None:
    for email, confirmed in [("a@x.org", True), ("b@x.org", False), ("c@x.org", True)]:
        subs.add_subscriber(session, subs.SubscriberInput(email), confirmed)
    subs.suppress(session, "c@x.org", "legal request", "test")
    bounced, _ = subs.add_subscriber(session, subs.SubscriberInput("d@x.org"), True)
    bounced.status = "bounced"
    session.flush()

    def emails(status: str | None) -> list[str]:
        return [s.email for s in subs.list_subscribers(session, status)]

    assert emails(None) == ["a@x.org", "b@x.org", "c@x.org", "d@x.org"]
    assert emails("active") == ["a@x.org", "c@x.org"]
    assert emails("pending") == ["b@x.org"]
    assert emails("suppressed") == ["c@x.org", "d@x.org"]
    with pytest.raises(InvalidInput, match="unknown status 'gone'"):
        subs.list_subscribers(session, "gone")


def test_is_sendable_rules() -> None:
    today = date(2026, 3, 10)
    sub = Subscriber(email="a@x.org", status="active")
    assert subs.is_sendable(sub, today)
    for status in ("pending", "paused", "unsubscribed", "bounced", "complained"):
        sub.status = status
        assert not subs.is_sendable(sub, today), status
    sub.status = "active"
    sub.paused_until = today
    assert not subs.is_sendable(sub, today)  # the last paused day
    sub.paused_until = today - timedelta(days=1)
    assert subs.is_sendable(sub, today)
    sub.suppressed_at = datetime(2026, 3, 1, tzinfo=UTC)
    assert not subs.is_sendable(sub, today)


# --- suppression ------------------------------------------------------------------------


def test_suppress_then_unsuppress_with_log(session: Session) -> None:
    sub, _ = subs.add_subscriber(session, subs.SubscriberInput("ada@example.org"), True)
    result = subs.suppress(session, "Ada@example.org", "  legal request #42 ", actor="ops")
    assert result.changed
    assert sub.suppressed_at is not None
    assert sub.suppression_reason == "legal request #42"
    assert sub.status == "active"  # independent of the status
    assert not subs.is_sendable(sub, utcnow().date())

    again = subs.suppress(session, "ada@example.org", "other reason", actor="ops")
    assert not again.changed
    assert "already suppressed" in again.message
    assert sub.suppression_reason == "legal request #42"

    lifted = subs.unsuppress(session, "ada@example.org", "resolved", actor="ops")
    assert lifted.changed
    assert (sub.suppressed_at, sub.suppression_reason, sub.status) == (None, None, "active")
    actions = [(e.action, e.actor) for e in logs(session, sub)]
    assert actions == [("created", "cli"), ("suppressed", "ops"), ("unsuppressed", "ops")]
    assert "legal request #42" in (logs(session, sub)[1].detail or "")
    assert "reason: resolved" in (logs(session, sub)[2].detail or "")

    noop = subs.unsuppress(session, "ada@example.org", "again", actor="ops")
    assert not noop.changed
    assert "not suppressed" in noop.message
    assert len(logs(session, sub)) == 3


@pytest.mark.parametrize("old_status", ["bounced", "complained", "unsubscribed"])
def test_unsuppress_lifts_a_suppressing_status(session: Session, old_status: str) -> None:
    sub, _ = subs.add_subscriber(session, subs.SubscriberInput("ada@example.org"), True)
    sub.status = old_status
    sub.soft_bounce_count = 3
    sub.unsubscribed_at = utcnow() if old_status == "unsubscribed" else None
    session.flush()
    result = subs.unsuppress(session, "ada@example.org", "mailbox fixed", actor="ops")
    assert result.changed
    assert f"status {old_status} -> active" in result.message
    assert (sub.status, sub.soft_bounce_count, sub.unsubscribed_at) == ("active", 0, None)
    detail = logs(session, sub)[-1].detail or ""
    assert f"status {old_status}" in detail
    assert "3 soft bounces" in detail
    assert subs.is_sendable(sub, utcnow().date())


def test_unsuppress_never_confirms_an_unconfirmed_subscriber(session: Session) -> None:
    sub, _ = subs.add_subscriber(session, subs.SubscriberInput("ada@example.org"), False)
    sub.status = "unsubscribed"
    session.flush()
    subs.unsuppress(session, "ada@example.org", "asked to come back", actor="ops")
    assert sub.status == "pending"


@pytest.mark.parametrize("operation", [subs.suppress, subs.unsuppress])
@pytest.mark.parametrize("reason", ["", "   "])
def test_a_reason_is_required(session: Session, operation: Any, reason: str) -> None:
    sub, _ = subs.add_subscriber(session, subs.SubscriberInput("ada@example.org"), True)
    sub.status = "bounced"
    session.flush()
    before = snapshot(session)
    with pytest.raises(InvalidInput, match="a reason is required"):
        operation(session, "ada@example.org", reason, "ops")
    assert snapshot(session) == before


def test_suppressing_an_unknown_address_is_not_found(session: Session) -> None:
    with pytest.raises(NotFound):
        subs.suppress(session, "nobody@example.org", "why", "ops")


# --- CSV import -------------------------------------------------------------------------


def by_email(session: Session) -> dict[str, Subscriber]:
    session.expire_all()
    return {s.email: s for s in subs.list_subscribers(session)}


def test_import_good_file(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text(
        HEADER
        + 'Ada@Example.org,"llm agents, diffusion",3,weekly,fri,8,Europe/Paris\n'
        + "\n"  # blank lines are skipped
        + "grace@example.org,,,,,,\n"
        + "emmy@example.org\n",  # trailing cells left out
        encoding="utf-8",
    )
    report = subs.import_csv(session, path, confirmed=False)
    assert report.imported and report.ok
    assert (report.rows, report.created, report.existing, report.merged) == (3, 3, [], [])
    rows = by_email(session)
    assert list(rows) == ["ada@example.org", "grace@example.org", "emmy@example.org"]
    ada = rows["ada@example.org"]
    assert (ada.topics, ada.max_papers, ada.frequency, ada.weekday) == (
        ["llm agents", "diffusion"],
        3,
        "weekly",
        4,
    )
    assert (ada.send_hour, ada.timezone, ada.status, ada.source) == (
        8,
        "Europe/Paris",
        "pending",
        "import",
    )
    assert ada.confirmed_at is None
    grace = rows["grace@example.org"]
    assert (grace.max_papers, grace.frequency, grace.weekday, grace.send_hour) == (
        5,
        "daily",
        None,
        7,
    )
    (entry,) = logs(session, ada)
    assert entry.action == "imported"
    assert "people.csv line 2" in (entry.detail or "")


def test_import_confirmed_makes_them_active(session: Session) -> None:
    report = subs.import_csv(session, "email\na@x.org\nb@x.org\n", confirmed=True)
    assert report.created == 2
    assert {s.status for s in by_email(session).values()} == {"active"}
    assert all(s.confirmed_at is not None for s in by_email(session).values())


BAD_FILE = (
    HEADER
    + "good@example.org,llm,,,,,\n"  # line 2
    + "foo@,,,,,,\n"  # line 3
    + "hour@example.org,,,,,25,\n"  # line 4
    + "zone@example.org,,0,,,,Mars/Olympus\n"  # line 5
    + ",llm,,,,,\n"  # line 6
    + "freq@example.org,,,monthly,,,\n"  # line 7
    + "cells@example.org,llm, diffusion,3,weekly,mon,7,UTC\n"  # line 8: unquoted comma
    + "also.good@example.org,,,,,,\n"  # line 9
)


def check_bad_rows(report: subs.ImportReport) -> None:
    reasons = {r.line: r.reason for r in report.rejected}
    assert sorted(reasons) == [3, 4, 5, 6, 7, 8]
    assert reasons[3] == "invalid email 'foo@': There must be something after the @-sign."
    assert reasons[4] == "hour must be 0-23, got 25"
    assert "max papers must be between 1 and 50, got 0" in reasons[5]
    assert "unknown time zone 'Mars/Olympus'" in reasons[5]
    assert reasons[6] == "email is empty"
    assert reasons[7] == "frequency must be daily or weekly, got 'monthly'"
    assert "8 cells but the header has 7 columns" in reasons[8]
    assert str(report.rejected[1]) == "line 4 (hour@example.org): hour must be 0-23, got 25"
    assert str(report.rejected[0]).startswith("line 3: invalid email 'foo@'")


def test_bad_rows_without_skip_invalid_import_nothing(session: Session) -> None:
    before = snapshot(session)
    with pytest.raises(subs.ImportRejected) as info:
        subs.import_csv(session, BAD_FILE, confirmed=True)
    report = info.value.report
    assert not report.imported
    assert report.created == 0
    assert report.rows == 8
    check_bad_rows(report)
    assert "6 of 8 rows rejected, so nothing was imported" in str(info.value)
    assert "--skip-invalid" in str(info.value)
    assert snapshot(session) == before


def test_bad_rows_with_skip_invalid_import_the_good_ones(session: Session) -> None:
    report = subs.import_csv(session, BAD_FILE, confirmed=True, skip_invalid=True)
    assert report.imported and not report.ok
    check_bad_rows(report)
    assert report.created == 2
    assert list(by_email(session)) == ["good@example.org", "also.good@example.org"]


def test_a_shifted_row_gets_a_hint_about_quoting(session: Session) -> None:
    text = "email,topics,max_papers\nada@example.org,llm, diffusion,\nb@x.org,,,\n"
    with pytest.raises(subs.ImportRejected) as info:
        subs.import_csv(session, text)
    (row,) = info.value.report.rejected
    assert row.line == 2
    assert row.reason.startswith("max papers must be a whole number, got 'diffusion'")
    assert "the row has 4 cells but the header has 3 columns" in row.reason
    assert "double quotes" in row.reason


def test_duplicates_in_the_file_are_merged(session: Session) -> None:
    text = (
        HEADER
        + 'ada@example.org,"llm, rl",3,weekly,fri,8,Europe/Paris\n'  # line 2
        + "bob@example.org,,,,,,\n"  # line 3
        + "ADA@Example.org,,10,,,,\n"  # line 4: only max_papers given
        + "ada@example.org,vision,,,,,\n"  # line 5: new topics replace the old
    )
    report = subs.import_csv(session, text, confirmed=True)
    assert report.merged == [{"email": "ada@example.org", "lines": [2, 4, 5]}]
    assert report.created == 2
    ada = by_email(session)["ada@example.org"]
    assert (ada.topics, ada.max_papers, ada.frequency, ada.weekday) == (["vision"], 10, "weekly", 4)
    assert (ada.send_hour, ada.timezone) == (8, "Europe/Paris")
    assert "lines 2, 4, 5" in (logs(session, ada)[0].detail or "")


def test_existing_subscribers_are_left_unchanged(session: Session) -> None:
    old, _ = subs.add_subscriber(
        session, subs.SubscriberInput("ada@example.org", topics="llm", max_papers=2), True
    )
    old.status = "unsubscribed"
    session.flush()
    before = subs.subscriber_to_dict(old)
    text = HEADER + "new@example.org,,,,,,\nAda@example.org,robots,9,,,,\n"
    report = subs.import_csv(session, text, confirmed=True)
    assert report.ok
    assert report.created == 1
    assert report.existing == [{"email": "ada@example.org", "line": 3, "status": "unsubscribed"}]
    session.expire_all()
    assert subs.subscriber_to_dict(subs.get_subscriber(session, "ada@example.org")) == before
    assert [e.action for e in logs(session, old)] == ["created"]


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_an_address_added_during_the_import_is_reported_existing(
    backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer adds an address while the file is being read: their row is kept,
    reported existing with its status, and gets no import log entry."""
    request.getfixturevalue("settings" if backend == "sqlite" else "pg_env")
    staged = subs._merge_duplicates

    def meanwhile(session: Session, stage: Any, report: subs.ImportReport) -> None:
        with db.session_scope() as other:
            data = subs.SubscriberInput("ada@example.org", max_papers=2)
            subs.add_subscriber(other, data, True)
        staged(session, stage, report)

    monkeypatch.setattr(subs, "_merge_duplicates", meanwhile)
    with db.session_scope() as session:
        report = subs.import_csv(session, "email,max_papers\nnew@x.org,3\nada@example.org,9\n")
    assert report.created == 1
    assert report.existing == [{"email": "ada@example.org", "line": 3, "status": "active"}]
    with db.session_scope() as session:
        ada = subs.get_subscriber(session, "ada@example.org")
        assert (ada.max_papers, ada.status) == (2, "active")
        assert [e.action for e in logs(session, ada)] == ["created"]
        assert subs.get_subscriber(session, "new@x.org").max_papers == 3


@pytest.mark.postgres
def test_an_address_committed_while_the_insert_runs_is_reported_existing(
    pg_env: dict[str, str], pg_url: str
) -> None:
    """Another writer has inserted one of the file's addresses, not yet committed, when
    the import's insert reaches it: the import waits; once the other commits, their row is
    kept, reported existing and gets no import log entry, and the rest is imported."""
    other = db.session_factory()()
    subs.add_subscriber(other, subs.SubscriberInput("ada@example.org", max_papers=2), True)
    other.flush()  # holds ada's entry in the unique index until it commits
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            with db.session_scope() as session:
                outcome["report"] = subs.import_csv(
                    session, "email,max_papers\nnew@x.org,3\nada@example.org,9\nlast@x.org,\n"
                )
        except Exception as exc:  # reported below, in the test's thread
            outcome["error"] = exc

    importer = threading.Thread(target=run)
    importer.start()
    admin = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as watcher:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the import waits for the other's lock
            waiting = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            ).fetchone()
            if waiting and waiting[0]:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the import never waited for the other writer")
    other.commit()
    other.close()
    importer.join(60)
    assert "error" not in outcome, outcome.get("error")
    report = outcome["report"]
    assert report.created == 2
    assert report.existing == [{"email": "ada@example.org", "line": 3, "status": "active"}]
    with db.session_scope() as session:
        ada = subs.get_subscriber(session, "ada@example.org")
        assert (ada.max_papers, ada.status) == (2, "active")
        assert [e.action for e in logs(session, ada)] == ["created"]
        assert [e.action for e in logs(session, subs.get_subscriber(session, "last@x.org"))] == [
            "imported"
        ]
        assert count(session, Subscriber) == 3


def test_import_of_many_rows_with_many_existing(session: Session) -> None:
    """More rows than one IN (...) chunk, so the chunked look-ups are exercised."""
    first = "email,max_papers\n" + "".join(f"u{i}@example.org,{i % 50 + 1}\n" for i in range(1500))
    assert subs.import_csv(session, first).created == 1500
    second = "email\n" + "".join(f"U{i}@example.org\n" for i in range(1000, 3500))
    report = subs.import_csv(session, second, confirmed=True)
    assert (report.created, len(report.existing)) == (2000, 500)
    assert report.existing[0] == {"email": "u1000@example.org", "line": 2, "status": "pending"}
    assert count(session, Subscriber) == 3500
    assert count(session, SubscriberLog) == 3500
    assert subs.get_subscriber(session, "u1499@example.org").max_papers == 1499 % 50 + 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("email,topics,colour,size\na@x.org,,red,2\n", "unknown columns 'colour', 'size'"),
        ("topics\nllm\n", "no 'email' column"),
        ("a@x.org,llm\nb@x.org,rl\n", "the first line must be a header row"),
        ("", "the file is empty"),
        ("\n\n", "the file is empty"),
        ("email,email\na@x.org,b@x.org\n", "column email appears more than once"),
        ("email;topics\na@x.org;llm\n", "expects comma-separated values"),
    ],
)
def test_bad_header_rejects_the_file(session: Session, text: str, message: str) -> None:
    for skip_invalid in (False, True):
        with pytest.raises(InvalidInput, match=message):
            subs.import_csv(session, text, confirmed=True, skip_invalid=skip_invalid)
    assert count(session, Subscriber) == 0


def test_header_spellings_bom_crlf_and_quoted_newlines(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    text = (
        "\ufeffEmail,Topics,Max Papers,send-hour\r\n"
        + 'a@x.org,"llm,\r\nrobots",4,6\r\n'  # lines 2-3
        + "b@x.org,,,99\r\n"  # line 4
    )
    path.write_bytes(text.encode("utf-8"))
    with pytest.raises(subs.ImportRejected) as info:
        subs.import_csv(session, path)
    assert [(r.line, r.reason) for r in info.value.report.rejected] == [
        (4, "hour must be 0-23, got 99")
    ]
    report = subs.import_csv(session, path, skip_invalid=True)
    a = by_email(session)["a@x.org"]
    assert report.created == 1
    assert (a.topics, a.max_papers, a.send_hour) == (["llm", "robots"], 4, 6)


def test_a_file_that_is_not_utf8_is_refused(session: Session, tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("email,topics\nzoë@example.org,réseaux\n".encode("latin-1"))
    with pytest.raises(InvalidInput, match="is not UTF-8 text"):
        subs.import_csv(session, path)
    with pytest.raises(InvalidInput, match="no such file"):
        subs.import_csv(session, tmp_path / "missing.csv")


def test_progress_is_reported(session: Session, tmp_path: Path) -> None:
    """Progress is the part of the file read (bytes of its size), in steps of 64 KiB."""
    calls: list[tuple[int, int]] = []
    text = "email\n" + "".join(f"p{i}@example.org\n" for i in range(9000))
    path = tmp_path / "people.csv"
    path.write_text(text)
    size = len(text)
    subs.import_csv(session, path, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (size, size)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert len(calls) == size // 65536 + 1
    assert all(total == size for _, total in calls)


@pytest.mark.postgres
def test_import_on_postgresql(pg_env: dict[str, str]) -> None:
    with db.session_scope() as session:
        subs.add_subscriber(session, subs.SubscriberInput("old@example.org"), confirmed=True)
    with db.session_scope() as session, pytest.raises(subs.ImportRejected):
        subs.import_csv(session, BAD_FILE, confirmed=True)
    with db.session_scope() as session:
        assert count(session, Subscriber) == 1
    text = (
        BAD_FILE
        + "OLD@example.org,,,,,,\n"
        + 'good@example.org,"llm, vision",4,weekly,sun,5,Asia/Tokyo\n'
        + "".join(f"bulk{i}@example.org,,,,,,\n" for i in range(2000))
    )
    with db.session_scope() as session:
        report = subs.import_csv(session, text, confirmed=True, skip_invalid=True)
    assert report.created == 2002
    assert report.existing == [{"email": "old@example.org", "line": 10, "status": "active"}]
    assert report.merged == [{"email": "good@example.org", "lines": [2, 11]}]
    check_bad_rows(report)
    with db.session_scope() as session:
        good = subs.get_subscriber(session, "good@example.org")
        assert (good.topics, good.weekday, good.timezone, good.status) == (
            ["llm", "vision"],
            6,
            "Asia/Tokyo",
            "active",
        )
        assert good.created_at.tzinfo is not None
        assert count(session, SubscriberLog) == 2003


# --- history ----------------------------------------------------------------------------


def make_history(session: Session) -> Subscriber:
    """A subscriber with two editions, papers, attempts, provider events and feedback."""
    sub, _ = subs.add_subscriber(session, subs.SubscriberInput("ada@example.org"), True)
    other, _ = subs.add_subscriber(session, subs.SubscriberInput("bob@example.org"), True)
    t0 = datetime(2026, 3, 9, 7, 0, tzinfo=UTC)
    session.add_all(
        [
            Paper(id="2603.00001", title="Sparse Mixtures", ingested_at=t0),
            Paper(id="2603.00002", title="Tiny Diffusion", ingested_at=t0),
        ]
    )
    first = Delivery(
        subscriber_id=sub.id,
        edition_date=date(2026, 3, 9),
        state="delivered",
        attempts=2,
        message_id="ses-111",
        sent_at=t0,
        delivered_at=t0 + timedelta(seconds=5),
    )
    second = Delivery(
        subscriber_id=sub.id, edition_date=date(2026, 3, 10), state="bounced", attempts=1
    )
    theirs = Delivery(subscriber_id=other.id, edition_date=date(2026, 3, 9), state="sent")
    session.add_all([second, first, theirs])
    session.flush()
    session.add_all(
        [
            DeliveryPaper(delivery_id=first.id, paper_id="2603.00002", position=2, score=0.5),
            DeliveryPaper(
                delivery_id=first.id,
                paper_id="2603.00001",
                position=1,
                matched_topic="mixtures",
                score=0.9,
            ),
            DeliveryAttempt(
                delivery_id=first.id, kind="send", started_at=t0, outcome="transient", error="429"
            ),
            DeliveryAttempt(
                delivery_id=first.id,
                kind="retry",
                started_at=t0 + timedelta(minutes=1),
                outcome="sent",
                message_id="ses-111",
            ),
            ProviderEvent(
                dedupe_key="evt-1",
                event_type="Delivery",
                provider_message_id="ses-111",
                delivery_id=first.id,
                recipients=["ada@example.org"],
                occurred_at=t0 + timedelta(seconds=5),
                raw={"notificationType": "Delivery"},
            ),
            ProviderEvent(
                dedupe_key="evt-2",
                event_type="Bounce",
                subtype="Permanent/General",
                delivery_id=second.id,
                recipients=["ada@example.org"],
                raw={},
            ),
            ProviderEvent(
                dedupe_key="evt-3",
                event_type="Complaint",
                delivery_id=theirs.id,
                recipients=["bob@example.org"],
                raw={},
            ),
            Feedback(subscriber_id=sub.id, paper_id="2603.00001", vote=1),
        ]
    )
    session.flush()
    return sub


def test_history_has_deliveries_papers_attempts_events_feedback_and_log(
    session: Session,
) -> None:
    make_history(session)
    subs.suppress(session, "ada@example.org", "testing", "ops")
    history = subs.subscriber_history(session, "ADA@example.org")
    history = json.loads(json.dumps(history))  # JSON-serialisable as is
    assert history["subscriber"]["email"] == "ada@example.org"
    assert history["subscriber"]["suppressed"] is True
    first, second = history["deliveries"]
    assert (first["edition_date"], first["state"], first["attempt_count"]) == (
        "2026-03-09",
        "delivered",
        2,
    )
    assert [p["paper_id"] for p in first["papers"]] == ["2603.00001", "2603.00002"]
    assert first["papers"][0]["title"] == "Sparse Mixtures"
    assert first["papers"][0]["matched_topic"] == "mixtures"
    assert [(a["kind"], a["outcome"]) for a in first["attempts"]] == [
        ("send", "transient"),
        ("retry", "sent"),
    ]
    assert [e["event_type"] for e in first["events"]] == ["Delivery"]
    assert first["events"][0]["occurred_at"].startswith("2026-03-09T07:00:05")
    assert (second["state"], [e["subtype"] for e in second["events"]]) == (
        "bounced",
        ["Permanent/General"],
    )
    assert second["papers"] == [] and second["attempts"] == []
    assert [(f["paper_id"], f["vote"], f["title"]) for f in history["feedback"]] == [
        ("2603.00001", 1, "Sparse Mixtures")
    ]
    assert [e["action"] for e in history["log"]] == ["created", "suppressed"]


def test_history_of_a_new_subscriber_is_empty(session: Session) -> None:
    subs.add_subscriber(session, subs.SubscriberInput("new@example.org"), False)
    history = subs.subscriber_history(session, "new@example.org")
    assert (history["deliveries"], history["feedback"]) == ([], [])
    assert history["subscriber"]["status"] == "pending"
    with pytest.raises(NotFound):
        subs.subscriber_history(session, "nobody@example.org")


def test_list_paused_includes_pause_until_a_date(session) -> None:
    from datetime import timedelta

    from worker.models import utcnow

    sub, _ = subs.add_subscriber(session, subs.SubscriberInput("rest@example.org"), confirmed=True)
    assert subs.list_subscribers(session, status="paused") == []
    sub.paused_until = utcnow().date() + timedelta(days=3)
    session.flush()
    assert [s.email for s in subs.list_subscribers(session, status="paused")] == [
        "rest@example.org"
    ]
