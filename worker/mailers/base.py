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
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar

from worker.config import Settings, get_settings
from worker.mailers.errors import InvalidMessage, MessageTooLarge
from worker.message import OutgoingMessage

# Characters that must never appear in an envelope address: they would break the
# provider's request or, in SMTP, start a new command.
_FORBIDDEN_IN_ADDRESS = frozenset("\r\n\t <>,;\x00")


@dataclass(frozen=True, slots=True)
class SendResult:
    message_id: str  # the provider's id (SES MessageId; the Message-ID header for the outbox)


class Mailer(ABC):
    """Send one message; thread-safe; raise a :class:`MailerError` kind on failure."""

    name: ClassVar[str]

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


def create_mailer(settings: Settings | None = None) -> Mailer:
    """A new mailer of the kind ``settings.mailer`` names (the caller owns and closes it)."""
    settings = settings or get_settings()
    # Imported here so the outbox (the embedded default) never loads boto3.
    if settings.mailer == "outbox":
        from worker.mailers.outbox import OutboxMailer

        return OutboxMailer(settings)
    if settings.mailer == "ses":
        from worker.mailers.ses import SesMailer

        return SesMailer(settings)
    if settings.mailer == "smtp":
        from worker.mailers.smtp import SmtpMailer

        return SmtpMailer(settings)
    raise ValueError(f"unknown mailer {settings.mailer!r}")  # Settings' Literal prevents this


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
