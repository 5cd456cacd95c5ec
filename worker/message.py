"""The outgoing email as rendering produces it and every mailer consumes it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from worker.errors import InvalidInput


@dataclass(frozen=True)
class OutgoingMessage:
    sender: str  # bare address of the From header, used as the envelope sender
    recipient: str  # bare address of the To header
    subject: str
    message_id: str  # the Message-ID header value, angle brackets included
    raw: bytes  # the complete RFC 5322 message (CRLF line endings)
    html: str = ""  # the HTML part, for previews and "view in browser"
    text: str = ""  # the plain-text part
    # Provider tags (SES EmailTags): e.g. {"delivery_id": "42", "edition": "2026-11-27"}
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.raw)


# The one definition of an address papermail can put in a header and an envelope. Messages
# are built as RFC 5322 (ASCII headers, no RFC 6532), so the local part must be ASCII; an
# IDN domain is fine, it travels as punycode. The renderer (every email) and the mailers'
# ``address_problem`` (subscribe, import, send time) both use it, so they cannot disagree.
_BREAKERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")
_DOMAIN = re.compile(r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$")


def bare_address(addr: str) -> str:
    """An ASCII ``local@domain`` for a header, or InvalidInput (never a second header)."""
    if not isinstance(addr, str) or _BREAKERS.search(addr) or " " in addr.strip():
        raise InvalidInput(f"invalid email address {addr!r}: it contains spaces or line breaks")
    local, at, domain = addr.strip().rpartition("@")
    if not at or not local or not domain:
        raise InvalidInput(f"invalid email address {addr!r}: expected name@domain")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise InvalidInput(f"invalid email address {addr!r}: bad domain") from None
    if not _LOCAL.match(local):
        raise NonAsciiLocalPart(
            f"invalid email address {addr!r}: only ASCII before the @ can be sent (no SMTPUTF8)"
        )
    if not _DOMAIN.match(domain):
        raise InvalidInput(f"invalid email address {addr!r}: bad domain")
    return f"{local}@{domain}"


class NonAsciiLocalPart(InvalidInput):
    """The part before the @ is not plain ASCII: it would need SMTPUTF8 (RFC 6531/6532)."""
