"""`deliveries list` on PostgreSQL at a size where plans matter: index order, no sort,
server-side cursor, the first rows at once, every row exactly once."""

from __future__ import annotations

import json
import time
from datetime import date, timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.dialects import postgresql

from worker import reports
from worker.cli import main
from worker.db import get_engine, session_scope

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

EDITION = date(2031, 3, 14)
N = 60_000


def _fill(n: int) -> None:
    """``n`` subscribers with one delivery each: 89% sent, the rest failed / unknown /
    skipped / pending, as an edition under trouble looks."""
    with get_engine().begin() as conn:
        conn.execute(
            text(
                "INSERT INTO subscribers (id, email, status, topics, max_papers, frequency,"
                " send_hour, timezone, soft_bounce_count, source, created_at, updated_at)"
                " SELECT g, 'reader.' || g || '@example.org', 'active', '[]', 5, 'daily', 7,"
                " 'UTC', 0, 'cli', now(), now() FROM generate_series(1, :n) g"
            ),
            {"n": n},
        )
        conn.execute(
            text(
                "INSERT INTO deliveries (subscriber_id, edition_date, state, attempts,"
                " message_id, last_error, skip_reason, claimed_at, created_at, updated_at)"
                " SELECT g, :d,"
                "  CASE WHEN g % 100 < 89 THEN 'sent' WHEN g % 100 = 89 THEN 'failed'"
                "       WHEN g % 100 = 90 THEN 'unknown' WHEN g % 100 = 91 THEN 'skipped'"
                "       ELSE 'pending' END,"
                "  1, CASE WHEN g % 100 < 89 THEN 'ses-' || g END,"
                "  CASE WHEN g % 100 = 89 THEN 'address rejected: reader.' || g ||"
                "       '@example.org' WHEN g % 100 = 90 THEN 'timed out' END,"
                "  CASE WHEN g % 100 = 91 THEN 'no new paper matches your topics' END,"
                "  now(), now(), now()"
                " FROM generate_series(1, :n) g"
            ),
            {"n": n, "d": EDITION},
        )
        # The day before, all sent: an edition is one of many in the table.
        conn.execute(
            text(
                "INSERT INTO deliveries (subscriber_id, edition_date, state, attempts,"
                " created_at, updated_at) SELECT g, :d, 'sent', 1, now(), now()"
                " FROM generate_series(1, :n) g"
            ),
            {"n": n, "d": EDITION - timedelta(days=1)},
        )
        conn.execute(text("ANALYZE subscribers"))
        conn.execute(text("ANALYZE deliveries"))


def _plan(query: object) -> str:
    sql = str(
        query.compile(  # type: ignore[attr-defined]
            dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
        )
    )
    with get_engine().begin() as conn:
        # As the listing runs it: through a cursor (planned for its first rows).
        rows = conn.execute(text(f"EXPLAIN DECLARE c NO SCROLL CURSOR FOR {sql}")).all()
    return "\n".join(r[0] for r in rows)


def test_each_state_streams_in_index_order(pg_env: dict[str, str]) -> None:
    _fill(N)
    # Most of the edition: any plan in id order without a sort (PostgreSQL may walk the
    # primary key when the table is in that order); a few: the index, in its order.
    assert "Sort" not in _plan(reports.state_query(EDITION, "sent"))
    plan = _plan(reports.state_query(EDITION, "failed"))
    assert "ix_deliveries_edition_state_id" in plan and "Sort" not in plan, plan
    plan = _plan(reports.state_query(EDITION, "failed", "REJECTED"))
    assert "ix_deliveries_edition_state_id" in plan and "Sort" not in plan, plan

    with session_scope() as session:
        started = time.perf_counter()
        rows = reports.iter_deliveries(session, EDITION, ["sent"])
        first = next(rows)
        first_seconds = time.perf_counter() - started
        rest = sum(1 for _ in rows)
    assert first.state == "sent" and first.message_id == f"ses-{first.subscriber_id}"
    assert 1 + rest == sum(1 for g in range(1, N + 1) if g % 100 < 89)
    assert first_seconds < 0.5, first_seconds


def test_cli_lists_every_row_once(pg_env: dict[str, str]) -> None:
    _fill(N)
    r = CliRunner().invoke(
        main,
        ["deliveries", "list", "--date", EDITION.isoformat(), "--json"],
        catch_exceptions=False,
    )
    assert r.exit_code == 0
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert len(rows) == N and len({row["delivery_id"] for row in rows}) == N
    states = [row["state"] for row in rows]
    # Problems first, each state's rows together.
    assert states[: N // 100] == ["failed"] * (N // 100)
    assert states[-1] == "sent"
    r = CliRunner().invoke(
        main,
        ["deliveries", "list", "--date", EDITION.isoformat(), "--state", "failed", "--json"],
        catch_exceptions=False,
    )
    failed = [json.loads(line) for line in r.output.splitlines()]
    assert len(failed) == N // 100
    assert all(f["reason"] == f"address rejected: {f['email']}" for f in failed)
    r = CliRunner().invoke(main, ["stats", "--date", EDITION.isoformat(), "--json"])
    why = json.loads(r.output)["editions"][0]["why"]
    assert why["failed"] == [{"reason": "address rejected: <address>", "count": N // 100}]
    assert why["unknown"] == [{"reason": "timed out", "count": N // 100}]
