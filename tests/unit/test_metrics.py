"""Prometheus metrics: the send path's counters, prefork processes adding up, the edition
gauges read at scrape time, and /metrics on the web app and `papermail metrics`."""

from __future__ import annotations

import multiprocessing
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FIXED_NOW
from tests.unit.test_delivery import ScriptedMailer, run
from worker import config, delivery, metrics
from worker.cli import main
from worker.config import ConfigError, Settings, load_settings
from worker.db import session_scope
from worker.mailers.errors import AmbiguousError, PermanentError, ThrottledError, TransientError
from worker.models import Delivery, PaperFetch, Subscriber

TOKEN = "t" * 32


@pytest.fixture(autouse=True)
def fresh_metrics() -> Iterator[None]:
    metrics.reset()
    yield
    metrics.reset()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(settings: Settings, *, editions: bool = True) -> dict:
    body, _ = metrics.exposition(
        metrics.registry(settings, editions=editions, clock=lambda: FIXED_NOW)
    )
    return samples(body.decode())


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def world(settings: Settings) -> Settings:
    from tests.unit.test_delivery import add_sub, seed_papers

    with session_scope() as s:
        seed_papers(s)
        for name in ("ada", "grace", "alan", "kat", "bob"):
            add_sub(s, f"{name}@example.org", [])
    return settings


def planned(settings: Settings) -> list[int]:
    from tests.unit.test_delivery import NOW, TODAY

    with session_scope() as s:
        return delivery.plan_edition(s, TODAY, now=NOW).pending_ids


# ---------------------------------------------------------------------------------------
# The send path


def test_a_chunk_counts_sends_latency_wait_and_duration(world: Settings) -> None:
    ids = planned(world)
    out = run(ids, ScriptedMailer(), world)
    assert out.sent == 5
    found = scrape(world, editions=False)
    assert value(found, "papermail_emails_sent_total") == 5
    assert value(found, "papermail_send_latency_seconds_count") == 5
    assert value(found, "papermail_chunk_duration_seconds_count") == 1
    # One batch per SEND_CONCURRENCY (1 at the default rate): one wait observed each.
    assert value(found, "papermail_ratelimit_wait_seconds_count") == 5
    assert value(found, "papermail_chunk_duration_seconds_sum") > 0


def test_failures_are_counted_by_what_became_of_them_and_their_kind(world: Settings) -> None:
    ids = planned(world)
    script = [
        PermanentError("MessageRejected"),
        TransientError("503"),
        ThrottledError("slow down"),
        AmbiguousError("read timeout"),
        None,
    ]
    out = run(ids, ScriptedMailer(script), world)
    assert (out.sent, out.failed, out.unknown, len(out.retry)) == (1, 1, 1, 2)
    found = scrape(world, editions=False)
    assert value(found, "papermail_emails_sent_total") == 1
    assert value(found, "papermail_emails_failed_total", kind="permanent") == 1
    assert value(found, "papermail_emails_retried_total", kind="transient") == 1
    assert value(found, "papermail_emails_retried_total", kind="throttled") == 1
    assert value(found, "papermail_emails_unknown_total", kind="ambiguous") == 1
    # Every provider call is timed, answered or not.
    assert value(found, "papermail_send_latency_seconds_count") == 5


def test_deliveries_settled_before_sending_are_counted(world: Settings) -> None:
    with session_scope() as s:
        s.query(Subscriber).filter_by(email="kat@example.org").update({"timezone": "Mars/Base"})
    ids = planned(world)
    out = run(ids, ScriptedMailer(), world)
    assert out.failed == 1  # bad subscriber data: fails alone, before any send
    found = scrape(world, editions=False)
    assert value(found, "papermail_emails_failed_total", kind="prepare") == 1
    assert value(found, "papermail_emails_sent_total") == 4


def test_batched_latencies_are_the_figures_of_one_observe_each(env: dict[str, str]) -> None:
    from prometheus_client import CollectorRegistry, Histogram

    values = [0.001, 0.005, 0.0051, 0.3, 2.5, 19.0, 25.0, 0.05, 0.05]
    metrics.record_batch(len(values), values[:4])
    metrics.record_batch(0, values[4:])
    metrics.flush()
    reference = Histogram("ref", "", buckets=metrics.LATENCY_BUCKETS, registry=CollectorRegistry())
    for v in values:
        reference.observe(v)
    mine = {
        s.labels.get("le", s.name.rsplit("_", 1)[1]): s.value
        for s in next(iter(metrics.worker_metrics().latency.collect())).samples
        if not s.name.endswith("_created")
    }
    theirs = {
        s.labels.get("le", s.name.rsplit("_", 1)[1]): s.value
        for s in next(iter(reference.collect())).samples
        if not s.name.endswith("_created")
    }
    assert mine == pytest.approx(theirs) and mine["count"] == 9
    assert not metrics.worker_metrics()._latency.direct  # the batched path was taken


# ---------------------------------------------------------------------------------------
# Prefork: every process writes its own file, one scrape adds them up


def _child_sends(directory: str, n: int) -> None:
    metrics.reset()
    metrics.configure(load_settings(metrics_dir=directory))
    metrics.record_batch(n, [0.01] * n, [("failed", "permanent")])
    metrics.observe_chunk(1.5)


def test_prefork_processes_add_up_in_the_metrics_directory(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "metrics"
    monkeypatch.setenv("PAPERMAIL_METRICS_DIR", str(directory))
    config.reset_settings()
    settings = config.get_settings()
    # The parent configures and counts before forking, as Celery's worker_init does.
    metrics.configure(settings)
    metrics.record_batch(1, [0.02])
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=_child_sends, args=(str(directory), n)) for n in (3, 4)]
    for child in children:
        child.start()
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    files = sorted(p.name for p in directory.glob("*.db"))
    assert len([f for f in files if f.startswith("counter_")]) == 3  # parent + 2 children
    found = scrape(settings, editions=False)
    assert value(found, "papermail_emails_sent_total") == 8
    assert value(found, "papermail_emails_failed_total", kind="permanent") == 2
    assert value(found, "papermail_send_latency_seconds_count") == 8
    assert value(found, "papermail_chunk_duration_seconds_count") == 2
    # A pool process that exits: its live gauges go, its counters keep counting.
    dead = children[0].pid
    (directory / f"gauge_livesum_{dead}.db").write_bytes(b"")
    from worker.tasks import _pool_process_exit

    _pool_process_exit(pid=dead)
    assert not (directory / f"gauge_livesum_{dead}.db").exists()
    assert value(scrape(settings, editions=False), "papermail_emails_sent_total") == 8
    # A worker starting on this host empties what a previous run left.
    left = len(list(directory.glob("*.db")))
    assert left >= 3 and metrics.wipe_directory(directory) == left
    assert list(directory.glob("*.db")) == []


# ---------------------------------------------------------------------------------------
# The edition gauges


def _deliveries(session, states: dict[str, int]) -> None:
    today = FIXED_NOW.date()
    n = 0
    for state, count in states.items():
        for _ in range(count):
            n += 1
            sub = Subscriber(email=f"s{n}@example.org", status="active", topics=[])
            session.add(sub)
            session.flush()
            session.add(
                Delivery(
                    subscriber_id=sub.id,
                    edition_date=today,
                    state=state,
                    created_at=FIXED_NOW - timedelta(minutes=10 * n),
                )
            )


def test_edition_gauges_are_read_from_the_database(settings: Settings) -> None:
    with session_scope() as s:
        _deliveries(s, {"sent": 3, "pending": 2, "unknown": 1, "failed": 1})
        s.add(
            PaperFetch(
                source="hf",
                fetch_date=FIXED_NOW.date(),
                status="ok",
                started_at=FIXED_NOW - timedelta(hours=1),
                finished_at=FIXED_NOW - timedelta(minutes=59),
            )
        )
        s.add(
            PaperFetch(
                source="hf",
                fetch_date=FIXED_NOW.date(),
                status="failed",
                started_at=FIXED_NOW - timedelta(minutes=5),
                finished_at=FIXED_NOW - timedelta(minutes=4),
            )
        )
        delivery.pause_sending(s, "checking", by="cli")
    found = scrape(settings)
    assert value(found, "papermail_edition_deliveries", state="sent") == 3
    assert value(found, "papermail_edition_deliveries", state="pending") == 2
    assert value(found, "papermail_edition_deliveries", state="unknown") == 1
    assert value(found, "papermail_edition_deliveries", state="delivered") == 0
    # The pending rows are the 4th and 5th created: 40 and 50 minutes old.
    assert value(found, "papermail_edition_oldest_pending_age_seconds") == pytest.approx(3000, 1)
    assert value(found, "papermail_edition_accepted") == 3
    assert value(found, "papermail_sending_paused") == 1
    last = value(found, "papermail_paper_fetch_last_success_timestamp_seconds", source="hf")
    assert last == pytest.approx((FIXED_NOW - timedelta(minutes=59)).timestamp())
    assert value(found, "papermail_rate_threshold", rate="bounce", level="warning") == 0.025
    assert value(found, "papermail_scrape_ok", part="database") == 1


def test_an_unreadable_database_is_a_gauge_not_a_failed_scrape(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAPERMAIL_DATABASE_URL", f"sqlite:///{tmp_path}/missing/dir/x.db")
    config.reset_settings()
    found = scrape(config.get_settings())
    assert value(found, "papermail_scrape_ok", part="database") == 0
    assert ("papermail_emails_sent_total", ()) in found


@pytest.mark.redis
def test_queue_depth_is_read_from_redis(
    settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.rpush("send", "a", "b")
    client.rpush("send\x06\x163", "c")  # kombu's list of priority 3
    client.rpush("plan", "d")
    monkeypatch.setenv("PAPERMAIL_BROKER_URL", redis_url)
    config.reset_settings()
    found = scrape(config.get_settings())
    assert value(found, "papermail_queue_depth", queue="send") == 3
    assert value(found, "papermail_queue_depth", queue="plan") == 1
    assert value(found, "papermail_scrape_ok", part="broker") == 1


def test_queue_names_are_the_celery_queues() -> None:
    from worker.tasks import PLAN_QUEUE, SEND_QUEUE

    assert set(metrics.QUEUES) == {PLAN_QUEUE, SEND_QUEUE}


# ---------------------------------------------------------------------------------------
# Serving


def test_web_metrics_with_and_without_the_bearer_token(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.web import create_app

    monkeypatch.setenv("PAPERMAIL_METRICS_TOKEN", TOKEN)
    config.reset_settings()
    client = create_app(config.get_settings(), dev=True).test_client()
    assert client.get("/metrics").status_code == 401
    bad = client.get("/metrics", headers={"Authorization": "Bearer " + "x" * 32})
    assert bad.status_code == 401
    good = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert good.status_code == 200
    assert good.headers["Content-Type"].startswith("text/plain; version=")
    assert b"papermail_edition_deliveries" in good.data
    assert b"papermail_emails_sent_total" in good.data


def test_web_metrics_are_open_without_a_token(settings: Settings) -> None:
    from worker.web import create_app

    client = create_app(settings, dev=True).test_client()
    assert client.get("/metrics").status_code == 200


def test_the_metrics_server_answers_over_http(settings: Settings) -> None:
    settings = load_settings(metrics_token=TOKEN)
    server, thread = metrics.serve(settings, "127.0.0.1", 0, editions=True)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=5)
        assert refused.value.code == 401
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            text = answer.read().decode()
        assert "papermail_edition_deliveries" in text
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/nope", timeout=5)
        assert missing.value.code == 404
    finally:
        server.shutdown()
        thread.join(5)


def test_cli_metrics_once_prints_a_scrape(settings: Settings) -> None:
    result = CliRunner().invoke(main, ["metrics", "--once"])
    assert result.exit_code == 0, result.output
    found = samples(result.output)
    assert ("papermail_scrape_ok", (("part", "database"),)) in found


def test_cli_metrics_refuses_a_taken_port(settings: Settings) -> None:
    server, thread = metrics.serve(settings, "127.0.0.1", 0, editions=False)
    try:
        result = CliRunner().invoke(
            main, ["metrics", "--host", "127.0.0.1", "--port", str(server.server_port)]
        )
        assert result.exit_code == 1
        assert f"cannot listen on 127.0.0.1:{server.server_port}" in result.output
    finally:
        server.shutdown()
        thread.join(5)


# ---------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bounce_rate_warning": 0.05}, "PAPERMAIL_BOUNCE_RATE_WARNING (0.05) must be below"),
        ({"complaint_rate_warning": 0.002}, "PAPERMAIL_COMPLAINT_RATE_WARNING"),
        ({"metrics_token": "short"}, "PAPERMAIL_METRICS_TOKEN: must be at least 16"),
        ({"alert_webhook_url": "hooks.slack.com/x"}, "PAPERMAIL_ALERT_WEBHOOK_URL: must be an"),
        ({"metrics_port": 0}, "PAPERMAIL_METRICS_PORT"),
        ({"edition_deadline_minutes": 1}, "PAPERMAIL_EDITION_DEADLINE_MINUTES"),
    ],
)
def test_bad_monitoring_settings_are_refused_by_name(
    env: dict[str, str], overrides: dict, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(**overrides)
    assert message in str(err.value)
    assert "hooks.slack.com" not in str(err.value)  # the webhook URL is a secret


def test_prometheus_env_follows_the_setting(env: dict[str, str], tmp_path: Path) -> None:
    metrics.configure(load_settings(metrics_dir=tmp_path / "m"))
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "m")
    metrics.configure(load_settings())
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
