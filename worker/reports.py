"""Who got an edition, who did not, and why: per-delivery listings and reason breakdowns.

The operator's "who did not get today's edition, and why?" at a million deliveries. The
listing is streamed: one query per state, each walking the index
``ix_deliveries_edition_state_id`` (edition_date, state, id) in order through a
server-side cursor on PostgreSQL, so the first rows arrive at once and memory stays flat
whatever the edition's size. Problems come first (failed, unknown, bounced, ...), the
deliveries that went out last.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from worker.errors import InvalidInput
from worker.models import Delivery, DeliveryState, Subscriber

# The listing's order: what needs the operator first, what went well last.
LIST_ORDER: tuple[str, ...] = (
    DeliveryState.FAILED,
    DeliveryState.UNKNOWN,
    DeliveryState.BOUNCED,
    DeliveryState.COMPLAINED,
    DeliveryState.SKIPPED,
    DeliveryState.PENDING,
    DeliveryState.SENDING,
    DeliveryState.SENT,
    DeliveryState.DELIVERED,
)
assert set(LIST_ORDER) == set(DeliveryState), "a delivery state is missing from LIST_ORDER"

# The states `stats` explains: nobody got these editions (or nobody knows).
WHY_STATES: tuple[str, ...] = (DeliveryState.FAILED, DeliveryState.SKIPPED, DeliveryState.UNKNOWN)
WHY_TOP = 5
WAITING_FOR_PAPERS = "waiting for the day's papers"

# Reasons may name an address ("address rejected: ada@example.org"): grouped without it.
_ADDRESS = re.compile(r"[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")


@dataclass(frozen=True)
class DeliveryRow:
    """One line of `papermail deliveries list`."""

    delivery_id: int
    subscriber_id: int
    email: str
    edition_date: date
    state: str
    reason: str | None  # the skip reason or the last error, in words
    attempts: int
    last_attempt_at: datetime | None  # when the last send attempt started (or it failed)
    message_id: str | None  # the provider's

    def to_json(self) -> dict[str, Any]:
        return {
            "delivery_id": self.delivery_id,
            "subscriber_id": self.subscriber_id,
            "email": self.email,
            "edition": self.edition_date.isoformat(),
            "state": self.state,
            "reason": self.reason,
            "attempts": self.attempts,
            "last_attempt_at": self.last_attempt_at.isoformat() if self.last_attempt_at else None,
            "message_id": self.message_id,
        }


def parse_states(values: Iterable[str]) -> list[str]:
    """Delivery states named by the operator (case-insensitive, repeatable, or
    comma-separated), in listing order; InvalidInput naming the bad one."""
    wanted: set[str] = set()
    for value in values:
        for part in value.split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in LIST_ORDER:
                raise InvalidInput(
                    f"unknown delivery state {part.strip()!r}; choose from {', '.join(LIST_ORDER)}"
                )
            wanted.add(name)
    return [s for s in LIST_ORDER if s in wanted]


def _reason_column() -> Any:
    return func.coalesce(Delivery.skip_reason, Delivery.last_error)


def iter_deliveries(
    session: Session,
    edition_date: date,
    states: Sequence[str] | None = None,
    reason: str | None = None,
    limit: int | None = None,
    batch: int = 1000,
) -> Iterator[DeliveryRow]:
    """The deliveries of an edition, streamed: ``states`` (default all) in LIST_ORDER, each
    in planning order (by id); ``reason``: only those whose reason holds this text (any
    case); at most ``limit`` rows."""
    chosen = list(states) if states else list(LIST_ORDER)
    unknown = [s for s in chosen if s not in LIST_ORDER]
    if unknown:
        raise InvalidInput(f"unknown delivery state {unknown[0]!r}")
    if limit is not None and limit <= 0:
        return
    left = limit
    needle = reason.strip() if reason else None
    for state in [s for s in LIST_ORDER if s in chosen]:
        query = state_query(edition_date, state, needle)
        if left is not None:
            query = query.limit(left)
        result = session.execute(query.execution_options(yield_per=batch))
        for row in result:
            yield _row(row)
            if left is not None:
                left -= 1
                if left == 0:
                    result.close()
                    return


def state_query(edition_date: date, state: str, reason: str | None = None) -> Select[Any]:
    """The rows of one state of an edition, in id order (``reason``: a case-insensitive
    substring of the reason). One state per query: equality on the index's second column
    keeps PostgreSQL's index order, where an IN list would sort every match first."""
    query = (
        select(
            Delivery.id,
            Delivery.subscriber_id,
            Subscriber.email,
            Delivery.edition_date,
            Delivery.state,
            Delivery.skip_reason,
            Delivery.last_error,
            Delivery.waiting_for,
            Delivery.attempts,
            Delivery.claimed_at,
            Delivery.finished_at,
            Delivery.message_id,
        )
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .where(Delivery.edition_date == edition_date, Delivery.state == state)
        .order_by(Delivery.id)
    )
    if reason:
        query = query.where(_reason_column().icontains(reason, autoescape=True))
    return query


def _row(row: Any) -> DeliveryRow:
    reason = row.skip_reason or row.last_error
    if reason is None and row.state == DeliveryState.PENDING and row.waiting_for == "papers":
        reason = WAITING_FOR_PAPERS
    # A delivery that failed before it was ever claimed (bad data, rendering) was tried
    # when it failed.
    last = row.claimed_at or (row.finished_at if row.state == DeliveryState.FAILED else None)
    return DeliveryRow(
        delivery_id=row.id,
        subscriber_id=row.subscriber_id,
        email=row.email,
        edition_date=row.edition_date,
        state=str(row.state),
        reason=reason,
        attempts=row.attempts or 0,
        last_attempt_at=last,
        message_id=row.message_id,
    )


def reason_group(reason: str | None) -> str:
    """A reason as `stats` counts it: addresses replaced, so one cause is one line."""
    if not reason:
        return "(no reason recorded)"
    return " ".join(_ADDRESS.sub("<address>", reason).split())


def why_breakdown(
    session: Session, edition_date: date, top: int = WHY_TOP
) -> dict[str, list[dict[str, Any]]]:
    """The ``top`` reasons of each of the failed, skipped and unknown deliveries of an
    edition, most frequent first: ``{"failed": [{"reason": ..., "count": n}, ...], ...}``;
    the rest of a state, if any, as one ``"(other reasons)"`` entry."""
    rows = session.execute(
        select(Delivery.state, _reason_column(), func.count())
        .where(Delivery.edition_date == edition_date, Delivery.state.in_(WHY_STATES))
        .group_by(Delivery.state, _reason_column())
    ).all()
    counters: dict[str, Counter[str]] = {s: Counter() for s in WHY_STATES}
    for state, reason, count in rows:
        counters[str(state)][reason_group(reason)] += count
    out: dict[str, list[dict[str, Any]]] = {}
    for state in WHY_STATES:
        ranked = sorted(counters[state].items(), key=lambda kv: (-kv[1], kv[0]))
        entries = [{"reason": r, "count": n} for r, n in ranked[:top]]
        rest = sum(n for _, n in ranked[top:])
        if rest:
            entries.append({"reason": "(other reasons)", "count": rest})
        out[state] = entries
    return out
