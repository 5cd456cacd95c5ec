"""No link token in any log line: a real gunicorn (with the Procfile's config module) and
a real `papermail web`, requested over HTTP, their output read back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import free_port
from worker import config, links, migrate
from worker.db import session_scope
from worker.subscribers import SubscriberInput, add_subscriber

BIN = Path(sys.executable).parent
REAL_KEY = "access-log-test-key-" + "x" * 40


def _get(url: str, data: bytes | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait_up(proc: subprocess.Popen[bytes], base: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            if _get(base + "/healthz") == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("server did not answer /healthz within 30 s")


@pytest.fixture
def tokens(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("PAPERMAIL_SECRET_KEY", REAL_KEY)
    config.reset_settings()
    migrate.upgrade()
    settings = config.get_settings()
    with session_scope() as s:
        sub, _ = add_subscriber(s, SubscriberInput("ada@example.org"), confirmed=True)
        sid = sub.id
    good = links.make_token("preferences", {"s": sid}, settings)
    return {
        "good": good,
        "unsubscribe": links.make_token("unsubscribe", {"s": sid}, settings),
        # Valid-looking but not for this purpose: refused, and the refusal is logged.
        "wrong": links.make_token("view", {"s": sid, "d": "2026-11-27"}, settings),
        "cut": good[:-6],
    }


def _exercise(base: str, tokens: dict[str, str]) -> None:
    assert _get(f"{base}/preferences/{tokens['good']}") == 200
    assert _get(f"{base}/preferences/{tokens['good']}?saved=1") == 200
    assert _get(f"{base}/preferences/{tokens['wrong']}") == 400
    assert _get(f"{base}/preferences/{tokens['cut']}") == 400
    assert _get(f"{base}/Preferences/{tokens['good']}") == 404  # a mistyped route
    assert _get(f"{base}/subscribe?token={tokens['good']}") == 200
    assert _get(f"{base}/unsubscribe/{tokens['unsubscribe']}") == 200
    assert _get(f"{base}/preferences/{tokens['good']}%00") == 400  # the guard's log line


def _assert_clean(output: str, tokens: dict[str, str]) -> None:
    for name, value in tokens.items():
        # Every token, and any 16-character piece of its signature.
        assert value not in output, f"{name} token in the log:\n{output}"
        assert value.rsplit(".", 1)[-1][:16] not in output, name
    # The shape of the requests is still there.
    assert "GET /preferences/[token] HTTP/1.1" in output
    assert "GET /preferences/[token]?saved=1 HTTP/1.1" in output
    assert "/unsubscribe/[token]" in output
    assert "/subscribe?token=[token]" in output
    assert "refused preferences link" in output  # the app's own line, with a fingerprint


@pytest.fixture
def server_log(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "server.log"


def _run(argv: list[str], log: Path, port: int, tokens: dict[str, str]) -> str:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_up(proc, base)
            _exercise(base, tokens)
            time.sleep(0.5)  # let the last access lines reach the file
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return log.read_text(errors="replace")


def test_gunicorn_access_log_has_no_tokens(tokens: dict[str, str], server_log: Path) -> None:
    port = free_port()
    argv = [
        str(BIN / "gunicorn"),
        "-c",
        "python:worker.web.gunicorn_conf",
        "worker.web:create_app()",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "1",
        "--no-control-socket",  # parallel test runs must not share ~/.gunicorn/gunicorn.ctl
    ]
    output = _run(argv, server_log, port, tokens)
    _assert_clean(output, tokens)


def test_papermail_web_access_log_has_no_tokens(tokens: dict[str, str], server_log: Path) -> None:
    port = free_port()
    argv = [str(BIN / "papermail"), "web", "--port", str(port)]
    output = _run(argv, server_log, port, tokens)
    assert "serving on" in output
    _assert_clean(output, tokens)


def test_gunicorn_refuses_the_development_key(env: dict[str, str], tmp_path: Path) -> None:
    migrate.upgrade()
    argv = [
        str(BIN / "gunicorn"),
        "-c",
        "python:worker.web.gunicorn_conf",
        "worker.web:create_app()",
        "--bind",
        f"127.0.0.1:{free_port()}",
        "--workers",
        "1",
        "--no-control-socket",  # parallel test runs must not share ~/.gunicorn/gunicorn.ctl
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "public development key" in result.stdout + result.stderr
