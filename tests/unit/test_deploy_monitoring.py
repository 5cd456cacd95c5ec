"""deploy/: the Prometheus scrape configuration and the Grafana dashboard, checked against
docker-compose.yml and against the metrics papermail really exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from worker import config, metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dashboard_exprs() -> list[str]:
    data = json.loads((DEPLOY / "grafana/dashboards/papermail.json").read_text())
    return [t["expr"] for p in data["panels"] for t in p["targets"]]


def test_prometheus_scrapes_the_web_app_and_every_worker() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    services = compose()["services"]
    web = jobs["papermail-web"]
    assert web["metrics_path"] == "/metrics"
    host, port = web["static_configs"][0]["targets"][0].split(":")
    assert host == "web" and f"{port}:{port}" in services["web"]["ports"]
    workers = jobs["papermail-workers"]["dns_sd_configs"][0]
    assert workers["names"] == ["worker"]
    env = services["worker"]["environment"]
    assert str(workers["port"]) == env["PAPERMAIL_METRICS_PORT"]
    assert env["PAPERMAIL_METRICS_DIR"]


def test_compose_mounts_the_files_of_deploy() -> None:
    services = compose()["services"]
    mounts = services["prometheus"]["volumes"] + services["grafana"]["volumes"]
    local = [m.split(":")[0] for m in mounts if m.startswith("./")]
    assert len(local) == 3
    for path in local:
        assert (ROOT / path).exists(), path
    grafana = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert grafana["datasources"][0]["url"] == "http://prometheus:9090"
    uid = grafana["datasources"][0]["uid"]
    data = json.loads((DEPLOY / "grafana/dashboards/papermail.json").read_text())
    assert {p["datasource"]["uid"] for p in data["panels"]} == {uid}


@pytest.mark.redis
def test_every_metric_the_dashboard_uses_is_exposed(
    settings: config.Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAPERMAIL_BROKER_URL", redis_url)
    config.reset_settings()
    metrics.reset()
    metrics.record_alert("unknown", "sent")
    body, _ = metrics.exposition(metrics.registry(config.get_settings()))
    exposed = set()
    for family in text_string_to_metric_families(body.decode()):
        # Declared families count even without samples yet (a labelled counter, no fetch).
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
        exposed |= {family.name + x for x in suffixes.get(family.type, [""])}
        exposed |= {s.name for s in family.samples}
    used = {n for e in dashboard_exprs() for n in re.findall(r"\bpapermail_[a-z_]+", e)}
    assert len(used) >= 15
    assert used - exposed == set()
    metrics.reset()
