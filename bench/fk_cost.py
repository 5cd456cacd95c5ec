#!/usr/bin/env python3
"""What a foreign key of delivery_papers to papers costs a chunk's INSERT (migration 0008).

    python bench/fk_cost.py

1,200 rows (200 deliveries x 6 papers) inserted under EXPLAIN ANALYZE on a PostgreSQL
database of its own, alternately without and with a key to papers; prints each run's
trigger times and execution time. Run by hand, not in CI.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from pipeline import create_database, drop_database, seed  # noqa: E402

INSERT = (
    "EXPLAIN (ANALYZE, BUFFERS) INSERT INTO delivery_papers"
    " (delivery_id, paper_id, position, matched_topic, score)"
    " SELECT d.id, p.id, g, null, 1.0"
    " FROM (SELECT id, row_number() OVER () rn FROM deliveries WHERE id % 6 = :k LIMIT 200) d"
    " CROSS JOIN generate_series(1, 6) g"
    " JOIN (SELECT id, row_number() OVER (ORDER BY id) rn FROM papers) p"
    " ON p.rn = (d.rn * 7 + g) % 200 + 1"
)
ADD_KEY = (
    "ALTER TABLE delivery_papers ADD CONSTRAINT tmp_fk FOREIGN KEY (paper_id) REFERENCES papers(id)"
)


def main() -> None:
    db = create_database()
    for key in [k for k in os.environ if k.startswith("PAPERMAIL_")]:
        del os.environ[key]
    os.environ.update({"PAPERMAIL_DATABASE_URL": db, "PAPERMAIL_SECRET_KEY": "x" * 40})
    try:
        from sqlalchemy import text

        from worker import delivery, migrate
        from worker.db import session_scope
        from worker.models import utcnow

        migrate.upgrade()
        seed(1200, 200, random.Random(7))
        now = utcnow()
        with session_scope() as s:
            delivery.plan_edition(s, now.date(), now=now)
        for k in range(6):
            with_key = k % 2 == 1
            with session_scope() as s:
                if with_key:
                    s.execute(text(ADD_KEY))
                plan = [row[0] for row in s.execute(text(INSERT), {"k": k})]
                shown = [p.strip() for p in plan if "Trigger" in p or "Execution" in p]
                print("key to papers" if with_key else "no key       ", shown)
                if with_key:
                    s.execute(text("ALTER TABLE delivery_papers DROP CONSTRAINT tmp_fk"))
    finally:
        from worker.db import dispose_engines

        dispose_engines()
        drop_database(db)


if __name__ == "__main__":
    main()
