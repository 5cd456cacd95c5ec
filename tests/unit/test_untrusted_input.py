"""Control characters and hostile JSON through the shared functions and the CLI.

The CLI cases run on PostgreSQL (which refuses NUL in text): a value that slipped past
the checks would end in a database error instead of the clear message asserted here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from worker import config, preferences, untrusted
from worker import subscribers as subs
from worker.cli import main
from worker.db import session_scope
from worker.models import Subscriber
from worker.untrusted import ControlCharacter, UnsafeJSON, check_text, find_control, loads_json


@pytest.mark.parametrize("char", ["\x00", "\x08", "\x0b", "\x1f", "\x7f", "\x9b", "\ud800"])
def test_every_control_character_and_lone_surrogate_is_found(char: str) -> None:
    assert find_control(f"ab{char}cd") == char
    with pytest.raises(
        ControlCharacter, match=rf"topics contains a control character \(U\+{ord(char):04X}\)"
    ):
        check_text(f"ab{char}", "topics")


def test_ordinary_text_and_allowed_whitespace_pass() -> None:
    assert find_control("Données, 数据, emoji 🙂, tab\tnew\nline\r") == "\t"
    assert check_text("a\tb\r\nc", "topics", allow=untrusted.WHITESPACE_CONTROLS) == "a\tb\r\nc"


@pytest.mark.parametrize(
    ("parse", "value", "what"),
    [
        (subs.normalize_email, "ada\x00@example.org", "email"),
        (subs.normalize_email, "ada@exa\udcffmple.org", "email"),
        (subs.parse_topics, "robotics, pla\x00nning", "topics"),
        (subs.parse_topics, ["robotics", "x\x1fy"], "a topic"),  # \x1f is whitespace to split()
        (subs.parse_timezone, "Europe/Paris\x00", "time zone"),
    ],
)
def test_shared_validation_names_the_field_and_character(parse, value, what) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=f"^{what} contains a control character"):
        parse(value)


def test_subscribe_form_validation_refuses_a_control_character_in_the_zone() -> None:
    # An unknown zone falls back to UTC (browsers send odd ones); a NUL is refused.
    assert preferences.parse_subscribe("a@example.org", "", "Mars/Olympus")["timezone"] == "UTC"
    with pytest.raises(preferences.InvalidPreferences) as raised:
        preferences.parse_subscribe("a@example.org", "", "UTC\x00")
    assert "control character (U+0000)" in raised.value.errors["timezone"]


def _subscriber_count() -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(Subscriber)) or 0


@pytest.fixture
def pg(pg_env: dict[str, str]) -> dict[str, str]:
    return pg_env


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--topics", "robotics, rl\x00"], "topics contains a control character (U+0000)"),
        (["--timezone", "UTC\x00"], "time zone contains a control character (U+0000)"),
        (["--topics", "a\udcffb"], "topics contains a control character (U+DCFF)"),
    ],
)
def test_cli_add_refuses_control_characters_on_postgresql(
    pg: dict[str, str], args: list[str], message: str
) -> None:
    result = CliRunner().invoke(main, ["subscribers", "add", "ada@example.org", *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert _subscriber_count() == 0


def test_cli_import_reports_the_row_and_imports_nothing_on_postgresql(
    pg: dict[str, str], tmp_path: Path
) -> None:
    csv = tmp_path / "people.csv"
    csv.write_text(
        "email,topics\nada@example.org,robotics\nbob@example.org,pla\x00nning\n", encoding="utf-8"
    )
    result = CliRunner().invoke(main, ["subscribers", "import", str(csv), "--confirmed"])
    assert result.exit_code != 0, result.output
    assert "line 3" in result.output and "control character (U+0000)" in result.output
    assert _subscriber_count() == 0
    skipped = CliRunner().invoke(
        main, ["subscribers", "import", str(csv), "--confirmed", "--skip-invalid"]
    )
    assert _subscriber_count() == 1, skipped.output


def test_json_depth_is_counted_without_recursion() -> None:
    limit = sys.getrecursionlimit()
    for text in ("[" * 100_000, '{"a":' * 100_000, "[" * 65 + "]" * 65):
        with pytest.raises(UnsafeJSON, match="nested more than 64 levels"):
            loads_json(text)
    assert sys.getrecursionlimit() == limit
    assert loads_json("[" * 64 + "]" * 64) == json.loads("[" * 64 + "]" * 64)
    # Brackets and escaped quotes inside strings are text.
    tricky = json.dumps({"a": "[[[[" * 100 + '\\"{{{' * 100, "b": [[1]]})
    assert loads_json(tricky) == json.loads(tricky)
    with pytest.raises(UnsafeJSON, match="too large"):
        loads_json(b" " * 11, max_bytes=10)
    with pytest.raises(ValueError):
        loads_json('{"a": ')
    assert loads_json(b'{"x": "\\u00e9"}') == {"x": "é"}


def test_events_apply_refuses_deep_json_with_a_clear_error(
    settings: config.Settings, tmp_path: Path
) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000)
    result = CliRunner().invoke(main, ["events", "apply", str(path)])
    assert result.exit_code != 0
    assert "nested more than 64 levels deep" in result.output
    assert "Traceback" not in result.output and "RecursionError" not in result.output


def test_sqs_and_sns_message_bodies_refuse_deep_json(settings: config.Settings) -> None:
    from worker import events

    with pytest.raises(events.InvalidNotification, match="nested more than 64"):
        events.handle_sqs_body("[" * 100_000, settings)
    envelope = {"Type": "Notification", "MessageId": "m-1", "Message": "[" * 100_000}
    with pytest.raises(events.InvalidNotification, match="nested more than 64"):
        events.parse_envelope(envelope)


def test_papers_ingest_refuses_deep_json(settings: config.Settings, tmp_path: Path) -> None:
    for fmt, text in (("hf", "[" * 100_000), ("jsonl", '{"a":' * 100_000 + "\n")):
        path = tmp_path / f"deep.{fmt}"
        path.write_text(text)
        result = CliRunner().invoke(main, ["papers", "ingest", str(path), "--format", fmt])
        assert result.exit_code != 0, result.output
        assert "nested more than 64 levels" in result.output
        assert "Traceback" not in result.output
