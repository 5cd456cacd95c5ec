"""Tables and their state enums.

States follow DESIGN.md. Enums are stored as plain strings (no native DB enum) so the
same migrations run unchanged on SQLite and PostgreSQL and a new state is one line.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    or_,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from worker import clock as _clock
from worker.db import Base


def utcnow() -> datetime:
    # The one clock (worker.clock): tests and replays move it for every caller at once.
    return _clock.utcnow()


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; papermail stores UTC-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class StrEnum(enum.StrEnum):
    pass


class SubscriberStatus(StrEnum):
    PENDING = "pending"  # not yet confirmed (double opt-in)
    ACTIVE = "active"
    PAUSED = "paused"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"
    COMPLAINED = "complained"


# Nothing is ever sent to these until an operator lifts it.
SUPPRESSED_STATUSES = frozenset(
    {SubscriberStatus.UNSUBSCRIBED, SubscriberStatus.BOUNCED, SubscriberStatus.COMPLAINED}
)


class Frequency(StrEnum):
    DAILY = "daily"
    WEEKLY = "weekly"


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    COMPLAINED = "complained"
    SKIPPED = "skipped"
    FAILED = "failed"
    UNKNOWN = "unknown"


FINAL_DELIVERY_STATES = frozenset(
    {
        DeliveryState.SENT,
        DeliveryState.DELIVERED,
        DeliveryState.BOUNCED,
        DeliveryState.COMPLAINED,
        DeliveryState.SKIPPED,
        DeliveryState.FAILED,
        DeliveryState.UNKNOWN,
    }
)

# States in which the provider accepted the message.
ACCEPTED_DELIVERY_STATES = frozenset(
    {
        DeliveryState.SENT,
        DeliveryState.DELIVERED,
        DeliveryState.BOUNCED,
        DeliveryState.COMPLAINED,
    }
)

# A hard bounce as SES counts it for reputation (worker.events.edition_rates).
HARD_BOUNCE_PREDICATE = (
    "event_type = 'Bounce' AND subtype LIKE 'Permanent/%' "
    "AND subtype <> 'Permanent/OnAccountSuppressionList'"
)

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _state_check(column: str, enum_cls: type[enum.Enum]) -> str:
    values = ", ".join(f"'{member.value}'" for member in enum_cls)
    return f"{column} IN ({values})"


class Paper(Base):
    __tablename__ = "papers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # arXiv id or source id
    title: Mapped[str] = mapped_column(Text)
    abstract: Mapped[str] = mapped_column(Text, default="")
    authors: Mapped[list[str]] = mapped_column(JSON, default=list)
    upvotes: Mapped[int] = mapped_column(Integer, default=0)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    ingested_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    source: Mapped[str] = mapped_column(String(16), default="jsonl")
    url: Mapped[str | None] = mapped_column(Text)  # the paper's page
    pdf_url: Mapped[str | None] = mapped_column(Text)
    hf_url: Mapped[str | None] = mapped_column(Text)
    # arXiv metadata (from an arXiv feed or JSON Lines); Hugging Face leaves them alone.
    categories: Mapped[list[str]] = mapped_column(JSON, default=list)  # primary first
    arxiv_version: Mapped[int | None] = mapped_column(Integer)
    comment: Mapped[str | None] = mapped_column(Text)
    doi: Mapped[str | None] = mapped_column(String(255))
    # Every source that has given this paper (hf, arxiv, jsonl, sample); `source` is the last.
    sources: Mapped[list[str]] = mapped_column(JSON, default=list)

    @property
    def primary_category(self) -> str | None:
        return self.categories[0] if self.categories else None

    @property
    def effective_date(self) -> datetime:
        """When the paper counts as published for the look-back window."""
        return self.published_at or self.ingested_at


class Subscriber(Base):
    __tablename__ = "subscribers"
    __table_args__ = (
        CheckConstraint("max_papers BETWEEN 1 AND 50", name="max_papers_range"),
        CheckConstraint("send_hour BETWEEN 0 AND 23", name="send_hour_range"),
        CheckConstraint("weekday IS NULL OR weekday BETWEEN 0 AND 6", name="weekday_range"),
        CheckConstraint(_state_check("status", SubscriberStatus), name="status_valid"),
        CheckConstraint(_state_check("frequency", Frequency), name="frequency_valid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)  # normalised
    status: Mapped[str] = mapped_column(String(16), default=SubscriberStatus.PENDING, index=True)
    topics: Mapped[list[str]] = mapped_column(JSON, default=list)
    # arXiv category filters (worker.categories): keep only papers whose primary category
    # is in the first, drop papers with any category in the second; [] = no filter.
    categories_only: Mapped[list[str]] = mapped_column(JSON, default=list)
    categories_exclude: Mapped[list[str]] = mapped_column(JSON, default=list)
    max_papers: Mapped[int] = mapped_column(Integer, default=5)
    frequency: Mapped[str] = mapped_column(String(8), default=Frequency.DAILY)
    weekday: Mapped[int | None] = mapped_column(Integer)  # 0 = Monday; weekly only
    send_hour: Mapped[int] = mapped_column(Integer, default=7)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    paused_until: Mapped[date | None] = mapped_column(Date)
    # Operator suppression, independent of status (e.g. a legal request).
    suppressed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    suppression_reason: Mapped[str | None] = mapped_column(Text)
    soft_bounce_count: Mapped[int] = mapped_column(Integer, default=0)
    source: Mapped[str] = mapped_column(String(16), default="cli")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    unsubscribed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    deliveries: Mapped[list[Delivery]] = relationship(back_populates="subscriber")

    @property
    def is_suppressed(self) -> bool:
        return self.status in SUPPRESSED_STATUSES or self.suppressed_at is not None

    # The one sending rule, in Python and in SQL: active, not suppressed by an operator,
    # and not paused by date (``paused_until`` is the last paused day).
    def unsendable_reason(self, today: date) -> str | None:
        """Why an edition dated ``today`` must not go to this subscriber, or None."""
        if self.suppressed_at is not None:
            return f"suppressed: {self.suppression_reason or 'by operator'}"
        if self.status != SubscriberStatus.ACTIVE:
            return f"subscriber is {self.status}"
        if self.paused_until is not None and self.paused_until >= today:
            return f"paused until {self.paused_until.isoformat()}"
        return None

    @classmethod
    def sendable_clause(cls, today: Any) -> list[Any]:
        """The same rule as SQL conditions; ``today`` is a date or a date column."""
        return [
            cls.status == SubscriberStatus.ACTIVE,
            cls.suppressed_at.is_(None),
            or_(cls.paused_until.is_(None), cls.paused_until < today),
        ]


class Delivery(Base):
    """One edition for one subscriber: the unique row that decides whether mail goes out."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("subscriber_id", "edition_date", name="uq_deliveries_subscriber_edition"),
        CheckConstraint(_state_check("state", DeliveryState), name="state_valid"),
        # An edition's rows by state, in id order: counts (index-only), the sweep, and
        # `deliveries list` streaming one state at a time without a sort (worker.reports).
        Index("ix_deliveries_edition_state_id", "edition_date", "state", "id"),
        # The sweep's and the recovery's; on PostgreSQL only the rows still to settle, and
        # only rows with a provider id in the events' index (migration 0014).
        Index(
            "ix_deliveries_state_claimed",
            "state",
            "claimed_at",
            postgresql_where=text("state IN ('pending', 'sending')"),
        ),
        Index(
            "ix_deliveries_message_id",
            "message_id",
            postgresql_where=text("message_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id", ondelete="CASCADE"))
    edition_date: Mapped[date] = mapped_column(Date)
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    message_id: Mapped[str | None] = mapped_column(String(255))  # provider's id
    rfc_message_id: Mapped[str | None] = mapped_column(String(255))  # our Message-ID header
    last_error: Mapped[str | None] = mapped_column(Text)
    skip_reason: Mapped[str | None] = mapped_column(Text)
    # When the send is due (local send hour in UTC); retries push it later.
    scheduled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The broker life (worker.tasks.broker_epoch) the row's send task was published into;
    # NULL: not published, or handed back because the task could not be re-published.
    queued_epoch: Mapped[str | None] = mapped_column(String(64))
    # "papers": held back by the beat until the day's papers are fetched; `scheduled_at`
    # is then the deadline (worker.scheduling.release_waiting). Never claimed meanwhile.
    waiting_for: Mapped[str | None] = mapped_column(String(16))
    # The subscriber's settings the edition was made for (rendering.Recipient's fields),
    # written with its papers: "view in browser" shows the footer as it was sent.
    recipient: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Provider outcome timestamps.
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    bounced_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    complained_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    subscriber: Mapped[Subscriber] = relationship(back_populates="deliveries")
    papers: Mapped[list[DeliveryPaper]] = relationship(
        back_populates="delivery", order_by="DeliveryPaper.position", cascade="all, delete-orphan"
    )
    attempts_log: Mapped[list[DeliveryAttempt]] = relationship(
        back_populates="delivery", order_by="DeliveryAttempt.id", cascade="all, delete-orphan"
    )


def encode_terms(terms: Sequence[str]) -> str | None:
    """A pick's matched terms as stored in ``delivery_papers.matched_terms``."""
    return json.dumps(list(terms)) if terms else None


def decode_terms(stored: str | None) -> tuple[str, ...]:
    if not stored:
        return ()
    try:
        value = json.loads(stored)
    except ValueError:
        return ()
    return tuple(t for t in value if isinstance(t, str)) if isinstance(value, list) else ()


class DeliveryPaper(Base):
    """Which papers a delivery carried, in order, and why each was chosen."""

    __tablename__ = "delivery_papers"

    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("deliveries.id", ondelete="CASCADE"), primary_key=True
    )
    # No foreign key to papers: see migration 0008 (it cost most of the chunk's insert).
    # No index of its own: every query starts from a delivery (migration 0014).
    paper_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    matched_topic: Mapped[str | None] = mapped_column(Text)
    # JSON list of what in the paper matched the topic (see matched_terms_of); NULL: none.
    matched_terms: Mapped[str | None] = mapped_column(Text)

    @property
    def terms(self) -> tuple[str, ...]:
        """``matched_terms`` decoded: () when none was recorded (or it is unreadable)."""
        return decode_terms(self.matched_terms)

    score: Mapped[float] = mapped_column(Float, default=0.0)

    delivery: Mapped[Delivery] = relationship(back_populates="papers")


class DeliveryAttempt(Base):
    """Attempt history of a delivery: every send, retry and operator resend."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("deliveries.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(16), default="send")  # send | retry | resend
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str | None] = mapped_column(String(16))  # sent | transient | failed | ...
    error: Mapped[str | None] = mapped_column(Text)
    message_id: Mapped[str | None] = mapped_column(String(255))
    reason: Mapped[str | None] = mapped_column(Text)  # operator's --reason
    actor: Mapped[str | None] = mapped_column(String(64))

    delivery: Mapped[Delivery] = relationship(back_populates="attempts_log")


class ProviderEvent(Base):
    """A provider notification (bounce, complaint, delivery...), stored raw."""

    __tablename__ = "provider_events"
    __table_args__ = (
        Index("ix_provider_events_message", "provider_message_id"),
        # The reputation guard counts an edition's hard bounces after every batch of events
        # holding a bounce or complaint: from these rows only, not a scan of every event.
        Index(
            "ix_provider_events_hard_bounces",
            "delivery_id",
            postgresql_where=text(HARD_BOUNCE_PREDICATE),
            sqlite_where=text(HARD_BOUNCE_PREDICATE),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    # SNS MessageId (or a content hash when there is none): the deduplication key.
    dedupe_key: Mapped[str] = mapped_column(String(255), unique=True)
    event_type: Mapped[str] = mapped_column(String(32))  # Bounce, Complaint, Delivery, ...
    subtype: Mapped[str | None] = mapped_column(String(64))  # e.g. Permanent/General
    provider_message_id: Mapped[str | None] = mapped_column(String(255))
    delivery_id: Mapped[int | None] = mapped_column(
        ForeignKey("deliveries.id", ondelete="SET NULL"), index=True
    )
    recipients: Mapped[list[str]] = mapped_column(JSON, default=list)
    occurred_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    via: Mapped[str] = mapped_column(String(16), default="sns")  # sns | sqs | file
    orphan: Mapped[bool] = mapped_column(Boolean, default=False)
    raw: Mapped[dict[str, Any]] = mapped_column(JSON)


class Feedback(Base):
    """A subscriber's "more like this" (+1) or "less like this" (-1) on a paper."""

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("subscriber_id", "paper_id", name="uq_feedback_subscriber_paper"),
        CheckConstraint("vote IN (-1, 1)", name="vote_valid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(
        ForeignKey("subscribers.id", ondelete="CASCADE"), index=True
    )
    paper_id: Mapped[str] = mapped_column(ForeignKey("papers.id", ondelete="CASCADE"))
    vote: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class SubscriberLog(Base):
    """Audit trail of changes to a subscriber: who, when, what, why."""

    __tablename__ = "subscriber_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(
        ForeignKey("subscribers.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    action: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(32), default="cli")


class ControlFlag(Base):
    """Operator-visible switches, e.g. sending paused by the reputation guard."""

    __tablename__ = "control_flags"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Alert(Base):
    """An alert posted to PAPERMAIL_ALERT_WEBHOOK_URL (worker.alerts): its unique key is
    what keeps several workers and processes from sending it twice."""

    __tablename__ = "alerts"
    __table_args__ = (UniqueConstraint("key", name="uq_alerts_key"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200))  # kind:what, e.g. unknown:2031-03-14
    kind: Mapped[str] = mapped_column(String(32))
    edition_date: Mapped[date | None] = mapped_column(Date)
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # a process posting it
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)


class FetchStatus(StrEnum):
    OK = "ok"  # fetched, validated and stored
    NOT_MODIFIED = "not_modified"  # the source answered 304: nothing new since the last one
    FAILED = "failed"  # nothing stored; `error` says why


# A fetch in these states means the source's papers for that date are in the table.
FETCH_SUCCEEDED = frozenset({FetchStatus.OK, FetchStatus.NOT_MODIFIED})


class PaperFetch(Base):
    """One run of the scheduled fetch for one source and date (or `papers fetch`)."""

    __tablename__ = "paper_fetches"
    __table_args__ = (
        CheckConstraint(_state_check("status", FetchStatus), name="fetch_status_valid"),
        Index("ix_paper_fetches_date_source", "fetch_date", "source"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    source: Mapped[str] = mapped_column(String(16))  # hf | arxiv
    fetch_date: Mapped[date] = mapped_column(Date)  # the day whose papers were fetched
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    url: Mapped[str | None] = mapped_column(Text)  # the first request's URL
    http_status: Mapped[int | None] = mapped_column(Integer)  # of the last response
    requests: Mapped[int] = mapped_column(Integer, default=0)  # every attempt, retries too
    pages: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    papers: Mapped[int] = mapped_column(Integer, default=0)  # distinct papers received
    new: Mapped[int] = mapped_column(Integer, default=0)
    updated: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    etag: Mapped[str | None] = mapped_column(String(255))  # of the first page
    last_modified: Mapped[str | None] = mapped_column(String(64))


class FetchValidator(Base):
    """The validators (ETag, Last-Modified) a source last sent for a URL whose papers are
    stored: the next request for it is conditional, and a 304 costs no parsing or writes."""

    __tablename__ = "fetch_validators"
    __table_args__ = (UniqueConstraint("source", "url", name="uq_fetch_validators_source_url"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(16))
    url: Mapped[str] = mapped_column(Text)
    etag: Mapped[str | None] = mapped_column(String(255))
    last_modified: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
