"""`papermail deliveries list` and the "why" of `papermail stats` (worker.reports)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from click.testing import CliRunner

from tests.conftest import FIXED_NOW
from worker import reports
from worker.cli import main
from worker.db import session_scope
from worker.errors import InvalidInput
from worker.models import Delivery, Subscriber

EDITION = FIXED_NOW.date()
CLAIMED = FIXED_NOW - timedelta(hours=2)

# (address, state, skip_reason, last_error, attempts, message id, waiting_for)
ROWS = [
    ("sent.one@example.org", "sent", None, None, 1, "ses-0001", None),
    ("boom@example.org", "failed", None, "address rejected: boom@example.org", 1, None, None),
    ("quiet@example.org", "skipped", "no new paper matches your topics", None, 0, None, None),
    ("timeout@example.org", "unknown", None, "timed out after the request left", 1, None, None),
    ("sent.two@example.org", "sent", None, None, 2, "ses-0002", None),
    ("bang@example.org", "failed", None, "address rejected: bang@example.org", 3, None, None),
    ("later@example.org", "pending", None, "throttled: 100% of the rate", 1, None, None),
    ("held@example.org", "pending", None, None, 0, None, "papers"),
    ("odd@example.org", "failed", None, "could not render the digest: KeyError", 0, None, None),
]


def _load(rows: list[tuple[object, ...]] = ROWS) -> None:
    with session_scope() as s:
        for n, (email, state, skip, error, attempts, mid, waiting) in enumerate(rows):
            sub = Subscriber(email=email, status="active")
            s.add(sub)
            s.flush()
            failed_unclaimed = state == "failed" and attempts == 0
            s.add(
                Delivery(
                    subscriber_id=sub.id,
                    edition_date=EDITION,
                    state=state,
                    skip_reason=skip,
                    last_error=error,
                    attempts=attempts,
                    message_id=mid,
                    waiting_for=waiting,
                    claimed_at=None if not attempts else CLAIMED + timedelta(minutes=n),
                    finished_at=CLAIMED if failed_unclaimed else None,
                )
            )
        # Another edition's delivery is never listed.
        other = s.get(Subscriber, 1)
        s.add(Delivery(subscriber_id=other.id, edition_date=EDITION - timedelta(days=1)))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    request.getfixturevalue("settings" if request.param == "sqlite" else "pg_env")
    _load()
    yield request.param


def cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def listed(*args: str) -> list[dict[str, object]]:
    r = cli("deliveries", "list", "--date", EDITION.isoformat(), "--json", *args)
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.output.splitlines()]


def test_problems_first_then_by_id(backend: str) -> None:
    emails = [row["email"] for row in listed()]
    assert emails == [
        "boom@example.org",
        "bang@example.org",
        "odd@example.org",
        "timeout@example.org",
        "quiet@example.org",
        "later@example.org",
        "held@example.org",
        "sent.one@example.org",
        "sent.two@example.org",
    ]


def test_row_fields(backend: str) -> None:
    rows = {row["email"]: row for row in listed()}
    boom = rows["boom@example.org"]
    assert boom["state"] == "failed" and boom["reason"] == "address rejected: boom@example.org"
    assert boom["attempts"] == 1 and boom["message_id"] is None
    assert boom["edition"] == EDITION.isoformat()
    assert boom["last_attempt_at"] == (CLAIMED + timedelta(minutes=1)).isoformat()
    assert rows["quiet@example.org"]["reason"] == "no new paper matches your topics"
    assert rows["quiet@example.org"]["last_attempt_at"] is None
    assert rows["held@example.org"]["reason"] == reports.WAITING_FOR_PAPERS
    # Failed before any claim (rendering): its attempt is when it failed.
    assert rows["odd@example.org"]["last_attempt_at"] == CLAIMED.isoformat()
    assert rows["sent.two@example.org"]["message_id"] == "ses-0002"
    assert rows["sent.two@example.org"]["reason"] is None
    assert set(boom) == {
        "delivery_id",
        "subscriber_id",
        "email",
        "edition",
        "state",
        "reason",
        "attempts",
        "last_attempt_at",
        "message_id",
    }


def test_state_reason_and_limit_filters(backend: str) -> None:
    rows = listed("--state", "unknown", "--state", "FAILED")
    assert [r["state"] for r in rows] == ["failed", "failed", "failed", "unknown"]
    assert [r["state"] for r in listed("--state", "sent,skipped")] == ["skipped", "sent", "sent"]
    rows = listed("--reason", "ADDRESS REJECTED")
    assert [r["email"] for r in rows] == ["boom@example.org", "bang@example.org"]
    # LIKE's wildcards in the text are plain characters.
    assert [r["email"] for r in listed("--reason", "100%")] == ["later@example.org"]
    assert listed("--reason", "_%_") == []
    assert [r["email"] for r in listed("--limit", "4")] == [
        "boom@example.org",
        "bang@example.org",
        "odd@example.org",
        "timeout@example.org",
    ]
    assert len(listed("--limit", "0")) == len(ROWS)


def test_human_table_fits_100_columns_in_local_time(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # UTC+9, no DST: the same on any date
    time.tzset()
    try:
        r = cli("deliveries", "list", "--date", EDITION.isoformat())
    finally:
        monkeypatch.undo()
        time.tzset()
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert all(len(line) <= 100 for line in lines), max(lines, key=len)
    assert lines[0].split()[:4] == ["ADDRESS", "STATE", "TRIES", "LAST"]
    assert "JST" in lines[0]
    boom = next(line for line in lines if line.startswith("boom@"))
    local = (CLAIMED + timedelta(minutes=1, hours=9)).strftime("%m-%d %H:%M")
    assert boom.split()[1:5] == ["failed", "1", *local.split()]
    assert "address rejected" in boom
    sent = next(line for line in lines if line.startswith("sent.two@"))
    assert sent.rstrip().endswith("ses-0002")
    assert lines[-1] == f"{len(ROWS)} deliveries"
    r = cli("deliveries", "list", "--date", EDITION.isoformat(), "--limit", "2")
    assert r.output.splitlines()[-1] == "2 deliveries (first 2; --limit 0 for all)"


def test_long_address_and_reason_are_cut(settings: object) -> None:
    long_email = "a" * 60 + "@example.org"
    _load([(long_email, "failed", None, "x\n" * 200, 1, None, None)])
    r = cli("deliveries", "list", "--date", EDITION.isoformat())
    row = r.output.splitlines()[1]
    assert len(row) <= 100 and "…" in row and "\n" not in row.strip()
    assert [x["email"] for x in listed()] == [long_email]  # JSON keeps it whole


def test_empty_edition(settings: object) -> None:
    r = cli("deliveries", "list", "--date", "2031-01-01", "--state", "failed")
    assert r.exit_code == 0
    assert r.output == "no deliveries for 2031-01-01 in state failed\n"
    assert listed("--state", "failed") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--date", "2031-02-30"], "error: --date: '2031-02-30' is not a date; use YYYY-MM-DD"),
        (["--date", "yesterday"], "error: --date: 'yesterday' is not a date"),
        (["--state", "lost"], "error: unknown delivery state 'lost'; choose from failed"),
        (["--state", "failed,nope"], "error: unknown delivery state 'nope'"),
    ],
)
def test_bad_input_is_one_line(settings: object, args: list[str], message: str) -> None:
    r = CliRunner().invoke(main, ["deliveries", "list", *args])
    assert r.exit_code == 2
    assert len(r.output.strip().splitlines()) == 1
    assert r.output.startswith(message)


def test_parse_states() -> None:
    assert reports.parse_states(["sent", "Failed, unknown", ""]) == ["failed", "unknown", "sent"]
    with pytest.raises(InvalidInput, match="unknown delivery state 'sendin'"):
        reports.parse_states(["sendin"])


def test_reason_group_hides_addresses() -> None:
    assert reports.reason_group("rejected: Ada.L+x@Lab-1.example.org now") == (
        "rejected: <address> now"
    )
    assert reports.reason_group(None) == "(no reason recorded)"
    assert reports.reason_group("  two\n lines ") == "two lines"


def test_stats_why_breakdown(backend: str) -> None:
    r = cli("stats", "--date", EDITION.isoformat(), "--json")
    why = json.loads(r.output)["editions"][0]["why"]
    assert why == {
        "failed": [
            {"reason": "address rejected: <address>", "count": 2},
            {"reason": "could not render the digest: KeyError", "count": 1},
        ],
        "skipped": [{"reason": "no new paper matches your topics", "count": 1}],
        "unknown": [{"reason": "timed out after the request left", "count": 1}],
    }
    r = cli("stats", "--date", EDITION.isoformat())
    assert "why, " in r.output
    line = next(x for x in r.output.splitlines() if "address rejected" in x)
    assert line.split()[:2] == ["failed", "2"]


def test_why_keeps_the_top_and_counts_the_rest(settings: object) -> None:
    rows = [
        (f"u{n}@example.org", "failed", None, f"reason {n % 7}", 1, None, None) for n in range(30)
    ]
    _load(rows)
    with session_scope() as s:
        why = reports.why_breakdown(s, EDITION, top=3)
    assert why["skipped"] == [] and why["unknown"] == []
    assert [e["count"] for e in why["failed"]] == [5, 5, 4, 16]
    assert why["failed"][0]["reason"] == "reason 0"
    assert why["failed"][-1]["reason"] == "(other reasons)"
