#!/usr/bin/env python3
"""Chaos run: one edition through real Redis, PostgreSQL, Celery workers and an SES-compatible
endpoint while workers, Redis and the database connections are killed under it.

    python bench/chaos.py                                   # the full run: 2,000 subscribers
    python bench/chaos.py --subscribers 150 --worker-kills 1 --rate 400   # the CI version

Everything runs in processes of its own: a ``redis-server`` on a free port in a temporary
directory (killed with SIGKILL and restarted EMPTY: no persistence, the worst case), a
PostgreSQL database created for the run and dropped after it, the fault-injecting SES
server (``tests/integration/fake_ses.py``) answering a share of SendEmail requests with 429,
500, a connection reset or an answer slower than ``PAPERMAIL_SEND_TIMEOUT_SECONDS``, the
Procfile's ``worker`` command (several) and its ``beat``. The edition is planned the way
``papermail digest run`` does it. Then, as the edition progresses: ``kill -9`` of a worker
(its main process and its pool) ``--worker-kills`` times, restarted each time; Redis killed
and restarted empty; every connection of the app to its database dropped
(``pg_terminate_backend``). The run waits until no delivery is ``pending`` or ``sending``.

It prints planned, sent, failed (reasons and counts), unknown (reasons), still pending,
duplicates at the endpoint and minutes to drain, and checks the targets:

- 0 duplicates at the endpoint (no recipient got two copies);
- 0 deliveries without a terminal state and a reason once it drains;
- ``unknown`` <= the sends in flight at the kills (rows ``sending`` at each kill, at most
  one batch of PAPERMAIL_SEND_CONCURRENCY per killed pool process) plus the answers the
  endpoint made ambiguous (resets, slow answers): ``unknown`` is never re-sent
  automatically, by design;
- every delivery that could go out went out: none pending, each ``sent`` row accepted
  exactly once by the endpoint, each ``failed`` one after ``PAPERMAIL_MAX_ATTEMPTS``
  transient refusals.

Exit status 1 when a target is missed. Needs ``redis-server`` on the PATH and a PostgreSQL
server (``PAPERMAIL_TEST_POSTGRES_URL``, default postgres@127.0.0.1); it never touches a
shared Redis, and drops connections of its own database only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.redis_server import RedisServer  # noqa: E402

PG_ADMIN = os.environ.get(
    "PAPERMAIL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
SECRET = "chaos-run-secret-key-0123456789abcdefghijklmnopqrstuvwxyz"


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------
# Processes


def procfile_command(kind: str, concurrency: int) -> list[str]:
    """The Procfile's line for ``kind``, with this run's concurrency, run by this Python."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{kind}:"):
            command = line.split(":", 1)[1].strip()
            break
    else:
        raise SystemExit(f"Procfile has no {kind!r} process")
    command = re.sub(r"\$\{WORKER_CONCURRENCY:-\d+\}", str(concurrency), command)
    argv = shlex.split(command)
    if argv[0] != "celery":
        raise SystemExit(f"the Procfile's {kind} is not a celery command: {command}")
    return [sys.executable, "-m", "celery", *argv[1:]]


class Worker:
    def __init__(self, name: str, concurrency: int, env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.concurrency = concurrency
        self.env = env
        self.log = logs / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        argv = [
            *procfile_command("worker", self.concurrency),
            "-n", f"{self.name}-{self.starts}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        self.starts += 1
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.log.parent,  # no stray .env of the caller's directory
            )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with self.log.open("rb") as fh:
                fh.seek(offset)
                if b"ready." in fh.read():
                    return
            if self.proc.poll() is not None:
                raise SystemExit(f"worker {self.name} exited; see {self.log}")
            time.sleep(0.2)
        raise SystemExit(f"worker {self.name} not ready after 90 s; see {self.log}")

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def start_beat(env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    argv = procfile_command("beat", 1)
    if "--schedule" in argv:  # the Procfile's schedule file is shared /tmp: use ours
        argv[argv.index("--schedule") + 1] = str(logs / "beat-schedule")
    with (logs / "beat.log").open("ab") as out:
        return subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=logs
        )


def start_fake_ses(args: argparse.Namespace, logs: Path) -> tuple[subprocess.Popen[str], str]:
    argv = [
        sys.executable, str(ROOT / "tests" / "integration" / "fake_ses.py"), "--port", "0",
        "--fault-rate", str(args.fault_rate), "--faults", args.faults,
        "--slow-seconds", str(args.send_timeout + 1.5), "--seed", str(args.seed),
    ]  # fmt: skip
    err = (logs / "fake_ses.log").open("ab")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
    err.close()
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        raise SystemExit(f"the fake SES server did not start; see {logs / 'fake_ses.log'}")
    return proc, url


def endpoint_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/_fake/stats", timeout=30) as resp:
        return dict(json.load(resp))


# ---------------------------------------------------------------------------------------
# Database


def admin_dsn() -> str:
    return PG_ADMIN.replace("postgresql+psycopg://", "postgresql://")


def create_database() -> tuple[str, str]:
    import psycopg

    name = f"papermail_chaos_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"


def drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_connections(name: str) -> int:
    """pg_terminate_backend of every connection to this run's own database."""
    import psycopg

    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    return sum(1 for (ok,) in rows if ok)


def seed(n_subscribers: int) -> None:
    """Sample papers published before today's 00:00 UTC; subscribers due at 00:00 UTC."""
    from sqlalchemy import insert

    from worker.db import session_scope
    from worker.models import Paper, Subscriber
    from worker.resources import data_dir

    midnight = datetime.combine(datetime.now(UTC).date(), datetime.min.time(), tzinfo=UTC)
    lines = (data_dir() / "sample_papers.jsonl").read_text().splitlines()
    samples = [json.loads(x) for x in lines if x.strip()]
    now = datetime.now(UTC)
    papers = [
        {
            "id": f"2611.{n:05d}",
            "title": sample["title"],
            "abstract": sample.get("abstract", ""),
            "authors": sample.get("authors") or ["Ada Lovelace"],
            "upvotes": 10 + n,
            "published_at": midnight - timedelta(hours=1 + n % 40),
            "ingested_at": midnight - timedelta(hours=1),
            "updated_at": midnight,
            "source": "jsonl",
            "url": f"https://huggingface.co/papers/2611.{n:05d}",
        }
        for n, sample in enumerate(samples[:20])
    ]
    with session_scope() as s:
        s.execute(insert(Paper), papers)
        for start in range(0, n_subscribers, 5000):
            s.execute(
                insert(Subscriber),
                [
                    {
                        "email": f"reader{n:06d}@example.org",
                        "status": "active",
                        "topics": [],  # the trending top: every one of them has mail
                        "max_papers": 5,
                        "frequency": "daily",
                        "send_hour": 0,
                        "timezone": "UTC",
                        "source": "chaos",
                        "created_at": now,
                        "updated_at": now,
                    }
                    for n in range(start, min(n_subscribers, start + 5000))
                ],
            )


def counts() -> Counter[str]:
    from sqlalchemy import func, select

    from worker.db import session_scope
    from worker.models import Delivery

    with session_scope() as s:
        return Counter(
            dict(s.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
        )


def safe_counts() -> Counter[str] | None:
    """Counts, or None while the database refuses (right after dropping connections)."""
    try:
        return counts()
    except Exception:
        from worker.db import dispose_engines

        dispose_engines()
        return None


# ---------------------------------------------------------------------------------------
# The run


@dataclass
class Fault:
    kind: str
    at_sent: int
    in_flight: int  # sends that may be lost with this fault (bounded by the processes)
    detail: str = ""


@dataclass
class Report:
    planned: int = 0
    states: Counter[str] = field(default_factory=Counter)
    failed_reasons: Counter[str] = field(default_factory=Counter)
    unknown_reasons: Counter[str] = field(default_factory=Counter)
    faults: list[Fault] = field(default_factory=list)
    endpoint: dict[str, Any] = field(default_factory=dict)
    minutes_to_drain: float = 0.0
    drained: bool = False
    problems: list[str] = field(default_factory=list)
    targets: list[tuple[str, bool, str]] = field(default_factory=list)


def reason_of(text: str | None) -> str:
    """Group reasons: digits and ids out, so the same cause counts as one line."""
    if not text:
        return "(no reason)"
    text = re.sub(r"fake-[0-9a-f-]+|[0-9a-f]{8}-[0-9a-f-]{27}", "<id>", text)
    text = re.sub(r"https?://\S+", "<url>", text)
    return re.sub(r"\d+(\.\d+)?", "N", text)[:140]


def analyse(report: Report, max_attempts: int) -> None:
    from sqlalchemy import select

    from worker.db import session_scope
    from worker.models import Delivery, Subscriber

    per_recipient: dict[str, int] = report.endpoint.get("per_recipient", {})
    with session_scope() as s:
        rows = s.execute(
            select(
                Subscriber.email,
                Delivery.state,
                Delivery.last_error,
                Delivery.skip_reason,
                Delivery.attempts,
            ).join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        ).all()
    report.states = Counter(r.state for r in rows)
    for r in rows:
        copies = per_recipient.get(r.email, 0)
        if r.state in ("pending", "sending"):
            report.problems.append(f"{r.email}: still {r.state}")
        elif r.state == "sent" and copies != 1:
            report.problems.append(f"{r.email}: sent, but the endpoint accepted {copies} copies")
        elif r.state == "failed":
            report.failed_reasons[reason_of(r.last_error)] += 1
            if not r.last_error:
                report.problems.append(f"{r.email}: failed without a reason")
            elif copies:
                report.problems.append(f"{r.email}: failed, but the endpoint accepted it")
            elif not r.last_error.startswith("gave up after") or r.attempts < max_attempts:
                report.problems.append(f"{r.email}: failed before the attempts ran out")
        elif r.state == "unknown":
            report.unknown_reasons[reason_of(r.last_error)] += 1
            if not r.last_error:
                report.problems.append(f"{r.email}: unknown without a reason")
        elif r.state == "skipped" and not r.skip_reason:
            report.problems.append(f"{r.email}: skipped without a reason")


def judge(report: Report) -> None:
    duplicates = report.endpoint.get("duplicates", {})
    in_flight = sum(f.in_flight for f in report.faults)
    ambiguous = int(report.endpoint.get("ambiguous", 0))
    unknown = report.states["unknown"]
    no_terminal = [p for p in report.problems if "still" in p or "without a reason" in p]
    left = report.states["pending"] + report.states["sending"]
    could_go = [p for p in report.problems if p not in no_terminal]
    report.targets = [
        ("0 duplicates at the endpoint", not duplicates, f"{len(duplicates)} recipients"),
        (
            "0 deliveries without a terminal state and a reason",
            report.drained and not no_terminal,
            f"{len(no_terminal)} (drained: {'yes' if report.drained else 'NO'})",
        ),
        (
            "unknown <= sends in flight at the kills + ambiguous answers",
            unknown <= in_flight + ambiguous,
            f"{unknown} <= {in_flight} + {ambiguous}",
        ),
        (
            "every delivery that could go out went out",
            left == 0 and not could_go,
            f"pending {report.states['pending']}, sending {report.states['sending']}, "
            f"{len(could_go)} inconsistent rows",
        ),
    ]


def print_report(report: Report, args: argparse.Namespace) -> None:
    s = report.states
    stats = report.endpoint
    print()
    print("== chaos run")
    print(
        f"subscribers {args.subscribers}, {args.workers} workers x {args.concurrency}, rate "
        f"{args.rate}/s, faults {args.fault_rate:.0%} of requests ({args.faults}), "
        f"send timeout {args.send_timeout}s"
    )
    for f in report.faults:
        print(f"  fault at {f.at_sent:>6} sent: {f.kind:<22} in flight <= {f.in_flight} {f.detail}")
    print(f"planned            {report.planned}")
    print(f"sent               {s['sent']}")
    print(f"failed             {s['failed']}")
    for reason, n in report.failed_reasons.most_common():
        print(f"    {n:>6}  {reason}")
    print(f"unknown            {s['unknown']}")
    for reason, n in report.unknown_reasons.most_common():
        print(f"    {n:>6}  {reason}")
    print(f"skipped            {s['skipped']}")
    print(f"still pending      {s['pending']} (sending {s['sending']})")
    print(
        f"endpoint           {stats.get('requests', 0)} requests, {stats.get('accepted', 0)} "
        f"accepted, faults served {stats.get('faults', {})}"
    )
    print(f"duplicates         {len(stats.get('duplicates', {}))} at the endpoint")
    print(f"minutes to drain   {report.minutes_to_drain:.2f}")
    for line in report.problems[:10]:
        print(f"  ! {line}")
    if len(report.problems) > 10:
        print(f"  ! ... {len(report.problems) - 10} more")
    print("targets:")
    for name, ok, detail in report.targets:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")


def run(args: argparse.Namespace) -> Report:
    workdir = Path(tempfile.mkdtemp(prefix="papermail-chaos-"))
    say(f"working in {workdir}")
    report = Report()
    redis = RedisServer(workdir / "redis").start()
    db_name, db_url = create_database()
    ses_proc, ses_url = start_fake_ses(args, workdir)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PAPERMAIL_") or key.startswith("PAPERMAIL_TEST_")
    }
    env.update(
        {
            "PAPERMAIL_DATABASE_URL": db_url,
            "PAPERMAIL_BROKER_URL": redis.url,
            "PAPERMAIL_MAILER": "ses",
            "PAPERMAIL_POSTAL_ADDRESS": "Example Lab, 1 Main Street, Springfield, USA",
            "PAPERMAIL_SES_ENDPOINT_URL": ses_url,
            "PAPERMAIL_SES_REGION": "us-east-1",
            "PAPERMAIL_AWS_ACCESS_KEY_ID": "AKIACHAOS00000000000",
            "PAPERMAIL_AWS_SECRET_ACCESS_KEY": "chaos-secret-not-real-0123456789abcdef",
            "PAPERMAIL_SECRET_KEY": SECRET,
            "PAPERMAIL_BASE_URL": "https://papermail.example",
            "PAPERMAIL_FROM_ADDRESS": "papermail <digest@papermail.example>",
            "PAPERMAIL_SEND_RATE": str(args.rate),
            "PAPERMAIL_CHUNK_SIZE": str(args.chunk_size),
            "PAPERMAIL_MAX_ATTEMPTS": str(args.max_attempts),
            "PAPERMAIL_RETRY_BASE_SECONDS": "1",
            "PAPERMAIL_SEND_TIMEOUT_SECONDS": str(args.send_timeout),
            "PAPERMAIL_SENDING_TIMEOUT_SECONDS": "30",  # the smallest allowed
            "PAPERMAIL_SWEEP_INTERVAL_SECONDS": str(args.sweep_seconds),
            "PAPERMAIL_OUTBOX_DIR": str(workdir / "outbox"),
            # The beat must not fetch papers from the internet: the edition is planned
            # with enqueue_edition over the papers the run inserts.
            "PAPERMAIL_SOURCES": "",
        }
    )
    os.environ.clear()
    os.environ.update(env)
    os.chdir(workdir)  # settings also read ./.env: not the caller's
    from worker import config, migrate, tasks
    from worker.db import dispose_engines

    config.reset_settings()
    dispose_engines()
    settings = config.get_settings()
    workers = [Worker(f"w{i}", args.concurrency, env, workdir) for i in range(args.workers)]
    beat: subprocess.Popen[bytes] | None = None
    try:
        migrate.upgrade()
        seed(args.subscribers)
        for worker in workers:
            worker.start()
        beat = start_beat(env, workdir)
        say(f"{args.workers} workers and the beat up; planning the edition")
        started = time.monotonic()
        plan = tasks.enqueue_edition(datetime.now(UTC).date())
        report.planned = len(plan.pending_ids)
        say(f"planned {report.planned}")

        # The faults, spread over the edition by progress (share of planned sent).
        events: list[tuple[float, str]] = [
            (0.15 + 0.6 * i / max(1, args.worker_kills), "worker") for i in range(args.worker_kills)
        ]
        events += [
            (0.3 + 0.3 * i / max(1, args.redis_kills), "redis") for i in range(args.redis_kills)
        ]
        events += [(0.5 + 0.3 * i / max(1, args.db_drops), "db") for i in range(args.db_drops)]
        events.sort()
        rng = random.Random(args.seed)
        total_processes = args.workers * args.concurrency
        # Each pool process keeps up to settings.concurrency sends in flight (one batch).
        per_process = settings.concurrency
        deadline = time.monotonic() + args.timeout
        last_progress = time.monotonic()
        while True:
            current = safe_counts()
            if current is None:
                time.sleep(0.5)
                continue
            done = current["sent"] + current["failed"] + current["unknown"] + current["skipped"]
            if events and done >= events[0][0] * report.planned:
                _, kind = events.pop(0)
                sending = current["sending"]
                if kind == "worker":
                    victim = rng.choice(workers)
                    victim.kill9()
                    report.faults.append(
                        Fault(
                            "kill -9 worker",
                            done,
                            min(sending, victim.concurrency * per_process),
                            victim.name,
                        )
                    )
                    say(f"kill -9 {victim.name} ({current['sent']} sent); restarting it")
                    victim.start()
                elif kind == "redis":
                    redis.kill9()
                    say(f"Redis killed ({current['sent']} sent); restarting it empty in 5 s")
                    time.sleep(5)
                    redis.start()
                    report.faults.append(Fault("Redis killed, empty", done, 0, "down 5 s"))
                else:
                    dropped = drop_connections(db_name)
                    dispose_engines()
                    report.faults.append(
                        Fault(
                            "DB connections dropped",
                            done,
                            min(sending, total_processes * per_process),
                            f"{dropped} connections",
                        )
                    )
                    say(f"dropped {dropped} database connections ({current['sent']} sent)")
                continue
            if not events and current["pending"] == 0 and current["sending"] == 0:
                report.drained = True
                break
            if time.monotonic() > deadline:
                say(f"not drained after {args.timeout} s: {dict(current)}")
                break
            if time.monotonic() - last_progress > 10:
                last_progress = time.monotonic()
                say(f"{dict(current)}")
            time.sleep(0.5)
        report.minutes_to_drain = (time.monotonic() - started) / 60
        report.endpoint = endpoint_stats(ses_url)
        analyse(report, settings.max_attempts)
        judge(report)
    finally:
        for worker in workers:
            worker.stop()
        if beat is not None and beat.poll() is None:
            beat.terminate()
            beat.wait(timeout=15)
        ses_proc.terminate()
        ses_proc.wait(timeout=10)
        redis.stop()
        dispose_engines()
        if args.keep:
            say(f"kept database {db_name} and logs in {workdir}")
        else:
            drop_database(db_name)
    return report


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes per worker")
    parser.add_argument("--rate", type=float, default=400.0, help="PAPERMAIL_SEND_RATE")
    parser.add_argument("--chunk-size", type=int, default=50)
    parser.add_argument("--max-attempts", type=int, default=5)
    parser.add_argument("--fault-rate", type=float, default=0.15, help="share of requests")
    parser.add_argument("--faults", default="throttle,internal,reset,slow")
    parser.add_argument("--send-timeout", type=float, default=2.0, help="SEND_TIMEOUT_SECONDS")
    parser.add_argument("--sweep-seconds", type=int, default=3, help="SWEEP_INTERVAL_SECONDS")
    parser.add_argument("--worker-kills", type=int, default=3)
    parser.add_argument("--redis-kills", type=int, default=1)
    parser.add_argument("--db-drops", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the drain")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--keep", action="store_true", help="keep the database and the logs")
    args = parser.parse_args(argv)
    if args.subscribers < 1 or not 0 <= args.fault_rate <= 1:
        parser.error("--subscribers must be >= 1 and --fault-rate within 0..1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    report = run(args)
    print_report(report, args)
    return 0 if all(ok for _, ok, _ in report.targets) else 1


if __name__ == "__main__":
    sys.exit(main())
