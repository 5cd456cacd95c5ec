#!/usr/bin/env python3
"""Headline benchmark: one edition through the real stack, against the bare boto3 floor.

    python bench/send.py                                  # 20,000 subscribers, 30 ms and 0 ms
    python bench/send.py --latency 0.03 --subscribers 5000 --no-kill

What runs: a PostgreSQL database of its own, a redis-server of its own (so its CPU is this
run's), the Procfile's `worker` command (`celery -A worker.tasks worker ...`, default
settings except ``PAPERMAIL_SEND_RATE``, set above what the machine can do), the real SES
mailer (boto3 over HTTP) against the SES-compatible server of tests/integration/fake_ses.py
in its own process, answering after ``--latency`` and counting messages per recipient.
The edition is planned and enqueued the way `papermail digest run` does it.

In the same run, per latency, the floor: bare ``sesv2.send_email`` calls from several
processes x threads (enough to saturate the machine) against the same server, with a
digest-sized message.

Prints, per latency: emails/s of papermail end to end (first enqueue to last delivery
final) and of the floor, the ratio, CPU ms per email of the workers, of PostgreSQL (the
backends of this run's database) and of Redis, peak RSS per worker process, and the
duplicates the server counted. Then (``--kill``, default on) a kill -9 of the whole worker
at full rate, a restart and the recovery sweep: ``unknown`` must stay within the in-flight
limit of the killed processes (pool processes x sends in flight), 0 duplicates.

Needs a local PostgreSQL (PAPERMAIL_TEST_POSTGRES_URL or postgres@127.0.0.1) and the
redis-server binary. Run by hand, not in CI; the machine should be otherwise idle (the
report prints the load average seen).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import (  # noqa: E402
    create_database,
    drop_database,
    proc_children,
    proc_cpu_seconds,
    proc_peak_rss_mb,
    seed,
)
from ses_send import KEY_ID, SECRET, bare_client, digest_message  # noqa: E402

FAKE_SES = ROOT / "tests" / "integration" / "fake_ses.py"


# ---------------------------------------------------------------------------------------
# Services of this run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


class Endpoint:
    """The SES-compatible server in its own process."""

    def __init__(self, latency: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE_SES), "--port", "0", "--latency", str(latency),
             "--count-only"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()

    def stats(self) -> dict[str, Any]:
        """Counters of the server; ``duplicates``: recipients sent more than one copy."""
        with urllib.request.urlopen(self.url + "/_fake/stats", timeout=10) as answer:
            stats = json.loads(answer.read())
        stats["duplicates"] = len(stats["duplicates"])
        return stats

    def reset(self) -> None:
        urllib.request.urlopen(
            urllib.request.Request(self.url + "/_fake/reset", data=b"", method="POST"), timeout=10
        ).close()

    def cpu(self) -> float:
        return proc_cpu_seconds(self.proc.pid) or 0.0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------
# The floor: bare boto3, processes x threads


def _floor_process(url: str, sends: int, threads: int, start: Any) -> tuple[float, float]:
    client = bare_client(url, 20.0)
    messages = [digest_message(i) for i in range(64)]

    def one(k: int) -> None:
        m = messages[k % len(messages)]
        client.send_email(
            FromEmailAddress=m.sender,
            Destination={"ToAddresses": [m.recipient]},
            Content={"Raw": {"Data": m.raw}},
            EmailTags=[{"Name": n, "Value": v} for n, v in m.tags.items()],
        )

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(threads * 2)))  # warm: connections, botocore's caches
        start.wait()
        cpu0 = time.process_time()
        list(pool.map(one, range(sends)))
        return time.process_time() - cpu0, time.perf_counter()


def floor(url: str, total: int, processes: int, threads: int) -> dict[str, float]:
    ctx = multiprocessing.get_context("fork")
    start = ctx.Manager().Event()
    with ctx.Pool(processes) as pool:
        jobs = [
            pool.apply_async(_floor_process, (url, total // processes, threads, start))
            for _ in range(processes)
        ]
        time.sleep(2.0)  # every process warmed up and waiting
        t0 = time.perf_counter()
        start.set()
        results = [job.get(timeout=3600) for job in jobs]
    elapsed = max(end for _, end in results) - t0
    sent = processes * (total // processes)
    return {
        "rate": sent / elapsed,
        "cpu_ms": 1000 * sum(cpu for cpu, _ in results) / sent,
    }


# ---------------------------------------------------------------------------------------
# papermail: the Procfile's worker command


def procfile_worker_argv() -> list[str]:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("worker:"):
            return ["bash", "-c", "exec " + line.split(":", 1)[1].strip()]
    raise SystemExit("Procfile has no worker line")


class Worker:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                procfile_worker_argv(), env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=ROOT,
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while "ready." not in log.read_text(errors="replace"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"worker did not start; see {log}")
            time.sleep(0.2)
        self.cpu: dict[int, float] = {}
        self.rss: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, daemon=True)
        self._thread.start()

    def pids(self) -> list[int]:
        return [self.proc.pid, *proc_children(self.proc.pid)]

    def pool_pids(self) -> list[int]:
        return proc_children(self.proc.pid)

    def sample(self) -> None:
        for pid in self.pids():
            cpu = proc_cpu_seconds(pid)
            rss = proc_peak_rss_mb(pid)
            if cpu is not None:
                self.cpu[pid] = cpu
            if rss is not None:
                self.rss[pid] = rss

    def _sample_loop(self) -> None:
        while not self._stop.wait(0.5):
            self.sample()

    def cpu_total(self) -> float:
        self.sample()
        return sum(self.cpu.values())

    def kill9(self) -> None:
        self._stop.set()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


# The application_name of the benchmark's own PostgreSQL connections (libpq's PGAPPNAME,
# set in main and not passed to the worker), left out of PostgreSQL's CPU per email.
BENCH_APP = "papermail-bench"


def pg_backend_cpu(db_name: str) -> dict[int, float]:
    """CPU seconds of the PostgreSQL backends serving this run's database."""
    from sqlalchemy import text

    from worker.db import session_scope

    with session_scope() as s:
        pids = s.scalars(
            # Not the benchmark's own connections (PGAPPNAME): its polling is not papermail's.
            text(
                "SELECT pid FROM pg_stat_activity WHERE datname = :d"
                " AND application_name IS DISTINCT FROM :bench"
            ),
            {"d": db_name, "bench": BENCH_APP},
        ).all()
    return {pid: proc_cpu_seconds(pid) or 0.0 for pid in pids}


class PgSampler(threading.Thread):
    """Keeps the last CPU reading of every backend of the database (they come and go)."""

    def __init__(self, db_name: str) -> None:
        super().__init__(daemon=True)
        self.db_name = db_name
        self.cpu: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.cpu.update(pg_backend_cpu(self.db_name))

    def total(self) -> float:
        self.cpu.update(pg_backend_cpu(self.db_name))
        return sum(self.cpu.values())


def counts() -> dict[str, int]:
    from sqlalchemy import func, select

    from worker.db import session_scope
    from worker.models import Delivery

    with session_scope() as s:
        return {
            str(k): int(v)
            for k, v in s.execute(
                select(Delivery.state, func.count()).group_by(Delivery.state)
            ).all()
        }


def final(c: dict[str, int], n: int) -> bool:
    return sum(c.values()) >= n and not c.get("pending") and not c.get("sending")


def reset_deliveries() -> None:
    from sqlalchemy import text

    from worker.db import session_scope

    with session_scope() as s:
        s.execute(text("DELETE FROM delivery_attempts"))
        s.execute(text("DELETE FROM delivery_papers"))
        s.execute(text("DELETE FROM deliveries"))
        s.execute(text("DELETE FROM control_flags"))
    analyze()


def analyze() -> None:
    """What autovacuum does to a table in service: the run after a reset must not meet a
    table of dead rows without statistics (its plans are not what production sees)."""
    from sqlalchemy import text

    from worker.db import get_engine

    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))


def wait(what: str, check: Any, timeout: float, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def papermail_run(
    env: dict[str, str], endpoint: Endpoint, n: int, logs: Path, db_name: str, redis: Any
) -> dict[str, Any]:
    from worker import tasks
    from worker.models import utcnow

    reset_deliveries()
    endpoint.reset()
    worker = Worker(env, logs / "worker.log")
    try:
        time.sleep(1.0)
        pg = PgSampler(db_name)
        pg.start()
        w0, pg0, r0 = worker.cpu_total(), pg.total(), proc_cpu_seconds(redis.pid) or 0.0
        t0 = time.perf_counter()
        tasks.enqueue_edition(utcnow().date())
        # The server's counter first (cheap), then the database: a count of the whole
        # edition five times a second would load PostgreSQL and the box for the floor's
        # competitor alone.
        wait("every email at the server", lambda: endpoint.stats()["accepted"] >= n, 3600)
        wait("every delivery final", lambda: final(counts(), n), timeout=3600, interval=0.2)
        elapsed = time.perf_counter() - t0
        w1, pg1, r1 = worker.cpu_total(), pg.total(), proc_cpu_seconds(redis.pid) or 0.0
        pg.stop.set()
        pool_rss = [worker.rss.get(pid, 0.0) for pid in worker.pool_pids()]
        c = counts()
    finally:
        worker.stop()
    stats = endpoint.stats()
    return {
        "rate": c.get("sent", 0) / elapsed,
        "elapsed": elapsed,
        "counts": c,
        "worker_cpu_ms": 1000 * (w1 - w0) / n,
        "pg_cpu_ms": 1000 * (pg1 - pg0) / n,
        "redis_cpu_ms": 1000 * (r1 - r0) / n,
        "peak_rss_mb": max(pool_rss or [0.0]),
        "main_rss_mb": worker.rss.get(worker.proc.pid, 0.0),
        "accepted": stats["accepted"],
        "duplicates": stats["duplicates"],
    }


def kill_run(env: dict[str, str], endpoint: Endpoint, n: int, logs: Path) -> dict[str, Any]:
    from worker import tasks
    from worker.config import get_settings
    from worker.models import utcnow

    reset_deliveries()
    endpoint.reset()
    doomed = Worker(env, logs / "doomed.log")
    processes = len(doomed.pool_pids())
    tasks.enqueue_edition(utcnow().date())
    wait(
        "a third sent", lambda: endpoint.stats()["accepted"] >= n // 3, timeout=3600, interval=0.02
    )
    doomed.kill9()
    at_kill = counts()
    rescuer = Worker(env, logs / "rescuer.log")
    try:

        def idle() -> bool:
            first = counts()
            time.sleep(1.0)
            return tasks.send_queue_size() == 0 and counts() == first

        wait("the queue drained", idle, timeout=3600, interval=0)
        settings = get_settings()
        later = utcnow() + timedelta(seconds=settings.sending_timeout_seconds + 1)
        recovery = tasks.recover(now=later)
        wait("every delivery final", lambda: final(counts(), n), timeout=3600, interval=0.2)
    finally:
        rescuer.stop()
    c = counts()
    stats = endpoint.stats()
    limit = processes * get_settings().concurrency
    return {
        "at_kill": at_kill,
        "counts": c,
        "unknown": c.get("unknown", 0),
        "limit": limit,
        "recovery_unknown": recovery.unknown,
        "accepted": stats["accepted"],
        "duplicates": stats["duplicates"],
        "ok": c.get("unknown", 0) <= limit
        and stats["duplicates"] == 0
        and c.get("sent", 0) + c.get("unknown", 0) == n,
    }


# ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=20_000)
    parser.add_argument(
        "--latency", type=float, action="append", help="provider latency, s (repeatable)"
    )
    parser.add_argument("--send-rate", default="100000", help="PAPERMAIL_SEND_RATE")
    parser.add_argument("--floor-processes", type=int, default=4)
    parser.add_argument("--floor-threads", type=int, default=16)
    parser.add_argument("--no-kill", action="store_true")
    parser.add_argument("--env", action="append", default=[], help="extra NAME=VALUE")
    args = parser.parse_args()
    latencies = args.latency or [0.03, 0.0]
    n = args.subscribers

    tmp = Path(tempfile.mkdtemp(prefix="papermail-send-bench-"))
    redis_proc, redis_url = start_redis(tmp)
    db_url = create_database()
    db_name = db_url.rsplit("/", 1)[1]
    results: list[dict[str, Any]] = []
    kill: dict[str, Any] | None = None
    loads: list[float] = []
    try:
        base = {
            "PAPERMAIL_DATABASE_URL": db_url,
            "PAPERMAIL_BROKER_URL": redis_url,
            "PAPERMAIL_MAILER": "ses",
            "PAPERMAIL_POSTAL_ADDRESS": "Example Lab, 1 Main Street, Springfield, USA",
            "PAPERMAIL_AWS_ACCESS_KEY_ID": KEY_ID,
            "PAPERMAIL_AWS_SECRET_ACCESS_KEY": SECRET,
            "PAPERMAIL_SECRET_KEY": "bench-secret-key-0123456789abcdefghijklmnop",
            "PAPERMAIL_BASE_URL": "https://papermail.example.org",
            "PAPERMAIL_FROM_ADDRESS": "papermail <digest@papermail.example.org>",
            "PAPERMAIL_SEND_RATE": args.send_rate,
        }
        for item in args.env:
            name, _, value = item.partition("=")
            base[name] = value
        for key in list(os.environ):
            if key.startswith("PAPERMAIL_"):
                del os.environ[key]
        os.environ.update(base)
        os.environ["PGAPPNAME"] = BENCH_APP
        # The Procfile's `celery` is this interpreter's (the virtualenv's).
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        from worker import migrate
        from worker.config import get_settings, reset_settings

        for latency in latencies:
            endpoint = Endpoint(latency)
            os.environ["PAPERMAIL_SES_ENDPOINT_URL"] = endpoint.url
            reset_settings()
            if not results:
                migrate.upgrade()
                seed(n, 200, random.Random(7))
                analyze()
            env = {k: v for k, v in os.environ.items() if k != "PGAPPNAME"}
            try:
                loads.append(os.getloadavg()[0])
                f = floor(endpoint.url, n, args.floor_processes, args.floor_threads)
                endpoint.reset()
                loads.append(os.getloadavg()[0])
                p = papermail_run(env, endpoint, n, tmp, db_name, redis_proc)
                loads.append(os.getloadavg()[0])
                results.append({"latency": latency, "floor": f, "papermail": p})
                print(f"measured: latency {latency}: floor {f}, papermail {p}", flush=True)
                if not args.no_kill and kill is None and latency == latencies[0]:
                    kill = kill_run(env, endpoint, n, tmp)
                    print(f"measured: kill -9 {kill}", flush=True)
            finally:
                endpoint.stop()
        settings = get_settings()
    finally:
        from worker.db import dispose_engines

        dispose_engines()
        drop_database(db_url)
        redis_proc.terminate()
        redis_proc.wait(timeout=10)

    worker_cmd = " ".join(shlex.quote(a) for a in procfile_worker_argv()[2:])
    print(
        f"bench/send.py: {n} subscribers, cpus={os.cpu_count()}, SEND_RATE={args.send_rate}, "
        f"SEND_CONCURRENCY={settings.concurrency} (auto), CHUNK_SIZE={settings.chunk_size}, "
        f"worker: {worker_cmd}; floor {args.floor_processes} processes x "
        f"{args.floor_threads} threads; load average seen {min(loads):.1f}-{max(loads):.1f}"
    )
    print(
        "| latency | papermail emails/s | floor emails/s | ratio | worker CPU ms/email "
        "| PostgreSQL | Redis | floor CPU ms/email | worker peak RSS MB | duplicates |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        f, p = r["floor"], r["papermail"]
        print(
            f"| {r['latency'] * 1000:.0f} ms | {p['rate']:.0f} | {f['rate']:.0f} "
            f"| {p['rate'] / f['rate']:.2f} | {p['worker_cpu_ms']:.2f} | {p['pg_cpu_ms']:.2f} "
            f"| {p['redis_cpu_ms']:.3f} | {f['cpu_ms']:.2f} | {p['peak_rss_mb']:.0f} "
            f"| {p['duplicates']} |"
        )
        print(f"  states {p['counts']}, accepted by the server {p['accepted']}")
    if kill:
        print(
            f"kill -9 at full rate, restart, recover: unknown {kill['unknown']} "
            f"(limit {kill['limit']}), duplicates {kill['duplicates']}, states {kill['counts']}, "
            f"at the kill {kill['at_kill']}: {'OK' if kill['ok'] else 'FAILED'}"
        )
    ok = all(r["papermail"]["duplicates"] == 0 for r in results) and (kill is None or kill["ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
