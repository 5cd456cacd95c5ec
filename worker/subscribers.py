"""Subscribers: validated input, add, CSV import, history, operator suppression.

Everything here takes a SQLAlchemy session and leaves committing to the caller, so the
CLI, the web pages and the tasks share one implementation (and one transaction each).

Addresses are validated and normalised with email-validator without DNS look-ups, then
the *whole* address is lower-cased before it is stored. RFC 5321 lets a mail server treat
the local part case-sensitively, but practically none does, while people do type
``Alice@Example.org`` on one form and ``alice@example.org`` on another. Without the
lower-casing those would be two subscribers and one person would get every edition twice;
the unique ``subscribers.email`` column only protects us if equal addresses are spelled
equally.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import lru_cache
from operator import itemgetter
from pathlib import Path
from typing import IO, Any, AnyStr

import email_validator
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    literal,
    null,
    or_,
    select,
)
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select

from worker.categories import conflict, describe_filters, parse_categories
from worker.config import Settings, validate_timezone
from worker.errors import InvalidInput, NotFound, PapermailError
from worker.models import (
    SUPPRESSED_STATUSES,
    WEEKDAYS,
    Delivery,
    DeliveryAttempt,
    DeliveryPaper,
    Feedback,
    Frequency,
    Paper,
    ProviderEvent,
    Subscriber,
    SubscriberLog,
    SubscriberStatus,
    UTCDateTime,
    utcnow,
)
from worker.untrusted import WHITESPACE_CONTROLS, check_text
from worker.zones import canonical_zone

DEFAULT_MAX_PAPERS = 5
DEFAULT_FREQUENCY = Frequency.DAILY.value
DEFAULT_WEEKDAY = 0  # Monday, for weekly subscribers who do not choose
DEFAULT_SEND_HOUR = 7
DEFAULT_TIMEZONE = "UTC"
MAX_TOPICS = 20
MAX_TOPIC_LENGTH = 100
MAX_PAPERS_RANGE = (1, 50)
TOPIC_SEPARATORS = (",", ";")

# Columns of the import CSV, in documentation order (docs/subscribers-csv.md).
CSV_COLUMNS = (
    "email", "topics", "max_papers", "frequency", "weekday", "send_hour", "timezone",
    "categories", "exclude_categories",
)  # fmt: skip

# A filter for `list_subscribers` besides the statuses: anyone who gets nothing for good.
SUPPRESSED_FILTER = "suppressed"

# Bound parameters per IN (...) query: well under SQLite's and PostgreSQL's limits.
_IN_CHUNK = 900


class InvalidSubscriber(InvalidInput):
    """One or more subscriber fields are invalid; ``problems`` lists each, specifically."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class SubscriberExists(PapermailError):
    """The address is already a subscriber; nothing was changed."""


class ImportRejected(InvalidInput):
    """A CSV import had bad rows and ``skip_invalid`` was off: nothing was imported."""

    def __init__(self, report: ImportReport) -> None:
        self.report = report
        bad = len(report.rejected)
        super().__init__(
            f"{bad} of {report.rows} row{'s' if report.rows != 1 else ''} rejected, so nothing "
            "was imported; fix them, or re-run with --skip-invalid to import the good rows"
        )


# --- field validation -------------------------------------------------------------------


def normalize_email(value: object) -> str:
    """The stored form of an address: email-validator's normalised form, lower-cased.

    Raises ``ValueError`` with a specific message for anything that is not an address.
    """
    if not isinstance(value, str):
        raise ValueError(f"email must be text, got {value!r}")
    raw = check_text(value.strip(), "email")
    if not raw:
        raise ValueError("email is empty")
    fast = _plain_address(raw)
    if fast is not None:
        return fast
    try:
        result = validate_email(raw, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"invalid email {raw!r}: {exc}") from None
    # See the module docstring for why the local part is lower-cased too.
    return result.normalized.lower()


# The fast path of normalize_email, for the address almost everyone has: plain ASCII, one
# @, a dot-atom local part. For such an address, email-validator (with our options: no
# quoted local part, no domain literal, no display name, not strict, no DNS) only checks
# the local part against DOT_ATOM_TEXT, checks the domain with validate_email_domain_name
# (a pure function of the domain), joins the local part with its normalised domain and
# checks the three forms' lengths; ASCII text is unchanged by its NFC steps, and its
# lower-casing of RFC 2142 names is subsumed by ours. So this does the same steps, calls
# the library's own domain check once per distinct domain (a mailing list has few: this
# is where the time went), and leaves everything else, and every failure, to
# validate_email itself, so verdicts and messages are the library's.
# (tests/unit/test_email_fast_path.py compares the two on a broad corpus.)
try:  # email-validator 2's own pieces: the fast path checks exactly what it checks
    from email_validator.rfc_constants import DOT_ATOM_TEXT as _DOT_ATOM
    from email_validator.rfc_constants import EMAIL_MAX_LENGTH as _EMAIL_MAX_BYTES
    from email_validator.syntax import validate_email_domain_name as _check_domain
except ImportError:  # pragma: no cover - another layout: always the slow path
    _check_domain = None  # type: ignore[assignment]
_DOMAIN_CACHE_SIZE = 65536
_domain_forms: dict[str, tuple[str, int]] = {}  # domain -> (normalised form, longest form)


def _plain_address(raw: str) -> str | None:
    """normalize_email's result for a plain ASCII address, or None: ask email-validator."""
    if _check_domain is None or not raw.isascii() or raw.count("@") != 1:
        return None
    # Only with the library's defaults for what we do not pass (validate_email reads them
    # from its package at each call).
    if email_validator.STRICT or email_validator.TEST_ENVIRONMENT:
        return None
    if not email_validator.GLOBALLY_DELIVERABLE:
        return None
    local, _, domain = raw.partition("@")
    if not domain or (domain[0] == "[" and domain[-1] == "]") or not _DOT_ATOM.match(local):
        return None
    forms = _domain_forms.get(domain)
    if forms is None:
        try:
            result = _check_domain(domain, test_environment=False, globally_deliverable=True)
        except EmailNotValidError:
            return None  # validate_email raises it again, with the whole address
        normalised, ascii_form = result["domain"], result["ascii_domain"]
        longest = max(len(domain), len(normalised.encode()), len(ascii_form))
        if len(_domain_forms) >= _DOMAIN_CACHE_SIZE:
            _domain_forms.clear()
        forms = _domain_forms[domain] = (normalised, longest)
    if len(local) + 1 + forms[1] > _EMAIL_MAX_BYTES:
        return None
    return f"{local}@{forms[0]}".lower()


def sendable_email(value: object, settings: Settings | None = None) -> str:
    """:func:`normalize_email`, then refused (``ValueError``) if the configured mailer
    could never send to it (e.g. a non-ASCII local part, which SES does not accept)."""
    from worker.mailers.base import address_problem

    address = normalize_email(value)
    problem = address_problem(address, settings)
    if problem:
        raise UnsendableAddress(problem)
    return address


class UnsendableAddress(ValueError):
    """A well-formed address the configured mailer cannot send to."""


def parse_topics(value: object) -> tuple[str, ...]:
    """Free-text topic phrases from ``"a, b; c"`` or a list of phrases.

    Phrases are trimmed (inner whitespace collapsed), empty ones dropped and duplicates
    removed case-insensitively, keeping the first spelling. A string is split on commas
    and semicolons; list items are not split further.
    """
    if value is None:
        return ()
    if isinstance(value, str):
        text = check_text(value, "topics", allow=WHITESPACE_CONTROLS)
        for sep in TOPIC_SEPARATORS[1:]:
            text = text.replace(sep, TOPIC_SEPARATORS[0])
        items: Iterable[object] = text.split(TOPIC_SEPARATORS[0])
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise ValueError(f"topics must be text or a list of phrases, got {value!r}")
    topics: list[str] = []
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"each topic must be text, got {item!r}")
        # Checked before the whitespace is collapsed: str.split() eats some controls.
        check_text(item, "a topic", allow=WHITESPACE_CONTROLS)
        phrase = " ".join(item.split())
        if not phrase:
            continue
        if len(phrase) > MAX_TOPIC_LENGTH:
            raise ValueError(
                f"a topic may have at most {MAX_TOPIC_LENGTH} characters, got "
                f"{len(phrase)}: {phrase[:30]!r}…"
            )
        key = phrase.casefold()
        if key not in seen:
            seen.add(key)
            topics.append(phrase)
    if len(topics) > MAX_TOPICS:
        raise ValueError(f"at most {MAX_TOPICS} topics are allowed, got {len(topics)}")
    return tuple(topics)


def parse_only_categories(value: object) -> tuple[str, ...]:
    """The arXiv categories a subscriber keeps (worker.categories); blank: all."""
    if isinstance(value, str):
        check_text(value, "categories")
    return parse_categories(value, "categories")


def parse_exclude_categories(value: object) -> tuple[str, ...]:
    """The arXiv categories a subscriber never wants (worker.categories); blank: none."""
    if isinstance(value, str):
        check_text(value, "exclude categories")
    return parse_categories(value, "exclude categories")


def _whole_number(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("+-").isdigit():
            return int(text)
    raise ValueError(f"{what} must be a whole number, got {value!r}")


def parse_max_papers(value: object) -> int:
    low, high = MAX_PAPERS_RANGE
    number = _whole_number(value, "max papers")
    if not low <= number <= high:
        raise ValueError(f"max papers must be between {low} and {high}, got {number}")
    return number


def parse_send_hour(value: object) -> int:
    number = _whole_number(value, "hour")
    if not 0 <= number <= 23:
        raise ValueError(f"hour must be 0-23, got {number}")
    return number


def parse_frequency(value: object) -> str:
    text = value.strip().lower() if isinstance(value, str) else value
    if text not in {f.value for f in Frequency}:
        raise ValueError(f"frequency must be daily or weekly, got {value!r}")
    return str(text)


def parse_weekday(value: object) -> int:
    """0-6 (0 = Monday), a day name, or an unambiguous abbreviation of 3+ letters."""
    problem = (
        "weekday must be a day name (monday … sunday, or mon … sun) or 0-6 with 0 = Monday, "
        f"got {value!r}"
    )
    if isinstance(value, bool):
        raise ValueError(problem)
    if isinstance(value, int):
        if 0 <= value <= 6:
            return value
        raise ValueError(problem)
    if not isinstance(value, str):
        raise ValueError(problem)
    text = value.strip().lower()
    if text.isdigit():
        return parse_weekday(int(text))
    matches = [i for i, name in enumerate(WEEKDAYS) if len(text) >= 3 and name.startswith(text)]
    if len(matches) != 1:
        raise ValueError(problem)
    return matches[0]


@lru_cache(maxsize=1024)
def _timezone(name: str) -> str:
    # Stored under its canonical name: an alias (Asia/Calcutta) becomes Asia/Kolkata.
    return canonical_zone(validate_timezone(name))


def parse_timezone(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"time zone must be text, got {value!r}")
    return _timezone(check_text(value.strip(), "time zone"))


def weekday_name(index: int | None) -> str | None:
    return None if index is None else WEEKDAYS[index]


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


@dataclass(frozen=True, init=False)
class SubscriberInput:
    """A subscriber's address and preferences, validated and normalised.

    Every argument accepts what a person types (strings) as well as typed values; ``None``
    or a blank string means the default. All fields are checked and every problem is
    reported at once in one ``InvalidSubscriber``. ``weekday`` only matters for weekly
    subscribers (default Monday); for daily ones it is validated, then stored as ``None``.
    ``categories`` and ``exclude_categories`` are arXiv names (worker.categories), stored as
    ``categories_only`` and ``categories_exclude``.
    """

    email: str
    topics: tuple[str, ...]
    max_papers: int
    frequency: str
    weekday: int | None
    send_hour: int
    timezone: str
    categories_only: tuple[str, ...]
    categories_exclude: tuple[str, ...]

    def __init__(
        self,
        email: object,
        topics: object = None,
        max_papers: object = None,
        frequency: object = None,
        weekday: object = None,
        send_hour: object = None,
        timezone: object = None,
        categories: object = None,
        exclude_categories: object = None,
    ) -> None:
        problems: list[str] = []

        def check(parse: Callable[[object], Any], value: object, default: Any) -> Any:
            if _blank(value):
                return default
            try:
                return parse(value)
            except ValueError as exc:
                problems.append(str(exc))
                return default

        if _blank(email):
            problems.append("email is empty")
        values = {
            "email": check(sendable_email, email, ""),
            "topics": check(parse_topics, topics, ()),
            "max_papers": check(parse_max_papers, max_papers, DEFAULT_MAX_PAPERS),
            "frequency": check(parse_frequency, frequency, DEFAULT_FREQUENCY),
            "weekday": check(parse_weekday, weekday, None),
            "send_hour": check(parse_send_hour, send_hour, DEFAULT_SEND_HOUR),
            "timezone": check(parse_timezone, timezone, DEFAULT_TIMEZONE),
            "categories_only": check(parse_only_categories, categories, ()),
            "categories_exclude": check(parse_exclude_categories, exclude_categories, ()),
        }
        clash = conflict(values["categories_only"], values["categories_exclude"])
        if clash:
            problems.append(clash)
        if problems:
            raise InvalidSubscriber(problems)
        if values["frequency"] == Frequency.WEEKLY.value:
            if values["weekday"] is None:
                values["weekday"] = DEFAULT_WEEKDAY
        else:
            values["weekday"] = None
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def parse(cls, **values: object) -> SubscriberInput:
        """The same as the constructor, from keyword arguments (a form or a CSV row)."""
        return cls(**values)

    def describe(self) -> str:
        """One line for logs and messages: schedule, size, topics."""
        return describe_preferences(
            self.frequency,
            self.weekday,
            self.send_hour,
            self.timezone,
            self.max_papers,
            list(self.topics),
            self.categories_only,
            self.categories_exclude,
        )

    def row(self) -> dict[str, Any]:
        """Column values for a ``subscribers`` row."""
        return {
            "email": self.email,
            "topics": list(self.topics),
            "max_papers": self.max_papers,
            "frequency": self.frequency,
            "weekday": self.weekday,
            "send_hour": self.send_hour,
            "timezone": self.timezone,
            "categories_only": list(self.categories_only),
            "categories_exclude": list(self.categories_exclude),
        }


def describe_preferences(
    frequency: str,
    weekday: int | None,
    send_hour: int,
    timezone: str,
    max_papers: int,
    topics: list[str] | tuple[str, ...],
    categories_only: Sequence[str] = (),
    categories_exclude: Sequence[str] = (),
) -> str:
    schedule = _describe_schedule(frequency, weekday, send_hour, timezone, max_papers)
    return (
        f"{schedule}; topics: {_describe_topics(topics)}"
        f"{_describe_categories(categories_only, categories_exclude)}"
    )


def _describe_categories(only: Sequence[str], exclude: Sequence[str]) -> str:
    """The filters for a description ("; arXiv categories: only cs.LG"), or ""."""
    filters = describe_filters(only, exclude)
    return f"; arXiv categories: {filters}" if filters else ""


def _describe_schedule(
    frequency: str, weekday: int | None, send_hour: int, timezone: str, max_papers: int
) -> str:
    when = "daily" if frequency == Frequency.DAILY.value else f"weekly on {weekday_name(weekday)}"
    return f"{when} at {send_hour:02d}:00 {timezone}, up to {max_papers} papers"


def _describe_topics(topics: list[str] | tuple[str, ...]) -> str:
    return ", ".join(topics) if topics else "(no topics: the top trending papers)"


# --- add, look up, list -----------------------------------------------------------------


def _log(session: Session, subscriber_id: int, action: str, detail: str, actor: str) -> None:
    session.add(
        SubscriberLog(
            subscriber_id=subscriber_id,
            action=action,
            detail=detail,
            actor=actor[:32],
            at=utcnow(),
        )
    )


def _status_note(confirmed: bool) -> str:
    if confirmed:
        return "status active (confirmed: the operator vouched for consent)"
    return "status pending (until they confirm by email)"


def _exists_error(sub: Subscriber) -> SubscriberExists:
    return SubscriberExists(
        f"{sub.email} is already a subscriber (status {sub.status}); nothing was changed. "
        f"See `papermail subscribers show {sub.email}`"
    )


def add_subscriber(
    session: Session,
    data: SubscriberInput,
    confirmed: bool,
    actor: str = "cli",
    *,
    exist_ok: bool = False,
) -> tuple[Subscriber, bool]:
    """Add one subscriber; returns ``(subscriber, created)``.

    ``confirmed`` (the operator vouches for consent) makes them ``active`` at once;
    otherwise they are ``pending`` until they confirm. An address that is already a
    subscriber is never changed (that would silently re-subscribe someone who
    unsubscribed or bounced): it raises ``SubscriberExists``, or with ``exist_ok`` returns
    the existing row untouched and ``created=False``. After a ``SubscriberExists`` raised
    by a concurrent insert the session must be rolled back.
    """
    existing = session.scalar(select(Subscriber).where(Subscriber.email == data.email))
    if existing is not None:
        if exist_ok:
            return existing, False
        raise _exists_error(existing)
    now = utcnow()
    status = SubscriberStatus.ACTIVE if confirmed else SubscriberStatus.PENDING
    sub = Subscriber(
        **data.row(),
        status=status.value,
        source=actor[:16],
        soft_bounce_count=0,
        created_at=now,
        updated_at=now,
        confirmed_at=now if confirmed else None,
    )
    session.add(sub)
    try:
        session.flush()
    except IntegrityError:  # added concurrently between our check and insert
        raise SubscriberExists(
            f"{data.email} is already a subscriber; nothing was changed. "
            f"See `papermail subscribers show {data.email}`"
        ) from None
    _log(session, sub.id, "created", f"{_status_note(confirmed)}; {data.describe()}", actor)
    return sub, True


def _lookup_key(email: str) -> str:
    try:
        return normalize_email(email)
    except ValueError:
        return email.strip().lower()


def get_subscriber(session: Session, email: str) -> Subscriber:
    """The subscriber with this address (any spelling that normalises to it)."""
    key = _lookup_key(email)
    sub = session.scalar(select(Subscriber).where(Subscriber.email == key))
    if sub is None:
        raise NotFound(
            f"no subscriber with address {email.strip()!r}; see `papermail subscribers list`"
        )
    return sub


def subscribers_query(status: str | None = None) -> Select[tuple[Subscriber]]:
    """The query of :func:`list_subscribers` (id order, optional status filter).

    ``status="suppressed"`` selects everyone who gets nothing for good: unsubscribed,
    bounced, complained, or suppressed by an operator.
    """
    query = select(Subscriber).order_by(Subscriber.id)
    if status is None:
        return query
    wanted = status.strip().lower()
    if wanted == SUPPRESSED_FILTER:
        return query.where(
            or_(
                Subscriber.status.in_([s.value for s in SUPPRESSED_STATUSES]),
                Subscriber.suppressed_at.is_not(None),
            )
        )
    if wanted == SubscriberStatus.PAUSED.value:
        # Subscribers pause themselves with a date ("pause until"), not a status.
        today = utcnow().date()
        return query.where(or_(Subscriber.status == wanted, Subscriber.paused_until >= today))
    if wanted in {s.value for s in SubscriberStatus}:
        return query.where(Subscriber.status == wanted)
    choices = ", ".join([*(s.value for s in SubscriberStatus), SUPPRESSED_FILTER])
    raise InvalidInput(f"unknown status {status!r}; choose one of {choices}")


def list_subscribers(session: Session, status: str | None = None) -> list[Subscriber]:
    """Subscribers in the order they were added, optionally of one status (see
    :func:`subscribers_query`). For big lists use :func:`iter_subscribers`."""
    return list(session.scalars(subscribers_query(status)))


def iter_subscriber_dicts(
    session: Session, status: str | None = None, batch: int = 2000
) -> Iterator[dict[str, Any]]:
    """:func:`subscriber_to_dict` of each subscriber :func:`list_subscribers` would list,
    streamed: plain rows (no ORM objects) from a server-side cursor on PostgreSQL,
    ``batch`` at a time, so memory stays flat for any number of subscribers."""
    query = subscribers_query(status)
    rows = query.with_only_columns(*Subscriber.__table__.columns).execution_options(yield_per=batch)
    for row in session.execute(rows):
        yield subscriber_to_dict(row)


def longest_email(session: Session, status: str | None = None) -> int:
    """Length of the longest address :func:`list_subscribers` would list (0 if none)."""
    listed = subscribers_query(status).with_only_columns(Subscriber.email).subquery()
    return session.scalar(select(func.max(func.length(listed.c.email)))) or 0


def status_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Subscriber.status, func.count()).group_by(Subscriber.status))
    return {status: count for status, count in rows}


def is_sendable(sub: Subscriber, today: date) -> bool:
    """Whether an edition dated ``today`` (the subscriber's local date) may go to ``sub``
    (the rule lives in ``Subscriber.unsendable_reason``)."""
    return sub.unsendable_reason(today) is None


# --- suppression ------------------------------------------------------------------------


@dataclass(frozen=True)
class SuppressionResult:
    subscriber: Subscriber
    changed: bool
    message: str


def _require_reason(reason: str) -> str:
    text = (reason or "").strip()
    if not text:
        raise InvalidInput(
            "a reason is required, e.g. --reason 'legal request, ticket 123'; "
            "it is kept in the subscriber's log"
        )
    return text


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "?"


def suppress(session: Session, email: str, reason: str, actor: str = "cli") -> SuppressionResult:
    """Operator suppression: nothing is sent to the address until ``unsuppress``.

    Independent of the status, so a later status change (e.g. the subscriber re-confirming)
    does not lift it. Suppressing an address that already carries an operator suppression
    changes nothing and says so.
    """
    why = _require_reason(reason)
    sub = get_subscriber(session, email)
    if sub.suppressed_at is not None:
        return SuppressionResult(
            sub,
            False,
            f"{sub.email} is already suppressed since {_when(sub.suppressed_at)} "
            f"(reason: {sub.suppression_reason!r}); nothing changed",
        )
    now = utcnow()
    sub.suppressed_at = now
    sub.suppression_reason = why
    sub.updated_at = now
    _log(session, sub.id, "suppressed", f"reason: {why}; status stays {sub.status}", actor)
    session.flush()
    note = ""
    if sub.status in SUPPRESSED_STATUSES:
        note = f" (their status {sub.status} already stopped mail)"
    return SuppressionResult(sub, True, f"suppressed {sub.email}: {why}{note}")


def unsuppress(session: Session, email: str, reason: str, actor: str = "cli") -> SuppressionResult:
    """Lift every suppression: the operator's, and an unsubscribed/bounced/complained status.

    Such a status goes back to ``active`` — or to ``pending`` when the subscriber never
    confirmed, so lifting never stands in for consent — and the soft-bounce count restarts
    at 0. The old state is written to the subscriber's log. ``pending`` and ``paused``
    are not suppressions and stay as they are.
    """
    why = _require_reason(reason)
    sub = get_subscriber(session, email)
    by_status = sub.status in SUPPRESSED_STATUSES
    if sub.suppressed_at is None and not by_status:
        return SuppressionResult(
            sub, False, f"{sub.email} is not suppressed (status {sub.status}); nothing changed"
        )
    was: list[str] = []
    changes: list[str] = []
    if sub.suppressed_at is not None:
        was.append(
            f"operator suppression since {_when(sub.suppressed_at)} "
            f"(reason: {sub.suppression_reason!r})"
        )
        changes.append("operator suppression cleared")
        sub.suppressed_at = None
        sub.suppression_reason = None
    if by_status:
        new_status = (
            SubscriberStatus.ACTIVE if sub.confirmed_at is not None else SubscriberStatus.PENDING
        )
        was.append(f"status {sub.status}")
        changes.append(f"status {sub.status} -> {new_status.value}")
        if sub.status == SubscriberStatus.UNSUBSCRIBED.value and sub.unsubscribed_at:
            was.append(f"unsubscribed at {_when(sub.unsubscribed_at)}")
        sub.status = new_status.value
        sub.unsubscribed_at = None
    if sub.soft_bounce_count:
        was.append(f"{sub.soft_bounce_count} soft bounces")
        changes.append(f"soft bounce count {sub.soft_bounce_count} -> 0")
    sub.soft_bounce_count = 0
    sub.updated_at = utcnow()
    _log(
        session,
        sub.id,
        "unsuppressed",
        f"reason: {why}; was: {', '.join(was)}; now status {sub.status}",
        actor,
    )
    session.flush()
    return SuppressionResult(sub, True, f"lifted suppression of {sub.email}: {'; '.join(changes)}")


# --- CSV import -------------------------------------------------------------------------


@dataclass(frozen=True)
class RowError:
    line: int
    reason: str
    email: str | None = None  # the cell as written, when there was one

    def __str__(self) -> str:
        if self.email and self.email not in self.reason:
            return f"line {self.line} ({self.email}): {self.reason}"
        return f"line {self.line}: {self.reason}"


@dataclass
class ImportReport:
    """What an import did (or, when rejected, would have done)."""

    source: str
    confirmed: bool
    skip_invalid: bool
    rows: int = 0  # data rows read (blank lines not counted)
    created: int = 0
    existing: list[dict[str, Any]] = field(default_factory=list)  # email, line, status
    merged: list[dict[str, Any]] = field(default_factory=list)  # email, lines
    rejected: list[RowError] = field(default_factory=list)
    imported: bool = False  # False: nothing was written

    @property
    def ok(self) -> bool:
        return self.imported and not self.rejected

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "confirmed": self.confirmed,
            "skip_invalid": self.skip_invalid,
            "imported": self.imported,
            "rows": self.rows,
            "created": self.created,
            "existing": self.existing,
            "merged": self.merged,
            "rejected": [
                {"line": r.line, "reason": r.reason, "email": r.email} for r in self.rejected
            ],
        }


def _header_key(cell: str) -> str:
    return "_".join(cell.strip().lower().replace("-", " ").split())


def _read_header(row: list[str], line: int) -> list[str]:
    names = [_header_key(cell) for cell in row]
    if any(";" in cell or "\t" in cell for cell in row) and len(row) == 1:
        raise InvalidInput(
            f"line {line}: the header {row[0]!r} is one column; papermail expects "
            "comma-separated values (see docs/subscribers-csv.md)"
        )
    unknown = [row[i].strip() for i, name in enumerate(names) if name not in CSV_COLUMNS]
    if unknown:
        listed = ", ".join(repr(u) for u in unknown)
        hint = ""
        if "email" not in names and any("@" in u for u in unknown):
            hint = "; the first line must be a header row naming the columns"
        raise InvalidInput(
            f"line {line}: unknown column{'s' if len(unknown) > 1 else ''} {listed}; "
            f"the columns are {', '.join(CSV_COLUMNS)}{hint}"
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidInput(f"line {line}: column {', '.join(dupes)} appears more than once")
    if "email" not in names:
        raise InvalidInput(f"line {line}: the header row has no 'email' column, which is required")
    return names


# Rows validated and staged per batch: bounds the memory of an import of any size.
_IMPORT_BATCH = 5000
# Bits of the filter that marks rows whose address may have come before (16 MB).
_SEEN_BITS = 1 << 27
# PostgreSQL's work_mem for an import's transaction (the server's default is 4 MB).
_IMPORT_WORK_MEM = "64MB"
# The file is read in blocks of this many bytes (characters for text), each cut at its
# last line break: the CSV reader gets whole lines without a Python step per line.
_READ_BLOCK = 65536

# Called with the bytes (characters) read so far, after each block.
OnRead = Callable[[int], None]


@contextmanager
def _open_lines(
    source: Path | str | IO[str], on_read: OnRead | None = None
) -> Iterator[tuple[Iterator[str], str, int | None]]:
    """The source's lines (streamed, never read whole), its name and its size when known.
    Lines end at LF, CRLF or a bare CR (old Mac exports), as in a file opened with
    ``newline=""``."""
    if isinstance(source, str):
        text = source.removeprefix("\ufeff")
        blocks = (text[i : i + _READ_BLOCK] for i in range(0, len(text), _READ_BLOCK))
        yield _lines(_at_line_breaks(_counted(blocks, on_read), "")), "<text>", len(source)
        return
    if isinstance(source, os.PathLike):
        path = Path(source)
        try:
            fh = path.open("rb")
            size = os.fstat(fh.fileno()).st_size
        except FileNotFoundError:
            raise InvalidInput(f"{path}: no such file") from None
        except OSError as exc:
            raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
        with fh:
            yield _lines(_decoded(fh, path, on_read)), str(path), size
        return
    name = getattr(source, "name", "<stream>")
    chunks = _counted(_text_blocks(source, name), on_read)
    yield _lines(_at_line_breaks(chunks, "")), name, None


def _lines(blocks: Iterable[str]) -> Iterator[str]:
    """The lines of text that arrives in blocks, each block ending at a line break."""
    return itertools.chain.from_iterable(io.StringIO(b, newline="") for b in blocks)


def _line_cut(block: AnyStr) -> int:
    """Where the complete lines of ``block`` end (0: none is known to be complete). A CR
    at the very end may be the first half of a CRLF, so it waits for the next block."""
    lf, cr = ("\n", "\r") if isinstance(block, str) else (b"\n", b"\r")
    return max(block.rfind(lf), block.rfind(cr, 0, len(block) - 1)) + 1  # type: ignore[arg-type]


def _at_line_breaks(blocks: Iterable[AnyStr], empty: AnyStr) -> Iterator[AnyStr]:
    """The same data in blocks that each end at a line break (the last: at the end)."""
    lf, cr = ("\n", "\r") if isinstance(empty, str) else (b"\n", b"\r")
    parts: list[AnyStr] = []  # the data since the last break: no break in it but a final CR
    for chunk in blocks:
        if parts and parts[-1][-1:] == cr and chunk[:1] != lf:
            yield empty.join(parts)  # that CR was a bare CR: a line ends there
            parts = []
        cut = _line_cut(chunk)
        if cut:
            parts.append(chunk[:cut])
            yield empty.join(parts)
            parts = [chunk[cut:]] if cut < len(chunk) else []
        elif chunk:
            parts.append(chunk)
    if parts:
        yield empty.join(parts)


def _counted(blocks: Iterable[str], on_read: OnRead | None) -> Iterator[str]:
    done = 0
    for block in blocks:
        done += len(block)
        if on_read is not None:
            on_read(done)
        yield block


def _text_blocks(fh: IO[str], name: str) -> Iterator[str]:
    first = True
    try:
        while block := fh.read(_READ_BLOCK):
            yield block.removeprefix("\ufeff") if first else block
            first = False
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{name} is not UTF-8 text ({exc.reason}); send UTF-8") from None


def _byte_blocks(fh: IO[bytes], path: Path, on_read: OnRead | None) -> Iterator[bytes]:
    done = 0
    try:
        while chunk := fh.read(_READ_BLOCK):
            done += len(chunk)
            if on_read is not None:
                on_read(done)
            yield chunk
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None


def _line_breaks(data: bytes) -> int:
    """Lines ended in ``data`` (LF, CRLF, bare CR)."""
    return data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")


def _decoded(fh: IO[bytes], path: Path, on_read: OnRead | None = None) -> Iterator[str]:
    """Blocks of a UTF-8 file (a byte-order mark is fine), cut at line breaks so that no
    character is split; a decoding error names the exact byte and line."""
    offset = 0  # of the block in the file
    lines = 0  # lines before the block
    for block in _at_line_breaks(_byte_blocks(fh, path, on_read), b""):
        start = 3 if offset == 0 and block.startswith(b"\xef\xbb\xbf") else 0
        try:
            text = block[start:].decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = start + exc.start
            raise InvalidInput(
                f"{path} is not UTF-8 text ({exc.reason} at byte {offset + bad}, "
                f"line {lines + _line_breaks(block[:bad]) + 1}); save the CSV as UTF-8"
            ) from None
        offset += len(block)
        lines += _line_breaks(block)
        yield text


def _records(lines: Iterator[str]) -> Iterator[tuple[int, list[str]]]:
    """(start line, cells) of each non-blank record, header first; one pass, streamed."""
    reader = csv.reader(lines)
    previous = 0
    try:
        for cells in reader:
            start, previous = previous + 1, reader.line_num
            if "".join(cells).strip():  # some cell is not blank
                yield start, cells
    except csv.Error as exc:
        raise InvalidInput(f"line {reader.line_num}: cannot read the CSV: {exc}") from None


def _chunks(items: Sequence[Any], size: int = _IN_CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _stage_table() -> Table:
    """The import's staging table: one row per valid CSV row, in a temporary table of the
    import's own connection (dropped at commit or rollback on PostgreSQL, by us on SQLite).
    Duplicates, existing addresses and the insert itself are then set operations in SQL,
    so the Python process never holds more than one batch of rows."""
    return Table(
        "papermail_import_stage",
        MetaData(),
        Column("line", Integer, nullable=False),
        Column("email", String(320), nullable=False),
        Column("topics", JSON, nullable=False),
        Column("max_papers", Integer, nullable=False),
        Column("frequency", String(8), nullable=False),
        Column("weekday", Integer),
        Column("send_hour", Integer, nullable=False),
        Column("timezone", String(64), nullable=False),
        Column("describe", Text, nullable=False),
        Column("categories_only", JSON, nullable=False),
        Column("categories_exclude", JSON, nullable=False),
        Column("lines", Text),  # of a merged row ("2, 9"); else just ``line``
        # The row's cells as written ("" when blank), for merging duplicates.
        *(Column(f"cell_{name}", Text) for name in CSV_COLUMNS),
        # The address may have come before (see _Stage.add): only such addresses are
        # looked at for duplicates.
        Column("again", Boolean, nullable=False),
        prefixes=["TEMPORARY"],
        postgresql_on_commit="DROP",
    )


# What a staged row holds besides its line, raw cells and lines: email, topics (JSON),
# max_papers, frequency, weekday, send_hour, timezone, describe(), categories_only and
# categories_exclude (JSON).
Staged = tuple[str, str, int, str, int | None, int, str, str, str, str]


def _staged(data: SubscriberInput) -> Staged:
    return (
        data.email,
        json.dumps(list(data.topics), ensure_ascii=False),
        data.max_papers,
        data.frequency,
        data.weekday,
        data.send_hour,
        data.timezone,
        data.describe(),
        json.dumps(list(data.categories_only)),
        json.dumps(list(data.categories_exclude)),
    )


_MISSING = object()
_MEMO_SIZE = 4096  # distinct cells remembered per column


class _RowParser:
    """``_staged(SubscriberInput(**raw))`` for the rows of one import, fast.

    A row comes as its cells in ``CSV_COLUMNS`` order (stripped, "" when blank). A list
    repeats the same few topics, numbers, days and zones, so each distinct cell's parsed
    value is remembered (the parsers are pure functions of the cell), the address takes
    normalize_email's fast path, and the mailer's address check is looked up once. Any row
    with a problem gets ``None``: SubscriberInput then reports it in its own words
    (tests/unit/test_import_scale.py compares the two on many rows).
    """

    def __init__(self) -> None:
        from worker.mailers.base import mailer_class

        self.address_problem = mailer_class(None).address_problem
        # Per column after the email, in the order SubscriberInput checks them: its
        # parser, and its memo of distinct cells (a blank cell is the default).
        self.parsers: list[Callable[[str], Any]] = [
            self._topics, parse_max_papers, parse_frequency, parse_weekday, parse_send_hour,
            parse_timezone, self._only, self._exclude,
        ]  # fmt: skip
        self.blanks = [
            ("[]", _describe_topics(())), DEFAULT_MAX_PAPERS, DEFAULT_FREQUENCY, None,
            DEFAULT_SEND_HOUR, DEFAULT_TIMEZONE, ("[]", ()), ("[]", ()),
        ]  # fmt: skip
        self.memos: list[dict[str, Any]] = [{"": blank} for blank in self.blanks]
        self.missing = (_MISSING,) * len(self.memos)
        self.schedules: dict[tuple[Any, ...], str] = {}

    @staticmethod
    def _topics(cell: str) -> tuple[str, str]:
        topics = parse_topics(cell)
        return json.dumps(list(topics), ensure_ascii=False), _describe_topics(topics)

    @staticmethod
    def _only(cell: str) -> tuple[str, tuple[str, ...]]:
        names = parse_only_categories(cell)
        return json.dumps(list(names)), names

    @staticmethod
    def _exclude(cell: str) -> tuple[str, tuple[str, ...]]:
        names = parse_exclude_categories(cell)
        return json.dumps(list(names)), names

    def staged(self, written: Sequence[str]) -> Staged | None:
        """The row's staged values, or None if SubscriberInput must judge it."""
        try:
            email = normalize_email(written[0])
        except ValueError:
            return None
        if self.address_problem(email) is not None:
            return None
        values = list(map(dict.get, self.memos, written[1:], self.missing))
        if _MISSING in values:
            for i, value in enumerate(values):
                if value is _MISSING:
                    cell, memo = written[i + 1], self.memos[i]
                    try:
                        values[i] = self.parsers[i](cell)
                    except ValueError:
                        return None
                    if len(memo) >= _MEMO_SIZE:
                        memo.clear()
                        memo[""] = self.blanks[i]
                    memo[cell] = values[i]
        topics, max_papers, frequency, weekday, send_hour, timezone, only, exclude = values
        if (only[1] or exclude[1]) and conflict(only[1], exclude[1]):
            return None
        if frequency == _WEEKLY:
            if weekday is None:
                weekday = DEFAULT_WEEKDAY
        else:
            weekday = None
        key = (frequency, weekday, send_hour, timezone, max_papers)
        schedule = self.schedules.get(key)
        if schedule is None:
            if len(self.schedules) >= _MEMO_SIZE:
                self.schedules.clear()
            schedule = self.schedules[key] = _describe_schedule(*key)
        return (
            email, topics[0], max_papers, frequency, weekday, send_hour, timezone,
            f"{schedule}; topics: {topics[1]}{_describe_categories(only[1], exclude[1])}",
            only[0], exclude[0],
        )  # fmt: skip


_WEEKLY = Frequency.WEEKLY.value


class _Stage:
    """Validated rows into the staging table: on PostgreSQL one COPY streams the whole
    file while it is read (so the server parses rows while we validate the next ones);
    on SQLite, batched inserts."""

    columns = (
        "line", "email", "topics", "max_papers", "frequency", "weekday", "send_hour",
        "timezone", "describe", "categories_only", "categories_exclude", "lines",
        *(f"cell_{name}" for name in CSV_COLUMNS), "again",
    )  # fmt: skip

    def __init__(self, session: Session) -> None:
        self.session = session
        self.table = _stage_table()
        self.postgres = session.get_bind().dialect.name == "postgresql"
        conn = session.connection()
        if not self.postgres:
            self.table.drop(conn, checkfirst=True)
        self.table.create(conn)
        self.rows: list[tuple[Any, ...]] = []
        self.copy: Any = None  # the open COPY while streaming (PostgreSQL)
        # One bit per hash of an address (a Bloom filter with one hash): a row whose bit
        # is set already may repeat an earlier address (or share its bit: about 0.4% of
        # rows at 1M, whatever the size of the file, in a fixed 16 MB).
        self.seen = bytearray(_SEEN_BITS // 8)
        self.again = False  # some row may repeat an earlier address

    @contextmanager
    def streaming(self) -> Iterator[None]:
        """Rows added inside go straight into one COPY (PostgreSQL); it ends with the
        block, or is aborted by an exception (and the transaction with it)."""
        if not self.postgres:
            yield
            self.flush()
            return
        cursor = self.session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            with cursor.copy(self._copy_sql()) as copy:
                self.copy = copy
                yield
        finally:
            self.copy = None
            cursor.close()

    def _copy_sql(self) -> str:
        return f"COPY papermail_import_stage ({', '.join(self.columns)}) FROM STDIN"

    def add(
        self, line: int, written: Sequence[str], values: Staged, lines: str | None = None
    ) -> None:
        """Stage one row: its line, values, merged lines and cells (CSV_COLUMNS order)."""
        bit = hash(values[0]) & (_SEEN_BITS - 1)
        byte, mask = bit >> 3, 1 << (bit & 7)
        again = bool(self.seen[byte] & mask)
        if again:
            self.again = True
        else:
            self.seen[byte] |= mask
        row = (line, *values, lines, *written, again)
        if self.copy is not None:
            self.copy.write_row(row)
            return
        self.rows.append(row)
        if len(self.rows) >= _IMPORT_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        if self.postgres:
            cursor = self.session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
            with cursor.copy(self._copy_sql()) as copy:
                for row in self.rows:
                    copy.write_row(row)
            cursor.close()
        else:
            params = [dict(zip(self.columns, row, strict=True)) for row in self.rows]
            for item in params:  # the JSON type serialises itself on SQLite
                for name in ("topics", "categories_only", "categories_exclude"):
                    item[name] = json.loads(item[name])
            self.session.execute(insert(self.table), params)
        self.rows.clear()

    def drop(self) -> None:
        if not self.postgres:
            self.table.drop(self.session.connection(), checkfirst=True)


def _merge_duplicates(session: Session, stage: _Stage, report: ImportReport) -> None:
    """Rows with the same address become one, later non-empty cells winning: one
    statement takes every row of a repeated address out of the staging table, whatever
    the number of duplicates, and the merged rows go back in. Only the addresses of rows
    marked ``again`` can repeat, so only those are grouped."""
    if not stage.again:
        return
    t = stage.table
    candidates = select(t.c.email).where(t.c.again)
    dupes = (
        select(t.c.email)
        .where(t.c.email.in_(candidates))
        .group_by(t.c.email)
        .having(func.count() > 1)
    )
    cells = [t.c[f"cell_{name}"] for name in CSV_COLUMNS]
    rows = session.execute(
        delete(t).where(t.c.email.in_(dupes)).returning(t.c.email, t.c.line, *cells)
    ).all()
    if not rows:
        return
    groups: dict[str, list[tuple[int, Sequence[str]]]] = {}
    for email, line, *cells_of_row in sorted(rows, key=lambda row: row[1]):  # only duplicates
        groups.setdefault(email, []).append((line, cells_of_row))
    for email, items in groups.items():  # in order of first appearance
        merged: dict[str, str] = {}
        for _, written in items:
            merged.update((k, v) for k, v in zip(CSV_COLUMNS, written, strict=True) if v)
        lines = [line for line, _ in items]
        report.merged.append({"email": email, "lines": lines})
        values = _staged(SubscriberInput(**merged))
        cells_merged = [merged.get(name, "") for name in CSV_COLUMNS]
        stage.add(lines[0], cells_merged, values, ", ".join(map(str, lines)))
    stage.flush()


def import_csv(
    session: Session,
    source: Path | str | IO[str],
    confirmed: bool = False,
    skip_invalid: bool = False,
    *,
    actor: str = "cli",
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Import subscribers from CSV (columns: ``CSV_COLUMNS``; docs/subscribers-csv.md).

    ``source`` is a path (``Path``), the CSV text itself (``str``) or an open text file.
    Every row is validated. Rows with the same normalised address are merged (later
    non-empty cells win) and reported in ``merged``. Addresses that are already
    subscribers are left unchanged and reported in ``existing``. Bad rows are reported with
    their line numbers; unless ``skip_invalid``, any bad row rejects the whole file with
    ``ImportRejected`` and nothing is written. A bad header (unknown or missing columns)
    always rejects the file with ``InvalidInput``. ``progress(done, total)`` is called
    while the file is read, in steps of 64 KiB (bytes of a file of ``total`` bytes,
    characters of text; not called for a stream of unknown size). Everything happens in
    the caller's transaction.

    The file is streamed in one pass: rows are validated and staged in a temporary table
    as they are read, so memory stays flat whatever the size of the file.
    """
    report = ImportReport(
        source=getattr(source, "name", "<stream>") if not isinstance(source, Path | str)
        else str(source) if isinstance(source, Path) else "<text>",
        confirmed=confirmed,
        skip_invalid=skip_invalid,
    )  # fmt: skip
    read = 0
    total: int | None = None

    def on_read(done: int) -> None:
        nonlocal read
        before, read = read, done
        if progress is not None and total and read // 65536 != before // 65536:
            progress(min(read, total), total)

    with _open_lines(source, on_read) as (lines, name, size):
        total = size
        report.source = name
        records = _records(lines)
        first = next(records, None)
        if first is None:
            raise InvalidInput(
                "the file is empty; it needs a header row naming the columns "
                f"({', '.join(CSV_COLUMNS)})"
            )
        header = _read_header(first[1], first[0])
        stage = _Stage(session)
        with stage.streaming():
            _stage_rows(records, header, stage, report)
        if progress is not None and size:
            progress(size, size)
    try:
        return _import_staged(session, stage, report, actor)
    finally:
        stage.drop()


def _stage_rows(
    records: Iterator[tuple[int, list[str]]],
    header: list[str],
    stage: _Stage,
    report: ImportReport,
) -> None:
    """Validate each record and stage the good ones; the bad ones go to the report."""
    width = len(header)
    # A row's cells in CSV_COLUMNS order; a column the file lacks reads the "" appended
    # to every row.
    written_of = itemgetter(*(header.index(c) if c in header else -1 for c in CSV_COLUMNS))
    padding = [""] * width
    parser = _RowParser()
    rows = 0
    add, staged, strip = stage.add, parser.staged, str.strip
    for line, cells in records:
        rows += 1
        if len(cells) > width and "".join(cells[width:]).strip():
            report.rejected.append(
                RowError(
                    line,
                    f"{len(cells)} cells but the header has {width} columns (put cells "
                    'that contain commas in double quotes, e.g. "llm, diffusion")',
                    written_of([*map(strip, cells), ""])[0] or None,
                )
            )
            continue
        stripped = list(map(strip, cells))
        if len(stripped) < width:  # missing trailing cells are blank: spreadsheets drop them
            stripped += padding[len(stripped) :]
        stripped.append("")
        written = written_of(stripped)
        values = staged(written)
        if values is None:
            raw = {name: cell for name, cell in zip(CSV_COLUMNS, written, strict=True) if cell}
            raw.setdefault("email", "")
            try:
                values = _staged(SubscriberInput(**raw))
            except InvalidSubscriber as exc:
                reason = str(exc)
                if len(cells) > width:  # likely a comma that shifted the cells after it
                    reason += (
                        f" (the row has {len(cells)} cells but the header has {width} columns; "
                        'put cells that contain commas in double quotes, e.g. "llm, diffusion")'
                    )
                report.rejected.append(RowError(line, reason, written[0] or None))
                continue
        add(line, written, values)
    report.rows = rows


def _import_staged(
    session: Session, stage: _Stage, report: ImportReport, actor: str
) -> ImportReport:
    t = stage.table
    if stage.postgres:
        conn = session.connection()
        # Room for the few set operations over the whole file (group, anti-join, sort)
        # to run in memory rather than in temporary files, for this transaction only.
        conn.exec_driver_sql(f"SET LOCAL work_mem = '{_IMPORT_WORK_MEM}'")
        conn.exec_driver_sql("ANALYZE papermail_import_stage")  # a temporary table has
        # no statistics until analysed
    _merge_duplicates(session, stage, report)
    if report.rejected and not report.skip_invalid:
        _note_existing(session, stage, report, None)
        raise ImportRejected(report)

    now = utcnow()
    status = SubscriberStatus.ACTIVE if report.confirmed else SubscriberStatus.PENDING
    s = Subscriber.__table__
    columns = [
        "email", "topics", "max_papers", "frequency", "weekday", "send_hour", "timezone",
        "categories_only", "categories_exclude", "status", "source", "soft_bounce_count",
        "created_at", "updated_at", "confirmed_at",
    ]  # fmt: skip
    stamp = bindparam("now", now, type_=UTCDateTime)
    rows = select(
        t.c.email,
        t.c.topics,
        t.c.max_papers,
        t.c.frequency,
        t.c.weekday,
        t.c.send_hour,
        t.c.timezone,
        t.c.categories_only,
        t.c.categories_exclude,
        literal(status.value, String),
        literal("import", String),
        literal(0, Integer),
        stamp,
        stamp,
        stamp if report.confirmed else null(),
    ).where(~select(s.c.id).where(s.c.email == t.c.email).exists())
    # ON CONFLICT DO NOTHING: a row someone else inserts meanwhile is kept (and reported
    # existing below); ours are told apart by created_at == now and source 'import'.
    insert_rows = _dialect_insert(session)(s).from_select(columns, rows.order_by(t.c.line))
    counted = {"preserve_rowcount": True}  # the rows this statement inserted
    created: int | None = None
    if stage.postgres:
        # Without ON CONFLICT PostgreSQL inserts a quarter cheaper (no speculative
        # insertion). Such an insert fails only when another writer adds one of these
        # addresses while it runs; then it is undone and done again with ON CONFLICT.
        try:
            with session.begin_nested():
                created = session.execute(insert_rows, execution_options=counted).rowcount  # type: ignore[attr-defined]
        except IntegrityError:
            created = None
    if created is None:
        stmt = insert_rows.on_conflict_do_nothing(index_elements=["email"])
        created = session.execute(stmt, execution_options=counted).rowcount  # type: ignore[attr-defined]
    report.created = created
    ours = (s.c.created_at == stamp) & (s.c.source == "import")
    _note_existing(session, stage, report, ours)

    prefix = f"from {report.source} line"
    note = _status_note(report.confirmed)
    detail = (
        literal(prefix, Text)
        + case((t.c.lines.contains(","), literal("s ", Text)), else_=literal(" ", Text))
        + func.coalesce(t.c.lines, cast(t.c.line, Text))
        + literal(f"; {note}; ", Text)
        + t.c.describe
    )
    log = SubscriberLog.__table__
    session.execute(
        insert(log).from_select(
            ["subscriber_id", "at", "action", "detail", "actor"],
            select(s.c.id, stamp, literal("imported", String), detail, literal(actor[:32], String))
            .join_from(t, s, s.c.email == t.c.email)
            .where(ours),
        )
    )
    report.imported = True
    return report


def _dialect_insert(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:  # pragma: no cover - only the two supported backends
        raise RuntimeError(f"unsupported database dialect {dialect!r}")
    return dialect_insert


def _note_existing(session: Session, stage: _Stage, report: ImportReport, ours: Any) -> None:
    """Staged addresses that are subscribers already (not the rows ``ours`` matches)."""
    t, s = stage.table, Subscriber.__table__
    query = select(t.c.email, t.c.line, s.c.status).join_from(t, s, s.c.email == t.c.email)
    if ours is not None:
        query = query.where(~ours)
    report.existing = [
        {"email": email, "line": line, "status": status}
        for email, line, status in session.execute(query.order_by(t.c.line))
    ]


# --- history ----------------------------------------------------------------------------


def _iso(value: datetime | date | None) -> str | None:
    return value.isoformat() if value is not None else None


def subscriber_to_dict(sub: Subscriber | Row[Any]) -> dict[str, Any]:
    """The subscriber's fields, JSON-serialisable (from the ORM object or a row of the
    table's columns)."""
    suppressed = sub.status in SUPPRESSED_STATUSES or sub.suppressed_at is not None
    return {
        "id": sub.id,
        "email": sub.email,
        "status": sub.status,
        "topics": list(sub.topics or []),
        "categories": list(sub.categories_only or []),
        "exclude_categories": list(sub.categories_exclude or []),
        "max_papers": sub.max_papers,
        "frequency": sub.frequency,
        "weekday": weekday_name(sub.weekday),
        "send_hour": sub.send_hour,
        "timezone": sub.timezone,
        "paused_until": _iso(sub.paused_until),
        "suppressed": suppressed,  # Subscriber.is_suppressed
        "suppressed_at": _iso(sub.suppressed_at),
        "suppression_reason": sub.suppression_reason,
        "soft_bounce_count": sub.soft_bounce_count,
        "source": sub.source,
        "created_at": _iso(sub.created_at),
        "updated_at": _iso(sub.updated_at),
        "confirmed_at": _iso(sub.confirmed_at),
        "unsubscribed_at": _iso(sub.unsubscribed_at),
    }


def subscriber_history(session: Session, email: str) -> dict[str, Any]:
    """Everything papermail knows about one subscriber, JSON-serialisable.

    ``subscriber`` (fields); ``deliveries``, oldest edition first, each with its
    ``papers``, ``attempts`` (DeliveryAttempt history) and provider ``events``;
    ``feedback``; ``log`` (oldest first).
    """
    sub = get_subscriber(session, email)
    deliveries = list(
        session.scalars(
            select(Delivery)
            .where(Delivery.subscriber_id == sub.id)
            .order_by(Delivery.edition_date, Delivery.id)
        )
    )
    ids = [d.id for d in deliveries]
    papers: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    attempts: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    events: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    for chunk in _chunks(ids):
        for dp, title in session.execute(
            select(DeliveryPaper, Paper.title)
            .join(Paper, Paper.id == DeliveryPaper.paper_id)
            .where(DeliveryPaper.delivery_id.in_(chunk))
            .order_by(DeliveryPaper.delivery_id, DeliveryPaper.position)
        ):
            papers[dp.delivery_id].append(
                {
                    "paper_id": dp.paper_id,
                    "title": title,
                    "position": dp.position,
                    "matched_topic": dp.matched_topic,
                    "score": dp.score,
                }
            )
        for att in session.scalars(
            select(DeliveryAttempt)
            .where(DeliveryAttempt.delivery_id.in_(chunk))
            .order_by(DeliveryAttempt.id)
        ):
            attempts[att.delivery_id].append(
                {
                    "kind": att.kind,
                    "started_at": _iso(att.started_at),
                    "finished_at": _iso(att.finished_at),
                    "outcome": att.outcome,
                    "error": att.error,
                    "message_id": att.message_id,
                    "reason": att.reason,
                    "actor": att.actor,
                }
            )
        for ev in session.scalars(
            select(ProviderEvent)
            .where(ProviderEvent.delivery_id.in_(chunk))
            .order_by(ProviderEvent.occurred_at, ProviderEvent.id)
        ):
            assert ev.delivery_id is not None
            events[ev.delivery_id].append(
                {
                    "event_type": ev.event_type,
                    "subtype": ev.subtype,
                    "occurred_at": _iso(ev.occurred_at),
                    "received_at": _iso(ev.received_at),
                    "via": ev.via,
                    "provider_message_id": ev.provider_message_id,
                    "recipients": list(ev.recipients or []),
                }
            )
    feedback = [
        {
            "paper_id": fb.paper_id,
            "title": title,
            "vote": fb.vote,
            "created_at": _iso(fb.created_at),
            "updated_at": _iso(fb.updated_at),
        }
        for fb, title in session.execute(
            select(Feedback, Paper.title)
            .join(Paper, Paper.id == Feedback.paper_id)
            .where(Feedback.subscriber_id == sub.id)
            .order_by(Feedback.created_at, Feedback.id)
        )
    ]
    log = [
        {"at": _iso(entry.at), "action": entry.action, "detail": entry.detail, "actor": entry.actor}
        for entry in session.scalars(
            select(SubscriberLog)
            .where(SubscriberLog.subscriber_id == sub.id)
            .order_by(SubscriberLog.at, SubscriberLog.id)
        )
    ]
    return {
        "subscriber": subscriber_to_dict(sub),
        "deliveries": [
            {
                "id": d.id,
                "edition_date": _iso(d.edition_date),
                "state": d.state,
                "attempt_count": d.attempts,
                "message_id": d.message_id,
                "rfc_message_id": d.rfc_message_id,
                "last_error": d.last_error,
                "skip_reason": d.skip_reason,
                "scheduled_at": _iso(d.scheduled_at),
                "created_at": _iso(d.created_at),
                "sent_at": _iso(d.sent_at),
                "finished_at": _iso(d.finished_at),
                "delivered_at": _iso(d.delivered_at),
                "bounced_at": _iso(d.bounced_at),
                "complained_at": _iso(d.complained_at),
                "papers": papers[d.id],
                "attempts": attempts[d.id],
                "events": events[d.id],
            }
            for d in deliveries
        ],
        "feedback": feedback,
        "log": log,
    }
