#!/usr/bin/env python3
"""Benchmark: one edition for many subscribers through real Redis, Celery workers, PostgreSQL.

    python bench/pipeline.py                          # 100,000 subscribers, 2 workers x 1
    python bench/pipeline.py --subscribers 20000 --workers 1 --concurrency 2
    python bench/pipeline.py --profile-only           # just where one chunk's time goes

What runs is the production path: `enqueue_edition` plans the edition in PostgreSQL and
enqueues chunk tasks on Redis; `celery worker` processes (started by this script, `worker`
subcommand) select, render, claim, take a token from the shared Redis bucket, "send" and
record. The provider call is excluded: the workers' mailer only counts (a bench-only
mailer, patched into the worker processes; it is not a product setting). The send rate is
set far above what the machine can do, so the bucket is consulted but never waits.

Prints emails per second (end to end, and steady state), CPU milliseconds per email (the
worker processes, and the whole machine including PostgreSQL and Redis), peak RSS per worker
process, and where one chunk's time goes (cProfile of `process_deliveries`, in-process).
Needs a local PostgreSQL (PAPERMAIL_TEST_POSTGRES_URL or postgres@127.0.0.1) and Redis.
Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG_ADMIN = os.environ.get(
    "PAPERMAIL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_SERVER = os.environ.get("PAPERMAIL_TEST_REDIS_URL", "redis://127.0.0.1:6379")
TOPICS = [
    "diffusion models", "neural networks", "graphical models", "pruning", "gaussian processes",
    "reinforcement learning", "deep learning", "variational inference", "image compression",
    "compressed sensing", "representation learning", "video stabilization", "unlearning",
    "kernel methods", "active learning", "graph neural networks", "verification",
]  # fmt: skip
CLK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------
# The counting mailer (bench only) and the worker subcommand


class CountingMailer:
    """Accepts every message at once; the provider call is what the benchmark excludes."""

    name = "counting"

    def __init__(self) -> None:
        self.count = 0

    def send(self, message: Any) -> Any:
        from worker.mailers.base import SendResult

        self.count += 1
        return SendResult(message.message_id)

    def close(self) -> None:
        pass


def run_worker(argv: list[str]) -> None:
    """`celery -A worker.tasks worker ...` with the counting mailer in every pool process."""
    import worker.mailers.base as base

    mailer = CountingMailer()
    base.get_mailer = lambda settings=None: mailer  # type: ignore[assignment]
    from worker.tasks import app

    app.worker_main(["worker", *argv])


# ---------------------------------------------------------------------------------------
# Set-up: a fresh PostgreSQL database, papers, subscribers


def lease_redis_db() -> tuple[str, Any]:
    """A Redis database (1-15) no test run is using, leased like tests/conftest.py does."""
    import redis

    admin = redis.Redis.from_url(f"{REDIS_SERVER}/0")
    token = f"bench-{os.getpid()}-{uuid.uuid4().hex}"
    for number in range(15, 0, -1):
        if admin.set(f"papermail:test-lease:{number}", token, nx=True, ex=3600):
            url = f"{REDIS_SERVER}/{number}"
            redis.Redis.from_url(url).flushdb()
            key = f"papermail:test-lease:{number}"
            return url, lambda key=key: admin.delete(key)
    raise SystemExit("every Redis database 1-15 is leased by a test run; try again later")


def create_database() -> str:
    import psycopg

    admin = PG_ADMIN.replace("postgresql+psycopg://", "postgresql://")
    name = f"papermail_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"


def drop_database(url: str) -> None:
    import psycopg

    admin = PG_ADMIN.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def seed(n_subscribers: int, n_papers: int, rng: random.Random) -> None:
    import json

    from sqlalchemy import insert

    from worker.db import session_scope
    from worker.models import Paper, Subscriber
    from worker.resources import data_dir

    midnight = datetime.combine(datetime.now(UTC).date(), datetime.min.time(), tzinfo=UTC)
    samples = [
        json.loads(x) for x in (data_dir() / "sample_papers.jsonl").read_text().split("\n") if x
    ]
    papers = []
    for n in range(n_papers):
        sample = samples[n % len(samples)]
        sentences = sample["abstract"].split(". ")
        rng.shuffle(sentences)
        extra = "" if n < len(samples) else f" ({TOPICS[n % len(TOPICS)]})"
        papers.append(
            {
                "id": f"2611.{n:05d}",
                "title": sample["title"] + extra,
                "abstract": ". ".join(sentences),
                "authors": sample.get("authors") or ["Ada Lovelace"],
                "upvotes": int(rng.paretovariate(1.2) * 5),
                "published_at": midnight - timedelta(hours=rng.uniform(0.5, 47)),
                "ingested_at": midnight - timedelta(hours=1),
                "updated_at": midnight,
                "source": "jsonl",
                "url": f"https://huggingface.co/papers/2611.{n:05d}",
            }
        )
    now = datetime.now(UTC)
    with session_scope() as s:
        s.execute(insert(Paper), papers)
        for start in range(0, n_subscribers, 5000):
            s.execute(
                insert(Subscriber),
                [
                    {
                        "email": f"reader{n:06d}@example.org",
                        "status": "active",
                        "topics": rng.sample(TOPICS, rng.choice([1, 2, 2, 3])),
                        "max_papers": rng.choice([3, 5, 5, 8, 10]),
                        "frequency": "daily",
                        "send_hour": 0,
                        "timezone": "UTC",
                        "source": "bench",
                        "created_at": now,
                        "updated_at": now,
                    }
                    for n in range(start, min(n_subscribers, start + 5000))
                ],
            )


def seed_history(days: int) -> None:
    """Earlier editions, already sent: a list in service has history (and statistics).

    Each carried five of the current papers, so today's selection must exclude them, as it
    would the day after a real edition. ANALYZE afterwards, as autovacuum would have.
    """
    from sqlalchemy import text

    from worker.db import get_engine, session_scope

    today = datetime.now(UTC).date()
    with session_scope() as s:
        for back in range(1, days + 1):
            day = today - timedelta(days=back)
            stamp = datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=1)
            params = {"d": day, "t": stamp}
            s.execute(
                text(
                    "INSERT INTO deliveries (subscriber_id, edition_date, state, attempts,"
                    " scheduled_at, created_at, updated_at, claimed_at, sent_at, finished_at,"
                    " message_id) SELECT id, :d, 'sent', 1, :t, :t, :t, :t, :t, :t,"
                    " 'history-' || id || '-' || :d FROM subscribers"
                ),
                params,
            )
            s.execute(
                text(
                    "INSERT INTO delivery_attempts (delivery_id, kind, started_at, finished_at,"
                    " outcome, message_id) SELECT id, 'send', :t, :t, 'sent', message_id"
                    " FROM deliveries WHERE edition_date = :d"
                ),
                params,
            )
            s.execute(
                text(
                    "INSERT INTO delivery_papers (delivery_id, paper_id, position, score)"
                    " SELECT d.id, p.id, p.pos, 0 FROM deliveries d CROSS JOIN LATERAL"
                    " (SELECT id, row_number() OVER () - 1 AS pos FROM (SELECT id FROM papers"
                    "  ORDER BY md5(papers.id || d.id::text) LIMIT 5) AS pick) AS p"
                    " WHERE d.edition_date = :d"
                ),
                params,
            )
    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))


# ---------------------------------------------------------------------------------------
# Measuring


def proc_children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def proc_cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK  # utime + stime


def proc_peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def pids_named(*names: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in names:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def cpu_by_pid(*names: str) -> dict[int, float]:
    return {p: proc_cpu_seconds(p) or 0.0 for p in pids_named(*names)}


def cpu_since(before: dict[int, float], *names: str) -> float:
    """CPU used since ``before`` by processes of these names (new ones count from zero)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in cpu_by_pid(*names).items())


def machine_busy_seconds() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLK


class Sampler(threading.Thread):
    """Samples CPU time and peak RSS of every worker process (main and pool) twice a second."""

    def __init__(self, mains: list[int]) -> None:
        super().__init__(daemon=True)
        self.mains = mains
        self.cpu: dict[int, float] = {}
        self.base: dict[int, float] = {}
        self.rss: dict[int, float] = {}
        self.role: dict[int, str] = {}
        self.stop = threading.Event()

    def sample(self) -> None:
        for main in self.mains:
            for pid in [main, *proc_children(main)]:
                self.role.setdefault(pid, "main" if pid == main else "pool")
                cpu, rss = proc_cpu_seconds(pid), proc_peak_rss_mb(pid)
                if cpu is not None:
                    self.cpu[pid] = cpu
                if rss is not None:
                    self.rss[pid] = max(rss, self.rss.get(pid, 0.0))

    def mark(self) -> None:
        self.sample()
        self.base = dict(self.cpu)

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.sample()

    def used(self) -> float:
        return sum(cpu - self.base.get(pid, 0.0) for pid, cpu in self.cpu.items())


# ---------------------------------------------------------------------------------------
# Where one chunk's time goes


BUCKETS = [
    ("selection", ("worker/selection.py", "numpy", "scipy")),
    ("rendering", ("worker/rendering.py", "jinja2", "markupsafe", "/email/", "worker/links.py",
                   "itsdangerous", "worker/message.py", "hmac", "hashlib")),
    ("db", ("sqlalchemy", "psycopg")),
    ("limiter", ("worker/ratelimit.py", "redis")),
    ("mailer", ("bench/pipeline.py",)),
    ("delivery", ("worker/delivery.py",)),
]  # fmt: skip
PHASES = [
    ("prepare_messages", "load + skip checks + selection + rendering"),
    ("select_for_subscribers", "  selection (incl. its SQL)"),
    ("render_digest", "  rendering"),
    ("_claim", "claim (UPDATE)"),
    ("_record_sent", "record sent (UPDATE + attempt row)"),
    ("commit", "commits"),
    ("try_acquire", "rate-limit token, non-blocking (Redis)"),
    ("acquire", "rate-limit token, waiting (Redis)"),
    ("send", "mailer.send (counting)"),
]


def profile_chunk(ids: list[int]) -> tuple[float, str]:
    from worker import delivery
    from worker.config import get_settings
    from worker.ratelimit import get_limiter

    settings = get_settings()
    limiter = get_limiter(settings)
    mailer = CountingMailer()
    delivery.process_deliveries(ids[:1], settings=settings, mailer=mailer, limiter=limiter)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    out = delivery.process_deliveries(ids[1:], settings=settings, mailer=mailer, limiter=limiter)
    profiler.disable()
    wall = time.perf_counter() - start
    n = out.sent or 1
    stats = pstats.Stats(profiler)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in raw.values())
    by_bucket: dict[str, float] = defaultdict(float)
    for (filename, _line, _name), (_cc, _nc, tt, _ct, _callers) in raw.items():
        bucket = next((b for b, keys in BUCKETS if any(k in filename for k in keys)), "other")
        by_bucket[bucket] += tt
    lines = [f"one chunk of {len(ids) - 1} in-process: {out.sent} sent, {wall * 1000:.0f} ms "
             f"wall, {wall / n * 1000:.2f} ms per email (profiler overhead included)",
             "  own time by layer (tottime):"]  # fmt: skip
    for bucket, seconds in sorted(by_bucket.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {bucket:<10} {seconds / n * 1000:7.3f} ms/email  {seconds / total:6.1%}")
    lines.append("  phases (cumulative time):")
    for func, label in PHASES:
        cum = sum(
            ct
            for (filename, _line, name), (_cc, _nc, _tt, ct, _callers) in raw.items()
            if name == func and ("worker/" in filename or "bench/" in filename
                                 or (func == "commit" and "orm/session.py" in filename))
        )  # fmt: skip
        lines.append(f"    {label:<44} {cum / n * 1000:7.3f} ms/email")
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(15)
    top = "\n".join(
        line
        for line in buf.getvalue().splitlines()
        if line.strip() and "function calls" not in line
    )
    return wall / n, "\n".join(lines) + "\n  top functions by own time:\n" + top


# ---------------------------------------------------------------------------------------


def main() -> int:
    if sys.argv[1:2] == ["worker"]:
        run_worker(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=100_000)
    parser.add_argument("--papers", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2, help="celery worker processes")
    parser.add_argument("--concurrency", type=int, default=1, help="pool processes per worker")
    parser.add_argument("--chunk-size", type=int, default=200)
    parser.add_argument(
        "--history-days",
        type=int,
        default=1,
        help="earlier editions already sent (0: the very first edition on an empty database)",
    )
    parser.add_argument("--profile-only", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args()

    redis_url, release_redis = lease_redis_db()
    db_url = create_database()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAPERMAIL_")},
        "PAPERMAIL_DATABASE_URL": db_url,
        "PAPERMAIL_BROKER_URL": redis_url,
        "PAPERMAIL_SEND_RATE": "1000000",
        "PAPERMAIL_CHUNK_SIZE": str(args.chunk_size),
        "PAPERMAIL_BASE_URL": "https://papermail.example.org",
        "PAPERMAIL_OUTBOX_DIR": "/tmp/papermail-bench-outbox-unused",
    }
    os.environ.update(env)
    from worker import config, migrate, tasks
    from worker.db import session_scope
    from worker.models import Delivery

    config.reset_settings()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        migrate.upgrade()
        t0 = time.perf_counter()
        seed(args.subscribers, args.papers, random.Random(20261127))
        seed_history(args.history_days)
        print(f"seeded {args.subscribers} subscribers, {args.papers} papers, "
              f"{args.history_days} earlier editions "
              f"in {time.perf_counter() - t0:.1f} s")  # fmt: skip

        # Where one chunk's time goes (in this process, before the workers start).
        from sqlalchemy import func, select, text

        from worker import delivery

        edition = datetime.now(UTC).date()
        with session_scope() as s:
            probe = delivery.plan_edition(s, edition, subscriber_ids=range(1, args.chunk_size + 2))
        _, report = profile_chunk(probe.pending_ids)
        print(report)
        if args.profile_only:
            return 0

        logdir = Path("/tmp/papermail-bench-logs")
        logdir.mkdir(exist_ok=True)
        for w in range(args.workers):
            with (logdir / f"w{w}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, __file__, "worker", "-Q", "plan,send",
                         "--concurrency", str(args.concurrency), "-n", f"bench{w}@%h",
                         "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
                         "--without-heartbeat"],
                        env={**os.environ}, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )  # fmt: skip
        time.sleep(6)  # let the workers boot and fork their pools
        sampler = Sampler([p.pid for p in procs])
        sampler.start()
        sampler.mark()
        busy0 = machine_busy_seconds()
        pg0, redis0 = cpu_by_pid("postgres"), cpu_by_pid("redis-server")

        t_enqueue = time.perf_counter()
        plan = tasks.enqueue_edition(edition)
        t_planned = time.perf_counter()
        n = len(plan.pending_ids)
        print(f"planned {plan.created} deliveries, enqueued {n} in chunks of "
              f"{args.chunk_size}: {t_planned - t_enqueue:.1f} s")  # fmt: skip
        last, last_t = -1, time.perf_counter()
        while True:
            time.sleep(2)
            with session_scope() as s:
                waiting = s.scalar(
                    select(func.count())
                    .select_from(Delivery)
                    .where(Delivery.state.in_(("pending", "sending")))
                )
            done = n - (waiting or 0)
            elapsed = time.perf_counter() - t_enqueue
            print(f"  {elapsed:6.1f} s  {done:>7} / {n}", flush=True)
            if not waiting:
                break
            if done == last and time.perf_counter() - last_t > 60:
                print("no progress for 60 s; stopping")
                break
            if done != last:
                last, last_t = done, time.perf_counter()
        t_done = time.perf_counter()
        sampler.sample()
        sampler.stop.set()
        busy = machine_busy_seconds() - busy0
        # Backends that exited meanwhile are missed: PostgreSQL's figure is a lower bound.
        pg_cpu = cpu_since(pg0, "postgres")
        redis_cpu = cpu_since(redis0, "redis-server")

        with session_scope() as s:
            sent = s.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.state == "sent", Delivery.edition_date == edition)
            )
            stamps = sorted(
                s.scalars(
                    select(Delivery.sent_at).where(
                        Delivery.sent_at.is_not(None), Delivery.edition_date == edition
                    )
                )
            )
        stamps = [t for t in stamps if t]
        body = stamps[len(stamps) // 10 : len(stamps) * 9 // 10]
        steady = (len(body) - 1) / (body[-1] - body[0]).total_seconds() if len(body) > 1 else 0
        total = t_done - t_enqueue
        per = 1000 / max(sent, 1)
        pools = [pid for pid, role in sampler.role.items() if role == "pool"]
        print()
        print(
            f"emails sent: {sent} of {n} planned ({args.workers} workers x "
            f"{args.concurrency} processes, chunk {args.chunk_size})"
        )
        print(
            f"end to end (plan + enqueue + send, poll granularity 2 s): {total:.1f} s "
            f"-> {sent / total:.0f} emails/s"
        )
        print(f"steady state (sent_at of the middle 80%): {steady:.0f} emails/s")
        print(
            f"CPU per email: workers {sampler.used() * per:.2f} ms, PostgreSQL "
            f"{pg_cpu * per:.2f} ms, Redis {redis_cpu * per:.2f} ms; whole machine "
            f"(everything, this script included) {busy * per:.2f} ms"
        )
        print(
            "peak RSS per worker process: "
            + ", ".join(
                f"{sampler.role[p]} {sampler.rss.get(p, 0):.0f} MB" for p in sorted(sampler.rss)
            )
        )
        peak = max((sampler.rss.get(p, 0) for p in pools), default=0)
        print(f"  (pool processes: max {peak:.0f} MB)")
        with session_scope() as s:
            rows = s.execute(
                text(
                    "SELECT relname, seq_scan, seq_tup_read, idx_scan, n_tup_upd, n_tup_hot_upd,"
                    " autovacuum_count FROM pg_stat_user_tables WHERE relname IN"
                    " ('deliveries', 'delivery_attempts', 'delivery_papers', 'subscribers',"
                    " 'papers') ORDER BY relname"
                )
            ).all()
        print("PostgreSQL tables (whole run): seq scans / rows read, index scans, updates (HOT)")
        for name, seq, seq_rows, idx, upd, hot, vac in rows:
            print(
                f"  {name:<18} {seq or 0:>6} / {seq_rows or 0:>9}  {idx or 0:>8}  "
                f"{upd or 0:>7} ({hot or 0} HOT)  autovacuum {vac or 0}"
            )
        return 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        from worker.db import dispose_engines

        dispose_engines()
        import redis

        redis.Redis.from_url(redis_url).flushdb()
        release_redis()
        if not args.keep:
            drop_database(db_url)
        else:
            print(f"kept {db_url}")


if __name__ == "__main__":
    sys.exit(main())
