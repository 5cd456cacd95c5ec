"""Who is due now: each subscriber's edition at their own local send hour.

The beat calls :func:`plan_due` every few minutes (hourly by default). A subscriber is due
when, in their IANA time zone, the local date's send hour has come (daily subscribers every
day, weekly ones on their local weekday) and they have no delivery for that local date yet.
That last condition is the catch-up: a beat that ran late, or not at all for a few hours,
still plans everyone whose hour passed earlier *that same local day*; a missed local day is
not sent afterwards.

DST: the send instant is the local send hour on the local date, resolved with fold=0
(see :func:`worker.delivery.send_time`): in a spring-forward gap it is the first real
instant after the gap, and on a fall-back day it is the first of the two repeated hours.
Either way the unique (subscriber, edition date) row makes it one edition per local date.

No per-subscriber queries: one ``SELECT DISTINCT timezone``, then one query per distinct
local date (at most three at any instant) covering every zone on that date.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import and_, exists, or_, select
from sqlalchemy.orm import Session

from worker import delivery
from worker.models import Delivery, Subscriber, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZoneDue:
    """For one time zone at ``now``: its local date and the last send hour that has come."""

    timezone: str
    local_date: date
    last_hour: int  # send hours 0..last_hour are due; -1: none yet


def _require_aware(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware (got naive {now.isoformat()})")
    return now.astimezone(UTC)


def hour_instant(zone: ZoneInfo, local_date: date, hour: int) -> datetime:
    """The UTC instant of ``hour``:00 local on ``local_date`` (fold=0, gap -> after it).

    Same rule as :func:`worker.delivery.send_time`, so planning and selection agree.
    """
    return datetime.combine(local_date, time(hour), tzinfo=zone).astimezone(UTC)


def zone_due(name: str, now: datetime) -> ZoneDue:
    """Local date in zone ``name`` at ``now`` and the highest send hour already reached.

    Send instants never decrease with the hour (a gap hour maps onto the next real one),
    so the due hours are always a prefix 0..last_hour.
    """
    now = _require_aware(now)
    zone = ZoneInfo(name)
    local_date = now.astimezone(zone).date()
    last = -1
    for hour in range(24):
        if hour_instant(zone, local_date, hour) <= now:
            last = hour
        else:
            break
    return ZoneDue(name, local_date, last)


def zones_due(names: Iterable[str], now: datetime) -> list[ZoneDue]:
    """:func:`zone_due` for each name; unknown zones are logged and left out, not fatal."""
    now = _require_aware(now)
    result = []
    for name in names:
        try:
            result.append(zone_due(name, now))
        except (ZoneInfoNotFoundError, ValueError) as exc:
            # One bad row must not stop everyone else's edition.
            log.error("subscribers with unknown time zone %r are not planned: %s", name, exc)
    return result


def due_now(session: Session, now: datetime | None = None) -> dict[date, list[int]]:
    """Subscribers due at ``now`` without a delivery for their local date, by local date."""
    now = _require_aware(now or utcnow())
    names = session.scalars(select(Subscriber.timezone).distinct()).all()
    by_date: dict[date, list[ZoneDue]] = {}
    for zd in zones_due(names, now):
        if zd.last_hour >= 0:
            by_date.setdefault(zd.local_date, []).append(zd)

    due: dict[date, list[int]] = {}
    for local_date, zones in sorted(by_date.items()):
        already = exists().where(
            Delivery.subscriber_id == Subscriber.id, Delivery.edition_date == local_date
        )
        query = (
            select(Subscriber.id)
            .where(
                *delivery.due_filter(local_date),
                or_(
                    *(
                        and_(Subscriber.timezone == z.timezone, Subscriber.send_hour <= z.last_hour)
                        for z in zones
                    )
                ),
                ~already,
            )
            .order_by(Subscriber.id)
        )
        ids = list(session.scalars(query))
        if ids:
            due[local_date] = ids
    return due


def plan_due(session: Session, now: datetime | None = None) -> list[int]:
    """Insert the deliveries of everyone due at ``now``; return their pending ids.

    The caller commits, then enqueues the ids (never before: a worker must find the rows).
    Running it twice for the same hour creates nothing the second time and returns nothing.
    """
    now = _require_aware(now or utcnow())
    pending: list[int] = []
    for local_date, ids in due_now(session, now).items():
        # One call per local date: plan_edition batches its IN lists itself.
        result = delivery.plan_edition(session, local_date, subscriber_ids=ids, now=now)
        pending.extend(result.pending_ids)
        log.info("planned %d deliveries of edition %s", result.created, local_date)
    return pending
