#!/usr/bin/env python3
"""Where one sending process spends its time: process_deliveries chunk by chunk, in-process.

    N=3000 LAT=0 python bench/send_statements.py
    N=1000 TRACE=1 python bench/send_statements.py      # + tracemalloc's top allocations

A PostgreSQL database of its own, N subscribers (bench/pipeline.py's seed), the real SES
mailer over HTTP to tests/integration/fake_ses.py answering after LAT seconds. Prints RSS
after the first chunks, CPU per email after the first chunk, and every SQL statement's
count, total wall time and rows (SQLAlchemy cursor events), slowest first. Profile it with
`py-spy record -- python bench/send_statements.py`. Run by hand, not in CI.
"""

from __future__ import annotations

import collections
import os
import random
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from pipeline import create_database, drop_database, seed  # noqa: E402
from send import Endpoint, analyze, pg_backend_cpu  # noqa: E402
from ses_send import KEY_ID, SECRET  # noqa: E402


def status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    n = int(os.environ.get("N", "4000"))
    latency = float(os.environ.get("LAT", "0.03"))
    db = create_database()
    db_name = db.rsplit("/", 1)[1]
    endpoint = Endpoint(latency)
    for key in [k for k in os.environ if k.startswith("PAPERMAIL_")]:
        del os.environ[key]
    os.environ.update(
        {
            "PAPERMAIL_DATABASE_URL": db,
            "PAPERMAIL_MAILER": "ses",
            "PAPERMAIL_AWS_ACCESS_KEY_ID": KEY_ID,
            "PAPERMAIL_AWS_SECRET_ACCESS_KEY": SECRET,
            "PAPERMAIL_SECRET_KEY": "bench-secret-key-0123456789abcdefghijklmnop",
            "PAPERMAIL_BASE_URL": "https://papermail.example.org",
            "PAPERMAIL_FROM_ADDRESS": "papermail <digest@papermail.example.org>",
            "PAPERMAIL_POSTAL_ADDRESS": "Example Lab, 1 Main Street, Springfield, USA",
            "PAPERMAIL_SEND_RATE": "100000",
            "PAPERMAIL_SES_ENDPOINT_URL": endpoint.url,
        }
    )
    try:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        from worker import delivery, migrate
        from worker.db import session_scope
        from worker.models import utcnow
        from worker.tasks import _preload_before_fork

        migrate.upgrade()
        seed(n, 200, random.Random(7))
        analyze()
        _preload_before_fork()
        stats: dict[str, list[Any]] = collections.defaultdict(lambda: [0, 0.0, 0])

        @event.listens_for(Engine, "before_cursor_execute")
        def _before(conn, cur, stmt, params, ctx, many):  # type: ignore[no-untyped-def]
            conn.info["t0"] = time.perf_counter()

        @event.listens_for(Engine, "after_cursor_execute")
        def _after(conn, cur, stmt, params, ctx, many):  # type: ignore[no-untyped-def]
            st = stats[" ".join(stmt.split())[:90]]
            st[0] += 1
            st[1] += time.perf_counter() - conn.info["t0"]
            st[2] += max(cur.rowcount or 0, 0)

        print(f"after preload: RSS {status_mb('VmRSS'):.1f} MB")
        now = utcnow()
        with session_scope() as s:
            delivery.plan_edition(s, now.date(), now=now)
            ids = list(delivery.pending_delivery_ids(s, now.date(), now=now))
        chunks = delivery.chunks(ids, 200)
        if os.environ.get("TRACE"):
            tracemalloc.start(25)
        t0 = time.process_time()
        t1 = w1 = 0.0
        for i, chunk in enumerate(chunks):
            out = delivery.process_deliveries(chunk)
            if i in (0, 1, 4, len(chunks) - 1):
                print(
                    f"chunk {i}: sent {out.sent}, RSS {status_mb('VmRSS'):.1f} MB, "
                    f"peak {status_mb('VmHWM'):.1f} MB"
                )
            if i == 0:
                t1, w1 = time.process_time(), time.perf_counter()
                pg1 = pg_backend_cpu(db_name)
        t2, w2 = time.process_time(), time.perf_counter()
        pg2 = pg_backend_cpu(db_name)
        rest = len(ids) - len(chunks[0])
        # The pool's connections live through the run: their CPU after the first chunk.
        pg_cpu = sum(cpu - pg1.get(pid, 0.0) for pid, cpu in pg2.items())
        print(
            f"first chunk {1000 * (t1 - t0):.0f} ms CPU; then {1000 * (t2 - t1) / rest:.3f} "
            f"ms CPU per email, {rest / (w2 - w1):.0f} emails/s; PostgreSQL backends "
            f"{1000 * pg_cpu / rest:.3f} ms CPU per email"
        )
        total = sum(v[1] for v in stats.values())
        print(f"SQL {1000 * total / rest:.3f} ms wall per email (first chunk included)")
        for text, (count, secs, rows) in sorted(stats.items(), key=lambda kv: -kv[1][1])[:25]:
            print(f"{count:6d} {1000 * secs:8.1f} ms {rows:7d} rows  {text}")
        if os.environ.get("TRACE"):
            snap = tracemalloc.take_snapshot()
            cur, peak = tracemalloc.get_traced_memory()
            print(f"tracemalloc: {cur / 2**20:.1f} MB now, {peak / 2**20:.1f} MB peak")
            for stat in snap.statistics("filename")[:15]:
                print(stat)
    finally:
        from worker.db import dispose_engines

        dispose_engines()
        drop_database(db)
        endpoint.stop()


if __name__ == "__main__":
    main()
