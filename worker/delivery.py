"""Plan editions; claim, send and record deliveries.

The unique (subscriber, edition date) row and the conditional pending -> sending UPDATE
decide whether an email goes out, never the queue: a chunk processed twice, by two
workers or after a redelivery, sends each email once.

Sending goes in batches of up to ``Settings.concurrency`` deliveries (the sends in flight
of one process): tokens for the batch, one conditional claim statement for the batch, the
sends in parallel threads, one record statement for the batch. The record of batch *k*
and the claim of batch *k+1* share a transaction. A worker killed after the provider
accepted batch *k* but before that commit leaves *k* in ``sending`` (the reaper makes it
``unknown``, never re-sent automatically) and *k+1* still ``pending`` (claimable again
after recovery): at most one batch per process is ever ``unknown``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time as _time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import (
    BigInteger,
    Date,
    Integer,
    String,
    and_,
    any_,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from worker import metrics
from worker.clock import Clock, anchored
from worker.config import Settings, get_settings
from worker.db import dialect_insert, insert_ignore_or_update, session_scope
from worker.mailers.errors import (
    AccountError,
    AmbiguousError,
    MailerError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from worker.message import OutgoingMessage
from worker.models import (
    ControlFlag,
    Delivery,
    DeliveryAttempt,
    DeliveryPaper,
    DeliveryState,
    Frequency,
    Paper,
    Subscriber,
    UTCDateTime,
    encode_terms,
    utcnow,
)

log = logging.getLogger(__name__)

PAUSE_FLAG = "sending_paused"
# How often a running chunk looks at the pause flag again.
PAUSE_CHECK_SECONDS = 1.0


# ---------------------------------------------------------------------------------------
# Who is due


def sendable_filter(today: date) -> list:  # type: ignore[type-arg]
    """SQL conditions for a subscriber who may receive mail on ``today``."""
    return Subscriber.sendable_clause(today)


def due_filter(edition_date: date) -> list:  # type: ignore[type-arg]
    """Daily subscribers every day; weekly ones on their weekday."""
    return [
        *sendable_filter(edition_date),
        or_(
            Subscriber.frequency == Frequency.DAILY,
            and_(
                Subscriber.frequency == Frequency.WEEKLY,
                func.coalesce(Subscriber.weekday, 0) == edition_date.weekday(),
            ),
        ),
    ]


def send_time(sub: Subscriber, edition_date: date) -> datetime:
    """The edition's nominal send time: local send hour on the edition date, in UTC.

    Built with fold=0 and normalised through UTC, so a send hour that falls into a DST gap
    (e.g. 02:00 on a spring-forward day) resolves to a real instant.
    """
    tz = ZoneInfo(sub.timezone)
    local = datetime.combine(edition_date, time(sub.send_hour), tzinfo=tz)
    return local.astimezone(UTC)


def window_end(
    sub: Subscriber,
    edition_date: date,
    now: datetime,
    released_at: datetime | None = None,
    max_wait: timedelta | None = None,
) -> datetime:
    """Selection window end: the edition's send time, or now when that is still ahead.

    An edition that waited for the day's papers (``released_at``, its ``scheduled_at``,
    within ``max_wait`` of the send time) takes the papers that arrived while it waited.
    """
    end = send_time(sub, edition_date)
    if released_at is not None and max_wait is not None and end < released_at <= end + max_wait:
        end = released_at
    return min(end, now)


# ---------------------------------------------------------------------------------------
# Planning


@dataclass
class PlanResult:
    edition_date: date
    due: int = 0  # subscribers due that day
    created: int = 0  # new delivery rows
    pending_ids: list[int] = field(default_factory=list)  # rows waiting to be sent


def plan_edition(
    session: Session,
    edition_date: date,
    *,
    subscriber_ids: Iterable[int] | None = None,
    now: datetime | None = None,
) -> PlanResult:
    """Insert one pending delivery per due subscriber (idempotent) and list what waits.

    Re-planning the same date creates nothing: the unique constraint drops the conflicts.
    Rows left ``pending`` by an earlier, interrupted run are returned too, so they are
    picked up again.
    """
    now = now or utcnow()
    if subscriber_ids is None:
        batches: list[list[int] | None] = [None]
    else:
        ids = sorted(set(subscriber_ids))
        if not ids:
            return PlanResult(edition_date)
        # Bounded IN lists: SQLite caps bound parameters per statement.
        batches = [ids[i : i + 10_000] for i in range(0, len(ids), 10_000)]
    before = _count_for_date(session, edition_date)
    due_ids: list[int] = []
    for batch in batches:
        where = list(due_filter(edition_date))
        if batch is not None:
            where.append(Subscriber.id.in_(batch))
        due_ids.extend(session.scalars(select(Subscriber.id).where(*where)))
        # INSERT ... SELECT in the database: no round trip per subscriber.
        stamp = literal(now, UTCDateTime())
        source = select(
            Subscriber.id,
            literal(edition_date, Date()),
            literal(DeliveryState.PENDING.value, String()),
            literal(0, Integer()),
            stamp,
            stamp,
            stamp,
        ).where(*where)
        cols = [
            "subscriber_id",
            "edition_date",
            "state",
            "attempts",
            "scheduled_at",
            "created_at",
            "updated_at",
        ]
        session.execute(
            dialect_insert(session, Delivery.__table__)
            .from_select(cols, source)
            .on_conflict_do_nothing(index_elements=["subscriber_id", "edition_date"])
        )
    created = _count_for_date(session, edition_date) - before
    pending = pending_delivery_ids(
        session, edition_date, subscriber_ids=None if subscriber_ids is None else due_ids
    )
    return PlanResult(edition_date, due=len(due_ids), created=created, pending_ids=pending)


def _count_for_date(session: Session, edition_date: date) -> int:
    return (
        session.scalar(
            select(func.count()).select_from(Delivery).where(Delivery.edition_date == edition_date)
        )
        or 0
    )


def pending_delivery_ids(
    session: Session,
    edition_date: date,
    *,
    subscriber_ids: Sequence[int] | None = None,
    now: datetime | None = None,
) -> list[int]:
    query = select(Delivery.id).where(
        Delivery.edition_date == edition_date,
        Delivery.state == DeliveryState.PENDING,
        Delivery.waiting_for.is_(None),  # held for the day's papers (worker.scheduling)
    )
    if now is not None:  # only rows whose (retry) time has come
        query = query.where(or_(Delivery.scheduled_at.is_(None), Delivery.scheduled_at <= now))
    if subscriber_ids is None:
        return list(session.scalars(query.order_by(Delivery.id)))
    wanted = set(subscriber_ids)
    rows = session.execute(query.add_columns(Delivery.subscriber_id).order_by(Delivery.id)).all()
    return [row[0] for row in rows if row[1] in wanted]


def chunks(ids: Sequence[int], size: int) -> list[list[int]]:
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


# ---------------------------------------------------------------------------------------
# Sending


@dataclass
class ChunkOutcome:
    sent: int = 0
    skipped: int = 0
    failed: int = 0
    unknown: int = 0
    not_claimed: int = 0  # someone else had it, or it was no longer pending
    retry: list[tuple[int, float]] = field(default_factory=list)  # (delivery id, delay s)
    paused: str | None = None  # why sending stopped (account-level error or guard)

    def merge(self, other: ChunkOutcome) -> None:
        self.sent += other.sent
        self.skipped += other.skipped
        self.failed += other.failed
        self.unknown += other.unknown
        self.not_claimed += other.not_claimed
        self.retry.extend(other.retry)
        self.paused = self.paused or other.paused

    @property
    def handled(self) -> int:
        return self.sent + self.skipped + self.failed + self.unknown + self.not_claimed


def sending_paused(session: Session) -> str | None:
    flag = session.get(ControlFlag, PAUSE_FLAG)
    if flag and flag.value.get("paused"):
        return str(flag.value.get("reason") or "sending is paused")
    return None


def pause_sending(session: Session, reason: str, by: str = "system") -> None:
    value = {"paused": True, "reason": reason, "by": by, "at": utcnow().isoformat()}
    # An upsert: two workers hitting the provider's pause at once must not collide.
    insert_ignore_or_update(
        session,
        ControlFlag.__table__,
        [{"key": PAUSE_FLAG, "value": value, "updated_at": utcnow()}],
        ["key"],
        ["value", "updated_at"],
    )
    session.expire_all()
    log.error("sending paused: %s (resume with `papermail sending resume`)", reason)


def resume_sending(session: Session, by: str = "cli") -> bool:
    flag = session.get(ControlFlag, PAUSE_FLAG)
    if not flag or not flag.value.get("paused"):
        return False
    flag.value = {"paused": False, "resumed_by": by, "at": utcnow().isoformat()}
    return True


def backoff_delay(attempt: int, settings: Settings) -> float:
    """Exponential backoff with full jitter, capped at an hour."""
    cap = min(3600.0, settings.retry_base_seconds * (2 ** max(0, attempt - 1)))
    return random.uniform(cap / 2, cap)


@dataclass
class _Prepared:
    delivery_id: int
    # Builds the message; pure, so it runs just before its batch is claimed (while the
    # batch before it is in flight) instead of for the whole chunk up front.
    render: Callable[[], OutgoingMessage]


@dataclass
class _Ready:
    """A rendered message of the batch about to be claimed; gone with its batch."""

    delivery_id: int
    message: OutgoingMessage


class _InFlight:
    """One claimed batch whose sends run in the pool threads."""

    def __init__(
        self,
        items: list[_Ready],
        attempt: _Attempt,
        *,
        futures: list[Future[object]] | None = None,
        results: list[object] | None = None,
        latencies: list[float] | None = None,
    ) -> None:
        self.items = items
        self.attempt = attempt
        self.futures = futures or []
        self._results = results
        # Seconds of each provider call, appended by the sending threads (for metrics).
        self.latencies: list[float] = latencies if latencies is not None else []

    def results(self) -> list[object]:
        """Every answer, in the batch's order, once every send has finished (whatever
        happens, none may be left running unrecorded); a BaseException of one (the process
        is going down) is raised after all are in."""
        if self._results is not None:
            return self._results
        results: list[object] = []
        fatal: BaseException | None = None
        for future in self.futures:
            try:
                results.append(future.result())
            except BaseException as exc:  # re-raised below
                fatal = fatal or exc
                results.append(None)
        self._results = results
        if fatal is not None:
            raise fatal
        return results


def process_deliveries(
    delivery_ids: Sequence[int],
    *,
    settings: Settings | None = None,
    mailer: object | None = None,
    limiter: object | None = None,
    now: datetime | None = None,
    attempt_kind: str = "send",
    reason: str | None = None,
    actor: str | None = None,
    include_suppressed: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> ChunkOutcome:
    """Select, render, claim, rate-limit, send and record one chunk of deliveries.

    Only rows still ``pending`` are handled; anything else is counted as not claimed, so
    calling this twice with the same ids (a redelivered task) sends nothing twice.
    """
    from worker.mailers.base import get_mailer
    from worker.ratelimit import get_limiter

    settings = settings or get_settings()
    mailer = mailer or get_mailer(settings)
    limiter = limiter or get_limiter(settings)
    outcome = ChunkOutcome()
    if not delivery_ids:
        return outcome
    started = _time.perf_counter()
    try:
        return _process(
            delivery_ids,
            outcome,
            settings=settings,
            mailer=mailer,
            limiter=limiter,
            now=now,
            attempt_kind=attempt_kind,
            reason=reason,
            actor=actor,
            include_suppressed=include_suppressed,
            on_progress=on_progress,
        )
    finally:
        metrics.observe_chunk(_time.perf_counter() - started)


def _process(
    delivery_ids: Sequence[int],
    outcome: ChunkOutcome,
    *,
    settings: Settings,
    mailer: object,
    limiter: object,
    now: datetime | None,
    attempt_kind: str,
    reason: str | None,
    actor: str | None,
    include_suppressed: bool,
    on_progress: Callable[[int], None] | None,
) -> ChunkOutcome:
    """The body of :func:`process_deliveries` (which times it)."""
    # Every stamp of this chunk (claim, record, retry time) reads one clock anchored at
    # the caller's `now`, so a retry's `scheduled_at` compares with the `now` of the next
    # run, whatever the wall clock says.
    clock = anchored(now)
    now = clock()

    with session_scope() as session:
        paused = sending_paused(session)
        if paused:
            outcome.paused = paused
            return outcome
        prepared, prep_outcome = prepare_messages(
            session,
            delivery_ids,
            settings,
            now,
            include_suppressed=include_suppressed,
            clock=clock,
            address_problem=getattr(mailer, "address_problem", None),
            attempt_kind=attempt_kind,
            reason=reason,
            actor=actor,
        )
    outcome.merge(prep_outcome)
    metrics.record_unsent(failed=prep_outcome.failed, skipped=prep_outcome.skipped)
    if on_progress and prep_outcome.handled:
        on_progress(prep_outcome.handled)

    session = _new_session()
    size = _batch_size(settings, limiter)
    # The batch in flight (k) and the record of the last batch the provider answered: it
    # is written in the transaction that claims the next batch (or before waiting for
    # tokens), so at any instant at most one batch of this chunk is in `sending`.
    in_flight: _InFlight | None = None
    pending_record: Callable[[Session], None] | None = None
    last_pause_check = _time.monotonic()

    def settle(batch: _InFlight) -> MailerError | None:
        """Take in the answers of a batch: failures recorded now, the sent ones left for
        ``pending_record``. The error that must stop the chunk, if any."""
        nonlocal pending_record
        results = batch.results()
        sent = [
            (item.delivery_id, result.message_id)  # type: ignore[attr-defined]
            for item, result in zip(batch.items, results, strict=True)
            if not isinstance(result, MailerError)
        ]
        failures = [
            (item.delivery_id, result)
            for item, result in zip(batch.items, results, strict=True)
            if isinstance(result, MailerError)
        ]
        stop: MailerError | None = None
        tally: list[tuple[str, str]] = []
        if failures:
            # Rare: record failures now, one by one, each with its own error kind.
            throttled = False
            for delivery_id, exc in failures:
                if isinstance(exc, ThrottledError):
                    # One slow-down per batch: sixteen throttled sends are one signal.
                    exc_limiter = None if throttled else limiter
                    throttled = True
                else:
                    exc_limiter = limiter
                if _record_failure(
                    session, delivery_id, exc, settings, outcome, exc_limiter, batch.attempt,
                    clock, tally,
                ):  # fmt: skip
                    stop = stop or exc
            if pending_record:
                pending_record(session)
                pending_record = None
            _record_sent_batch(session, sent, batch.attempt, clock)
            sent = []
            session.commit()
            retried = {d for d, _ in outcome.retry}
            settled = sum(1 for d, _ in failures if d not in retried)
            if on_progress and settled:
                on_progress(settled)
        if sent:
            earlier = pending_record

            def record(
                s: Session, sent: list[tuple[int, str]] = sent, attempt: _Attempt = batch.attempt
            ) -> None:
                if earlier:
                    earlier(s)
                _record_sent_batch(s, sent, attempt, clock)

            pending_record = record
        n_sent = len(batch.items) - len(failures)
        outcome.sent += n_sent
        # The batch's figures in one call: the only instrumentation of the send path.
        metrics.record_batch(n_sent, batch.latencies, tally)
        if on_progress and n_sent:
            on_progress(n_sent)
        return stop

    try:
        for start in range(0, len(prepared), size):
            batch = _render_batch(
                session, prepared[start : start + size], outcome, clock, attempt_kind, reason,
                actor,
            )  # fmt: skip
            # Batch k's answers (its sends ran while this batch rendered).
            if in_flight is not None:
                done, in_flight = in_flight, None
                stop = settle(done)
                if stop is not None:
                    # Release nothing else: the rest of the chunk was never claimed.
                    rest = len(prepared) - start
                    log.error("stopping: %s; %d deliveries left pending", stop, rest)
                    break
            if not batch:
                continue
            # A pause (operator, provider, reputation guard) stops in-flight chunks too: the
            # batch in flight finishes, nothing more is claimed.
            if _time.monotonic() - last_pause_check >= PAUSE_CHECK_SECONDS:
                last_pause_check = _time.monotonic()
                paused = sending_paused(session)
                if paused:
                    outcome.paused = paused
                    log.warning(
                        "sending paused (%s): %d left pending", paused, len(prepared) - start
                    )
                    break
            # Record batch k before blocking on the limiter: a worker killed while it
            # waits must not leave emails the provider accepted looking unsent.
            if not limiter.try_acquire(len(batch)):  # type: ignore[attr-defined]
                if pending_record:
                    pending_record(session)
                    pending_record = None
                session.commit()
                # The tokens before the claim: a worker killed while it waits leaves the
                # batch pending (claimable again after recovery), not claimed and unsent.
                waiting = _time.perf_counter()
                limiter.acquire(len(batch))  # type: ignore[attr-defined]
                metrics.observe_wait(_time.perf_counter() - waiting)
            else:
                metrics.observe_wait(0.0)
            # Claim batch k+1 (and record k) in one transaction.
            if pending_record:
                pending_record(session)
                pending_record = None
            claimed_at, claimed = _claim_batch(
                session,
                [item.delivery_id for item in batch],
                clock,
                check_subscriber=not include_suppressed,
            )
            unclaimed = [item for item in batch if item.delivery_id not in claimed]
            skipped_before = outcome.skipped
            for item in unclaimed:
                why = _unclaimable_reason(session, item.delivery_id)
                if why and _skip(session, item.delivery_id, why, clock):
                    outcome.skipped += 1
                else:
                    outcome.not_claimed += 1
            session.commit()
            if unclaimed:
                metrics.record_unsent(skipped=outcome.skipped - skipped_before)
            if on_progress and unclaimed:
                on_progress(len(unclaimed))
            to_send = [item for item in batch if item.delivery_id in claimed]
            if to_send:
                attempt = _Attempt(attempt_kind, claimed_at, reason, actor)
                in_flight = _start_sends(mailer, to_send, size, attempt)
        if in_flight is not None:
            done, in_flight = in_flight, None
            stop = settle(done)
            if stop is not None:
                log.error("stopping: %s; nothing left to claim", stop)
        if pending_record:
            pending_record(session)
            pending_record = None
        session.commit()
    finally:
        if in_flight is not None or pending_record:
            # Whatever went wrong after a send (limiter, database, an unexpected error),
            # wait for the sends in flight and try once more to record the accepted
            # emails before giving up.
            try:
                session.rollback()
                if in_flight is not None:
                    outcome_sent = [
                        (item.delivery_id, result.message_id)  # type: ignore[attr-defined]
                        for item, result in zip(in_flight.items, in_flight.results(), strict=True)
                        if result is not None and not isinstance(result, MailerError)
                    ]
                    if pending_record:
                        pending_record(session)
                    _record_sent_batch(session, outcome_sent, in_flight.attempt, clock)
                elif pending_record:
                    pending_record(session)
                session.commit()
            except BaseException:
                log.exception("could not record sent emails; the reaper will mark them unknown")
        session.close()
    return outcome


def _render_batch(
    session: Session,
    batch: Sequence[_Prepared],
    outcome: ChunkOutcome,
    clock: Clock,
    attempt_kind: str,
    reason: str | None,
    actor: str | None,
) -> list[_Ready]:
    """Render a batch's messages; a delivery that cannot be rendered fails alone."""
    from worker.db import is_infrastructure_error

    ready: list[_Ready] = []
    failed_before = outcome.failed
    for item in batch:
        try:
            message = item.render()
        except Exception as exc:
            if is_infrastructure_error(exc):
                raise
            why = f"could not render the digest: {type(exc).__name__}: {exc}"[:2000]
            log.warning(
                "delivery %s failed: %s",
                item.delivery_id,
                why,
                extra={"delivery_id": item.delivery_id, "error_kind": "render"},
            )
            if _fail_unsent(session, item.delivery_id, why, clock, attempt_kind, reason, actor):
                outcome.failed += 1
            else:
                outcome.not_claimed += 1
            continue
        ready.append(_Ready(item.delivery_id, message))
    if outcome.failed != failed_before:
        metrics.record_unsent(failed=outcome.failed - failed_before, kind="render")
    return ready


def _batch_size(settings: Settings, limiter: object | None = None) -> int:
    """Deliveries claimed, rate-limited, sent and recorded together: the sends in flight.

    Sized for the rate the limiter follows when that is the SES account's (SEND_RATE unset).
    """
    base_rate = getattr(limiter, "base_rate", None)
    if settings.rate_from_account and isinstance(base_rate, int | float) and base_rate > 0:
        return max(1, settings.concurrency_at(float(base_rate)))
    return max(1, settings.concurrency)


def _send_one(mailer: object, item: _Ready, latencies: list[float] | None = None) -> object:
    """The provider's answer (a SendResult) or the MailerError, never another exception;
    the call's seconds appended to ``latencies`` (list.append is atomic: threads share it)."""
    started = _time.perf_counter()
    try:
        return mailer.send(item.message)  # type: ignore[attr-defined]
    except MailerError as exc:
        return exc
    except Exception as unexpected:
        # Not one of the mailer's kinds: nobody can tell whether the request left, so it
        # is `unknown` (never re-sent by itself) and the chunk goes on, instead of the
        # chunk dying with this row in `sending`.
        log.exception(
            "mailer raised unexpectedly for delivery %s",
            item.delivery_id,
            extra={"delivery_id": item.delivery_id, "error_kind": "ambiguous"},
        )
        return AmbiguousError(
            f"unexpected {type(unexpected).__name__} while sending: {unexpected}",
            code=type(unexpected).__name__,
        )
    finally:
        if latencies is not None:
            latencies.append(_time.perf_counter() - started)


def _start_sends(
    mailer: object, batch: list[_Ready], concurrency: int, attempt: _Attempt
) -> _InFlight:
    """Start sending a claimed batch, up to ``concurrency`` at once.

    Threads, not asyncio: the SES and SMTP clients are blocking, thread-safe clients that
    release the GIL while they wait on the socket (see docs/running.md).
    """
    latencies: list[float] = []
    if len(batch) == 1 or concurrency <= 1:
        results = [_send_one(mailer, item, latencies) for item in batch]
        return _InFlight(batch, attempt, results=results, latencies=latencies)
    pool = _send_pool(concurrency)
    futures = [pool.submit(_send_one, mailer, item, latencies) for item in batch]
    return _InFlight(batch, attempt, futures=futures, latencies=latencies)


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _send_pool(size: int) -> ThreadPoolExecutor:
    """This process's sending threads (created on first use, grown when asked for more)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None:
            _limit_malloc_arenas()
        if _pool is None or _pool_size < size:
            old, _pool, _pool_size = _pool, ThreadPoolExecutor(size, "papermail-send"), size
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena (up to 8 per core),
    each holding freed memory of its own: with dozens of sending threads that grows a
    worker's RSS for nothing. The same as MALLOC_ARENA_MAX=2, set before they start."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _forget_pool_after_fork() -> None:
    # A forked child (Celery prefork) has none of its parent's threads.
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _new_session() -> Session:
    from worker.db import session_factory

    return session_factory()()


def prepare_messages(
    session: Session,
    delivery_ids: Sequence[int],
    settings: Settings,
    now: datetime,
    *,
    include_suppressed: bool = False,
    clock: Clock = utcnow,
    address_problem: Callable[[str], str | None] | None = None,
    attempt_kind: str = "send",
    reason: str | None = None,
    actor: str | None = None,
) -> tuple[list[_Prepared], ChunkOutcome]:
    """Bulk-load a chunk, re-check each subscriber, select papers and render the messages.

    Deliveries with nothing new, or whose subscriber can no longer receive mail, become
    ``skipped`` here (a conditional update, so a concurrent worker cannot be overridden).

    Whatever goes wrong with *one* delivery — an address the mailer cannot send to
    (``address_problem``), bad data, its selection, its rendering — makes that delivery
    ``failed`` with the reason (and a finished attempt row), and the rest of the chunk
    goes on: such errors are deterministic, a retry would fail the same way. Only an
    infrastructure error (:func:`worker.db.is_infrastructure_error`) stops the chunk.
    Any mix of subscribers and edition dates is fine, see
    :func:`worker.selection.select_editions`.
    """
    from worker.db import is_infrastructure_error
    from worker.mailers.base import Mailer
    from worker.rendering import get_renderer, paper_view
    from worker.selection import Edition, select_editions

    address_problem = address_problem or Mailer.address_problem
    outcome = ChunkOutcome()

    def fail(delivery_id: int, why: str) -> None:
        if _fail_unsent(session, delivery_id, why, clock, attempt_kind, reason, actor):
            outcome.failed += 1
        else:
            outcome.not_claimed += 1

    def guarded(delivery_id: int, what: str, step: Callable[[], object]) -> object:
        """Run one delivery's step; on a per-delivery error fail it and return None."""
        try:
            return step()
        except Exception as exc:
            if is_infrastructure_error(exc):
                raise
            why = f"{what}: {type(exc).__name__}: {exc}"[:2000]
            log.warning(
                "delivery %s failed: %s",
                delivery_id,
                why,
                extra={"delivery_id": delivery_id, "error_kind": "prepare"},
            )
            fail(delivery_id, why)
            return None

    rows = session.execute(
        select(Delivery, Subscriber)
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .where(
            Delivery.id.in_(list(delivery_ids)),
            Delivery.state == DeliveryState.PENDING,
            # A retry waits out its backoff even when its chunk is delivered early.
            or_(Delivery.scheduled_at.is_(None), Delivery.scheduled_at <= now),
            Delivery.waiting_for.is_(None),  # held until the day's papers are fetched
        )
        .order_by(Delivery.id)
    ).all()
    outcome.not_claimed += len(set(delivery_ids)) - len(rows)

    sendable: list[tuple[Delivery, Subscriber]] = []
    for delivery, sub in rows:
        why = unsendable_reason(sub, delivery.edition_date, include_suppressed=include_suppressed)
        if why:
            if _skip(session, delivery.id, why, clock):
                outcome.skipped += 1
            else:
                outcome.not_claimed += 1
            continue
        # Rows stored before addresses were checked at the door fail here, with the
        # mailer's reason, instead of stopping the chunk at rendering.
        problem = address_problem(sub.email)
        if problem:
            fail(delivery.id, problem)
            continue
        sendable.append((delivery, sub))
    session.commit()
    if not sendable:
        return [], outcome

    # Papers already recorded for a delivery (a retry, or an operator resend) are reused so
    # the email carries the same papers; the rest are selected in one batch per round.
    ids = [d.id for d, _ in sendable]
    recorded: dict[int, list[DeliveryPaper]] = {}
    for dp in session.scalars(
        select(DeliveryPaper)
        .where(DeliveryPaper.delivery_id.in_(ids))
        .order_by(DeliveryPaper.delivery_id, DeliveryPaper.position)
    ):
        recorded.setdefault(dp.delivery_id, []).append(dp)
    editions: list[Edition] = []
    # How late an edition held for the day's papers can be let go (worker.scheduling).
    waited = timedelta(minutes=settings.fetch_wait_minutes + settings.plan_interval_minutes)
    for d, sub in sendable:
        if d.id in recorded:
            continue
        end = guarded(
            d.id,
            "bad subscriber data",
            lambda d=d, sub=sub: window_end(sub, d.edition_date, now, d.scheduled_at, waited),  # type: ignore[misc]
        )
        if end is not None:
            editions.append(Edition(d.id, sub, d.edition_date, end))  # type: ignore[arg-type]
    session.commit()
    selection = select_editions(
        session,
        editions,
        settings,
        also_exclude=_papers_due_elsewhere(session, {e.subscriber.id for e in editions}),
        is_fatal=is_infrastructure_error,
    )
    for key, why in selection.failures.items():
        fail(key, why)
    new_rows: list[dict[str, object]] = []
    snapshots: list[dict[str, object]] = []
    chosen: list[tuple[Delivery, Subscriber, list[tuple[str, str | None, tuple[str, ...]]]]] = []
    for delivery, sub in sendable:
        if delivery.id in recorded:
            picks = [(dp.paper_id, dp.matched_topic, dp.terms) for dp in recorded[delivery.id]]
        elif delivery.id in selection.results:
            result = selection.results[delivery.id]
            if not result.picks:
                if _skip(session, delivery.id, result.skip_reason or "nothing new to send", clock):
                    outcome.skipped += 1
                else:
                    outcome.not_claimed += 1
                continue
            picks = [(p.paper_id, p.matched_topic, p.matched_terms) for p in result.picks]
            snapshots.append({"id": delivery.id, "recipient": recipient_snapshot(sub)})
            new_rows.extend(
                {
                    "delivery_id": delivery.id,
                    "paper_id": p.paper_id,
                    "position": pos,
                    "matched_topic": p.matched_topic,
                    "matched_terms": encode_terms(p.matched_terms),
                    # JSON on the way in (see _insert_delivery_papers) has no NaN.
                    "score": float(p.score) if math.isfinite(p.score) else 0.0,
                }
                for pos, p in enumerate(result.picks)
            )
        else:  # failed above: bad data, or its selection
            continue
        chosen.append((delivery, sub, picks))
    _insert_delivery_papers(session, new_rows)
    _record_recipients(session, snapshots)
    session.commit()

    paper_ids = {pick[0] for _, _, picks in chosen for pick in picks}
    papers = (
        {p.id: p for p in session.scalars(select(Paper).where(Paper.id.in_(paper_ids)))}
        if paper_ids
        else {}
    )
    renderer = get_renderer(settings)
    prepared: list[_Prepared] = []
    for delivery, sub, picks in chosen:
        if not any(pick[0] in papers for pick in picks):
            # Its papers were deleted meanwhile: never an empty email.
            if _skip(session, delivery.id, "the selected papers no longer exist", clock):
                outcome.skipped += 1
            continue

        views = guarded(
            delivery.id,
            "could not render the digest",
            lambda picks=picks: [  # type: ignore[misc]
                paper_view(papers[pid], topic, terms)
                for pid, topic, terms in picks
                if pid in papers
            ],
        )
        if views is None:
            continue
        recipient = recipient_of(sub)

        def render(
            recipient=recipient,  # type: ignore[no-untyped-def]
            edition=delivery.edition_date,
            views=views,
            delivery_id=delivery.id,
        ) -> OutgoingMessage:
            return renderer.render_digest(recipient, edition, views, delivery_id=delivery_id)

        prepared.append(_Prepared(delivery.id, render))
    session.commit()
    return prepared, outcome


# A chunk's papers (~7 per delivery) in one INSERT on PostgreSQL, where an executemany runs
# one statement per row. They travel as one JSON text: psycopg dumps list parameters
# element by element in Python (five arrays of ~1,400 cost about 13% of a worker's CPU),
# json.dumps is C and PostgreSQL's json_to_recordset expands it server-side.
_INSERT_DELIVERY_PAPERS_PG = text(
    "INSERT INTO delivery_papers"
    " (delivery_id, paper_id, position, matched_topic, matched_terms, score)"
    " SELECT r.delivery_id, r.paper_id, r.position, r.matched_topic, r.matched_terms, r.score"
    " FROM json_to_recordset(CAST(:rows AS json)) AS r(delivery_id bigint, paper_id text,"
    " position integer, matched_topic text, matched_terms text, score float8)"
    " ON CONFLICT (delivery_id, paper_id) DO NOTHING"
)


def _insert_delivery_papers(session: Session, rows: list[dict[str, object]]) -> None:
    if rows and session.get_bind().dialect.name == "postgresql":
        session.execute(_INSERT_DELIVERY_PAPERS_PG, {"rows": json.dumps(rows, allow_nan=False)})
        return
    insert_ignore_or_update(session, DeliveryPaper.__table__, rows, ["delivery_id", "paper_id"])


_RECORD_RECIPIENTS_PG = text(
    "UPDATE deliveries SET recipient = CAST(r.recipient AS json)"
    " FROM json_to_recordset(CAST(:rows AS json)) AS r(id bigint, recipient text)"
    " WHERE deliveries.id = r.id"
)


def _record_recipients(session: Session, rows: list[dict[str, object]]) -> None:
    """The settings each newly selected edition was made for, with its papers: one
    statement per chunk on PostgreSQL (as the papers), an executemany elsewhere."""
    if not rows:
        return
    if session.get_bind().dialect.name == "postgresql":
        payload = [{"id": r["id"], "recipient": json.dumps(r["recipient"])} for r in rows]
        session.execute(_RECORD_RECIPIENTS_PG, {"rows": json.dumps(payload)})
        return
    session.execute(
        update(Delivery.__table__)
        .where(Delivery.__table__.c.id == bindparam("did"))
        .values(recipient=bindparam("snap")),
        [{"did": r["id"], "snap": r["recipient"]} for r in rows],
    )


def recipient_snapshot(sub: Subscriber) -> dict[str, object]:
    """What ``deliveries.recipient`` keeps: the fields of rendering.Recipient."""
    return {
        "subscriber_id": sub.id,
        "email": sub.email,
        "topics": list(sub.topics or ()),
        "frequency": sub.frequency,
        "weekday": sub.weekday,
        "send_hour": sub.send_hour,
        "timezone": sub.timezone,
    }


def recipient_as_sent(delivery: Delivery, sub: Subscriber):  # type: ignore[no-untyped-def]
    """The Recipient an edition was made for: its snapshot, else (an edition recorded
    before deliveries.recipient existed) the subscriber as they are now."""
    from worker.rendering import Recipient

    snap = delivery.recipient
    if not isinstance(snap, dict):
        return recipient_of(sub)
    return Recipient(
        subscriber_id=sub.id,
        email=str(snap.get("email") or sub.email),
        topics=tuple(str(t) for t in snap.get("topics") or ()),
        frequency=str(snap.get("frequency") or sub.frequency),
        weekday=snap.get("weekday") if isinstance(snap.get("weekday"), int) else None,
        send_hour=int(snap.get("send_hour", sub.send_hour)),
        timezone=str(snap.get("timezone") or sub.timezone),
    )


def _papers_due_elsewhere(session: Session, subscriber_ids: set[int]) -> dict[int, set[str]]:
    """Per subscriber, the papers recorded on their deliveries still ``pending`` (a retry
    waiting for its backoff, an edition of this batch): they will go out with those, so
    no other edition may pick them again. (Deliveries being selected have none yet.)"""
    out: dict[int, set[str]] = {}
    ids = sorted(subscriber_ids)
    for lo in range(0, len(ids), 5000):
        for sub_id, paper_id in session.execute(
            select(Delivery.subscriber_id, DeliveryPaper.paper_id)
            .join(DeliveryPaper, DeliveryPaper.delivery_id == Delivery.id)
            .where(
                Delivery.subscriber_id.in_(ids[lo : lo + 5000]),
                Delivery.state == DeliveryState.PENDING,
            )
        ):
            out.setdefault(sub_id, set()).add(paper_id)
    return out


def _fail_unsent(
    session: Session,
    delivery_id: int,
    why: str,
    clock: Clock,
    kind: str = "send",
    reason: str | None = None,
    actor: str | None = None,
) -> bool:
    """pending -> failed for a delivery that could not be prepared (nothing was sent),
    with the reason and a finished attempt row; False if the row had moved on."""
    now = clock()
    res = session.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id, Delivery.state == DeliveryState.PENDING)
        .values(state=DeliveryState.FAILED, last_error=why, finished_at=now, updated_at=now)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return False
    _finish_attempt(
        session, delivery_id, _Attempt(kind, now, reason, actor), "failed", why, None, now
    )
    return True


def recipient_of(sub: Subscriber):  # type: ignore[no-untyped-def]
    from worker.rendering import Recipient

    return Recipient(
        subscriber_id=sub.id,
        email=sub.email,
        topics=tuple(sub.topics or ()),
        frequency=sub.frequency,
        weekday=sub.weekday,
        send_hour=sub.send_hour,
        timezone=sub.timezone,
        categories_only=tuple(sub.categories_only or ()),
        categories_exclude=tuple(sub.categories_exclude or ()),
    )


def unsendable_reason(
    sub: Subscriber, today: date, *, include_suppressed: bool = False
) -> str | None:
    """Why this subscriber must not get mail now (checked again just before sending).

    ``include_suppressed`` is the operator's explicit, confirmed override of a resend.
    """
    if include_suppressed and sub.is_suppressed:
        return None
    return sub.unsendable_reason(today)


def _skip(session: Session, delivery_id: int, why: str, clock: Clock = utcnow) -> bool:
    now = clock()
    res = session.execute(
        update(Delivery)
        .where(Delivery.id == delivery_id, Delivery.state == DeliveryState.PENDING)
        .values(state=DeliveryState.SKIPPED, skip_reason=why, finished_at=now, updated_at=now)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


# The per-email statements are Core, built once: the ORM-enabled UPDATE (criteria
# evaluation against the identity map, autoflush, unit-of-work flush of an attempt object)
# cost ~4 ms of CPU per email, two thirds of a worker's time (bench/pipeline.py).
_D = Delivery.__table__
_A = DeliveryAttempt.__table__
_INSERT_ATTEMPT = insert(_A)


@dataclass(frozen=True)
class _Attempt:
    """What the attempt row of a claimed delivery will say; it is written once, complete,
    when the outcome is known (one statement per email fewer than insert-then-update)."""

    kind: str
    started_at: datetime
    reason: str | None = None
    actor: str | None = None


# The subscriber is checked again in the claim itself: an unsubscribe, complaint or bounce
# that lands while the chunk waits for tokens is honoured.
_SENDABLE = exists(
    select(Subscriber.id).where(
        Subscriber.id == _D.c.subscriber_id, *sendable_filter(_D.c.edition_date)
    )
)
# On PostgreSQL the batch travels as one array parameter: the statement text is the same
# for every batch size, so neither SQLAlchemy nor psycopg compile or parse it again.
_IDS = bindparam("dids", type_=ARRAY(BigInteger))
_ID_MATCH = {
    "one": _D.c.id == bindparam("did"),  # SQLite < 3.35: no RETURNING, one row at a time
    "many": _D.c.id.in_(bindparam("dids", expanding=True)),
    "postgresql": _D.c.id == any_(_IDS),
}


def _claim_update(rows: str, check_subscriber: bool):  # type: ignore[no-untyped-def]
    """pending -> sending for the rows ``_ID_MATCH[rows]`` names, still pending (and, with
    ``check_subscriber``, whose subscriber may still receive this edition)."""
    stmt = (
        update(_D)
        .where(_ID_MATCH[rows], _D.c.state == DeliveryState.PENDING.value)
        .values(
            state=DeliveryState.SENDING.value,
            claimed_at=bindparam("claimed_at"),
            attempts=_D.c.attempts + 1,
            updated_at=bindparam("updated_at"),
        )
    )
    return stmt.where(_SENDABLE) if check_subscriber else stmt


# Built once: a statement object SQLAlchemy has compiled before is found in its cache, and
# keeps its cache key (0.16 ms to compute for a new object).
_CLAIMS = {
    (rows, check): _claim_update(rows, check) for rows in _ID_MATCH for check in (True, False)
}
_CLAIMS_RETURNING = {key: stmt.returning(_D.c.id) for key, stmt in _CLAIMS.items()}


def _claim_batch(
    session: Session,
    delivery_ids: Sequence[int],
    clock: Clock = utcnow,
    *,
    check_subscriber: bool = True,
) -> tuple[datetime, set[int]]:
    """pending -> sending for every row of the batch still claimable, in one statement;
    the claim time and the ids claimed (the subscriber is re-checked in the statement)."""
    now = clock()
    conn = session.connection()
    rows = "postgresql" if conn.dialect.name == "postgresql" else "many"
    params = {"dids": list(delivery_ids), "claimed_at": now, "updated_at": now}
    if conn.dialect.update_returning:
        stmt = _CLAIMS_RETURNING[rows, check_subscriber]
        return now, set(conn.execute(stmt, params).scalars())
    # No RETURNING (SQLite < 3.35): one claim per row, still conditional.
    claimed = set()
    single = _CLAIMS["one", check_subscriber]
    for did in delivery_ids:
        res = conn.execute(single, {"did": did, "claimed_at": now, "updated_at": now})
        if res.rowcount == 1:
            claimed.add(did)
    return now, claimed


_SENT_ROWS = "unnest(CAST(:dids AS bigint[]), CAST(:mids AS text[])) AS v(id, mid)"
_RECORD_SENT_PG = text(
    "UPDATE deliveries SET state = 'sent', message_id = v.mid, sent_at = :now,"
    " finished_at = :now, last_error = NULL, updated_at = :now"
    f" FROM {_SENT_ROWS}"
    " WHERE deliveries.id = v.id AND deliveries.state IN ('sending', 'unknown')"
).bindparams(bindparam("now", type_=UTCDateTime()))
_INSERT_SENT_ATTEMPTS_PG = text(
    "INSERT INTO delivery_attempts (delivery_id, kind, started_at, finished_at, outcome,"
    " error, message_id, reason, actor)"
    f" SELECT v.id, :kind, :started, :now, 'sent', NULL, v.mid, :reason, :actor FROM {_SENT_ROWS}"
).bindparams(bindparam("now", type_=UTCDateTime()), bindparam("started", type_=UTCDateTime()))


def _record_sent_batch(
    session: Session,
    sent: Sequence[tuple[int, str]],
    attempt: _Attempt,
    clock: Clock = utcnow,
) -> None:
    """Record a batch the provider accepted: one UPDATE and one INSERT.

    A late record still wins over the reaper's ``unknown`` (the provider did accept it),
    and the attempt rows are written even if a delivery row has moved on (resent by an
    operator meanwhile): bounces and complaints find their delivery through the attempt's
    message id."""
    if not sent:
        return
    now = clock()
    ids = [did for did, _ in sent]
    if log.isEnabledFor(logging.DEBUG):
        for did, mid in sent:
            log.debug(
                "delivery %s sent as %s",
                did,
                mid,
                extra={"delivery_id": did, "provider_message_id": mid},
            )
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        params = {
            "dids": ids,
            "mids": [mid for _, mid in sent],
            "now": now,
            "started": attempt.started_at,
            "kind": attempt.kind,
            "reason": attempt.reason,
            "actor": attempt.actor,
        }
        conn.execute(_RECORD_SENT_PG, params)
        conn.execute(_INSERT_SENT_ATTEMPTS_PG, params)
        return
    conn.execute(
        update(_D)
        .where(
            _D.c.id.in_(ids),
            _D.c.state.in_([DeliveryState.SENDING.value, DeliveryState.UNKNOWN.value]),
        )
        .values(
            state=DeliveryState.SENT.value,
            message_id=case(dict(sent), value=_D.c.id),
            sent_at=now,
            finished_at=now,
            last_error=None,
            updated_at=now,
        )
    )
    conn.execute(
        insert(_A).values(
            [
                {
                    "delivery_id": did,
                    "kind": attempt.kind,
                    "started_at": attempt.started_at,
                    "finished_at": now,
                    "outcome": "sent",
                    "error": None,
                    "message_id": mid,
                    "reason": attempt.reason,
                    "actor": attempt.actor,
                }
                for did, mid in sent
            ]
        )
    )


def _unclaimable_reason(session: Session, delivery_id: int) -> str | None:
    """Why a pending row could not be claimed, when it is its subscriber's doing."""
    row = session.execute(
        select(Delivery, Subscriber)
        .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .where(Delivery.id == delivery_id, Delivery.state == DeliveryState.PENDING)
    ).first()
    if row is None:
        return None  # someone else claimed or finished it
    return unsendable_reason(row[1], row[0].edition_date)


def _finish_attempt(
    session: Session,
    delivery_id: int,
    attempt: _Attempt | None,
    outcome: str,
    error: str | None,
    message_id: str | None,
    now: datetime | None = None,
) -> None:
    """Write the attempt row, complete (started at the claim, finished now)."""
    now = now or utcnow()
    attempt = attempt or _Attempt("send", now)
    session.connection().execute(
        _INSERT_ATTEMPT,
        {
            "delivery_id": delivery_id,
            "kind": attempt.kind,
            "started_at": attempt.started_at,
            "finished_at": now,
            "outcome": outcome,
            "error": error,
            "message_id": message_id,
            "reason": attempt.reason,
            "actor": attempt.actor,
        },
    )


def _record_failure(
    session: Session,
    delivery_id: int,
    exc: MailerError,
    settings: Settings,
    outcome: ChunkOutcome,
    limiter: object,
    attempt: _Attempt | None = None,
    clock: Clock = utcnow,
    tally: list[tuple[str, str]] | None = None,
) -> bool:
    """Record a mailer error; True when the whole run must stop (account-level).

    ``tally`` gets (what became of it, the error kind) for the batch's metrics."""
    now = clock()
    reason = str(exc)[:2000]
    log.log(
        logging.INFO if isinstance(exc, TransientError) else logging.WARNING,
        "delivery %s: %s error: %s",
        delivery_id,
        exc.kind,
        reason,
        extra={"delivery_id": delivery_id, "error_kind": exc.kind},
    )
    note = tally.append if tally is not None else (lambda _: None)

    def settle(state: DeliveryState, label: str, error: str = reason, **values: object) -> None:
        """Move the row on from `sending` and write its finished attempt."""
        final = {} if state == DeliveryState.PENDING else {"finished_at": now}
        session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id, Delivery.state == DeliveryState.SENDING)
            .values(state=state, updated_at=now, last_error=error, **final, **values)
        )
        _finish_attempt(session, delivery_id, attempt, label, reason, None, now)

    if isinstance(exc, AmbiguousError):
        settle(DeliveryState.UNKNOWN, "unknown")
        outcome.unknown += 1
        note(("unknown", exc.kind))
        return False
    if isinstance(exc, AccountError):
        # The provider refused before sending: hand the row back, stop the run.
        settle(DeliveryState.PENDING, "paused", attempts=Delivery.attempts - 1)
        pause_sending(session, f"provider refused sending: {reason}")
        outcome.paused = reason
        note(("paused", exc.kind))
        return True
    if isinstance(exc, TransientError):
        if isinstance(exc, ThrottledError) and limiter is not None:
            limiter.slow_down()  # type: ignore[attr-defined]
        attempts = session.scalar(select(Delivery.attempts).where(Delivery.id == delivery_id)) or 1
        if attempts >= settings.max_attempts:
            settle(DeliveryState.FAILED, "failed", f"gave up after {attempts} attempts: {reason}")
            outcome.failed += 1
            note(("failed", exc.kind))
            return False
        delay = exc.retry_after or backoff_delay(attempts, settings)
        settle(DeliveryState.PENDING, "transient", scheduled_at=now + timedelta(seconds=delay))
        outcome.retry.append((delivery_id, delay))
        note(("retried", exc.kind))
        return False
    # PermanentError and anything unclassified: fail this message with the reason.
    settle(DeliveryState.FAILED, "failed" if isinstance(exc, PermanentError) else "error")
    outcome.failed += 1
    note(("failed", exc.kind))
    return False


# ---------------------------------------------------------------------------------------
# Recovery


def reap_stale_sending(
    session: Session, settings: Settings | None = None, now: datetime | None = None
) -> int:
    """Rows stuck in ``sending`` past the timeout: the worker died mid-send -> ``unknown``.

    The provider may or may not have accepted the message, so it is never re-sent
    automatically; ``papermail resend --state unknown`` is the operator's decision.
    """
    settings = settings or get_settings()
    now = now or utcnow()
    cutoff = now - timedelta(seconds=settings.sending_timeout_seconds)
    stale = select(
        Delivery.id,
        literal("send", String()),
        Delivery.claimed_at,
        literal(now, UTCDateTime()),
        literal("unknown", String()),
        literal("worker stopped while sending", String()),
    ).where(Delivery.state == DeliveryState.SENDING, Delivery.claimed_at < cutoff)
    # The worker writes an attempt row only once it knows the outcome: write the row of
    # the attempt it never finished, so the history says what happened. (A resend's
    # operator, reason and the requeue are on its `requeue` row.)
    session.execute(
        insert(DeliveryAttempt).from_select(
            ["delivery_id", "kind", "started_at", "finished_at", "outcome", "error"], stale
        )
    )
    res = session.execute(
        update(Delivery)
        .where(Delivery.state == DeliveryState.SENDING, Delivery.claimed_at < cutoff)
        .values(
            state=DeliveryState.UNKNOWN,
            last_error="worker stopped while sending; the provider may have accepted it",
            finished_at=now,
            updated_at=now,
        )
    )
    count = res.rowcount or 0  # type: ignore[attr-defined]
    if count:
        log.warning("reaper: %d deliveries stuck in sending marked unknown", count)
    return count


# ---------------------------------------------------------------------------------------
# Reporting


def edition_counts(session: Session, edition_date: date) -> dict[str, int]:
    rows = session.execute(
        select(Delivery.state, func.count())
        .where(Delivery.edition_date == edition_date)
        .group_by(Delivery.state)
    ).all()
    counts = {state.value: 0 for state in DeliveryState}
    counts.update({str(state): n for state, n in rows})
    return counts


def run_in_process(
    edition_date: date,
    *,
    settings: Settings | None = None,
    now: datetime | None = None,
    on_planned: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    max_wait_seconds: float = 600.0,
    sleep: Callable[[float], None] | None = None,
) -> tuple[PlanResult, ChunkOutcome]:
    """Plan edition D and send it in this process, chunk by chunk, retries included."""
    settings = settings or get_settings()
    with session_scope() as session:
        reap_stale_sending(session, settings)
        plan = plan_edition(session, edition_date, now=now)
    from worker.account import check_quota

    check_quota(edition_date, len(plan.pending_ids), settings)
    if on_planned:
        on_planned(len(plan.pending_ids))
    total = send_in_process(
        plan.pending_ids,
        settings=settings,
        now=now,
        on_progress=on_progress,
        max_wait_seconds=max_wait_seconds,
        sleep=sleep,
    )
    return plan, total


def send_in_process(
    ids: Sequence[int],
    *,
    settings: Settings,
    now: datetime | None = None,
    on_progress: Callable[[int], None] | None = None,
    max_wait_seconds: float = 600.0,
    sleep: Callable[[float], None] | None = None,
    **process_kwargs: object,
) -> ChunkOutcome:
    """Send these deliveries here, chunk by chunk; transient failures wait out their
    backoff (bounded by ``max_wait_seconds`` in total). Whatever is still pending after
    that stays pending, and is listed in the outcome's ``retry``."""
    sleep = sleep or _time.sleep
    total = ChunkOutcome()
    queue = list(ids)
    waited = 0.0
    while queue:
        retries: list[tuple[int, float]] = []
        for chunk in chunks(queue, settings.chunk_size):
            current = now + timedelta(seconds=waited) if now else None
            out = process_deliveries(
                chunk,
                settings=settings,
                on_progress=on_progress,
                now=current,
                **process_kwargs,  # type: ignore[arg-type]
            )
            retries.extend(out.retry)
            out.retry = []
            total.merge(out)
            if out.paused:
                total.retry = retries
                return total
        total.retry = retries
        if not retries:
            break
        delay = max(d for _, d in retries)
        if waited + delay > max_wait_seconds:
            break
        sleep(delay)
        waited += delay
        queue = [i for i, _ in retries]
    return total


@dataclass(frozen=True)
class Forecast:
    """What the send path would do with one delivery: the state it would leave it in
    (``sent`` means claimed and handed to the mailer, which may still refuse it)."""

    state: str
    why: str = ""


def forecast_deliveries(
    prepare: Callable[[Session], Sequence[int]],
    *,
    settings: Settings,
    now: datetime | None = None,
    include_suppressed: bool = False,
    attempt_kind: str = "send",
    reason: str | None = None,
    actor: str | None = None,
) -> dict[int, Forecast]:
    """Run the send path's own decisions in a transaction that is rolled back.

    ``prepare`` makes the changes the real run would start with (a resend's requeue) and
    returns the delivery ids to send; then :func:`prepare_messages` (subscriber re-check,
    address check, selection, "nothing new"), :func:`_render_batch` and the claim run
    exactly as in :func:`process_deliveries`, and each row's resulting state is read
    before everything is rolled back. Nothing is sent, no rate-limit token is taken.

    The commits inside those functions release SAVEPOINTs of one outer transaction
    (``join_transaction_mode="create_savepoint"``).
    """
    from worker.db import get_engine
    from worker.mailers.base import address_problem

    clock = anchored(now)
    engine = get_engine(settings.database_url)
    with engine.connect() as conn:
        outer = conn.begin()
        try:
            if conn.dialect.name == "sqlite":
                # pysqlite opens no transaction before the first write, and a RELEASE of
                # the outermost SAVEPOINT would commit; an explicit BEGIN makes it nested.
                conn.exec_driver_sql("BEGIN")
            session = Session(
                conn, join_transaction_mode="create_savepoint", expire_on_commit=False
            )
            try:
                ids = list(prepare(session))
                session.commit()
                start = clock()
                outcome = ChunkOutcome()
                prepared, _ = prepare_messages(
                    session,
                    ids,
                    settings,
                    start,
                    include_suppressed=include_suppressed,
                    clock=clock,
                    address_problem=lambda email: address_problem(email, settings),
                    attempt_kind=attempt_kind,
                    reason=reason,
                    actor=actor,
                )
                ready = _render_batch(
                    session, prepared, outcome, clock, attempt_kind, reason, actor
                )
                if ready:
                    _, claimed = _claim_batch(
                        session,
                        [item.delivery_id for item in ready],
                        clock,
                        check_subscriber=not include_suppressed,
                    )
                    for item in ready:
                        if item.delivery_id not in claimed:
                            why = _unclaimable_reason(session, item.delivery_id)
                            if why:
                                _skip(session, item.delivery_id, why, clock)
                session.flush()
                rows = (
                    session.execute(
                        select(
                            Delivery.id, Delivery.state, Delivery.skip_reason, Delivery.last_error
                        ).where(Delivery.id.in_(ids))
                    ).all()
                    if ids
                    else []
                )
            finally:
                session.close()
        finally:
            outer.rollback()
    out: dict[int, Forecast] = {}
    for did, state, skip_reason, last_error in rows:
        state = str(state)
        if state == DeliveryState.SENDING:
            out[did] = Forecast("sent")
        elif state == DeliveryState.SKIPPED:
            out[did] = Forecast("skipped", skip_reason or "")
        elif state == DeliveryState.FAILED:
            out[did] = Forecast("failed", last_error or "")
        else:
            out[did] = Forecast(state, "not claimable now")
    return out
