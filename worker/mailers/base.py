"""The one Mailer interface, and the per-process mailer chosen by ``PAPERMAIL_MAILER``.

A mailer hands one finished :class:`~worker.message.OutgoingMessage` to the provider and
returns the provider's message id, or raises one of the kinds in
:mod:`worker.mailers.errors`. It never retries a send by itself: the delivery layer owns
retries, because only it knows whether a message may safely go out again.

Each process has one mailer (``get_mailer()``), created on first use and shared by that
process's threads; a forked child (Celery prefork) forgets its parent's and builds its own,
so no socket or TLS session is ever shared across processes.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar

from worker.config import Settings, get_settings
from worker.errors import InvalidInput
from worker.mailers.errors import InvalidMessage, MessageTooLarge
from worker.message import NonAsciiLocalPart, OutgoingMessage, bare_address

# Characters that must never appear in an envelope address: they would break the
# provider's request or, in SMTP, start a new command.
_FORBIDDEN_IN_ADDRESS = frozenset("\r\n\t <>,;\x00")


@dataclass(frozen=True, slots=True)
class SendResult:
    message_id: str  # the provider's id (SES MessageId; the Message-ID header for the outbox)


@dataclass(frozen=True)
class AccountInfo:
    """What the provider says about the account: may it send, how fast, how much today.

    ``None`` means the provider does not say (an SMTP relay has no quota it reports; the
    outbox has no limit at all). ``problems`` are the provider's own answers that stop
    sending, each with what to do; ``warnings`` are those that only limit it.
    """

    mailer: str
    sending_enabled: bool | None = True  # None: the provider does not say
    production_access: bool | None = None  # SES: False while the account is in the sandbox
    max_send_rate: float | None = None  # emails per second
    max_24h_send: float | None = None  # emails per rolling 24 hours
    sent_last_24h: float | None = None
    enforcement_status: str | None = None  # SES: HEALTHY | PROBATION | SHUTDOWN
    source: str = ""  # the call (or check) the figures come from
    details: dict[str, str] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def remaining_24h(self) -> float | None:
        """Emails the 24-hour quota still allows, or None when there is no known quota."""
        if self.max_24h_send is None or self.max_24h_send < 0:  # SES: -1 is unlimited
            return None
        return max(0.0, self.max_24h_send - (self.sent_last_24h or 0.0))

    def as_dict(self) -> dict[str, Any]:
        return {
            "mailer": self.mailer,
            "source": self.source,
            "sending_enabled": self.sending_enabled,
            "production_access": self.production_access,
            "max_send_rate": self.max_send_rate,
            "max_24h_send": self.max_24h_send,
            "sent_last_24h": self.sent_last_24h,
            "remaining_24h": self.remaining_24h,
            "enforcement_status": self.enforcement_status,
            "details": dict(self.details),
            "problems": list(self.problems),
            "warnings": list(self.warnings),
        }


class Mailer(ABC):
    """Send one message; thread-safe; raise a :class:`MailerError` kind on failure."""

    name: ClassVar[str]
    # Whether ``account()`` reports a 24-hour quota (asked before each edition if so).
    reports_quota: ClassVar[bool] = False
    # Why this mailer cannot deliver to an address with a non-ASCII local part
    # (``tést@example.com``, which needs SMTPUTF8 and RFC 6532 UTF-8 headers).
    non_ascii_local_part: ClassVar[str] = (
        "papermail builds RFC 5322 messages with ASCII headers, so only ASCII can stand "
        "before the @"
    )

    @classmethod
    def address_problem(cls, email: str) -> str | None:
        """Why this mailer could never send to ``email``, in words, or None if it can.

        A class method: subscribe, import and add ask it of the configured mailer's class
        without opening a connection; the delivery asks it again before rendering, so rows
        stored before a check existed fail with this reason instead of stopping a chunk.
        """
        try:
            bare_address(email)
        except NonAsciiLocalPart:
            why = cls.non_ascii_local_part
            return f"cannot send to {email!r} with the {cls.name} mailer: {why}"
        except InvalidInput as exc:
            return str(exc)
        return None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.max_message_bytes = settings.ses_max_message_bytes

    def send(self, message: OutgoingMessage) -> SendResult:
        """Check the message (size first: nothing over the limit reaches the provider)."""
        check_message(message, self.max_message_bytes)
        return self._send(message)

    @abstractmethod
    def _send(self, message: OutgoingMessage) -> SendResult:
        """Deliver a message that passed :func:`check_message`."""

    @abstractmethod
    def account(self) -> AccountInfo:
        """Ask the provider about the account (one small call, never a message).

        Raises a :class:`MailerError` kind when the provider cannot be asked (unreachable,
        credentials refused); its reason says what happened.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most mailers hold nothing
        """Release connections; the mailer must not be used afterwards."""

    def __enter__(self) -> Mailer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_address(what: str, address: str) -> None:
    if not address or "@" not in address or any(c in _FORBIDDEN_IN_ADDRESS for c in address):
        # The address is the caller's data, not a secret: name it so the operator can fix it.
        raise InvalidMessage(f"invalid {what} address {address!r}: expected a bare user@domain")


def check_message(message: OutgoingMessage, max_bytes: int) -> None:
    """Refuse, before any network call, a message no provider would accept."""
    size = len(message.raw)
    if size > max_bytes:
        raise MessageTooLarge(size, max_bytes)
    if not size:
        raise InvalidMessage("the message has no content (raw is empty)")
    _check_address("sender", message.sender)
    _check_address("recipient", message.recipient)
    if not message.message_id.strip("<> "):
        raise InvalidMessage("the message has no Message-ID")


def mailer_class(settings: Settings | None = None) -> type[Mailer]:
    """The class of the mailer ``settings.mailer`` names (nothing is connected)."""
    settings = settings or get_settings()
    # Imported here so the outbox (the embedded default) never loads boto3.
    if settings.mailer == "outbox":
        from worker.mailers.outbox import OutboxMailer

        return OutboxMailer
    if settings.mailer == "ses":
        from worker.mailers.ses import SesMailer

        return SesMailer
    if settings.mailer == "smtp":
        from worker.mailers.smtp import SmtpMailer

        return SmtpMailer
    raise ValueError(f"unknown mailer {settings.mailer!r}")  # Settings' Literal prevents this


def create_mailer(settings: Settings | None = None) -> Mailer:
    """A new mailer of the kind ``settings.mailer`` names (the caller owns and closes it)."""
    settings = settings or get_settings()
    return mailer_class(settings)(settings)


def address_problem(email: str, settings: Settings | None = None) -> str | None:
    """Why the configured mailer could never send to ``email``, or None."""
    return mailer_class(settings).address_problem(email)


_lock = threading.Lock()
_instance: Mailer | None = None
_instance_settings: Settings | None = None


def get_mailer(settings: Settings | None = None) -> Mailer:
    """This process's mailer, created on first use; rebuilt if the settings changed."""
    global _instance, _instance_settings
    settings = settings or get_settings()
    current, built_for = _instance, _instance_settings
    if current is not None and (built_for is settings or built_for == settings):
        return current
    with _lock:
        if _instance is not None and (
            _instance_settings is settings or _instance_settings == settings
        ):
            return _instance
        old = _instance
        _instance = create_mailer(settings)
        _instance_settings = settings
        new = _instance
    if old is not None:
        old.close()
    return new


def reset_mailer() -> None:
    """Close and forget this process's mailer (tests; after changing settings)."""
    global _instance, _instance_settings
    with _lock:
        old, _instance, _instance_settings = _instance, None, None
    if old is not None:
        old.close()


def _forget_after_fork() -> None:
    # In the child: drop the parent's mailer WITHOUT closing it (closing would send QUIT or
    # shut sockets the parent still uses), and replace a lock another thread may have held.
    global _instance, _instance_settings, _lock
    _instance = None
    _instance_settings = None
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
