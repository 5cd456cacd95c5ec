"""No 500 from input: control characters, hostile JSON and a missing Redis, over HTTP.

On PostgreSQL, which refuses NUL in text (SQLite would store it quietly), so a value
that slipped past the checks would show up here as a 500.
"""

from __future__ import annotations

import html
import socket

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select
from werkzeug.test import TestResponse

from tests.unit.web_support import add_papers, add_sub, csrf_from, make_client, snapshot, token
from worker import config
from worker.config import Settings
from worker.db import session_scope
from worker.models import Subscriber

# NUL, other C0 controls, DEL, a C1 control. (werkzeug turns undecodable bytes into
# U+FFFD, so lone surrogates only reach the shared validation from the command line.)
BAD = ["\x00", "\x01", "\x1b", "\x1f", "\x7f", "\x85"]


@pytest.fixture
def pg_settings(pg_env: dict[str, str]) -> Settings:
    return config.get_settings()


@pytest.fixture
def client(pg_settings: Settings) -> FlaskClient:
    return make_client(pg_settings)


def _text(response: TestResponse) -> str:
    return html.unescape(response.get_data(as_text=True))


def _count() -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(Subscriber)) or 0


def _post_subscribe(client: FlaskClient, **fields: str) -> tuple[int, str]:
    csrf = csrf_from(client.get("/subscribe").get_data(as_text=True))
    data = {"email": "ada@example.org", "topics": "robotics", "timezone": "UTC", **fields}
    response = client.post("/subscribe", data={**data, "csrf_token": csrf})
    return response.status_code, html.unescape(response.get_data(as_text=True))


@pytest.mark.parametrize(
    ("field", "char"),
    [("topics", c) for c in BAD] + [("email", "\x00"), ("email", "\x7f"), ("timezone", "\x00")],
)
def test_subscribe_refuses_control_characters_in_every_field(
    client: FlaskClient, field: str, char: str
) -> None:
    value = {
        "email": f"a{char}da@example.org",
        "topics": f"robo{char}tics",
        "timezone": f"Europe/Pa{char}ris",
    }
    status, body = _post_subscribe(client, **{field: value[field]})
    assert status == 400, body
    code = f"U+{ord(char):04X}"
    assert f"control character ({code})" in body and "not allowed" in body
    assert _count() == 0


def test_subscribe_refuses_control_characters_in_any_other_field_or_query(
    client: FlaskClient,
) -> None:
    csrf = csrf_from(client.get("/subscribe").get_data(as_text=True))
    base = {"email": "ada@example.org", "topics": "robotics", "csrf_token": csrf}
    extra = client.post("/subscribe", data={**base, "nickname": "x\x00y"})
    assert extra.status_code == 400
    assert "control character (U+0000) in the form field 'nickname'" in _text(extra)
    bad_csrf = client.post("/subscribe", data={**base, "csrf_token": csrf + "\x00"})
    assert bad_csrf.status_code == 400
    query = client.post("/subscribe?ref=a%00b", data=base)
    assert query.status_code == 400
    assert "the query parameter 'ref'" in _text(query)
    assert client.get("/subscribe?x=%1b").status_code == 400
    assert client.get("/subscri%00be").status_code == 400
    assert _count() == 0
    # A clean request afterwards works: nothing was left half-done.
    assert _post_subscribe(client)[0] == 200 and _count() == 1


def test_multi_line_whitespace_is_not_a_control_character_problem(client: FlaskClient) -> None:
    status, _ = _post_subscribe(client, topics="robotics,\r\n\tplanning")
    assert status == 200
    with session_scope() as s:
        assert s.scalars(select(Subscriber.topics)).one() == ["robotics", "planning"]


@pytest.mark.parametrize("field", ["new_topics", "topic", "timezone", "max_papers", "paused_until"])
def test_preferences_refuse_control_characters_and_change_nothing(
    client: FlaskClient, pg_settings: Settings, field: str
) -> None:
    add_papers([("2611.00001", "Diffusion Models for Protein Design")])
    sid = add_sub("ada@example.org", topics=["diffusion models"])
    url = "/preferences/" + token("preferences", pg_settings, s=sid)
    before = snapshot(sid)
    csrf = csrf_from(client.get(url).get_data(as_text=True))
    form = {
        "topic": ["diffusion models"],
        "new_topics": "",
        "max_papers": "5",
        "frequency": "daily",
        "weekday": "0",
        "send_hour": "7",
        "timezone": "UTC",
        "paused_until": "",
        "csrf_token": csrf,
    }
    form[field] = ["diffusion\x00models"] if field == "topic" else "bad\x00value"
    response = client.post(url, data=form)
    body = response.get_data(as_text=True)
    assert response.status_code == 400, body
    assert "U+0000" in body
    assert snapshot(sid) == before


def test_feedback_and_unsubscribe_refuse_control_characters(
    client: FlaskClient, pg_settings: Settings
) -> None:
    add_papers([("2611.00001", "Diffusion Models for Protein Design")])
    sid = add_sub("ada@example.org")
    before = snapshot(sid)
    unsub = "/unsubscribe/" + token("unsubscribe", pg_settings, s=sid)
    one_click = client.post(unsub, data={"List-Unsubscribe": "One-Click", "source": "pa\x00ge"})
    assert one_click.status_code == 400
    assert "the form field 'source'" in _text(one_click)
    assert client.get(unsub + "?utm=%00").status_code == 400
    vote = "/feedback/" + token("feedback", pg_settings, s=sid, p="2611.00001", v=1)
    assert client.post(vote, data={"note": "\x07"}).status_code == 400
    assert client.get(vote + "%00").status_code == 400
    assert snapshot(sid) == before


def test_webhook_refuses_deep_and_large_json_with_400(client: FlaskClient) -> None:
    deep = client.post("/webhooks/ses", data="[" * 100_000, content_type="text/plain")
    assert deep.status_code == 400
    assert "nested more than 64 levels" in deep.get_json()["error"]
    objects = client.post("/webhooks/ses", data='{"a":' * 50_000, content_type="text/plain")
    assert objects.status_code == 400
    big = client.post("/webhooks/ses", data=b" " * (1024 * 1024 + 1), content_type="text/plain")
    assert big.status_code == 400 and "too large" in big.get_json()["error"]
    # Brackets inside strings are text, not nesting: this is a well-formed (unsigned) message.
    text = client.post("/webhooks/ses", data='{"Type": "' + "[" * 1000 + '"}')
    assert text.status_code in (400, 403) and "nested" not in text.get_json()["error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_subscribe_without_its_redis_answers_503_with_retry_after(
    pg_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The throttle's store is a Redis port where nothing listens.
    monkeypatch.setenv("PAPERMAIL_BROKER_URL", f"redis://:hunter2@127.0.0.1:{_free_port()}/0")
    config.reset_settings()
    client = make_client(config.get_settings())
    status, body = 0, ""
    csrf = csrf_from(client.get("/subscribe").get_data(as_text=True))
    response = client.post(
        "/subscribe", data={"email": "ada@example.org", "topics": "", "csrf_token": csrf}
    )
    status, body = response.status_code, response.get_data(as_text=True)
    assert status == 503
    assert int(response.headers["Retry-After"]) > 0
    assert "Please try again in a minute" in body and "hunter2" not in body
    assert response.mimetype == "text/html"
    assert _count() == 0
