"""`papermail subscribers ...` through click's CliRunner on a real SQLite database."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select

from worker import subscribers as subs
from worker.cli import main
from worker.db import session_scope
from worker.models import Delivery, DeliveryPaper, Paper, ProviderEvent, Subscriber, SubscriberLog

SUBCOMMANDS = ["add", "import", "list", "show", "suppress", "unsuppress"]


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input)


def listed(*args: str) -> list[dict[str, Any]]:
    result = run("subscribers", "list", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def counts() -> tuple[int, int]:
    with session_scope() as s:
        return (
            s.scalar(select(func.count()).select_from(Subscriber)) or 0,
            s.scalar(select(func.count()).select_from(SubscriberLog)) or 0,
        )


@pytest.mark.parametrize("sub", [None, *SUBCOMMANDS])
def test_help_has_an_example(sub: str | None) -> None:
    args = ["subscribers"] + ([sub] if sub else []) + ["--help"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output
    assert f"papermail subscribers {sub or ''}" in result.output


def test_registered_in_the_root_help() -> None:
    result = run("--help")
    assert "subscribers" in result.output.split("Commands:")[1]


@pytest.mark.parametrize(
    "args",
    [
        ["add", "a@x.org"],
        ["import", "whatever.csv"],
        ["list"],
        ["show", "a@x.org"],
        ["suppress", "a@x.org", "--reason", "r"],
        ["unsuppress", "a@x.org", "--reason", "r"],
    ],
)
def test_every_command_needs_the_schema(env: dict[str, str], args: list[str]) -> None:
    result = run("subscribers", *args)
    assert result.exit_code == 1
    assert "run `papermail db upgrade` first" in result.stderr


# --- add --------------------------------------------------------------------------------


def test_add_with_every_option(settings: Any) -> None:
    result = run(
        "subscribers",
        "add",
        "Ada@Example.org",
        "--topics",
        "llm agents, diffusion",
        "--max-papers",
        "8",
        "--frequency",
        "weekly",
        "--weekday",
        "fri",
        "--send-hour",
        "6",
        "--timezone",
        "Europe/London",
        "--confirmed",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("added ada@example.org active: weekly on friday at 06:00")
    (row,) = listed()
    assert row["email"] == "ada@example.org"
    assert (row["status"], row["topics"], row["max_papers"]) == (
        "active",
        ["llm agents", "diffusion"],
        8,
    )
    assert (row["frequency"], row["weekday"], row["send_hour"], row["timezone"]) == (
        "weekly",
        "friday",
        6,
        "Europe/London",
    )
    assert "\x1b[" not in result.output  # no colour when not on a terminal


def test_add_without_confirmed_is_pending(settings: Any) -> None:
    result = run("subscribers", "add", "b@example.org", "--weekday", "mon")
    assert result.exit_code == 0, result.output
    assert "pending" in result.stdout
    assert "until they confirm" in result.stdout
    assert "--weekday applies to weekly subscribers only" in result.stderr
    (row,) = listed()
    assert (row["status"], row["weekday"], row["confirmed_at"]) == ("pending", None, None)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--timezone", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
        ("--send-hour", "25", "hour must be 0-23, got 25"),
        ("--max-papers", "0", "max papers must be between 1 and 50, got 0"),
        ("--frequency", "hourly", "frequency must be daily or weekly, got 'hourly'"),
        ("--weekday", "someday", "weekday must be a day name"),
    ],
)
def test_add_refuses_bad_options(settings: Any, option: str, value: str, message: str) -> None:
    result = run("subscribers", "add", "a@example.org", option, value)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.startswith("error: ")
    assert counts() == (0, 0)


def test_add_refuses_a_bad_address(settings: Any) -> None:
    result = run("subscribers", "add", "foo@")
    assert result.exit_code == 2
    assert "invalid email 'foo@': There must be something after the @-sign." in result.stderr
    assert counts() == (0, 0)


def test_add_twice_is_refused_and_changes_nothing(settings: Any) -> None:
    assert run("subscribers", "add", "a@example.org", "--topics", "llm").exit_code == 0
    before = listed(), counts()
    result = run("subscribers", "add", "A@EXAMPLE.org", "--topics", "robots", "--confirmed")
    assert result.exit_code == 1
    assert "already a subscriber (status pending)" in result.stderr
    assert "papermail subscribers show a@example.org" in result.stderr
    assert (listed(), counts()) == before


# --- import -----------------------------------------------------------------------------


GOOD = 'email,topics,max_papers\nada@example.org,"llm, rl",3\nbob@example.org,,\n'
BAD = (
    "email,topics,send_hour\n"
    "ok@example.org,llm,\n"  # line 2
    "ok2@example.org,,\n"  # line 3
    "\n"  # line 4
    "zed@example.org,,25\n"  # line 5
    "foo@,,\n"  # line 6
    "OK@example.org,vision,9\n"  # line 7: merged with line 2
)


def write(tmp_path: Path, text: str, name: str = "people.csv") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_import_good_file(settings: Any, tmp_path: Path) -> None:
    result = run("subscribers", "import", write(tmp_path, GOOD), "--confirmed")
    assert result.exit_code == 0, result.output
    assert "2 rows: 2 added (active), 0 existing left unchanged" in result.stdout
    assert [(r["email"], r["status"]) for r in listed()] == [
        ("ada@example.org", "active"),
        ("bob@example.org", "active"),
    ]


def test_import_with_bad_rows_imports_nothing(settings: Any, tmp_path: Path) -> None:
    result = run("subscribers", "import", write(tmp_path, BAD))
    assert result.exit_code == 2
    err = result.stderr.splitlines()
    assert err[:2] == [
        "line 5 (zed@example.org): hour must be 0-23, got 25",
        "line 6: invalid email 'foo@': There must be something after the @-sign.",
    ]
    assert "nothing was imported" in err[2]
    assert "--skip-invalid" in err[2]
    assert "merged: ok@example.org on lines 2, 7" in result.stdout
    assert counts() == (0, 0)


def test_import_with_skip_invalid_imports_the_good_rows(settings: Any, tmp_path: Path) -> None:
    result = run("subscribers", "import", write(tmp_path, BAD), "--skip-invalid")
    assert result.exit_code == 1  # rows were rejected
    assert "line 5 (zed@example.org): hour must be 0-23, got 25" in result.stderr
    assert "line 6: invalid email 'foo@'" in result.stderr
    assert "5 rows: 2 added (pending)" in result.stdout
    assert "2 rejected" in result.stdout
    rows = {r["email"]: r for r in listed()}
    assert list(rows) == ["ok@example.org", "ok2@example.org"]
    assert (rows["ok@example.org"]["topics"], rows["ok@example.org"]["send_hour"]) == (
        ["vision"],
        9,
    )


def test_import_json_report_and_existing(settings: Any, tmp_path: Path) -> None:
    assert run("subscribers", "add", "bob@example.org", "--confirmed").exit_code == 0
    result = run("subscribers", "import", write(tmp_path, GOOD), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["imported"] is True
    assert (report["rows"], report["created"], report["rejected"]) == (2, 1, [])
    assert report["existing"] == [{"email": "bob@example.org", "line": 3, "status": "active"}]
    assert report["source"].endswith("people.csv")
    bob = next(r for r in listed() if r["email"] == "bob@example.org")
    assert (bob["status"], bob["max_papers"]) == ("active", 5)


def test_import_json_when_rejected(settings: Any, tmp_path: Path) -> None:
    result = run("subscribers", "import", write(tmp_path, BAD), "--json")
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert report["imported"] is False
    assert [r["line"] for r in report["rejected"]] == [5, 6]
    assert counts() == (0, 0)


def test_import_from_stdin(settings: Any) -> None:
    result = run("subscribers", "import", "-", input=GOOD)
    assert result.exit_code == 0, result.output
    assert len(listed()) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("email,colour\na@x.org,red\n", "unknown column 'colour'"),
        ("", "the file is empty"),
    ],
)
def test_import_refuses_a_bad_header(
    settings: Any, tmp_path: Path, text: str, message: str
) -> None:
    result = run("subscribers", "import", write(tmp_path, text), "--skip-invalid")
    assert result.exit_code == 2
    assert message in result.stderr
    assert counts() == (0, 0)


def test_import_of_a_missing_file(settings: Any, tmp_path: Path) -> None:
    result = run("subscribers", "import", str(tmp_path / "nope.csv"))
    assert result.exit_code == 2
    assert "no such file" in result.stderr


# --- list, show -------------------------------------------------------------------------


def test_list_text_and_status_filter(settings: Any) -> None:
    assert run("subscribers", "list").stdout == "no subscribers\n"
    run("subscribers", "add", "a@example.org", "--topics", "llm", "--confirmed")
    run("subscribers", "add", "b@example.org", "--frequency", "weekly", "--weekday", "sun")
    result = run("subscribers", "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["EMAIL", "STATUS", "SCHEDULE", "TIME"]
    assert lines[1].split()[:4] == ["a@example.org", "active", "daily", "07:00"]
    assert lines[2].split()[:5] == ["b@example.org", "pending", "weekly", "sun", "07:00"]
    assert lines[-1] == "2 subscribers"
    assert [r["email"] for r in listed("--status", "pending")] == ["b@example.org"]
    bad = run("subscribers", "list", "--status", "gone")
    assert bad.exit_code == 2
    assert "'gone' is not one of" in bad.stderr


def make_delivery(email: str) -> None:
    with session_scope() as s:
        sub = subs.get_subscriber(s, email)
        s.add(Paper(id="2603.00001", title="Sparse Mixtures of Experts"))
        d = Delivery(
            subscriber_id=sub.id,
            edition_date=date(2026, 3, 9),
            state="bounced",
            attempts=1,
            message_id="ses-42",
            bounced_at=datetime(2026, 3, 9, 7, 1, tzinfo=UTC),
        )
        s.add(d)
        s.flush()
        s.add(DeliveryPaper(delivery_id=d.id, paper_id="2603.00001", position=0))
        s.add(
            ProviderEvent(
                dedupe_key="sns-1",
                event_type="Bounce",
                subtype="Permanent/General",
                provider_message_id="ses-42",
                delivery_id=d.id,
                recipients=[email],
                occurred_at=datetime(2026, 3, 9, 7, 1, tzinfo=UTC),
                raw={"notificationType": "Bounce"},
            )
        )


def test_show_text_and_json(settings: Any) -> None:
    run("subscribers", "add", "ada@example.org", "--topics", "moe", "--confirmed")
    make_delivery("ada@example.org")
    result = run("subscribers", "show", "ADA@example.org")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("ada@example.org  active\n")
    assert "Deliveries (1)" in out
    assert "2026-03-09  bounced" in out
    assert "message ses-42" in out
    assert "1. 2603.00001  Sparse Mixtures of Experts" in out
    assert "event Bounce/Permanent/General 2026-03-09 07:01:00" in out
    assert "created by cli" in out

    history = json.loads(run("subscribers", "show", "ada@example.org", "--json").stdout)
    (delivery,) = history["deliveries"]
    assert delivery["state"] == "bounced"
    assert [p["title"] for p in delivery["papers"]] == ["Sparse Mixtures of Experts"]
    assert [(e["event_type"], e["provider_message_id"]) for e in delivery["events"]] == [
        ("Bounce", "ses-42")
    ]
    assert [e["action"] for e in history["log"]] == ["created"]


def test_show_unknown_address(settings: Any) -> None:
    result = run("subscribers", "show", "nobody@example.org")
    assert result.exit_code == 1
    assert "no subscriber with address 'nobody@example.org'" in result.stderr
    assert "papermail subscribers list" in result.stderr


# --- suppress, unsuppress ---------------------------------------------------------------


def test_suppress_and_unsuppress(settings: Any) -> None:
    run("subscribers", "add", "ada@example.org", "--confirmed")
    result = run("subscribers", "suppress", "ada@example.org", "--reason", "legal request")
    assert result.exit_code == 0, result.output
    assert result.stdout == "suppressed ada@example.org: legal request\n"
    (row,) = listed("--status", "suppressed")
    assert row["suppression_reason"] == "legal request"
    assert "*" in run("subscribers", "list").stdout

    again = run("subscribers", "suppress", "ada@example.org", "--reason", "again")
    assert again.exit_code == 0
    assert "already suppressed" in again.stdout

    lifted = run("subscribers", "unsuppress", "ada@example.org", "--reason", "resolved")
    assert lifted.exit_code == 0, lifted.output
    assert "lifted suppression of ada@example.org" in lifted.stdout
    assert listed("--status", "suppressed") == []
    log = json.loads(run("subscribers", "show", "ada@example.org", "--json").stdout)["log"]
    assert [e["action"] for e in log] == ["created", "suppressed", "unsuppressed"]


def test_unsuppress_lifts_a_bounce(settings: Any) -> None:
    run("subscribers", "add", "ada@example.org", "--confirmed")
    with session_scope() as s:
        s.get(Subscriber, 1).status = "bounced"  # type: ignore[union-attr]
    result = run("subscribers", "unsuppress", "ada@example.org", "--reason", "mailbox fixed")
    assert result.exit_code == 0, result.output
    assert "status bounced -> active" in result.stdout
    assert listed()[0]["status"] == "active"


def test_suppress_needs_a_reason(settings: Any) -> None:
    run("subscribers", "add", "ada@example.org", "--confirmed")
    missing = run("subscribers", "suppress", "ada@example.org")
    assert missing.exit_code == 2
    assert "Missing option '--reason'" in missing.stderr
    blank = run("subscribers", "suppress", "ada@example.org", "--reason", " ")
    assert blank.exit_code == 2
    assert "a reason is required" in blank.stderr
    assert listed("--status", "suppressed") == []
    unknown = run("subscribers", "unsuppress", "nobody@example.org", "--reason", "x")
    assert unknown.exit_code == 1
    assert "no subscriber with address" in unknown.stderr
