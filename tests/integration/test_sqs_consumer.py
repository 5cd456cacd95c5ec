"""The SQS consumer against moto's SQS in server mode (a real process, over HTTP).

Messages are deleted only once applied; a message about a send not recorded yet, a
malformed one, or one that fails SNS signature verification stays in the queue for
redelivery (and, eventually, the dead-letter queue). Envelopes are signed here with a test
certificate served by an injected fetcher (Amazon's certificate host is the one thing no
local server can stand in for).
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from typing import Any

import boto3
import pytest
from click.testing import CliRunner
from cryptography import x509
from sqlalchemy import select

from tests.unit import test_events as ev
from tests.unit.test_sns import CERT_URL, TOPIC, Fetcher, SigningKeys, make_certificate, sign
from worker import config, events, sns
from worker.cli import main
from worker.config import Settings
from worker.db import session_scope
from worker.models import Delivery, ProviderEvent, Subscriber, SubscriberLog, utcnow

SENT = utcnow() - timedelta(hours=1)


@pytest.fixture(scope="module")
def signer() -> SigningKeys:
    keys = SigningKeys()
    # Valid around this process's clock (the unit tests' keys are made for their fixed one).
    now = utcnow()
    keys.pem = make_certificate(
        keys.key, not_before=now - timedelta(days=1), not_after=now + timedelta(days=30)
    )
    return keys


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The isolated settings, allowing the test topic (verification is on by default)."""
    assert settings.sqs_verify_signatures
    return settings.model_copy(update={"sns_topic_arns": [TOPIC]})


def signed(
    notification: dict[str, Any], keys: SigningKeys, *, key: Any = None, **fields: Any
) -> dict[str, Any]:
    """An SNS envelope as SNS writes it to a queue, signed by the test certificate's key."""
    body = {
        **ev.envelope(notification),
        "Timestamp": ev.iso(utcnow()),
        "SigningCertURL": CERT_URL,
        **fields,
    }
    for name in ("SignatureVersion", "Signature"):
        body.pop(name)
    return sign(body, key or keys.key)


@pytest.fixture
def sqs(moto_server: str) -> Any:
    return boto3.client(
        "sqs",
        endpoint_url=moto_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def make_queue(sqs: Any, visibility: int = 30, **attributes: str) -> str:
    name = f"ses-events-{uuid.uuid4().hex[:10]}"
    url: str = sqs.create_queue(
        QueueName=name, Attributes={"VisibilityTimeout": str(visibility), **attributes}
    )["QueueUrl"]
    return url


def depth(sqs: Any, url: str) -> tuple[int, int]:
    """(visible, in flight) messages."""
    attrs = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return (
        int(attrs["ApproximateNumberOfMessages"]),
        int(attrs["ApproximateNumberOfMessagesNotVisible"]),
    )


def peek(sqs: Any, url: str) -> str:
    """The body of the next message, made visible again at once."""
    for _ in range(50):
        messages = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1).get("Messages")
        if messages:
            sqs.change_message_visibility(
                QueueUrl=url, ReceiptHandle=messages[0]["ReceiptHandle"], VisibilityTimeout=0
            )
            return str(messages[0]["Body"])
    raise AssertionError("nothing arrived in the queue")


def seed(*emails: str) -> dict[str, str]:
    out = {}
    with session_scope() as session:
        for email in emails:
            sub = ev.add_subscriber(session, email)
            out[email] = ev.add_delivery(session, sub).message_id
    return out


def poll(
    settings: Settings, sqs: Any, url: str, fetcher: Fetcher | None = None
) -> events.PollCounts:
    return events.poll_sqs(
        settings,
        once=True,
        max_messages=10,
        wait_seconds=0,
        client=sqs,
        queue_url=url,
        cert_fetcher=fetcher,
        cert_cache=sns.CertCache(),
    )


@pytest.fixture
def fetcher(signer: SigningKeys) -> Fetcher:
    return Fetcher({CERT_URL: signer.pem})


def statuses() -> dict[str, str]:
    with session_scope() as session:
        return dict(session.execute(select(Subscriber.email, Subscriber.status)).all())


def test_applied_messages_are_deleted_the_rest_stay(
    settings: Settings, sqs: Any, signer: SigningKeys, fetcher: Fetcher
) -> None:
    ids = seed("ann@example.org", "bob@example.org")
    url = make_queue(sqs)
    ann_bounce = signed(
        ev.bounce(ids["ann@example.org"], ["ann@example.org"], sent_at=SENT), signer
    )
    bodies = [
        json.dumps(ann_bounce),  # SNS envelope (raw message delivery off)
        json.dumps(ann_bounce),  # SNS delivered it twice
        json.dumps(signed(ev.bounce("not-yet", ["ann@example.org"], sent_at=utcnow()), signer)),
        "this is not JSON",
        # Raw message delivery: nothing to verify, so refused while verification is on.
        json.dumps(ev.delivered(ids["bob@example.org"], ["bob@example.org"], sent_at=SENT)),
    ]
    for body in bodies:
        sqs.send_message(QueueUrl=url, MessageBody=body)

    counts = poll(settings, sqs, url, fetcher)

    assert (counts.received, counts.applied, counts.duplicate) == (5, 1, 1)
    assert (counts.retry_later, counts.invalid, counts.unverified, counts.failed) == (1, 1, 1, 0)
    assert counts.deleted == 2
    assert depth(sqs, url) == (0, 3)  # retry, malformed, unverified: received, not deleted
    assert fetcher.calls == [CERT_URL]  # fetched once, then cached
    with session_scope() as session:
        states = sorted(session.scalars(select(Delivery.state)))
        vias = set(session.scalars(select(ProviderEvent.via)))
        stored = session.scalars(select(ProviderEvent.dedupe_key)).all()
    assert statuses() == {"ann@example.org": "bounced", "bob@example.org": "active"}
    assert states == ["bounced", "sent"]
    assert vias == {"sqs"}
    assert stored == [ann_bounce["MessageId"]]


def test_raw_message_delivery_applies_when_verification_is_off(
    settings: Settings, sqs: Any
) -> None:
    ids = seed("raw@example.org", "other@example.org")
    url = make_queue(sqs)
    # Even unverified, a notification acts only on the delivery it names and its recipient.
    note = ev.bounce(ids["raw@example.org"], ["other@example.org", "raw@example.org"], sent_at=SENT)
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(note))
    off = settings.model_copy(update={"sqs_verify_signatures": False, "sns_topic_arns": []})
    counts = poll(off, sqs, url)
    assert (counts.applied, counts.deleted, counts.unverified) == (1, 1, 0)
    assert statuses() == {"raw@example.org": "bounced", "other@example.org": "active"}


def test_retried_message_applies_once_the_send_is_recorded(
    settings: Settings, sqs: Any, signer: SigningKeys, fetcher: Fetcher
) -> None:
    url = make_queue(sqs, visibility=1)
    message_id = f"0100-{uuid.uuid4()}"
    note = signed(ev.bounce(message_id, ["late@example.org"], sent_at=utcnow()), signer)
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(note))

    first = poll(settings, sqs, url, fetcher)
    assert (first.retry_later, first.deleted) == (1, 0)

    # The send's commit becomes visible; SQS redelivers after the visibility timeout.
    with session_scope() as session:
        sub = ev.add_subscriber(session, "late@example.org")
        ev.add_delivery(session, sub, message_id=message_id)
    time.sleep(1.5)
    second = poll(settings, sqs, url, fetcher)
    assert (second.applied, second.deleted, second.retry_later) == (1, 1, 0)
    assert depth(sqs, url) == (0, 0)
    with session_scope() as session:
        assert session.scalars(select(Subscriber.status)).one() == "bounced"


def test_malformed_message_reaches_the_dead_letter_queue(
    settings: Settings, sqs: Any, signer: SigningKeys, fetcher: Fetcher
) -> None:
    dlq = make_queue(sqs)
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    url = make_queue(
        sqs,
        visibility=1,
        RedrivePolicy=json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "1"}),
    )
    envelope = signed({"eventType": "Bounce"}, signer)  # authentic, but no bounce in it
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(envelope))
    assert poll(settings, sqs, url, fetcher).invalid == 1
    time.sleep(1.5)
    assert poll(settings, sqs, url, fetcher).received == 0  # moved on, not handed out again
    assert depth(sqs, dlq)[0] == 1
    body = sqs.receive_message(QueueUrl=dlq)["Messages"][0]["Body"]
    assert json.loads(body) == envelope


def test_cli_poll_sqs_once(
    settings: Settings,
    sqs: Any,
    moto_server: str,
    monkeypatch: pytest.MonkeyPatch,
    signer: SigningKeys,
) -> None:
    ids = seed("cli@example.org")
    url = make_queue(sqs)
    note = signed(ev.complaint(ids["cli@example.org"], ["cli@example.org"], sent_at=SENT), signer)
    for _ in range(3):  # one notification, delivered three times
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(note))
    monkeypatch.setenv("PAPERMAIL_SQS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("PAPERMAIL_SNS_TOPIC_ARNS", TOPIC)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    config.reset_settings()
    # The CLI uses the process-wide certificate cache: seed it with the test certificate.
    monkeypatch.setattr(sns, "default_cache", sns.CertCache())
    sns.default_cache.put(CERT_URL, x509.load_pem_x509_certificate(signer.pem))
    result = CliRunner().invoke(
        main, ["events", "poll-sqs", "--queue-url", url, "--once", "--wait-seconds", "0", "--json"]
    )
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)
    assert (counts["received"], counts["applied"], counts["duplicate"]) == (3, 1, 2)
    assert counts["deleted"] == 3
    assert depth(sqs, url) == (0, 0)
    with session_scope() as session:
        assert session.scalars(select(Subscriber.status)).one() == "complained"


# --- verification: what is refused stays in the queue, applied nowhere -------------------


def _refusals(ids: dict[str, str], signer: SigningKeys) -> dict[str, dict[str, Any]]:
    """Envelopes that must each be refused, all about ann's message but naming bob."""
    note = ev.bounce(ids["ann@example.org"], ["bob@example.org"], sent_at=SENT)
    good = signed(note, signer)
    tampered = {
        **good,
        "Message": json.dumps(ev.bounce(ids["ann@example.org"], ["ann@example.org"])),
    }
    return {
        "unsigned": ev.envelope(note),  # the finding: SignatureVersion 1, empty Signature
        "no signature at all": {
            k: v for k, v in good.items() if k not in ("Signature", "SignatureVersion")
        },
        "signed by another key": signed(note, signer, key=signer.other),
        "tampered after signing": tampered,
        "topic not allowed": signed(note, signer, TopicArn=TOPIC.replace("ses-events", "other")),
        "certificate off Amazon's host": signed(
            note, signer, SigningCertURL="https://evil.example/cert.pem"
        ),
        "older than SQS keeps a message": signed(
            note, signer, Timestamp=ev.iso(utcnow() - sns.SQS_MAX_AGE - timedelta(hours=1))
        ),
        "from the future": signed(note, signer, Timestamp=ev.iso(utcnow() + timedelta(hours=2))),
    }


def test_forged_envelopes_are_refused_and_left_for_the_dead_letter_queue(
    settings: Settings,
    sqs: Any,
    signer: SigningKeys,
    fetcher: Fetcher,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ids = seed("ann@example.org", "bob@example.org")
    dlq = make_queue(sqs)
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    url = make_queue(
        sqs,
        visibility=1,
        RedrivePolicy=json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "1"}),
    )
    bad = _refusals(ids, signer)
    for body in bad.values():
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(body))

    with caplog.at_level("ERROR", logger="worker.events"):
        counts = poll(settings, sqs, url, fetcher)

    assert (counts.received, counts.unverified, counts.deleted) == (len(bad), len(bad), 0)
    assert counts.applied == counts.invalid == counts.failed == 0
    reasons = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(reasons) == len(bad)
    for expected in (
        "signature does not verify",
        "SignatureVersion is missing",
        "not in PAPERMAIL_SNS_TOPIC_ARNS",
        "SigningCertURL",
        "more than 14 days",
        "more than an hour",
    ):
        assert any(expected in r for r in reasons), (expected, reasons)
    assert statuses() == {"ann@example.org": "active", "bob@example.org": "active"}
    with session_scope() as session:
        assert session.scalars(select(ProviderEvent)).all() == []
        assert session.scalars(select(SubscriberLog)).all() == []
    time.sleep(1.5)
    assert poll(settings, sqs, url, fetcher).received == 0  # moved on to the DLQ
    assert depth(sqs, dlq)[0] == len(bad)


def test_unreachable_certificate_is_retried_later(
    settings: Settings, sqs: Any, signer: SigningKeys
) -> None:
    ids = seed("cert@example.org")
    url = make_queue(sqs, visibility=1)
    note = signed(ev.bounce(ids["cert@example.org"], ["cert@example.org"], sent_at=SENT), signer)
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(note))
    down = Fetcher({})  # every fetch fails, as when Amazon's host cannot be reached
    first = poll(settings, sqs, url, down)
    assert (first.retry_later, first.unverified, first.deleted) == (1, 0, 0)
    assert statuses() == {"cert@example.org": "active"}
    time.sleep(1.5)
    second = poll(settings, sqs, url, Fetcher({CERT_URL: signer.pem}))
    assert (second.applied, second.deleted) == (1, 1)
    assert statuses() == {"cert@example.org": "bounced"}


def test_stale_but_authentic_envelope_is_still_applied(
    settings: Settings, sqs: Any, signer: SigningKeys, fetcher: Fetcher
) -> None:
    """A message may wait in the queue for days (poller down): still authentic."""
    ids = seed("waited@example.org")
    url = make_queue(sqs)
    note = ev.bounce(ids["waited@example.org"], ["waited@example.org"], sent_at=SENT)
    body = signed(note, signer, Timestamp=ev.iso(utcnow() - timedelta(days=3)))
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(body))
    assert poll(settings, sqs, url, fetcher).applied == 1
    assert statuses() == {"waited@example.org": "bounced"}


@pytest.fixture
def sns_client(moto_server: str) -> Any:
    return boto3.client(
        "sns",
        endpoint_url=moto_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def test_envelope_published_through_sns_without_a_real_signature_is_refused(
    settings: Settings, sqs: Any, sns_client: Any, fetcher: Fetcher
) -> None:
    """moto's SNS writes the envelope to the queue as SNS does, with a placeholder
    signature: with verification on it is refused; off, the queue's policy is trusted."""
    ids = seed("pub@example.org")
    url = make_queue(sqs, visibility=1)
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    topic = sns_client.create_topic(Name=f"ses-{uuid.uuid4().hex[:8]}")["TopicArn"]
    sns_client.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn)
    note = ev.complaint(ids["pub@example.org"], ["pub@example.org"], sent_at=SENT)
    sns_client.publish(TopicArn=topic, Message=json.dumps(note))

    allowed = settings.model_copy(update={"sns_topic_arns": [topic]})
    any_url = Fetcher({})
    any_url.pems = {json.loads(peek(sqs, url))["SigningCertURL"]: fetcher.pems[CERT_URL]}
    refused = poll(allowed, sqs, url, any_url)
    assert (refused.received, refused.unverified, refused.deleted) == (1, 1, 0)
    assert statuses() == {"pub@example.org": "active"}

    assert any_url.calls  # its certificate was fetched: the signature itself failed
    off = allowed.model_copy(update={"sqs_verify_signatures": False})
    time.sleep(1.5)  # the visibility timeout (1 s) passes; SQS hands it out again
    assert poll(off, sqs, url).applied == 1
    assert statuses() == {"pub@example.org": "complained"}
