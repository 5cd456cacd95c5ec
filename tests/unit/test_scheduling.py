"""The beat's planning: local send hours, weekly weekdays, catch-up, DST days, idempotence."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker import scheduling
from worker.db import session_scope
from worker.models import Delivery, Subscriber


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def add(
    session: Session,
    email: str,
    timezone: str,
    send_hour: int,
    *,
    frequency: str = "daily",
    weekday: int | None = None,
    status: str = "active",
    paused_until: date | None = None,
) -> int:
    sub = Subscriber(
        email=email,
        status=status,
        topics=["llm"],
        timezone=timezone,
        send_hour=send_hour,
        frequency=frequency,
        weekday=weekday,
        paused_until=paused_until,
    )
    session.add(sub)
    session.flush()
    return sub.id


def beat(now: datetime) -> list[int]:
    """One beat: plan in its own transaction, like the task does."""
    with session_scope() as s:
        return scheduling.plan_due(s, now)


def deliveries(session: Session) -> list[Delivery]:
    session.expire_all()
    return list(session.scalars(select(Delivery).order_by(Delivery.subscriber_id)))


def run_beats(start: datetime, end: datetime, step: timedelta) -> None:
    now = start
    while now <= end:
        beat(now)
        now += step


def expected_instant(timezone: str, local_date: date, hour: int) -> datetime:
    """Independently of scheduling.py: the first instant whose local wall time is at or
    after ``hour``:00 on ``local_date`` (scanned on a 15-minute grid, like every zone)."""
    zone = ZoneInfo(timezone)
    wall = datetime.combine(local_date, time(hour))
    t = datetime.combine(local_date, time(0), tzinfo=UTC) - timedelta(hours=15)
    while t.astimezone(zone).replace(tzinfo=None) < wall:
        t += timedelta(minutes=15)
    return t


# ---------------------------------------------------------------------------------------


def test_local_send_hour_in_each_zone(session: Session) -> None:
    ids = {
        tz: add(session, f"{tz.replace('/', '-').lower()}@example.org", tz, 7)
        for tz in ("UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo", "Asia/Kolkata")
    }
    session.commit()

    # 06:30 UTC on 10 March: 07:30 in Paris (CET), 01:30 in New York, 15:30 in Tokyo,
    # 12:00 in Kolkata; UTC's 07:00 has not come yet.
    due = scheduling.due_now(session, utc(2026, 3, 10, 6, 30))
    assert due == {
        date(2026, 3, 10): sorted([ids["Europe/Paris"], ids["Asia/Tokyo"], ids["Asia/Kolkata"]])
    }
    # Ten minutes before Paris' 07:00 (06:00 UTC) Paris is not due yet.
    early = scheduling.due_now(session, utc(2026, 3, 10, 5, 50))
    assert ids["Europe/Paris"] not in early.get(date(2026, 3, 10), [])
    # 23:30 UTC on 10 March: Tokyo (08:30) is due for its 11 March edition; Paris (00:30)
    # and Kolkata (05:00) are on 11 March too but before 07:00; UTC (23:30) and New York
    # (19:30, already on summer time) are due for 10 March.
    late = scheduling.due_now(session, utc(2026, 3, 10, 23, 30))
    assert late == {
        date(2026, 3, 10): sorted([ids["UTC"], ids["America/New_York"]]),
        date(2026, 3, 11): [ids["Asia/Tokyo"]],
    }


def test_hourly_beats_plan_each_subscriber_at_its_local_hour(session: Session) -> None:
    zones = ["Europe/Paris", "America/New_York", "Asia/Kolkata", "Pacific/Auckland", "UTC"]
    subs = {}
    for tz in zones:
        for hour in (0, 6, 13, 23):
            subs[add(session, f"h{hour}.{tz.replace('/', '.')}@example.org", tz, hour)] = (
                tz,
                hour,
            )
    session.commit()
    start, end = utc(2026, 6, 1, 0), utc(2026, 6, 4, 0)
    run_beats(start, end, timedelta(hours=1))

    rows = deliveries(session)
    by_sub: dict[int, list[Delivery]] = {}
    for row in rows:
        by_sub.setdefault(row.subscriber_id, []).append(row)
    for sub_id, (tz, hour) in subs.items():
        editions = [r.edition_date for r in by_sub[sub_id]]
        assert len(editions) == len(set(editions)), (tz, hour, editions)
        for row in by_sub[sub_id]:
            instant = expected_instant(tz, row.edition_date, hour)
            planned = row.created_at
            # Planned by the first beat at or after the local send instant, or at the
            # first beat of the run when the instant had already passed that local day.
            assert planned >= instant or planned == start, (tz, hour, row.edition_date)
            assert planned - instant < timedelta(hours=1) or planned == start
            assert planned.astimezone(ZoneInfo(tz)).date() == row.edition_date
        # Every local date fully inside the simulated span got its edition.
        for offset in range(1, 3):
            day = date(2026, 6, 1) + timedelta(days=offset)
            if start <= expected_instant(tz, day, hour) <= end:
                assert day in editions, (tz, hour, day)


def test_weekly_on_the_local_weekday(session: Session) -> None:
    # Auckland is UTC+12 in June: Wednesday 08:00 there is Tuesday 20:00 UTC.
    weekly = add(
        session, "weekly@example.org", "Pacific/Auckland", 8, frequency="weekly", weekday=2
    )
    daily = add(session, "daily@example.org", "Pacific/Auckland", 8)
    session.commit()

    tuesday_utc = utc(2026, 6, 9, 20, 0)
    assert tuesday_utc.weekday() == 1
    due = scheduling.due_now(session, tuesday_utc)
    assert due == {date(2026, 6, 10): sorted([weekly, daily])}

    run_beats(utc(2026, 6, 7, 0), utc(2026, 6, 21, 0), timedelta(hours=1))
    rows = [r for r in deliveries(session) if r.subscriber_id == weekly]
    assert [r.edition_date for r in rows] == [date(2026, 6, 10), date(2026, 6, 17)]
    assert all(r.edition_date.weekday() == 2 for r in rows)
    daily_rows = [r for r in deliveries(session) if r.subscriber_id == daily]
    assert len(daily_rows) == len({r.edition_date for r in daily_rows}) >= 13


def test_catch_up_same_local_day_only(session: Session) -> None:
    paris = add(session, "paris@example.org", "Europe/Paris", 7)
    tokyo = add(session, "tokyo@example.org", "Asia/Tokyo", 8)
    session.commit()

    # The beat is down from 21:00 UTC on 9 March until 16:00 UTC on 10 March. Paris' 07:00
    # (06:00 UTC) passed earlier the same local day: caught up. Tokyo's 10 March 08:00
    # (23:00 UTC on 9 March) is on a local day that is over (01:00 on 11 March): not sent.
    planned_ids = beat(utc(2026, 3, 10, 16, 0))
    rows = deliveries(session)
    assert [(r.subscriber_id, r.edition_date) for r in rows] == [(paris, date(2026, 3, 10))]
    assert planned_ids == [rows[0].id]
    assert rows[0].state == "pending"

    # Tokyo's 11 March edition comes at its 08:00 as usual.
    beat(utc(2026, 3, 10, 22, 59))
    assert not [r for r in deliveries(session) if r.subscriber_id == tokyo]
    beat(utc(2026, 3, 10, 23, 0))
    assert [(r.edition_date) for r in deliveries(session) if r.subscriber_id == tokyo] == [
        date(2026, 3, 11)
    ]


@pytest.mark.parametrize(
    ("timezone", "change_day"),
    [
        ("Europe/Paris", date(2026, 3, 29)),  # 02:00 -> 03:00
        ("Europe/Paris", date(2026, 10, 25)),  # 03:00 -> 02:00
        ("America/New_York", date(2026, 3, 8)),  # 02:00 -> 03:00
        ("America/New_York", date(2026, 11, 1)),  # 02:00 -> 01:00
    ],
)
@pytest.mark.parametrize("step_minutes", [60, 20])
def test_dst_change_day_gives_exactly_one_edition(
    session: Session, timezone: str, change_day: date, step_minutes: int
) -> None:
    subs = {add(session, f"h{h}@example.org", timezone, h): h for h in range(24)}
    session.commit()
    zone = ZoneInfo(timezone)
    # Simulate the beat across the whole local day of the change and its neighbours.
    start = datetime.combine(change_day - timedelta(days=1), time(12), tzinfo=zone)
    end = datetime.combine(change_day + timedelta(days=1), time(12), tzinfo=zone)
    run_beats(start.astimezone(UTC), end.astimezone(UTC), timedelta(minutes=step_minutes))

    rows = [r for r in deliveries(session) if r.edition_date == change_day]
    counts = {sid: 0 for sid in subs}
    for row in rows:
        counts[row.subscriber_id] += 1
    assert set(counts.values()) == {1}, counts
    for row in rows:
        hour = subs[row.subscriber_id]
        instant = expected_instant(timezone, change_day, hour)
        assert instant <= row.created_at < instant + timedelta(minutes=step_minutes), hour
    # The gap hour (spring) is sent at the first instant after the gap; the repeated hour
    # (autumn) at its first occurrence.
    offsets = {r.created_at.astimezone(zone).utcoffset() for r in rows}
    assert len(offsets) == 2


def test_planning_twice_creates_nothing(session: Session) -> None:
    for n in range(5):
        add(session, f"s{n}@example.org", "Europe/Paris", 7)
    session.commit()
    now = utc(2026, 3, 10, 6, 0)
    first = beat(now)
    assert len(first) == 5
    second = beat(now)
    assert second == []
    third = beat(now + timedelta(minutes=30))
    assert third == []
    assert session.scalar(select(func.count()).select_from(Delivery)) == 5


def test_only_sendable_subscribers_are_planned(session: Session) -> None:
    ok = add(session, "ok@example.org", "UTC", 5)
    add(session, "pending@example.org", "UTC", 5, status="pending")
    add(session, "unsub@example.org", "UTC", 5, status="unsubscribed")
    add(session, "paused@example.org", "UTC", 5, status="paused")
    add(session, "holiday@example.org", "UTC", 5, paused_until=date(2026, 3, 12))
    back = add(session, "back@example.org", "UTC", 5, paused_until=date(2026, 3, 9))
    suppressed = add(session, "suppressed@example.org", "UTC", 5)
    session.get(Subscriber, suppressed).suppressed_at = utc(2026, 1, 1)  # type: ignore[union-attr]
    session.commit()
    assert scheduling.due_now(session, utc(2026, 3, 10, 6)) == {date(2026, 3, 10): [ok, back]}


def test_bad_input_is_refused_and_changes_nothing(
    session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    good = add(session, "good@example.org", "UTC", 0)
    add(session, "broken@example.org", "Mars/Olympus_Mons", 0)
    session.commit()
    with pytest.raises(ValueError, match="timezone-aware"):
        scheduling.due_now(session, datetime(2026, 3, 10, 6))
    with pytest.raises(ValueError, match="timezone-aware"), session_scope() as s:
        scheduling.plan_due(s, datetime(2026, 3, 10, 6))
    assert deliveries(session) == []
    # A row with an unknown zone is reported and left out; everyone else is planned.
    with caplog.at_level(logging.ERROR, logger="worker.scheduling"):
        beat(utc(2026, 3, 10, 6))
    assert [r.subscriber_id for r in deliveries(session)] == [good]
    assert "Mars/Olympus_Mons" in caplog.text


@pytest.mark.postgres
def test_dst_and_idempotence_on_postgresql(pg_env: dict[str, str]) -> None:
    with session_scope() as s:
        subs = [add(s, f"h{h}@example.org", "America/New_York", h) for h in range(24)]
    zone = ZoneInfo("America/New_York")
    start = datetime.combine(date(2026, 11, 1), time(0), tzinfo=zone).astimezone(UTC)
    run_beats(start, start + timedelta(hours=26), timedelta(minutes=30))
    run_beats(start, start + timedelta(hours=26), timedelta(minutes=30))  # a second beat
    with session_scope() as s:
        rows = s.execute(
            select(Delivery.subscriber_id, func.count())
            .where(Delivery.edition_date == date(2026, 11, 1))
            .group_by(Delivery.subscriber_id)
        ).all()
    assert sorted(rows) == [(sid, 1) for sid in subs]
