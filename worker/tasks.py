"""The Celery shell: app, beat schedule and thin tasks that carry ids, never objects.

Start the processes with::

    celery -A worker.tasks worker -Q plan,send --concurrency 4
    celery -A worker.tasks beat

Exactly-once does not come from the queue but from the database: the unique
(subscriber, edition date) row and the atomic pending -> sending claim in
:mod:`worker.delivery`. The queue may deliver a task twice (``acks_late``, a worker lost,
a visibility timeout); the second run finds the rows claimed and sends nothing. Tasks are
enqueued only after the rows they name are committed.

Recovery when a whole worker machine dies: its tasks stay unacknowledged in Redis until the
visibility timeout (hours, see below). The ``reap`` beat task does not wait for that: rows
left ``sending`` past ``PAPERMAIL_SENDING_TIMEOUT_SECONDS`` become ``unknown`` (never re-sent
automatically), and rows still ``pending`` that long after they were due are enqueued again
once the ``send`` queue has drained (a duplicate task is harmless, see above).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from celery import Celery, signals
from celery.schedules import crontab
from kombu import Exchange, Queue
from sqlalchemy import select

from worker import delivery, scheduling
from worker.config import Settings, get_settings
from worker.db import session_scope
from worker.errors import PapermailError
from worker.models import Delivery, DeliveryState, utcnow

log = logging.getLogger(__name__)

PLAN_QUEUE = "plan"
SEND_QUEUE = "send"

# The longest countdown any task here is given (transient retries are clamped to it;
# delivery.backoff_delay caps at an hour). A countdown longer than the visibility timeout
# would make Redis hand the waiting task to a second worker when it expires.
MAX_COUNTDOWN_SECONDS = 3600
VISIBILITY_TIMEOUT_SECONDS = 3 * 3600
assert MAX_COUNTDOWN_SECONDS < VISIBILITY_TIMEOUT_SECONDS, "countdown outlives the visibility"
# Retries due within the same few seconds travel as one task.
RETRY_GROUP_SECONDS = 5
REAP_EVERY_MINUTES = 5
SQS_POLL_SECONDS = 60
# The sweep re-enqueues stranded pending rows of recent editions only: a digest from last
# week is news no more.
SWEEP_EDITION_DAYS = 2


def _every(minutes: int) -> Any:
    """A wall-clock aligned schedule when ``minutes`` divides an hour or a day."""
    if minutes < 60 and 60 % minutes == 0:
        return crontab(minute=f"*/{minutes}")
    if minutes % 60 == 0 and 24 % (minutes // 60) == 0:
        return crontab(minute=0, hour=f"*/{minutes // 60}")
    return timedelta(minutes=minutes)


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The periodic tasks; each expires after one period so a backlog never piles up."""
    plan_every = settings.plan_interval_minutes
    schedule: dict[str, dict[str, Any]] = {
        "plan-due": {
            "task": "papermail.plan_due",
            "schedule": _every(plan_every),
            "options": {"queue": PLAN_QUEUE, "expires": plan_every * 60},
        },
        "reap": {
            "task": "papermail.reap",
            "schedule": _every(REAP_EVERY_MINUTES),
            "options": {"queue": PLAN_QUEUE, "expires": REAP_EVERY_MINUTES * 60},
        },
    }
    if settings.sqs_queue_url:
        schedule["poll-sqs"] = {
            "task": "papermail.poll_sqs",
            "schedule": float(SQS_POLL_SECONDS),
            "options": {"queue": PLAN_QUEUE, "expires": SQS_POLL_SECONDS},
        }
    return schedule


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        # Without a broker nothing is enqueued (the CLI runs in-process); "memory://" only
        # lets this module import, e.g. for `celery inspect` or the tests.
        "broker_url": settings.broker_url or "memory://",
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS},
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        # Nothing reads task results: the database is the record.
        "result_backend": None,
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        # Acknowledge after the task ran; a killed worker's task goes back to the queue.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # A broker blip must not kill a chunk mid-send (the email in flight would become
        # `unknown`): let it finish; its redelivered copy finds every row claimed.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_default_queue": PLAN_QUEUE,
        # Each queue its own exchange and key: bound alike they would each get every task.
        "task_queues": (
            Queue(PLAN_QUEUE, Exchange(PLAN_QUEUE), routing_key=PLAN_QUEUE),
            Queue(SEND_QUEUE, Exchange(SEND_QUEUE), routing_key=SEND_QUEUE),
        ),
        "task_default_exchange": PLAN_QUEUE,
        "task_default_routing_key": PLAN_QUEUE,
        "task_routes": {
            "papermail.send_chunk": {"queue": SEND_QUEUE},
            "papermail.plan_due": {"queue": PLAN_QUEUE},
            "papermail.reap": {"queue": PLAN_QUEUE},
            "papermail.poll_sqs": {"queue": PLAN_QUEUE},
        },
        "beat_schedule": beat_schedule(settings),
        "timezone": "UTC",
        "enable_utc": True,
    }


app = Celery("papermail")
app.conf.update(celery_config(get_settings()))


def _ensure_configured(settings: Settings) -> None:
    """Follow a changed broker URL (tests, or settings reloaded in a long-lived process)."""
    wanted = settings.broker_url or "memory://"
    if app.conf.broker_url != wanted:
        app.conf.update(celery_config(settings))
        # Drop the connection and producer pools built for the old URL.
        app._pool = None
        app.amqp._producer_pool = None


@signals.worker_process_init.connect
def _fresh_process_state(**_: Any) -> None:
    """A forked pool process must not share its parent's sockets: DB, SMTP/SES, Redis."""
    from worker.db import dispose_engines
    from worker.mailers.base import reset_mailer
    from worker.ratelimit import reset_limiter

    dispose_engines()
    reset_mailer()
    reset_limiter()


# ---------------------------------------------------------------------------------------
# Enqueueing (always after the commit of the rows the tasks name)


def enqueue_ids(
    ids: Sequence[int],
    settings: Settings | None = None,
    *,
    countdown: float | None = None,
    resend: dict[str, Any] | None = None,
) -> int:
    """One ``send_chunk`` task per chunk of ``settings.chunk_size`` ids; returns the count.

    ``resend`` carries an operator resend's options (reason, include_suppressed) to the
    worker, so the attempt history and the suppression override travel with the ids.
    """
    settings = settings or get_settings()
    _ensure_configured(settings)
    if countdown is not None:
        countdown = min(max(0.0, countdown), MAX_COUNTDOWN_SECONDS)
    batches = delivery.chunks(list(ids), settings.chunk_size)
    for batch in batches:
        send_chunk.apply_async(
            (batch,),
            kwargs={"resend": resend} if resend else {},
            queue=SEND_QUEUE,
            countdown=countdown,
        )
    return len(batches)


def enqueue_chunks(
    ids: Sequence[int],
    *,
    kind: str = "resend",
    reason: str | None = None,
    include_suppressed: bool = False,
    settings: Settings | None = None,
) -> int:
    """Queue an operator's resend on the same ``send`` queue and rate limit as editions."""
    options = {"kind": kind, "reason": reason, "include_suppressed": bool(include_suppressed)}
    return enqueue_ids(ids, settings, resend=options)


def requeue_retries(
    retry: Sequence[tuple[int, float]],
    settings: Settings | None = None,
    resend: dict[str, Any] | None = None,
) -> int:
    """Re-enqueue transient failures after their backoff, grouped by due time."""
    groups: dict[int, list[int]] = {}
    for delivery_id, delay in retry:
        slot = math.ceil(max(delay, 1.0) / RETRY_GROUP_SECONDS) * RETRY_GROUP_SECONDS
        groups.setdefault(min(slot, MAX_COUNTDOWN_SECONDS), []).append(delivery_id)
    return sum(
        enqueue_ids(ids, settings, countdown=countdown, resend=resend)
        for countdown, ids in sorted(groups.items())
    )


def enqueue_edition(
    edition: date, *, settings: Settings | None = None, now: datetime | None = None
) -> delivery.PlanResult:
    """Plan edition D for everyone due that day, commit, then enqueue the pending rows.

    Rows whose retry time has not come yet are left to the task that will retry them.
    """
    settings = settings or get_settings()
    if settings.in_process:
        raise PapermailError(
            "no broker configured: set PAPERMAIL_BROKER_URL (e.g. redis://localhost:6379/0) "
            "to send through Celery workers, or leave it unset to send in-process"
        )
    now = now or utcnow()
    with session_scope() as session:
        delivery.reap_stale_sending(session, settings, now)
        plan = delivery.plan_edition(session, edition, now=now)
        ready = set(delivery.pending_delivery_ids(session, edition, now=now))
    plan.pending_ids = [i for i in plan.pending_ids if i in ready]
    enqueue_ids(plan.pending_ids, settings)
    return plan


# ---------------------------------------------------------------------------------------
# Tasks


def _delivery_ids(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        raise ValueError(f"send_chunk takes a list of delivery ids (integers), got {value!r}")
    return value


@app.task(name="papermail.send_chunk", bind=True, max_retries=10)
def send_chunk(
    self: Any, delivery_ids: list[int], resend: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Select, render, claim, rate-limit, send and record one chunk of deliveries."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from sqlalchemy.exc import OperationalError

    ids = _delivery_ids(delivery_ids)
    settings = get_settings()
    options: dict[str, Any] = {}
    if resend:
        options = {
            "attempt_kind": str(resend.get("kind") or "resend"),
            "reason": resend.get("reason"),
            "actor": "cli",
            "include_suppressed": bool(resend.get("include_suppressed")),
        }
    try:
        outcome = delivery.process_deliveries(ids, settings=settings, **options)
    except (OperationalError, RedisConnectionError) as exc:
        # The database or the limiter is unreachable: try the whole chunk again later;
        # rows already sent are not claimable any more, so nothing goes out twice.
        countdown = min(MAX_COUNTDOWN_SECONDS, 15 * 2**self.request.retries)
        log.warning("send_chunk: %s; retrying the chunk in %ss", exc, countdown)
        raise self.retry(exc=exc, countdown=countdown) from exc
    if outcome.retry:
        requeue_retries(outcome.retry, settings, resend=resend)
    if outcome.paused:
        log.error(
            "sending paused (%s): deliveries stay pending; `papermail sending resume` "
            "queues them again",
            outcome.paused,
        )
    summary = {
        "sent": outcome.sent,
        "skipped": outcome.skipped,
        "failed": outcome.failed,
        "unknown": outcome.unknown,
        "not_claimed": outcome.not_claimed,
        "retry": len(outcome.retry),
        "paused": outcome.paused,
    }
    log.info("send_chunk of %d: %s", len(ids), summary)
    return summary


@app.task(name="papermail.plan_due")
def plan_due() -> int:
    """Beat: plan everyone whose local send hour has come; enqueue after the commit."""
    settings = get_settings()
    with session_scope() as session:
        ids = scheduling.plan_due(session)
    chunks = enqueue_ids(ids, settings)
    log.info("plan_due: %d deliveries in %d chunks", len(ids), chunks)
    return len(ids)


@dataclass
class Recovery:
    unknown: int = 0  # rows stuck in sending, now unknown
    requeued: int = 0  # stranded pending rows enqueued again
    skipped_reason: str | None = None  # why the pending sweep did not run
    ids: list[int] = field(default_factory=list)


def send_queue_size() -> int:
    """Messages waiting in the ``send`` queue (not those a worker already holds)."""
    with app.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(queue=SEND_QUEUE).message_count)


def recover(settings: Settings | None = None, now: datetime | None = None) -> Recovery:
    """Reap stale ``sending`` rows, then re-enqueue stranded ``pending`` ones.

    A pending row is stranded when it was due more than the sending timeout ago and the
    ``send`` queue is empty (so no waiting task names it): its task died with a worker.
    """
    settings = settings or get_settings()
    _ensure_configured(settings)
    now = now or utcnow()
    result = Recovery()
    with session_scope() as session:
        result.unknown = delivery.reap_stale_sending(session, settings, now)
        paused = delivery.sending_paused(session)
    if paused:
        result.skipped_reason = f"sending is paused: {paused}"
        return result
    if send_queue_size():
        result.skipped_reason = "the send queue is not empty"
        return result
    cutoff = now - timedelta(seconds=settings.sending_timeout_seconds)
    with session_scope() as session:
        result.ids = list(
            session.scalars(
                select(Delivery.id)
                .where(
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.edition_date >= now.date() - timedelta(days=SWEEP_EDITION_DAYS),
                    Delivery.scheduled_at <= cutoff,
                )
                .order_by(Delivery.id)
            )
        )
    result.requeued = len(result.ids)
    if result.ids:
        enqueue_ids(result.ids, settings)
        log.warning("reap: %d stranded pending deliveries enqueued again", result.requeued)
    return result


@app.task(name="papermail.reap")
def reap() -> dict[str, Any]:
    """Beat: stale ``sending`` -> ``unknown``; stranded ``pending`` -> queued again."""
    result = recover()
    return {"unknown": result.unknown, "requeued": result.requeued}


@app.task(name="papermail.poll_sqs")
def poll_sqs() -> str:
    """Beat (when PAPERMAIL_SQS_QUEUE_URL is set): apply the SES notifications waiting."""
    from worker.events import poll_sqs as poll

    counts = poll(get_settings(), once=True)
    log.info("poll_sqs: %s", counts)
    return str(counts)


# ---------------------------------------------------------------------------------------
# Following an edition (for `papermail digest run --wait`; no click here)


@dataclass
class EditionProgress:
    edition: date
    total: int  # deliveries followed
    waiting: int  # still pending or sending
    counts: dict[str, int]
    paused: str | None = None

    @property
    def done(self) -> int:
        return max(0, self.total - self.waiting)

    @property
    def finished(self) -> bool:
        return self.waiting == 0


def edition_progress(edition: date, total: int) -> EditionProgress:
    with session_scope() as session:
        counts = delivery.edition_counts(session, edition)
        paused = delivery.sending_paused(session)
    waiting = counts.get(DeliveryState.PENDING, 0) + counts.get(DeliveryState.SENDING, 0)
    return EditionProgress(edition, max(total, waiting), waiting, counts, paused)


def follow_edition(
    edition: date,
    *,
    planned_ids: Sequence[int],
    on_progress: Callable[[EditionProgress], None] | None = None,
    poll_seconds: float = 1.0,
    timeout: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> EditionProgress:
    """Poll the database until no delivery of the edition is pending or sending.

    Returns early when sending is paused (the rest stays pending) or after ``timeout``
    seconds; the workers go on either way. ``on_progress`` gets every poll's figures.
    """
    total = len(planned_ids)
    started = time.monotonic()
    while True:
        progress = edition_progress(edition, total)
        total = progress.total
        if on_progress:
            on_progress(progress)
        if progress.finished or progress.paused:
            return progress
        if timeout is not None and time.monotonic() - started >= timeout:
            return progress
        sleep(poll_seconds)
