"""The Celery shell: app, beat schedule and thin tasks that carry ids, never objects.

Start the processes with::

    celery -A worker.tasks worker -Q plan,send --concurrency 4
    celery -A worker.tasks beat

Exactly-once does not come from the queue but from the database: the unique
(subscriber, edition date) row and the atomic pending -> sending claim in
:mod:`worker.delivery`. The queue may deliver a task twice (``acks_late``, a worker lost,
a visibility timeout); the second run finds the rows claimed and sends nothing. Tasks are
enqueued only after the rows they name are committed.

Recovery, by the ``reap`` sweep the beat runs every ``PAPERMAIL_SWEEP_INTERVAL_SECONDS``:

- **Broker loss.** Every publish stamps its rows with the broker's *epoch* (the Redis run id
  plus a marker key, read before the publish), so a Redis that restarted, with or without
  its data, failed over or was flushed has another epoch, and every pending row published
  into the old one is queued again by the next sweep. Rows whose publish failed, or whose
  chunk could not be re-published (limiter or database down, retries exhausted), have no
  epoch and are queued again too. A healthy run queues nothing twice.
- **A dead worker machine.** Its tasks stay unacknowledged in Redis until the visibility
  timeout (hours, see below). Rows left ``sending`` past ``PAPERMAIL_SENDING_TIMEOUT_SECONDS``
  become ``unknown`` (never re-sent automatically), and rows still ``pending`` that long
  after they were due are enqueued again once the ``send`` queue has drained.

A task queued twice is harmless, see above.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from celery import Celery, signals
from celery.schedules import crontab
from kombu import Exchange, Queue
from sqlalchemy import and_, or_, select, update

from worker import delivery, scheduling
from worker.account import check_quota
from worker.config import Settings, get_settings
from worker.db import session_scope
from worker.errors import PapermailError
from worker.models import Delivery, DeliveryState, utcnow
from worker.queues import PLAN_QUEUE, SEND_QUEUE

log = logging.getLogger(__name__)

# The longest countdown any task here is given (transient retries are clamped to it;
# delivery.backoff_delay caps at an hour). A countdown longer than the visibility timeout
# would make Redis hand the waiting task to a second worker when it expires.
MAX_COUNTDOWN_SECONDS = 3600
VISIBILITY_TIMEOUT_SECONDS = 3 * 3600
assert MAX_COUNTDOWN_SECONDS < VISIBILITY_TIMEOUT_SECONDS, "countdown outlives the visibility"
# Retries due within the same few seconds travel as one task.
RETRY_GROUP_SECONDS = 5
SQS_POLL_SECONDS = 60
# How often the beat tries a paper fetch again after FETCH_AT until it has succeeded.
FETCH_RETRY_MINUTES = 15
# A row planned this recently without an epoch may still be on its way into the queue
# (a big edition publishes thousands of chunks after its commit): leave it to the planner.
UNPUBLISHED_GRACE_SECONDS = 60
# Marker of the broker's current life, see broker_epoch().
EPOCH_KEY = "papermail:broker-epoch"
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
    sweep_every = settings.sweep_interval_seconds
    sweep_schedule = (
        _every(sweep_every // 60) if sweep_every % 60 == 0 else timedelta(seconds=sweep_every)
    )
    schedule: dict[str, dict[str, Any]] = {
        "plan-due": {
            "task": "papermail.plan_due",
            "schedule": _every(plan_every),
            "options": {"queue": PLAN_QUEUE, "expires": plan_every * 60},
        },
        "reap": {
            "task": "papermail.reap",
            "schedule": sweep_schedule,
            "options": {"queue": PLAN_QUEUE, "expires": sweep_every},
        },
    }
    if settings.sources:
        # The day's papers at FETCH_AT (UTC), and every 15 minutes after it until each
        # source has succeeded: editions waiting for them go as soon as they are in.
        at = settings.fetch_time
        schedule["fetch-papers"] = {
            "task": "papermail.fetch_papers",
            "schedule": crontab(
                minute=f"{at.minute}-59/{FETCH_RETRY_MINUTES}", hour=f"{at.hour}-23"
            ),
            "options": {"queue": PLAN_QUEUE, "expires": FETCH_RETRY_MINUTES * 60},
        }
    if settings.alert_webhook_url:
        every = settings.alert_check_minutes
        schedule["check-alerts"] = {
            "task": "papermail.check_alerts",
            "schedule": _every(every),
            "options": {"queue": PLAN_QUEUE, "expires": every * 60},
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
        # Workers and the beat outlive a broker outage of any length: they reconnect for
        # ever instead of exiting after 100 attempts (the default).
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        "broker_channel_error_retry": True,
        "broker_transport_options": {
            "visibility_timeout": VISIBILITY_TIMEOUT_SECONDS,
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
        },
        # A publish rides out a blip of a few seconds, then fails (and the rows it named
        # are left for the sweep, see enqueue_ids).
        "task_publish_retry_policy": {
            "max_retries": 5,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 2,
        },
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
            "papermail.fetch_papers": {"queue": PLAN_QUEUE},
            "papermail.check_alerts": {"queue": PLAN_QUEUE},
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


@signals.setup_logging.connect
def _setup_logging(
    loglevel: int | str | None = None,
    logfile: str | None = None,
    format: str | None = None,  # the signal's argument name
    **_: Any,
) -> None:
    """The worker's and the beat's logs in PAPERMAIL_LOG_FORMAT (worker.logs), instead of
    Celery's own set-up (connecting here is what turns that off); text keeps Celery's
    line format. Prefork children inherit it."""
    from worker.config import ConfigError
    from worker.logs import configure_logging

    try:
        settings = get_settings()
    except ConfigError:
        settings = None  # the worker reports the bad setting when it needs it
    configure_logging(
        settings,
        loglevel or logging.WARNING,
        filename=logfile or None,
        text_format=format or "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s",
    )


@signals.celeryd_init.connect
def _early_logging(options: dict[str, Any] | None = None, conf: Any = None, **_: Any) -> None:
    """The worker's first lines (its privilege warning, the template preload) are in the
    configured format too: set up before Celery's own turn, which sets it up again."""
    options = options or {}
    _setup_logging(
        loglevel=options.get("loglevel"),
        logfile=options.get("logfile"),
        format=getattr(conf, "worker_log_format", None),
    )


@signals.worker_init.connect
def _preload_before_fork(**_: Any) -> None:
    """Import the sending path and compile the templates once, in the parent.

    Celery's prefork children are forked from this process: what it has loaded they share
    (copy-on-write) instead of each importing numpy, scipy, the renderer and the mailer on
    its first chunk (about 2 s of CPU per child, repeated whenever a child is replaced),
    while the first chunk's deliveries wait.
    """
    import worker.selection  # noqa: F401
    from worker.db import get_engine
    from worker.mailers.base import mailer_class
    from worker.rendering import get_renderer

    settings = get_settings()
    mailer_class(settings)
    # The engine, not a connection: it imports the database driver (psycopg: about 0.3 s
    # of CPU per child otherwise); each child drops it and connects on its own.
    get_engine(settings.database_url)
    try:
        get_renderer(settings)
    except Exception:  # a broken template is reported by the chunk that needs it
        log.exception("could not compile the email templates before starting the pool")
    _start_metrics(settings)
    # What is loaded now lives as long as the process: out of the collector's sight, a
    # full collection in a child scans only the chunk's own objects (it scanned ~170,000
    # import-time objects, ~10% of a child's CPU), and never writes to the shared pages
    # (their reference headers), which copy-on-write would then duplicate in every child.
    gc.collect()
    gc.freeze()


def _start_metrics(settings: Settings) -> None:
    """Before the pool forks: the metrics directory of this worker (emptied of a previous
    run's files) and, with PAPERMAIL_METRICS_PORT, the parent's /metrics server adding up
    every pool process's figures (the edition gauges come from `papermail web`)."""
    from worker import metrics

    if settings.metrics_dir is not None:
        metrics.wipe_directory(settings.metrics_dir)
    metrics.configure(settings)
    if settings.metrics_port:
        metrics.serve(settings, "0.0.0.0", settings.metrics_port, editions=False)
        log.info("worker metrics on :%d/metrics", settings.metrics_port)


@signals.worker_process_shutdown.connect
def _pool_process_exit(pid: int | None = None, **_: Any) -> None:
    """A pool process exits: its live-gauge files go (prometheus_client's bookkeeping)."""
    import os

    from worker import metrics

    metrics.process_exited(pid or os.getpid())


@signals.worker_process_init.connect
def _fresh_process_state(**_: Any) -> None:
    """A forked pool process must not share its parent's sockets: DB, SMTP/SES, Redis."""
    from worker.db import dispose_engines
    from worker.mailers.base import reset_mailer
    from worker.ratelimit import reset_limiter

    dispose_engines()
    reset_mailer()
    reset_limiter()
    _epoch_clients.clear()


# ---------------------------------------------------------------------------------------
# The broker's epoch: which life of the broker a task was published into

_epoch_clients: dict[str, Any] = {}
_epoch_lock = threading.Lock()
# Keep the marker while it belongs to this server run; otherwise start a new epoch.
_LUA_EPOCH = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ':' then return v end
redis.call('SET', KEYS[1], ARGV[2])
return ARGV[2]
"""


def _is_redis(url: str | None) -> bool:
    return bool(url) and str(url).startswith(("redis://", "rediss://", "unix://"))


def broker_epoch(settings: Settings | None = None) -> str:
    """An id of the broker's current life; it changes whenever queued tasks may be gone.

    The Redis run id changes on every restart (even one that reloaded its append-only
    file, which may miss the last second of publishes) and on a failover; the marker key
    disappears with a FLUSHALL. Any other broker has one life: ``"static"``.
    """
    settings = settings or get_settings()
    url = settings.broker_url
    if not _is_redis(url):
        return "static"
    assert url is not None
    import redis

    with _epoch_lock:
        client = _epoch_clients.get(url)
        if client is None:
            client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
            _epoch_clients[url] = client
    run_id = str(client.info("server")["run_id"])
    fresh = f"{run_id}:{uuid.uuid4().hex[:12]}"
    value = client.eval(_LUA_EPOCH, 1, EPOCH_KEY, run_id, fresh)
    return value.decode() if isinstance(value, bytes) else str(value)


def _mark_queued(ids: Sequence[int], epoch: str | None) -> None:
    """Stamp pending rows with the epoch their task went into (None: hand them back).

    A row that fails to be stamped looks unpublished and is queued once more by the
    sweep, which is harmless; a stamp without a task would not be, hence: publish first.
    """
    if not ids:
        return
    with session_scope() as session:
        for batch in delivery.chunks(list(ids), 5000):
            session.execute(
                update(Delivery)
                .where(Delivery.id.in_(batch), Delivery.state == DeliveryState.PENDING)
                .values(queued_epoch=epoch)
            )


def release(ids: Sequence[int]) -> None:
    """The task naming these rows is gone: leave their pending ones to the next sweep."""
    try:
        _mark_queued(ids, None)
    except Exception:
        log.exception(
            "could not hand %d deliveries back to the sweep; they are queued again when the "
            "broker's epoch changes or the send queue drains",
            len(ids),
        )


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
    if not batches:
        return 0
    # Read before the publish: a broker restarting in between makes the stamp stale (the
    # sweep queues the rows once more), never a stamp whose task is gone.
    epoch = broker_epoch(settings)
    for batch in batches:
        send_chunk.apply_async(
            (batch,),
            kwargs={"resend": resend} if resend else {},
            queue=SEND_QUEUE,
            countdown=countdown,
        )
        try:
            _mark_queued(batch, epoch)
        except Exception as exc:  # unstamped rows are queued once more by the sweep
            log.warning("enqueue: could not stamp %d queued deliveries: %s", len(batch), exc)
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
    # After queueing: a slow or absent provider answer never holds the edition back.
    check_quota(edition, len(plan.pending_ids), settings)
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
    from celery.exceptions import Retry

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
    except Exception as exc:
        if not _unreachable(exc):
            log.exception("send_chunk: unexpected error; its pending rows go back to the sweep")
            release(ids)
            raise
        # The database or the limiter is unreachable: try the whole chunk again later;
        # rows already sent are not claimable any more, so nothing goes out twice.
        countdown = min(MAX_COUNTDOWN_SECONDS, 15 * 2**self.request.retries)
        log.warning("send_chunk: %s; retrying the chunk in %ss", exc, countdown)
        try:
            raise self.retry(exc=exc, countdown=countdown) from exc
        except Retry:
            raise
        except BaseException:
            # The retry could not be published (the broker is down too: Celery would
            # drop the message) or the retries ran out: never lose the chunk with it.
            release(ids)
            raise
    if outcome.retry:
        try:
            requeue_retries(outcome.retry, settings, resend=resend)
        except Exception as exc:
            log.warning("send_chunk: could not queue %d retries (%s)", len(outcome.retry), exc)
            release([i for i, _ in outcome.retry])
    if outcome.paused:
        log.error(
            "sending paused (%s): deliveries stay pending; `papermail sending resume` "
            "queues them again",
            outcome.paused,
        )
        from worker.alerts import check_quietly

        check_quietly(settings, kinds=["paused"])
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


def _unreachable(exc: BaseException) -> bool:
    """A server (database, limiter, broker) is unreachable: not the chunk's fault."""
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from worker.db import is_infrastructure_error

    return is_infrastructure_error(exc) or isinstance(
        exc, RedisConnectionError | RedisTimeoutError | BrokerError
    )


@app.task(name="papermail.plan_due")
def plan_due() -> int:
    """Beat: plan everyone whose local send hour has come; enqueue after the commit.

    Editions whose day's papers are not fetched yet wait (worker.scheduling); those let go
    since the last tick are enqueued with the new ones.
    """
    settings = get_settings()
    with session_scope() as session:
        ids = scheduling.plan_due(session, settings=settings)
    chunks = enqueue_ids(ids, settings)
    check_quota(utcnow().date(), len(ids), settings)  # after queueing, as above
    log.info("plan_due: %d deliveries in %d chunks", len(ids), chunks)
    return len(ids)


@app.task(name="papermail.fetch_papers")
def fetch_papers() -> dict[str, Any]:
    """Beat, at FETCH_AT and every 15 minutes after: fetch today's papers from the sources
    that have not succeeded yet (``papermail papers fetch`` does the same by hand); then
    let go, and enqueue, the editions that were waiting for them."""
    from worker.papers.fetch import fetch_due

    settings = get_settings()
    reports = fetch_due(settings=settings)
    released: list[int] = []
    if any(r.succeeded for r in reports):
        with session_scope() as session:
            released = scheduling.release_waiting(session, utcnow(), settings)
        enqueue_ids(released, settings)
    if any(not r.succeeded for r in reports):
        from worker.alerts import check_quietly

        check_quietly(settings, kinds=["fetch_failed"])
    summary = {
        "fetched": {r.source: str(r.status) for r in reports},
        "papers": sum(r.papers for r in reports),
        "released": len(released),
    }
    log.info("fetch_papers: %s", summary)
    return summary


@dataclass
class Recovery:
    unknown: int = 0  # rows stuck in sending, now unknown
    requeued: int = 0  # pending rows enqueued again (lost + stranded)
    lost: int = 0  # of which: their task was lost with the broker, or never published
    skipped_reason: str | None = None  # why (part of) the pending sweep did not run
    ids: list[int] = field(default_factory=list)


def send_queue_size() -> int:
    """Messages waiting in the ``send`` queue (not those a worker already holds)."""
    with app.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(queue=SEND_QUEUE).message_count)


def _sweepable(now: datetime) -> list[Any]:
    """Pending rows of recent editions whose (retry) time has come."""
    return [
        Delivery.state == DeliveryState.PENDING,
        Delivery.edition_date >= now.date() - timedelta(days=SWEEP_EDITION_DAYS),
        or_(Delivery.scheduled_at.is_(None), Delivery.scheduled_at <= now),
        # Held for the day's papers: the fetch or the beat releases it, never the sweep.
        Delivery.waiting_for.is_(None),
    ]


def recover(settings: Settings | None = None, now: datetime | None = None) -> Recovery:
    """The sweep: reap stale ``sending`` rows, then re-enqueue pending rows with no task.

    A pending, due row of a recent edition has no task when it was never published (or
    handed back, ``queued_epoch`` NULL) or was published into an earlier life of the broker
    (another epoch): those are queued at once. A row whose task died with a worker looks
    queued; it counts as stranded when it was due more than the sending timeout ago and the
    ``send`` queue is empty (so no waiting task names it).
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
    epoch = broker_epoch(settings)
    # Before queueing anything: only then does an empty queue say no task names a row.
    queue_busy = send_queue_size() > 0
    grace = now - timedelta(seconds=UNPUBLISHED_GRACE_SECONDS)
    with session_scope() as session:
        lost = list(
            session.scalars(
                select(Delivery.id)
                .where(
                    *_sweepable(now),
                    or_(
                        and_(Delivery.queued_epoch.is_(None), Delivery.created_at <= grace),
                        Delivery.queued_epoch != epoch,
                    ),
                )
                .order_by(Delivery.id)
            )
        )
    if lost:
        enqueue_ids(lost, settings)
        log.warning(
            "reap: %d pending deliveries had no task (broker restarted or publish failed); "
            "enqueued again",
            len(lost),
        )
    result.lost = len(lost)
    result.ids = lost
    if queue_busy:
        result.skipped_reason = "the send queue is not empty"
    else:
        cutoff = now - timedelta(seconds=settings.sending_timeout_seconds)
        done = set(lost)
        with session_scope() as session:
            stranded = [
                i
                for i in session.scalars(
                    select(Delivery.id)
                    .where(*_sweepable(now), Delivery.scheduled_at <= cutoff)
                    .order_by(Delivery.id)
                )
                if i not in done
            ]
        if stranded:
            enqueue_ids(stranded, settings)
            log.warning("reap: %d stranded pending deliveries enqueued again", len(stranded))
        result.ids = sorted(done | set(stranded))
    result.requeued = len(result.ids)
    return result


@app.task(name="papermail.reap")
def reap() -> dict[str, Any]:
    """Beat: stale ``sending`` -> ``unknown``; pending rows without a task -> queued again."""
    result = recover()
    return {"unknown": result.unknown, "requeued": result.requeued, "lost": result.lost}


@app.task(name="papermail.check_alerts")
def check_alerts() -> dict[str, Any]:
    """Beat (when PAPERMAIL_ALERT_WEBHOOK_URL is set): post what needs an operator, once."""
    from worker import alerts

    result = alerts.check(get_settings())
    summary = {"found": len(result.findings), "sent": result.sent, "failed": result.failed}
    if result.sent or result.failed:
        log.info("check_alerts: %s", summary)
    return summary


@app.task(name="papermail.poll_sqs")
def poll_sqs() -> str:
    """Beat (when PAPERMAIL_SQS_QUEUE_URL is set): apply the SES notifications waiting."""
    from worker.events import poll_sqs as poll

    settings = get_settings()
    counts = poll(settings, once=True, receivers=settings.sqs_receivers)
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
