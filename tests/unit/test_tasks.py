"""The Celery shell without workers: configuration, what lands in Redis, recovery, following.

Messages are read back from the real Redis lists kombu writes, so these tests see exactly
what a worker would receive.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.schedules import crontab
from sqlalchemy import update

from tests.conftest import FIXED_NOW
from worker import config, delivery, tasks
from worker.db import session_scope
from worker.errors import PapermailError
from worker.models import Delivery, Paper, Subscriber, utcnow

TODAY = FIXED_NOW.date()  # the unit tests' fixed clock (tests/conftest.py)


def queued(url: str, queue: str) -> list[dict[str, Any]]:
    """The tasks waiting in ``queue``: name, args, eta, expires."""
    client = redis.Redis.from_url(url)
    out = []
    for raw in reversed(client.lrange(queue, 0, -1)):  # kombu LPUSHes, workers BRPOP
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        headers = message["headers"]
        out.append(
            {
                "task": headers["task"],
                "args": args,
                "eta": headers.get("eta"),
                "content_type": message["content-type"],
            }
        )
    client.close()
    return out


@pytest.fixture
def broker(settings: config.Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PAPERMAIL_BROKER_URL", redis_url)
    monkeypatch.setenv("PAPERMAIL_CHUNK_SIZE", "3")
    config.reset_settings()
    return redis_url


def add_subscribers(n: int) -> list[int]:
    with session_scope() as s:
        s.add(
            Paper(
                id="2611.00001",
                title="Pruning neural networks",
                abstract="pruning",
                published_at=utcnow() - timedelta(hours=2),
            )
        )
        subs = [
            Subscriber(email=f"r{i}@example.org", status="active", topics=["pruning"])
            for i in range(n)
        ]
        s.add_all(subs)
        s.flush()
        return [sub.id for sub in subs]


# ---------------------------------------------------------------------------------------


def test_configuration(settings: config.Settings) -> None:
    conf = tasks.celery_config(settings)
    assert conf["task_serializer"] == "json" and conf["accept_content"] == ["json"]
    assert conf["task_ignore_result"] is True and conf["result_backend"] is None
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    visibility = conf["broker_transport_options"]["visibility_timeout"]
    assert visibility > tasks.MAX_COUNTDOWN_SECONDS
    # The longest backoff delivery.py ever computes is within the countdown cap.
    worst = max(delivery.backoff_delay(50, settings) for _ in range(50))
    assert worst <= tasks.MAX_COUNTDOWN_SECONDS
    routes = {name: route["queue"] for name, route in conf["task_routes"].items()}
    assert routes["papermail.send_chunk"] == "send"
    assert routes["papermail.plan_due"] == routes["papermail.reap"] == "plan"


@pytest.mark.parametrize(
    ("minutes", "expected"),
    [
        (60, crontab(minute="*/60")),
        (15, crontab(minute="*/15")),
        (120, crontab(minute=0, hour="*/2")),
        (90, timedelta(minutes=90)),
    ],
)
def test_beat_intervals(minutes: int, expected: object) -> None:
    assert tasks._every(minutes) == expected


def test_beat_schedule_follows_settings() -> None:
    plain = tasks.beat_schedule(config.load_settings(plan_interval_minutes=30, sources=""))
    assert set(plain) == {"plan-due", "reap"}
    # Papers arrive by themselves (the default source, hf): at FETCH_AT (UTC) and every
    # 15 minutes after it until the day ends; a fetch that succeeded asks nothing more.
    fetching = tasks.beat_schedule(config.load_settings(fetch_at="05:40"))
    assert fetching["fetch-papers"]["task"] == "papermail.fetch_papers"
    assert fetching["fetch-papers"]["schedule"] == crontab(minute="40-59/15", hour="5-23")
    assert fetching["fetch-papers"]["options"] == {"queue": "plan", "expires": 900}
    assert plain["plan-due"]["schedule"] == crontab(minute="*/30")
    assert plain["plan-due"]["options"]["expires"] == 1800
    with_sqs = tasks.beat_schedule(config.load_settings(sqs_queue_url="https://sqs.example/q"))
    assert with_sqs["poll-sqs"]["task"] == "papermail.poll_sqs"
    # The recovery sweep: every minute by default, on the wall clock; any seconds allowed.
    assert plain["reap"]["schedule"] == crontab(minute="*/1")
    assert plain["reap"]["options"] == {"queue": "plan", "expires": 60}
    fast = tasks.beat_schedule(config.load_settings(sweep_interval_seconds=5))
    assert fast["reap"]["schedule"] == timedelta(seconds=5)
    assert fast["reap"]["options"]["expires"] == 5
    with pytest.raises(config.ConfigError, match="PAPERMAIL_SWEEP_INTERVAL_SECONDS"):
        config.load_settings(sweep_interval_seconds=0)


def test_workers_and_beat_reconnect_for_ever(settings: config.Settings) -> None:
    conf = tasks.celery_config(settings)
    assert conf["broker_connection_retry"] and conf["broker_connection_retry_on_startup"]
    assert conf["broker_connection_max_retries"] is None
    # A broker blip lets the running chunk finish (its email in flight is not cut off).
    assert conf["worker_cancel_long_running_tasks_on_connection_loss"] is False


def test_a_chunk_that_cannot_retry_is_handed_back_to_the_sweep(broker: str) -> None:
    """The database is down mid-chunk and the retry cannot be published either (Celery would
    drop the message): the unclaimed rows lose their epoch, so the next sweep queues them."""
    from celery.exceptions import Reject
    from sqlalchemy import select
    from sqlalchemy.exc import OperationalError

    add_subscribers(3)
    plan = tasks.enqueue_edition(TODAY)
    with session_scope() as s:
        stamps = set(s.scalars(select(Delivery.queued_epoch)))
    assert stamps == {tasks.broker_epoch()}
    redis.Redis.from_url(broker).delete("send")  # as if a worker held it

    def db_down(*_: object, **__: object) -> None:
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))

    def broker_down(*_: object, **__: object) -> None:
        raise ConnectionError("broker unreachable")

    request = tasks.send_chunk.request
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(delivery, "process_deliveries", db_down)
        mp.setattr(tasks.send_chunk, "apply_async", broker_down)
        request.called_directly = False  # as in a worker: retry() publishes
        try:
            with pytest.raises(Reject):
                tasks.send_chunk.run(plan.pending_ids)
        finally:
            request.called_directly = True
    with session_scope() as s:
        assert set(s.scalars(select(Delivery.queued_epoch))) == {None}
    result = tasks.recover(now=utcnow() + timedelta(seconds=tasks.UNPUBLISHED_GRACE_SECONDS))
    assert result.lost == 3 and result.ids == plan.pending_ids


def test_enqueue_edition_commits_then_enqueues_chunks(broker: str) -> None:
    ids = add_subscribers(7)
    plan = tasks.enqueue_edition(TODAY)
    assert (plan.due, plan.created, len(plan.pending_ids)) == (7, 7, 7)
    messages = queued(broker, "send")
    assert [m["task"] for m in messages] == ["papermail.send_chunk"] * 3
    assert [m["args"] for m in messages] == [
        [plan.pending_ids[0:3]],
        [plan.pending_ids[3:6]],
        [plan.pending_ids[6:7]],
    ]
    assert {m["content_type"] for m in messages} == {"application/json"}
    assert queued(broker, "plan") == []  # each queue gets its own tasks only
    # The rows were committed before anything was enqueued: another session sees them.
    with session_scope() as s:
        assert s.query(Delivery).filter(Delivery.subscriber_id.in_(ids)).count() == 7
    # Again (an operator re-run): no new row; what is still pending is enqueued again
    # (a row a worker already claimed is skipped by the claim, so nothing goes out twice).
    again = tasks.enqueue_edition(TODAY)
    assert (again.created, again.pending_ids) == (0, plan.pending_ids)
    assert len(queued(broker, "send")) == 6
    with session_scope() as s:
        s.execute(update(Delivery).values(state="sent"))
    assert tasks.enqueue_edition(TODAY).pending_ids == []
    assert len(queued(broker, "send")) == 6


def test_enqueue_edition_leaves_retries_to_their_task(broker: str) -> None:
    add_subscribers(2)
    first = tasks.enqueue_edition(TODAY)
    redis.Redis.from_url(broker).flushdb()
    later = utcnow() + timedelta(minutes=5)
    with session_scope() as s:
        s.execute(
            update(Delivery).where(Delivery.id == first.pending_ids[0]).values(scheduled_at=later)
        )
    again = tasks.enqueue_edition(TODAY)
    assert again.pending_ids == first.pending_ids[1:]


def test_enqueue_without_a_broker_is_a_clear_error(settings: config.Settings) -> None:
    add_subscribers(1)
    with pytest.raises(PapermailError, match="PAPERMAIL_BROKER_URL"):
        tasks.enqueue_edition(TODAY)
    with session_scope() as s:
        assert s.query(Delivery).count() == 0


def test_retries_are_grouped_and_clamped(broker: str) -> None:
    n = tasks.requeue_retries([(1, 12.0), (2, 14.9), (3, 61.0), (4, 99_999.0), (5, 0.2)])
    messages = queued(broker, "send")
    assert n == len(messages) == 4
    sent_at = datetime.now(UTC)  # Celery turns a countdown into an eta on the system clock
    groups = {}
    for m in messages:
        eta = datetime.fromisoformat(m["eta"])
        groups[round((eta - sent_at).total_seconds() / 5) * 5] = m["args"][0]
    assert groups == {5: [5], 15: [1, 2], 65: [3], tasks.MAX_COUNTDOWN_SECONDS: [4]}


@pytest.mark.parametrize("bad", [None, "1,2", [1, "2"], [1.5], [True], {"ids": [1]}])
def test_send_chunk_refuses_bad_ids(settings: config.Settings, bad: object) -> None:
    with pytest.raises(ValueError, match="list of delivery ids"):
        tasks.send_chunk.run(bad)


def test_recover_reaps_and_requeues_stranded_rows(broker: str) -> None:
    add_subscribers(5)
    plan = tasks.enqueue_edition(TODAY)
    ids = plan.pending_ids
    settings = config.get_settings()
    later = utcnow() + timedelta(seconds=settings.sending_timeout_seconds + 60)
    with session_scope() as s:  # a worker died mid-send on the first row
        s.execute(
            update(Delivery)
            .where(Delivery.id == ids[0])
            .values(state="sending", claimed_at=utcnow())
        )
    # Tasks still wait in the queue: the rows are not stranded, only the stale claim goes.
    busy = tasks.recover(now=later)
    assert (busy.unknown, busy.requeued) == (1, 0)
    assert busy.skipped_reason == "the send queue is not empty"
    # The queue drained (the tasks died with a worker, the broker kept its epoch): the
    # pending rows are sent again once overdue.
    redis.Redis.from_url(broker).delete("send")
    assert tasks.recover(now=utcnow()).requeued == 0  # not overdue yet
    result = tasks.recover(now=later)
    assert result.requeued == 4 and result.ids == ids[1:]
    assert [m["args"][0] for m in queued(broker, "send")] == [ids[1:4], ids[4:]]
    # Paused: nothing is requeued.
    redis.Redis.from_url(broker).flushdb()
    with session_scope() as s:
        delivery.pause_sending(s, "test")
    paused = tasks.recover(now=later)
    assert paused.requeued == 0 and "paused" in (paused.skipped_reason or "")
    assert queued(broker, "send") == []


def test_follow_edition_until_final_or_paused(broker: str) -> None:
    add_subscribers(4)
    plan = tasks.enqueue_edition(TODAY)
    ids = iter(plan.pending_ids)
    seen: list[tuple[int, int]] = []

    def one_more_sent(_: float) -> None:  # stands in for the workers between two polls
        with session_scope() as s:
            s.execute(update(Delivery).where(Delivery.id == next(ids)).values(state="sent"))

    done = tasks.follow_edition(
        TODAY,
        planned_ids=plan.pending_ids,
        on_progress=lambda p: seen.append((p.done, p.total)),
        sleep=one_more_sent,
    )
    assert done.finished and done.counts["sent"] == 4
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]

    other = date(2026, 1, 1)
    with session_scope() as s:
        more = delivery.plan_edition(s, other)
        delivery.pause_sending(s, "provider refused")
    stopped = tasks.follow_edition(other, planned_ids=more.pending_ids, sleep=one_more_sent)
    assert stopped.paused and not stopped.finished and stopped.waiting == 4
    with session_scope() as s:
        delivery.resume_sending(s)
    timed_out = tasks.follow_edition(
        other, planned_ids=more.pending_ids, timeout=0.0, sleep=lambda _: None
    )
    assert timed_out.waiting == 4


def test_resend_goes_through_the_send_queue_with_its_options(broker: str) -> None:
    """`papermail resend` with a broker: the same queue, the options travel with the ids,
    and the worker records the resend (kind, reason) in the attempt history."""
    from click.testing import CliRunner

    from worker.cli import main
    from worker.models import DeliveryAttempt

    add_subscribers(2)
    plan = tasks.enqueue_edition(TODAY)
    redis.Redis.from_url(broker).delete("send")
    with session_scope() as s:
        s.execute(update(Delivery).values(state="failed"))
    r = CliRunner().invoke(
        main, ["resend", "--date", TODAY.isoformat(), "--state", "failed", "--reason", "x1"]
    )
    assert r.exit_code == 0, r.output
    assert "queued 2 for the workers" in r.output
    client = redis.Redis.from_url(broker)
    [raw] = client.lrange("send", 0, -1)
    args, kwargs, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
    assert args == [plan.pending_ids]
    assert kwargs == {"resend": {"kind": "resend", "reason": "x1", "include_suppressed": False}}
    summary = tasks.send_chunk(*args, **kwargs)  # what the worker runs
    assert summary["sent"] == 2
    with session_scope() as s:
        attempts = s.query(DeliveryAttempt).filter(DeliveryAttempt.kind == "resend").all()
    assert {(a.reason, a.outcome) for a in attempts} == {("x1", "sent")}


def test_the_worker_parent_loads_the_sending_path_before_forking(tmp_path: Path) -> None:
    """What prefork children would each import on their first chunk is loaded once, in the
    parent, when the worker starts (``worker_init``): they inherit it."""
    probe = (
        "import sys\n"
        "from celery import signals\n"
        "from worker import tasks\n"
        "before = {m for m in ('numpy', 'scipy.sparse', 'worker.rendering') if m in sys.modules}\n"
        "signals.worker_init.send(sender=None)\n"
        "from worker import rendering\n"
        "print(sorted(before), 'worker.rendering' in sys.modules, 'scipy.sparse' in sys.modules,"
        " rendering._RENDERER is not None)\n"
    )
    env = {**os.environ, "PAPERMAIL_DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
           "PAPERMAIL_TEMPLATE_CACHE_DIR": str(tmp_path / "templates")}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "True", "True", "True"]


def test_the_preloaded_parent_hides_its_objects_from_the_collector(
    env: dict[str, str], tmp_path: Path
) -> None:
    """What the worker's parent loads before forking is frozen (gc.freeze): a child's full
    collection scans only its own objects and leaves the shared pages unwritten."""
    code = (
        "import gc; from worker.tasks import _preload_before_fork; "
        "before = gc.get_freeze_count(); _preload_before_fork(); "
        "print(before, gc.get_freeze_count(), len(gc.get_objects()))"
    )
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("PAPERMAIL_")}
    child_env.update(env)
    out = subprocess.run(
        [sys.executable, "-c", code], env=child_env, cwd=tmp_path, capture_output=True,
        text=True, timeout=120, check=True,
    ).stdout.split()  # fmt: skip
    before, frozen, tracked = map(int, out)
    assert before == 0
    assert frozen > 50_000  # the sending path's modules: SQLAlchemy, numpy, botocore...
    assert tracked < frozen // 10
