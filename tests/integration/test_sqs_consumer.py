"""The SQS consumer against moto's SQS in server mode (a real process, over HTTP).

Messages are deleted only once applied; a message about a send not recorded yet, or a
malformed one, stays in the queue for redelivery (and, eventually, the dead-letter queue).
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
from sqlalchemy import select

from tests.unit import test_events as ev
from worker import config, events
from worker.cli import main
from worker.config import Settings
from worker.db import session_scope
from worker.models import Delivery, ProviderEvent, Subscriber, utcnow

SENT = utcnow() - timedelta(hours=1)


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


def seed(*emails: str) -> dict[str, str]:
    out = {}
    with session_scope() as session:
        for email in emails:
            sub = ev.add_subscriber(session, email)
            out[email] = ev.add_delivery(session, sub).message_id
    return out


def poll(settings: Settings, sqs: Any, url: str) -> events.PollCounts:
    return events.poll_sqs(
        settings, once=True, max_messages=10, wait_seconds=0, client=sqs, queue_url=url
    )


def test_applied_messages_are_deleted_the_rest_stay(settings: Settings, sqs: Any) -> None:
    ids = seed("ann@example.org", "bob@example.org")
    url = make_queue(sqs)
    ann_bounce = ev.envelope(ev.bounce(ids["ann@example.org"], ["ann@example.org"], sent_at=SENT))
    bodies = [
        json.dumps(ann_bounce),  # SNS envelope (raw message delivery off)
        json.dumps(ev.delivered(ids["bob@example.org"], ["bob@example.org"], sent_at=SENT)),  # raw
        json.dumps(ann_bounce),  # SNS delivered it twice
        json.dumps(ev.envelope(ev.bounce("not-yet", ["ann@example.org"], sent_at=utcnow()))),
        "this is not JSON",
    ]
    for body in bodies:
        sqs.send_message(QueueUrl=url, MessageBody=body)

    counts = poll(settings, sqs, url)

    assert (counts.received, counts.applied, counts.duplicate) == (5, 2, 1)
    assert (counts.retry_later, counts.invalid, counts.failed) == (1, 1, 0)
    assert counts.deleted == 3
    assert depth(sqs, url) == (0, 2)  # the retry and the malformed one: received, not deleted
    with session_scope() as session:
        subs = dict(session.execute(select(Subscriber.email, Subscriber.status)).all())
        states = sorted(session.scalars(select(Delivery.state)))
        vias = set(session.scalars(select(ProviderEvent.via)))
        stored = session.scalars(select(ProviderEvent.dedupe_key)).all()
    assert subs == {"ann@example.org": "bounced", "bob@example.org": "active"}
    assert states == ["bounced", "delivered"]
    assert vias == {"sqs"}
    assert ann_bounce["MessageId"] in stored and len(stored) == 2


def test_retried_message_applies_once_the_send_is_recorded(settings: Settings, sqs: Any) -> None:
    url = make_queue(sqs, visibility=1)
    message_id = f"0100-{uuid.uuid4()}"
    note = ev.envelope(ev.bounce(message_id, ["late@example.org"], sent_at=utcnow()))
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(note))

    first = poll(settings, sqs, url)
    assert (first.retry_later, first.deleted) == (1, 0)

    # The send's commit becomes visible; SQS redelivers after the visibility timeout.
    with session_scope() as session:
        sub = ev.add_subscriber(session, "late@example.org")
        ev.add_delivery(session, sub, message_id=message_id)
    time.sleep(1.5)
    second = poll(settings, sqs, url)
    assert (second.applied, second.deleted, second.retry_later) == (1, 1, 0)
    assert depth(sqs, url) == (0, 0)
    with session_scope() as session:
        assert session.scalars(select(Subscriber.status)).one() == "bounced"


def test_malformed_message_reaches_the_dead_letter_queue(settings: Settings, sqs: Any) -> None:
    dlq = make_queue(sqs)
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    url = make_queue(
        sqs,
        visibility=1,
        RedrivePolicy=json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "1"}),
    )
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"eventType": "Bounce"}))
    assert poll(settings, sqs, url).invalid == 1
    time.sleep(1.5)
    assert poll(settings, sqs, url).received == 0  # moved on, not handed out again
    assert depth(sqs, dlq)[0] == 1
    body = sqs.receive_message(QueueUrl=dlq)["Messages"][0]["Body"]
    assert json.loads(body) == {"eventType": "Bounce"}


def test_cli_poll_sqs_once(
    settings: Settings, sqs: Any, moto_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = seed("cli@example.org")
    url = make_queue(sqs)
    note = ev.envelope(ev.complaint(ids["cli@example.org"], ["cli@example.org"], sent_at=SENT))
    for _ in range(3):  # one notification, delivered three times
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(note))
    monkeypatch.setenv("PAPERMAIL_SQS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    config.reset_settings()
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
