"""Production guards: public https links for real mailers, no development key on the web,
and no password in any settings error or database error the CLI prints."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from worker import config
from worker.cli import main

REAL_KEY = "k" * 48
ADDRESS = "Example Lab, 1 Main Street, Springfield, USA"


def _ses(monkeypatch: pytest.MonkeyPatch, base_url: str) -> config.Settings:
    monkeypatch.setenv("PAPERMAIL_MAILER", "ses")
    monkeypatch.setenv("PAPERMAIL_SECRET_KEY", REAL_KEY)
    monkeypatch.setenv("PAPERMAIL_BASE_URL", base_url)
    monkeypatch.setenv("PAPERMAIL_POSTAL_ADDRESS", ADDRESS)
    return config.load_settings()


@pytest.mark.parametrize(
    ("base_url", "why"),
    [
        ("http://localhost:8000", "must start with https://"),
        ("http://papermail.example.org", "must start with https://"),
        ("https://localhost:8443", "localhost is this machine"),
        ("https://LOCALHOST.", "localhost is this machine"),
        ("https://papermail.localhost", "papermail.localhost is this machine"),
        ("https://127.0.0.1", "127.0.0.1 is this machine"),
        ("https://127.1.2.3:8443/app", "127.1.2.3 is this machine"),
        ("https://[::1]:8443", "::1 is this machine"),
        ("https://0.0.0.0", "0.0.0.0 is this machine"),
    ],
)
def test_real_mailers_need_a_public_https_base_url(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, base_url: str, why: str
) -> None:
    for mailer in ("ses", "smtp"):
        monkeypatch.setenv("PAPERMAIL_MAILER", mailer)
        monkeypatch.setenv("PAPERMAIL_SECRET_KEY", REAL_KEY)
        monkeypatch.setenv("PAPERMAIL_BASE_URL", base_url)
        with pytest.raises(config.ConfigError) as raised:
            config.load_settings()
        text = str(raised.value)
        assert "PAPERMAIL_BASE_URL" in text and why in text and "RFC 8058" in text


def test_public_https_base_url_is_accepted_and_outbox_keeps_localhost(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _ses(monkeypatch, "https://papermail.example.org/").base_url == (
        "https://papermail.example.org"
    )
    assert _ses(monkeypatch, "https://203.0.113.7:8443").base_url == "https://203.0.113.7:8443"
    monkeypatch.setenv("PAPERMAIL_MAILER", "outbox")
    monkeypatch.setenv("PAPERMAIL_BASE_URL", "http://localhost:8000")
    assert config.load_settings().base_url == "http://localhost:8000"


def test_both_production_problems_are_reported_at_once(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAPERMAIL_MAILER", "ses")
    monkeypatch.setenv("PAPERMAIL_BASE_URL", "http://localhost:8000")
    with pytest.raises(config.ConfigError) as raised:
        config.load_settings()
    assert "PAPERMAIL_SECRET_KEY" in str(raised.value)
    assert "PAPERMAIL_BASE_URL" in str(raised.value)
    assert "PAPERMAIL_POSTAL_ADDRESS" in str(raised.value)


@pytest.mark.parametrize("mailer", ["ses", "smtp"])
def test_real_mailers_need_a_postal_address(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, mailer: str
) -> None:
    monkeypatch.setenv("PAPERMAIL_MAILER", mailer)
    monkeypatch.setenv("PAPERMAIL_SECRET_KEY", REAL_KEY)
    monkeypatch.setenv("PAPERMAIL_BASE_URL", "https://papermail.example.org")
    for missing in ("", "   "):
        monkeypatch.setenv("PAPERMAIL_POSTAL_ADDRESS", missing)
        with pytest.raises(config.ConfigError) as raised:
            config.load_settings()
        assert (
            str(raised.value)
            .splitlines()[1]
            .strip()
            .startswith(
                f"PAPERMAIL_POSTAL_ADDRESS: the sender's postal address is required when "
                f"PAPERMAIL_MAILER is {mailer!r}"
            )
        )
    # Nothing is sent without it: the CLI refuses to start, in one line, no traceback.
    result = CliRunner().invoke(main, ["digest", "run", "--dry-run"])
    assert result.exit_code != 0 and "PAPERMAIL_POSTAL_ADDRESS" in result.output
    assert "Traceback" not in result.output
    monkeypatch.setenv("PAPERMAIL_POSTAL_ADDRESS", "Lab,\n 1 Main St")
    with pytest.raises(config.ConfigError, match="PAPERMAIL_POSTAL_ADDRESS: must be one line"):
        config.load_settings()
    monkeypatch.setenv("PAPERMAIL_POSTAL_ADDRESS", "  Example Lab,   1 Main St  ")
    assert config.load_settings().postal_address_line == "Example Lab, 1 Main St"


def test_outbox_has_a_sample_postal_address(env: dict[str, str]) -> None:
    settings = config.load_settings()
    assert settings.postal_address is None
    assert settings.postal_address_line == config.SAMPLE_POSTAL_ADDRESS
    assert "PAPERMAIL_POSTAL_ADDRESS" in settings.postal_address_line  # says how to set it


# --- no password in settings errors --------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PAPERMAIL_DATABASE_URL", "postgresql://papermail:Sup3rSecret@db:notaport/papermail"),
        ("PAPERMAIL_DATABASE_URL", "postgres//papermail:Sup3rSecret@db/papermail"),
        ("PAPERMAIL_DATABASE_URL", "nosuchdb://papermail:Sup3rSecret@db/papermail"),
        ("PAPERMAIL_DATABASE_URL", "postgresql://papermail:Sup3r@Secret@db:x/papermail"),
        ("PAPERMAIL_BASE_URL", "ftp://admin:Sup3rSecret@papermail.example.org"),
    ],
)
def test_settings_errors_never_echo_a_password(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(config.ConfigError) as raised:
        config.load_settings()
    text = str(raised.value)
    assert name in text
    assert "Sup3r" not in text and "Secret" not in text
    result = CliRunner().invoke(main, ["db", "current"])
    assert result.exit_code == 2 and name in result.output
    assert "Sup3r" not in result.output and "Traceback" not in result.output


def test_secret_settings_are_never_echoed(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAPERMAIL_SECRET_KEY", " , ")
    monkeypatch.setenv("PAPERMAIL_SEND_RATE", "Sup3rSecret")  # a normal setting is echoed
    with pytest.raises(config.ConfigError) as raised:
        config.load_settings()
    text = str(raised.value)
    assert "PAPERMAIL_SECRET_KEY: at least one key is required (got ***)" in text
    assert "PAPERMAIL_SEND_RATE" in text


def test_unreachable_database_is_one_line_without_the_password(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "PAPERMAIL_DATABASE_URL", "postgresql://papermail:Sup3rSecret@127.0.0.1:1/papermail"
    )
    config.reset_settings()
    for args in (["db", "current"], ["db", "upgrade"], ["stats"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0, args
        assert "cannot" in result.output and "database" in result.output
        assert "Sup3rSecret" not in result.output and "Traceback" not in result.output


# --- the web app and the development key ---------------------------------------------


def test_web_refuses_the_development_key_without_dev(settings: config.Settings) -> None:
    result = CliRunner().invoke(main, ["web", "--port", "1"])
    assert result.exit_code == 2
    assert "PAPERMAIL_SECRET_KEY is the public development key" in result.output
    assert "--dev" in result.output and "Traceback" not in result.output


def test_create_app_refuses_the_development_key_unless_dev(
    settings: config.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.web import create_app

    with pytest.raises(config.ConfigError, match="public development key"):
        create_app()
    # A rotation list still holding the development key is refused too.
    monkeypatch.setenv("PAPERMAIL_SECRET_KEY", f"{REAL_KEY},{config.DEV_SECRET_KEY}")
    config.reset_settings()
    with pytest.raises(config.ConfigError, match="public development key"):
        create_app()
    assert create_app(dev=True).url_map is not None
    monkeypatch.setenv("PAPERMAIL_SECRET_KEY", REAL_KEY)
    config.reset_settings()
    assert create_app().test_client().get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "name", ["PAPERMAIL_BROKER_URL", "PAPERMAIL_SES_ENDPOINT_URL", "PAPERMAIL_SQS_QUEUE_URL"]
)
def test_bad_service_urls_are_refused_without_their_password(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    for value in ("redis://:Sup3rSecret@redis:port/0", "redis//user:Sup3rSecret@redis/0"):
        monkeypatch.setenv(name, value)
        with pytest.raises(config.ConfigError) as raised:
            config.load_settings()
        assert name in str(raised.value) and "Sup3r" not in str(raised.value)
    monkeypatch.setenv(name, "redis://:Sup3rSecret@redis:6379/0")
    assert config.load_settings()


def test_unreachable_broker_is_one_line_without_the_password(
    settings: config.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    added = CliRunner().invoke(main, ["subscribers", "add", "ada@example.org", "--confirmed"])
    assert added.exit_code == 0, added.output
    monkeypatch.setenv("PAPERMAIL_BROKER_URL", f"redis://:Sup3rSecret@127.0.0.1:{port}/0")
    config.reset_settings()
    result = CliRunner().invoke(main, ["digest", "run"])
    assert result.exit_code == 1
    assert "cannot reach the broker (PAPERMAIL_BROKER_URL)" in result.output
    assert "Sup3rSecret" not in result.output and "Traceback" not in result.output
