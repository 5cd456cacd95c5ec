"""SES mailer against moto (a real server process) and the fault-injecting fake SES."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from typing import Any

import botocore.exceptions as bx
import pytest

from tests.integration import fake_ses as faults
from tests.integration.fake_ses import FakeSes
from worker import config
from worker.mailers.base import create_mailer, get_mailer, reset_mailer
from worker.mailers.errors import (
    AccountError,
    AmbiguousError,
    DeliveryAction,
    MailerError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from worker.mailers.ses import SesMailer, classify, tag_value

from .conftest import AWS_TEST_KEY_ID, AWS_TEST_SECRET, MAIL_SENDER, MotoSes, build_message

Settings = config.Settings


@pytest.fixture
def ses_for(mailer_env: Callable[..., Settings]) -> Any:
    """``ses_for(url, **settings)`` -> an SesMailer, closed after the test."""
    made: list[SesMailer] = []

    def make(url: str, **values: object) -> SesMailer:
        mailer = SesMailer(mailer_env("ses", SES_ENDPOINT_URL=url, **values))
        made.append(mailer)
        return mailer

    yield make
    for mailer in made:
        mailer.close()


# -- moto: what arrives in the provider's store ----------------------------------------


def test_moto_stores_raw_bytes_tags_and_configuration_set(moto_ses: MotoSes, ses_for: Any) -> None:
    mailer = ses_for(moto_ses.url, SES_CONFIGURATION_SET="papermail-events")
    message = build_message(
        tags={"delivery_id": "1234", "edition": "2026-11-27", "topic": "LLM agents/β"}
    )

    result = mailer.send(message)

    stored = moto_ses.sent()
    assert [m["id"] for m in stored] == [result.message_id]
    assert stored[0]["raw_data"].encode("utf-8") == message.raw
    assert stored[0]["source"] == MAIL_SENDER
    assert message.recipient in stored[0]["destinations"]
    [request] = moto_ses.send_requests()
    assert request["EmailTags"] == [
        {"Name": "delivery_id", "Value": "1234"},
        {"Name": "edition", "Value": "2026-11-27"},
        {"Name": "topic", "Value": "LLM_agents__"},
    ]
    assert request["ConfigurationSetName"] == "papermail-events"
    assert base64.b64decode(request["Content"]["Raw"]["Data"]) == message.raw


def test_moto_unverified_sender_is_permanent_with_reason(moto_ses: MotoSes, ses_for: Any) -> None:
    mailer = ses_for(moto_ses.url)
    message = build_message(sender="someone@unverified.example")

    with pytest.raises(PermanentError) as caught:
        mailer.send(message)

    assert caught.value.code == "MessageRejected"
    assert "someone@unverified.example" in str(caught.value)
    assert caught.value.action is DeliveryAction.FAIL
    assert moto_ses.sent() == []


# -- the fault-injecting server: each fault, its kind, and no duplicate ------------------


@pytest.mark.parametrize(
    ("fault", "kind", "code", "reaches_server"),
    [
        (faults.THROTTLE, ThrottledError, "TooManyRequestsException", False),
        (faults.INTERNAL, TransientError, "InternalFailure", False),
        (faults.REJECTED, PermanentError, "MessageRejected", False),
        (faults.BAD_REQUEST, PermanentError, "BadRequestException", False),
        (faults.PAUSED, AccountError, "SendingPausedException", False),
        (faults.QUOTA, AccountError, "LimitExceededException", False),
        (faults.SUSPENDED, AccountError, "AccountSuspendedException", False),
        (faults.GATEWAY_TIMEOUT, AmbiguousError, None, False),
        (faults.DROP_AFTER_ACCEPT, AmbiguousError, "ConnectionClosedError", True),
    ],
    ids=[
        "throttle",
        "500",
        "rejected",
        "bad-request",
        "paused",
        "quota",
        "suspended",
        "504",
        "drop",
    ],
)
def test_fault_maps_to_kind_without_retry_or_duplicate(
    fake_ses: FakeSes,
    ses_for: Any,
    fault: faults.Fault,
    kind: type[MailerError],
    code: str | None,
    reaches_server: bool,
) -> None:
    mailer = ses_for(fake_ses.url)
    message = build_message(body="the faulted one")
    fake_ses.push(fault)

    with pytest.raises(MailerError) as caught:
        mailer.send(message)

    assert type(caught.value) is kind
    if code:
        assert caught.value.code == code
    if fault.message and fault.json_body:
        assert fault.message in caught.value.reason  # the provider's reason is kept
    assert len(fake_ses.requests) == 1  # no SDK retry
    assert fake_ses.copies(message.raw) == (1 if reaches_server else 0)
    # The same mailer (and its connection pool) carries on with the next message.
    other = build_message(body="the next one")
    assert mailer.send(other).message_id in fake_ses.message_ids
    assert fake_ses.copies(message.raw) == (1 if reaches_server else 0)


def test_throttling_carries_retry_after(fake_ses: FakeSes, ses_for: Any) -> None:
    fake_ses.push(faults.THROTTLE)

    with pytest.raises(ThrottledError) as caught:
        ses_for(fake_ses.url).send(build_message())

    assert caught.value.retry_after == pytest.approx(2.0)
    assert caught.value.action is DeliveryAction.RETRY
    assert isinstance(caught.value, TransientError)  # callers that only know "transient"


def test_slow_answer_is_ambiguous_and_never_retried(fake_ses: FakeSes, ses_for: Any) -> None:
    mailer = ses_for(fake_ses.url, SEND_TIMEOUT_SECONDS="0.3")
    message = build_message()
    fake_ses.push(faults.slow(1.2))

    started = time.monotonic()
    with pytest.raises(AmbiguousError) as caught:
        mailer.send(message)
    waited = time.monotonic() - started

    assert waited < 1.0  # the client gave up at its read timeout, not the server's pace
    assert caught.value.action is DeliveryAction.MARK_UNKNOWN
    time.sleep(1.3)  # past the server's delay: a retry would have arrived by now
    assert len(fake_ses.requests) == 1
    assert fake_ses.copies(message.raw) == 1  # it did go out, exactly once


def test_connection_refused_is_transient_and_sends_nothing(fake_ses: FakeSes, ses_for: Any) -> None:
    mailer = ses_for(fake_ses.url)
    mailer.send(build_message(body="warm the connection pool"))
    fake_ses.stop()  # the port now refuses; pooled keep-alive connections are cut
    message = build_message(body="after the stop")

    with pytest.raises(TransientError) as caught:
        mailer.send(message)

    assert type(caught.value) is TransientError
    assert caught.value.code == "EndpointConnectionError"
    assert fake_ses.copies(message.raw) == 0


def test_request_shape(fake_ses: FakeSes, ses_for: Any) -> None:
    message = build_message(tags={"delivery_id": "7", "edition": "2026-11-27", "": "x y"})

    ses_for(fake_ses.url).send(message)
    ses_for(fake_ses.url, SES_CONFIGURATION_SET="cfg").send(message)

    plain, with_set = (r.body for r in fake_ses.requests)
    assert plain["FromEmailAddress"] == message.sender
    assert plain["Destination"] == {"ToAddresses": [message.recipient]}
    assert "ConfigurationSetName" not in plain
    assert with_set["ConfigurationSetName"] == "cfg"
    assert plain["EmailTags"] == [
        {"Name": "delivery_id", "Value": "7"},
        {"Name": "edition", "Value": "2026-11-27"},
        {"Name": "_", "Value": "x_y"},
    ]
    untagged = build_message(tags={})
    ses_for(fake_ses.url).send(untagged)
    assert "EmailTags" not in fake_ses.requests[-1].body


def test_nothing_logs_the_body_or_credentials(
    fake_ses: FakeSes, ses_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    marker = "CONFIDENTIAL-BODY-7f3a9c"
    message = build_message(body=f"{marker} only the reader may see this")
    mailer = ses_for(fake_ses.url)
    fake_ses.push(faults.REJECTED)

    with caplog.at_level(logging.DEBUG):  # the root logger: botocore's DEBUG lines too
        with pytest.raises(PermanentError):
            mailer.send(message)
        mailer.send(message)

    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert "outbound-emails" in logged or "SendEmail" in logged  # botocore did log
    assert "SES refused" in logged  # and so did the mailer
    secrets = {
        "body marker": marker,
        "raw as base64": base64.b64encode(message.raw).decode()[:40],
        "secret key": AWS_TEST_SECRET,
        "access key id": AWS_TEST_KEY_ID,
    }
    leaked = [name for name, value in secrets.items() if value in logged]
    assert leaked == []


# -- configuration ---------------------------------------------------------------------


def test_client_configuration(mailer_env: Callable[..., Settings]) -> None:
    settings = mailer_env("ses", SES_ENDPOINT_URL="http://127.0.0.1:9", SEND_TIMEOUT_SECONDS="7")
    mailer = create_mailer(settings)
    try:
        assert isinstance(mailer, SesMailer)
        cfg = mailer.client.meta.config
        assert cfg.retries["total_max_attempts"] == 1  # the first try, and no retry
        assert cfg.read_timeout == 7
        assert cfg.connect_timeout <= 5
        assert cfg.max_pool_connections >= 50
        assert mailer.client.meta.endpoint_url == "http://127.0.0.1:9"
    finally:
        mailer.close()
    # A connection per send in flight: the threads of a process never wait for the pool.
    busy = mailer_env("ses", SES_ENDPOINT_URL="http://127.0.0.1:9", SEND_RATE="5000",
                      SEND_CONCURRENCY="80")  # fmt: skip
    with create_mailer(busy) as mailer:
        assert busy.concurrency == 80
        assert mailer.client.meta.config.max_pool_connections >= 80  # type: ignore[attr-defined]


def test_half_configured_credentials_are_refused(
    mailer_env: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = mailer_env("ses")
    monkeypatch.delenv("PAPERMAIL_AWS_SECRET_ACCESS_KEY")
    config.reset_settings()
    settings = config.get_settings()

    with pytest.raises(config.ConfigError, match="PAPERMAIL_AWS_SECRET_ACCESS_KEY"):
        SesMailer(settings)


def test_development_secret_key_is_refused_for_ses(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAPERMAIL_MAILER", "ses")
    config.reset_settings()

    with pytest.raises(config.ConfigError, match="PAPERMAIL_SECRET_KEY"):
        get_mailer()


def test_get_mailer_is_one_ses_client_per_process(
    fake_ses: FakeSes, mailer_env: Callable[..., Settings]
) -> None:
    settings = mailer_env("ses", SES_ENDPOINT_URL=fake_ses.url)
    try:
        first = get_mailer()
        assert isinstance(first, SesMailer)
        assert get_mailer() is first
        assert get_mailer(settings) is first
        first.send(build_message())
    finally:
        reset_mailer()


# -- the mapping of what fake servers cannot easily produce -----------------------------


def _client_error(code: str, message: str, status: int) -> bx.ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": {}},
    }
    return bx.ClientError(response, "SendEmail")


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (_client_error("Throttling", "Daily message quota exceeded.", 400), AccountError),
        (_client_error("Throttling", "Maximum sending rate exceeded.", 400), ThrottledError),
        (_client_error("ThrottlingException", "Rate exceeded", 400), ThrottledError),
        (_client_error("MailFromDomainNotVerifiedException", "x", 400), PermanentError),
        (_client_error("MessageRejected", "Email address is not verified.", 400), PermanentError),
        (_client_error("InvalidParameterValue", "bad", 400), PermanentError),
        (_client_error("SomethingNew", "?", 422), PermanentError),
        (_client_error("ServiceUnavailable", "busy", 503), TransientError),
        (_client_error("InternalFailure", "oops", 500), TransientError),
        (_client_error("UnrecognizedClientException", "bad token", 403), AccountError),
        (bx.EndpointConnectionError(endpoint_url="http://x"), TransientError),
        (bx.ConnectTimeoutError(endpoint_url="http://x"), TransientError),
        (bx.ReadTimeoutError(endpoint_url="http://x"), AmbiguousError),
        (bx.ConnectionClosedError(endpoint_url="http://x"), AmbiguousError),
        (bx.NoCredentialsError(), AccountError),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None,
)
def test_classify(exc: Exception, kind: type[MailerError]) -> None:
    assert type(classify(exc)) is kind


def test_invalid_parameter_reason_does_not_quote_the_value(fake_ses: FakeSes) -> None:
    from worker.mailers.ses import make_client

    settings = config.load_settings(
        mailer="ses",
        secret_key="x" * 40,
        base_url="https://papermail.example.org",
        ses_endpoint_url=fake_ses.url,
        aws_access_key_id=AWS_TEST_KEY_ID,
        aws_secret_access_key=AWS_TEST_SECRET,
        postal_address="Example Lab, 1 Main St, Springfield, USA",
    )
    client = make_client(settings)
    try:
        with pytest.raises(bx.ParamValidationError) as raised:
            client.send_email(  # a wrong type for the body: refused before any request
                FromEmailAddress=MAIL_SENDER,
                Destination={"ToAddresses": ["a@example.org"]},
                Content={"Raw": {"Data": ["SECRET-BODY-TEXT"]}},
            )
    finally:
        client.close()
    assert "SECRET-BODY-TEXT" in str(raised.value)  # botocore quotes it...

    error = classify(raised.value)

    assert type(error) is PermanentError
    assert "Content.Raw.Data" in error.reason
    assert "SECRET-BODY-TEXT" not in error.reason  # ...the recorded reason does not
    assert fake_ses.requests == []


def test_tag_values_are_sanitised_to_what_ses_accepts() -> None:
    assert tag_value("2026-11-27") == "2026-11-27"
    assert tag_value("a.b@c_d-e") == "a.b@c_d-e"
    assert tag_value("LLM agents / β") == "LLM_agents____"
    assert tag_value("") == "_"
    assert len(tag_value("x" * 1000)) == 256


def test_forked_child_builds_its_own_client(mailer_env: Callable[..., Settings]) -> None:
    import os

    mailer_env("ses", SES_ENDPOINT_URL="http://127.0.0.1:9")
    try:
        parent = get_mailer()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, then leave without running pytest's teardown
            try:
                child = get_mailer()
                fresh = child is not parent and child.client is not parent.client  # type: ignore[attr-defined]
                os.write(write_end, b"fresh" if fresh else b"shared")
            finally:
                os._exit(0)
        os.close(write_end)
        answer = os.read(read_end, 16)
        os.close(read_end)
        os.waitpid(pid, 0)
        assert answer == b"fresh"
        assert get_mailer() is parent  # the parent keeps its own
    finally:
        reset_mailer()


# -- the hot path's signature, verified by a server ------------------------------------


def test_moto_verifies_the_signature_of_every_send(
    moto_ses: MotoSes, mailer_env: Callable[..., Settings]
) -> None:
    """moto with IAM authentication on recomputes each request's SigV4 signature from the
    access key's secret: the direct request is accepted, a wrong secret is refused."""
    import json
    import urllib.request

    import boto3

    iam = boto3.client(
        "iam", endpoint_url=moto_ses.url, region_name="us-east-1",
        aws_access_key_id=AWS_TEST_KEY_ID, aws_secret_access_key=AWS_TEST_SECRET,
    )  # fmt: skip
    user = f"papermail-sender-{time.monotonic_ns()}"
    iam.create_user(UserName=user)
    iam.put_user_policy(
        UserName=user,
        PolicyName="send",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "ses:*", "Resource": "*"}],
            }
        ),
    )
    key = iam.create_access_key(UserName=user)["AccessKey"]
    good = SesMailer(
        mailer_env("ses", SES_ENDPOINT_URL=moto_ses.url, AWS_ACCESS_KEY_ID=key["AccessKeyId"],
                   AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
    )  # fmt: skip
    bad = SesMailer(
        mailer_env("ses", SES_ENDPOINT_URL=moto_ses.url, AWS_ACCESS_KEY_ID=key["AccessKeyId"],
                   AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"][:-1] + "x")
    )  # fmt: skip
    assert good.transport is not None and bad.transport is not None

    def authentication(after: str) -> None:
        urllib.request.urlopen(
            urllib.request.Request(
                moto_ses.url + "/moto-api/reset-auth",
                data=after.encode(),
                headers={"Content-Type": "text/plain"},  # a form body would be parsed away
                method="POST",
            ),
            timeout=10,
        ).close()

    authentication("0")  # from now on every request is authenticated
    try:
        result = good.send(build_message())
        with pytest.raises(MailerError) as direct:
            bad.send(build_message(recipient="other@example.org"))
        bad.transport = None  # the same refusal through botocore itself
        with pytest.raises(MailerError) as through_botocore:
            bad.send(build_message(recipient="other@example.org"))
    finally:
        authentication("inf")
        good.close()
        bad.close()
    assert [m["id"] for m in moto_ses.sent()] == [result.message_id]
    assert "SignatureDoesNotMatch" in direct.value.reason
    # moto answers this one in XML, not SES v2's JSON; whatever the body, both paths
    # parse it with botocore's parser and reach the same verdict.
    assert (type(direct.value), direct.value.code, direct.value.reason) == (
        type(through_botocore.value),
        through_botocore.value.code,
        through_botocore.value.reason,
    )


def test_a_proxy_keeps_the_send_on_botocore(
    fake_ses: FakeSes, mailer_env: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore honours HTTPS_PROXY/HTTP_PROXY; the direct path does not try to."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    mailer = SesMailer(mailer_env("ses", SES_ENDPOINT_URL=fake_ses.url))
    try:
        assert mailer.transport is None
        with pytest.raises(TransientError):  # the proxy port is closed: never left
            mailer.send(build_message())
    finally:
        mailer.close()
    assert fake_ses.requests == []
