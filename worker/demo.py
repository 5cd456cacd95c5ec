"""`papermail demo`: the whole job on the embedded default, from a fresh clone."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from sqlalchemy import select

from worker import delivery, migrate
from worker.config import Settings, get_settings
from worker.db import session_scope
from worker.models import Delivery, DeliveryState, Subscriber, utcnow

# Different interests, zones and cadences, so the emails differ; the last one's topic
# matches nothing in the sample papers and shows a skipped edition (no empty email).
SAMPLE_SUBSCRIBERS: list[dict[str, object]] = [
    {"email": "ada@example.org", "topics": ["pruning", "image compression"]},
    {
        "email": "grace@example.org",
        "topics": ["gaussian processes", "kernel methods"],
        "timezone": "Europe/Paris",
        "max_papers": 4,
    },
    {"email": "alan@example.org", "topics": [], "max_papers": 5},
    {
        "email": "emmy@example.org",
        "topics": ["model security", "machine unlearning"],
        "timezone": "America/New_York",
        "send_hour": 6,
    },
    {"email": "katherine@example.org", "topics": ["quantum chemistry"]},
]


@dataclass
class DemoResult:
    edition_date: date
    papers_new: int
    papers_updated: int
    subscribers_added: int
    plan: delivery.PlanResult | None  # None: the edition was already done, nothing ran
    outcome: delivery.ChunkOutcome | None
    outbox: Path
    previews: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    # By state, the sample subscribers' deliveries of the edition (after this run).
    states: dict[str, int] = field(default_factory=dict)

    @property
    def already_done(self) -> bool:
        return self.plan is None


def run_demo(settings: Settings | None = None) -> DemoResult:
    from worker.papers import load_sample_papers
    from worker.previews import edition_html
    from worker.subscribers import SubscriberInput, add_subscriber

    settings = settings or get_settings()
    migrate.upgrade()
    now = utcnow()
    edition = now.date()
    with session_scope() as session:
        added = 0
        for spec in SAMPLE_SUBSCRIBERS:
            exists = session.scalar(select(Subscriber.id).where(Subscriber.email == spec["email"]))
            if exists is None:
                add_subscriber(session, SubscriberInput.parse(**spec), confirmed=True, actor="demo")
                added += 1
        # The sample papers are undated (nothing is made up): they count from their
        # ingestion, which the demo puts just before the edition's first send time, so
        # every edition's window holds them whatever the hour the demo runs.
        subs = session.scalars(
            select(Subscriber).where(Subscriber.email.in_([s["email"] for s in SAMPLE_SUBSCRIBERS]))
        ).all()
        planned = set(
            session.scalars(
                select(Delivery.subscriber_id).where(
                    Delivery.edition_date == edition,
                    Delivery.subscriber_id.in_([sub.id for sub in subs]),
                )
            )
        )
        # Run again the same day: today's edition is already decided for every sample
        # subscriber, so nothing is loaded, planned, sent or written (not even the papers'
        # ingestion time, or the previews).
        done = not added and len(planned) == len(subs)
        if not done:
            first_send = min((delivery.send_time(sub, edition) for sub in subs), default=now)
            counts = load_sample_papers(session, now=min(now, first_send - timedelta(minutes=1)))
    plan, outcome = (None, None) if done else delivery.run_in_process(edition, settings=settings)

    result = DemoResult(
        edition,
        0 if done else counts.new,
        0 if done else counts.updated,
        added,
        plan,
        outcome,
        Path(settings.outbox_dir).resolve(),
    )
    preview_dir = result.outbox / "previews" / edition.isoformat()
    if not done:
        preview_dir.mkdir(parents=True, exist_ok=True)
    with session_scope() as session:
        rows = session.execute(
            select(Delivery, Subscriber.email)
            .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
            .where(Delivery.edition_date == edition)
            .order_by(Subscriber.email)
        ).all()
        samples = {str(spec["email"]) for spec in SAMPLE_SUBSCRIBERS}
        for row, email in rows:
            if email in samples:
                result.states[row.state] = result.states.get(row.state, 0) + 1
            if row.state == DeliveryState.SKIPPED:
                result.skipped[email] = row.skip_reason or ""
            elif row.state in (DeliveryState.SENT, DeliveryState.DELIVERED):
                path = preview_dir / f"{email}.html"
                if not done:
                    path.write_text(edition_html(session, row, settings), encoding="utf-8")
                if path.exists():
                    result.previews.append(path)
    return result
