#!/usr/bin/env python3
"""Benchmark: the operator's own commands at scale, through the real `papermail` CLI.

    python bench/operator_scale.py                 # 1,000,000 rows (targets apply)
    python bench/operator_scale.py --rows 50000    # a quick run

Generates a CSV of N subscribers (a few hundred duplicate addresses among them), creates
a fresh PostgreSQL database, runs `papermail db upgrade`, then times
`papermail subscribers import FILE --confirmed` and `papermail subscribers list --json
> /dev/null` (and `papers list --json --limit 0`) as separate processes under
`/usr/bin/time -v`, and prints the wall time and peak RSS of each against the targets
(import: 60 s and 300 MB at 1M rows; list: 200 MB). The database is dropped at the end.
It also prints the CPU time of the PostgreSQL backends serving each command (sampled
from /proc every 0.1 s, so when the server runs on this machine) and the load average,
since on a shared machine the wall time depends on what else runs. Run by hand, not in
CI. PAPERMAIL_BENCH_POSTGRES_URL (default: postgres on 127.0.0.1) names the server; the
benchmark database gets its own name.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAPERMAIL = Path(sys.executable).with_name("papermail")
TOPICS = ["llm agents", "diffusion models", "gaussian processes", "pruning", "robotics",
          "reinforcement learning", "graph neural networks", "bayesian inference"]  # fmt: skip
ZONES = ["UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo", "Europe/London"]
TARGETS = {"import": (60.0, 300.0), "list": (None, 200.0)}  # at 1M rows


def admin_url() -> str:
    return os.environ.get(
        "PAPERMAIL_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )


def write_csv(path: Path, rows: int, duplicates: int, rng: random.Random) -> int:
    """``rows`` data rows; ``duplicates`` of them repeat an earlier address (other case).
    Returns the number of distinct addresses (a repeat may name an address that never
    appeared, or one repeated already)."""
    repeat = set(rng.sample(range(rows // 2, rows), min(duplicates, rows // 2)))
    distinct: set[int] = set()
    with path.open("w", encoding="utf-8") as fh:
        fh.write("email,topics,max_papers,frequency,weekday,send_hour,timezone\n")
        for n in range(rows):
            who = rng.randrange(n) if n in repeat else n
            distinct.add(who)
            email = (
                f"Reader.{who}@Lab{who % 2000}.Example.org"
                if n in repeat
                else (f"reader.{who}@lab{who % 2000}.example.org")
            )
            topics = "; ".join(rng.sample(TOPICS, rng.randint(0, 3)))
            weekly = n % 7 == 0
            fh.write(
                f'{email},"{topics}",{rng.randint(1, 20)},{"weekly" if weekly else "daily"},'
                f"{'fri' if weekly else ''},{rng.randint(0, 23)},{ZONES[n % len(ZONES)]}\n"
            )
    return len(distinct)


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BackendCPU:
    """CPU seconds of the PostgreSQL backends connected to one database, sampled from
    /proc while a command runs (None when the server's processes are not visible)."""

    def __init__(self, admin: str, database: str) -> None:
        self.admin, self.database = admin, database
        self.seen: dict[int, float] = {}
        self.visible = True
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psycopg

        with psycopg.connect(self.admin, autocommit=True) as conn:
            while not self.done.wait(0.1):
                pids = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.database,)
                ).fetchall()
                for (pid,) in pids:
                    cpu = _cpu_seconds(pid)
                    if cpu is None:
                        self.visible = False
                    else:
                        self.seen[pid] = max(cpu, self.seen.get(pid, 0.0))

    def __enter__(self) -> BackendCPU:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    @property
    def seconds(self) -> float | None:
        return sum(self.seen.values()) if self.visible and self.seen else None


def measured(
    args: list[str],
    env: dict[str, str],
    stdout: int | None = None,
    db: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Run one papermail process under /usr/bin/time -v: wall seconds, peak RSS in MB, CPU
    seconds of the process and of the PostgreSQL backends serving it (``db``: the admin
    URL and the database), and the load average at the end."""
    backends = BackendCPU(*db) if db else None
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        if backends:
            backends.__enter__()
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                ["/usr/bin/time", "-v", "-o", report.name, str(PAPERMAIL), *args],
                env=env,
                stdout=stdout if stdout is not None else subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        finally:
            wall = time.perf_counter() - started
            if backends:
                backends.__exit__()
        text = Path(report.name).read_text()
    if proc.returncode != 0:
        sys.exit(f"papermail {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))  # type: ignore[union-attr]
    cpu = sum(
        float(re.search(rf"{what} time \(seconds\): ([\d.]+)", text).group(1))  # type: ignore[union-attr]
        for what in ("User", "System")
    )
    return {
        "wall": wall,
        "rss": rss / 1024,
        "cpu": cpu,
        "pg": backends.seconds if backends else None,
        "load": os.getloadavg()[0],
        "out": proc.stdout or "",
    }


def verdict(name: str, figures: dict[str, float], rows: int) -> str:
    wall_target, rss_target = TARGETS[name]
    scale = rows / 1_000_000
    parts = []
    if wall_target is not None:
        ok = figures["wall"] <= wall_target * max(scale, 0.01)
        parts.append(f"wall ≤ {wall_target * scale:.1f} s: {'ok' if ok else 'MISSED'}")
    ok = figures["rss"] <= rss_target
    parts.append(f"RSS ≤ {rss_target:.0f} MB: {'ok' if ok else 'MISSED'}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--duplicates", type=int, default=500, help="repeated addresses")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    import psycopg

    admin = admin_url().replace("postgresql+psycopg://", "postgresql://")
    name = f"papermail_bench_ops_{os.getpid()}"
    url = admin_url().rsplit("/", 1)[0] + f"/{name}"
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1, 5 min); "
          f"{os.cpu_count()} cores")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "subscribers.csv"
        started = time.perf_counter()
        expected = write_csv(path, args.rows, args.duplicates, random.Random(args.seed))
        size = path.stat().st_size / 1e6
        print(
            f"generated {args.rows:,} rows ({size:.0f} MB) in {time.perf_counter() - started:.1f} s"
        )
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PAPERMAIL_")},
            "PAPERMAIL_DATABASE_URL": url,
            "PAPERMAIL_OUTBOX_DIR": str(Path(tmp) / "outbox"),
        }
        try:
            measured(["db", "upgrade"], env)
            results = {}
            db = (admin, name)
            results["import"] = measured(
                ["subscribers", "import", str(path), "--confirmed"], env, db=db
            )
            print(f"  {results['import']['out'].strip().splitlines()[-1]}")
            with open(os.devnull, "w") as null:
                results["list"] = measured(
                    ["subscribers", "list", "--json"], env, null.fileno(), db=db
                )
            listed = measured(["subscribers", "list", "--json", "--status", "active"], env)
            count = listed["out"].count('\n    "email": ')
            print(f"  list --json --status active: {count:,} subscribers (expected {expected:,})")
            for key in ("import", "list"):
                f = results[key]
                per = f["wall"] / args.rows * 1e6
                pg = f"{f['pg']:6.1f} s" if f["pg"] is not None else "   n/a"
                print(
                    f"{key:<7} wall {f['wall']:7.1f} s ({per:5.1f} µs/row)  cpu {f['cpu']:6.1f} s"
                    f"  PostgreSQL cpu {pg}  peak RSS {f['rss']:6.0f} MB  load {f['load']:4.1f}"
                    f"   {verdict(key, f, args.rows)}"
                )
            if count != expected:
                sys.exit("the JSON listing is incomplete")
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
