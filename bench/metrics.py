#!/usr/bin/env python3
"""Benchmark: what the metrics add to the send path, per email.

    python bench/metrics.py                  # 200,000 emails in batches of 32
    python bench/metrics.py --batch 1        # SEND_CONCURRENCY 1: one batch per email

Times exactly the calls process_deliveries makes per batch (two perf_counter reads per
provider call, record_batch with the batch's latencies, one rate-limit wait observation,
a chunk's duration and flush every 200 emails)
against the same loop without them, in-memory and in prometheus_client's multiprocess mode
(PAPERMAIL_METRICS_DIR, what Celery's prefork workers use). Target: well under 0.05 ms.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker import metrics  # noqa: E402
from worker.config import load_settings  # noqa: E402


def instrumented(emails: int, batch: int) -> float:
    perf = time.perf_counter
    started = perf()
    per_chunk = max(1, 200 // batch)  # PAPERMAIL_CHUNK_SIZE's default
    for n in range(emails // batch):
        latencies: list[float] = []
        for _ in range(batch):
            t0 = perf()
            latencies.append(perf() - t0)  # what _send_one does around mailer.send
        metrics.observe_wait(0.0)
        metrics.record_batch(batch, latencies, ())
        if n % per_chunk == per_chunk - 1:
            metrics.observe_chunk(1.0)  # a chunk's end: its duration, and the flush
    return perf() - started


def bare(emails: int, batch: int) -> float:
    perf = time.perf_counter
    started = perf()
    for _ in range(emails // batch):
        for _ in range(batch):
            pass
    return perf() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--emails", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for mode, settings in (
            ("in-memory", load_settings(database_url="sqlite://")),
            ("multiprocess", load_settings(database_url="sqlite://", metrics_dir=Path(tmp))),
        ):
            metrics.reset()
            metrics.configure(settings)
            per_email = []
            for _ in range(args.runs):
                cost = instrumented(args.emails, args.batch) - bare(args.emails, args.batch)
                per_email.append(cost / args.emails * 1e6)
            per_email.sort()
            print(
                f"{mode:>12}: batch {args.batch}: {per_email[len(per_email) // 2]:.2f} µs per "
                f"email (median of {args.runs}; min {per_email[0]:.2f}, max {per_email[-1]:.2f})"
                f"; target < 50 µs"
            )
    metrics.reset()


if __name__ == "__main__":
    main()
