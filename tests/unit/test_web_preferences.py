"""The preference page over HTTP: what it shows, CSRF, validation, what it saves."""

from __future__ import annotations

import re
from datetime import date, timedelta

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.unit.web_support import add_papers, add_sub, csrf_from, make_client, snapshot, token
from worker.config import Settings
from worker.db import session_scope
from worker.models import Subscriber, SubscriberLog, utcnow

PAPERS = [
    ("2611.00001", "Diffusion Models for Protein Design"),
    ("2611.00002", "Scaling Diffusion Models with Sparse Attention"),
    ("2611.00003", "Graph Neural Networks for Weather Forecasting"),
    ("2611.00004", "Graph Neural Networks at Scale"),
    ("2611.00005", "A Survey of Reinforcement Learning from Human Feedback"),
]


@pytest.fixture
def client(settings: Settings) -> FlaskClient:
    return make_client(settings)


def _url(settings: Settings, sid: int) -> str:
    return "/preferences/" + token("preferences", settings, s=sid)


def _form(csrf: str | None, **changes: object) -> dict[str, object]:
    form: dict[str, object] = {
        "topic": ["diffusion models"],
        "new_topics": "",
        "max_papers": "5",
        "frequency": "daily",
        "weekday": "0",
        "send_hour": "7",
        "timezone": "UTC",
        "paused_until": "",
    }
    if csrf is not None:
        form["csrf_token"] = csrf
    form.update(changes)
    return form


def _sub(sid: int) -> Subscriber:
    with session_scope() as s:
        sub = s.get(Subscriber, sid)
        assert sub is not None
        s.expunge(sub)
        return sub


def test_page_shows_settings_suggestions_and_the_next_digest(
    client: FlaskClient, settings: Settings
) -> None:
    add_papers(PAPERS)
    sid = add_sub(topics=["diffusion models"], max_papers="3", timezone="Europe/Paris")
    before = snapshot(sid)
    response = client.get(_url(settings, sid))
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    # Current values.
    assert 'name="topic" value="diffusion models" checked' in html
    assert 'id="max_papers" name="max_papers"' in html and 'value="3"' in html
    assert 'value="Europe/Paris"' in html
    # Suggestions from recent titles: phrases in two titles, not the subscriber's own.
    assert 'value="graph neural network' in html
    assert html.count('value="diffusion models"') == 1
    # The next digest: the two diffusion papers, not the others.
    section = html.split('id="next-title"', 1)[1]
    assert "Diffusion Models for Protein Design" in section
    assert "Scaling Diffusion Models with Sparse Attention" in section
    assert "Weather Forecasting" not in section
    # Labels tie to inputs; the zone list and the browser-zone button are there.
    for field in ("new_topics", "max_papers", "weekday", "send_hour", "timezone", "paused_until"):
        assert f'for="{field}"' in html and f'id="{field}"' in html
    assert '<datalist id="zones">' in html and '<option value="Asia/Tokyo">' in html
    assert "data-browser-tz" in html
    # Only our own host: no external stylesheet, script or font.
    assert not re.search(r'<(link|script)[^>]+(href|src)="(https?:)?//', html)
    assert snapshot(sid) == before


def test_get_and_head_change_nothing(client: FlaskClient, settings: Settings) -> None:
    sid = add_sub(topics=["diffusion models"])
    before = snapshot(sid)
    assert client.get(_url(settings, sid)).status_code == 200
    assert client.head(_url(settings, sid)).status_code == 200
    assert client.get(_url(settings, sid) + "?saved=1").status_code == 200
    assert snapshot(sid) == before


def test_save_changes_everything_and_redirects(client: FlaskClient, settings: Settings) -> None:
    sid = add_sub(topics=["diffusion models", "robotics"])
    url = _url(settings, sid)
    csrf = csrf_from(client.get(url).get_data(as_text=True))
    pause = (utcnow().date() + timedelta(days=10)).isoformat()
    response = client.post(
        url,
        data=_form(
            csrf,
            topic=["diffusion models", "graph neural networks"],  # robotics unticked
            new_topics="protein folding, Diffusion Models",  # duplicate dropped
            max_papers="12",
            frequency="weekly",
            weekday="4",
            send_hour="18",
            timezone="America/New_York",
            paused_until=pause,
        ),
    )
    assert response.status_code == 303
    assert response.headers["Location"].endswith("?saved=1")
    sub = _sub(sid)
    assert sub.topics == ["diffusion models", "graph neural networks", "protein folding"]
    assert (sub.max_papers, sub.frequency, sub.weekday) == (12, "weekly", 4)
    assert (sub.send_hour, sub.timezone) == (18, "America/New_York")
    assert sub.paused_until == date.fromisoformat(pause)
    assert sub.status == "active"
    with session_scope() as s:
        log = s.scalars(
            select(SubscriberLog).where(
                SubscriberLog.subscriber_id == sid, SubscriberLog.action == "preferences"
            )
        ).one()
        assert log.actor == "web"
        assert "max_papers 5 -> 12" in (log.detail or "")
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "Saved." in page and "Paused" in page
    # Daily again: the weekday is dropped; an empty pause un-pauses.
    client.post(url, data=_form(csrf, frequency="daily", weekday="4"))
    sub = _sub(sid)
    assert (sub.frequency, sub.weekday, sub.paused_until) == ("daily", None, None)


@pytest.mark.parametrize("csrf", [None, "forged-token", ""])
def test_post_without_a_valid_csrf_token_is_refused(
    client: FlaskClient, settings: Settings, csrf: str | None
) -> None:
    sid = add_sub(topics=["diffusion models"])
    url = _url(settings, sid)
    client.get(url)  # the browser has a session with a real token
    before = snapshot(sid)
    response = client.post(url, data=_form(csrf, max_papers="9"))
    assert response.status_code == 400
    assert "nothing was saved" in response.get_data(as_text=True)
    assert snapshot(sid) == before


def test_csrf_token_from_another_session_is_refused(settings: Settings) -> None:
    sid = add_sub()
    url = _url(settings, sid)
    attacker, victim = make_client(settings), make_client(settings)
    stolen = csrf_from(attacker.get(url).get_data(as_text=True))
    victim.get(url)
    before = snapshot(sid)
    assert victim.post(url, data=_form(stolen, max_papers="9")).status_code == 400
    # No cookie at all (e.g. a cross-site form post): refused too.
    assert make_client(settings).post(url, data=_form(stolen)).status_code == 400
    assert snapshot(sid) == before


def test_invalid_fields_are_shown_next_to_the_field_and_nothing_is_saved(
    client: FlaskClient, settings: Settings
) -> None:
    sid = add_sub(topics=["diffusion models"])
    url = _url(settings, sid)
    csrf = csrf_from(client.get(url).get_data(as_text=True))
    before = snapshot(sid)
    yesterday = (utcnow().date() - timedelta(days=2)).isoformat()
    response = client.post(
        url,
        data=_form(
            csrf,
            max_papers="0",
            send_hour="25",
            timezone="Mars/Olympus_Mons",
            paused_until=yesterday,
            new_topics="x" * 150,
            frequency="weekly",
            weekday="funday",
        ),
    )
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    expected = {
        "max_papers": "between 1 and 50",
        "send_hour": "0-23",
        "timezone": "unknown time zone",
        "paused_until": "in the past",
        "topics": "at most 100 characters",
        "weekday": "weekday must be",
    }
    for field, words in expected.items():
        match = re.search(rf'<p class="error" id="{field}-error">([^<]*)</p>', html)
        assert match, f"no error shown for {field}"
        assert words in match.group(1).replace("&#39;", "'").lower()
    assert 'aria-invalid="true"' in html
    assert 'id="error-summary"' in html
    # What the person typed is still there.
    assert 'value="Mars/Olympus_Mons"' in html
    assert snapshot(sid) == before


def test_unsubscribed_subscriber_sees_a_notice_and_no_preview(
    client: FlaskClient, settings: Settings
) -> None:
    sid = add_sub()
    with session_scope() as s:
        sub = s.get(Subscriber, sid)
        assert sub is not None
        sub.status = "unsubscribed"
    html = client.get(_url(settings, sid)).get_data(as_text=True)
    assert "You're unsubscribed" in html and "re-subscribe" in html
    assert "No digest will be sent" in html
