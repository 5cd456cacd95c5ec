"""Concurrent sending for real: `celery` worker processes with several sends in flight each,
PostgreSQL, and the SES mailer over HTTP to the SES-compatible server in its own process,
which counts what it accepted per recipient (so duplicates are counted at the "provider",
not from what the code says it did)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.integration.test_celery_pipeline import (
    Workers,
    all_final,
    seed,
    stack,  # noqa: F401 - the fixture
    state_counts,
    wait_for,
)
from worker import config
from worker.db import session_scope
from worker.models import Delivery, DeliveryState, Subscriber, utcnow

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

FAKE_SES = Path(__file__).resolve().parent / "fake_ses.py"
CONCURRENCY = 8


@pytest.fixture
def endpoint() -> Iterator[Callable[[], dict[str, Any]]]:
    """The SES-compatible server in its own process, answering after 40 ms."""
    proc = subprocess.Popen(
        [sys.executable, str(FAKE_SES), "--port", "0", "--latency", "0.04", "--count-only"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()

    def stats() -> dict[str, Any]:
        with urllib.request.urlopen(url + "/_fake/stats", timeout=5) as answer:
            return json.loads(answer.read())

    stats.url = url  # type: ignore[attr-defined]
    try:
        yield stats
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def ses_settings(url: str, **extra: str) -> dict[str, str]:
    return {
        "PAPERMAIL_MAILER": "ses",
        "PAPERMAIL_POSTAL_ADDRESS": "Example Lab, 1 Main Street, Springfield, USA",
        "PAPERMAIL_SES_ENDPOINT_URL": url,
        "PAPERMAIL_AWS_ACCESS_KEY_ID": "AKIATESTTESTTEST0000",
        "PAPERMAIL_AWS_SECRET_ACCESS_KEY": "test-secret-not-real-0123456789abcdef",
        "PAPERMAIL_SECRET_KEY": "a-test-signing-key-of-at-least-32-characters",
        "PAPERMAIL_BASE_URL": "https://papermail.example.org",
        "PAPERMAIL_FROM_ADDRESS": "papermail <digest@papermail.example.org>",
        "PAPERMAIL_SEND_CONCURRENCY": str(CONCURRENCY),
        **extra,
    }


def rows_by_email() -> dict[str, str]:
    with session_scope() as s:
        return dict(
            s.execute(
                select(Subscriber.email, Delivery.state).join(
                    Delivery, Delivery.subscriber_id == Subscriber.id
                )
            ).all()
        )


@pytest.mark.slow
def test_kill_9_during_a_batch_then_restart_sends_nothing_twice(
    stack: Callable[..., Workers],  # noqa: F811
    endpoint: Callable[[], dict[str, Any]],
) -> None:
    from worker import tasks

    n, processes = 600, 2
    workers = stack(
        **ses_settings(endpoint.url, PAPERMAIL_SEND_RATE="300", PAPERMAIL_CHUNK_SIZE="40")  # type: ignore[attr-defined]
    )
    emails = seed(n)
    workers.start("doomed", processes)
    plan = tasks.enqueue_edition(utcnow().date())
    assert len(plan.pending_ids) == n

    # At full rate, with batches in flight: kill the whole worker, no goodbye.
    wait_for("a quarter sent", lambda: endpoint()["accepted"] >= n // 4, timeout=90, interval=0.02)
    workers.kill9("doomed")
    mid = state_counts()
    assert mid["pending"] > 0, mid

    workers.start("rescuer", processes)

    def idle() -> bool:
        first = state_counts()
        time.sleep(1.0)
        return tasks.send_queue_size() == 0 and state_counts() == first

    wait_for("the queue drained", idle, timeout=120, interval=0)
    settings = config.get_settings()
    later = utcnow() + timedelta(seconds=settings.sending_timeout_seconds + 1)
    recovery = tasks.recover(now=later)
    assert recovery.skipped_reason is None
    wait_for("every delivery final", all_final, timeout=120)

    final = state_counts()
    assert final["sent"] + final["unknown"] == n, final
    # At most one batch in flight per killed pool process is left unknown.
    assert final["unknown"] <= processes * CONCURRENCY, final
    assert final["unknown"] == recovery.unknown
    stats = endpoint()
    assert stats["duplicates"] == {}
    per_recipient = Counter(stats["per_recipient"])
    rows = rows_by_email()
    assert set(rows) == set(emails)
    for address in emails:
        if rows[address] == DeliveryState.SENT:
            assert per_recipient[address] == 1, address
        else:  # unknown: claimed in the killed batch; sent at most once
            assert rows[address] == DeliveryState.UNKNOWN
            assert per_recipient[address] <= 1, address
    with session_scope() as s:
        assert set(s.scalars(select(Delivery.attempts))) == {1}


@pytest.mark.slow
def test_several_sends_in_flight_per_worker_process(
    stack: Callable[..., Workers],  # noqa: F811
    endpoint: Callable[[], dict[str, Any]],
) -> None:
    """One worker process: its sends overlap at the provider, never more than the limit."""
    from worker import tasks

    n = 160
    workers = stack(
        **ses_settings(endpoint.url, PAPERMAIL_SEND_RATE="1000", PAPERMAIL_CHUNK_SIZE="80")  # type: ignore[attr-defined]
    )
    seed(n)
    workers.start("one", 1)
    tasks.enqueue_edition(utcnow().date())
    wait_for("every delivery final", all_final, timeout=120)
    assert state_counts() == Counter({"sent": n})
    stats = endpoint()
    assert stats["accepted"] == n and stats["duplicates"] == {}
    # Seen at the server: one process had several requests open at once, never more
    # than PAPERMAIL_SEND_CONCURRENCY.
    assert 1 < stats["max_in_flight"] <= CONCURRENCY, stats["max_in_flight"]
