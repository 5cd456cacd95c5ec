"""What the pages say is true: the favicon, canonical time zones, the next digest computed
from what was sent, and "view in browser" showing the edition as it was sent."""

from __future__ import annotations

from datetime import timedelta

from tests.unit.web_support import (
    add_papers,
    add_sub,
    html_links,
    make_client,
    outbox_messages,
    path_of,
    token,
)
from worker import delivery, preferences
from worker.config import Settings
from worker.db import session_scope
from worker.models import Delivery, Subscriber, utcnow
from worker.subscribers import SubscriberInput
from worker.zones import canonical_zone, canonical_zones


def test_favicon_is_served_and_linked(settings: Settings) -> None:
    client = make_client(settings)
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200
    assert icon.data[:4] == b"\x00\x00\x01\x00"  # an ICO header
    assert "max-age" in icon.headers["Cache-Control"]
    svg = client.get("/assets/favicon.svg")
    assert svg.status_code == 200 and svg.mimetype == "image/svg+xml"
    page = client.get("/subscribe").get_data(as_text=True)
    assert 'rel="icon" href="/favicon.ico"' in page
    assert 'href="/assets/favicon.svg" type="image/svg+xml"' in page


def test_only_canonical_zones_are_offered_and_aliases_are_mapped() -> None:
    zones = canonical_zones()
    assert "Africa/Asmera" not in zones and "Asia/Calcutta" not in zones
    assert "US/Eastern" not in zones and "Etc/UTC" not in zones
    assert {"UTC", "Europe/Paris", "Africa/Asmara", "Asia/Kolkata"} <= set(zones)
    assert canonical_zone("Africa/Asmera") == "Africa/Nairobi"
    assert canonical_zone("Asia/Calcutta") == "Asia/Kolkata"
    assert canonical_zone("US/Eastern") == "America/New_York"
    assert canonical_zone("Etc/UTC") == canonical_zone("Zulu") == "UTC"
    assert canonical_zone("Europe/Paris") == "Europe/Paris"
    # A real zone that zone.tab does not list is not an alias: kept.
    assert canonical_zone("Etc/GMT+5") == "Etc/GMT+5"
    # Input is stored under the canonical name.
    assert SubscriberInput("a@example.org", timezone="Asia/Calcutta").timezone == "Asia/Kolkata"


def test_preferences_page_offers_canonical_zones_and_shows_an_alias_canonically(
    settings: Settings,
) -> None:
    sid = add_sub()
    with session_scope() as s:  # stored before names were canonicalised
        sub = s.get(Subscriber, sid)
        assert sub is not None
        sub.timezone = "Asia/Calcutta"
    client = make_client(settings)
    html = client.get("/preferences/" + token("preferences", settings, s=sid)).get_data(
        as_text=True
    )
    assert '<option value="Africa/Asmara">' in html
    assert '<option value="Africa/Asmera">' not in html
    assert 'value="Asia/Kolkata"' in html  # the field shows the canonical name
    assert "Asia/Calcutta&#34;:&#34;Asia/Kolkata" in html  # the button's alias table


def test_next_digest_is_the_next_due_day_once_today_was_sent(settings: Settings) -> None:
    add_papers([("2611.70001", "Robotic Grasping with Tactile Sensing")])
    sid = add_sub(topics=["robotic grasping"], send_hour="23")
    now = utcnow()
    today = now.date()
    with session_scope() as s:
        sub = s.get(Subscriber, sid)
        assert sub is not None
        # The operator's early run: today's edition goes out before its send hour.
        ahead = preferences.next_edition_date(sub, now.replace(hour=1), session=s)
    assert ahead == today
    delivery.run_in_process(today, settings=settings)
    with session_scope() as s:
        sub = s.get(Subscriber, sid)
        assert sub is not None
        assert preferences.next_edition_date(sub, now.replace(hour=1), session=s) == today + (
            timedelta(days=1)
        )
        # A planned edition not sent yet is still the next one.
        d = s.query(Delivery).filter_by(subscriber_id=sid).one()
        d.state = "pending"
        s.flush()
        assert preferences.next_edition_date(sub, now.replace(hour=1), session=s) == today
        d.state = "sent"
    client = make_client(settings)
    html = client.get("/preferences/" + token("preferences", settings, s=sid)).get_data(
        as_text=True
    )
    box = html.split('id="next-title"', 1)[1]
    tomorrow = today + timedelta(days=1)
    assert f"{tomorrow:%A} {tomorrow.day} {tomorrow:%B %Y}" in box


def test_view_in_browser_shows_the_settings_and_state_of_then(settings: Settings) -> None:
    add_papers([("2611.80001", "Robotic Grasping with Tactile Sensing")])
    sid = add_sub(topics=["robotic grasping"], send_hour="7", timezone="Europe/Paris")
    today = utcnow().date()
    delivery.run_in_process(today, settings=settings)
    [mail] = outbox_messages(settings)
    view = next(u for u in html_links(mail) if "/view/" in u)
    with session_scope() as s:
        row = s.query(Delivery).filter_by(subscriber_id=sid).one()
        assert row.recipient is not None and row.recipient["topics"] == ["robotic grasping"]
        # Since then: other topics, another hour and zone, and unsubscribed.
        sub = s.get(Subscriber, sid)
        assert sub is not None
        sub.topics, sub.send_hour, sub.timezone = ["quantum chemistry"], 18, "Asia/Tokyo"
        preferences.unsubscribe(s, sid)
    client = make_client(settings)
    html = client.get(path_of(view, settings)).get_data(as_text=True)
    assert "Robotic Grasping with Tactile Sensing" in html
    assert "You got this because you were subscribed" in html
    assert "You get this because" not in html
    assert "robotic grasping" in html and "07:00 Europe/Paris" in html
    assert "quantum chemistry" not in html and "Asia/Tokyo" not in html
    # An edition recorded before the snapshot existed shows the subscriber as they are.
    with session_scope() as s:
        s.query(Delivery).filter_by(subscriber_id=sid).one().recipient = None
    old = client.get(path_of(view, settings)).get_data(as_text=True)
    assert "quantum chemistry" in old and "Robotic Grasping with Tactile Sensing" in old


def test_pages_and_emails_show_the_same_wordmark(settings: Settings) -> None:
    """One file, templates/shared/_wordmark.html, in the pages' header and the emails'."""
    import re

    from tests.unit.web_support import csrf_from
    from worker.resources import shared_templates_dir

    source = (shared_templates_dir() / "_wordmark.html").read_text(encoding="utf-8")
    mark = re.sub(r"\{#.*?#\}", "", source, flags=re.S).strip()
    assert 'class="pm-wordmark"' in mark
    client = make_client(settings)
    page = client.get("/subscribe").get_data(as_text=True)
    assert f'<header class="site"><div class="brand">{mark}</div></header>' in page
    css = client.get("/assets/papermail.css").get_data(as_text=True)
    assert ".pm-wordmark {" in css and ".pm-wordmark-mail {" in css
    csrf = csrf_from(page)
    client.post("/subscribe", data={"email": "new@example.org", "csrf_token": csrf})
    [msg] = outbox_messages(settings, to="new@example.org")
    html = msg.get_body(("html",)).get_content()
    # The email's copy has its styles inlined by MJML; the same mark, the same words.
    tags = re.sub(r' style="[^"]*"', "", html)
    assert mark in tags


def test_what_matched_is_named_in_the_email_and_in_view_in_browser(settings: Settings) -> None:
    # "RL" is a concept: the paper matches by the concept's phrase, not the topic's words.
    add_papers([("2611.80002", "Policy Gradient Methods with Off-Policy Correction")])
    sid = add_sub(topics=["reinforcement learning"])
    delivery.run_in_process(utcnow().date(), settings=settings)
    [mail] = outbox_messages(settings)
    with session_scope() as s:
        row = s.query(Delivery).filter_by(subscriber_id=sid).one()
        [dp] = row.papers
        assert dp.matched_topic == "reinforcement learning"
        assert "policy gradient" in dp.terms
    html = mail.get_body(preferencelist=("html",)).get_content()
    assert "Because you follow <em>reinforcement learning</em>: " in html
    assert "policy gradient" in html.split("Because you follow", 1)[1].split("</p>", 1)[0]
    view = next(u for u in html_links(mail) if "/view/" in u)
    page = make_client(settings).get(path_of(view, settings)).get_data(as_text=True)
    reason = page.split("Because you follow", 1)[1].split("</p>", 1)[0]
    assert "policy gradient" in reason
