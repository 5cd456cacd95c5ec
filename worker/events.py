"""Provider notifications -> delivery and subscriber state, suppression, reputation guard.

SES reports what became of each message in two shapes: identity notifications
(``notificationType``) and configuration-set events (``eventType``). Both carry ``mail``
(with the SES ``messageId`` the mailer recorded as ``Delivery.message_id``) and one detail
object (``bounce``, ``complaint``, ``delivery``, ...). They arrive through the SNS webhook,
an SQS queue, or a file (``papermail events apply``); every way in ends in
:func:`apply_batch` (the webhook with a batch of one per request, SQS with what one receive
brought, a file 500 at a time), whose outcome is by construction that of applying the
same notifications one by one, in order (tests/unit/test_events_batch.py).

Scope: a notification names one message (``mail.messageId``, matched to the delivery it was
recorded on or to an earlier attempt of it), and every papermail message goes to one
subscriber. It acts on that delivery and that subscriber only, and only when its listed
addresses (the bounced / complained / delivered recipients, else ``mail.destination``)
include theirs, compared case-insensitively with the domain in ASCII; one that lists no
address is about the message as a whole. Every other listed address is recorded, never
acted on: in the stored event, in the result's changes ("ignored: not a recipient of
message X") and, for a subscriber of ours, in their log (``event_ignored``). A
notification about our message that lists none of its recipient's addresses is stored
unlinked (no delivery, so it counts in no rate) and changes nothing.

Policy (settings, defaults in worker/config.py), for the delivery's recipient:

- Permanent bounce -> subscriber ``bounced`` (suppressed), delivery ``bounced``;
  ``OnAccountSuppressionList`` is a permanent bounce, reason recorded as such.
- Transient / Undetermined bounce -> delivery ``bounced``, subscriber's
  ``soft_bounce_count`` + 1; at ``soft_bounce_limit`` (3) in a row -> ``bounced``.
- Complaint -> subscriber ``complained`` (suppressed), delivery ``complained``.
- Delivery -> delivery ``delivered`` (only from ``sent``: never downgrades a bounce or a
  complaint) and the soft-bounce count restarts at 0; it never revives an address.
- Reject -> delivery ``failed`` with SES's reason.
- DeliveryDelay, Send -> stored only. Open, Click, Rendering Failure, Subscription and
  anything else -> stored, ``ignored``.

Every event is stored raw in ``provider_events`` and deduplicated by the SNS MessageId
(``sha256:<hex>`` of the canonical JSON when there is none): a repeat changes nothing.
A received mail to the List-Unsubscribe mailto unsubscribes whoever its signed token
names, whatever addresses the mail carries.

SQS: with ``sqs_verify_signatures`` on, every body must be an SNS envelope that verifies
as the webhook's does (worker/sns.py), up to 14 days old; anything else stays in the queue
for its dead-letter queue (see :func:`poll_sqs`).

Reputation guard: when an edition's bounce rate (hard bounces / accepted deliveries, as
SES counts it: soft bounces and account-suppression-list bounces do not count) passes
``bounce_rate_limit`` (5%) or its complaint rate passes ``complaint_rate_limit`` (0.1%),
with at least ``reputation_min_sample`` (200) accepted deliveries, sending pauses
(``papermail sending status`` / ``resume``). It trips once per edition: after the
operator resumes, later events of that edition do not pause again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from email.utils import parseaddr
from typing import IO, Any
from urllib.parse import urlsplit

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker import event_rows as rows
from worker import sns
from worker.config import Settings, get_settings
from worker.db import session_scope
from worker.delivery import pause_sending, sending_paused
from worker.errors import InvalidInput
from worker.event_rows import DeliveryRow, SubscriberRow
from worker.models import (
    ACCEPTED_DELIVERY_STATES,
    ControlFlag,
    Delivery,
    DeliveryState,
    ProviderEvent,
    SubscriberStatus,
    utcnow,
)
from worker.untrusted import MAX_JSON_DEPTH, json_depth, loads_json

log = logging.getLogger(__name__)

ACTOR = "ses"
GUARD_FLAG_PREFIX = "reputation_guard:"

# Types whose effect depends on finding the delivery: an unknown message id may just be a
# send whose commit is not visible yet, so a young one is retried rather than orphaned.
STATEFUL_TYPES = frozenset({"Bounce", "Complaint", "Delivery", "Reject"})
STORED_ONLY_TYPES = frozenset({"DeliveryDelay", "Send"})
MAIL_TYPES = STATEFUL_TYPES | STORED_ONLY_TYPES
DETAIL_KEYS = {
    "Bounce": "bounce",
    "Complaint": "complaint",
    "Delivery": "delivery",
    "Reject": "reject",
    "DeliveryDelay": "deliveryDelay",
    "Send": "send",
}
BOUNCE_TYPES = ("Permanent", "Transient", "Undetermined")
ACCOUNT_SUPPRESSION = "OnAccountSuppressionList"

# Where a delivery may move to, from where: never "down" from bounced/complained.
_AFTER_SEND = (DeliveryState.SENDING, DeliveryState.SENT, DeliveryState.UNKNOWN)
_DELIVERY_FROM: dict[str, tuple[str, ...]] = {
    DeliveryState.DELIVERED: (DeliveryState.SENT,),
    DeliveryState.BOUNCED: (*_AFTER_SEND, DeliveryState.DELIVERED),
    DeliveryState.COMPLAINED: (*_AFTER_SEND, DeliveryState.DELIVERED, DeliveryState.BOUNCED),
    DeliveryState.FAILED: _AFTER_SEND,
}
_BOUNCEABLE = (SubscriberStatus.PENDING, SubscriberStatus.ACTIVE, SubscriberStatus.PAUSED)


class RetryLater(Exception):
    """The notification names a message not (yet) known: answer 5xx / leave it queued."""


class InvalidNotification(InvalidInput):
    """Malformed notification(s); ``problems`` name each index and field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(
            f"invalid notification input ({len(problems)} {noun}; nothing applied):\n  "
            + "\n  ".join(shown)
            + more
        )


@dataclass
class ApplyResult:
    status: str  # applied | duplicate | orphan | ignored
    event_type: str
    dedupe_key: str
    delivery_id: int | None = None
    event_id: int | None = None
    changes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# Parsing and validation


def notification_type(notification: Mapping[str, Any]) -> str | None:
    value = notification.get("eventType", notification.get("notificationType"))
    return value if isinstance(value, str) else None


def _canonical(notification: Mapping[str, Any]) -> str:
    return json.dumps(notification, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _key_of(canonical: str) -> str:
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def content_key(notification: Mapping[str, Any]) -> str:
    """Dedupe key of a notification without an SNS MessageId: hash of canonical JSON."""
    return _key_of(_canonical(notification))


class Parsed(dict[str, Any]):
    """A notification read from JSON, carrying that JSON text (``json_text``: what SNS
    signed, or the canonical text its content key hashes), so storing it costs no second
    serialisation. Never changed after parsing; a plain dict works everywhere too."""

    __slots__ = ("json_text",)

    def __init__(self, values: Mapping[str, Any], json_text: str) -> None:
        super().__init__(values)
        self.json_text = json_text


# A bare dot-atom address, which parseaddr returns as it is (tests/unit/test_events_batch.py
# checks that on generated addresses): most of what SES lists, read without parseaddr.
_ATOM = "A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_BARE_ADDRESS = re.compile(rf"[{_ATOM}]+(?:\.[{_ATOM}]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


@functools.lru_cache(maxsize=65_536)  # parseaddr is slow, and a batch asks per address
def normalise_address(value: str) -> str:
    """Bare, lower-cased address (subscribers are stored lower-cased)."""
    if _BARE_ADDRESS.fullmatch(value):
        return value.lower()
    _, addr = parseaddr(value)
    return (addr or value).strip().lower()


def _idna(domain: str, *, to_ascii: bool) -> str:
    try:
        return domain.encode("idna").decode("ascii") if to_ascii else domain.encode().decode("idna")
    except UnicodeError:
        return domain


@functools.lru_cache(maxsize=65_536)
def address_key(value: str) -> str:
    """One form per mailbox for comparing addresses: bare, lower-cased, the domain in
    ASCII (SES reports ``ann@xn--bcher-kva.example`` for a subscriber stored as
    ``ann@bücher.example``)."""
    local, at, domain = normalise_address(value).rpartition("@")
    return f"{local}{at}{_idna(domain, to_ascii=True)}" if at else local


def _address_variants(value: str) -> list[str]:
    """The stored forms an address listed by SES may have (ASCII and Unicode domain)."""
    bare = normalise_address(value)
    local, at, domain = bare.rpartition("@")
    if not at:
        return [bare]
    forms = {bare, f"{local}@{_idna(domain, to_ascii=True)}"}
    forms.add(f"{local}@{_idna(domain, to_ascii=False)}")
    return sorted(forms)


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        return None
    return stamp.astimezone(UTC) if stamp.tzinfo else None


def _recipient_problems(detail: Mapping[str, Any], key: str, path: str) -> list[str]:
    items = detail.get(key)
    if not isinstance(items, list) or not items:
        return [f"field '{path}.{key}': expected a non-empty list of recipients"]
    problems = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("emailAddress"), str):
            problems.append(f"field '{path}.{key}[{i}].emailAddress': missing or not text")
        elif "@" not in item["emailAddress"]:
            problems.append(
                f"field '{path}.{key}[{i}].emailAddress': {item['emailAddress']!r} "
                "is not an address"
            )
    return problems


def validate_notification(notification: object) -> list[str]:
    """What is wrong with a notification (empty when it can be applied)."""
    if not isinstance(notification, dict):
        return [f"expected a JSON object, got {type(notification).__name__}"]
    for key in ("eventType", "notificationType"):
        if key in notification and not isinstance(notification[key], str):
            return [f"field '{key}': expected text"]
    kind = notification_type(notification)
    if not kind:
        return ["field 'eventType' (or 'notificationType'): missing"]
    if kind not in MAIL_TYPES:
        return []  # stored as ignored; SES adds event types over time
    problems: list[str] = []
    mail = notification.get("mail")
    if not isinstance(mail, dict):
        return ["field 'mail': missing or not an object"]
    if not isinstance(mail.get("messageId"), str) or not mail["messageId"]:
        problems.append("field 'mail.messageId': missing or not text")
    if "timestamp" in mail and _parse_time(mail["timestamp"]) is None:
        problems.append(f"field 'mail.timestamp': {mail['timestamp']!r} is not an ISO 8601 time")
    key = DETAIL_KEYS[kind]
    detail = notification.get(key)
    if kind == "Send" and detail is None:
        return problems  # some producers omit the empty "send" object
    if not isinstance(detail, dict):
        return [*problems, f"field '{key}': missing or not an object"]
    if kind == "Bounce":
        if detail.get("bounceType") not in BOUNCE_TYPES:
            problems.append(
                f"field 'bounce.bounceType': {detail.get('bounceType')!r} is not one of "
                + ", ".join(BOUNCE_TYPES)
            )
        if "bounceSubType" in detail and not isinstance(detail["bounceSubType"], str):
            problems.append("field 'bounce.bounceSubType': expected text")
        problems += _recipient_problems(detail, "bouncedRecipients", "bounce")
    elif kind == "Complaint":
        problems += _recipient_problems(detail, "complainedRecipients", "complaint")
    elif kind == "Delivery":
        recipients = detail.get("recipients")
        if recipients is not None and (
            not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients)
        ):
            problems.append("field 'delivery.recipients': expected a list of addresses")
    return problems


def _from_object(obj: object, where: str) -> tuple[list[tuple[dict[str, Any], str]], list[str]]:
    """One item: an SNS envelope or a bare notification."""
    if not isinstance(obj, dict):
        return [], [f"{where}: expected a JSON object, got {type(obj).__name__}"]
    if "Type" in obj and "Message" in obj:  # an SNS envelope
        if obj.get("Type") != "Notification":
            return [], [
                f"{where}: field 'Type': SNS message of type {obj.get('Type')!r} carries no "
                "notification (expected 'Notification')"
            ]
        message_id = obj.get("MessageId")
        if not isinstance(message_id, str) or not message_id:
            return [], [f"{where}: field 'MessageId': missing or not text"]
        if not isinstance(obj["Message"], str):
            return [], [f"{where}: field 'Message': expected a JSON string"]
        try:
            inner = loads_json(obj["Message"], what="the message")
        except ValueError as exc:
            return [], [f"{where}: field 'Message': not valid JSON ({exc})"]
        problems = validate_notification(inner)
        if problems:
            return [], [f"{where}: in 'Message': {p}" for p in problems]
        return [(Parsed(inner, obj["Message"]), message_id)], []
    problems = validate_notification(obj)
    if problems:
        return [], [f"{where}: {p}" for p in problems]
    canonical = _canonical(obj)
    return [(Parsed(obj, canonical), _key_of(canonical))], []


def parse_envelope(obj: object) -> list[tuple[dict[str, Any], str]]:
    """Notifications and their dedupe keys from one notification, an SNS envelope, or a
    list of either. Everything is validated first: on any problem, raise
    :class:`InvalidNotification` listing them all (so nothing gets applied)."""
    items: list[tuple[dict[str, Any], str]] = []
    problems: list[str] = []
    if isinstance(obj, list):
        if not obj:
            raise InvalidNotification(["the list is empty: no notification to apply"])
        for index, item in enumerate(obj):
            found, bad = _from_object(item, f"item {index}")
            items += found
            problems += bad
    else:
        items, problems = _from_object(obj, "notification")
    if problems:
        raise InvalidNotification(problems)
    return items


def iter_json_items(
    stream: IO[str], name: str = "FILE", chunk: int = 1 << 16
) -> Iterator[tuple[str, object]]:
    """(where, value) for each item of a top-level JSON array ("item N"), decoded one at
    a time as the text is read (so a big dead-letter dump never sits in memory whole), or
    ("notification", value) for a file holding one value. Raises :class:`InvalidInput`
    naming the file for text that is not JSON."""
    decoder = json.JSONDecoder()
    buffer, offset, eof = "", 0, False

    def fill() -> bool:
        nonlocal buffer, offset, eof
        more = "" if eof else stream.read(chunk)
        eof = eof or not more
        buffer, offset = buffer[offset:] + more, 0
        return bool(more)

    def skip_space() -> None:
        nonlocal offset
        while True:
            while offset < len(buffer) and buffer[offset] in " \t\r\n":
                offset += 1
            if offset < len(buffer) or not fill():
                return

    def value(where: str) -> object:
        nonlocal offset
        while True:
            try:
                obj, end = decoder.raw_decode(buffer, offset)
            except json.JSONDecodeError as exc:
                if fill():
                    continue
                raise InvalidInput(f"{name}: not valid JSON: {exc}") from None
            except RecursionError:
                end = len(buffer)  # far too deep: refused below
                obj = None
            if end == len(buffer) and fill():
                continue  # a number or literal may go on in the next piece
            # The same bound as every JSON papermail reads (worker.untrusted), per item.
            piece = buffer[offset:end].encode("utf-8", "surrogatepass")
            if json_depth(piece, MAX_JSON_DEPTH - 1) > MAX_JSON_DEPTH - 1:
                raise InvalidInput(
                    f"{name}: not valid JSON: {where} is nested more than "
                    f"{MAX_JSON_DEPTH} levels deep"
                )
            offset = end
            return obj

    def bad(expected: str) -> InvalidInput:
        got = buffer[offset : offset + 20] if offset < len(buffer) else "end of file"
        return InvalidInput(f"{name}: not valid JSON: expected {expected}, got {got!r}")

    skip_space()
    if offset >= len(buffer):
        raise InvalidInput(f"{name}: not valid JSON: the file is empty")
    if buffer[offset] != "[":
        yield "notification", value("the value")
        skip_space()
        if offset < len(buffer):
            raise bad("the end of the file")
        return
    offset += 1
    skip_space()
    if offset < len(buffer) and buffer[offset] == "]":
        offset += 1
    else:
        index = 0
        while True:
            skip_space()
            yield f"item {index}", value("an item")
            index += 1
            skip_space()
            if offset < len(buffer) and buffer[offset] == ",":
                offset += 1
                continue
            if offset < len(buffer) and buffer[offset] == "]":
                offset += 1
                break
            raise bad("',' or ']'")
    skip_space()
    if offset < len(buffer):
        raise bad("the end of the file")


def read_file_items(stream: IO[str], name: str = "FILE") -> Iterator[tuple[dict[str, Any], str]]:
    """Notifications and dedupe keys of a file (one notification, one SNS envelope or a
    JSON list of either), read as a stream. Validates as :func:`parse_envelope` does but
    item by item: iterate it once to check the whole file before applying anything."""
    count = 0
    problems: list[str] = []
    for where, obj in iter_json_items(stream, name):
        count += 1
        found, bad = _from_object(obj, where)
        problems += bad
        yield from found
    if not count:
        raise InvalidNotification(["the list is empty: no notification to apply"])
    if problems:
        raise InvalidNotification(problems)


# ---------------------------------------------------------------------------------------
# Applying


def _detail(notification: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    detail = notification.get(DETAIL_KEYS.get(kind, ""), None)
    return detail if isinstance(detail, dict) else {}


def _subtype(kind: str, detail: Mapping[str, Any]) -> str | None:
    if kind == "Bounce":
        return f"{detail.get('bounceType')}/{detail.get('bounceSubType') or 'General'}"
    if kind == "Complaint":
        value = detail.get("complaintFeedbackType") or detail.get("complaintSubType")
    elif kind == "Reject":
        value = detail.get("reason")
    elif kind == "DeliveryDelay":
        value = detail.get("delayType")
    else:
        value = None
    return str(value)[:64] if value else None


def _recipients(kind: str, notification: Mapping[str, Any], detail: Mapping[str, Any]) -> list[str]:
    if kind == "Bounce":
        raw = [r["emailAddress"] for r in detail.get("bouncedRecipients", [])]
    elif kind == "Complaint":
        raw = [r["emailAddress"] for r in detail.get("complainedRecipients", [])]
    elif kind == "Delivery" and isinstance(detail.get("recipients"), list):
        raw = list(detail["recipients"])
    else:
        mail = notification.get("mail")
        dest = mail.get("destination") if isinstance(mail, dict) else None
        raw = [d for d in dest if isinstance(d, str)] if isinstance(dest, list) else []
    seen: dict[str, None] = {}
    for value in raw:
        seen.setdefault(normalise_address(value), None)
    return list(seen)


BATCH_SIZE = 500  # notifications per transaction (events apply, the SQS consumer)
# How long a shared batch waits for the other receive loops' messages (Coalescer.gather):
# a few milliseconds against an SQS round trip of tens.
SQS_GATHER_SECONDS = 0.005


def apply_notification(
    session: Session,
    notification: dict[str, Any],
    *,
    dedupe_key: str | None,
    via: str,
    now: datetime | None = None,
    settings: Settings | None = None,
) -> ApplyResult:
    """Store one notification and apply its policy, in the caller's transaction.

    Raises :class:`InvalidNotification` for a malformed one and :class:`RetryLater` (having
    written nothing) for a state-changing event about an unknown message younger than
    ``orphan_grace_seconds`` (measured from ``mail.timestamp``; without one, an unknown
    message is an orphan at once). A batch of one of :func:`apply_batch`.
    """
    (outcome,) = apply_batch(
        session, [(notification, dedupe_key)], via=via, now=now, settings=settings
    )
    if isinstance(outcome, RetryLater):
        raise outcome
    return outcome


@dataclass
class _Item:
    """One notification of a batch, read (phase 1: no writes) and what it will do."""

    index: int
    notification: dict[str, Any]
    key: str
    kind: str
    group: int
    message_id: str | None = None
    sent_at: datetime | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)
    delivery: DeliveryRow | None = None
    scope: _Scope | None = None
    ignored: bool = False
    orphan: bool = False
    row: dict[str, Any] | None = None
    outcome: ApplyResult | RetryLater | None = None
    json_text: str | None = None  # the notification's JSON as it will be stored, if known


def apply_batch(
    session: Session,
    items: Sequence[tuple[dict[str, Any], str | None]],
    *,
    via: str,
    now: datetime | None = None,
    settings: Settings | None = None,
    groups: Sequence[int] | None = None,
) -> list[ApplyResult | RetryLater]:
    """Store and apply many notifications in the caller's transaction, with exactly the
    outcome of applying them one by one in order (:func:`apply_notification`).

    ``items`` are (notification, dedupe key or None). Returns one outcome per item: an
    :class:`ApplyResult`, or a :class:`RetryLater` (not raised) for one that must wait and
    wrote nothing. ``groups`` (one label per item) makes items all-or-nothing together, as
    one SQS message's notifications are: when one of a group must be retried, the whole
    group is returned as RetryLater and nothing of it is written.

    The work is a constant number of statements per batch instead of per event: one
    SELECT of the stored keys, one of the deliveries (locked in id order), one of their
    subscribers (locked in id order), one INSERT ... ON CONFLICT DO NOTHING RETURNING of
    the events, the policy on the loaded rows (plain rows, not ORM objects), one UPDATE of
    the deliveries, one of the subscribers and one INSERT of their log lines
    (worker/event_rows.py). The reputation guard is read once per edition; only when this
    batch could push an edition over a threshold are the events of the batch stored and
    checked one at a time, as one by one would.
    """
    problems = [
        f"item {i}: {p}" if len(items) > 1 else p
        for i, (notification, _) in enumerate(items)
        if not isinstance(notification, Parsed)  # validated when it was parsed
        for p in validate_notification(notification)
    ]
    if problems:
        raise InvalidNotification(problems)
    settings = settings or get_settings()
    now = now or utcnow()
    batch = []
    for i, (notification, key) in enumerate(items):
        text = notification.json_text if isinstance(notification, Parsed) else None
        if not key:
            text = _canonical(notification)
            key = _key_of(text)
        batch.append(
            _Item(
                index=i,
                notification=notification,
                key=key[:255],
                kind=notification_type(notification) or "?",
                group=groups[i] if groups is not None else i,
                json_text=text,
            )
        )
    live = _read_batch(session, batch, via, now, settings)
    if groups is not None:
        waiting = {
            item.group: item.outcome for item in live if isinstance(item.outcome, RetryLater)
        }
        if waiting:  # drop whole groups, then read the rest again (repeats may shift)
            for item in batch:
                if item.group in waiting:
                    item.outcome = waiting[item.group]
            live = [item for item in batch if item.group not in waiting]
            for item in live:
                item.outcome = item.row = None
            live = _read_batch(session, live, via, now, settings)
    todo = [item for item in live if item.row is not None]
    one_at_a_time = _guard_may_trip(session, todo, settings)
    stored: dict[str, tuple[int | None, int | None]] = {}
    changes = rows.Changes()
    segments = [[item] for item in todo] if one_at_a_time else [todo]
    for segment in segments:
        inserted = rows.insert_events(session, [item.row for item in segment if item.row])
        for item in segment:
            _apply_item(session, item, inserted, stored, changes, todo, now, settings,
                        one_at_a_time)  # fmt: skip
    changes.write(session)
    for item in live:  # repeats within the batch (and of concurrent inserts)
        if item.outcome is None and item.row is None:
            first = stored.get(item.key)
            if first is None:
                first = rows.stored_keys(session, [item.key]).get(item.key, (None, None))
            item.outcome = ApplyResult("duplicate", item.kind, item.key, delivery_id=first[1],
                                       event_id=first[0])  # fmt: skip
    session.flush()
    return [item.outcome for item in batch]  # type: ignore[misc]


def apply_in_batches(
    items: Iterable[tuple[dict[str, Any], str | None]],
    *,
    via: str,
    batch_size: int = BATCH_SIZE,
    settings: Settings | None = None,
) -> Iterator[ApplyResult | RetryLater]:
    """Apply a stream of notifications ``batch_size`` at a time, one transaction per
    batch (so locks are held briefly and memory stays flat); yields each outcome in order.
    Committed batches stay applied if a later one fails: applying the same input again
    finds them as repeats."""
    if batch_size < 1:
        raise InvalidInput(f"batch size must be at least 1, got {batch_size}")
    settings = settings or get_settings()
    batch: list[tuple[dict[str, Any], str | None]] = []

    def flush() -> list[ApplyResult | RetryLater]:
        with session_scope(settings.database_url) as session:
            return apply_batch(session, batch, via=via, settings=settings)

    for item in items:
        batch.append(item)
        if len(batch) >= batch_size:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


@dataclass
class _Job:
    items: list[tuple[dict[str, Any], str | None]]
    groups: list[int] | None = None  # within the job; None: the job is one group
    wake: threading.Event = field(default_factory=threading.Event)
    outcomes: list[ApplyResult | RetryLater] | None = None
    error: BaseException | None = None
    lead: bool = False


class Coalescer:
    """Applies the notifications of concurrent callers (the webhook's request threads, the
    SQS consumer's receive loops) as one batch: a caller that finds no batch running
    applies everything waiting, its own included, in one transaction, and hands the lead
    to a waiting caller when its own is answered. Each caller's notifications are one
    group (all-or-nothing, as its own transaction would be), or the groups it gives (one
    per SQS message), and each gets its own outcomes, so the answer of every request is
    the one it would get alone; a batch that fails is retried caller by caller, so one
    request's failure stays its own."""

    def __init__(
        self,
        settings: Settings,
        *,
        via: str,
        max_batch: int = 200,
        gather: float = 0.0,
        callers: int | None = None,
    ) -> None:
        self.settings, self.via, self.max_batch = settings, via, max_batch
        # A leader waits up to ``gather`` seconds for more callers before it applies the
        # batch: until ``callers`` (all there can be) are waiting, or none came for a
        # quarter of it. Callers answered together come back together: without it the
        # first one back leads a batch of two or three, and the rest wait for the next.
        self.gather, self.callers = gather, callers
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._gathering = False
        self._waiting: list[_Job] = []
        self._running = False

    def apply(
        self, items: list[tuple[dict[str, Any], str | None]], groups: list[int] | None = None
    ) -> list[ApplyResult | RetryLater]:
        """Apply ``items`` in the next batch; ``groups`` (one label per item) splits them
        into groups that are all-or-nothing on their own (as apply_batch's), otherwise
        they are one group. Raises what the batch raised when it fails for these items."""
        job = _Job(list(items), list(groups) if groups is not None else None)
        with self._lock:
            self._waiting.append(job)
            job.lead = not self._running
            self._running = True
            if self._gathering:
                self._arrived.notify()
        while not job.lead and job.outcomes is None and job.error is None:
            job.wake.wait()
            job.wake.clear()
        if job.outcomes is None and job.error is None:
            self._lead(job)
        if job.error is not None:
            raise job.error
        assert job.outcomes is not None
        return job.outcomes

    def _lead(self, mine: _Job) -> None:
        while mine.outcomes is None and mine.error is None:
            with self._lock:
                self._gather()
                jobs = self._waiting[: self.max_batch]
                del self._waiting[: self.max_batch]
            self._run(jobs)
        with self._lock:  # answered: the next waiting caller leads, or nobody runs
            if self._waiting:
                successor = self._waiting[0]
                successor.lead = True
                successor.wake.set()
            else:
                self._running = False

    def _gather(self) -> None:
        """Wait (the lock held, released while waiting) for more callers to join."""
        if self.gather <= 0:
            return
        enough = min(self.callers or self.max_batch, self.max_batch)
        deadline = time.monotonic() + self.gather
        self._gathering = True
        try:
            while len(self._waiting) < enough:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                before = len(self._waiting)
                self._arrived.wait(min(self.gather / 4, left))
                if len(self._waiting) == before:
                    return  # a quiet spell: nobody else is on the way
        finally:
            self._gathering = False

    def _run(self, jobs: list[_Job]) -> None:
        try:
            self._apply(jobs)
        except Exception:
            if len(jobs) == 1:
                jobs[0].error = sys.exc_info()[1]
            else:
                for job in jobs:  # one by one: a failure is its caller's alone
                    try:
                        self._apply([job])
                    except Exception as exc:
                        job.error = exc
        for job in jobs:
            job.wake.set()

    def _apply(self, jobs: list[_Job]) -> None:
        items = [item for job in jobs for item in job.items]
        groups: list[int] = []
        base = 0
        for job in jobs:  # labels unique across the jobs
            labels = [base + g for g in job.groups] if job.groups else [base] * len(job.items)
            groups += labels
            base = max(labels, default=base) + 1
        with session_scope(self.settings.database_url) as session:
            outcomes = apply_batch(
                session, items, via=self.via, settings=self.settings, groups=groups
            )
        start = 0
        for job in jobs:
            job.outcomes = outcomes[start : start + len(job.items)]
            start += len(job.items)


def _read_batch(
    session: Session, batch: list[_Item], via: str, now: datetime, settings: Settings
) -> list[_Item]:
    """Phase 1 (reads and row locks only): for each item in order, whether it is a repeat,
    must wait, or will be stored — and the event row it will store."""
    for item in batch:
        mail = item.notification.get("mail")
        if not isinstance(mail, dict):
            mail = {}  # types without policy may come without one
        message_id = mail.get("messageId")
        item.message_id = message_id if isinstance(message_id, str) else None
        item.sent_at = _parse_time(mail.get("timestamp"))
    # One read for both (a repeat's delivery is locked too: harmless, and one round trip).
    message_ids = [item.message_id for item in batch if item.message_id]
    stored, deliveries = rows.read_batch(session, [item.key for item in batch], message_ids)
    for item in batch:
        if item.key in stored:
            event_id, delivery_id = stored[item.key]
            item.outcome = ApplyResult("duplicate", item.kind, item.key, delivery_id=delivery_id,
                                       event_id=event_id)  # fmt: skip
    first: dict[str, _Item] = {}
    for item in batch:
        if item.outcome is not None:
            continue
        if item.key in first:  # a repeat within the batch: decided once the first is stored
            continue
        kind = item.kind
        delivery = deliveries.get(item.message_id) if item.message_id else None
        if delivery is None and kind in STATEFUL_TYPES and item.sent_at is not None:
            age = (now - item.sent_at).total_seconds()
            if age < settings.orphan_grace_seconds:
                item.outcome = RetryLater(
                    f"{kind} for unknown message {item.message_id} sent {age:.0f}s ago; "
                    f"retry (orphaned after {settings.orphan_grace_seconds}s)"
                )
                continue
        first[item.key] = item
        detail = _detail(item.notification, kind)
        item.detail = detail
        item.ignored = kind not in MAIL_TYPES
        item.orphan = delivery is None and not item.ignored
        occurred = _parse_time(detail.get("timestamp")) or item.sent_at
        recipients = _recipients(kind, item.notification, detail)
        item.scope = _Scope.of(delivery, recipients) if delivery is not None else None
        if item.scope is not None and not item.scope.matched and kind in STATEFUL_TYPES:
            # The message is ours but none of the addresses is the one it went to: an
            # anomaly (or a forgery). Stored, unlinked, so it counts for nothing (rates,
            # history), and nobody it lists is touched.
            item.ignored = True
            delivery = None
        item.delivery = delivery
        item.row = {
            "dedupe_key": item.key,
            "event_type": kind[:32],
            "subtype": _subtype(kind, detail),
            "provider_message_id": item.message_id[:255] if item.message_id else None,
            "delivery_id": delivery.id if delivery else None,
            "recipients": recipients,
            "occurred_at": occurred,
            "received_at": now,
            "via": via[:16],
            "orphan": item.orphan,
            "raw": item.notification,
            "raw_json": item.json_text,
        }
    return batch


def _guard_may_trip(session: Session, todo: list[_Item], settings: Settings) -> bool:
    """Whether this batch could take an edition over a reputation threshold.

    An upper bound from the edition's rates before the batch: every hard bounce and
    complaint of the batch counted as new, accepted deliveries as few as its rejects can
    make them (and as many as its bounces and complaints can, for the minimum sample).
    Only then must the guard be checked after each event, as one by one would."""
    counts: dict[date, list[int]] = {}  # bounces+complaints, hard bounces, complaints, rejects
    for item in todo:
        if item.delivery is None or item.ignored:
            continue
        c = counts.setdefault(item.delivery.edition_date, [0, 0, 0, 0])
        if item.kind in ("Bounce", "Complaint"):
            c[0] += 1
        if item.kind == "Bounce" and item.detail.get("bounceType") == "Permanent":
            c[1] += 1  # counts OnAccountSuppressionList too: an upper bound
        elif item.kind == "Complaint":
            c[2] += 1
        elif item.kind == "Reject":
            c[3] += 1
    consulted = sorted(e for e, c in counts.items() if c[0])  # after bounces, complaints
    if not consulted:
        return False
    # One statement for every edition on PostgreSQL; edition_rates' own queries otherwise.
    known = rows.guard_counts(session, consulted, GUARD_FLAG_PREFIX)
    for edition in consulted:
        either, hard, complaints, rejects = counts[edition]
        if known is not None:
            accepted, hard_bounced, complained, tripped = known[edition]
        else:
            rates = edition_rates(session, edition, settings)
            accepted, hard_bounced = rates["accepted"], rates["hard_bounced"]
            complained, tripped = rates["complained"], rates["guard_tripped"]
        if tripped:
            continue  # trips once per edition
        if accepted + either < settings.reputation_min_sample:
            continue
        fewest = accepted - rejects
        hard_most = hard_bounced + hard
        complained_most = complained + complaints
        if fewest <= 0:
            if hard_most or complained_most:
                return True
            continue
        # Division is monotonic, so this bounds every rate one by one could compute.
        if (
            hard_most / fewest > settings.bounce_rate_limit
            or complained_most / fewest > settings.complaint_rate_limit
        ):
            return True
    return False


def _apply_item(
    session: Session,
    item: _Item,
    inserted: dict[str, int],
    stored: dict[str, tuple[int | None, int | None]],
    changes: rows.Changes,
    todo: list[_Item],
    now: datetime,
    settings: Settings,
    check_guard: bool,
) -> None:
    """Phase 2 for one stored item: its policy, in batch order, on the batch's rows
    (``changes`` collects what it changed)."""
    assert item.row is not None
    kind, key, delivery = item.kind, item.key, item.delivery
    event_id = inserted.get(key)
    if event_id is None:
        item.outcome = ApplyResult(
            "duplicate", kind, key, delivery_id=delivery.id if delivery else None
        )
        return
    stored[key] = (event_id, item.row["delivery_id"])
    result = ApplyResult(
        "ignored" if item.ignored else "orphan" if item.orphan else "applied",
        kind,
        key,
        delivery_id=delivery.id if delivery else None,
        event_id=event_id,
    )
    item.outcome = result
    message_id, detail, scope = item.message_id, item.detail, item.scope
    if kind == "Received":
        # The unsubscribe reads and writes the subscriber through the ORM: it sees what the
        # batch changed so far, and the batch's rows then see what it changed.
        changes.write(session)
        result.changes.extend(_mailto_unsubscribe(session, item.notification, settings))
        session.flush()
        rows.refresh_subscribers(session, [i.delivery.subscriber for i in todo if i.delivery])
        return
    if scope is not None and kind in STATEFUL_TYPES:
        _note_not_recipients(session, scope, kind, _subtype(kind, detail), message_id, now,
                             result, changes)  # fmt: skip
    if item.ignored:
        if scope is None or scope.matched:
            log.info(
                "stored %s event (no policy) for message %s",
                kind,
                message_id,
                extra={"provider_message_id": message_id},
            )
        return
    if delivery is None:
        log.warning(
            "orphan %s for unknown message %s: stored, nothing changed",
            kind,
            message_id,
            extra={"provider_message_id": message_id},
        )
        return
    when = item.row["occurred_at"] or now
    policy = _Policy(changes, settings, delivery, message_id or "?", when, now, result.changes)
    if kind == "Bounce":
        policy.bounce(detail)
    elif kind == "Complaint":
        policy.complaint(detail)
    elif kind == "Delivery":
        policy.delivered()
    elif kind == "Reject":
        policy.rejected(detail)
    if check_guard and kind in ("Bounce", "Complaint"):
        changes.write(session)  # the guard counts what is in the tables
        reason = check_reputation(session, delivery.edition_date, settings)
        if reason:
            result.changes.append(f"sending paused: {reason}")


@dataclass(frozen=True)
class _Scope:
    """Whom an event about one delivery may touch: the one address that delivery went to.

    ``matched``: that address is among those the notification lists (or it lists none, so
    it is about the message as a whole); ``others``: every other address it lists.
    """

    delivery_id: int
    subscriber_id: int
    address: str
    matched: bool
    others: tuple[str, ...]

    @classmethod
    def of(cls, delivery: DeliveryRow, listed: list[str]) -> _Scope:
        own = address_key(delivery.subscriber.email)
        others = tuple(a for a in listed if address_key(a) != own)
        return cls(
            delivery.id,
            delivery.subscriber_id,
            delivery.subscriber.email,
            not listed or len(others) < len(listed),
            others,
        )


def _note_not_recipients(
    session: Session,
    scope: _Scope,
    kind: str,
    subtype: str | None,
    message_id: str | None,
    now: datetime,
    result: ApplyResult,
    changes: rows.Changes,
) -> None:
    """Record, never act on, the addresses an event lists that its message did not go to:
    in the result (and the log) and, for our subscribers among them, in their own log."""
    if not scope.matched:
        result.changes.append(
            f"message {message_id} (delivery {scope.delivery_id}) went to {scope.address}, "
            "whom this notification does not list: nothing changed"
        )
    if not scope.others:
        return
    what = f"{kind} ({subtype})" if subtype else kind
    note = f"ignored: not a recipient of message {message_id}"
    variants = {v: a for a in scope.others for v in _address_variants(a)}
    found = {
        variants[email]: sub_id
        for email, sub_id in rows.subscriber_ids_by_email(session, list(variants)).items()
    }
    for address in scope.others:
        result.changes.append(f"recipient {address}: {note}")
        sub_id = found.get(address)
        if sub_id is not None and sub_id != scope.subscriber_id:
            went = f"(it went to subscriber {scope.subscriber_id})"
            changes.log(sub_id, now, "event_ignored", f"{what} {note} {went}", ACTOR)
    log.warning(
        "%s for message %s (delivery %s, sent to %s) also lists %s: %s, nothing changed for them",
        kind,
        message_id,
        scope.delivery_id,
        scope.address,
        ", ".join(scope.others),
        note,
        extra={
            "provider_message_id": message_id,
            "delivery_id": scope.delivery_id,
            "subscriber_id": scope.subscriber_id,
        },
    )


_MAILTO_SUBJECT = re.compile(r"\bunsubscribe\s+([A-Za-z0-9_\-.]{20,})", re.IGNORECASE)


def _mailto_unsubscribe(
    session: Session, notification: dict[str, Any], settings: Settings
) -> list[str]:
    """An email to the List-Unsubscribe mailto, received by SES (a receipt rule publishing
    to SNS): the signed token in its subject is the authority, as for the link."""
    from worker import links
    from worker.errors import PapermailError
    from worker.preferences import unsubscribe

    mail = notification.get("mail") if isinstance(notification.get("mail"), dict) else {}
    headers = mail.get("commonHeaders") if isinstance(mail.get("commonHeaders"), dict) else {}
    subject = headers.get("subject") if isinstance(headers.get("subject"), str) else ""
    match = _MAILTO_SUBJECT.search(subject)
    if not match:
        log.info("received mail without an unsubscribe token in its subject: ignored")
        return ["received mail: no unsubscribe token in the subject"]
    try:
        payload = links.read_token("unsubscribe", match.group(1), settings)
        changed = unsubscribe(session, int(payload["s"]), actor="mailto", how="mailto")
    except (PapermailError, KeyError, ValueError) as exc:
        log.warning("mailto unsubscribe refused: %s", exc)
        return [f"mailto unsubscribe refused: {exc}"]
    log.info("subscriber %s unsubscribed by mailto", payload["s"])
    return [
        f"subscriber {payload['s']}: unsubscribed by mailto"
        if changed
        else f"subscriber {payload['s']}: already unsubscribed"
    ]


@dataclass
class _Policy:
    rows: rows.Changes
    settings: Settings
    delivery: DeliveryRow
    message_id: str
    when: datetime
    now: datetime
    changes: list[str]

    def move_delivery(self, new: DeliveryState, **values: Any) -> bool:
        old = self.delivery.state
        if old == new or old not in _DELIVERY_FROM[new]:
            return False
        self.delivery.state = new._value_  # the plain string (Enum.value is slow in 3.11)
        self.delivery.updated_at = self.now
        for name, value in values.items():
            setattr(self.delivery, name, value)
        self.rows.deliveries[self.delivery.id] = self.delivery
        self.changes.append(f"delivery {self.delivery.id}: {old} -> {new._value_}")
        return True

    def recipient(self) -> SubscriberRow:
        """The one subscriber this delivery went to, locked: the only one events touch.
        One row per subscriber in a batch, so it carries the batch's earlier events."""
        return self.delivery.subscriber

    def changed(self, sub: SubscriberRow) -> None:
        self.rows.subscribers[sub.id] = sub  # written back whole with the batch

    def log(self, sub: SubscriberRow, action: str, detail: str) -> None:
        self.rows.log(sub.id, self.now, action, detail, ACTOR)

    def set_status(self, sub: SubscriberRow, status: SubscriberStatus, reason: str) -> None:
        old = sub.status
        sub.status = status.value
        sub.updated_at = self.now
        self.changed(sub)
        if sub.suppressed_at is None:  # an operator's own reason stays as written
            sub.suppression_reason = reason
        self.log(
            sub, status.value, f"{old} -> {status.value}: {reason} (message {self.message_id})"
        )
        self.changes.append(f"subscriber {sub.id} ({sub.email}): {old} -> {status.value}: {reason}")

    def bounce(self, detail: Mapping[str, Any]) -> None:
        btype = str(detail.get("bounceType"))
        subtype = str(detail.get("bounceSubType") or "General")
        diagnostics = [
            str(r.get("diagnosticCode"))
            for r in detail.get("bouncedRecipients", [])
            if isinstance(r, dict) and r.get("diagnosticCode")
        ]
        error = f"{btype} bounce ({subtype})" + (f": {diagnostics[0]}" if diagnostics else "")
        self.move_delivery(DeliveryState.BOUNCED, bounced_at=self.when, last_error=error[:2000])
        sub = self.recipient()
        if sub.status not in _BOUNCEABLE:
            self.changes.append(f"subscriber {sub.id}: already {sub.status}")
            return
        if btype == "Permanent":
            reason = (
                "on the SES account-level suppression list"
                if subtype == ACCOUNT_SUPPRESSION
                else f"hard bounce ({btype}/{subtype})"
            )
            self.set_status(sub, SubscriberStatus.BOUNCED, reason)
            return
        # Transient or Undetermined: count; suppress after N in a row.
        sub.soft_bounce_count = (sub.soft_bounce_count or 0) + 1
        sub.updated_at = self.now
        self.changed(sub)
        limit = self.settings.soft_bounce_limit
        note = f"soft bounce {sub.soft_bounce_count}/{limit} ({btype}/{subtype})"
        self.log(sub, "soft_bounce", f"{note} (message {self.message_id})")
        self.changes.append(f"subscriber {sub.id} ({sub.email}): {note}")
        if sub.soft_bounce_count >= limit:
            self.set_status(
                sub,
                SubscriberStatus.BOUNCED,
                f"{sub.soft_bounce_count} soft bounces in a row (last {btype}/{subtype})",
            )

    def complaint(self, detail: Mapping[str, Any]) -> None:
        feedback = detail.get("complaintFeedbackType") or detail.get("complaintSubType")
        self.move_delivery(
            DeliveryState.COMPLAINED,
            complained_at=self.when,
            last_error=f"complaint ({feedback or 'no feedback type'})",
        )
        sub = self.recipient()
        if sub.status == SubscriberStatus.COMPLAINED:
            self.changes.append(f"subscriber {sub.id}: already complained")
            return
        self.set_status(
            sub, SubscriberStatus.COMPLAINED, f"complaint ({feedback or 'no feedback type'})"
        )

    def delivered(self) -> None:
        self.move_delivery(DeliveryState.DELIVERED, delivered_at=self.when)
        sub = self.recipient()
        # Resets the count of soft bounces "in a row"; the status is never touched, so a
        # Delivery that arrives after a Bounce does not revive the address.
        if sub.soft_bounce_count:
            self.changes.append(
                f"subscriber {sub.id}: soft bounce count {sub.soft_bounce_count} -> 0"
            )
            sub.soft_bounce_count = 0
            sub.updated_at = self.now
            self.changed(sub)

    def rejected(self, detail: Mapping[str, Any]) -> None:
        reason = str(detail.get("reason") or "no reason given")
        self.move_delivery(
            DeliveryState.FAILED,
            last_error=f"rejected by SES: {reason}"[:2000],
            finished_at=self.now,
        )


# ---------------------------------------------------------------------------------------
# Reputation guard


def edition_rates(
    session: Session, edition_date: date, settings: Settings | None = None
) -> dict[str, Any]:
    """Bounce and complaint rates of one edition, against the guard's thresholds.

    ``bounce_rate`` = hard bounces / accepted, where accepted = sent + delivered + bounced
    + complained and a hard bounce is a delivery with a Permanent bounce (other than
    OnAccountSuppressionList), as SES counts it. ``bounced`` counts every bounced delivery,
    soft ones included.
    """
    settings = settings or get_settings()
    by_state = dict(
        session.execute(
            select(Delivery.state, func.count())
            .where(Delivery.edition_date == edition_date)
            .group_by(Delivery.state)
        ).all()
    )
    accepted = sum(by_state.get(s.value, 0) for s in ACCEPTED_DELIVERY_STATES)
    hard = (
        session.scalar(
            select(func.count(func.distinct(ProviderEvent.delivery_id)))
            .join(Delivery, Delivery.id == ProviderEvent.delivery_id)
            .where(
                Delivery.edition_date == edition_date,
                ProviderEvent.event_type == "Bounce",
                ProviderEvent.subtype.like("Permanent/%"),
                ProviderEvent.subtype != f"Permanent/{ACCOUNT_SUPPRESSION}",
            )
        )
        or 0
    )
    complained = by_state.get(DeliveryState.COMPLAINED.value, 0)
    bounce_rate = hard / accepted if accepted else 0.0
    complaint_rate = complained / accepted if accepted else 0.0
    enough = accepted >= settings.reputation_min_sample
    over_bounce = enough and bounce_rate > settings.bounce_rate_limit
    over_complaint = enough and complaint_rate > settings.complaint_rate_limit
    return {
        "edition_date": edition_date.isoformat(),
        "accepted": accepted,
        "sent": by_state.get(DeliveryState.SENT.value, 0),
        "delivered": by_state.get(DeliveryState.DELIVERED.value, 0),
        "bounced": by_state.get(DeliveryState.BOUNCED.value, 0),
        "hard_bounced": hard,
        "complained": complained,
        "bounce_rate": bounce_rate,
        "complaint_rate": complaint_rate,
        "bounce_rate_limit": settings.bounce_rate_limit,
        "complaint_rate_limit": settings.complaint_rate_limit,
        "min_sample": settings.reputation_min_sample,
        "sample_ok": enough,
        "over_bounce_limit": over_bounce,
        "over_complaint_limit": over_complaint,
        "guard_tripped": session.get(ControlFlag, GUARD_FLAG_PREFIX + edition_date.isoformat())
        is not None,
        "sending_paused": sending_paused(session),
    }


def check_reputation(
    session: Session, edition_date: date, settings: Settings | None = None
) -> str | None:
    """Pause sending when the edition is over a threshold; the reason when it paused now."""
    rates = edition_rates(session, edition_date, settings)
    if not (rates["over_bounce_limit"] or rates["over_complaint_limit"]):
        return None
    if rates["guard_tripped"]:
        return None  # already paused once for this edition; the operator decided since
    if rates["sending_paused"]:
        # Paused for another reason: say so, and trip when sending resumes.
        log.error(
            "edition %s is over a reputation threshold (sending already paused)",
            edition_date,
            extra={"edition_date": edition_date},
        )
        return None
    parts = []
    if rates["over_bounce_limit"]:
        parts.append(
            f"bounce rate {rates['bounce_rate']:.1%} ({rates['hard_bounced']} hard bounces) "
            f"> {rates['bounce_rate_limit']:.1%}"
        )
    if rates["over_complaint_limit"]:
        parts.append(
            f"complaint rate {rates['complaint_rate']:.2%} ({rates['complained']} complaints) "
            f"> {rates['complaint_rate_limit']:.2%}"
        )
    reason = (
        f"reputation guard: edition {edition_date.isoformat()} "
        + " and ".join(parts)
        + f" of {rates['accepted']} accepted"
    )
    session.add(
        ControlFlag(
            key=GUARD_FLAG_PREFIX + edition_date.isoformat(),
            value={"reason": reason, "at": utcnow().isoformat()},
        )
    )
    pause_sending(session, reason, by="reputation-guard")
    return reason


# ---------------------------------------------------------------------------------------
# SQS consumer


@dataclass
class PollCounts:
    batches: int = 0
    received: int = 0
    deleted: int = 0
    applied: int = 0
    duplicate: int = 0
    orphan: int = 0
    ignored: int = 0
    retry_later: int = 0  # left in the queue, redelivered after the visibility timeout
    invalid: int = 0  # left in the queue for its dead-letter queue
    unverified: int = 0  # failed SNS signature verification: left for the dead-letter queue
    failed: int = 0  # unexpected error (e.g. database down); left in the queue

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def summary(self) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.as_dict().items())


def _region_of_queue(queue_url: str, default: str) -> str:
    host = urlsplit(queue_url).hostname or ""
    parts = host.split(".")
    if len(parts) >= 3 and parts[0] == "sqs":
        return parts[1]
    return default


def sqs_client(settings: Settings, queue_url: str) -> Any:
    """A boto3 SQS client for the queue (region from its URL)."""
    import boto3

    return boto3.client(
        "sqs",
        region_name=_region_of_queue(queue_url, settings.ses_region),
        endpoint_url=settings.sqs_endpoint_url,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
    )


def _is_envelope(obj: object) -> bool:
    return isinstance(obj, dict) and "Type" in obj and "Message" in obj


def verify_sqs_message(
    obj: object,
    settings: Settings,
    *,
    fetcher: sns.CertFetcher | None = None,
    cache: sns.CertCache | None = None,
    now: datetime | None = None,
) -> None:
    """With ``sqs_verify_signatures`` on, raise :class:`worker.sns.SnsVerificationError`
    unless ``obj`` is an SNS envelope that verifies exactly as the webhook's would (topic
    allow-list, certificate host, signature), except that it may be as old as SQS keeps a
    message. A body that is not an envelope (raw message delivery, a list) carries no
    signature, so nothing proves who wrote it: refused."""
    if not settings.sqs_verify_signatures:
        return
    if not _is_envelope(obj):
        raise sns.SnsVerificationError(
            "not an SNS envelope, so it carries no signature (raw message delivery?): "
            "refused while PAPERMAIL_SQS_VERIFY_SIGNATURES is on"
        )
    assert isinstance(obj, dict)
    sns.verify_message(
        obj, settings, fetcher=fetcher, cache=cache, now=now, max_age=sns.SQS_MAX_AGE
    )


def read_sqs_body(
    body: str,
    settings: Settings,
    *,
    now: datetime | None = None,
    fetcher: sns.CertFetcher | None = None,
    cache: sns.CertCache | None = None,
) -> list[tuple[dict[str, Any], str]]:
    """Verify (see :func:`verify_sqs_message`) and parse one SQS message body (an SNS
    envelope, or a bare notification with raw message delivery on). Raises
    InvalidNotification or SnsVerificationError."""
    try:
        obj = loads_json(body, what="the message body")
    except ValueError as exc:
        raise InvalidNotification([f"message body is not JSON: {exc}"]) from None
    verify_sqs_message(obj, settings, fetcher=fetcher, cache=cache, now=now)
    return parse_envelope(obj)


def handle_sqs_body(
    body: str,
    settings: Settings,
    *,
    now: datetime | None = None,
    fetcher: sns.CertFetcher | None = None,
    cache: sns.CertCache | None = None,
) -> list[ApplyResult]:
    """Verify and apply one SQS message body in one transaction. Raises
    InvalidNotification, SnsVerificationError or RetryLater, having committed nothing."""
    items = read_sqs_body(body, settings, now=now, fetcher=fetcher, cache=cache)
    with session_scope(settings.database_url) as session:
        outcomes = apply_batch(
            session, items, via="sqs", now=now, settings=settings, groups=[0] * len(items)
        )
        for outcome in outcomes:
            if isinstance(outcome, RetryLater):
                raise outcome
    return outcomes  # type: ignore[return-value]


def poll_sqs(
    settings: Settings,
    *,
    once: bool,
    max_messages: int = 10,
    wait_seconds: int | None = None,
    client: Any = None,
    queue_url: str | None = None,
    on_batch: Callable[[PollCounts], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_batches: int | None = None,
    cert_fetcher: sns.CertFetcher | None = None,
    cert_cache: sns.CertCache | None = None,
    receivers: int = 1,
) -> PollCounts:
    """Consume SES notifications from SQS; delete each message only once it is applied.

    Each receive's messages (up to ``max_messages``) are applied in one batch and deleted
    in one call; ``receivers`` loops receive side by side (the CLI and the periodic task
    run ``sqs_receivers``), and the messages they bring meanwhile share one batch
    (:class:`Coalescer`).

    ``once``: receive until the queue answers empty (what is waiting now), then return —
    the shape for a periodic task (at most ``max_batches``, default 1000, receives).
    Otherwise loop until ``should_stop()`` (or Ctrl-C). ``wait_seconds`` is the long-poll
    wait per receive: default 20 when looping, 2 with ``once`` (so a periodic task does
    not sit 20 s on an empty queue).
    Messages that must be retried, are malformed or fail verification stay in the queue:
    SQS redelivers them after the visibility timeout, and its redrive policy moves the
    hopeless ones to the dead-letter queue. With ``sqs_verify_signatures`` on (the
    default) every message must be an SNS envelope signed for a topic of
    ``sns_topic_arns`` (:func:`verify_sqs_message`); ``cert_fetcher`` / ``cert_cache`` as
    for the webhook.
    """
    url = queue_url or settings.sqs_queue_url
    if not url:
        raise InvalidInput("no SQS queue: set PAPERMAIL_SQS_QUEUE_URL or pass --queue-url")
    if not 1 <= max_messages <= 10:
        raise InvalidInput(
            f"max messages per receive must be 1-10 (SQS's limit), got {max_messages}"
        )
    if wait_seconds is None:
        wait_seconds = 2 if once else 20
    if not 0 <= wait_seconds <= 20:
        raise InvalidInput(f"wait seconds must be 0-20 (SQS's limit), got {wait_seconds}")
    if settings.sqs_verify_signatures and not settings.sns_topic_arns:
        # Refuse before receiving: every message would fail verification.
        raise InvalidInput(
            "PAPERMAIL_SQS_VERIFY_SIGNATURES is on but PAPERMAIL_SNS_TOPIC_ARNS is empty, so "
            "every message would be refused: list the SNS topic(s) SES publishes to "
            "(or turn verification off, see the README)"
        )
    client = client or sqs_client(settings, url)  # boto3 clients are thread-safe
    if receivers < 1:
        raise InvalidInput(f"receivers must be at least 1, got {receivers}")
    limit = max_batches if max_batches is not None else (1000 if once else None)
    shares = [PollCounts() for _ in range(receivers)]
    # Receive loops side by side share their database batches: up to 10 messages a
    # receive (SQS's limit) is a small batch, several receives' worth is not.
    shared = (
        Coalescer(settings, via="sqs", gather=SQS_GATHER_SECONDS, callers=receivers)
        if receivers > 1
        else None
    )
    lock = threading.Lock()
    taken = [0]  # receives started, all loops together (for ``limit``)

    def total() -> PollCounts:
        out = PollCounts()
        for share in shares:
            for name, value in share.as_dict().items():
                setattr(out, name, getattr(out, name) + value)
        return out

    def loop(counts: PollCounts) -> None:
        while True:
            with lock:
                if (limit is not None and taken[0] >= limit) or (should_stop and should_stop()):
                    return
                taken[0] += 1
            try:
                response = client.receive_message(
                    QueueUrl=url,
                    MaxNumberOfMessages=max_messages,
                    WaitTimeSeconds=wait_seconds,
                )
            except Exception:
                log.exception("SQS receive from %s failed", url)
                with lock:
                    taken[0] -= 1
                counts.failed += 1
                if once:
                    return
                time.sleep(min(5.0, max(1.0, float(wait_seconds))))
                continue
            messages = response.get("Messages") or []
            counts.batches += 1
            counts.received += len(messages)
            if messages:
                _handle_sqs_messages(
                    client, url, messages, settings, counts, cert_fetcher, cert_cache, shared
                )
            if on_batch:
                with lock:
                    on_batch(total())
            if once and not messages:
                return

    if receivers == 1:
        loop(shares[0])
        return shares[0]
    # Several receive loops keep SQS's and the database's round trips overlapping.
    threads = [
        threading.Thread(target=loop, args=(share,), name=f"sqs-receive-{i}", daemon=True)
        for i, share in enumerate(shares)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return total()


def _handle_sqs_messages(
    client: Any,
    url: str,
    messages: list[Mapping[str, Any]],
    settings: Settings,
    counts: PollCounts,
    fetcher: sns.CertFetcher | None = None,
    cache: sns.CertCache | None = None,
    coalescer: Coalescer | None = None,
) -> None:
    """One receive's messages: each verified and parsed alone, the good ones applied as
    one batch (each message all-or-nothing: a group; with ``coalescer``, together with
    what the other receive loops brought meanwhile), the applied ones deleted in one
    call. If the batch fails as a whole, each message is tried alone, so one that cannot
    be applied stays in the queue by itself."""
    good: list[tuple[Mapping[str, Any], list[tuple[dict[str, Any], str]]]] = []
    for message in messages:
        sqs_id = message.get("MessageId", "?")
        try:
            good.append((message, read_sqs_body(str(message.get("Body", "")), settings,
                                                fetcher=fetcher, cache=cache)))  # fmt: skip
        except sns.SnsVerificationError as exc:
            if exc.retryable:  # the signing certificate could not be fetched: try again later
                counts.retry_later += 1
                log.warning("SQS message %s not verified yet: %s; left for redelivery", sqs_id, exc)
            else:
                counts.unverified += 1
                log.error(
                    "SQS message %s refused (%s): %s; not applied, left for the dead-letter queue",
                    sqs_id,
                    exc.kind,
                    exc.reason,
                )
        except InvalidNotification as exc:
            counts.invalid += 1
            log.error(
                "SQS message %s is malformed, left for the dead-letter queue: %s", sqs_id, exc
            )
    if not good:
        return
    try:
        applied = _apply_sqs_group(good, settings, counts, coalescer)
    except Exception:
        if len(good) == 1:
            counts.failed += 1
            log.exception("SQS message %s could not be applied; left in the queue",
                          good[0][0].get("MessageId", "?"))  # fmt: skip
            return
        log.exception("a batch of %d SQS messages failed; applying them one at a time", len(good))
        applied = []
        for one in good:
            try:
                applied += _apply_sqs_group([one], settings, counts)
            except Exception:
                counts.failed += 1
                log.exception("SQS message %s could not be applied; left in the queue",
                              one[0].get("MessageId", "?"))  # fmt: skip
    _delete_sqs_messages(client, url, applied, counts)


def _apply_sqs_group(
    good: list[tuple[Mapping[str, Any], list[tuple[dict[str, Any], str]]]],
    settings: Settings,
    counts: PollCounts,
    coalescer: Coalescer | None = None,
) -> list[Mapping[str, Any]]:
    """Apply the messages' notifications in one transaction (with ``coalescer``, the one
    it shares with the other receive loops' messages); the messages to delete."""
    items = [item for _, found in good for item in found]
    groups = [g for g, (_, found) in enumerate(good) for _ in found]
    if coalescer is not None:
        outcomes = coalescer.apply(items, groups)
    else:
        with session_scope(settings.database_url) as session:
            outcomes = apply_batch(session, items, via="sqs", settings=settings, groups=groups)
    waiting: set[int] = set()
    for group, outcome in zip(groups, outcomes, strict=True):
        if isinstance(outcome, RetryLater):
            if group not in waiting:
                waiting.add(group)
                counts.retry_later += 1
                log.info("SQS message %s: %s; left for redelivery",
                         good[group][0].get("MessageId", "?"), outcome)  # fmt: skip
        else:
            setattr(counts, outcome.status, getattr(counts, outcome.status) + 1)
    return [message for g, (message, _) in enumerate(good) if g not in waiting]


def _delete_sqs_messages(
    client: Any, url: str, messages: list[Mapping[str, Any]], counts: PollCounts
) -> None:
    # Applied and committed: a message not deleted is redelivered and found a repeat.
    for start in range(0, len(messages), 10):  # SQS deletes at most 10 per call
        chunk = messages[start : start + 10]
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(chunk)]
        try:
            response = client.delete_message_batch(QueueUrl=url, Entries=entries)
        except Exception:
            log.exception("%d SQS messages applied but not deleted", len(chunk))
            continue
        failed = response.get("Failed") or []
        counts.deleted += len(chunk) - len(failed)
        for entry in failed:
            which = chunk[int(entry["Id"])].get("MessageId", "?")
            log.error("SQS message %s applied but not deleted: %s", which, entry.get("Message"))
