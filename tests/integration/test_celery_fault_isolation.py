"""One bad delivery fails alone through real Celery workers, Redis and PostgreSQL: the
recovery sweep re-queues a batch holding a bad address, a paper that breaks rendering and
two editions of one subscriber; the good rows go out once, the bad ones end `failed`
with their reason, and nothing is left pending for the next sweep."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from worker import config, delivery
from worker.db import session_scope
from worker.models import Delivery, DeliveryAttempt, DeliveryPaper, Paper, Subscriber, utcnow

from .test_celery_pipeline import (  # noqa: F401 - `stack` is a fixture used by name
    Workers,
    all_final,
    emails_per_recipient,
    outbox,
    seed,
    stack,
    state_counts,
    wait_for,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@pytest.mark.slow
def test_recover_sweeps_a_mixed_batch_and_only_the_bad_rows_fail(
    stack: Callable[..., Workers],  # noqa: F811
) -> None:
    from worker import tasks

    workers = stack(PAPERMAIL_SEND_RATE="200", PAPERMAIL_CHUNK_SIZE="50")
    readers = seed(17)
    today = utcnow().date()
    yesterday = today - timedelta(days=1)
    midnight = datetime.combine(today, datetime.min.time(), tzinfo=UTC)
    with session_scope() as s:
        # In the windows of both yesterday's and today's edition (send hour 00:00 UTC).
        for i in range(4):
            s.add(
                Paper(
                    id=f"2611.0090{i}",
                    title=f"Sparse pruning of transformers, part {i}",
                    abstract="Sparse pruning of transformers. " * 3,
                    authors=["Ada Lovelace"],
                    upvotes=90 - i,
                    published_at=midnight - timedelta(hours=30 + i),
                )
            )
        s.add(  # authors that are not names: rendering raises
            Paper(
                id="2611.00999",
                title="Cursed topology of knots",
                abstract="Cursed topology of knots. " * 3,
                authors=[42, None],
                upvotes=5,
                published_at=midnight - timedelta(hours=2),
            )
        )
        for address, topics in (
            ("ada@example.org", ["sparse pruning of transformers"]),
            ("tést@example.com", ["pruning neural networks"]),  # stored before any check
            ("kat@example.org", ["cursed topology"]),
        ):
            s.add(
                Subscriber(email=address, status="active", topics=topics, send_hour=0, max_papers=2)
            )
    with session_scope() as s:
        ada = s.scalar(select(Subscriber.id).where(Subscriber.email == "ada@example.org"))
        planned = delivery.plan_edition(s, today).pending_ids
        planned += delivery.plan_edition(s, yesterday, subscriber_ids=[ada]).pending_ids
    assert len(planned) == 21
    workers.start("a", 2)

    # Their tasks were lost (a broker restart, say): the sweep finds and re-queues them,
    # all 21 in one batch, ada twice.
    later = utcnow() + timedelta(seconds=config.get_settings().sending_timeout_seconds + 1)
    first = tasks.recover(now=later)
    assert first.requeued == 21 and first.skipped_reason is None
    wait_for("every delivery final", all_final, timeout=90)

    with session_scope() as s:
        skipped = s.execute(
            select(Delivery.subscriber_id, Delivery.edition_date, Delivery.skip_reason).where(
                Delivery.state == "skipped"
            )
        ).all()
    assert state_counts() == Counter({"sent": 19, "failed": 2}), skipped
    with session_scope() as s:
        rows = s.execute(
            select(
                Subscriber.email, Delivery.edition_date, Delivery.state, Delivery.last_error
            ).join(Delivery, Delivery.subscriber_id == Subscriber.id)
        ).all()
        failed = {email: error for email, _, state, error in rows if state == "failed"}
        assert set(failed) == {"tést@example.com", "kat@example.org"}
        assert "only ASCII can stand before the @" in failed["tést@example.com"]
        assert failed["kat@example.org"].startswith("could not render the digest: ")
        assert set(
            s.scalars(
                select(DeliveryAttempt.outcome)
                .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
                .where(Delivery.state == "failed")
            )
        ) == {"failed"}
        ada_papers = [
            set(
                s.scalars(
                    select(DeliveryPaper.paper_id)
                    .join(Delivery, Delivery.id == DeliveryPaper.delivery_id)
                    .where(Delivery.subscriber_id == ada, Delivery.edition_date == day)
                )
            )
            for day in (yesterday, today)
        ]
    assert all(ada_papers) and not ada_papers[0] & ada_papers[1]
    files = emails_per_recipient(outbox())
    assert files == Counter({**{r: 1 for r in readers}, "ada@example.org": 2})

    # Nothing is left pending: the next sweep has nothing to re-queue, for ever.
    again = tasks.recover(now=later + timedelta(minutes=5))
    assert (again.requeued, again.skipped_reason) == (0, None)
    assert "raised unexpected" not in workers.log("a")
