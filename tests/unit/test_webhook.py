"""`POST /webhooks/ses` through Flask's test client, with messages signed by a test key.

Every refusal must answer 4xx, log why, and leave every table exactly as it was.
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, text

from tests.unit import test_events
from tests.unit.test_events import add_delivery, add_subscriber, iso
from tests.unit.test_sns import (
    CERT_URL,
    NOW,
    TOPIC,
    Fetcher,
    SigningKeys,
    confirmation,
    notification,
    sign,
)
from worker import config, migrate, sns
from worker.db import Base, get_engine, session_scope
from worker.models import Delivery, ProviderEvent, Subscriber

URL = "/webhooks/ses"
SENT = NOW - timedelta(hours=1)  # SES accepted the message an hour ago (past the grace)


def bounce(*args: Any, **kw: Any) -> dict[str, Any]:
    return test_events.bounce(*args, **{"sent_at": SENT, **kw})


def delivered(*args: Any, **kw: Any) -> dict[str, Any]:
    return test_events.delivered(*args, **{"sent_at": SENT, **kw})


# --- fixtures ---------------------------------------------------------------------------


class FakeSns:
    """Stands in for the boto3 SNS client; records ConfirmSubscription calls."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[dict[str, Any]] = []
        self.regions: list[str] = []
        self.fail = fail

    def factory(self, region: str) -> FakeSns:
        self.regions.append(region)
        return self

    def confirm_subscription(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        if self.fail:
            raise ConnectionError("SNS unreachable")
        return {"SubscriptionArn": f"{kwargs['TopicArn']}:{uuid.uuid4()}"}


class Web:
    def __init__(self, app: Flask, fetcher: Fetcher, fake_sns: FakeSns, keys: SigningKeys):
        self.app = app
        self.client: FlaskClient = app.test_client()
        self.fetcher = fetcher
        self.sns = fake_sns
        self.keys = keys

    def post(self, body: Any, content_type: str = "text/plain; charset=UTF-8"):
        data = body if isinstance(body, str | bytes) else json.dumps(body)
        return self.client.post(
            URL,
            data=data,
            content_type=content_type,
            headers={"x-amz-sns-message-type": "Notification"},
        )

    def signed(self, note: dict[str, Any], version: str = "2", **kw: Any) -> dict[str, Any]:
        """An SNS Notification envelope around an SES notification, signed."""
        message = notification(json.dumps(note), **kw)
        message["MessageId"] = str(uuid.uuid4())
        return sign(message, self.keys.key, version)


def _build(
    keys: SigningKeys, monkeypatch: pytest.MonkeyPatch, **env: str
) -> tuple[Flask, Fetcher, FakeSns]:
    from worker.web import create_app

    monkeypatch.setenv("PAPERMAIL_SNS_TOPIC_ARNS", TOPIC)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config.reset_settings()
    migrate.upgrade()
    app = create_app(config.get_settings(), dev=True)
    app.config["TESTING"] = True
    fetcher = Fetcher({CERT_URL: keys.pem})
    fake = FakeSns()
    app.config["SNS_CERT_FETCHER"] = fetcher
    app.config["SNS_CERT_CACHE"] = sns.CertCache()
    app.config["SNS_CLIENT_FACTORY"] = fake.factory
    return app, fetcher, fake


@pytest.fixture
def web(env: dict[str, str], keys: SigningKeys, monkeypatch: pytest.MonkeyPatch) -> Web:
    app, fetcher, fake = _build(keys, monkeypatch)
    return Web(app, fetcher, fake, keys)


@pytest.fixture
def keys() -> SigningKeys:
    return _KEYS


_KEYS = SigningKeys()


@pytest.fixture
def seeded(web: Web) -> dict[str, Any]:
    """One active subscriber with one sent delivery."""
    with session_scope() as session:
        sub = add_subscriber(session, "ann@example.org")
        row = add_delivery(session, sub)
        return {"email": sub.email, "message_id": row.message_id, "delivery_id": row.id}


def snapshot() -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table."""
    with get_engine().connect() as conn:
        return {
            table.name: [tuple(r) for r in conn.execute(text(f'SELECT * FROM "{table.name}"'))]
            for table in Base.metadata.sorted_tables
        }


# --- accepted ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain; charset=UTF-8", "application/json", "application/x-whatever"]
)
def test_notification_applied_whatever_the_content_type(
    web: Web, seeded: dict[str, Any], content_type: str
) -> None:
    body = web.signed(bounce(seeded["message_id"], [seeded["email"]]))
    response = web.post(body, content_type)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["status"] == "applied"
    with session_scope() as session:
        assert session.scalars(select(Subscriber)).one().status == "bounced"
        assert session.get(Delivery, seeded["delivery_id"]).state == "bounced"
        event = session.scalars(select(ProviderEvent)).one()
        assert event.dedupe_key == body["MessageId"] and event.via == "sns"


def test_signature_version_1_accepted_by_default(web: Web, seeded: dict[str, Any]) -> None:
    body = web.signed(delivered(seeded["message_id"], [seeded["email"]]), version="1")
    assert web.post(body).status_code == 200
    with session_scope() as session:
        assert session.get(Delivery, seeded["delivery_id"]).state == "delivered"


def test_repeat_answers_200_and_changes_nothing(web: Web, seeded: dict[str, Any]) -> None:
    body = web.signed(bounce(seeded["message_id"], [seeded["email"]], "Transient"))
    assert web.post(body).get_json()["status"] == "applied"
    before = snapshot()
    again = web.post(body)
    assert again.status_code == 200 and again.get_json()["status"] == "duplicate"
    assert snapshot() == before


def test_young_unknown_message_answers_503(web: Web, seeded: dict[str, Any]) -> None:
    before = snapshot()
    young = bounce("not-committed-yet", [seeded["email"]], sent_at=NOW - timedelta(seconds=5))
    response = web.post(web.signed(young))
    assert response.status_code == 503
    assert snapshot() == before


def test_old_unknown_message_is_an_orphan(web: Web, seeded: dict[str, Any]) -> None:
    response = web.post(web.signed(bounce("long-gone", [seeded["email"]])))
    assert response.status_code == 200 and response.get_json()["status"] == "orphan"
    with session_scope() as session:
        assert session.scalars(select(ProviderEvent)).one().orphan


def test_unreachable_certificate_answers_503(web: Web, seeded: dict[str, Any]) -> None:
    web.app.config["SNS_CERT_FETCHER"] = Fetcher({})
    before = snapshot()
    response = web.post(web.signed(bounce(seeded["message_id"], [seeded["email"]])))
    assert response.status_code == 503
    assert snapshot() == before


# --- refused ----------------------------------------------------------------------------


def _tampered(web: Web, body: dict[str, Any]) -> dict[str, Any]:
    note = json.loads(body["Message"])
    note["bounce"]["bouncedRecipients"][0]["emailAddress"] = "someone-else@example.org"
    return {**body, "Message": json.dumps(note)}


def _other_key(web: Web, body: dict[str, Any]) -> dict[str, Any]:
    unsigned = {k: v for k, v in body.items() if k not in ("Signature", "SignatureVersion")}
    return sign(unsigned, web.keys.other, "2")


def _resigned(web: Web, body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """Change fields, then sign properly: only the changed rule can refuse it."""
    unsigned = {k: v for k, v in body.items() if k not in ("Signature", "SignatureVersion")}
    unsigned.update(changes)
    return sign(unsigned, web.keys.key, body["SignatureVersion"])


def _without(key: str):
    return lambda web, body: {k: v for k, v in body.items() if k != key}


REFUSALS: list[tuple[str, Any, int, str]] = [
    ("bad signature", _tampered, 403, "signature does not verify"),
    ("signed by another key", _other_key, 403, "signature does not verify"),
    (
        "http certificate URL",
        lambda w, b: _resigned(w, b, SigningCertURL=CERT_URL.replace("https:", "http:")),
        403,
        "SigningCertURL",
    ),
    (
        "foreign host",
        lambda w, b: _resigned(
            w, b, SigningCertURL="https://sns.us-east-1.amazonaws.com.evil.com/c.pem"
        ),
        403,
        "SigningCertURL",
    ),
    (
        "S3-style amazonaws.com host",
        lambda w, b: _resigned(w, b, SigningCertURL="https://evil.s3.amazonaws.com/c.pem"),
        403,
        "SigningCertURL",
    ),
    ("missing SignatureVersion", _without("SignatureVersion"), 400, "SignatureVersion is missing"),
    (
        "unknown SignatureVersion",
        lambda w, b: {**b, "SignatureVersion": "3"},
        400,
        "unknown SignatureVersion",
    ),
    (
        "topic not allowed",
        lambda w, b: _resigned(w, b, TopicArn="arn:aws:sns:us-east-1:999999999999:other"),
        403,
        "not in PAPERMAIL_SNS_TOPIC_ARNS",
    ),
    (
        "stale Timestamp",
        lambda w, b: _resigned(w, b, Timestamp=iso(NOW - timedelta(hours=2))),
        403,
        "more than an hour",
    ),
    (
        "future Timestamp",
        lambda w, b: _resigned(w, b, Timestamp=iso(NOW + timedelta(hours=2))),
        403,
        "more than an hour",
    ),
    (
        "malformed Timestamp",
        lambda w, b: _resigned(w, b, Timestamp="27/11/2026 10:00"),
        400,
        "malformed",
    ),
    ("unknown Type", lambda w, b: _resigned(w, b, Type="Surprise"), 400, "unknown Type"),
    ("missing Signature", _without("Signature"), 400, "Signature is missing"),
    ("not JSON", lambda w, b: "Type=Notification&Message=hi", 400, "not JSON"),
    ("a JSON list", lambda w, b: [b], 400, "not a JSON object"),
    (
        "authentic but not an SES notification",
        lambda w, b: _resigned(w, b, Message="hello from the console"),
        400,
        "not valid JSON",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "status", "reason"),
    [pytest.param(m, s, r, id=name) for name, m, s, r in REFUSALS],
)
def test_refusals_change_nothing(
    web: Web,
    seeded: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    mutate: Any,
    status: int,
    reason: str,
) -> None:
    good = web.signed(bounce(seeded["message_id"], [seeded["email"]]))
    before = snapshot()
    caplog.set_level(logging.INFO)
    response = web.post(mutate(web, good))
    assert response.status_code == status, response.get_data(as_text=True)
    assert reason in response.get_json()["error"]
    assert snapshot() == before
    assert any(
        r.name == "worker.web.webhooks" and r.levelno >= logging.WARNING and reason in r.message
        for r in caplog.records
    ), caplog.text
    # The unmodified message is still accepted: the refusal came from the change alone.
    assert web.post(good).status_code == 200


def test_foreign_certificate_url_is_never_fetched(web: Web, seeded: dict[str, Any]) -> None:
    url = "https://attacker.s3.amazonaws.com/SimpleNotificationService-x.pem"
    web.fetcher.pems[url] = web.keys.pem
    good = web.signed(bounce(seeded["message_id"], [seeded["email"]]))
    body = _resigned(web, good, SigningCertURL=url)
    assert web.post(body).status_code == 403
    assert url not in web.fetcher.calls


def test_v1_refused_when_v2_required(
    env: dict[str, str], keys: SigningKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, fetcher, fake = _build(keys, monkeypatch, PAPERMAIL_SNS_REQUIRE_SIGNATURE_V2="true")
    web = Web(app, fetcher, fake, keys)
    with session_scope() as session:
        sub = add_subscriber(session, "v2@example.org")
        message_id = add_delivery(session, sub).message_id
    before = snapshot()
    v1 = web.post(web.signed(bounce(message_id, [sub.email]), version="1"))
    assert v1.status_code == 403 and "SignatureVersion 1" in v1.get_json()["error"]
    assert snapshot() == before
    assert web.post(web.signed(bounce(message_id, [sub.email]), version="2")).status_code == 200


def test_empty_topic_list_refuses_everything(
    env: dict[str, str], keys: SigningKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, fetcher, fake = _build(keys, monkeypatch, PAPERMAIL_SNS_TOPIC_ARNS="")
    web = Web(app, fetcher, fake, keys)
    before = snapshot()
    response = web.post(web.signed(bounce("m", ["a@example.org"])))
    assert response.status_code == 403 and "is empty" in response.get_json()["error"]
    assert snapshot() == before


# --- subscription confirmation ----------------------------------------------------------


@pytest.fixture
def trap() -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server standing in for a SubscribeURL: it records every request."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/confirm?Token=x", hits
    server.shutdown()
    server.server_close()


def test_subscription_confirmed_through_the_api(web: Web, trap: tuple[str, list[str]]) -> None:
    trap_url, hits = trap
    body = sign({**confirmation(), "SubscribeURL": trap_url}, web.keys.key)
    before = snapshot()
    response = web.post(body)
    assert response.status_code == 200 and response.get_json()["status"] == "confirmed"
    assert web.sns.calls == [
        {"TopicArn": TOPIC, "Token": body["Token"], "AuthenticateOnUnsubscribe": "true"}
    ]
    assert web.sns.regions == ["us-east-1"]
    assert hits == []  # the SubscribeURL is never fetched
    assert web.fetcher.calls == [CERT_URL]  # only the signing certificate was
    assert snapshot() == before


def test_forged_subscription_is_not_confirmed(web: Web, trap: tuple[str, list[str]]) -> None:
    trap_url, hits = trap
    body = sign({**confirmation(), "SubscribeURL": trap_url}, web.keys.other)
    assert web.post(body).status_code == 403
    assert web.sns.calls == [] and hits == []


def test_confirmation_failure_answers_503(web: Web) -> None:
    web.sns.fail = True
    response = web.post(sign(confirmation(), web.keys.key))
    assert response.status_code == 503 and len(web.sns.calls) == 1


def test_unsubscribe_confirmation_is_noted(web: Web, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    before = snapshot()
    response = web.post(sign(confirmation("UnsubscribeConfirmation"), web.keys.key))
    assert response.status_code == 200 and response.get_json()["status"] == "noted"
    assert web.sns.calls == [] and snapshot() == before
    assert "unsubscribed this endpoint" in caplog.text


# --- the fast path (worker.web.webhooks.SnsFastPath) ---------------------------------------


def _answer(response: Any) -> tuple[int, str, Any]:
    assert response.status.startswith(f"{response.status_code} ")
    if response.status_code != 200:  # the reason phrase too, as werkzeug writes it
        assert response.status == f"{response.status_code} {response.status[4:].upper()}"
    return response.status_code, response.mimetype, response.get_json(silent=True)


def _both(web: Web, body: Any, again: Any = None) -> list[Any]:
    """The answers of the fast path to ``body`` and of the Flask view (a query string sends
    the request through Flask) to ``again`` (a fresh copy, when the first changes state)
    or the same body."""
    headers = {"x-amz-sns-message-type": "Notification"}
    out = []
    for url, one in ((URL, body), (URL + "?via=flask", body if again is None else again)):
        data = one if isinstance(one, str | bytes) else json.dumps(one)
        out.append(_answer(web.client.post(url, data=data, content_type="text/plain",
                                           headers=headers)))  # fmt: skip
    return out


def test_fast_path_answers_as_the_flask_view(web: Web, seeded: dict[str, Any]) -> None:
    """Every kind of answer, from both paths: the same status, type and JSON body."""
    with session_scope() as session:
        other = add_delivery(session, add_subscriber(session, "bob@example.org"))
        others = {"message_id": other.message_id, "email": "bob@example.org"}
    young = bounce("not-yet", [seeded["email"]], sent_at=NOW - timedelta(seconds=5))
    fixed: list[tuple[str, Any]] = [
        ("deep", "[" * 100_000),
        ("not JSON", "{nope"),
        ("not UTF-8", b"\xff\xfe{}"),
        ("empty", ""),
        ("forged", _tampered(web, web.signed(bounce(seeded["message_id"], [seeded["email"]])))),
        ("young unknown", web.signed(young)),
        ("not SES", web.signed({"eventType": "Bounce", "mail": {}})),
        ("unsubscribe confirmation", sign(confirmation("UnsubscribeConfirmation"), web.keys.key)),
    ]
    for name, body in fixed:
        fast, flask = _both(web, body)
        assert fast == flask, name
        assert fast[0] in (200, 400, 403, 503) and fast[1] == "application/json", name
    # State changes: a fresh notification for each path, the same outcome.
    orphan = [web.signed(bounce(f"long-gone-{i}", [seeded["email"]])) for i in range(2)]
    fast, flask = _both(web, orphan[0], orphan[1])
    assert (
        fast
        == flask
        == (
            200,
            "application/json",
            {"status": "orphan", "event_type": "Bounce", "delivery_id": None},
        )
    )
    ann = web.signed(delivered(seeded["message_id"], [seeded["email"]]))
    bob = web.signed(delivered(others["message_id"], [others["email"]]))
    fast, flask = _both(web, ann, bob)
    assert fast[2] == {"status": "applied", "event_type": "Delivery",
                       "delivery_id": seeded["delivery_id"]}  # fmt: skip
    assert flask[:2] == fast[:2] and flask[2]["status"] == "applied"
    # Repeats: a duplicate on either path.
    assert _both(web, ann, bob) == [
        (200, "application/json", {**fast[2], "status": "duplicate"}),
        (200, "application/json", {**flask[2], "status": "duplicate"}),
    ]


def test_fast_path_refuses_a_large_body_either_way(web: Web) -> None:
    from worker.web.webhooks import MAX_JSON_BYTES, SnsFastPath

    big = b" " * (MAX_JSON_BYTES + 1)
    fast, flask = _both(web, big)
    assert fast == flask and fast[0] == 400 and "too large" in fast[2]["error"]
    # A chunked body (no Content-Length) is read up to the limit and refused above it.
    import io

    fast = SnsFastPath(web.app, web.app.wsgi_app)
    seen: list[str] = []
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": URL, "QUERY_STRING": "",
               "CONTENT_TYPE": "text/plain", "wsgi.input": io.BytesIO(big + b"xyz"),
               "wsgi.input_terminated": True, "REMOTE_ADDR": "203.0.113.7"}  # fmt: skip
    body = b"".join(fast(environ, lambda status, headers: seen.append(status)))
    assert seen == ["400 BAD REQUEST"] and b"too large" in body
    environ["wsgi.input"] = io.BytesIO(b"{nope")
    body = b"".join(fast(environ, lambda status, headers: seen.append(status)))
    assert seen[-1] == "400 BAD REQUEST" and json.loads(body) == {"error": "body is not JSON"}


def test_form_bodies_and_other_methods_still_go_through_flask(web: Web) -> None:
    # The input guard sees a form body: a control character in a field is its 400.
    response = web.client.post(URL, data={"field": "a\x00b"})
    assert response.status_code == 400 and "U+0000" in response.get_json()["error"]
    assert web.client.get(URL).status_code == 405
    assert web.client.post(URL + "?x=%00", data="{}").status_code == 400  # the query guard


def test_fast_path_failure_answers_500_and_logs(
    web: Web, seeded: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    from worker.web import webhooks

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database on fire")

    monkeypatch.setattr(webhooks, "handle_body", broken)
    before = snapshot()
    response = web.post(web.signed(delivered(seeded["message_id"], [seeded["email"]])))
    assert response.status_code == 500
    assert "Exception on /webhooks/ses [POST]" in caplog.text and "database on fire" in caplog.text
    assert snapshot() == before


def test_fast_path_logs_the_client_behind_trusted_proxies(
    keys: SigningKeys, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    env: dict[str, str],
) -> None:  # fmt: skip
    app, _, _ = _build(keys, monkeypatch, PAPERMAIL_TRUSTED_PROXIES="1")
    client = app.test_client()
    caplog.set_level(logging.WARNING)
    response = client.post(URL, data="{nope", headers={"X-Forwarded-For": "198.51.100.23"},
                           environ_base={"REMOTE_ADDR": "10.0.0.1"})  # fmt: skip
    assert response.status_code == 400
    assert "refused body from 198.51.100.23" in caplog.text
