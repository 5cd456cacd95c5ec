"""The outgoing email as rendering produces it and every mailer consumes it."""

from __future__ import annotations

from dataclasses import dataclass, field


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
