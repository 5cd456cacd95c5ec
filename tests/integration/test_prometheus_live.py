"""A real Prometheus server scrapes a real `papermail metrics` and `papermail web`, with
the scrape configuration of deploy/prometheus.yml, and answers every query of the Grafana
dashboard (deploy/grafana/dashboards/papermail.json).

Only the targets differ from the shipped file (Docker's service names and DNS discovery
become 127.0.0.1 ports) and the scrape interval (1 s instead of 15 s). Grafana itself is
not run: the dashboard's queries are PromQL sent to this Prometheus, as Grafana sends them.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import skip_loudly
from tests.integration.conftest import free_port
from tests.unit.test_deploy_monitoring import DEPLOY, dashboard_exprs

pytestmark = [pytest.mark.slow, pytest.mark.redis]

PAPERMAIL = str(Path(sys.executable).with_name("papermail"))


def _child_env(env: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PAPERMAIL_")}
    return {**base, **env, **extra}


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _query(base: str, expr: str) -> dict[str, Any]:
    try:
        return _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    except urllib.error.HTTPError as exc:  # a PromQL error is HTTP 400 with a JSON body
        return json.loads(exc.read())


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except (OSError, urllib.error.URLError):
            time.sleep(0.2)
    pytest.fail(f"{what} did not answer at {url}")


def local_config(web_port: int, metrics_port: int) -> dict[str, Any]:
    """deploy/prometheus.yml with its targets on this machine's ports."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    ports = {"papermail-web": web_port, "papermail-workers": metrics_port}
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports.pop(job['job_name'])}"]}]
    assert ports == {}, f"deploy/prometheus.yml lacks the jobs {sorted(ports)}"
    return config


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.terminate()
    for proc in started:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_prometheus_scrapes_papermail_and_answers_the_dashboard(
    env: dict[str, str],
    redis_url: str,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prometheus and promtool):
        skip_loudly("Prometheus is not installed (Debian: apt install prometheus)")
    checked = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # One edition sent, its counters written to the metrics directory as workers write them.
    child_env = _child_env(
        env,
        {"PAPERMAIL_METRICS_DIR": str(tmp_path / "metrics"), "PAPERMAIL_BROKER_URL": redis_url},
    )
    demo = subprocess.run(
        [PAPERMAIL, "demo"], env=child_env, cwd=tmp_path, capture_output=True, text=True,
        timeout=180, check=False,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr
    database = sqlite3.connect(tmp_path / "papermail.db")
    (edition,) = database.execute("SELECT max(edition_date) FROM deliveries").fetchone()
    by_state = dict(
        database.execute(
            "SELECT state, count(*) FROM deliveries WHERE edition_date = ? GROUP BY state",
            (edition,),
        ).fetchall()
    )
    database.close()
    assert by_state.get("sent", 0) >= 1, by_state

    metrics_port, web_port, prom_port = free_port(), free_port(), free_port()
    processes.append(subprocess.Popen(
        [PAPERMAIL, "metrics", "--host", "127.0.0.1", "--port", str(metrics_port)],
        env=child_env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ))  # fmt: skip
    # As in docker-compose.yml: the web process counts for itself, the worker host's
    # server reads the workers' directory (two readers of one directory count it twice).
    web_env = {k: v for k, v in child_env.items() if k != "PAPERMAIL_METRICS_DIR"}
    processes.append(subprocess.Popen(
        [PAPERMAIL, "web", "--dev", "--host", "127.0.0.1", "--port", str(web_port)],
        env=web_env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ))  # fmt: skip
    _wait_http(f"http://127.0.0.1:{metrics_port}/metrics", processes[0], "papermail metrics")
    _wait_http(f"http://127.0.0.1:{web_port}/metrics", processes[1], "papermail web")

    # What papermail exposes passes Prometheus's own lint (names, units, _total suffixes).
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=5) as r:
        exposition = r.read()
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, check=False
    )
    assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()

    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(local_config(web_port, metrics_port)))
    processes.append(subprocess.Popen(
        [prometheus, f"--config.file={config_file}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ))  # fmt: skip
    base = f"http://127.0.0.1:{prom_port}"
    _wait_http(f"{base}/-/ready", processes[2], "prometheus")

    # Both jobs up, and a few scrapes in (rate() needs two samples).
    deadline = time.monotonic() + 60
    while True:
        targets = _get(f"{base}/api/v1/targets")["data"]["activeTargets"]
        health = {t["labels"]["job"]: (t["health"], t["lastError"]) for t in targets}
        up = _query(base, "count_over_time(up[1m])")["data"]["result"]
        if (
            set(health) == {"papermail-web", "papermail-workers"}
            and all(h == "up" for h, _ in health.values())
            and len(up) == 2
            and all(int(r["value"][1]) >= 3 for r in up)
        ):
            break
        assert time.monotonic() < deadline, f"targets not up: {health}"
        time.sleep(0.5)

    # Every panel's query is valid PromQL over series that exist.
    for expr in dashboard_exprs():
        answer = _query(base, expr)
        assert answer["status"] == "success", (expr, answer)

    def values(expr: str, label: str) -> dict[str, float]:
        result = _query(base, expr)["data"]["result"]
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}

    # The figures are papermail's: the edition as the database holds it, the demo's sends
    # as the workers' metrics directory counted them.
    scraped = values("max by (state) (papermail_edition_deliveries)", "state")
    for state, count in by_state.items():
        assert scraped[state] == count, (state, scraped)
    sent = values("sum(papermail_emails_sent_total)", "")
    assert sent == {"": float(by_state["sent"])}
    assert values("min by (part) (papermail_scrape_ok)", "part")["database"] == 1
