"""What a subscriber does from the links in an email, without any HTTP.

Update preferences, pause, unsubscribe and re-subscribe, vote on a paper, ask to
subscribe and confirm. The web pages call these; the CLI or a task can call the very
same functions. Each takes a session and leaves committing to the caller; bad input
raises :class:`InvalidPreferences` (one message per field) and changes nothing.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from worker.categories import conflict
from worker.config import Settings, get_settings
from worker.db import insert_ignore_or_update
from worker.errors import InvalidInput, NotFound, PapermailError
from worker.models import (
    SUPPRESSED_STATUSES,
    WEEKDAYS,
    Delivery,
    DeliveryState,
    Feedback,
    Frequency,
    Paper,
    Subscriber,
    SubscriberLog,
    SubscriberStatus,
    utcnow,
)
from worker.untrusted import WHITESPACE_CONTROLS, ControlCharacter, check_text

log = logging.getLogger(__name__)

# How far ahead a pause may go: long enough for a sabbatical, short enough to catch typos.
MAX_PAUSE_DAYS = 366


class InvalidPreferences(InvalidInput):
    """Some fields are invalid; ``errors`` maps each field name to a specific message."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        super().__init__("; ".join(f"{k}: {v}" for k, v in self.errors.items()))


class NotAllowed(PapermailError):
    """The subscriber's state forbids this action from a link (e.g. a bounced address)."""


# --- helpers ----------------------------------------------------------------------------


def _subscriber(session: Session, subscriber_id: int) -> Subscriber:
    sub = session.get(Subscriber, subscriber_id)
    if sub is None:
        raise NotFound(f"no subscriber with id {subscriber_id}")
    return sub


def _log(session: Session, sub: Subscriber, action: str, detail: str, actor: str) -> None:
    session.add(
        SubscriberLog(
            subscriber_id=sub.id, action=action, detail=detail, actor=actor[:32], at=utcnow()
        )
    )


def local_today(sub: Subscriber, now: datetime | None = None) -> date:
    return (now or utcnow()).astimezone(ZoneInfo(sub.timezone)).date()


# --- preferences ------------------------------------------------------------------------


@dataclass(frozen=True)
class Preferences:
    """Validated preference values, ready to store."""

    topics: tuple[str, ...]
    max_papers: int
    frequency: str
    weekday: int | None
    send_hour: int
    timezone: str
    paused_until: date | None
    categories_only: tuple[str, ...] = ()
    categories_exclude: tuple[str, ...] = ()

    def row(self) -> dict[str, Any]:
        return {
            "topics": list(self.topics),
            "max_papers": self.max_papers,
            "frequency": self.frequency,
            "weekday": self.weekday,
            "send_hour": self.send_hour,
            "timezone": self.timezone,
            "paused_until": self.paused_until,
            "categories_only": list(self.categories_only),
            "categories_exclude": list(self.categories_exclude),
        }


def parse_pause(value: object, today: date) -> date | None:
    """The last paused day (inclusive), or None for "not paused"; blank means None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, date):
        day = value
    else:
        try:
            day = date.fromisoformat(str(value).strip())
        except ValueError:
            raise ValueError(f"pause until must be a date like 2026-12-31, got {value!r}") from None
    if day < today:
        raise ValueError(f"pause until {day.isoformat()} is in the past; pick a later date")
    if day > today + timedelta(days=MAX_PAUSE_DAYS):
        raise ValueError(
            f"pause until {day.isoformat()} is more than a year away; "
            "pick a nearer date, or unsubscribe"
        )
    return day


def parse_preferences(form: Mapping[str, object], today: date) -> Preferences:
    """Validate every field, reporting all problems at once (per field).

    Field names: ``topics`` (list of phrases, or "a, b" text), ``max_papers``,
    ``frequency``, ``weekday``, ``send_hour``, ``timezone``, ``paused_until``,
    ``categories`` and ``exclude_categories`` (arXiv names, "cs.LG, math" text or a list;
    blank: no filter). The per-field rules are those of :mod:`worker.subscribers`, so the
    CLI and the page agree.
    """
    from worker import subscribers as subs

    errors: dict[str, str] = {}
    parsers: dict[str, Any] = {
        "topics": subs.parse_topics,
        "max_papers": subs.parse_max_papers,
        "frequency": subs.parse_frequency,
        "weekday": subs.parse_weekday,
        "send_hour": subs.parse_send_hour,
        "timezone": subs.parse_timezone,
        "paused_until": lambda v: parse_pause(v, today),
        "categories": subs.parse_only_categories,
        "exclude_categories": subs.parse_exclude_categories,
    }
    required = {"max_papers", "frequency", "send_hour", "timezone"}
    values: dict[str, Any] = {}
    for name, parse in parsers.items():
        raw = form.get(name)
        blank = raw is None or (isinstance(raw, str) and not raw.strip())
        if blank and name in required:
            errors[name] = f"{name.replace('_', ' ')} is required"
            continue
        if blank and name == "weekday":
            values[name] = None
            continue
        try:
            if isinstance(raw, str):  # named plainly, before a parser quotes it back
                allow = WHITESPACE_CONTROLS if name == "topics" else ""
                check_text(raw, name.replace("_", " "), allow=allow)
            values[name] = parse(raw)
        except ValueError as exc:
            errors[name] = str(exc)
    weekly = values.get("frequency") == Frequency.WEEKLY.value
    if weekly and "weekday" not in errors and values.get("weekday") is None:
        errors["weekday"] = "choose the weekday of your weekly digest"
    only, exclude = values.get("categories", ()), values.get("exclude_categories", ())
    clash = conflict(only, exclude)
    if clash:
        errors["exclude_categories"] = clash
    if errors:
        raise InvalidPreferences(errors)
    values["categories_only"] = values.pop("categories")
    values["categories_exclude"] = values.pop("exclude_categories")
    if values["frequency"] != Frequency.WEEKLY.value:
        values["weekday"] = None  # only weekly digests have a weekday
    return Preferences(**values)


def _describe_value(name: str, value: object) -> str:
    if name == "weekday" and isinstance(value, int):
        return WEEKDAYS[value]
    if isinstance(value, list | tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, date):
        return value.isoformat()
    return "none" if value is None else str(value)


def update_preferences(
    session: Session,
    subscriber_id: int,
    form: Mapping[str, object],
    *,
    actor: str = "web",
    now: datetime | None = None,
) -> list[str]:
    """Validate and store new preferences; returns the changes made (empty: none).

    Raises :class:`InvalidPreferences` and changes nothing when any field is invalid.
    The subscriber's status is never changed here (unsubscribing is :func:`unsubscribe`).
    """
    sub = _subscriber(session, subscriber_id)
    prefs = parse_preferences(form, local_today(sub, now))
    changes: list[str] = []
    for name, new in prefs.row().items():
        old = getattr(sub, name)
        if (list(old) if isinstance(old, list | tuple) else old) != new:
            changes.append(f"{name} {_describe_value(name, old)} -> {_describe_value(name, new)}")
            setattr(sub, name, new)
    if changes:
        sub.updated_at = utcnow()
        _log(session, sub, "preferences", "; ".join(changes), actor)
        session.flush()
    return changes


def next_edition_date(
    sub: Subscriber, now: datetime | None = None, session: Session | None = None
) -> date:
    """The date of the next edition this subscriber would get with these settings.

    The first local date, from today on, on which the subscriber is due (weekly: their
    weekday) and not paused, and whose edition is still to come: planned and not sent
    yet (a ``pending`` delivery), or not planned and its send time ahead. With a
    session, what was actually sent counts: a day whose edition already went out (or
    was skipped, failed…) is not next, even if its send hour is still ahead (an
    operator's early ``digest run``).
    """
    from worker.delivery import send_time

    now = now or utcnow()
    today = local_today(sub, now)
    last = today + timedelta(days=MAX_PAUSE_DAYS + 8)
    states: dict[date, str] = {}
    if session is not None and sub.id is not None:
        rows = session.execute(
            select(Delivery.edition_date, Delivery.state).where(
                Delivery.subscriber_id == sub.id,
                Delivery.edition_date >= today,
                Delivery.edition_date <= last,
            )
        )
        states = {day: state for day, state in rows}
    for offset in range(0, MAX_PAUSE_DAYS + 8):
        day = today + timedelta(days=offset)
        if sub.frequency == Frequency.WEEKLY.value and day.weekday() != (sub.weekday or 0):
            continue
        if sub.paused_until is not None and sub.paused_until >= day:
            continue
        state = states.get(day)
        if state == DeliveryState.PENDING.value:
            return day
        if state is None and send_time(sub, day) > now:
            return day
    return today + timedelta(days=1)  # unreachable with a valid pause date


# --- unsubscribe and re-subscribe -------------------------------------------------------


def unsubscribe(
    session: Session, subscriber_id: int, *, actor: str = "web", how: str = "link"
) -> bool:
    """Stop all mail to this subscriber; True if this call changed anything (idempotent)."""
    sub = _subscriber(session, subscriber_id)
    if sub.status in SUPPRESSED_STATUSES:
        return False  # already unsubscribed, bounced or complained: nothing more to stop
    now = utcnow()
    old = sub.status
    sub.status = SubscriberStatus.UNSUBSCRIBED.value
    sub.unsubscribed_at = now
    sub.updated_at = now
    _log(session, sub, "unsubscribed", f"via {how}; status was {old}", actor)
    session.flush()
    return True


def resubscribe(session: Session, subscriber_id: int, *, actor: str = "web") -> bool:
    """Undo an unsubscribe from the subscriber's own signed link; True if it changed.

    The link reached their mailbox, so following it is consent (it also counts as
    confirming an address that never was). Bounced or complained addresses are refused:
    only an operator lifts those.
    """
    sub = _subscriber(session, subscriber_id)
    if sub.status in (SubscriberStatus.BOUNCED.value, SubscriberStatus.COMPLAINED.value):
        raise NotAllowed(
            "mail to this address "
            + ("bounced" if sub.status == SubscriberStatus.BOUNCED.value else "was reported")
            + ", so it can't be re-subscribed from here; please contact the sender"
        )
    if sub.status != SubscriberStatus.UNSUBSCRIBED.value:
        return False
    now = utcnow()
    sub.status = SubscriberStatus.ACTIVE.value
    sub.unsubscribed_at = None
    sub.confirmed_at = sub.confirmed_at or now
    sub.updated_at = now
    _log(session, sub, "resubscribed", "via the unsubscribe page; status now active", actor)
    session.flush()
    return True


# --- feedback ---------------------------------------------------------------------------


def record_feedback(session: Session, subscriber_id: int, paper_id: str, vote: int) -> int | None:
    """Store "more like this" (+1) or "less like this" (-1); returns the previous vote.

    One vote per (subscriber, paper): voting again replaces it.
    """
    if vote not in (1, -1) or isinstance(vote, bool):
        raise InvalidInput(f"a vote is +1 or -1, got {vote!r}")
    _subscriber(session, subscriber_id)
    if session.get(Paper, paper_id) is None:
        raise NotFound(f"no paper with id {paper_id!r}")
    previous = session.scalar(
        select(Feedback.vote).where(
            Feedback.subscriber_id == subscriber_id, Feedback.paper_id == paper_id
        )
    )
    now = utcnow()
    insert_ignore_or_update(
        session,
        Feedback.__table__,
        [
            {
                "subscriber_id": subscriber_id,
                "paper_id": paper_id,
                "vote": vote,
                "created_at": now,
                "updated_at": now,
            }
        ],
        ["subscriber_id", "paper_id"],
        update_cols=["vote", "updated_at"],
    )
    session.flush()
    return previous


# --- subscribe (double opt-in) ----------------------------------------------------------


@dataclass(frozen=True)
class SubscribeOutcome:
    """What a subscribe request did. Never shown to the requester: the page is the same."""

    action: str  # created | resent | reconfirm | none
    subscriber_id: int | None
    email: str

    @property
    def send_confirmation(self) -> bool:
        return self.action in {"created", "resent", "reconfirm"}


# What the public form says about a well-formed address the mailer cannot send to.
UNSENDABLE_ADDRESS = (
    "We can't send email to this address: only plain ASCII letters, digits and symbols "
    "such as . _ + - can stand before the @ (no accented letters). Please use another address."
)


def parse_subscribe(email: object, topics: object, timezone: object = None) -> dict[str, Any]:
    """Validate the public form's fields; raises InvalidPreferences keyed by field."""
    from worker import subscribers as subs

    errors: dict[str, str] = {}
    values: dict[str, Any] = {}
    for name, value, parse in (
        ("email", email, subs.sendable_email),
        ("topics", topics, subs.parse_topics),
    ):
        try:
            values[name] = parse(value)
        except subs.UnsendableAddress:
            errors[name] = UNSENDABLE_ADDRESS
        except ValueError as exc:
            errors[name] = str(exc)
    # The zone comes from the browser, silently: an unknown one falls back to UTC; one
    # with control characters is not a browser's and is refused like any other field.
    try:
        values["timezone"] = subs.parse_timezone(timezone) if timezone else "UTC"
    except ControlCharacter as exc:
        errors["timezone"] = str(exc)
    except ValueError:
        values["timezone"] = "UTC"
    if errors:
        raise InvalidPreferences(errors)
    return values


def subscribe_request(
    session: Session, email: object, topics: object = None, timezone: object = None
) -> SubscribeOutcome:
    """Handle a public subscribe request: create a pending subscriber, or decide to
    re-send the confirmation; an existing subscriber is never changed by it.

    - new address: a ``pending`` subscriber with these topics -> confirmation email;
    - ``pending``: the confirmation is sent again;
    - ``unsubscribed`` (and not suppressed by an operator): a confirmation email, whose
      confirm page re-activates them — nothing changes until they confirm;
    - anyone else (active, paused, bounced, complained, suppressed): nothing is sent.
    """
    from worker.subscribers import SubscriberExists, SubscriberInput, add_subscriber

    values = parse_subscribe(email, topics, timezone)
    address = values["email"]
    existing = session.scalar(select(Subscriber).where(Subscriber.email == address))
    if existing is None:
        data = SubscriberInput(
            email=address, topics=list(values["topics"]), timezone=values["timezone"]
        )
        try:
            sub, _ = add_subscriber(session, data, confirmed=False, actor="web")
        except SubscriberExists:  # a concurrent request created it: treat as pending
            session.rollback()
            existing = session.scalar(select(Subscriber).where(Subscriber.email == address))
            if existing is None:
                raise
        else:
            return SubscribeOutcome("created", sub.id, address)
    if existing.suppressed_at is not None:
        action = "none"
    elif existing.status == SubscriberStatus.PENDING.value:
        action = "resent"
    elif existing.status == SubscriberStatus.UNSUBSCRIBED.value:
        action = "reconfirm"
    else:
        action = "none"
    if action != "none":
        _log(session, existing, "subscribe_request", f"confirmation email ({action})", "web")
    return SubscribeOutcome(action, existing.id, address)


def send_confirmation(outcome: SubscribeOutcome, settings: Settings | None = None) -> bool:
    """Render (same MJML path as the digest) and send the confirmation email, if due.

    Returns whether a message went out. Nothing is raised (it runs in the background and
    the requester sees the same page whatever happened), so every failure (rendering,
    the limiter, the mailer) is logged and recorded in the subscriber's history as
    ``confirmation_failed`` with its reason.
    """
    from worker.mailers.base import get_mailer
    from worker.mailers.errors import MailerError
    from worker.ratelimit import get_limiter
    from worker.rendering import get_renderer

    if not outcome.send_confirmation or outcome.subscriber_id is None:
        return False
    settings = settings or get_settings()
    who = outcome.subscriber_id
    try:
        message = get_renderer(settings).render_confirm(outcome.email, outcome.subscriber_id)
        get_limiter(settings).acquire()
        get_mailer(settings).send(message)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, MailerError | InvalidInput):
            log.error("confirmation email to subscriber %s failed: %s", who, reason)
        else:
            log.exception("confirmation email to subscriber %s failed unexpectedly", who)
        _record_confirmation_failure(who, f"confirmation email not sent: {reason}"[:1000])
        return False
    return True


def _record_confirmation_failure(subscriber_id: int, reason: str) -> None:
    from worker.db import session_scope

    try:
        with session_scope() as s:
            sub = s.get(Subscriber, subscriber_id)
            if sub is not None:
                _log(s, sub, "confirmation_failed", reason, "web")
    except Exception:
        log.exception("could not record the failed confirmation of subscriber %s", subscriber_id)


def confirm(session: Session, subscriber_id: int, *, actor: str = "web") -> str:
    """Confirm an address from the signed confirm link.

    Returns ``confirmed`` (pending -> active), ``reconfirmed`` (unsubscribed -> active)
    or ``already`` (nothing to do). Bounced and complained addresses raise NotAllowed.
    """
    sub = _subscriber(session, subscriber_id)
    now = utcnow()
    if sub.status == SubscriberStatus.PENDING.value:
        sub.status = SubscriberStatus.ACTIVE.value
        sub.confirmed_at = now
        sub.updated_at = now
        _log(session, sub, "confirmed", "double opt-in: confirm link; status now active", actor)
        session.flush()
        return "confirmed"
    if sub.status == SubscriberStatus.UNSUBSCRIBED.value:
        sub.status = SubscriberStatus.ACTIVE.value
        sub.unsubscribed_at = None
        sub.confirmed_at = now
        sub.updated_at = now
        _log(session, sub, "confirmed", "re-subscribed by confirm link; status now active", actor)
        session.flush()
        return "reconfirmed"
    if sub.status in (SubscriberStatus.BOUNCED.value, SubscriberStatus.COMPLAINED.value):
        raise NotAllowed(
            "this address can't be confirmed from here because mail to it failed or was "
            "reported; please contact the sender"
        )
    return "already"


# --- topic suggestions ------------------------------------------------------------------

_STOPWORD_TEXT = """a an and are as at be by can do does for from how in into is it its of on or our
    over the their this to towards toward under via vs we what when where which while
    why with without using use based new through beyond about across all any more most
    not one two your you than then that these those what's let's between among versus
    study approach method methods paper framework towards"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_SEGMENT = re.compile(r"[:;,.!?()\[\]{}\"“”|/]+|\s[-–—]\s")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'+\-]*")


def _display(word: str) -> str:
    # Keep acronyms and mixed-case names (LLMs, GPT-4, DeepSeek); lower-case Title Case.
    if word.isupper() or any(c.isupper() for c in word[1:]):
        return word
    return word.lower()


def _phrase_key(text: str) -> str:
    """Case- and plural-insensitive key: "Neural Networks" and "neural network" agree."""
    words = text.casefold().split()
    last = words[-1] if words else ""
    if len(last) > 3 and last.endswith("s") and not last.endswith(("ss", "us", "is")):
        words[-1] = last[:-1]
    return " ".join(words)


def _phrases(title: str) -> set[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()
    for segment in _SEGMENT.split(title):
        words = [w.strip("'-") for w in _WORD.findall(segment)]
        words = [w for w in words if w]
        for n in (2, 3):
            for i in range(len(words) - n + 1):
                gram = tuple(words[i : i + n])
                low = [w.lower() for w in gram]
                if low[0] in _STOPWORDS or low[-1] in _STOPWORDS:
                    continue
                if any(w.isdigit() or len(w) < 2 for w in low):
                    continue
                found.add(tuple(_display(w) for w in gram))
    return found


def suggest_topics(
    titles: Iterable[str], *, limit: int = 12, exclude: Iterable[str] = ()
) -> list[str]:
    """Phrases (2-3 words) found in at least two titles, most frequent first.

    A shorter phrase is dropped when a longer one containing it is as frequent (so
    "large language models" wins over "large language"); ``exclude`` (the subscriber's
    topics) is left out, case-insensitively.
    """
    counts: Counter[str] = Counter()
    spelling: dict[str, Counter[str]] = {}
    for title in titles:
        for gram in _phrases(title):
            text = " ".join(gram)
            key = _phrase_key(text)
            counts[key] += 1
            spelling.setdefault(key, Counter())[text] += 1
    frequent = {k: c for k, c in counts.items() if c >= 2}
    keep = {
        k: c
        for k, c in frequent.items()
        if not any(o != k and f" {k} " in f" {o} " and oc >= c for o, oc in frequent.items())
    }
    skip = {_phrase_key(t) for t in exclude}
    ranked = sorted(keep.items(), key=lambda kc: (-kc[1], -len(kc[0].split()), kc[0]))
    out = []
    for key, _ in ranked:
        if key in skip:
            continue
        out.append(spelling[key].most_common(1)[0][0])
        if len(out) >= limit:
            break
    return out


def topic_suggestions(
    session: Session,
    *,
    days: int = 14,
    limit: int = 12,
    exclude: Iterable[str] = (),
    now: datetime | None = None,
) -> list[str]:
    """Suggestions from the titles of papers published (or ingested) in the last N days."""
    since = (now or utcnow()) - timedelta(days=days)
    titles = session.scalars(
        select(Paper.title)
        .where(
            or_(
                Paper.published_at >= since,
                (Paper.published_at.is_(None)) & (Paper.ingested_at >= since),
            )
        )
        .order_by(func.coalesce(Paper.published_at, Paper.ingested_at).desc())
        .limit(2000)
    )
    return suggest_topics(titles, limit=limit, exclude=exclude)
