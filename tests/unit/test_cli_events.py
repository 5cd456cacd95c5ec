"""`papermail events ...` through click's CliRunner on a real SQLite database."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select

from tests.conftest import FIXED_NOW
from tests.unit import test_events as ev
from worker.cli import main
from worker.db import session_scope
from worker.models import Delivery, ProviderEvent, Subscriber, SubscriberLog, utcnow

SENT = FIXED_NOW - timedelta(hours=1)  # an hour before the unit tests' fixed clock


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input)


@pytest.fixture
def seeded(settings: Any) -> dict[str, str]:
    """Two active subscribers, each with a sent delivery; returns email -> SES message id."""
    out = {}
    with session_scope() as session:
        for email in ("ann@example.org", "bob@example.org"):
            sub = ev.add_subscriber(session, email)
            out[email] = ev.add_delivery(session, sub).message_id
    return out


def write(tmp_path: Path, data: Any, name: str = "events.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def state() -> dict[str, Any]:
    with session_scope() as session:
        return {
            "subscribers": sorted(
                session.execute(
                    select(Subscriber.email, Subscriber.status, Subscriber.soft_bounce_count)
                ).all()
            ),
            "deliveries": sorted(session.execute(select(Delivery.id, Delivery.state)).all()),
            "events": session.scalar(select(func.count()).select_from(ProviderEvent)),
            "logs": session.scalar(select(func.count()).select_from(SubscriberLog)),
        }


@pytest.mark.parametrize(
    "args",
    [["events", "--help"], ["events", "apply", "--help"], ["events", "poll-sqs", "-h"]],
)
def test_help_has_an_example(args: list[str]) -> None:
    result = run(*args)
    assert result.exit_code == 0
    assert "Example:" in result.output and "papermail events " in result.output


def test_events_is_registered_in_the_root_help() -> None:
    assert "events" in run("--help").output.split("Commands:")[1]


def test_apply_file_then_again(seeded: dict[str, str], tmp_path: Path) -> None:
    ann, bob = seeded["ann@example.org"], seeded["bob@example.org"]
    data = [
        ev.envelope(ev.bounce(ann, ["ann@example.org"], sent_at=SENT), "sns-msg-1"),
        ev.complaint(bob, ["bob@example.org"], sent_at=SENT),
        ev.bounce("unknown-old", ["zed@example.org"], sent_at=SENT),
    ]
    path = write(tmp_path, data)
    result = run("events", "apply", path)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == (
        "applied 2, duplicate 0, orphan 1, ignored 0, retry later 0"
    )
    assert "ann@example.org): active -> bounced" in result.output
    after = state()
    assert after["subscribers"] == [
        ("ann@example.org", "bounced", 0),
        ("bob@example.org", "complained", 0),
    ]
    assert [s for _, s in after["deliveries"]] == ["bounced", "complained"]
    with session_scope() as session:
        vias = set(session.scalars(select(ProviderEvent.via)))
        keys = set(session.scalars(select(ProviderEvent.dedupe_key)))
    assert vias == {"file"} and "sns-msg-1" in keys

    again = run("events", "apply", path, "--json")
    assert again.exit_code == 0, again.output
    report = json.loads(again.output)
    assert report["counts"] == {
        "applied": 0,
        "duplicate": 3,
        "orphan": 0,
        "ignored": 0,
        "retry_later": 0,
    }
    assert [r["status"] for r in report["results"]] == ["duplicate"] * 3
    assert state() == after


@pytest.mark.parametrize("keep", [16 * 1024 * 1024, 1], ids=["kept as read", "read again"])
def test_apply_keeps_a_small_file_as_read_and_reads_a_big_one_again(
    seeded: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: int
) -> None:
    """The check reads the file whole; a small one is applied from what it read, a big one
    is read again (flat memory): either way the same outcome, one per notification."""
    from worker import events
    from worker.cli import events as cli_events

    monkeypatch.setattr(cli_events, "KEEP_READ_BYTES", keep)
    reads: list[str] = []
    real = events.read_file_items

    def counting(stream: Any, name: str = "FILE") -> Any:
        reads.append(name)
        return real(stream, name)

    monkeypatch.setattr(events, "read_file_items", counting)
    ann, bob = seeded["ann@example.org"], seeded["bob@example.org"]
    soft = ev.bounce(bob, ["bob@example.org"], "Transient", sent_at=SENT)
    data = [ev.envelope(ev.delivered(ann, ["ann@example.org"], sent_at=SENT), "sns-1"),
            soft, soft]  # the same keyless notification twice  # fmt: skip
    result = run("events", "apply", write(tmp_path, data), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [r["status"] for r in report["results"]] == ["applied", "applied", "duplicate"]
    assert len(reads) == (1 if keep > 1 else 2)
    assert state()["subscribers"] == [("ann@example.org", "active", 0),
                                      ("bob@example.org", "active", 1)]  # fmt: skip


def test_apply_from_stdin(seeded: dict[str, str]) -> None:
    note = ev.delivered(seeded["ann@example.org"], ["ann@example.org"], sent_at=SENT)
    result = run("events", "apply", "-", input=json.dumps(note))
    assert result.exit_code == 0, result.output
    assert result.output.startswith("applied 1,")
    assert "delivered" in [s for _, s in state()["deliveries"]]


def test_bad_item_applies_nothing(seeded: dict[str, str], tmp_path: Path) -> None:
    good = ev.bounce(seeded["ann@example.org"], ["ann@example.org"], sent_at=SENT)
    broken = ev.bounce(seeded["bob@example.org"], ["bob@example.org"], sent_at=SENT)
    del broken["mail"]["messageId"]
    before = state()
    result = run("events", "apply", write(tmp_path, [good, broken]))
    assert result.exit_code == 2
    assert "item 1: field 'mail.messageId'" in result.output
    assert "nothing applied" in result.output
    assert state() == before


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "the list is empty"),
        ('"a string"', "expected a JSON object"),
    ],
)
def test_unusable_files(settings: Any, tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    before = state()
    result = run("events", "apply", str(path))
    assert result.exit_code == 2 and expected in result.output
    assert state() == before


def test_missing_file(settings: Any, tmp_path: Path) -> None:
    result = run("events", "apply", str(tmp_path / "nope.json"))
    assert result.exit_code == 2 and "nope.json" in result.output


def test_young_unknown_message_exits_non_zero(seeded: dict[str, str], tmp_path: Path) -> None:
    young = ev.bounce("just-sent", ["ann@example.org"], sent_at=utcnow())
    good = ev.delivered(seeded["bob@example.org"], ["bob@example.org"], sent_at=SENT)
    result = run("events", "apply", write(tmp_path, [young, good]))
    assert result.exit_code == 1
    assert "retry later 1" in result.output and "item 0" in result.output
    after = state()
    assert after["events"] == 1  # the good one was applied, the young one not stored
    assert ("ann@example.org", "active", 0) in after["subscribers"]


def test_poll_sqs_needs_a_queue(settings: Any) -> None:
    result = run("events", "poll-sqs", "--once")
    assert result.exit_code == 2 and "PAPERMAIL_SQS_QUEUE_URL" in result.output


def test_poll_sqs_checks_its_limits(settings: Any) -> None:
    result = run("events", "poll-sqs", "--queue-url", "http://q", "--max-messages", "11")
    assert result.exit_code == 2 and "--max-messages" in result.output
