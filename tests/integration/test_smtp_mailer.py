"""SMTP mailer against a real SMTP server (aiosmtpd) on a free port."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from worker import config
from worker.mailers.errors import (
    AccountError,
    AmbiguousError,
    MailerError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from worker.mailers.smtp import SmtpMailer, dot_stuff

from .conftest import SmtpServer, SmtpSink, build_message, free_port, write_self_signed_cert

Settings = config.Settings


@pytest.fixture
def smtp_for(mailer_env: Callable[..., Settings]) -> Iterator[Callable[..., SmtpMailer]]:
    made: list[SmtpMailer] = []

    def make(
        host: str, port: int, ssl_context: ssl.SSLContext | None = None, **values: object
    ) -> SmtpMailer:
        values.setdefault("SMTP_STARTTLS", "false")
        mailer = SmtpMailer(
            mailer_env("smtp", SMTP_HOST=host, SMTP_PORT=port, **values), ssl_context=ssl_context
        )
        made.append(mailer)
        return mailer

    yield make
    for mailer in made:
        mailer.close()


def test_one_connection_is_reused_for_many_messages(
    smtp_server: SmtpServer, smtp_for: Callable[..., SmtpMailer]
) -> None:
    mailer = smtp_for(smtp_server.host, smtp_server.port)
    messages = [build_message(body=f"n{i}") for i in range(5)]

    ids = [mailer.send(m).message_id for m in messages]

    assert ids == [m.message_id for m in messages]  # plain SMTP: the Message-ID header
    assert smtp_server.sink.sessions == 1
    assert [m.raw for m in smtp_server.sink.messages] == [m.raw for m in messages]
    assert all(m.recipients == [messages[0].recipient] for m in smtp_server.sink.messages)


def test_each_thread_has_its_own_connection(
    smtp_server: SmtpServer, smtp_for: Callable[..., SmtpMailer]
) -> None:
    mailer = smtp_for(smtp_server.host, smtp_server.port)

    def work(i: int) -> None:
        for j in range(3):
            mailer.send(build_message(body=f"thread {i} message {j}"))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(smtp_server.sink.messages) == 12
    assert smtp_server.sink.sessions == 4


def test_ses_style_reply_gives_the_provider_id(
    smtp_server: SmtpServer, smtp_for: Callable[..., SmtpMailer]
) -> None:
    smtp_server.sink.data_replies.append("250 Ok 0100018b2c6e-5f1a-4c1e-9d1e-000000")

    result = smtp_for(smtp_server.host, smtp_server.port).send(build_message())

    assert result.message_id == "0100018b2c6e-5f1a-4c1e-9d1e-000000"


@pytest.mark.parametrize(
    ("where", "reply", "kind"),
    [
        ("rcpt", "451 4.3.0 Try again later", TransientError),
        ("rcpt", "550 5.1.1 No such user", PermanentError),
        ("data", "452 4.3.1 Insufficient system storage", TransientError),
        ("data", "554 Message rejected: Email address is not verified.", PermanentError),
        ("data", "454 Throttling failure: Maximum sending rate exceeded.", ThrottledError),
        ("data", "454 Throttling failure: Daily message quota exceeded.", AccountError),
        ("data", "554 Sending paused for this account.", AccountError),
    ],
)
def test_error_replies_map_to_kinds_and_the_connection_survives(
    smtp_server: SmtpServer,
    smtp_for: Callable[..., SmtpMailer],
    where: str,
    reply: str,
    kind: type[MailerError],
) -> None:
    sink = smtp_server.sink
    (sink.rcpt_replies if where == "rcpt" else sink.data_replies).append(reply)
    mailer = smtp_for(smtp_server.host, smtp_server.port)
    message = build_message(body="refused one")

    with pytest.raises(MailerError) as caught:
        mailer.send(message)

    assert type(caught.value) is kind
    assert caught.value.code == reply[:3]
    assert reply[4:] in caught.value.reason
    assert sink.copies(message.raw) == 0
    # RSET left the session clean: the next message goes through the same connection.
    mailer.send(build_message(body="next one"))
    assert len(sink.messages) == 1
    assert sink.sessions == 1


def test_disconnect_after_data_is_ambiguous_never_resent(
    smtp_server: SmtpServer, smtp_for: Callable[..., SmtpMailer]
) -> None:
    smtp_server.sink.data_replies.append("DROP")
    mailer = smtp_for(smtp_server.host, smtp_server.port)
    message = build_message()

    with pytest.raises(AmbiguousError):
        mailer.send(message)

    assert smtp_server.sink.copies(message.raw) == 1
    # A new connection is opened for the next message; the first is not sent again.
    mailer.send(build_message(body="next"))
    assert smtp_server.sink.copies(message.raw) == 1
    assert smtp_server.sink.sessions == 2


def test_timeout_after_data_is_ambiguous(
    smtp_server: SmtpServer, smtp_for: Callable[..., SmtpMailer]
) -> None:
    smtp_server.sink.data_replies.append("SLOW:1.0")
    mailer = smtp_for(smtp_server.host, smtp_server.port, SEND_TIMEOUT_SECONDS="0.3")
    message = build_message()

    with pytest.raises(AmbiguousError):
        mailer.send(message)

    time.sleep(0.8)
    assert smtp_server.sink.copies(message.raw) == 1


def test_connection_refused_is_transient(smtp_for: Callable[..., SmtpMailer]) -> None:
    mailer = smtp_for("127.0.0.1", free_port())  # nothing listens there

    with pytest.raises(TransientError) as caught:
        mailer.send(build_message())

    assert type(caught.value) is TransientError
    assert caught.value.code == "ConnectFailed"


def test_stale_connection_is_replaced_without_loss_or_duplicate(
    smtp_server: SmtpServer, smtp_for: Callable[..., SmtpMailer]
) -> None:
    mailer = smtp_for(smtp_server.host, smtp_server.port)
    mailer.send(build_message(body="before the restart"))
    from aiosmtpd.controller import Controller

    smtp_server.controller.stop()  # drops the idle connection the mailer keeps
    smtp_server.controller = Controller(
        smtp_server.sink, hostname="127.0.0.1", port=smtp_server.port
    )
    smtp_server.controller.start()
    message = build_message(body="after the restart")

    mailer.send(message)

    assert smtp_server.sink.copies(message.raw) == 1
    assert smtp_server.sink.sessions == 2


def test_starttls_required_but_not_offered_stops_the_run(
    smtp_server: SmtpServer, smtp_for: Callable[..., SmtpMailer]
) -> None:
    mailer = smtp_for(smtp_server.host, smtp_server.port, SMTP_STARTTLS="true")

    with pytest.raises(AccountError, match="STARTTLS"):
        mailer.send(build_message())

    assert smtp_server.sink.messages == []


@pytest.fixture
def tls_smtp_server(tmp_path: Path) -> Iterator[tuple[SmtpServer, ssl.SSLContext]]:
    """aiosmtpd requiring STARTTLS and AUTH (user "papermail", password "hunter2-long")."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    cert, key = write_self_signed_cert(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        ok = data.login == b"papermail" and data.password == b"hunter2-long"
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535

    sink = SmtpSink()
    controller = Controller(
        sink,
        hostname="127.0.0.1",
        port=free_port(),
        tls_context=server_ctx,
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
    )
    controller.start()
    try:
        yield SmtpServer("127.0.0.1", controller.port, sink, controller), client_ctx
    finally:
        controller.stop()


def test_starttls_and_login(
    tls_smtp_server: tuple[SmtpServer, ssl.SSLContext], smtp_for: Callable[..., SmtpMailer]
) -> None:
    server, client_ctx = tls_smtp_server
    mailer = smtp_for(
        server.host,
        server.port,
        ssl_context=client_ctx,
        SMTP_STARTTLS="true",
        SMTP_USERNAME="papermail",
        SMTP_PASSWORD="hunter2-long",
    )
    message = build_message()

    mailer.send(message)

    assert server.sink.copies(message.raw) == 1


def test_wrong_password_stops_the_run(
    tls_smtp_server: tuple[SmtpServer, ssl.SSLContext], smtp_for: Callable[..., SmtpMailer]
) -> None:
    server, client_ctx = tls_smtp_server
    mailer = smtp_for(
        server.host,
        server.port,
        ssl_context=client_ctx,
        SMTP_STARTTLS="true",
        SMTP_USERNAME="papermail",
        SMTP_PASSWORD="wrong-password",
    )

    with pytest.raises(AccountError) as caught:
        mailer.send(build_message())

    assert "wrong-password" not in str(caught.value)
    assert server.sink.messages == []


def test_untrusted_certificate_is_not_accepted(
    tls_smtp_server: tuple[SmtpServer, ssl.SSLContext], smtp_for: Callable[..., SmtpMailer]
) -> None:
    server, _ = tls_smtp_server
    mailer = smtp_for(server.host, server.port, SMTP_STARTTLS="true")  # system CAs only

    with pytest.raises(TransientError):
        mailer.send(build_message())

    assert server.sink.messages == []


def test_dot_stuffing() -> None:
    assert dot_stuff(b"a\r\n.b\r\n..c\r\n") == b"a\r\n..b\r\n...c\r\n.\r\n"
    assert dot_stuff(b"no final newline") == b"no final newline\r\n.\r\n"


def test_the_send_threads_reuse_their_connections_across_batches(
    smtp_server: SmtpServer, smtp_for: Callable[..., SmtpMailer]
) -> None:
    """Concurrent sending (worker.delivery): one connection per sending thread, kept for
    every later batch and chunk, never one per email."""
    from worker import delivery

    mailer = smtp_for(smtp_server.host, smtp_server.port)
    for batch in range(5):
        items = []
        for i in range(4):
            message = build_message(body=f"batch {batch} message {i}")
            items.append(delivery._Ready(batch * 4 + i, message))
        attempt = delivery._Attempt("send", datetime(2031, 3, 14, tzinfo=UTC))
        results = delivery._start_sends(mailer, items, 4, attempt).results()
        assert not [r for r in results if isinstance(r, MailerError)]

    assert len(smtp_server.sink.messages) == 20
    assert smtp_server.sink.sessions <= 4  # at most one per sending thread, not 20
