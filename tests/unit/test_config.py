from __future__ import annotations

import pytest

from worker import config


def test_defaults_are_embedded_mode(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAPERMAIL_DATABASE_URL")
    s = config.load_settings()
    assert s.database_url == "sqlite:///papermail.db"
    assert s.broker_url is None and s.in_process
    assert s.mailer == "outbox"
    assert s.base_url == "http://papermail.test"


def test_invalid_value_names_the_variable(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAPERMAIL_SEND_RATE", "fast")
    with pytest.raises(config.ConfigError, match="PAPERMAIL_SEND_RATE"):
        config.load_settings()
    monkeypatch.setenv("PAPERMAIL_SEND_RATE", "10")
    monkeypatch.setenv("PAPERMAIL_MAILER", "pigeon")
    with pytest.raises(config.ConfigError, match="PAPERMAIL_MAILER"):
        config.load_settings()


def test_dev_secret_refused_for_real_mailers(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAPERMAIL_MAILER", "ses")
    with pytest.raises(config.ConfigError, match="PAPERMAIL_SECRET_KEY"):
        config.load_settings()
    monkeypatch.setenv("PAPERMAIL_SECRET_KEY", "too-short")
    with pytest.raises(config.ConfigError, match="at least 32"):
        config.load_settings()
    new, old = "n" * 40, "o" * 40
    monkeypatch.setenv("PAPERMAIL_SECRET_KEY", f"{new}, {old}")
    monkeypatch.setenv("PAPERMAIL_BASE_URL", "https://papermail.example.org")
    monkeypatch.setenv("PAPERMAIL_POSTAL_ADDRESS", "Example Lab, 1 Main St, Springfield")
    s = config.load_settings()
    assert s.signing_keys == [new, old]


def test_dotenv_is_read(env: dict[str, str], tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text(
        "PAPERMAIL_CHUNK_SIZE=321\nPAPERMAIL_SNS_TOPIC_ARNS=arn:a,arn:b\n"
    )
    s = config.load_settings()
    assert s.chunk_size == 321
    assert s.sns_topic_arns == ["arn:a", "arn:b"]


def test_postgres_url_uses_psycopg3(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAPERMAIL_DATABASE_URL", "postgresql://u@h/db")
    assert config.load_settings().database_url == "postgresql+psycopg://u@h/db"
