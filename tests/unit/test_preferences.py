"""worker.preferences and worker.throttle without HTTP: the functions the CLI could call."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from worker import preferences
from worker.errors import InvalidInput, NotFound
from worker.models import Paper, Subscriber, utcnow
from worker.subscribers import SubscriberInput, add_subscriber
from worker.throttle import MemoryWindow, RedisWindow, make_throttle

TODAY = date(2026, 11, 27)  # a Friday


def _form(**changes: object) -> dict[str, object]:
    form: dict[str, object] = {
        "topics": ["robotics"],
        "max_papers": "5",
        "frequency": "daily",
        "weekday": "",
        "send_hour": "7",
        "timezone": "UTC",
        "paused_until": "",
    }
    form.update(changes)
    return form


def test_parse_preferences_accepts_typed_text() -> None:
    prefs = preferences.parse_preferences(
        _form(frequency="Weekly", weekday="wed", send_hour=" 9 ", paused_until="2026-12-01"),
        TODAY,
    )
    assert (prefs.frequency, prefs.weekday, prefs.send_hour) == ("weekly", 2, 9)
    assert prefs.paused_until == date(2026, 12, 1)
    daily = preferences.parse_preferences(_form(weekday="3"), TODAY)
    assert daily.weekday is None  # only weekly digests keep a weekday


def test_parse_preferences_reports_every_field() -> None:
    with pytest.raises(preferences.InvalidPreferences) as info:
        preferences.parse_preferences(
            _form(
                max_papers="many",
                frequency="hourly",
                send_hour="",
                timezone="Nowhere/City",
                paused_until="2027-13-01",
            ),
            TODAY,
        )
    errors = info.value.errors
    assert set(errors) == {"max_papers", "frequency", "send_hour", "timezone", "paused_until"}
    assert "whole number" in errors["max_papers"]
    assert "daily or weekly" in errors["frequency"]
    assert "required" in errors["send_hour"]
    assert "Nowhere/City" in errors["timezone"]
    assert "a date like" in errors["paused_until"]
    with pytest.raises(preferences.InvalidPreferences) as info:
        preferences.parse_preferences(_form(frequency="weekly", weekday=""), TODAY)
    assert set(info.value.errors) == {"weekday"}


@pytest.mark.parametrize(
    "value, ok",
    [
        ("", True),
        ("2026-11-27", True),
        ("2026-11-26", False),
        ("2027-11-28", True),
        ("2027-11-29", False),
    ],
)
def test_pause_bounds(value: str, ok: bool) -> None:
    if ok:
        preferences.parse_pause(value, TODAY)
    else:
        with pytest.raises(ValueError):
            preferences.parse_pause(value, TODAY)


def _sub(session: Session, email: str = "ada@example.org", **prefs: object) -> Subscriber:
    sub, _ = add_subscriber(session, SubscriberInput(email, **prefs), confirmed=True)
    return sub


def test_update_preferences_logs_changes_and_rolls_back_nothing_on_error(
    session: Session,
) -> None:
    sub = _sub(session, topics=["robotics"])
    assert preferences.update_preferences(session, sub.id, _form()) == []  # no change
    with pytest.raises(preferences.InvalidPreferences):
        preferences.update_preferences(session, sub.id, _form(max_papers="99", send_hour="8"))
    assert (sub.max_papers, sub.send_hour) == (5, 7)
    changes = preferences.update_preferences(session, sub.id, _form(max_papers="9"))
    assert changes == ["max_papers 5 -> 9"]
    with pytest.raises(NotFound):
        preferences.update_preferences(session, 12345, _form())


def test_next_edition_date(session: Session) -> None:
    sub = _sub(session, timezone="Asia/Tokyo", send_hour="7")
    # 2026-11-27 20:00 UTC is 05:00 on the 28th in Tokyo: today's 07:00 is still ahead.
    now = datetime(2026, 11, 27, 20, 0, tzinfo=UTC)
    assert preferences.next_edition_date(sub, now) == date(2026, 11, 28)
    # After 07:00 Tokyo time, the next one is tomorrow.
    assert preferences.next_edition_date(sub, now + timedelta(hours=3)) == date(2026, 11, 29)
    sub.frequency, sub.weekday = "weekly", 0  # Mondays
    assert preferences.next_edition_date(sub, now) == date(2026, 11, 30)
    sub.paused_until = date(2026, 12, 7)  # that Monday included
    assert preferences.next_edition_date(sub, now) == date(2026, 12, 14)


def test_unsubscribe_is_idempotent_and_resubscribe_undoes_it(session: Session) -> None:
    sub = _sub(session)
    assert preferences.unsubscribe(session, sub.id) is True
    assert preferences.unsubscribe(session, sub.id) is False
    assert sub.status == "unsubscribed" and sub.unsubscribed_at is not None
    assert preferences.resubscribe(session, sub.id) is True
    assert preferences.resubscribe(session, sub.id) is False
    assert sub.status == "active" and sub.unsubscribed_at is None
    sub.status = "complained"
    with pytest.raises(preferences.NotAllowed):
        preferences.resubscribe(session, sub.id)
    assert sub.status == "complained"


def test_record_feedback_validates(session: Session) -> None:
    sub = _sub(session)
    session.add(Paper(id="p1", title="A paper", ingested_at=utcnow()))
    session.flush()
    assert preferences.record_feedback(session, sub.id, "p1", 1) is None
    assert preferences.record_feedback(session, sub.id, "p1", -1) == 1
    for bad in (0, 2, True):
        with pytest.raises(InvalidInput):
            preferences.record_feedback(session, sub.id, "p1", bad)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        preferences.record_feedback(session, sub.id, "nope", 1)


def test_confirm_transitions(session: Session) -> None:
    sub, _ = add_subscriber(session, SubscriberInput("p@example.org"), confirmed=False)
    assert preferences.confirm(session, sub.id) == "confirmed"
    assert sub.status == "active" and sub.confirmed_at is not None
    assert preferences.confirm(session, sub.id) == "already"
    sub.status = "unsubscribed"
    assert preferences.confirm(session, sub.id) == "reconfirmed"
    sub.status = "bounced"
    with pytest.raises(preferences.NotAllowed):
        preferences.confirm(session, sub.id)


def test_suggest_topics_prefers_frequent_longer_phrases() -> None:
    titles = [
        "Large Language Models Are Few-Shot Planners",
        "Aligning Large Language Models with Human Feedback",
        "Large Language Model Agents for Chemistry",
        "Diffusion Models: A Survey",
        "Video Diffusion Models at Scale",
        "Sparse Attention in LLMs",
        "Sparse Attention for Long Video",
        "One-off Title About Nothing Else",
    ]
    found = preferences.suggest_topics(titles, exclude=["Sparse attention"])
    assert found[0] == "large language models"  # 3 titles, plural and singular agree
    assert "diffusion models" in found
    assert "large language" not in found and "language models" not in found
    assert not any(f.casefold() == "sparse attention" for f in found)
    assert not any("nothing" in f for f in found)  # a phrase in one title only
    assert preferences.suggest_topics(titles, limit=1) == ["large language models"]


def test_topic_suggestions_only_use_recent_papers(session: Session) -> None:
    now = utcnow()
    for i, (title, days) in enumerate(
        [
            ("Protein Folding Revisited", 1),
            ("Protein Folding at Scale", 2),
            ("Old Topic Modelling", 40),
            ("Old Topic Modelling Again", 41),
        ]
    ):
        session.add(
            Paper(id=f"x{i}", title=title, published_at=now - timedelta(days=days), ingested_at=now)
        )
    session.flush()
    assert preferences.topic_suggestions(session, days=14, now=now) == ["protein folding"]


def test_memory_window_slides() -> None:
    clock = [0.0]
    window = MemoryWindow(2, window=100, clock=lambda: clock[0])
    assert window.hit("k") == 0 and window.hit("k") == 0
    assert window.hit("other") == 0
    wait = window.hit("k")
    assert 99 < wait <= 100
    clock[0] = 50
    assert window.hit("k") == pytest.approx(50)  # refusals are not counted
    clock[0] = 100.5
    assert window.hit("k") == 0


@pytest.mark.redis
def test_redis_window_is_shared_between_instances(redis_url: str) -> None:
    one = RedisWindow(redis_url, 2, window=60, name="test")
    two = RedisWindow(redis_url, 2, window=60, name="test")
    assert one.hit("k") == 0 and two.hit("k") == 0
    assert 0 < one.hit("k") <= 60 and 0 < two.hit("k") <= 60
    assert one.hit("another") == 0


def test_make_throttle_picks_by_broker(settings: object, redis_url: str) -> None:
    from worker.config import Settings

    assert isinstance(settings, Settings)
    assert isinstance(make_throttle(settings, 3), MemoryWindow)
    shared = settings.model_copy(update={"broker_url": redis_url})
    assert isinstance(make_throttle(shared, 3), RedisWindow)
