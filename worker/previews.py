"""What a subscriber would get, computed without sending or recording anything.

Shared by `digest preview`, `digest run --dry-run`, the preference page ("your next
digest") and "view in browser".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.config import Settings, get_settings
from worker.delivery import Delivery, due_filter, recipient_as_sent, recipient_of, window_end
from worker.errors import NotFound
from worker.models import DeliveryPaper, Paper, Subscriber, utcnow


@dataclass
class Preview:
    email: str
    edition_date: date
    papers: list[object] = field(default_factory=list)  # rendering.PaperView
    skip_reason: str | None = None
    subject: str | None = None
    html: str | None = None
    size: int = 0
    state: str | None = None  # the delivery's state when the edition already exists
    note: str | None = None


def _views(session: Session, picks: list[tuple[str, str | None, tuple[str, ...]]]) -> list[object]:
    from worker.rendering import paper_view

    ids = [pid for pid, *_ in picks]
    papers = {p.id: p for p in session.scalars(select(Paper).where(Paper.id.in_(ids)))}
    return [paper_view(papers[pid], topic, terms) for pid, topic, terms in picks if pid in papers]


def previews_for(
    session: Session,
    subscribers: list[Subscriber],
    edition_date: date,
    *,
    settings: Settings | None = None,
    now: datetime | None = None,
    with_html: bool = True,
) -> list[Preview]:
    """Select (one batch) and render for these subscribers; nothing is written."""
    from worker.rendering import get_renderer
    from worker.selection import select_for_subscribers

    settings = settings or get_settings()
    now = now or utcnow()
    if not subscribers:
        return []
    results = select_for_subscribers(
        session,
        subscribers,
        {s.id: window_end(s, edition_date, now) for s in subscribers},
        settings,
    )
    renderer = get_renderer(settings)
    out = []
    for sub in subscribers:
        res = results[sub.id]
        pv = Preview(sub.email, edition_date, skip_reason=res.skip_reason)
        if res.picks:
            pv.papers = _views(
                session, [(p.paper_id, p.matched_topic, p.matched_terms) for p in res.picks]
            )
            if with_html:
                msg = renderer.render_digest(recipient_of(sub), edition_date, pv.papers)
                pv.subject, pv.html, pv.size = msg.subject, msg.html, msg.size
        out.append(pv)
    return out


def preview_digest(
    session: Session, email: str, edition_date: date, settings: Settings | None = None
) -> Preview:
    """What ``email`` gets for edition D: the recorded edition when it was already planned
    and selected (the papers it carries), else a fresh selection."""
    from worker.delivery import unsendable_reason
    from worker.rendering import get_renderer

    sub = session.scalar(select(Subscriber).where(Subscriber.email == email.strip().lower()))
    if sub is None:
        raise NotFound(f"no subscriber with address {email}; see `papermail subscribers list`")
    existing = session.scalar(
        select(Delivery).where(
            Delivery.subscriber_id == sub.id, Delivery.edition_date == edition_date
        )
    )
    if existing is not None:
        picks = [
            (dp.paper_id, dp.matched_topic, dp.terms)
            for dp in session.scalars(
                select(DeliveryPaper)
                .where(DeliveryPaper.delivery_id == existing.id)
                .order_by(DeliveryPaper.position)
            )
        ]
        if picks:
            pv = Preview(sub.email, edition_date, papers=_views(session, picks))
            msg = get_renderer(settings or get_settings()).render_digest(
                recipient_of(sub), edition_date, pv.papers, delivery_id=existing.id
            )
            pv.subject, pv.html, pv.size = msg.subject, msg.html, msg.size
            pv.state = existing.state
            return pv
        if existing.state == "skipped":
            return Preview(
                sub.email, edition_date, skip_reason=existing.skip_reason, state=existing.state
            )
    pv = previews_for(session, [sub], edition_date, settings=settings)[0]
    why = unsendable_reason(sub, edition_date)
    if why:
        pv.skip_reason = why if pv.html is None else pv.skip_reason
        pv.note = f"not sent as things stand: {why}"
    return pv


def edition_html(session: Session, delivery: Delivery, settings: Settings | None = None) -> str:
    """The HTML of an edition as it was sent, for "view in browser": its date, its recorded
    papers and the subscriber's settings of then (deliveries.recipient)."""
    from worker.rendering import get_renderer

    picks = [
        (dp.paper_id, dp.matched_topic, dp.terms)
        for dp in session.scalars(
            select(DeliveryPaper)
            .where(DeliveryPaper.delivery_id == delivery.id)
            .order_by(DeliveryPaper.position)
        )
    ]
    sub = session.get(Subscriber, delivery.subscriber_id)
    assert sub is not None
    # The settings it was made for, not today's: its footer says what was true then.
    return get_renderer(settings or get_settings()).digest_html(
        recipient_as_sent(delivery, sub),
        delivery.edition_date,
        _views(session, picks),
        as_sent=True,
    )


@dataclass
class DryRun:
    edition_date: date
    due: int
    already_planned: int
    previews: list[Preview]

    @property
    def would_send(self) -> int:
        return sum(1 for p in self.previews if p.papers)

    @property
    def would_skip(self) -> int:
        return sum(1 for p in self.previews if not p.papers)


def dry_run_edition(
    session: Session, edition_date: date, settings: Settings | None = None
) -> DryRun:
    """Who edition D would go to and what they would get; nothing is written."""
    subs = list(
        session.scalars(select(Subscriber).where(*due_filter(edition_date)).order_by(Subscriber.id))
    )
    planned = set(
        session.scalars(select(Delivery.subscriber_id).where(Delivery.edition_date == edition_date))
    )
    todo = [s for s in subs if s.id not in planned]
    return DryRun(
        edition_date,
        len(subs),
        len(subs) - len(todo),
        previews_for(session, todo, edition_date, settings=settings),
    )


def explain_digest(
    session: Session,
    email: str,
    edition_date: date,
    settings: Settings | None = None,
    *,
    now: datetime | None = None,
) -> list[object]:
    """Every candidate's scores for ``email``'s edition D (a fresh selection, nothing
    written): relevance per topic, field weight, matched terms, trending, freshness, final.
    A list of :class:`worker.selection.Explained`, best first."""
    from worker.selection import (
        SelectionParams,
        explain_profile,
        load_candidates,
        load_profiles,
    )

    settings = settings or get_settings()
    sub = session.scalar(select(Subscriber).where(Subscriber.email == email.strip().lower()))
    if sub is None:
        raise NotFound(f"no subscriber with address {email}; see `papermail subscribers list`")
    end = window_end(sub, edition_date, now or utcnow())
    profiles, voted = load_profiles(session, [sub], {sub.id: end}, settings)
    prof = profiles[0]
    cands = load_candidates(session, prof.window_start, prof.window_end)
    return explain_profile(
        cands, prof, voted_papers=voted, params=SelectionParams.from_settings(settings)
    )
