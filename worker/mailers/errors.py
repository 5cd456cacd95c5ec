"""What can go wrong when handing a message to the provider, and what the caller does about it.

Every mailer turns its provider's failures into exactly one of these kinds, so the delivery
code decides by kind, never by provider-specific codes:

=================  ==============================================  =========================
kind               examples                                        delivery action
=================  ==============================================  =========================
transient          5xx, connection refused before the request      retry later (``pending``)
throttled          TooManyRequests / Throttling                    retry later, slow the bucket
permanent          MessageRejected, bad parameter, not verified,   ``failed`` with the reason
                   over the size limit (refused before the call)
account            sending paused, account suspended, daily quota  stop the run, rest pending
ambiguous          timeout or disconnect after the request left    ``unknown``, never retried
=================  ==============================================  =========================

``str(error)`` is the provider's reason: it may name addresses, never a body or a secret.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class DeliveryAction(StrEnum):
    RETRY = "retry"  # back to pending, scheduled later
    FAIL = "fail"  # failed, with the reason
    STOP_RUN = "stop_run"  # the provider refuses all mail: stop, leave the rest pending
    MARK_UNKNOWN = "unknown"  # it may have been sent: the operator decides


class MailerError(Exception):
    """Base of every mailer failure; ``reason`` is what the delivery records."""

    kind: ClassVar[str] = "error"
    action: ClassVar[DeliveryAction] = DeliveryAction.FAIL

    def __init__(self, reason: str, *, code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code  # the provider's error code, when it gave one

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, code={self.code!r})"


class TransientError(MailerError):
    """Not sent this time; the same message may succeed later."""

    kind = "transient"
    action = DeliveryAction.RETRY

    def __init__(
        self, reason: str, *, code: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(reason, code=code)
        self.retry_after = retry_after  # seconds, when the provider said how long to wait


class ThrottledError(TransientError):
    """The provider's rate limit: retry later and slow the shared token bucket too."""

    kind = "throttled"


class PermanentError(MailerError):
    """This message will never be accepted as it is."""

    kind = "permanent"
    action = DeliveryAction.FAIL


class MessageTooLarge(PermanentError):
    """Raised before any call when the raw message exceeds ``ses_max_message_bytes``."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"message is {size} bytes, over the provider's limit of {limit} bytes",
            code="MessageTooLarge",
        )
        self.size = size
        self.limit = limit


class InvalidMessage(PermanentError):
    """The message itself is malformed (no recipient, a header-breaking address, no body)."""


class AccountError(MailerError):
    """The provider refuses to send anything for now (or the mailer is misconfigured)."""

    kind = "account"
    action = DeliveryAction.STOP_RUN


class AmbiguousError(MailerError):
    """The request left and no answer came back: the message may have been sent."""

    kind = "ambiguous"
    action = DeliveryAction.MARK_UNKNOWN
