"""Concurrent, batched sending: the exactly-once guarantees hold per batch (real SQLite and
PostgreSQL; a thread-safe provider double that answers per recipient)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, select, update

from worker import delivery
from worker.clock import utcnow
from worker.config import ConfigError, Settings, load_settings
from worker.db import get_engine, session_scope
from worker.mailers.base import SendResult
from worker.mailers.errors import (
    AccountError,
    AmbiguousError,
    MailerError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from worker.message import OutgoingMessage
from worker.models import Delivery, DeliveryAttempt, Subscriber
from worker.ratelimit import LocalBucket

from .test_delivery import add_sub, seed_papers

NOW = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
TODAY = NOW.date()
CONCURRENCY = 4
N = 10  # three batches: 4, 4, 2


class RecipientMailer:
    """Answers per recipient (``errors``), after ``latency``; counts what is in flight."""

    name = "per-recipient"

    def __init__(
        self,
        errors: dict[str, MailerError | BaseException] | None = None,
        latency: float = 0.0,
        after_first=None,
    ) -> None:
        self.errors = errors or {}
        self.latency = latency
        self.after_first = after_first
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()

    def send(self, message: OutgoingMessage) -> SendResult:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.calls[message.recipient] += 1
        try:
            time.sleep(self.latency)
            error = self.errors.get(message.recipient)
            if error is not None and not isinstance(error, MailerError):
                with self.lock:
                    self.accepted[message.recipient] += 1  # it went out, then we "died"
                raise error
            if error is not None:
                raise error
            with self.lock:
                self.accepted[message.recipient] += 1
                first = sum(self.accepted.values()) == 1
            if first and self.after_first:
                self.after_first()
            return SendResult(message_id=f"ses-{message.recipient}")
        finally:
            with self.lock:
                self.in_flight -= 1

    def close(self) -> None:
        pass


class SpyBucket(LocalBucket):
    def __init__(self) -> None:
        super().__init__(rate=10_000, burst=10_000)
        self.slowed = 0
        self.takes: list[int] = []

    def try_acquire(self, tokens: int = 1) -> bool:
        self.takes.append(tokens)
        return super().try_acquire(tokens)

    def slow_down(self, factor: float = 0.5, seconds: float = 60.0) -> None:
        self.slowed += 1


def address(i: int) -> str:
    return f"reader{i:02d}@example.org"


@pytest.fixture(params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest) -> Settings:
    fixture = "settings" if request.param == "sqlite" else "pg_env"
    request.getfixturevalue(fixture)
    from worker.config import get_settings

    settings = get_settings().model_copy(update={"send_concurrency": CONCURRENCY})
    assert settings.concurrency == CONCURRENCY
    with session_scope() as s:
        seed_papers(s)
        for i in range(N):
            add_sub(s, address(i), ["pruning"])
    return settings


def plan() -> list[int]:
    with session_scope() as s:
        return delivery.plan_edition(s, TODAY, now=NOW).pending_ids


def run(ids, mailer, settings, limiter=None, **kw):
    return delivery.process_deliveries(
        ids, settings=settings, mailer=mailer, limiter=limiter or SpyBucket(), now=NOW, **kw
    )


def by_state() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with session_scope() as s:
        for mail, state in s.execute(
            select(Subscriber.email, Delivery.state).join(Delivery.subscriber)
        ):
            out.setdefault(str(state), []).append(mail)
    return {k: sorted(v) for k, v in out.items()}


def test_sends_overlap_up_to_the_concurrency_and_each_batch_is_one_claim(world: Settings) -> None:
    ids = plan()
    statements: list[str] = []

    def count(conn, cursor, statement, *args) -> None:
        statements.append(statement)

    engine = get_engine(world.database_url)
    event.listen(engine, "before_cursor_execute", count)
    try:
        mailer = RecipientMailer(latency=0.05)
        limiter = SpyBucket()
        out = run(ids, mailer, world, limiter)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert out.sent == N and mailer.max_in_flight == CONCURRENCY
    assert limiter.takes == [4, 4, 2]  # tokens per batch
    updates = [s for s in statements if s.lstrip().upper().startswith("UPDATE DELIVERIES")]
    # The chunk's recipient snapshot (for "view in browser" as sent): one statement.
    snapshots = [s for s in updates if "SET RECIPIENT" in " ".join(s.upper().split())]
    assert len(snapshots) == 1, snapshots
    claims = [s for s in updates if s not in snapshots]
    # three claims and three records, one statement each
    assert len(claims) == 6, claims
    with session_scope() as s:
        attempts = s.scalars(select(DeliveryAttempt)).all()
        assert len(attempts) == N and {a.outcome for a in attempts} == {"sent"}
        assert len({a.started_at for a in attempts}) == 3  # claimed in three batches
        rows = s.scalars(select(Delivery)).all()
        assert {d.message_id for d in rows} == {f"ses-{address(i)}" for i in range(N)}
        assert all(d.state == "sent" and d.attempts == 1 for d in rows)
    assert set(mailer.accepted.values()) == {1}


def test_a_batch_mixing_error_kinds(world: Settings) -> None:
    ids = plan()
    errors: dict[str, MailerError | BaseException] = {
        address(0): TransientError("503 Service Unavailable"),
        address(1): PermanentError("MessageRejected"),
        address(2): AmbiguousError("connection lost after the request"),
        address(3): ThrottledError("TooManyRequests"),
        address(5): ThrottledError("TooManyRequests"),
        address(6): RuntimeError("a bug in the mailer"),  # unexpected: unknown, chunk goes on
    }
    mailer = RecipientMailer(errors, latency=0.01)
    limiter = SpyBucket()
    out = run(ids, mailer, world, limiter)
    assert (out.sent, out.failed, out.unknown, len(out.retry)) == (4, 1, 2, 3)
    assert limiter.slowed == 2  # once per throttled batch, not once per email
    states = by_state()
    assert states["failed"] == [address(1)]
    assert states["unknown"] == [address(2), address(6)]
    assert states["pending"] == [address(0), address(3), address(5)]
    assert states["sent"] == [address(i) for i in (4, 7, 8, 9)]
    with session_scope() as s:
        retried = s.scalars(select(Delivery).where(Delivery.state == "pending")).all()
        assert all(d.scheduled_at and d.scheduled_at > NOW for d in retried)
        outcomes = Counter(a.outcome for a in s.scalars(select(DeliveryAttempt)))
    assert outcomes == {"sent": 4, "transient": 3, "failed": 1, "unknown": 2}
    # The retries go out once their backoff is over; nothing else is sent again.
    later = delivery.process_deliveries(
        ids,
        settings=world,
        mailer=RecipientMailer(),
        limiter=SpyBucket(),
        now=NOW + timedelta(hours=2),
    )
    assert later.sent == 3 and later.not_claimed == N - 3


def test_account_error_keeps_its_batch_and_claims_nothing_more(world: Settings) -> None:
    ids = plan()
    mailer = RecipientMailer({address(1): AccountError("SendingPausedException")}, latency=0.01)
    out = run(ids, mailer, world)
    assert out.paused and out.sent == 3
    assert sum(mailer.calls.values()) == CONCURRENCY  # the next batch was never claimed
    states = by_state()
    assert states["sent"] == [address(i) for i in (0, 2, 3)]
    assert len(states["pending"]) == N - 3
    with session_scope() as s:
        assert delivery.sending_paused(s)
        handed_back = s.scalar(
            select(Delivery).join(Delivery.subscriber).where(Subscriber.email == address(1))
        )
        assert handed_back.attempts == 0 and handed_back.scheduled_at <= NOW


def test_crash_during_a_batch_leaves_only_that_batch_sending(world: Settings) -> None:
    """The process dies while batch 2 is in flight: batch 1 is recorded (with batch 2's
    claim), batch 2 stays `sending` (the reaper makes it `unknown`), batch 3 is pending;
    the recovery run sends batch 3 once and nothing else."""

    class Crash(BaseException):
        pass

    ids = plan()
    mailer = RecipientMailer({address(5): Crash()}, latency=0.02)
    with pytest.raises(Crash):
        run(ids, mailer, world)
    states = by_state()
    assert states["sent"] == [address(i) for i in range(4)]
    assert states["sending"] == [address(i) for i in range(4, 8)]
    assert states["pending"] == [address(8), address(9)]
    again = RecipientMailer(latency=0.01)
    out = run(ids, again, world)
    assert out.sent == 2 and set(again.calls) == {address(8), address(9)}
    with session_scope() as s:
        reaped = delivery.reap_stale_sending(s, world, now=utcnow() + timedelta(hours=1))
    assert reaped == CONCURRENCY  # never more than the sends in flight
    sent_twice = [a for a in mailer.accepted if mailer.accepted[a] + again.accepted[a] > 1]
    assert sent_twice == []


def test_unsubscribe_mid_chunk_is_honoured_at_the_next_claim(world: Settings) -> None:
    ids = plan()

    def complain_everyone() -> None:
        with session_scope() as s:
            s.execute(update(Subscriber).values(status="complained"))

    mailer = RecipientMailer(latency=0.02, after_first=complain_everyone)
    out = run(ids, mailer, world)
    # the batch in flight was claimed before the complaint; nothing after it goes out
    assert out.sent == CONCURRENCY and sum(mailer.calls.values()) == CONCURRENCY
    states = by_state()
    assert len(states["sent"]) == CONCURRENCY and len(states["skipped"]) == N - CONCURRENCY
    assert "pending" not in states


def test_pause_stops_an_in_flight_chunk_at_the_next_batch(
    world: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "PAUSE_CHECK_SECONDS", 0.0)
    ids = plan()

    def pause() -> None:
        with session_scope() as s:
            delivery.pause_sending(s, "operator pause", by="test")

    mailer = RecipientMailer(latency=0.02, after_first=pause)
    out = run(ids, mailer, world)
    assert out.paused == "operator pause" and out.sent == CONCURRENCY
    assert len(by_state()["pending"]) == N - CONCURRENCY


def test_batch_recorded_before_waiting_for_the_next_tokens(world: Settings) -> None:
    ids = plan()
    seen: list[dict[str, int]] = []

    class EmptyBucket(LocalBucket):
        def try_acquire(self, tokens: int = 1) -> bool:
            return False

        def acquire(self, tokens: int = 1) -> float:
            with session_scope() as s:
                seen.append(delivery.edition_counts(s, TODAY))
            return 0.0

    run(ids, RecipientMailer(), world, EmptyBucket(1, 1))
    assert [c["sent"] for c in seen] == [0, 4, 8]
    assert all(c["sending"] == 0 for c in seen)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, 1),  # the default 14/s needs no more than one send in flight
        ({"send_rate": 1000}, 25),
        ({"send_rate": 100_000}, 32),
        ({"send_rate": 1000, "send_concurrency": 8}, 8),
        ({"send_rate": 5, "send_concurrency": 8}, 5),  # a batch never exceeds the burst
    ],
)
def test_concurrency_follows_the_rate(env: dict[str, str], values: dict, expected: int) -> None:
    assert load_settings(**values).concurrency == expected


@pytest.mark.parametrize("bad", ["-1", "257", "many"])
def test_bad_concurrency_is_refused_by_name(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("PAPERMAIL_SEND_CONCURRENCY", bad)
    with pytest.raises(ConfigError, match="PAPERMAIL_SEND_CONCURRENCY"):
        load_settings()


def test_the_chosen_papers_are_recorded_in_order_with_topic_and_score(
    world: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One statement records a chunk's papers (JSON on PostgreSQL): every pick the
    selection made arrives as it was, position, topic and score included."""
    from worker.models import DeliveryPaper

    chosen: list[dict[str, object]] = []
    real = delivery._insert_delivery_papers

    def spy(session, rows):  # type: ignore[no-untyped-def]
        chosen.extend(dict(r) for r in rows)
        real(session, rows)

    monkeypatch.setattr(delivery, "_insert_delivery_papers", spy)
    out = run(plan(), RecipientMailer(), world)

    assert out.sent == N
    with session_scope() as s:
        recorded = {
            (dp.delivery_id, dp.paper_id, dp.position, dp.matched_topic, round(dp.score, 9))
            for dp in s.scalars(select(DeliveryPaper))
        }
    expected = {
        (r["delivery_id"], r["paper_id"], r["position"], r["matched_topic"],
         round(float(r["score"]), 9))  # type: ignore[arg-type]
        for r in chosen
    }  # fmt: skip
    assert recorded == expected
    assert len({r[0] for r in recorded}) == N and any(r[3] == "pruning" for r in recorded)
    for did in {r[0] for r in recorded}:
        positions = sorted(r[2] for r in recorded if r[0] == did)
        assert positions == list(range(len(positions)))
