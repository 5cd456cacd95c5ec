"""SMTP mailer (any relay; SES speaks SMTP too): one connection per thread, reused.

The transaction is driven step by step (MAIL, RCPT, DATA, body) rather than through
``smtplib.sendmail`` so that a failure can be placed exactly: anything before the server
answered 354 to DATA means the message was not sent (retry, or reconnect once when a reused
connection turned out stale); a disconnect or timeout once the body is on the wire means
it may have been sent (ambiguous, never retried).
"""

from __future__ import annotations

import contextlib
import logging
import re
import smtplib
import ssl
import threading

from worker.config import Settings
from worker.mailers.base import AccountInfo, Mailer, SendResult
from worker.mailers.errors import (
    AccountError,
    AmbiguousError,
    InvalidMessage,
    MailerError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from worker.message import OutgoingMessage

log = logging.getLogger(__name__)

_DOT_AT_LINE_START = re.compile(rb"(?m)^\.")
# SES answers DATA with "250 Ok <SES message id>"; that id is what its events carry.
_SES_REPLY_ID = re.compile(r"^ok\s+(\S+)$", re.IGNORECASE)
_ACCOUNT_PHRASES = ("daily message quota", "sending paused", "account suspended")
_THROTTLE_PHRASES = ("throttl", "maximum sending rate")


class _EnvelopeFailed(Exception):
    """The connection failed before the body was sent: nothing went out."""


def classify_reply(code: int, reply: bytes | str, step: str) -> MailerError:
    """An SMTP error reply -> error kind (4xx transient, 5xx permanent, SES phrases first)."""
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    reason = f"SMTP {code} at {step}: {' '.join(text.split())}"
    lowered = text.lower()
    if any(phrase in lowered for phrase in _ACCOUNT_PHRASES):
        return AccountError(reason, code=str(code))
    if any(phrase in lowered for phrase in _THROTTLE_PHRASES):
        return ThrottledError(reason, code=str(code))
    if 400 <= code < 500:
        return TransientError(reason, code=str(code))
    return PermanentError(reason, code=str(code))


def dot_stuff(raw: bytes) -> bytes:
    """The DATA payload: leading dots doubled, CRLF-terminated, then the lone dot."""
    payload = _DOT_AT_LINE_START.sub(b"..", raw)
    if not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    return payload + b".\r\n"


class SmtpMailer(Mailer):
    name = "smtp"
    # The transaction would pass SMTPUTF8 to a server that offers it, but the messages
    # papermail renders carry ASCII (RFC 5322) headers, and whether a relay offers
    # SMTPUTF8 is unknown when someone subscribes: refuse such addresses up front.
    non_ascii_local_part = (
        "papermail's SMTP mailer sends RFC 5322 messages with ASCII headers (no SMTPUTF8), "
        "so only ASCII can stand before the @"
    )

    def __init__(self, settings: Settings, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(settings)
        self.host = settings.smtp_host
        self.port = settings.smtp_port
        self.username = settings.smtp_username
        self.password = settings.smtp_password or ""
        self.starttls = settings.smtp_starttls
        self.timeout = settings.send_timeout_seconds
        self.ssl_context = ssl_context
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open_connections: set[smtplib.SMTP] = set()

    # -- connections -----------------------------------------------------------------

    def _connect(self) -> smtplib.SMTP:
        where = f"{self.host}:{self.port}"
        try:
            conn = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        except smtplib.SMTPConnectError as exc:  # the greeting was not 220
            raise classify_reply(exc.smtp_code, exc.smtp_error, "connect") from exc
        except (OSError, smtplib.SMTPException) as exc:  # refused, unreachable, timeout
            raise TransientError(
                f"could not connect to SMTP server {where}: {exc}", code="ConnectFailed"
            ) from exc
        try:
            conn.ehlo()
            if self.starttls:
                if not conn.has_extn("starttls"):
                    # Never fall back to plain text: credentials and mail would travel in clear.
                    raise AccountError(
                        f"SMTP server {where} does not offer STARTTLS and "
                        "PAPERMAIL_SMTP_STARTTLS is on",
                        code="NoStartTLS",
                    )
                conn.starttls(context=self.ssl_context or ssl.create_default_context())
                conn.ehlo()
            if self.username:
                conn.login(self.username, self.password)
        except MailerError:
            _quietly_close(conn)
            raise
        except smtplib.SMTPAuthenticationError as exc:
            _quietly_close(conn)
            raise AccountError(
                f"SMTP login refused by {where}: {exc.smtp_code}", code=str(exc.smtp_code)
            ) from exc
        except smtplib.SMTPNotSupportedError as exc:
            _quietly_close(conn)
            raise AccountError(f"SMTP server {where}: {exc}", code="NotSupported") from exc
        except smtplib.SMTPResponseException as exc:
            _quietly_close(conn)
            raise classify_reply(exc.smtp_code, exc.smtp_error, "session setup") from exc
        except (OSError, smtplib.SMTPException) as exc:  # TLS failure, disconnect
            _quietly_close(conn)
            raise TransientError(
                f"SMTP session setup with {where} failed: {exc}", code="SetupFailed"
            ) from exc
        with self._lock:
            self._open_connections.add(conn)
        return conn

    def _discard(self, conn: smtplib.SMTP) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            self._open_connections.discard(conn)
        _quietly_close(conn)

    def close(self) -> None:
        with self._lock:
            connections, self._open_connections = self._open_connections, set()
        for conn in connections:
            with contextlib.suppress(Exception):
                conn.quit()
            _quietly_close(conn)
        self._local = threading.local()

    def account(self) -> AccountInfo:
        """Connect, EHLO (STARTTLS and login as configured), NOOP, QUIT: a relay reports no
        quota or rate, only whether it takes a session."""
        conn = self._connect()  # raises the error kind, with the reason, when it cannot
        try:
            code, reply = conn.noop()
            if code != 250:
                raise classify_reply(code, reply, "NOOP")
            details = {
                "server": f"{self.host}:{self.port}",
                "starttls": "yes" if self.starttls else "no",
                "login": "yes" if self.username else "no",
            }
            size = (conn.esmtp_features.get("size") or "").strip()
            if size.isdigit() and int(size):
                details["max_message_bytes"] = size
            return AccountInfo(
                mailer=self.name, source="SMTP EHLO + NOOP", details=details, sending_enabled=True
            )
        except (OSError, smtplib.SMTPException) as exc:
            raise TransientError(
                f"SMTP server {self.host}:{self.port} dropped the session: {exc}",
                code="Disconnected",
            ) from exc
        finally:
            with contextlib.suppress(Exception):
                conn.quit()
            self._discard(conn)

    # -- sending ---------------------------------------------------------------------

    def _send(self, message: OutgoingMessage) -> SendResult:
        conn: smtplib.SMTP | None = getattr(self._local, "conn", None)
        reused = conn is not None
        if conn is None:
            conn = self._local.conn = self._connect()
        try:
            return self._transaction(conn, message)
        except _EnvelopeFailed as exc:
            self._discard(conn)
            if not reused:
                raise TransientError(
                    f"SMTP connection lost before DATA: {exc.__cause__ or exc}",
                    code="Disconnected",
                ) from exc
        # The server had dropped an idle connection; nothing was sent, so one fresh try.
        conn = self._local.conn = self._connect()
        try:
            return self._transaction(conn, message)
        except _EnvelopeFailed as exc:
            self._discard(conn)
            raise TransientError(
                f"SMTP connection lost before DATA: {exc.__cause__ or exc}", code="Disconnected"
            ) from exc

    def _mail_options(self, conn: smtplib.SMTP, message: OutgoingMessage) -> list[str]:
        options = []
        if not (message.sender.isascii() and message.recipient.isascii()):
            if not conn.has_extn("smtputf8"):
                raise InvalidMessage(
                    "non-ASCII address and the SMTP server does not support SMTPUTF8"
                )
            options.append("SMTPUTF8")
        if not message.raw.isascii() and conn.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        return options

    def _refuse(self, conn: smtplib.SMTP, code: int, reply: bytes, step: str) -> MailerError:
        error = classify_reply(code, reply, step)
        if code == 421:  # the server is closing the session
            self._discard(conn)
        else:
            try:
                conn.rset()  # leave the connection clean for the next message
            except (OSError, smtplib.SMTPException):
                self._discard(conn)
        log.warning("SMTP refused a message: %s [%s]", error.reason, error.kind)
        return error

    def _transaction(self, conn: smtplib.SMTP, message: OutgoingMessage) -> SendResult:
        options = self._mail_options(conn, message)
        try:
            code, reply = conn.mail(message.sender, options)
            if code != 250:
                raise self._refuse(conn, code, reply, "MAIL FROM")
            code, reply = conn.rcpt(message.recipient)
            if code not in (250, 251):
                raise self._refuse(conn, code, reply, "RCPT TO")
            conn.putcmd("data")
            code, reply = conn.getreply()
            if code != 354:
                raise self._refuse(conn, code, reply, "DATA")
        except (OSError, smtplib.SMTPServerDisconnected) as exc:
            raise _EnvelopeFailed(str(exc)) from exc
        # From here on the body is on the wire: a lost answer means it may have been sent.
        try:
            conn.send(dot_stuff(message.raw))
            code, reply = conn.getreply()
        except (OSError, smtplib.SMTPServerDisconnected) as exc:
            self._discard(conn)
            raise AmbiguousError(
                f"SMTP connection lost after the message was sent: {exc}",
                code="DisconnectedAfterData",
            ) from exc
        if code != 250:
            raise self._refuse(conn, code, reply, "end of DATA")
        text = reply.decode("utf-8", "replace").strip()
        match = _SES_REPLY_ID.match(text)
        return SendResult(match.group(1) if match else message.message_id)


def _quietly_close(conn: smtplib.SMTP) -> None:
    with contextlib.suppress(Exception):
        conn.close()
