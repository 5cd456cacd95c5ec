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

Editions wait for the day's papers (when ``PAPERMAIL_SOURCES`` is set): an edition's papers
are those fetched for the UTC date of its send time. If every configured source has a
successful fetch for that date, the edition goes; otherwise its row is held
(``waiting_for = 'papers'``, ``scheduled_at`` = send time + ``PAPERMAIL_FETCH_WAIT_MINUTES``)
and never claimed or swept while it waits. :func:`release_waiting` (each beat tick, and the
fetch task right after a success) lets it go once the papers are in; at the deadline it is
skipped with the reason "no papers fetched today" (``PAPERMAIL_FETCH_MISSED=skip``, the
default), or, with ``send``, goes out with the papers that did arrive for that date (a
source that succeeded) and is skipped when none did: never an email of older papers only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session

from worker import delivery
from worker.config import Settings, get_settings
from worker.models import (
    FETCH_SUCCEEDED,
    Delivery,
    DeliveryState,
    FetchStatus,
    PaperFetch,
    Subscriber,
    utcnow,
)

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


def plan_due(
    session: Session, now: datetime | None = None, settings: Settings | None = None
) -> list[int]:
    """Insert the deliveries of everyone due at ``now``; return the pending ids to send.

    The caller commits, then enqueues the ids (never before: a worker must find the rows).
    Running it twice for the same hour creates nothing the second time and returns nothing.
    Editions whose day's papers are not fetched yet are held (see the module docstring);
    those released since the last call (papers fetched, or the deadline in ``send`` mode)
    are returned with the new ones.
    """
    now = _require_aware(now or utcnow())
    settings = settings or get_settings()
    released = release_waiting(session, now, settings)
    pending: list[int] = []
    for local_date, ids in due_now(session, now).items():
        # One call per local date: plan_edition batches its IN lists itself.
        result = delivery.plan_edition(session, local_date, subscriber_ids=ids, now=now)
        pending.extend(result.pending_ids)
        log.info(
            "planned %d deliveries of edition %s",
            result.created,
            local_date,
            extra={"edition_date": local_date},
        )
    return released + hold_for_papers(session, pending, now, settings)


# ---------------------------------------------------------------------------------------
# Editions wait for the day's papers

WAITING_FOR_PAPERS = "papers"
NO_PAPERS_REASON = "no papers fetched today"
_ID_CHUNK = 5000


def waits_for_papers(settings: Settings) -> bool:
    """Editions wait for a fetch only when papers arrive by themselves (SOURCES is set)."""
    return bool(settings.sources)


def papers_fetched(session: Session, fetch_date: date, settings: Settings) -> bool:
    """Every configured source has a successful fetch for ``fetch_date``."""
    done = set(
        session.scalars(
            select(PaperFetch.source).where(
                PaperFetch.fetch_date == fetch_date,
                PaperFetch.status.in_([s.value for s in FETCH_SUCCEEDED]),
            )
        )
    )
    return set(settings.sources) <= done


def papers_arrived(session: Session, fetch_date: date) -> bool:
    """Some source brought papers for ``fetch_date`` (FETCH_MISSED=send's "what there is")."""
    return (
        session.scalar(
            select(PaperFetch.id)
            .where(
                PaperFetch.fetch_date == fetch_date,
                PaperFetch.status == FetchStatus.OK,
                PaperFetch.papers > 0,
            )
            .limit(1)
        )
        is not None
    )


def hold_for_papers(
    session: Session, delivery_ids: Sequence[int], now: datetime, settings: Settings
) -> list[int]:
    """Of these pending deliveries, the ones that may go now; the rest wait or are skipped."""
    if not delivery_ids or not waits_for_papers(settings):
        return list(delivery_ids)
    return _decide(session, [Delivery.id.in_(list(delivery_ids))], now, settings, len(delivery_ids))


def release_waiting(session: Session, now: datetime, settings: Settings | None = None) -> list[int]:
    """Editions held for their papers that may go now (papers fetched, or the deadline in
    ``send`` mode with papers for the day); those past the deadline otherwise are skipped
    with the reason "no papers fetched today". Returns the ids to enqueue (after commit)."""
    settings = settings or get_settings()
    where = [Delivery.state == DeliveryState.PENDING, Delivery.waiting_for == WAITING_FOR_PAPERS]
    if not waits_for_papers(settings):
        # Fetching was switched off: nothing waits for it any more.
        return _decide(session, where, now, settings, None, release_all=True)
    return _decide(session, where, now, settings, None)


def _decide(
    session: Session,
    where: list,  # type: ignore[type-arg]
    now: datetime,
    settings: Settings,
    expected: int | None,
    *,
    release_all: bool = False,
) -> list[int]:
    rows = session.execute(
        select(Delivery.id, Delivery.edition_date, Subscriber.timezone, Subscriber.send_hour)
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .where(*where)
        .order_by(Delivery.id)
    ).all()
    go: list[int] = []
    hold: dict[datetime, list[int]] = {}
    skip: list[int] = []
    fetched: dict[date, bool] = {}
    arrived: dict[date, bool] = {}
    send_times: dict[tuple[date, str, int], datetime | None] = {}
    wait = timedelta(minutes=settings.fetch_wait_minutes)
    for delivery_id, edition_date, timezone, send_hour in rows:
        if release_all:
            go.append(delivery_id)
            continue
        key = (edition_date, timezone, send_hour)
        if key not in send_times:
            try:
                send_times[key] = hour_instant(ZoneInfo(timezone), edition_date, send_hour)
            except (ZoneInfoNotFoundError, ValueError):
                send_times[key] = None
        send_at = send_times[key]
        if send_at is None:  # bad data: the sender fails it with the reason
            go.append(delivery_id)
            continue
        fetch_date = send_at.date()  # UTC: the morning fetch before this send time
        if fetch_date not in fetched:
            fetched[fetch_date] = papers_fetched(session, fetch_date, settings)
        if fetched[fetch_date]:
            go.append(delivery_id)
            continue
        deadline = send_at + wait
        if now < deadline:
            hold.setdefault(deadline, []).append(delivery_id)
            continue
        if settings.fetch_missed == "send":
            if fetch_date not in arrived:
                arrived[fetch_date] = papers_arrived(session, fetch_date)
            if arrived[fetch_date]:
                go.append(delivery_id)
                continue
        skip.append(delivery_id)
    for deadline, ids in hold.items():
        for lo in range(0, len(ids), _ID_CHUNK):
            session.execute(
                update(Delivery)
                .where(
                    Delivery.id.in_(ids[lo : lo + _ID_CHUNK]),
                    Delivery.state == DeliveryState.PENDING,
                )
                .values(waiting_for=WAITING_FOR_PAPERS, scheduled_at=deadline, updated_at=now)
            )
    for lo in range(0, len(go), _ID_CHUNK):
        session.execute(
            update(Delivery)
            .where(
                Delivery.id.in_(go[lo : lo + _ID_CHUNK]),
                Delivery.waiting_for.is_not(None),
                Delivery.state == DeliveryState.PENDING,
            )
            .values(waiting_for=None, scheduled_at=now, updated_at=now)
        )
    for lo in range(0, len(skip), _ID_CHUNK):
        session.execute(
            update(Delivery)
            .where(
                Delivery.id.in_(skip[lo : lo + _ID_CHUNK]), Delivery.state == DeliveryState.PENDING
            )
            .values(
                state=DeliveryState.SKIPPED,
                skip_reason=NO_PAPERS_REASON,
                waiting_for=None,
                finished_at=now,
                updated_at=now,
            )
        )
    held = sum(len(ids) for ids in hold.values())
    if held or skip or (go and expected is None):
        log.info(
            "editions waiting for papers: %d held, %d released, %d skipped (%s)",
            held,
            len(go),
            len(skip),
            NO_PAPERS_REASON,
        )
    return go
