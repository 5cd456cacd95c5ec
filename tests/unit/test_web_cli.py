"""`papermail web`: clear errors before serving (the serving itself is tested in the
browser tests, on a real server)."""

from __future__ import annotations

import socket

from click.testing import CliRunner

from worker.cli import main
from worker.config import Settings


def test_web_is_registered_with_an_example() -> None:
    result = CliRunner().invoke(main, ["web", "--help"])
    assert result.exit_code == 0
    assert "--host" in result.output and "--port" in result.output
    assert "gunicorn -c python:worker.web.gunicorn_conf 'worker.web:create_app()'" in result.output
    assert "--dev" in result.output


def test_port_in_use_is_one_clear_error(settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["web", "--dev", "--port", str(port)])
    assert result.exit_code == 1
    assert f"{port} is in use" in result.output  # werkzeug's own one-line message
    assert "Traceback" not in result.output


def test_missing_schema_is_reported(env: dict[str, str]) -> None:
    result = CliRunner().invoke(main, ["web", "--dev", "--port", "1"])
    assert result.exit_code != 0
    assert "papermail db upgrade" in result.output


def test_bad_port_is_refused() -> None:
    result = CliRunner().invoke(main, ["web", "--port", "70000"])
    assert result.exit_code == 2 and "70000" in result.output


def test_trusted_proxy_sets_client_address(env: dict[str, str], monkeypatch) -> None:
    from flask import request

    from worker import config
    from worker.web import create_app

    monkeypatch.setenv("PAPERMAIL_TRUSTED_PROXIES", "1")
    config.reset_settings()
    app = create_app(dev=True)

    @app.get("/_whoami")
    def whoami() -> str:
        return request.remote_addr or ""

    client = app.test_client()
    r = client.get("/_whoami", headers={"X-Forwarded-For": "203.0.113.9"})
    assert r.text == "203.0.113.9"
    monkeypatch.setenv("PAPERMAIL_TRUSTED_PROXIES", "0")
    config.reset_settings()
    app2 = create_app(dev=True)
    app2.add_url_rule("/_whoami", view_func=whoami)
    r = app2.test_client().get("/_whoami", headers={"X-Forwarded-For": "203.0.113.9"})
    assert r.text != "203.0.113.9"
