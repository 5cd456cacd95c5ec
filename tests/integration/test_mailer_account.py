"""``Mailer.account()`` for every mailer, and what health, the limiter and the quota check
make of it, against real servers: moto (server mode) for SES v1/v2, SNS and SQS, the
SES-compatible fake for GetAccount's answers moto does not give, aiosmtpd for SMTP.

moto 5.2's server has no sesv2 GetAccount (it answers 404), so against moto the mailer
reads SES v1's GetSendQuota: 200 a day, 1 a second, and the messages it accepted.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import boto3
import pytest

from worker import account, config, health
from worker.mailers.base import AccountInfo, Mailer, create_mailer
from worker.mailers.errors import MailerError, TransientError

from .conftest import AWS_TEST_KEY_ID, AWS_TEST_SECRET, build_message

MailerEnv = Callable[..., config.Settings]


def _aws(service: str, url: str) -> Any:
    return boto3.client(
        service,
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=AWS_TEST_KEY_ID,
        aws_secret_access_key=AWS_TEST_SECRET,
    )


@pytest.fixture(params=["outbox", "ses", "smtp"])
def mailer(request: pytest.FixtureRequest, mailer_env: MailerEnv) -> Iterator[Mailer]:
    if request.param == "outbox":
        settings = mailer_env("outbox", OUTBOX_DIR=Path("outbox").resolve())
    elif request.param == "ses":
        moto = request.getfixturevalue("moto_ses")
        settings = mailer_env("ses", SES_ENDPOINT_URL=moto.url)
    else:
        smtp = request.getfixturevalue("smtp_server")
        settings = mailer_env(
            "smtp", SMTP_HOST=smtp.host, SMTP_PORT=smtp.port, SMTP_STARTTLS="false"
        )
    built = create_mailer(settings)
    yield built
    built.close()


def test_every_mailer_reports_its_account(mailer: Mailer) -> None:
    info = mailer.account()
    assert isinstance(info, AccountInfo)
    assert info.mailer == mailer.name
    assert info.source
    assert info.sending_enabled is not False
    as_dict = info.as_dict()
    assert as_dict["mailer"] == mailer.name and as_dict["remaining_24h"] == info.remaining_24h
    # The mailer still sends after being asked (SMTP: the probe's session is its own).
    assert mailer.send(build_message()).message_id


def test_ses_on_moto_reads_the_v1_quota(moto_ses: Any, mailer_env: MailerEnv) -> None:
    ses = create_mailer(mailer_env("ses", SES_ENDPOINT_URL=moto_ses.url))
    before = ses.account()
    assert before.source.startswith("SES v1 GetSendQuota")
    assert (before.max_send_rate, before.max_24h_send) == (1.0, 200.0)
    assert before.sending_enabled is None and before.production_access is None
    ses.send(build_message())
    after = ses.account()
    # moto counts each recipient twice (the Destination and the To header it parses).
    assert after.sent_last_24h == (before.sent_last_24h or 0) + 2
    assert after.remaining_24h == max(0.0, 200.0 - (after.sent_last_24h or 0))
    ses.close()


GOOD_ACCOUNT = {
    "SendingEnabled": True,
    "ProductionAccessEnabled": True,
    "EnforcementStatus": "HEALTHY",
    "SendQuota": {"Max24HourSend": 50000.0, "MaxSendRate": 40.0, "SentLast24Hours": 1234.0},
    "DedicatedIpAutoWarmupEnabled": False,
}


def test_get_account_answer(fake_ses: Any, mailer_env: MailerEnv) -> None:
    fake_ses.account = GOOD_ACCOUNT
    settings = mailer_env("ses", SES_ENDPOINT_URL=fake_ses.url)
    info = create_mailer(settings).account()
    assert info.source == "sesv2 GetAccount"
    assert info.sending_enabled is True and info.production_access is True
    assert (info.max_send_rate, info.max_24h_send, info.sent_last_24h) == (40.0, 50000.0, 1234.0)
    assert info.remaining_24h == 48766.0
    assert info.problems == () and info.warnings == ()
    check = health.check_mailer(settings)
    assert check.status == "ok"
    assert check.summary == (
        "ses: sesv2 GetAccount, sending enabled, production access, max 40/s, "
        "24 h quota 50,000, sent 1,234, left 48,766"
    )
    assert check.details["limiter_follows_account"] is True


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ({"SendingEnabled": False}, "fail", "put-account-sending-attributes --sending-enabled"),
        ({"EnforcementStatus": "SHUTDOWN"}, "fail", "contact AWS support"),
        ({"EnforcementStatus": "PROBATION"}, "warn", "on probation"),
        ({"ProductionAccessEnabled": False}, "warn", "request production access"),
        (
            {"SendQuota": {"Max24HourSend": 200.0, "MaxSendRate": 1.0, "SentLast24Hours": 200.0}},
            "fail",
            "the 24-hour sending quota is used up (200 of 200)",
        ),
    ],
)
def test_what_is_wrong_with_the_account_says_what_to_do(
    fake_ses: Any, mailer_env: MailerEnv, change: dict[str, Any], status: str, words: str
) -> None:
    fake_ses.account = {**GOOD_ACCOUNT, **change}
    check = health.check_mailer(mailer_env("ses", SES_ENDPOINT_URL=fake_ses.url))
    assert check.status == status
    assert words in (check.fix or "")


def test_send_rate_above_the_account_warns(fake_ses: Any, mailer_env: MailerEnv) -> None:
    fake_ses.account = GOOD_ACCOUNT
    check = health.check_mailer(mailer_env("ses", SES_ENDPOINT_URL=fake_ses.url, SEND_RATE=100))
    assert check.status == "warn"
    assert "PAPERMAIL_SEND_RATE is 100/s but the account allows 40/s" in (check.fix or "")


def test_refused_credentials_fail_with_the_reason(fake_ses: Any, mailer_env: MailerEnv) -> None:
    from tests.integration.fake_ses import Fault

    fake_ses.account = GOOD_ACCOUNT
    fake_ses.push(Fault(403, "UnrecognizedClientException", "The security token is invalid"))
    settings = mailer_env("ses", SES_ENDPOINT_URL=fake_ses.url)
    with pytest.raises(MailerError) as caught:
        create_mailer(settings).account()
    assert caught.value.kind == "account"
    fake_ses.push(Fault(403, "UnrecognizedClientException", "The security token is invalid"))
    check = health.check_mailer(settings)
    assert check.status == "fail"
    assert "UnrecognizedClientException: The security token is invalid" in check.summary
    assert "ses:GetAccount" in (check.fix or "")


def test_unreachable_providers(mailer_env: MailerEnv) -> None:
    from .conftest import free_port

    port = free_port()  # nothing listens there
    for settings in (
        mailer_env("ses", SES_ENDPOINT_URL=f"http://127.0.0.1:{port}"),
        mailer_env("smtp", SMTP_HOST="127.0.0.1", SMTP_PORT=port, SMTP_STARTTLS="false"),
    ):
        with pytest.raises(TransientError):
            create_mailer(settings).account()
        assert health.check_mailer(settings).status == "fail"


def test_the_limiter_follows_moto_s_account_rate(
    moto_ses: Any, mailer_env: MailerEnv, redis_url: str
) -> None:
    import redis

    from worker.mailers.base import reset_mailer
    from worker.ratelimit import RedisBucket, make_limiter

    settings = mailer_env("ses", SES_ENDPOINT_URL=moto_ses.url, BROKER_URL=redis_url)
    try:
        limiter = make_limiter(settings)
        assert isinstance(limiter, RedisBucket)
        assert limiter.base_rate == 1.0  # moto's MaxSendRate
        client = redis.Redis.from_url(redis_url)
        assert float(client.get(account.RATE_KEY) or 0) == 1.0
        assert 0 < client.ttl(account.RATE_KEY) <= settings.account_refresh_seconds
        # Another worker's limiter takes the shared value: SES is not asked again.
        requests = len(moto_ses.send_requests())
        assert make_limiter(settings).base_rate == 1.0  # type: ignore[attr-defined]
        assert len(moto_ses.send_requests()) == requests
    finally:
        reset_mailer()


def test_an_edition_over_the_remaining_quota_warns(
    moto_ses: Any, mailer_env: MailerEnv, caplog: pytest.LogCaptureFixture
) -> None:
    settings = mailer_env("ses", SES_ENDPOINT_URL=moto_ses.url)
    ses = create_mailer(settings)
    remaining = ses.account().remaining_24h
    assert remaining is not None
    seen: list[account.QuotaShortfall] = []
    hook = account.on_quota_shortfall(seen.append)
    try:
        assert account.check_quota(date(2026, 11, 27), int(remaining), settings, ses) is None
        with caplog.at_level(logging.WARNING, logger="worker.account"):
            found = account.check_quota(date(2026, 11, 27), int(remaining) + 1, settings, ses)
    finally:
        account._hooks.remove(hook)
        ses.close()
    assert found is not None and seen == [found]
    assert found.planned == int(remaining) + 1 and found.remaining == remaining
    assert f"edition 2026-11-27: {int(remaining) + 1:,} emails planned" in caplog.text
    assert "SES 24-hour quota allows" in caplog.text


def test_stats_shows_the_quota(moto_ses: Any, mailer_env: MailerEnv) -> None:
    import json

    from click.testing import CliRunner

    from worker import migrate
    from worker.cli import main
    from worker.mailers.base import reset_mailer

    mailer_env("ses", SES_ENDPOINT_URL=moto_ses.url)
    migrate.upgrade()
    try:
        result = CliRunner().invoke(main, ["stats", "--json"])
        data = json.loads(result.output)
        text = CliRunner().invoke(main, ["stats"]).output
    finally:
        reset_mailer()
    quota = data["account"]
    assert quota["mailer"] == "ses" and quota["max_24h_send"] == 200.0
    assert quota["remaining_24h"] == max(0.0, 200.0 - quota["sent_last_24h"])
    assert f"ses 24 h quota: {quota['sent_last_24h']:,.0f} of 200 used" in text
    assert "max 1/s" in text


# ---------------------------------------------------------------------------------------
# SNS topics and the SQS queue (moto)


def test_sns_subscriptions_and_sqs_queue(moto_server: str, mailer_env: MailerEnv) -> None:
    sns, sqs = _aws("sns", moto_server), _aws("sqs", moto_server)
    name = uuid.uuid4().hex[:8]
    webhook_topic = sns.create_topic(Name=f"hooked-{name}")["TopicArn"]
    queue_topic = sns.create_topic(Name=f"queued-{name}")["TopicArn"]
    lonely_topic = sns.create_topic(Name=f"lonely-{name}")["TopicArn"]
    queue_url = sqs.create_queue(QueueName=f"events-{name}")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sqs.send_message(QueueUrl=queue_url, MessageBody="{}")
    base = "https://papermail.example.org"
    sns.subscribe(TopicArn=webhook_topic, Protocol="https", Endpoint=f"{base}/webhooks/ses")
    sns.subscribe(TopicArn=queue_topic, Protocol="sqs", Endpoint=queue_arn)
    sns.subscribe(TopicArn=lonely_topic, Protocol="https", Endpoint="https://elsewhere.example/")
    settings = mailer_env(
        "outbox",
        SNS_TOPIC_ARNS=",".join([webhook_topic, queue_topic, lonely_topic]),
        SNS_ENDPOINT_URL=moto_server,
        SQS_QUEUE_URL=queue_url,
        SQS_ENDPOINT_URL=moto_server,
    )
    checks = health.check_events(settings)
    by_name = {c.name: c for c in checks}
    assert by_name["sqs"].status == "ok"
    assert by_name["sqs"].details["waiting"] == 1
    assert by_name[f"sns hooked-{name}"].status == "ok"
    assert by_name[f"sns queued-{name}"].status == "ok"
    lonely = by_name[f"sns lonely-{name}"]
    assert lonely.status == "fail"
    assert lonely.summary.startswith("no subscription of the topic reaches papermail")
    assert f"aws sns subscribe --topic-arn {lonely_topic} --protocol sqs" in (lonely.fix or "")
    missing = mailer_env(
        "outbox",
        SNS_TOPIC_ARNS=f"arn:aws:sns:us-east-1:123456789012:missing-{name}",
        SNS_ENDPOINT_URL=moto_server,
        SQS_QUEUE_URL="",
    )
    [gone] = health.check_events(missing)
    assert gone.status == "fail" and "cannot list the subscriptions" in gone.summary
    report = health.run_checks(settings)
    assert {c.name: c.status for c in report.checks}[f"sns lonely-{name}"] == "fail"
    assert not report.ok


class _AccountEndpoint:
    """An SES-like endpoint without sesv2 GetAccount (404) that answers v1 GetSendQuota,
    or, ``silent``, takes every request and never answers; it counts what it was asked."""

    def __init__(self, silent: bool = False) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.seen: list[str] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                outer.seen.append(f"GET {self.path}")
                if silent:
                    outer.release.wait(10)
                    return
                self._reply(404, b'{"message": "no route"}', "application/json")

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.seen.append(f"POST {self.path}")
                xml = (
                    '<GetSendQuotaResponse xmlns="http://ses.amazonaws.com/doc/2010-12-01/">'
                    "<GetSendQuotaResult><SentLast24Hours>3.0</SentLast24Hours>"
                    "<Max24HourSend>200.0</Max24HourSend><MaxSendRate>1.0</MaxSendRate>"
                    "</GetSendQuotaResult><ResponseMetadata><RequestId>r</RequestId>"
                    "</ResponseMetadata></GetSendQuotaResponse>"
                )
                self._reply(200, xml.encode(), "text/xml")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_account_is_one_short_attempt_against_a_silent_endpoint(mailer_env: MailerEnv) -> None:
    import time

    from worker.mailers import ses as ses_module

    endpoint = _AccountEndpoint(silent=True)
    # SEND_TIMEOUT_SECONDS is the sending client's: the account question has its own.
    settings = mailer_env("ses", SES_ENDPOINT_URL=endpoint.url, SEND_TIMEOUT_SECONDS="30")
    mailer = create_mailer(settings)
    try:
        started = time.monotonic()
        with pytest.raises(MailerError):
            mailer.account()
        took = time.monotonic() - started
    finally:
        mailer.close()
        endpoint.stop()
    assert endpoint.seen == ["GET /v2/email/account"]  # no botocore retry
    assert took < ses_module.ACCOUNT_READ_TIMEOUT_SECONDS + 2


def test_an_endpoint_without_get_account_is_asked_get_send_quota_directly(
    mailer_env: MailerEnv,
) -> None:
    endpoint = _AccountEndpoint()
    mailer = create_mailer(mailer_env("ses", SES_ENDPOINT_URL=endpoint.url))
    try:
        first, second = mailer.account(), mailer.account()
    finally:
        mailer.close()
        endpoint.stop()
    assert first == second and first.max_send_rate == 1.0 and first.remaining_24h == 197.0
    assert endpoint.seen == ["GET /v2/email/account", "POST /", "POST /"]


def test_stats_quota_comes_from_the_shared_cache(
    mailer_env: MailerEnv, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import operations
    from worker.mailers.base import reset_mailer

    endpoint = _AccountEndpoint()
    monkeypatch.setenv("PAPERMAIL_BROKER_URL", redis_url)
    settings = mailer_env("ses", SES_ENDPOINT_URL=endpoint.url)
    try:
        quota = operations.account_quota(settings)
        account.reset_account_cache()  # another process: reads Redis, asks nobody
        assert operations.account_quota(settings) == quota
    finally:
        reset_mailer()
        endpoint.stop()
    assert quota is not None and quota["remaining_24h"] == 197.0
    assert endpoint.seen == ["GET /v2/email/account", "POST /"]
