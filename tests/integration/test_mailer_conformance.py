"""One suite every mailer passes: outbox (files), SES (moto server process), SMTP (aiosmtpd)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from worker.mailers.base import Mailer, SendResult, create_mailer
from worker.mailers.errors import InvalidMessage, MessageTooLarge
from worker.message import OutgoingMessage

from .conftest import MAIL_RECIPIENT, MAIL_SENDER, build_message


@dataclass
class Target:
    name: str
    settings_for: Callable[..., object]  # (**overrides) -> Settings for this mailer
    received: Callable[[], list[bytes]]  # raw bytes the recipient got since the test began
    calls: Callable[[], int]  # requests/sessions that reached the provider
    mailers: list[Mailer] = field(default_factory=list)

    def mailer(self, **overrides: object) -> Mailer:
        mailer = create_mailer(self.settings_for(**overrides))  # type: ignore[arg-type]
        self.mailers.append(mailer)
        return mailer


@pytest.fixture(params=["outbox", "ses", "smtp"])
def target(request: pytest.FixtureRequest, mailer_env: Callable[..., object]) -> Iterator[Target]:
    kind = request.param
    if kind == "outbox":
        outbox = Path("outbox").resolve()  # the env fixture runs each test in its tmp dir

        def received() -> list[bytes]:
            return [p.read_bytes() for p in sorted(outbox.rglob("*.eml"))]

        t = Target(
            kind,
            lambda **o: mailer_env("outbox", OUTBOX_DIR=outbox, **o),
            received,
            lambda: len(list(outbox.rglob("*"))),  # files or directories created
        )
    elif kind == "ses":
        moto = request.getfixturevalue("moto_ses")
        t = Target(
            kind,
            lambda **o: mailer_env("ses", SES_ENDPOINT_URL=moto.url, **o),
            lambda: [m["raw_data"].encode("utf-8") for m in moto.sent()],
            lambda: len(moto.send_requests()),
        )
    else:
        smtp = request.getfixturevalue("smtp_server")
        t = Target(
            kind,
            lambda **o: mailer_env(
                "smtp", SMTP_HOST=smtp.host, SMTP_PORT=smtp.port, SMTP_STARTTLS="false", **o
            ),
            lambda: [m.raw for m in smtp.sink.messages],
            lambda: smtp.sink.sessions,
        )
    yield t
    for mailer in t.mailers:
        mailer.close()


def test_send_delivers_exactly_the_raw_bytes(target: Target) -> None:
    mailer = target.mailer()
    message = build_message(body="Exactly these bytes.\r\n.A line starting with a dot\r\n")

    result = mailer.send(message)

    assert isinstance(result, SendResult)
    assert isinstance(result.message_id, str) and result.message_id.strip()
    assert target.received().count(message.raw) == 1
    assert target.calls() >= 1  # the probe used by the size-limit test does see calls
    assert mailer.name == target.name


def test_utf8_8bit_body_survives_byte_for_byte(target: Target) -> None:
    message = build_message(
        subject="Résumé: Ünïcödé papers",
        body="Attention Is All You Need — Vaswani, Łukasz Kaiser, 注意力 " * 3,
        cte="8bit",
    )
    assert not message.raw.isascii()  # really 8-bit on the wire

    target.mailer().send(message)

    assert target.received().count(message.raw) == 1


def test_two_sends_give_two_distinct_ids(target: Target) -> None:
    mailer = target.mailer()
    first, second = build_message(body="first"), build_message(body="second")

    ids = {mailer.send(first).message_id, mailer.send(second).message_id}

    assert len(ids) == 2
    received = target.received()
    assert received.count(first.raw) == 1
    assert received.count(second.raw) == 1


def test_size_limit_is_refused_before_any_call(target: Target) -> None:
    message = build_message(body="x" * 5000)

    with pytest.raises(MessageTooLarge) as caught:
        target.mailer(SES_MAX_MESSAGE_BYTES=message.size - 1).send(message)

    assert caught.value.size == message.size
    assert caught.value.kind == "permanent"
    assert target.calls() == 0
    assert target.received() == []
    # Exactly at the limit is still allowed.
    target.mailer(SES_MAX_MESSAGE_BYTES=message.size).send(message)
    assert target.received().count(message.raw) == 1


@pytest.mark.parametrize(
    ("sender", "recipient"),
    [
        (MAIL_SENDER, "reader@example.org\r\nRCPT TO:<victim@example.net>"),
        (MAIL_SENDER, ""),
        (MAIL_SENDER, "not-an-address"),
        ("evil@example.com>\r\nX: y", MAIL_RECIPIENT),
    ],
)
def test_malformed_envelope_is_refused_before_any_call(
    target: Target, sender: str, recipient: str
) -> None:
    good = build_message()
    bad = OutgoingMessage(
        sender=sender,
        recipient=recipient,
        subject=good.subject,
        message_id=good.message_id,
        raw=good.raw,
        tags=good.tags,
    )

    with pytest.raises(InvalidMessage, match="address"):
        target.mailer().send(bad)

    assert target.calls() == 0


def test_concurrent_sends_from_threads_each_arrive_once(target: Target) -> None:
    mailer = target.mailer()
    messages = [
        build_message(body=f"message {i}", tags={"delivery_id": str(i), "edition": "2026-11-27"})
        for i in range(24)
    ]
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(batch: list[OutgoingMessage]) -> None:
        for message in batch:
            try:
                message_id = mailer.send(message).message_id
            except BaseException as exc:
                with lock:
                    errors.append(exc)
            else:
                with lock:
                    ids.append(message_id)

    threads = [threading.Thread(target=work, args=(messages[i::6],)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert len(set(ids)) == len(messages)
    received = target.received()
    assert all(received.count(m.raw) == 1 for m in messages)


def test_address_problem_names_what_the_mailer_cannot_send(target: Target) -> None:
    """Every mailer answers, without any call to the provider, whether it can send to an
    address; subscribe, import and the delivery ask it before anything is queued."""
    mailer = target.mailer()
    calls = target.calls()
    problem = mailer.address_problem("tést@example.com")
    assert problem is not None and f"with the {target.name} mailer" in problem
    assert "only ASCII" in problem
    assert type(mailer).address_problem("tést@example.com") == problem  # no instance needed
    for fine in (MAIL_RECIPIENT, "ada@münchen.de", "first.last+tag@example.org"):
        assert mailer.address_problem(fine) is None, fine
    assert "expected name@domain" in (mailer.address_problem("no-at-sign") or "")
    assert target.calls() == calls
