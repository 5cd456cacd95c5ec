"""Operator repairs and reports: resend editions, edition statistics.

A resend never bypasses the exactly-once machinery: the delivery row is handed back to
``pending`` with a conditional UPDATE from the state the operator saw, then goes through
the same claim, rate limit and mailer as any send. A running edition racing with the
resend can therefore claim it at most once between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from worker.config import Settings, get_settings
from worker.errors import InvalidInput, NotFound
from worker.models import (
    Delivery,
    DeliveryAttempt,
    DeliveryPaper,
    DeliveryState,
    Subscriber,
    utcnow,
)

RESENDABLE_STATES = ("failed", "unknown", "skipped", "bounced")
# An edition the reader (probably) has: re-sent only with --force.
NEEDS_FORCE = frozenset({DeliveryState.SENT, DeliveryState.DELIVERED, DeliveryState.COMPLAINED})
IN_FLIGHT = frozenset({DeliveryState.PENDING, DeliveryState.SENDING})


@dataclass
class ResendItem:
    delivery_id: int
    email: str
    state: str
    papers: list[str]
    suppressed: bool
    action: str  # "resend" | "refused"
    why: str = ""
    # What the send path does (or, in a dry run, would do) with it: "sent", "skipped",
    # "failed", ... and why; see resend_outcomes and delivery.forecast_deliveries.
    result: str = ""
    result_why: str = ""


@dataclass
class ResendPlan:
    edition_date: date
    items: list[ResendItem] = field(default_factory=list)

    @property
    def to_send(self) -> list[ResendItem]:
        return [i for i in self.items if i.action == "resend"]

    @property
    def refused(self) -> list[ResendItem]:
        return [i for i in self.items if i.action == "refused"]


def plan_resend(
    session: Session,
    edition_date: date,
    *,
    subscriber_email: str | None = None,
    state: str | None = None,
    force: bool = False,
    include_suppressed: bool = False,
) -> ResendPlan:
    """Decide, for each matching delivery, whether it may be re-sent, and why not."""
    if (subscriber_email is None) == (state is None):
        raise InvalidInput("give exactly one of --subscriber EMAIL or --state STATE")
    if state is not None and state not in RESENDABLE_STATES:
        raise InvalidInput(f"--state must be one of {', '.join(RESENDABLE_STATES)}, got {state!r}")
    query = (
        select(Delivery, Subscriber)
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .where(Delivery.edition_date == edition_date)
        .order_by(Delivery.id)
    )
    if subscriber_email is not None:
        email = subscriber_email.strip().lower()
        if session.scalar(select(Subscriber.id).where(Subscriber.email == email)) is None:
            raise NotFound(f"no subscriber with address {email}; see `papermail subscribers list`")
        query = query.where(Subscriber.email == email)
    else:
        query = query.where(Delivery.state == state)
    rows = session.execute(query).all()
    if subscriber_email is not None and not rows:
        raise NotFound(
            f"{subscriber_email} has no edition on {edition_date}; "
            f"`papermail subscribers show {subscriber_email}` lists their deliveries"
        )
    papers: dict[int, list[str]] = {}
    ids = [d.id for d, _ in rows]
    if ids:
        for dp in session.scalars(
            select(DeliveryPaper)
            .where(DeliveryPaper.delivery_id.in_(ids))
            .order_by(DeliveryPaper.delivery_id, DeliveryPaper.position)
        ):
            papers.setdefault(dp.delivery_id, []).append(dp.paper_id)
    plan = ResendPlan(edition_date)
    for delivery, sub in rows:
        item = ResendItem(
            delivery.id,
            sub.email,
            delivery.state,
            papers.get(delivery.id, []),
            sub.is_suppressed,
            "resend",
        )
        if delivery.state in IN_FLIGHT:
            item.action, item.why = "refused", f"still {delivery.state}: the edition is sending it"
        elif delivery.state in NEEDS_FORCE and not force:
            item.action, item.why = (
                "refused",
                f"already {delivery.state}; use --force to send again",
            )
        elif sub.is_suppressed and not include_suppressed:
            item.action = "refused"
            item.why = (
                f"address is suppressed ({sub.suppression_reason or sub.status}); "
                "use --include-suppressed to override"
            )
        plan.items.append(item)
    return plan


def requeue_for_resend(
    session: Session, items: Sequence[ResendItem], *, reason: str, actor: str = "cli"
) -> list[int]:
    """Hand each delivery back to ``pending`` if it is still in the state we saw.

    Returns the ids actually re-queued; a row that changed meanwhile (a running edition or
    another operator got there first) is left alone.
    """
    now = utcnow()
    requeued = []
    for item in items:
        res = session.execute(
            update(Delivery)
            .where(Delivery.id == item.delivery_id, Delivery.state == item.state)
            .values(
                state=DeliveryState.PENDING,
                scheduled_at=now,
                finished_at=None,
                skip_reason=None,
                # A fresh budget of transient retries for the operator's resend.
                attempts=0,
                updated_at=now,
            )
        )
        if res.rowcount == 1:  # type: ignore[attr-defined]
            requeued.append(item.delivery_id)
            session.add(
                DeliveryAttempt(
                    delivery_id=item.delivery_id,
                    kind="requeue",
                    started_at=now,
                    finished_at=now,
                    outcome=f"from {item.state}",
                    reason=reason,
                    actor=actor,
                )
            )
    return requeued


def forecast_resend(
    plan: ResendPlan,
    *,
    settings: Settings,
    reason: str,
    include_suppressed: bool = False,
    actor: str = "cli",
) -> None:
    """Fill in each item's ``result`` as the real resend would leave it, without sending:
    the requeue and the whole send path's decisions run in a rolled-back transaction."""
    from worker.delivery import forecast_deliveries

    to_send = plan.to_send
    if not to_send:
        return
    forecast = forecast_deliveries(
        lambda s: requeue_for_resend(s, to_send, reason=reason, actor=actor),
        settings=settings,
        include_suppressed=include_suppressed,
        attempt_kind="resend",
        reason=reason,
        actor=actor,
    )
    for item in to_send:
        f = forecast.get(item.delivery_id)
        if f is None:
            item.result, item.result_why = "refused", "changed meanwhile (a running edition has it)"
        else:
            item.result, item.result_why = f.state, f.why


def record_resend_results(session: Session, plan: ResendPlan) -> None:
    """Fill in each re-sent item's ``result`` from its row after the real resend."""
    ids = [i.delivery_id for i in plan.to_send]
    if not ids:
        return
    rows = {
        did: (str(state), skip_reason or last_error or "")
        for did, state, skip_reason, last_error in session.execute(
            select(Delivery.id, Delivery.state, Delivery.skip_reason, Delivery.last_error).where(
                Delivery.id.in_(ids)
            )
        )
    }
    for item in plan.to_send:
        state, why = rows.get(item.delivery_id, ("", ""))
        item.result = state
        item.result_why = "" if state == DeliveryState.SENT else why


# ---------------------------------------------------------------------------------------
# Statistics


def edition_stats(
    session: Session,
    edition_date: date,
    settings: Settings | None = None,
    now: datetime | None = None,
) -> dict[str, object]:
    """Counts by state, provider rates against SES's thresholds, timing and throughput."""
    from worker.delivery import edition_counts

    settings = settings or get_settings()
    now = now or utcnow()
    counts = edition_counts(session, edition_date)
    where = Delivery.edition_date == edition_date
    started, ended, first_sent, last_sent = session.execute(
        select(
            func.min(Delivery.claimed_at),
            func.max(Delivery.finished_at),
            func.min(Delivery.sent_at),
            func.max(Delivery.sent_at),
        ).where(where)
    ).one()
    oldest_pending = session.scalar(
        select(func.min(Delivery.created_at)).where(where, Delivery.state == DeliveryState.PENDING)
    )
    # Pending rows held until the day's papers are fetched (worker.scheduling).
    waiting = session.scalar(
        select(func.count())
        .select_from(Delivery)
        .where(where, Delivery.state == DeliveryState.PENDING, Delivery.waiting_for.is_not(None))
    )
    from worker.events import edition_rates

    rates = edition_rates(session, edition_date, settings)
    accepted = rates["accepted"]
    rate = None
    # Only meaningful once sending has lasted a while; a burst of 4 emails is not a rate.
    if first_sent and last_sent and accepted > 1:
        elapsed = (last_sent - first_sent).total_seconds()
        if elapsed >= 1.0:
            rate = round((accepted - 1) / elapsed, 2)
    total = sum(counts.values())
    in_flight = counts["pending"] or counts["sending"]
    return {
        "edition": edition_date.isoformat(),
        "total": total,
        "states": counts,
        "accepted": accepted,
        "hard_bounced": rates["hard_bounced"],
        # SES's way: hard bounces and complaints over accepted emails.
        "bounce_rate": round(rates["bounce_rate"], 6),
        "complaint_rate": round(rates["complaint_rate"], 6),
        "bounce_threshold": settings.bounce_rate_limit,
        "complaint_threshold": settings.complaint_rate_limit,
        "min_sample": settings.reputation_min_sample,
        "sample_ok": rates["sample_ok"],
        "bounce_over": rates["over_bounce_limit"],
        "complaint_over": rates["over_complaint_limit"],
        "guard_tripped": rates["guard_tripped"],
        "started_at": started.isoformat() if started else None,
        "ended_at": ended.isoformat() if ended and not in_flight else None,
        "send_rate_per_second": rate,
        "oldest_pending_at": oldest_pending.isoformat() if oldest_pending else None,
        "oldest_pending_age_seconds": int((now - oldest_pending).total_seconds())
        if oldest_pending
        else None,
        "waiting_for_papers": waiting or 0,
    }


def recent_editions(session: Session, limit: int = 7) -> list[date]:
    return list(
        session.scalars(
            select(Delivery.edition_date)
            .group_by(Delivery.edition_date)
            .order_by(Delivery.edition_date.desc())
            .limit(limit)
        )
    )


def account_quota(settings: Settings | None = None) -> dict[str, object] | None:
    """The mail provider's 24-hour quota and rate, when its mailer reports one (SES).

    None for mailers without a quota (outbox, SMTP); ``{"error": ...}`` when the provider
    cannot be asked (stats go on without it). From the shared account cache: at most a
    minute old, and a provider that just failed is not asked again for a minute.
    """
    from worker.account import AccountUnavailable, account_cache
    from worker.mailers.base import mailer_class

    settings = settings or get_settings()
    if not mailer_class(settings).reports_quota:
        return None
    try:
        info = account_cache(settings).get()
    except AccountUnavailable as exc:
        return {"mailer": settings.mailer, "error": exc.reason}
    return {
        "mailer": info.mailer,
        "max_24h_send": info.max_24h_send,
        "sent_last_24h": info.sent_last_24h,
        "remaining_24h": info.remaining_24h,
        "max_send_rate": info.max_send_rate,
        "sending_enabled": info.sending_enabled,
        "production_access": info.production_access,
    }
