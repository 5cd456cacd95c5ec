"""Public subscribe page and double opt-in confirmation, over HTTP."""

from __future__ import annotations

import re

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select

from tests.unit.web_support import (
    add_sub,
    csrf_from,
    html_links,
    make_client,
    outbox_messages,
    path_of,
    snapshot,
    status_of,
    token,
)
from worker import delivery, links
from worker.config import Settings
from worker.db import session_scope
from worker.models import Delivery, Subscriber, utcnow


@pytest.fixture
def client(settings: Settings) -> FlaskClient:
    return make_client(settings)


def _subscribe(
    client: FlaskClient, email: str, topics: str = "", ip: str = "192.0.2.10", tz: str = ""
) -> tuple[int, str, dict[str, str]]:
    csrf = csrf_from(client.get("/subscribe").get_data(as_text=True))
    response = client.post(
        "/subscribe",
        data={"email": email, "topics": topics, "timezone": tz, "csrf_token": csrf},
        environ_base={"REMOTE_ADDR": ip},
    )
    return response.status_code, response.get_data(as_text=True), dict(response.headers)


def _count_subscribers() -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(Subscriber)) or 0


def test_new_address_gets_a_pending_row_and_a_confirmation_email(
    client: FlaskClient, settings: Settings
) -> None:
    page = client.get("/subscribe").get_data(as_text=True)
    assert 'for="email"' in page and 'type="email"' in page and "data-fill-tz" in page
    status, body, _ = _subscribe(client, "New.Reader@Example.org", "robotics, RL", tz="Asia/Tokyo")
    assert status == 200 and "Check your inbox" in body
    with session_scope() as s:
        sub = s.scalars(select(Subscriber)).one()
        assert sub.email == "new.reader@example.org"
        assert (sub.status, sub.topics, sub.timezone) == (
            "pending",
            ["robotics", "RL"],
            "Asia/Tokyo",
        )
        assert sub.confirmed_at is None
        sid = sub.id
    [mail] = outbox_messages(settings)
    assert mail["To"] == "new.reader@example.org"
    assert "confirm" in mail["Subject"].lower()
    confirm_links = [u for u in html_links(mail) if "/confirm/" in u]
    assert confirm_links, "the confirmation email has no confirm link"
    assert links.read_token("confirm", confirm_links[0].rsplit("/", 1)[1], settings) == {"s": sid}


def test_confirm_get_changes_nothing_post_activates(
    client: FlaskClient, settings: Settings
) -> None:
    _subscribe(client, "reader@example.org")
    [mail] = outbox_messages(settings)
    url = path_of(next(u for u in html_links(mail) if "/confirm/" in u), settings)
    sid = links.read_token("confirm", url.rsplit("/", 1)[1], settings)["s"]
    before = snapshot(sid)
    page = client.get(url)
    assert page.status_code == 200 and "<button" in page.get_data(as_text=True)
    assert client.head(url).status_code == 200
    assert snapshot(sid) == before and status_of(sid) == "pending"
    done = client.post(url)
    assert done.status_code == 200 and "You're subscribed" in done.get_data(as_text=True)
    assert "Set-Cookie" not in done.headers
    with session_scope() as s:
        sub = s.get(Subscriber, sid)
        assert sub is not None and sub.status == "active" and sub.confirmed_at is not None
    again = client.post(url)  # idempotent
    assert again.status_code == 200 and "already subscribed" in again.get_data(as_text=True)


def test_pending_subscribers_never_get_a_digest(client: FlaskClient, settings: Settings) -> None:
    from tests.unit.web_support import add_papers

    add_papers([("2611.10001", "Robotics for Everyone"), ("2611.10002", "Robotics Again")])
    _subscribe(client, "pending@example.org", "robotics")
    confirmed = add_sub("active@example.org", topics=["robotics"])
    delivery.run_in_process(utcnow().date(), settings=settings)
    with session_scope() as s:
        got = set(s.scalars(select(Delivery.subscriber_id)))
    assert got == {confirmed}
    assert len(outbox_messages(settings, to="pending@example.org")) == 1  # the confirmation
    assert len(outbox_messages(settings, to="active@example.org")) == 1  # the digest


def test_expired_confirm_link_is_refused(
    client: FlaskClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = add_sub("late@example.org", confirmed=False)
    real = links._clock
    monkeypatch.setattr(links, "_clock", lambda: real() - 8 * 24 * 3600)  # valid 7 days
    old = token("confirm", settings, s=sid)
    monkeypatch.setattr(links, "_clock", real)
    response = client.post("/confirm/" + old)
    assert response.status_code == 400 and "expired" in response.get_data(as_text=True)
    assert status_of(sid) == "pending"


def _normalise(body: str, email: str) -> str:
    return body.replace(email, "EMAIL")


def test_response_does_not_reveal_whether_an_address_is_subscribed(
    settings: Settings,
) -> None:
    add_sub("active@example.org")
    add_sub("pending@example.org", confirmed=False)
    gone = add_sub("gone@example.org")
    with session_scope() as s:
        sub = s.get(Subscriber, gone)
        assert sub is not None
        sub.status = "unsubscribed"
    add_sub("bounced@example.org")
    with session_scope() as s:
        sub = s.scalars(select(Subscriber).where(Subscriber.email == "bounced@example.org")).one()
        sub.status = "bounced"
    answers = {}
    for i, email in enumerate(
        [
            "new@example.org",
            "active@example.org",
            "pending@example.org",
            "gone@example.org",
            "bounced@example.org",
        ]
    ):
        client = make_client(settings)
        status, body, headers = _subscribe(client, email, "robotics", ip=f"192.0.2.{i + 1}")
        answers[email] = (
            status,
            _normalise(body, email),
            sorted(k for k in headers if k not in {"Date", "Content-Length"}),
            "Set-Cookie" in headers,
        )
    first = answers["new@example.org"]
    assert first[0] == 200
    for email, answer in answers.items():
        assert answer == first, email
    # Existing subscribers were not changed by the anonymous request...
    with session_scope() as s:
        active = s.scalars(select(Subscriber).where(Subscriber.email == "active@example.org")).one()
        assert active.topics == [] and active.status == "active"
        gone_sub = s.get(Subscriber, gone)
        assert gone_sub is not None and gone_sub.status == "unsubscribed"
    # ...and mail went only where a confirmation makes sense.
    to = sorted(m["To"] for m in outbox_messages(settings))
    assert to == ["gone@example.org", "new@example.org", "pending@example.org"]


def test_unsubscribed_address_rejoins_only_by_confirming(
    client: FlaskClient, settings: Settings
) -> None:
    sid = add_sub("back@example.org")
    with session_scope() as s:
        sub = s.get(Subscriber, sid)
        assert sub is not None
        sub.status = "unsubscribed"
    _subscribe(client, "back@example.org")
    assert status_of(sid) == "unsubscribed"
    [mail] = outbox_messages(settings)
    url = path_of(next(u for u in html_links(mail) if "/confirm/" in u), settings)
    assert client.post(url).status_code == 200
    assert status_of(sid) == "active"


def test_invalid_input_shows_errors_and_creates_nothing(
    client: FlaskClient, settings: Settings
) -> None:
    status, body, _ = _subscribe(client, "not-an-address", "x" * 101)
    assert status == 400
    assert re.search(r'<p class="error" id="email-error">Invalid email [^<]+</p>', body)
    assert re.search(r'<p class="error" id="topics-error">A topic may have at most 100', body)
    assert 'value="not-an-address"' in body
    assert _count_subscribers() == 0 and outbox_messages(settings) == []


def test_subscribe_without_csrf_is_refused(client: FlaskClient, settings: Settings) -> None:
    response = client.post("/subscribe", data={"email": "x@example.org"})
    assert response.status_code == 400
    assert _count_subscribers() == 0 and outbox_messages(settings) == []


def test_rate_limit_per_client_and_per_address(settings: Settings) -> None:
    limited = settings.model_copy(update={"subscribe_rate_per_hour": 2})
    client = make_client(limited)
    # One client, different addresses: the third request is refused.
    assert _subscribe(client, "a1@example.org", ip="198.51.100.1")[0] == 200
    assert _subscribe(client, "a2@example.org", ip="198.51.100.1")[0] == 200
    status, body, headers = _subscribe(client, "a3@example.org", ip="198.51.100.1")
    assert status == 429 and int(headers["Retry-After"]) > 0
    assert "try again" in body
    # One address from many clients: refused after two as well.
    assert _subscribe(client, "target@example.org", ip="203.0.113.1")[0] == 200
    assert _subscribe(client, "target@example.org", ip="203.0.113.2")[0] == 200
    assert _subscribe(client, "Target@Example.org", ip="203.0.113.3")[0] == 429
    # Nothing was created or sent for the refused requests.
    assert _count_subscribers() == 3
    assert len(outbox_messages(limited, to="target@example.org")) == 2
    assert outbox_messages(limited, to="a3@example.org") == []
