"""PAPERMAIL_LOG_FORMAT / PAPERMAIL_LOG_ADDRESSES (worker.logs) in the CLI, Celery and
gunicorn: one JSON object per line, context fields, addresses and tokens redacted."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import date

import pytest

from worker import config, logs

TOKEN = "eyJzIjoxLCJwIjoidW5zdWIifQ.ZzZzZw.abcdefghijklmnopqrstuvwx"


@pytest.fixture
def root_clean() -> Iterator[logging.Logger]:
    """The root logger's handlers and level, put back after the test."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers = []
    try:
        yield root
    finally:
        for h in root.handlers:
            h.close()
        root.handlers, root.level = saved, level


def _settings(**values: object) -> config.Settings:
    return config.load_settings(**values)


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_with_context_and_redaction(env: object, root_clean: logging.Logger) -> None:
    out = io.StringIO()
    logs.configure_logging(_settings(log_format="json"), logging.INFO, stream=out, force=True)
    log = logging.getLogger("worker.delivery")
    with logs.log_context(edition_date=date(2031, 3, 14)):
        log.warning(
            "delivery %s failed: address rejected: ada@example.org, see /preferences/%s",
            7,
            TOKEN,
            extra={"delivery_id": 7, "subscriber_id": 3, "error_kind": "permanent"},
        )
    log.info("sent", extra={"provider_message_id": "0100-abc", "delivery_id": 8})
    try:
        raise ValueError("cannot send to grace@example.org")
    except ValueError:
        log.exception("boom")
    log.debug("not shown at INFO")
    first, second, third = _json_lines(out.getvalue())
    assert list(first)[:4] == ["timestamp", "level", "logger", "message"]
    assert first["level"] == "WARNING" and first["logger"] == "worker.delivery"
    assert first["message"] == (
        "delivery 7 failed: address rejected: [address], see /preferences/[token]"
    )
    assert first["edition_date"] == "2031-03-14"
    assert (first["delivery_id"], first["subscriber_id"], first["error_kind"]) == (
        7,
        3,
        "permanent",
    )
    assert str(first["timestamp"]).endswith("+00:00")
    assert second["provider_message_id"] == "0100-abc" and "edition_date" not in second
    assert "[address]" in str(third["exc_info"]) and "grace@" not in out.getvalue()
    assert "ValueError" in str(third["exc_info"])


def test_addresses_kept_when_allowed(env: object, root_clean: logging.Logger) -> None:
    out = io.StringIO()
    logs.configure_logging(
        _settings(log_format="json", log_addresses=True), logging.INFO, stream=out, force=True
    )
    logging.getLogger("x").warning("to ada@example.org via /unsubscribe/%s", TOKEN)
    (line,) = _json_lines(out.getvalue())
    assert line["message"] == "to ada@example.org via /unsubscribe/[token]"


def test_text_format_is_the_default_and_redacted(env: object, root_clean: logging.Logger) -> None:
    out = io.StringIO()
    logs.configure_logging(_settings(), logging.INFO, stream=out, force=True)
    logging.getLogger("worker.x").warning(
        "ada@example.org at postgresql://app:secret@db.example.org/pm"
    )
    text = out.getvalue()
    assert " WARNING worker.x: [address] at postgresql://app:***@db.example.org/pm" in text
    assert not text.startswith("{")


def test_configure_replaces_its_own_handler_and_leaves_foreign_ones(
    env: object, root_clean: logging.Logger
) -> None:
    root_clean.handlers = []  # pytest's own, added for the test's call
    first = logs.configure_logging(_settings(), stream=io.StringIO())
    second = logs.configure_logging(_settings(log_format="json"), stream=io.StringIO())
    assert root_clean.handlers == [second] and first not in root_clean.handlers
    foreign = logging.StreamHandler(io.StringIO())
    root_clean.handlers = [foreign]
    assert logs.configure_logging(_settings(), stream=io.StringIO()) is None
    assert root_clean.handlers == [foreign]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mailto:Ada.L+news@Lab-1.example.org", "mailto:[address]"),
        ("redis://:pw@redis.internal:6379", "redis://:pw@redis.internal:6379"),
        ("postgresql://postgres@127.0.0.1:5432/db", "postgresql://postgres@127.0.0.1:5432/db"),
        ("<2031-03-14.1.abc@papermail.localhost>", "<[address]>"),
        ("no at sign here", "no at sign here"),
    ],
)
def test_redact_addresses(text: str, expected: str) -> None:
    assert logs.redact_addresses(text) == expected


def test_bad_log_format_names_the_variable(env: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAPERMAIL_LOG_FORMAT", "xml")
    with pytest.raises(config.ConfigError, match="PAPERMAIL_LOG_FORMAT"):
        config.load_settings()
    monkeypatch.setenv("PAPERMAIL_LOG_FORMAT", "text")
    monkeypatch.setenv("PAPERMAIL_LOG_ADDRESSES", "perhaps")
    with pytest.raises(config.ConfigError, match="PAPERMAIL_LOG_ADDRESSES"):
        config.load_settings()
