"""JSON logs from real processes: the `papermail` CLI and a Celery worker
(PAPERMAIL_LOG_FORMAT=json, worker.logs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _run(args: list[str], env_vars: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAPERMAIL_")}
    env.update(env_vars)
    return subprocess.run(
        args, env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_process_logs_json(env: dict[str, str], tmp_path: Path) -> None:
    """A real `papermail` process, -v: its warnings as JSON lines on stderr."""
    papermail = str(Path(sys.executable).with_name("papermail"))
    base = {**env, "PAPERMAIL_LOG_FORMAT": "json"}
    assert _run([papermail, "db", "upgrade"], base, tmp_path).returncode == 0
    r = _run(
        [papermail, "-v", "subscribers", "add", "ada@example.org", "--confirmed"], base, tmp_path
    )
    assert r.returncode == 0, r.stderr
    r = _run([papermail, "-vv", "demo"], base, tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.startswith("{")]
    assert lines, r.stderr
    for line in lines:
        data = json.loads(line)
        assert {"timestamp", "level", "logger", "message"} <= set(data)
    assert "ada@example.org" not in r.stderr


@pytest.mark.redis
def test_celery_worker_logs_json(env: dict[str, str], redis_url: str, tmp_path: Path) -> None:
    """A Celery worker subprocess with PAPERMAIL_LOG_FORMAT=json: its start-up lines, from
    Celery's own loggers, are JSON objects."""
    celery = str(Path(sys.executable).with_name("celery"))
    proc = subprocess.Popen(
        [celery, "-A", "worker.tasks", "worker", "--pool", "solo", "--loglevel", "INFO",
         "-Q", "nothing-here", "--without-mingle", "--without-gossip", "--without-heartbeat"],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("PAPERMAIL_")},
            **env,
            "PAPERMAIL_BROKER_URL": redis_url,
            "PAPERMAIL_LOG_FORMAT": "json",
        },
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,  # Celery's banner
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and not any("ready" in line for line in lines):
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        reader.join(timeout=10)
    assert any("ready" in line for line in lines), "".join(lines)[-3000:]
    parsed = [json.loads(line) for line in lines if line.strip()]  # every line is JSON
    assert any(str(d["logger"]).startswith("celery") for d in parsed), parsed
    assert all({"timestamp", "level", "logger", "message"} <= set(d) for d in parsed)
