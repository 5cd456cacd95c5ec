"""Planning, claiming, sending and recording deliveries (in-process path, real SQLite)."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from worker import delivery
from worker.clock import utcnow
from worker.config import Settings
from worker.db import session_scope
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
from worker.models import (
    Delivery,
    DeliveryAttempt,
    DeliveryPaper,
    Paper,
    Subscriber,
)
from worker.ratelimit import LocalBucket

NOW = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
TODAY = NOW.date()


def seed_papers(session, count: int = 12, now: datetime = NOW) -> list[str]:
    topics = [
        "pruning neural networks",
        "gaussian processes",
        "image compression",
        "graph neural networks",
        "video stabilization",
        "machine unlearning",
    ]
    ids = []
    for i in range(count):
        pid = f"2611.{i:05d}"
        topic = topics[i % len(topics)]
        session.add(
            Paper(
                id=pid,
                title=f"Study {i} of {topic}",
                abstract=f"We study {topic} in depth. " * 3,
                authors=["Zoë Müller", "Ada Lovelace"],
                upvotes=10 + i,
                published_at=now - timedelta(hours=1 + i),
                url=f"https://huggingface.co/papers/{pid}",
            )
        )
        ids.append(pid)
    return ids


def add_sub(session, email_: str, topics: list[str], **kw) -> Subscriber:
    sub = Subscriber(email=email_, status=kw.pop("status", "active"), topics=topics, **kw)
    session.add(sub)
    session.flush()
    return sub


class ScriptedMailer:
    """A provider double: raises the scripted errors in order, then accepts."""

    name = "scripted"

    def __init__(self, script: list[MailerError | None] | None = None) -> None:
        self.script = list(script or [])
        self.sent: list[OutgoingMessage] = []

    def send(self, message: OutgoingMessage) -> SendResult:
        if self.script:
            err = self.script.pop(0)
            if err is not None:
                raise err
        self.sent.append(message)
        return SendResult(message_id=f"ses-{len(self.sent)}")

    def close(self) -> None:
        pass


def fast_limiter() -> LocalBucket:
    return LocalBucket(rate=10_000, burst=10_000)


def states(session) -> dict[str, str]:
    rows = session.execute(select(Subscriber.email, Delivery.state).join(Delivery.subscriber)).all()
    return dict(rows)


@pytest.fixture
def world(settings: Settings):
    with session_scope() as s:
        seed_papers(s)
        add_sub(s, "ada@example.org", ["pruning"])
        add_sub(s, "grace@example.org", ["gaussian process"])
        add_sub(s, "alan@example.org", [])
        add_sub(s, "kat@example.org", ["quantum chemistry"])
        add_sub(s, "pending@example.org", ["pruning"], status="pending")
        add_sub(s, "weekly@example.org", [], frequency="weekly", weekday=(TODAY.weekday() + 1) % 7)
    return settings


def run(ids, mailer, settings, **kw):
    return delivery.process_deliveries(
        ids, settings=settings, mailer=mailer, limiter=fast_limiter(), now=NOW, **kw
    )


def test_plan_is_idempotent_and_only_due_active(world: Settings) -> None:
    with session_scope() as s:
        first = delivery.plan_edition(s, TODAY, now=NOW)
    with session_scope() as s:
        second = delivery.plan_edition(s, TODAY, now=NOW)
        total = s.scalar(select(func.count()).select_from(Delivery))
    assert first.due == 4 and first.created == 4  # not pending, not weekly-on-another-day
    assert second.created == 0 and total == 4
    assert sorted(first.pending_ids) == sorted(second.pending_ids)


def test_send_records_state_papers_and_attempts(world: Settings) -> None:
    mailer = ScriptedMailer()
    with session_scope() as s:
        ids = delivery.plan_edition(s, TODAY, now=NOW).pending_ids
    out = run(ids, mailer, world)
    assert (out.sent, out.skipped, out.failed) == (3, 1, 0)
    with session_scope() as s:
        st = states(s)
        assert st["kat@example.org"] == "skipped"
        skipped = s.scalar(
            select(Delivery).join(Delivery.subscriber).where(Subscriber.email == "kat@example.org")
        )
        assert "quantum chemistry" in (skipped.skip_reason or "")
        assert {st[e] for e in ("ada@example.org", "grace@example.org", "alan@example.org")} == {
            "sent"
        }
        sent = s.scalars(select(Delivery).where(Delivery.state == "sent")).all()
        assert all(d.message_id and d.sent_at and d.attempts == 1 for d in sent)
        assert s.scalar(select(func.count()).select_from(DeliveryPaper)) > 0
        attempts = s.scalars(select(DeliveryAttempt)).all()
        assert len(attempts) == 3 and {a.outcome for a in attempts} == {"sent"}
    # the ada email carries the pruning paper
    ada = next(m for m in mailer.sent if m.recipient == "ada@example.org")
    assert "pruning" in ada.html.lower()


def test_second_run_and_redelivered_chunk_send_nothing(world: Settings) -> None:
    mailer = ScriptedMailer()
    with session_scope() as s:
        ids = delivery.plan_edition(s, TODAY, now=NOW).pending_ids
    run(ids, mailer, world)
    again = run(ids, mailer, world)  # the same task delivered twice
    assert again.sent == 0 and again.not_claimed == len(ids)
    assert len(mailer.sent) == 3
    plan, out = delivery.run_in_process(TODAY, settings=world, now=NOW)
    assert plan.created == 0 and out.sent == 0


def test_no_repeats_next_day(world: Settings) -> None:
    mailer = ScriptedMailer()
    with session_scope() as s:
        ids = delivery.plan_edition(s, TODAY, now=NOW).pending_ids
    run(ids, mailer, world)
    day1 = {m.recipient: m for m in mailer.sent}
    tomorrow = TODAY + timedelta(days=1)
    with session_scope() as s:
        ids2 = delivery.plan_edition(s, tomorrow, now=NOW + timedelta(days=1)).pending_ids
    mailer2 = ScriptedMailer()
    delivery.process_deliveries(
        ids2, settings=world, mailer=mailer2, limiter=fast_limiter(), now=NOW + timedelta(hours=2)
    )
    with session_scope() as s:
        by_sub: dict[int, set[str]] = {}
        for d, pid in s.execute(
            select(Delivery, DeliveryPaper.paper_id).join(
                DeliveryPaper, DeliveryPaper.delivery_id == Delivery.id
            )
        ).all():
            by_sub.setdefault(d.subscriber_id, set())
            assert pid not in by_sub[d.subscriber_id], "a paper was sent twice"
            by_sub[d.subscriber_id].add(pid)
    assert day1


def test_transient_retries_then_fails(world: Settings) -> None:
    with session_scope() as s:
        ids = delivery.plan_edition(
            s,
            TODAY,
            now=NOW,
            subscriber_ids=[
                s.scalar(select(Subscriber.id).where(Subscriber.email == "ada@example.org"))
            ],
        ).pending_ids
    mailer = ScriptedMailer([TransientError("503 from provider")] * 10)
    limiter = fast_limiter()
    for attempt in range(world.max_attempts):
        later = NOW + timedelta(hours=attempt + 1)  # past each backoff
        out = delivery.process_deliveries(
            ids, settings=world, mailer=mailer, limiter=limiter, now=later
        )
        if attempt < world.max_attempts - 1:
            assert out.retry and out.retry[0][0] == ids[0] and out.retry[0][1] > 0
    with session_scope() as s:
        d = s.get(Delivery, ids[0])
        assert d.state == "failed" and d.attempts == world.max_attempts
        assert "503" in (d.last_error or "")
        assert s.scalar(select(func.count()).select_from(DeliveryAttempt)) == world.max_attempts
    assert mailer.sent == []


def test_transient_then_success_keeps_the_same_papers(world: Settings) -> None:
    with session_scope() as s:
        ids = delivery.plan_edition(s, TODAY, now=NOW).pending_ids
    mailer = ScriptedMailer([ThrottledError("slow down")])
    limiter = fast_limiter()
    out = delivery.process_deliveries(ids, settings=world, mailer=mailer, limiter=limiter, now=NOW)
    assert len(out.retry) == 1 and limiter.rate < 10_000  # throttling slowed the bucket
    with session_scope() as s:
        retried = s.get(Delivery, out.retry[0][0])
        before = [dp.paper_id for dp in retried.papers]
    out2 = delivery.process_deliveries(
        [out.retry[0][0]],
        settings=world,
        mailer=mailer,
        limiter=limiter,
        now=NOW + timedelta(hours=2),
    )
    assert out2.sent == 1
    with session_scope() as s:
        d = s.get(Delivery, out.retry[0][0])
        assert d.state == "sent" and d.attempts == 2
        assert [dp.paper_id for dp in d.papers] == before


@pytest.mark.parametrize(
    ("error", "final"),
    [
        (PermanentError("MessageRejected: Email address is not verified"), "failed"),
        (AmbiguousError("read timeout after the request was sent"), "unknown"),
    ],
)
def test_error_kinds_map_to_states(world: Settings, error: MailerError, final: str) -> None:
    with session_scope() as s:
        ids = delivery.plan_edition(s, TODAY, now=NOW).pending_ids
    mailer = ScriptedMailer([error])
    out = run(ids, mailer, world)
    with session_scope() as s:
        finals = [s.get(Delivery, i).state for i in ids]
    assert finals.count(final) == 1
    assert out.retry == []


def test_account_error_stops_the_run_and_leaves_rest_pending(world: Settings) -> None:
    with session_scope() as s:
        ids = delivery.plan_edition(s, TODAY, now=NOW).pending_ids
    mailer = ScriptedMailer([None, AccountError("SendingPausedException: sending paused")])
    out = run(ids, mailer, world)
    assert out.paused and out.sent == 1
    with session_scope() as s:
        counts = delivery.edition_counts(s, TODAY)
        assert counts["sent"] == 1 and counts["pending"] == 2 and counts["skipped"] == 1
        assert delivery.sending_paused(s)
    # while paused nothing goes out
    out2 = run(ids, ScriptedMailer(), world)
    assert out2.sent == 0 and out2.paused
    with session_scope() as s:
        assert delivery.resume_sending(s)
    out3 = run(ids, ScriptedMailer(), world)
    assert out3.sent == 2


def test_crash_after_accept_leaves_sending_then_unknown(world: Settings) -> None:
    """The record of a send commits with the next claim: a crash in between leaves the
    row `sending`, which the reaper turns `unknown` (never re-sent automatically)."""
    with session_scope() as s:
        ids = delivery.plan_edition(s, TODAY, now=NOW).pending_ids

    class Crash(BaseException):
        pass

    class CrashingMailer(ScriptedMailer):
        def send(self, message: OutgoingMessage) -> SendResult:
            result = super().send(message)
            if len(self.sent) == 2:
                raise Crash()  # the process dies right after the provider accepted
            return result

    mailer = CrashingMailer()
    with pytest.raises(Crash):
        run(ids, mailer, world)
    with session_scope() as s:
        counts = delivery.edition_counts(s, TODAY)
    assert counts["sent"] == 1 and counts["sending"] == 1
    # recovery: the pending rest is sent once, the sending row is not touched
    out = run(ids, ScriptedMailer(), world)
    with session_scope() as s:
        assert delivery.reap_stale_sending(s, world, now=utcnow() + timedelta(hours=1)) == 1
        counts = delivery.edition_counts(s, TODAY)
    assert counts["unknown"] == 1 and counts["sent"] == 1 + out.sent
    assert counts["pending"] == 0 and counts["sending"] == 0
    with session_scope() as s:
        lost = s.scalar(select(Delivery).where(Delivery.state == "unknown"))
        [attempt] = lost.attempts_log  # the reaper writes what happened to the history
        assert attempt.outcome == "unknown" and attempt.finished_at is not None


def test_suppressed_rechecked_just_before_sending(world: Settings) -> None:
    with session_scope() as s:
        ids = delivery.plan_edition(s, TODAY, now=NOW).pending_ids
        ada = s.scalar(select(Subscriber).where(Subscriber.email == "ada@example.org"))
        ada.status = "complained"
    mailer = ScriptedMailer()
    run(ids, mailer, world)
    assert "ada@example.org" not in {m.recipient for m in mailer.sent}
    with session_scope() as s:
        assert states(s)["ada@example.org"] == "skipped"


def test_outbox_end_to_end_writes_parseable_eml(world: Settings) -> None:
    _plan, out = delivery.run_in_process(TODAY, settings=world, now=NOW)
    assert out.sent == 3
    files = sorted(Path(world.outbox_dir).rglob("*.eml"))
    assert len(files) == 3
    for f in files:
        msg = email.message_from_bytes(f.read_bytes(), policy=email.policy.default)
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert msg.get_body(("html",)) is not None and msg.get_body(("plain",)) is not None


def test_window_end_is_send_time_or_now() -> None:
    sub = Subscriber(email="x@example.org", timezone="Europe/Paris", send_hour=7)
    past = date(2026, 11, 20)
    assert delivery.send_time(sub, past) == datetime(2026, 11, 20, 6, 0, tzinfo=UTC)
    assert delivery.window_end(sub, past, NOW) == datetime(2026, 11, 20, 6, 0, tzinfo=UTC)
    assert delivery.window_end(sub, date(2026, 12, 1), NOW) == NOW


def test_retry_waits_out_its_backoff_even_if_redelivered(world: Settings) -> None:
    with session_scope() as s:
        ids = delivery.plan_edition(s, TODAY, now=NOW).pending_ids
    mailer = ScriptedMailer([TransientError("503")])
    out = run(ids, mailer, world)
    ((retry_id, delay),) = out.retry
    # The backoff is scheduled on the chunk's clock (NOW), never on the wall clock.
    early = delivery.process_deliveries(
        [retry_id], settings=world, mailer=mailer, limiter=fast_limiter(), now=NOW
    )
    assert early.sent == 0 and early.not_claimed == 1
    late = delivery.process_deliveries(
        [retry_id],
        settings=world,
        mailer=mailer,
        limiter=fast_limiter(),
        now=NOW + timedelta(seconds=delay + 1),
    )
    assert late.sent == 1


class HookMailer(ScriptedMailer):
    """Runs a hook after the first accepted send (e.g. an unsubscribe lands mid-chunk)."""

    def __init__(self, hook) -> None:
        super().__init__()
        self.hook = hook

    def send(self, message: OutgoingMessage) -> SendResult:
        result = super().send(message)
        if len(self.sent) == 1:
            self.hook()
        return result


def test_unsubscribe_mid_chunk_is_honoured_at_the_claim(world: Settings) -> None:
    with session_scope() as s:
        ids = delivery.plan_edition(s, TODAY, now=NOW).pending_ids

    def complain_everyone_else() -> None:
        with session_scope() as s:
            s.execute(update(Subscriber).values(status="complained"))

    mailer = HookMailer(complain_everyone_else)
    out = run(ids, mailer, world)
    assert out.sent == 1 and len(mailer.sent) == 1
    with session_scope() as s:
        counts = delivery.edition_counts(s, TODAY)
    assert counts["sent"] == 1 and counts["skipped"] == 3 and counts["pending"] == 0


def test_pause_mid_chunk_stops_the_chunk(world: Settings, monkeypatch) -> None:
    monkeypatch.setattr(delivery, "PAUSE_CHECK_SECONDS", 0.0)
    with session_scope() as s:
        ids = delivery.plan_edition(s, TODAY, now=NOW).pending_ids

    def pause() -> None:
        with session_scope() as s:
            delivery.pause_sending(s, "operator pause", by="test")
            delivery.pause_sending(s, "twice is fine", by="test")  # an upsert

    out = run(ids, HookMailer(pause), world)
    assert out.sent == 1 and out.paused == "twice is fine"
    with session_scope() as s:
        assert delivery.edition_counts(s, TODAY)["pending"] == 2


def test_sent_email_recorded_before_waiting_for_a_token(world: Settings) -> None:
    """With the bucket empty, the record of i commits before the wait for i+1's token."""
    with session_scope() as s:
        ids = delivery.plan_edition(s, TODAY, now=NOW).pending_ids
    seen: list[dict[str, int]] = []

    class EmptyBucket(LocalBucket):
        def try_acquire(self, tokens: int = 1) -> bool:
            return False

        def acquire(self, tokens: int = 1) -> float:
            with session_scope() as s:
                seen.append(delivery.edition_counts(s, TODAY))
            return 0.0

    delivery.process_deliveries(
        ids, settings=world, mailer=ScriptedMailer(), limiter=EmptyBucket(1, 1), now=NOW
    )
    # while waiting for the 2nd and 3rd tokens, the previous email is already `sent`
    assert [c["sent"] for c in seen[-3:]] == [0, 1, 2]
    assert all(c["sending"] == 0 for c in seen)


def test_late_record_wins_over_the_reaper(world: Settings) -> None:
    with session_scope() as s:
        ids = delivery.plan_edition(s, TODAY, now=NOW).pending_ids
        s.execute(update(Delivery).where(Delivery.id == ids[0]).values(state="unknown"))
    with session_scope() as s:
        delivery._record_sent_batch(s, [(ids[0], "ses-late")], delivery._Attempt("send", NOW))
    with session_scope() as s:
        d = s.get(Delivery, ids[0])
        assert d.state == "sent" and d.message_id == "ses-late"
