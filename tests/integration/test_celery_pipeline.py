"""The fan-out for real: redis-server, `celery -A worker.tasks worker` subprocesses, PostgreSQL.

Settings reach the workers the way they do in production, through ``PAPERMAIL_*``
variables; the outbox mailer writes one ``.eml`` per email into this test's directory, so
"exactly one email" is counted from files, not from what the code says it did.
"""

from __future__ import annotations

import email.parser
import email.utils
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from worker import config
from worker.db import dispose_engines, session_scope
from worker.models import Delivery, DeliveryState, Paper, Subscriber, utcnow

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

TOPICS = [
    "pruning neural networks",
    "gaussian processes",
    "image compression",
    "graph neural networks",
    "video stabilization",
    "machine unlearning",
]


# ---------------------------------------------------------------------------------------
# Helpers


def seed(n_subscribers: int, *, first: int = 0, papers: bool = True) -> list[str]:
    """Papers published before today's 00:00 UTC, and active UTC subscribers due at 00:00."""
    midnight = datetime.combine(utcnow().date(), datetime.min.time(), tzinfo=UTC)
    emails = []
    with session_scope() as s:
        if papers:
            for i in range(24):
                topic = TOPICS[i % len(TOPICS)]
                s.add(
                    Paper(
                        id=f"2611.{i:05d}",
                        title=f"Study {i} of {topic}",
                        abstract=f"We study {topic} in depth. " * 3,
                        authors=["Ada Lovelace"],
                        upvotes=10 + i,
                        published_at=midnight - timedelta(hours=1 + i),
                    )
                )
        for n in range(first, first + n_subscribers):
            address = f"reader{n:05d}@example.org"
            s.add(
                Subscriber(
                    email=address,
                    status="active",
                    topics=[TOPICS[n % len(TOPICS)]],
                    send_hour=0,
                    timezone="UTC",
                )
            )
            emails.append(address)
    return emails


def emails_per_recipient(outbox: Path) -> Counter[str]:
    parser = email.parser.BytesHeaderParser()
    counts: Counter[str] = Counter()
    for path in outbox.rglob("*.eml"):
        with path.open("rb") as fh:
            headers = parser.parse(fh)
        counts[email.utils.parseaddr(headers["To"])[1]] += 1
    return counts


def state_counts() -> Counter[str]:
    with session_scope() as s:
        return Counter(
            dict(s.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
        )


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def all_final() -> bool:
    counts = state_counts()
    return sum(counts.values()) > 0 and not counts["pending"] and not counts["sending"]


class Workers:
    """`celery -A worker.tasks worker` subprocesses, each in its own process group."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, concurrency: int) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}.log"
        argv = [
            sys.executable, "-m", "celery", "-A", "worker.tasks", "worker",
            "-Q", "plan,send", "--concurrency", str(concurrency), "-P", "prefork",
            "-n", f"{name}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs[name] = proc
        wait_for(f"worker {name} ready", lambda: "ready." in self.log(name), timeout=60)
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def succeeded(self, task: str) -> int:
        """Tasks of this kind the workers have finished, from their logs."""
        return sum(
            1
            for name in self.procs
            for line in self.log(name).splitlines()
            if f"Task papermail.{task}[" in line and " succeeded in " in line
        )

    def kill9(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def stack(
    pg_env: dict[str, str], redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Workers]]:
    """Configure the test process and the workers alike; stop every worker afterwards."""
    started: list[Workers] = []

    def make(**settings: str) -> Workers:
        values = {"PAPERMAIL_BROKER_URL": redis_url, **settings}
        for key, value in values.items():
            monkeypatch.setenv(key, value)
        config.reset_settings()
        dispose_engines()
        workers = Workers(dict(os.environ), tmp_path)
        started.append(workers)
        return workers

    yield make
    for workers in started:
        workers.stop_all()


def outbox() -> Path:
    return Path(config.get_settings().outbox_dir)


# ---------------------------------------------------------------------------------------
# Tests


@pytest.mark.slow
def test_n_subscribers_get_exactly_n_emails_on_every_path(stack: Callable[..., Workers]) -> None:
    from worker import tasks

    workers = stack(PAPERMAIL_SEND_RATE="500", PAPERMAIL_CHUNK_SIZE="7")
    emails = seed(40)
    workers.start("a", 2)
    workers.start("b", 2)

    # The operator's path: plan, enqueue, follow until every delivery is final.
    cli = subprocess.run(
        [str(Path(sys.executable).with_name("papermail")), "digest", "run", "--wait"],
        env=workers.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "40 new deliveries, 40 queued in chunks of 7" in cli.stdout
    assert state_counts() == Counter({"sent": 40})
    assert emails_per_recipient(outbox()) == Counter({e: 1 for e in emails})

    # Planning again (an operator re-run, and the beat for the same local date): nothing new.
    again = tasks.enqueue_edition(utcnow().date())
    assert (again.created, again.pending_ids) == (0, [])
    tasks.plan_due.apply_async()
    wait_for("plan_due", lambda: workers.succeeded("plan_due") == 1, timeout=30)
    assert state_counts() == Counter({"sent": 40})

    # Every chunk delivered a second time (a redelivery): nothing goes out twice.
    with session_scope() as s:
        ids = list(s.scalars(select(Delivery.id).order_by(Delivery.id)))
    before = workers.succeeded("send_chunk")
    chunks = tasks.enqueue_ids(ids)
    wait_for(
        "duplicate chunks", lambda: workers.succeeded("send_chunk") == before + chunks, timeout=30
    )
    assert emails_per_recipient(outbox()) == Counter({e: 1 for e in emails})

    # New subscribers: the beat's task plans them at their hour and the workers send them.
    late = seed(9, first=1000, papers=False)
    tasks.plan_due.apply_async()
    wait_for("beat edition", lambda: state_counts()["sent"] == 49, timeout=60)
    assert emails_per_recipient(outbox()) == Counter({e: 1 for e in emails + late})
    with session_scope() as s:
        assert set(s.scalars(select(Delivery.attempts))) == {1}


@pytest.mark.slow
def test_kill_9_mid_run_then_restart_loses_nothing_and_sends_nothing_twice(
    stack: Callable[..., Workers],
) -> None:
    from worker import tasks

    workers = stack(PAPERMAIL_SEND_RATE="8", PAPERMAIL_CHUNK_SIZE="6")
    emails = seed(60)
    workers.start("doomed", 2)
    plan = tasks.enqueue_edition(utcnow().date())
    assert len(plan.pending_ids) == 60

    wait_for("a third sent", lambda: state_counts()["sent"] >= 20, timeout=60, interval=0.05)
    workers.kill9("doomed")  # the whole worker: main process and its pool, no goodbye
    mid = state_counts()
    assert mid["pending"] > 0 and mid["sent"] < 60, mid

    workers.start("rescuer", 2)

    # The rescuer drains the queue; the killed worker's own chunks stay unacknowledged
    # in Redis (for the visibility timeout), their rows stuck in pending or sending.
    def idle() -> bool:
        first = state_counts()
        time.sleep(1.0)
        return tasks.send_queue_size() == 0 and state_counts() == first

    wait_for("the queue drained", idle, timeout=60, interval=0)
    # The reap beat, as it runs once the sending timeout has passed.
    settings = config.get_settings()
    later = utcnow() + timedelta(seconds=settings.sending_timeout_seconds + 1)
    recovery = tasks.recover(now=later)
    assert recovery.skipped_reason is None
    wait_for("every delivery final", all_final, timeout=60)

    final = state_counts()
    assert final["sent"] + final["unknown"] == 60, final
    assert final["unknown"] <= 2  # at most one in flight per killed pool process
    assert final["unknown"] == recovery.unknown
    files = emails_per_recipient(outbox())
    with session_scope() as s:
        rows = dict(
            s.execute(
                select(Subscriber.email, Delivery.state).join(
                    Delivery, Delivery.subscriber_id == Subscriber.id
                )
            ).all()
        )
    assert set(rows) == set(emails)
    for address in emails:
        if rows[address] == DeliveryState.SENT:
            assert files[address] == 1, address
        else:  # unknown: the worker died after the send, before recording it
            assert rows[address] == DeliveryState.UNKNOWN
            # The token is taken before the claim, so a worker killed while it waits
            # leaves the row pending, not claimed-but-never-sent. (Only a kill in the
            # microseconds between the claim's commit and the send would leave none.)
            assert files[address] == 1, address
    assert max(files.values()) == 1


@pytest.mark.slow
def test_four_worker_processes_hold_the_shared_rate(stack: Callable[..., Workers]) -> None:
    from worker import tasks

    rate, n = 20.0, 640  # the burst, then 620 at 20/s: 31 s
    workers = stack(PAPERMAIL_SEND_RATE=str(rate), PAPERMAIL_CHUNK_SIZE="20")
    seed(n)
    workers.start("r1", 2)
    workers.start("r2", 2)
    tasks.enqueue_edition(utcnow().date())
    wait_for("every delivery sent", lambda: state_counts()["sent"] == n, timeout=90, interval=1)

    with session_scope() as s:
        stamps = sorted(s.scalars(select(Delivery.sent_at)))
    burst = config.get_settings().burst
    steady = stamps[burst:]
    seconds = (steady[-1] - steady[0]).total_seconds()
    assert seconds >= 30
    achieved = (len(steady) - 1) / seconds
    assert achieved == pytest.approx(rate, rel=0.05), achieved
    # All four processes took part (the rate is shared, not one process's).
    processes = {
        (name, line.split("/ForkPoolWorker-")[1].split("]")[0])
        for name in ("r1", "r2")
        for line in workers.log(name).splitlines()
        if "papermail.send_chunk[" in line and "/ForkPoolWorker-" in line
    }
    assert len(processes) == 4, processes
