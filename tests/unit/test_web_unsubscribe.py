"""One-click unsubscribe (RFC 8058) and the unsubscribe page, over HTTP."""

from __future__ import annotations

import logging

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.unit.web_support import add_sub, make_client, snapshot, status_of, token
from worker import links
from worker.config import Settings
from worker.db import session_scope
from worker.models import Subscriber, SubscriberLog


@pytest.fixture
def client(settings: Settings) -> FlaskClient:
    return make_client(settings)


def _unsub_logs(sid: int) -> int:
    with session_scope() as s:
        return len(
            s.scalars(
                select(SubscriberLog).where(
                    SubscriberLog.subscriber_id == sid, SubscriberLog.action == "unsubscribed"
                )
            ).all()
        )


def test_get_and_head_show_a_button_and_change_nothing(
    client: FlaskClient, settings: Settings
) -> None:
    sid = add_sub()
    url = "/unsubscribe/" + token("unsubscribe", settings, s=sid)
    before = snapshot(sid)
    page = client.get(url)
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert 'name="List-Unsubscribe" value="One-Click"' in html
    assert "<button" in html and "ada@example.org" in html
    head = client.head(url)
    assert head.status_code == 200 and head.data == b""
    assert snapshot(sid) == before
    assert status_of(sid) == "active"


@pytest.mark.parametrize("encoding", ["form", "multipart"])
def test_one_click_post_unsubscribes_per_rfc_8058(
    client: FlaskClient, settings: Settings, encoding: str
) -> None:
    sid = add_sub()
    url = "/unsubscribe/" + token("unsubscribe", settings, s=sid)
    if encoding == "form":
        kwargs = {
            "data": "List-Unsubscribe=One-Click",
            "content_type": "application/x-www-form-urlencoded",
        }
    else:
        kwargs = {"data": {"List-Unsubscribe": "One-Click"}, "content_type": "multipart/form-data"}
    for attempt in range(2):  # idempotent: the repeat answers the same and changes nothing
        response = client.post(url, **kwargs)  # type: ignore[arg-type]
        assert response.status_code == 200, attempt
        assert "Location" not in response.headers
        assert "Set-Cookie" not in response.headers
        assert status_of(sid) == "unsubscribed"
        assert "unsubscribed" in response.get_data(as_text=True).lower()
    assert _unsub_logs(sid) == 1
    with session_scope() as s:
        sub = s.get(Subscriber, sid)
        assert sub is not None and sub.unsubscribed_at is not None


def test_one_click_sets_no_cookie_even_when_the_client_has_a_session(
    client: FlaskClient, settings: Settings
) -> None:
    sid = add_sub()
    # The preference page gives the browser a session cookie (CSRF)...
    prefs = client.get("/preferences/" + token("preferences", settings, s=sid))
    assert "papermail_session=" in prefs.headers.get("Set-Cookie", "")
    # ...which the one-click POST neither needs nor refreshes nor deletes.
    response = client.post(
        "/unsubscribe/" + token("unsubscribe", settings, s=sid),
        data={"List-Unsubscribe": "One-Click"},
    )
    assert response.status_code == 200
    assert "Set-Cookie" not in response.headers
    assert status_of(sid) == "unsubscribed"


def test_post_without_the_one_click_field_changes_nothing(
    client: FlaskClient, settings: Settings
) -> None:
    sid = add_sub()
    before = snapshot(sid)
    url = "/unsubscribe/" + token("unsubscribe", settings, s=sid)
    for data in ({}, {"List-Unsubscribe": "one-click-please"}):
        response = client.post(url, data=data)
        assert response.status_code == 400
    assert snapshot(sid) == before


def test_resubscribe_from_the_page(client: FlaskClient, settings: Settings) -> None:
    sid = add_sub()
    url = "/unsubscribe/" + token("unsubscribe", settings, s=sid)
    client.post(url, data={"List-Unsubscribe": "One-Click"})
    page = client.get(url).get_data(as_text=True)
    assert 'value="resubscribe"' in page and "Re-subscribe" in page
    response = client.post(url, data={"action": "resubscribe"})
    assert response.status_code == 200
    assert "Welcome back" in response.get_data(as_text=True)
    assert status_of(sid) == "active"
    with session_scope() as s:
        sub = s.get(Subscriber, sid)
        assert sub is not None and sub.unsubscribed_at is None


def test_bounced_address_stays_bounced(client: FlaskClient, settings: Settings) -> None:
    sid = add_sub()
    with session_scope() as s:
        sub = s.get(Subscriber, sid)
        assert sub is not None
        sub.status = "bounced"
    url = "/unsubscribe/" + token("unsubscribe", settings, s=sid)
    assert client.post(url, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert status_of(sid) == "bounced"
    refused = client.post(url, data={"action": "resubscribe"})
    assert refused.status_code == 409
    assert status_of(sid) == "bounced"


def _tampered(good: str) -> str:
    # Change one character inside the signature (not the last one, whose low bits are
    # base64 padding and may decode to the same bytes).
    i = len(good) - 10
    return good[:i] + ("A" if good[i] != "A" else "B") + good[i + 1 :]


@pytest.mark.parametrize("kind", ["tampered", "wrong-purpose", "expired", "garbage"])
def test_bad_tokens_get_a_friendly_page_a_log_line_and_change_nothing(
    client: FlaskClient,
    settings: Settings,
    kind: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sid = add_sub()
    good = token("unsubscribe", settings, s=sid)
    if kind == "tampered":
        bad = _tampered(good)
    elif kind == "wrong-purpose":
        bad = token("preferences", settings, s=sid)
    elif kind == "expired":
        real = links._clock
        monkeypatch.setattr(links, "_clock", lambda: real() - 500 * 24 * 3600)
        bad = token("unsubscribe", settings, s=sid)
        monkeypatch.setattr(links, "_clock", real)
    else:
        bad = "not-a-token"
    before = snapshot(sid)
    caplog.set_level(logging.WARNING, logger="worker.web.pages")
    for method in ("get", "post"):
        response = getattr(client, method)(
            "/unsubscribe/" + bad, data={"List-Unsubscribe": "One-Click"}
        )
        assert response.status_code == 400
        html = response.get_data(as_text=True)
        assert "<h1>" in html and "Nothing was changed" in html
        assert "Traceback" not in html
        assert "Set-Cookie" not in response.headers
    assert snapshot(sid) == before
    assert status_of(sid) == "active"
    refusals = [r for r in caplog.records if "refused unsubscribe link" in r.getMessage()]
    assert len(refusals) == 2
    expected = {
        "tampered": "TamperedLink",
        "wrong-purpose": "WrongPurpose",
        "expired": "ExpiredLink",
        "garbage": "TamperedLink",
    }[kind]
    for record in refusals:
        message = record.getMessage()
        assert expected in message
        assert bad not in message  # never the token itself
        assert bad.rsplit(".", 1)[-1] not in message  # nor its signature
    if kind == "expired":
        assert "expired" in response.get_data(as_text=True)


def test_unknown_subscriber_is_a_friendly_404(client: FlaskClient, settings: Settings) -> None:
    response = client.get("/unsubscribe/" + token("unsubscribe", settings, s=999))
    assert response.status_code == 404
    assert "couldn" in response.get_data(as_text=True)


def test_unknown_path_is_a_friendly_404(client: FlaskClient) -> None:
    response = client.get("/no-such-page")
    assert response.status_code == 404
    assert "Page not found" in response.get_data(as_text=True)
