"""Alerts posted to a real local HTTP receiver (a thread-run http.server), once each."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from tests.conftest import FIXED_NOW
from worker import alerts, config, delivery
from worker.cli import main
from worker.config import Settings
from worker.db import session_scope
from worker.models import Alert, Delivery, PaperFetch, ProviderEvent, Subscriber

TODAY = FIXED_NOW.date()


class Receiver:
    """A webhook endpoint: records each POST's JSON; answers the scripted statuses first
    (then 200), after ``delay`` seconds."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.requests = 0
        self.statuses: list[int] = []
        self.delay = 0.0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                receiver.requests += 1
                if receiver.delay:
                    time.sleep(receiver.delay)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                if status == 200:
                    assert self.headers["Content-Type"] == "application/json"
                    receiver.bodies.append(json.loads(body))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/SECRETPATH"

    @property
    def texts(self) -> list[str]:
        return [b["text"] for b in self.bodies]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def alerting(settings: Settings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("PAPERMAIL_ALERT_WEBHOOK_URL", receiver.url)
    monkeypatch.setenv("PAPERMAIL_ALERT_RETRIES", "2")
    monkeypatch.setenv("PAPERMAIL_ALERT_TIMEOUT_SECONDS", "1")
    config.reset_settings()
    return config.get_settings()


def clock_at(now=FIXED_NOW):
    return lambda: now


def add_deliveries(session, state: str, count: int, *, age_minutes: int = 0, day=TODAY) -> None:
    base = session.query(Subscriber).count()
    for n in range(count):
        sub = Subscriber(email=f"s{base + n}@example.org", status="active", topics=[])
        session.add(sub)
        session.flush()
        at = FIXED_NOW - timedelta(minutes=age_minutes)
        session.add(
            Delivery(
                subscriber_id=sub.id,
                edition_date=day,
                state=state,
                created_at=at,
                scheduled_at=at,
                message_id=f"m-{state}-{base + n}" if state in ("sent", "bounced") else None,
            )
        )
    session.flush()


# ---------------------------------------------------------------------------------------
# Each kind, with what happened and the command to run


def test_unknown_deliveries_are_alerted_once_with_the_command(
    alerting: Settings, receiver: Receiver
) -> None:
    with session_scope() as s:
        add_deliveries(s, "unknown", 3)
    first = alerts.check(alerting, clock=clock_at())
    again = alerts.check(alerting, clock=clock_at(FIXED_NOW + timedelta(minutes=5)))
    assert first.sent == [f"unknown:{TODAY}"] and again.sent == []
    assert again.already == [f"unknown:{TODAY}"]
    assert len(receiver.texts) == 1
    text = receiver.texts[0]
    assert "3 `unknown` deliveries" in text
    assert f"papermail resend --date {TODAY} --state unknown --dry-run" in text
    assert text.startswith("[papermail papermail.test] ")
    with session_scope() as s:
        row = s.scalars(select(Alert)).one()
        assert row.sent_at == FIXED_NOW  # the first check's, by the injected clock
        assert row.kind == "unknown" and row.edition_date == TODAY and row.attempts == 1


def test_each_pause_is_alerted_with_who_paused_and_how_to_resume(
    alerting: Settings, receiver: Receiver
) -> None:
    with session_scope() as s:
        delivery.pause_sending(s, "reputation guard: edition over 5%", by="reputation-guard")
    alerts.check(alerting, clock=clock_at())
    alerts.check(alerting, clock=clock_at())
    assert len(receiver.texts) == 1
    assert "PAUSED by the reputation guard" in receiver.texts[0]
    assert "`papermail sending resume`" in receiver.texts[0]
    assert "`papermail stats`" in receiver.texts[0]
    # Resumed, then paused again later (another instant): a new alert.
    with session_scope() as s:
        delivery.resume_sending(s)
    assert alerts.check(alerting, clock=clock_at()).findings == []
    from worker import clock

    with clock.installed(clock_at(FIXED_NOW + timedelta(hours=1))), session_scope() as s:
        delivery.pause_sending(s, "SES account paused", by="system")
    alerts.check(alerting, clock=clock_at())
    assert len(receiver.texts) == 2
    assert "after the provider refused to send: SES account paused" in receiver.texts[1]


def test_an_operator_pause_alerts_at_once(
    alerting: Settings, receiver: Receiver, settings: Settings
) -> None:
    result = CliRunner().invoke(main, ["sending", "pause", "--reason", "looking at bounces"])
    assert result.exit_code == 0, result.output
    assert len(receiver.texts) == 1
    assert "PAUSED by an operator: looking at bounces" in receiver.texts[0]


def test_an_edition_late_past_its_deadline(alerting: Settings, receiver: Receiver) -> None:
    deadline = alerting.edition_deadline_minutes
    with session_scope() as s:
        add_deliveries(s, "pending", 2, age_minutes=deadline + 30)
        add_deliveries(s, "sending", 1, age_minutes=deadline + 5)
        add_deliveries(s, "pending", 5, age_minutes=deadline - 10)  # not late yet
        add_deliveries(s, "sent", 4, age_minutes=deadline + 60)
    result = alerts.check(alerting, clock=clock_at())
    assert result.sent == [f"deadline:{TODAY}"]
    text = receiver.texts[0]
    assert f"Edition {TODAY} is not finished: 3 deliveries" in text
    assert f"`papermail stats --date {TODAY}`" in text


def test_rates_past_the_warning_level(alerting: Settings, receiver: Receiver) -> None:
    with session_scope() as s:
        add_deliveries(s, "sent", 200)
        add_deliveries(s, "bounced", 6)  # 6 / 206 = 2.9%: over 2.5%, under 5%
        bounced = s.scalars(select(Delivery).where(Delivery.state == "bounced")).all()
        for d in bounced:
            s.add(
                ProviderEvent(
                    dedupe_key=f"k{d.id}",
                    event_type="Bounce",
                    subtype="Permanent/General",
                    provider_message_id=d.message_id,
                    delivery_id=d.id,
                    recipients=[],
                    raw={},
                )
            )
    result = alerts.check(alerting, clock=clock_at())
    assert result.sent == [f"bounce_rate:{TODAY}"]
    text = receiver.texts[0]
    assert "bounce rate 2.91% (6 hard bounces of 206 accepted)" in text
    assert "warning level 2.50%" in text and "5.00%" in text


def test_a_failed_fetch_until_it_succeeds(
    alerting: Settings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAPERMAIL_SOURCES", "hf")
    config.reset_settings()
    settings = config.get_settings()
    with session_scope() as s:
        s.add(PaperFetch(source="hf", fetch_date=TODAY, status="failed", error="HTTP 502"))
    result = alerts.check(settings, clock=clock_at())
    assert result.sent == [f"fetch_failed:{TODAY}:hf"]
    assert "The hf paper fetch for" in receiver.texts[0]
    assert f"`papermail papers fetch --source hf --date {TODAY}`" in receiver.texts[0]
    with session_scope() as s:
        s.add(PaperFetch(source="hf", fetch_date=TODAY, status="ok"))
    assert alerts.check(settings, clock=clock_at()).findings == []


def test_the_fetch_task_alerts_at_the_failure(
    alerting: Settings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAPERMAIL_SOURCES", "hf")
    # Nothing listens there: a connection error, retried, then a failed fetch.
    monkeypatch.setenv("PAPERMAIL_HF_API_URL", "http://127.0.0.1:9/api/daily_papers")
    monkeypatch.setenv("PAPERMAIL_FETCH_RETRIES", "0")
    monkeypatch.setenv("PAPERMAIL_FETCH_AT", "00:00")
    config.reset_settings()
    from worker.tasks import fetch_papers

    summary = fetch_papers.run()
    assert summary["fetched"] == {"hf": "failed"}
    assert len(receiver.texts) == 1 and "hf paper fetch" in receiver.texts[0]


# ---------------------------------------------------------------------------------------
# HTTP: retries, timeout, failures never break the caller


def test_a_5xx_is_retried_then_posted(alerting: Settings, receiver: Receiver) -> None:
    receiver.statuses = [503, 500]
    with session_scope() as s:
        add_deliveries(s, "unknown", 1)
    result = alerts.check(alerting, clock=clock_at())
    assert result.sent == [f"unknown:{TODAY}"]
    assert receiver.requests == 3 and len(receiver.texts) == 1


def test_a_post_that_keeps_failing_is_logged_and_tried_at_the_next_check(
    alerting: Settings, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [500] * 3  # the first try and both retries
    with session_scope() as s:
        add_deliveries(s, "unknown", 1)
    result = alerts.check(alerting, clock=clock_at())
    assert result.sent == [] and result.failed == {
        f"unknown:{TODAY}": "127.0.0.1 answered HTTP 500"
    }
    assert "not posted" in caplog.text and "SECRETPATH" not in caplog.text
    with session_scope() as s:
        row = s.scalars(select(Alert)).one()
        assert row.sent_at is None and row.claimed_at is None and "500" in row.last_error
    again = alerts.check(alerting, clock=clock_at())
    assert again.sent == [f"unknown:{TODAY}"] and len(receiver.texts) == 1


def test_a_slow_webhook_times_out_without_raising(alerting: Settings, receiver: Receiver) -> None:
    receiver.delay = 1.5  # the timeout is 1 s
    webhook = alerts.HttpWebhook(receiver.url, timeout=0.3, retries=0)
    with session_scope() as s:
        add_deliveries(s, "unknown", 1)
    started = time.monotonic()
    result = alerts.check(alerting, webhook=webhook, clock=clock_at())
    assert time.monotonic() - started < 1.4
    assert result.failed == {f"unknown:{TODAY}": "no answer from 127.0.0.1 within 0.3 s"}


def test_an_unreachable_webhook_never_stops_the_send_task(
    alerting: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PAPERMAIL_ALERT_WEBHOOK_URL", "http://127.0.0.1:9/hooks/SECRETPATH")
    config.reset_settings()
    with session_scope() as s:
        delivery.pause_sending(s, "by hand", by="cli")
    alerts.check_quietly(kinds=["paused"])  # logs, returns
    with session_scope() as s:
        assert s.scalars(select(Alert)).one().last_error == "cannot connect to 127.0.0.1"
    assert "Retrying" in caplog.text and "SECRETPATH" not in caplog.text


# ---------------------------------------------------------------------------------------
# Once, whoever checks


def _check_at_once(settings: Settings, receiver: Receiver, checkers: int) -> None:
    """``checkers`` threads check at once while a post is in flight: one alert in all."""
    receiver.delay = 0.2
    with session_scope() as s:
        add_deliveries(s, "unknown", 2)
    results: list[alerts.CheckResult] = []
    threads = [
        threading.Thread(target=lambda: results.append(alerts.check(settings, clock=clock_at())))
        for _ in range(checkers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(receiver.texts) == 1
    assert sum(len(r.sent) for r in results) == 1


def test_concurrent_checks_post_once(alerting: Settings, receiver: Receiver) -> None:
    _check_at_once(alerting, receiver, 4)


@pytest.mark.postgres
def test_concurrent_checks_post_once_on_postgres(
    pg_env: dict[str, str], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAPERMAIL_ALERT_WEBHOOK_URL", receiver.url)
    config.reset_settings()
    _check_at_once(config.get_settings(), receiver, 6)


def test_without_a_webhook_nothing_is_stored(settings: Settings) -> None:
    with session_scope() as s:
        add_deliveries(s, "unknown", 1)
    result = alerts.check(settings, clock=clock_at())
    assert [f.kind for f in result.findings] == ["unknown"] and result.sent == []
    with session_scope() as s:
        assert s.scalars(select(Alert)).all() == []


# ---------------------------------------------------------------------------------------
# Beat and command line


def test_the_beat_checks_every_few_minutes_when_configured(alerting: Settings) -> None:
    from worker.tasks import beat_schedule

    entry = beat_schedule(alerting)["check-alerts"]
    assert entry["task"] == "papermail.check_alerts"
    assert str(entry["schedule"]).startswith("<crontab: */5")
    assert "check-alerts" not in beat_schedule(config.load_settings(alert_webhook_url=None))


def test_the_beat_task_posts(alerting: Settings, receiver: Receiver) -> None:
    from worker.tasks import check_alerts

    with session_scope() as s:
        add_deliveries(s, "unknown", 1)
    summary = check_alerts.run()
    assert summary["sent"] == [f"unknown:{TODAY}"] and len(receiver.texts) == 1


def test_cli_check_dry_run_json_posts_nothing(alerting: Settings, receiver: Receiver) -> None:
    with session_scope() as s:
        add_deliveries(s, "unknown", 1)
    result = CliRunner().invoke(main, ["alerts", "check", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [f["key"] for f in data["findings"]] == [f"unknown:{TODAY}"]
    assert receiver.requests == 0
    result = CliRunner().invoke(main, ["alerts", "check"])
    assert result.exit_code == 0 and f"unknown:{TODAY}: posted" in result.output


def test_cli_check_exits_1_when_a_post_failed(alerting: Settings, receiver: Receiver) -> None:
    receiver.statuses = [500] * 3
    with session_scope() as s:
        add_deliveries(s, "unknown", 1)
    result = CliRunner().invoke(main, ["alerts", "check"])
    assert result.exit_code == 1 and "NOT POSTED (127.0.0.1 answered HTTP 500)" in result.output


def test_cli_check_without_a_webhook_is_one_clear_error(settings: Settings) -> None:
    result = CliRunner().invoke(main, ["alerts", "check"])
    assert result.exit_code == 1
    assert "PAPERMAIL_ALERT_WEBHOOK_URL is not set" in result.output


def test_cli_test_posts_one_message(alerting: Settings, receiver: Receiver) -> None:
    result = CliRunner().invoke(main, ["alerts", "test", "--text", "hello"])
    assert result.exit_code == 0 and receiver.texts == ["hello"]


def test_an_edition_over_the_24h_quota_is_alerted_once(
    alerting: Settings, receiver: Receiver
) -> None:
    from worker import account
    from worker.mailers.base import AccountInfo

    class QuotaMailer:
        reports_quota = True

        def account(self) -> AccountInfo:
            return AccountInfo("ses", max_24h_send=1000, sent_last_24h=990, max_send_rate=14)

    assert account.check_quota(TODAY, 5, alerting, QuotaMailer()) is None
    assert receiver.texts == []
    for _ in range(2):  # the beat's next tick finds it again: posted once
        found = account.check_quota(TODAY, 50, alerting, QuotaMailer())
        assert found is not None and found.remaining == 10
    [text] = receiver.texts
    assert f"edition {TODAY}: 50 emails planned" in text and "papermail sending resume" in text
