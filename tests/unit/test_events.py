"""Provider notifications -> delivery and subscriber state (real SQLite; one test on PostgreSQL).

The builders at the top make SES notifications in both shapes (identity notifications with
``notificationType``, configuration-set events with ``eventType``); the webhook, CLI and SQS
tests reuse them.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker import delivery as delivery_mod
from worker import events
from worker.clock import utcnow
from worker.config import Settings
from worker.db import session_scope as session_for
from worker.errors import InvalidInput
from worker.models import (
    ControlFlag,
    Delivery,
    ProviderEvent,
    Subscriber,
    SubscriberLog,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
EDITION = date(2026, 11, 27)
SENT_AT = NOW - timedelta(hours=1)  # well past the orphan grace period


# --- builders ---------------------------------------------------------------------------


def iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def mail(message_id: str, destination: list[str], sent_at: datetime = SENT_AT) -> dict[str, Any]:
    return {
        "timestamp": iso(sent_at),
        "messageId": message_id,
        "source": "digest@papermail.test",
        "sourceArn": "arn:aws:ses:us-east-1:123456789012:identity/papermail.test",
        "destination": destination,
        "headersTruncated": False,
    }


def _shape(kind: str, shape: str) -> dict[str, Any]:
    return {"eventType": kind} if shape == "event" else {"notificationType": kind}


def bounce(
    message_id: str,
    recipients: list[str],
    bounce_type: str = "Permanent",
    subtype: str = "General",
    *,
    shape: str = "event",
    sent_at: datetime = SENT_AT,
) -> dict[str, Any]:
    return {
        **_shape("Bounce", shape),
        "bounce": {
            "bounceType": bounce_type,
            "bounceSubType": subtype,
            "bouncedRecipients": [
                {
                    "emailAddress": r,
                    "action": "failed",
                    "status": "5.1.1",
                    "diagnosticCode": "smtp; 550 5.1.1 user unknown",
                }
                for r in recipients
            ],
            "timestamp": iso(sent_at + timedelta(seconds=5)),
            "feedbackId": f"fb-{uuid.uuid4()}",
        },
        "mail": mail(message_id, recipients, sent_at),
    }


def complaint(
    message_id: str,
    recipients: list[str],
    *,
    shape: str = "event",
    sent_at: datetime = SENT_AT,
    feedback_type: str = "abuse",
) -> dict[str, Any]:
    return {
        **_shape("Complaint", shape),
        "complaint": {
            "complainedRecipients": [{"emailAddress": r} for r in recipients],
            "timestamp": iso(sent_at + timedelta(minutes=30)),
            "feedbackId": f"fb-{uuid.uuid4()}",
            "complaintFeedbackType": feedback_type,
        },
        "mail": mail(message_id, recipients, sent_at),
    }


def delivered(
    message_id: str, recipients: list[str], *, shape: str = "event", sent_at: datetime = SENT_AT
) -> dict[str, Any]:
    return {
        **_shape("Delivery", shape),
        "delivery": {
            "timestamp": iso(sent_at + timedelta(seconds=3)),
            "processingTimeMillis": 3000,
            "recipients": recipients,
            "smtpResponse": "250 ok",
        },
        "mail": mail(message_id, recipients, sent_at),
    }


def simple(kind: str, message_id: str, recipients: list[str], detail: dict[str, Any]) -> dict:
    key = events.DETAIL_KEYS.get(kind, kind.lower())
    return {"eventType": kind, key: detail, "mail": mail(message_id, recipients)}


def envelope(
    notification: dict[str, Any], message_id: str | None = None, topic: str | None = None
) -> dict[str, Any]:
    """The SNS envelope (unsigned) around a notification."""
    return {
        "Type": "Notification",
        "MessageId": message_id or str(uuid.uuid4()),
        "TopicArn": topic or "arn:aws:sns:us-east-1:123456789012:ses-events",
        "Message": json.dumps(notification),
        "Timestamp": iso(NOW),
        "SignatureVersion": "1",
        "Signature": "",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-x.pem",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
    }


def add_subscriber(session: Session, email: str, **kw: Any) -> Subscriber:
    sub = Subscriber(email=email, status=kw.pop("status", "active"), topics=["llm"], **kw)
    session.add(sub)
    session.flush()
    return sub


def add_delivery(
    session: Session,
    sub: Subscriber,
    *,
    state: str = "sent",
    edition: date = EDITION,
    message_id: str | None = None,
) -> Delivery:
    row = Delivery(
        subscriber_id=sub.id,
        edition_date=edition,
        state=state,
        message_id=message_id or f"0100-{uuid.uuid4()}-000000",
        sent_at=SENT_AT,
    )
    session.add(row)
    session.flush()
    return row


def apply(session: Session, notification: dict, key: str | None = None, **kw: Any):
    return events.apply_notification(
        session,
        notification,
        dedupe_key=key or str(uuid.uuid4()),
        via=kw.pop("via", "sns"),
        now=kw.pop("now", NOW),
        **kw,
    )


def count(session: Session, model: type) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def logs(session: Session, sub: Subscriber) -> list[SubscriberLog]:
    return list(
        session.scalars(
            select(SubscriberLog)
            .where(SubscriberLog.subscriber_id == sub.id)
            .order_by(SubscriberLog.id)
        )
    )


# --- policy -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["event", "notification"])
def test_permanent_bounce_suppresses_and_marks_delivery(session: Session, shape: str) -> None:
    sub = add_subscriber(session, "ann@example.org")
    row = add_delivery(session, sub)
    result = apply(session, bounce(row.message_id, [sub.email], shape=shape), "sns-1")

    assert result.status == "applied" and result.delivery_id == row.id
    session.refresh(sub)
    session.refresh(row)
    assert sub.status == "bounced"
    assert "hard bounce (Permanent/General)" in (sub.suppression_reason or "")
    assert row.state == "bounced" and row.bounced_at is not None
    assert "550 5.1.1" in (row.last_error or "")
    [entry] = logs(session, sub)
    assert entry.actor == "ses" and entry.action == "bounced"
    assert "active -> bounced" in (entry.detail or "")
    event = session.scalars(select(ProviderEvent)).one()
    assert event.dedupe_key == "sns-1" and event.event_type == "Bounce"
    assert event.subtype == "Permanent/General" and event.delivery_id == row.id
    assert event.recipients == ["ann@example.org"] and not event.orphan
    assert event.via == "sns" and event.raw["bounce"]["bounceType"] == "Permanent"
    # The delivery layer's last-minute check now refuses this subscriber.
    assert delivery_mod.unsendable_reason(sub, EDITION) == "subscriber is bounced"


def test_account_suppression_list_bounce(session: Session) -> None:
    sub = add_subscriber(session, "sup@example.org")
    row = add_delivery(session, sub)
    apply(session, bounce(row.message_id, [sub.email], "Permanent", "OnAccountSuppressionList"))
    session.refresh(sub)
    assert sub.status == "bounced"
    assert "suppression list" in (sub.suppression_reason or "")


@pytest.mark.parametrize("soft_type", ["Transient", "Undetermined"])
def test_soft_bounces_suppress_after_limit_in_a_row(
    session: Session, settings: Settings, soft_type: str
) -> None:
    assert settings.soft_bounce_limit == 3  # the documented default
    sub = add_subscriber(session, "soft@example.org")
    rows = [
        add_delivery(session, sub, edition=EDITION - timedelta(days=i)) for i in range(6, 0, -1)
    ]

    apply(session, bounce(rows[0].message_id, [sub.email], soft_type, "MailboxFull"))
    apply(session, bounce(rows[1].message_id, [sub.email], soft_type, "MailboxFull"))
    session.refresh(sub)
    assert (sub.status, sub.soft_bounce_count) == ("active", 2)
    assert rows[0].state == "bounced"  # this message did not arrive

    # A delivery in between restarts the count.
    result = apply(session, delivered(rows[2].message_id, [sub.email]))
    session.refresh(sub)
    assert sub.soft_bounce_count == 0
    assert any("soft bounce count 2 -> 0" in c for c in result.changes)

    for row in rows[3:5]:
        apply(session, bounce(row.message_id, [sub.email], soft_type))
    session.refresh(sub)
    assert (sub.status, sub.soft_bounce_count) == ("active", 2)
    result = apply(session, bounce(rows[5].message_id, [sub.email], soft_type))
    session.refresh(sub)
    assert (sub.status, sub.soft_bounce_count) == ("bounced", 3)
    assert "3 soft bounces in a row" in (sub.suppression_reason or "")
    actions = [entry.action for entry in logs(session, sub)]
    assert actions.count("soft_bounce") == 5 and actions[-1] == "bounced"
    assert all(entry.actor == "ses" for entry in logs(session, sub))


def test_soft_bounce_limit_is_a_setting(session: Session, settings: Settings) -> None:
    strict = settings.model_copy(update={"soft_bounce_limit": 1})
    sub = add_subscriber(session, "one@example.org")
    row = add_delivery(session, sub)
    apply(session, bounce(row.message_id, [sub.email], "Transient"), settings=strict)
    session.refresh(sub)
    assert sub.status == "bounced"


@pytest.mark.parametrize("shape", ["event", "notification"])
def test_complaint_suppresses(session: Session, shape: str) -> None:
    sub = add_subscriber(session, "grumpy@example.org")
    row = add_delivery(session, sub, state="delivered")
    result = apply(session, complaint(row.message_id, [sub.email], shape=shape))
    session.refresh(sub)
    session.refresh(row)
    assert result.status == "applied"
    assert sub.status == "complained" and "abuse" in (sub.suppression_reason or "")
    assert row.state == "complained" and row.complained_at is not None
    assert [e.action for e in logs(session, sub)] == ["complained"]


@pytest.mark.parametrize("shape", ["event", "notification"])
def test_delivery_marks_delivered(session: Session, shape: str) -> None:
    sub = add_subscriber(session, "ok@example.org", soft_bounce_count=2)
    row = add_delivery(session, sub)
    apply(session, delivered(row.message_id, [sub.email], shape=shape))
    session.refresh(row)
    session.refresh(sub)
    assert row.state == "delivered" and row.delivered_at is not None
    assert sub.status == "active" and sub.soft_bounce_count == 0
    assert logs(session, sub) == []  # no status change, no log row


def test_delivery_after_bounce_does_not_revive(session: Session) -> None:
    sub = add_subscriber(session, "gone@example.org")
    row = add_delivery(session, sub)
    apply(session, bounce(row.message_id, [sub.email]))
    result = apply(session, delivered(row.message_id, [sub.email]))
    session.refresh(row)
    session.refresh(sub)
    assert result.status == "applied" and result.changes == []
    assert row.state == "bounced" and row.delivered_at is None
    assert sub.status == "bounced"


def test_bounce_after_delivery_wins(session: Session) -> None:
    # Receiving servers may accept first and bounce later.
    sub = add_subscriber(session, "late@example.org")
    row = add_delivery(session, sub)
    apply(session, delivered(row.message_id, [sub.email]))
    apply(session, bounce(row.message_id, [sub.email]))
    session.refresh(row)
    assert row.state == "bounced"


def test_reject_fails_delivery_with_reason(session: Session) -> None:
    sub = add_subscriber(session, "virus@example.org")
    row = add_delivery(session, sub)
    result = apply(
        session, simple("Reject", row.message_id, [sub.email], {"reason": "Bad content"})
    )
    session.refresh(row)
    session.refresh(sub)
    assert result.status == "applied"
    assert row.state == "failed" and row.last_error == "rejected by SES: Bad content"
    assert sub.status == "active"


@pytest.mark.parametrize(
    ("kind", "detail"),
    [
        ("DeliveryDelay", {"delayType": "MailboxFull", "timestamp": iso(NOW)}),
        ("Send", {}),
    ],
)
def test_delay_and_send_are_stored_only(session: Session, kind: str, detail: dict) -> None:
    sub = add_subscriber(session, "later@example.org")
    row = add_delivery(session, sub)
    result = apply(session, simple(kind, row.message_id, [sub.email], detail))
    session.refresh(row)
    assert result.status == "applied" and result.changes == []
    assert row.state == "sent"
    event = session.scalars(select(ProviderEvent)).one()
    assert event.event_type == kind and event.delivery_id == row.id


@pytest.mark.parametrize("kind", ["Open", "Click", "Rendering Failure", "Subscription"])
def test_other_event_types_are_stored_and_ignored(session: Session, kind: str) -> None:
    sub = add_subscriber(session, "reader@example.org")
    row = add_delivery(session, sub)
    result = apply(session, simple(kind, row.message_id, [sub.email], {"timestamp": iso(NOW)}))
    session.refresh(row)
    assert result.status == "ignored" and row.state == "sent"
    event = session.scalars(select(ProviderEvent)).one()
    assert event.event_type == kind and not event.orphan


def test_ses_setup_notification_without_mail_is_ignored(session: Session) -> None:
    note = {"notificationType": "AmazonSnsSubscriptionSucceeded", "message": "You have..."}
    assert apply(session, note).status == "ignored"
    assert count(session, ProviderEvent) == 1


def test_multi_recipient_bounce_touches_only_the_deliverys_recipient(session: Session) -> None:
    ann = add_subscriber(session, "ann@example.org")
    bob = add_subscriber(session, "bob@example.org")
    bystander = add_subscriber(session, "carol@example.org")
    row = add_delivery(session, ann)
    recipients = ["ann@example.org", "Bob <BOB@Example.ORG>", "nobody@example.org"]
    result = apply(session, bounce(row.message_id, recipients))
    for sub in (ann, bob, bystander):
        session.refresh(sub)
    # The message went to ann alone: bob is named, recorded, and left alone.
    assert (ann.status, bob.status, bystander.status) == ("bounced", "active", "active")
    note = f"ignored: not a recipient of message {row.message_id}"
    assert f"recipient bob@example.org: {note}" in result.changes
    assert f"recipient nobody@example.org: {note}" in result.changes
    assert [e.action for e in logs(session, bob)] == ["event_ignored"]
    event = session.scalars(select(ProviderEvent)).one()
    assert event.recipients == ["ann@example.org", "bob@example.org", "nobody@example.org"]


# --- duplicates and orphans ------------------------------------------------------------


def test_repeat_changes_nothing(session: Session) -> None:
    sub = add_subscriber(session, "twice@example.org")
    row = add_delivery(session, sub)
    note = bounce(row.message_id, [sub.email], "Transient")
    first = apply(session, note, "sns-same")
    second = apply(session, note, "sns-same")
    session.refresh(sub)
    assert (first.status, second.status) == ("applied", "duplicate")
    assert second.delivery_id == row.id and second.event_id == first.event_id
    assert sub.soft_bounce_count == 1
    assert count(session, ProviderEvent) == 1 and len(logs(session, sub)) == 1


def test_repeat_without_message_id_dedupes_by_content(session: Session) -> None:
    sub = add_subscriber(session, "file@example.org")
    row = add_delivery(session, sub)
    note = bounce(row.message_id, [sub.email], "Transient")
    a = events.apply_notification(session, note, dedupe_key=None, via="file", now=NOW)
    b = events.apply_notification(
        session, json.loads(json.dumps(note)), dedupe_key=None, via="file", now=NOW
    )
    assert (a.status, b.status) == ("applied", "duplicate")
    assert a.dedupe_key == b.dedupe_key == events.content_key(note)
    assert a.dedupe_key.startswith("sha256:")
    session.refresh(sub)
    assert sub.soft_bounce_count == 1


def test_young_unknown_message_is_retried_later(session: Session, settings: Settings) -> None:
    sub = add_subscriber(session, "new@example.org")
    young = NOW - timedelta(seconds=settings.orphan_grace_seconds - 10)
    with pytest.raises(events.RetryLater, match="unknown message"):
        apply(session, bounce("not-recorded-yet", [sub.email], sent_at=young))
    assert count(session, ProviderEvent) == 0
    session.refresh(sub)
    assert sub.status == "active"
    # Once the send's commit is visible, the same notification applies.
    row = add_delivery(session, sub, message_id="not-recorded-yet")
    assert apply(session, bounce("not-recorded-yet", [sub.email], sent_at=young)).status == (
        "applied"
    )
    session.refresh(row)
    assert row.state == "bounced"


def test_old_unknown_message_is_stored_as_orphan(session: Session, settings: Settings) -> None:
    sub = add_subscriber(session, "old@example.org")
    old = NOW - timedelta(seconds=settings.orphan_grace_seconds + 10)
    result = apply(session, bounce("never-seen", [sub.email], sent_at=old))
    assert result.status == "orphan" and result.delivery_id is None
    event = session.scalars(select(ProviderEvent)).one()
    assert event.orphan and event.provider_message_id == "never-seen"
    session.refresh(sub)
    assert sub.status == "active"  # an orphan is recorded, not acted on


def test_young_unknown_send_event_is_not_retried(session: Session) -> None:
    note = simple("Send", "in-flight", ["x@example.org"], {})
    note["mail"]["timestamp"] = iso(NOW)
    assert apply(session, note).status == "orphan"


def test_invalid_notification_is_refused(session: Session) -> None:
    with pytest.raises(events.InvalidNotification, match=r"bounce\.bounceType"):
        apply(session, bounce("m", ["a@example.org"], "Sideways"))
    assert count(session, ProviderEvent) == 0


# --- reputation guard ------------------------------------------------------------------


def _edition(session: Session, n: int, edition: date = EDITION) -> list[Delivery]:
    return [
        add_delivery(
            session, add_subscriber(session, f"r{edition:%d}{i}@example.org"), edition=edition
        )
        for i in range(n)
    ]


def test_bounce_rate_guard_pauses_after_min_sample(session: Session, settings: Settings) -> None:
    s = settings.model_copy(update={"reputation_min_sample": 40})
    assert (settings.bounce_rate_limit, settings.complaint_rate_limit) == (0.05, 0.001)
    rows = _edition(session, 40)

    def hard(row: Delivery):
        return apply(session, bounce(row.message_id, [row.subscriber.email]), settings=s)

    # Soft bounces do not count towards the rate, as at SES.
    for row in rows[:4]:
        apply(session, bounce(row.message_id, [row.subscriber.email], "Transient"), settings=s)
    hard(rows[10])
    hard(rows[11])  # 2/40 = 5%: not past the limit
    assert delivery_mod.sending_paused(session) is None
    result = hard(rows[12])  # 3/40 = 7.5%
    reason = delivery_mod.sending_paused(session)
    assert reason and "bounce rate 7.5%" in reason and EDITION.isoformat() in reason
    assert any(c.startswith("sending paused") for c in result.changes)
    rates = events.edition_rates(session, EDITION, s)
    assert rates["accepted"] == 40 and rates["hard_bounced"] == 3 and rates["bounced"] == 7
    assert rates["bounce_rate"] == pytest.approx(3 / 40)
    assert rates["over_bounce_limit"] and rates["guard_tripped"]
    assert rates["sending_paused"] == reason

    # After the operator resumes, this edition does not pause again by itself.
    assert delivery_mod.resume_sending(session)
    hard(rows[13])
    assert delivery_mod.sending_paused(session) is None


def test_guard_waits_for_min_sample(session: Session, settings: Settings) -> None:
    rows = _edition(session, 10)  # default min sample 200
    for row in rows[:5]:
        apply(session, bounce(row.message_id, [row.subscriber.email]))
    rates = events.edition_rates(session, EDITION)
    assert rates["bounce_rate"] == 0.5 and not rates["sample_ok"]
    assert delivery_mod.sending_paused(session) is None


def test_complaint_rate_guard(session: Session, settings: Settings) -> None:
    s = settings.model_copy(update={"reputation_min_sample": 20})
    rows = _edition(session, 20)
    apply(session, complaint(rows[0].message_id, [rows[0].subscriber.email]), settings=s)
    reason = delivery_mod.sending_paused(session)
    assert reason and "complaint rate 5.00%" in reason
    flag = session.get(ControlFlag, events.GUARD_FLAG_PREFIX + EDITION.isoformat())
    assert flag is not None


def test_rates_are_per_edition(session: Session, settings: Settings) -> None:
    s = settings.model_copy(update={"reputation_min_sample": 10})
    other = EDITION - timedelta(days=1)
    _edition(session, 10, edition=other)
    rows = _edition(session, 10)
    apply(session, bounce(rows[0].message_id, [rows[0].subscriber.email]), settings=s)
    assert events.edition_rates(session, other, s)["hard_bounced"] == 0
    assert events.edition_rates(session, EDITION, s)["bounce_rate"] == 0.1
    assert delivery_mod.sending_paused(session)


# --- parsing ----------------------------------------------------------------------------


def test_parse_envelope_accepts_each_shape() -> None:
    note = bounce("m1", ["a@example.org"])
    [(n, key)] = events.parse_envelope(envelope(note, "sns-id-1"))
    assert n == note and key == "sns-id-1"
    [(n, key)] = events.parse_envelope(note)
    assert n == note and key == events.content_key(note)
    items = events.parse_envelope([envelope(note, "sns-id-2"), delivered("m2", ["b@x.org"])])
    assert len(items) == 2 and items[0][1] == "sns-id-2"


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ([], "the list is empty"),
        ("text", "notification: expected a JSON object, got str"),
        ([bounce("m", ["a@x.org"]), 5], "item 1: expected a JSON object"),
        ([{"mail": {}}], "item 0: field 'eventType' (or 'notificationType'): missing"),
        ([{"eventType": "Bounce", "bounce": {}}], "item 0: field 'mail'"),
        (
            [{"eventType": "Bounce", "mail": {"timestamp": iso(NOW)}, "bounce": {}}],
            "item 0: field 'mail.messageId'",
        ),
        (
            [
                delivered("m", ["a@x.org"]),
                {**bounce("m", ["a@x.org"]), "bounce": {"bounceType": "Permanent"}},
            ],
            "item 1: field 'bounce.bouncedRecipients'",
        ),
        (
            [{**complaint("m", ["a@x.org"]), "complaint": {"complainedRecipients": [{}]}}],
            "item 0: field 'complaint.complainedRecipients[0].emailAddress'",
        ),
        (
            [{**envelope(bounce("m", ["a@x.org"])), "Message": "{nope"}],
            "item 0: field 'Message': not valid JSON",
        ),
        (
            [{**envelope(bounce("m", ["a@x.org"])), "MessageId": ""}],
            "item 0: field 'MessageId'",
        ),
        (
            {**envelope(bounce("m", ["a@x.org"])), "Type": "SubscriptionConfirmation"},
            "notification: field 'Type'",
        ),
        (
            envelope({**bounce("m", ["a@x.org"]), "mail": {**mail("m", []), "timestamp": "x"}}),
            "in 'Message': field 'mail.timestamp'",
        ),
    ],
)
def test_parse_envelope_names_index_and_field(obj: object, expected: str) -> None:
    with pytest.raises(events.InvalidNotification) as info:
        events.parse_envelope(obj)
    assert expected in str(info.value)


def test_parse_envelope_reports_every_problem() -> None:
    bad = [{"mail": {}}, bounce("m", ["a@x.org"]), {"eventType": 3}]
    with pytest.raises(events.InvalidNotification) as info:
        events.parse_envelope(bad)
    assert len(info.value.problems) == 2
    assert "item 0" in info.value.problems[0] and "item 2" in info.value.problems[1]


# --- PostgreSQL -------------------------------------------------------------------------


@pytest.mark.postgres
def test_policy_and_dedupe_on_postgresql(pg_env: dict[str, str]) -> None:
    from worker.db import session_scope

    with session_scope() as session:
        sub = add_subscriber(session, "pg@example.org")
        row = add_delivery(session, sub)
        message_id = row.message_id
    with session_scope() as session:
        assert apply(session, bounce(message_id, ["pg@example.org"]), "pg-1").status == "applied"
    with session_scope() as session:
        assert apply(session, bounce(message_id, ["pg@example.org"]), "pg-1").status == (
            "duplicate"
        )
        sub = session.scalars(select(Subscriber)).one()
        assert sub.status == "bounced" and count(session, ProviderEvent) == 1


@pytest.mark.postgres
def test_concurrent_repeat_applies_once_on_postgresql(pg_env: dict[str, str]) -> None:
    """Two deliveries of one SNS message at once: the second waits, then is a duplicate."""
    import threading

    from worker.db import session_factory, session_scope

    with session_scope() as session:
        sub = add_subscriber(session, "race@example.org")
        message_id = add_delivery(session, sub).message_id
    note = bounce(message_id, ["race@example.org"], "Transient")
    first = session_factory()()
    assert apply(first, note, "race-1").status == "applied"  # holds its row locks, uncommitted
    outcome: list[str] = []

    def second() -> None:
        with session_scope() as session:
            outcome.append(apply(session, note, "race-1").status)

    thread = threading.Thread(target=second)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive() and outcome == []  # blocked behind the first transaction
    first.commit()
    first.close()
    thread.join(10)
    assert outcome == ["duplicate"]
    with session_scope() as session:
        assert session.scalars(select(Subscriber)).one().soft_bounce_count == 1
        assert count(session, ProviderEvent) == 1


# --- SQS loop edges (the happy path runs against moto in tests/integration) ---------------


class FlakySqs:
    """receive_message fails first, then serves the scripted batches."""

    def __init__(self, batches: list[list[dict[str, Any]]]) -> None:
        self.batches = batches
        self.calls: list[dict[str, Any]] = []
        self.deleted: list[str] = []

    def receive_message(self, **kw: Any) -> dict[str, Any]:
        self.calls.append(kw)
        if len(self.calls) == 1:
            raise ConnectionError("network down")
        return {"Messages": self.batches.pop(0) if self.batches else []}

    def delete_message_batch(self, **kw: Any) -> dict[str, Any]:
        self.deleted += [entry["ReceiptHandle"] for entry in kw["Entries"]]
        return {"Successful": [{"Id": entry["Id"]} for entry in kw["Entries"]], "Failed": []}


def test_poll_sqs_once_stops_on_receive_error(settings: Settings) -> None:
    client = FlakySqs([])
    topics = settings.model_copy(update={"sns_topic_arns": ["arn:aws:sns:us-east-1:1:t"]})
    counts = events.poll_sqs(topics, once=True, client=client, queue_url="http://q")
    assert counts.failed == 1 and counts.batches == 0 and len(client.calls) == 1
    assert client.calls[0]["WaitTimeSeconds"] == 2  # short wait for a periodic task


def test_poll_sqs_loop_survives_errors_until_stopped(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events.time, "sleep", lambda s: None)
    with session_for() as session:
        sub = add_subscriber(session, "loop@example.org")
        message_id = add_delivery(session, sub).message_id
    an_hour_ago = utcnow() - timedelta(hours=1)  # poll_sqs reads the process clock
    body = json.dumps(envelope(bounce(message_id, [sub.email], sent_at=an_hour_ago), "loop-1"))
    client = FlakySqs([[{"MessageId": "q1", "ReceiptHandle": "rh-1", "Body": body}]])
    seen: list[int] = []
    counts = events.poll_sqs(
        settings.model_copy(update={"sqs_verify_signatures": False}),  # signed: integration
        once=False,
        client=client,
        queue_url="http://q",
        on_batch=lambda c: seen.append(c.received),
        should_stop=lambda: len(client.calls) >= 3,
    )
    assert counts.failed == 1 and counts.applied == 1 and client.deleted == ["rh-1"]
    assert client.calls[1]["WaitTimeSeconds"] == 20 and seen == [1, 1]


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"queue_url": None}, "PAPERMAIL_SQS_QUEUE_URL"),
        ({"max_messages": 11}, "1-10"),
        ({"wait_seconds": 21}, "0-20"),
        ({}, "PAPERMAIL_SNS_TOPIC_ARNS is empty"),  # verification on, no topic allowed
    ],
)
def test_poll_sqs_arguments(settings: Settings, kw: dict[str, Any], expected: str) -> None:
    args: dict[str, Any] = {"queue_url": "http://q", "client": FlakySqs([]), **kw}
    with pytest.raises(InvalidInput, match=expected):
        events.poll_sqs(settings, once=True, **args)


# --- mailto unsubscribe and re-sent editions ----------------------------------------------


def received(subject: str) -> dict[str, Any]:
    """An SES receipt notification for mail to the List-Unsubscribe mailto."""
    return {
        "notificationType": "Received",
        "mail": {
            **mail(f"inbound-{uuid.uuid4()}", ["unsubscribe@papermail.localhost"]),
            "commonHeaders": {"subject": subject, "from": ["Reader <r@example.org>"]},
        },
        "receipt": {"action": {"type": "SNS"}},
    }


def test_mailto_unsubscribe_with_a_signed_token(session: Session) -> None:
    from worker import links

    sub = add_subscriber(session, "mailto@example.org")
    token = links.make_token("unsubscribe", {"s": sub.id})
    result = apply(session, received(f"unsubscribe {token}"))
    assert result.status == "ignored" and "unsubscribed by mailto" in result.changes[0]
    assert sub.status == "unsubscribed"
    # a forged or missing token changes nothing
    other = add_subscriber(session, "keep@example.org")
    forged = links.make_token("preferences", {"s": other.id})  # wrong purpose
    result = apply(session, received(f"unsubscribe {forged}"))
    assert "refused" in result.changes[0] and other.status == "active"
    result = apply(session, received("please unsubscribe me"))
    assert "no unsubscribe token" in result.changes[0] and other.status == "active"


def test_events_of_a_resent_editions_first_copy_still_match(session: Session) -> None:
    from worker.models import DeliveryAttempt

    sub = add_subscriber(session, "twice@example.org")
    row = add_delivery(session, sub, message_id="second-copy")
    session.add(
        DeliveryAttempt(delivery_id=row.id, kind="send", message_id="first-copy", outcome="sent")
    )
    session.flush()
    result = apply(session, bounce("first-copy", ["twice@example.org"], "Permanent"))
    assert result.status == "applied" and result.delivery_id == row.id
    assert sub.status == "bounced"


class ScriptedSqs:
    """A thread-safe stand-in serving scripted receives, then empty ones."""

    def __init__(self, batches: list[list[dict[str, Any]]]) -> None:
        import threading

        self.batches = batches
        self.lock = threading.Lock()
        self.deleted: list[str] = []

    def receive_message(self, **kw: Any) -> dict[str, Any]:
        with self.lock:
            return {"Messages": self.batches.pop(0) if self.batches else []}

    def delete_message_batch(self, **kw: Any) -> dict[str, Any]:
        with self.lock:
            self.deleted += [entry["ReceiptHandle"] for entry in kw["Entries"]]
        return {"Successful": [{"Id": e["Id"]} for e in kw["Entries"]], "Failed": []}


def test_poll_sqs_several_receivers_apply_every_message_once(settings: Settings) -> None:
    an_hour_ago = utcnow() - timedelta(hours=1)
    with session_for() as session:
        subs = [add_subscriber(session, f"r{i}@example.org") for i in range(30)]
        mids = [add_delivery(session, sub).message_id for sub in subs]
    bodies = [
        {"MessageId": f"q{i}", "ReceiptHandle": f"rh-{i}",
         "Body": json.dumps(envelope(delivered(mid, [sub.email], sent_at=an_hour_ago)))}
        for i, (mid, sub) in enumerate(zip(mids, subs, strict=True))
    ]  # fmt: skip
    bodies.append(dict(bodies[0], ReceiptHandle="rh-again"))  # SQS redelivers one
    client = ScriptedSqs([bodies[i : i + 10] for i in range(0, len(bodies), 10)])
    counts = events.poll_sqs(
        settings.model_copy(update={"sqs_verify_signatures": False}),
        once=True,
        client=client,
        queue_url="http://q",
        receivers=3,
    )
    assert (counts.received, counts.applied, counts.duplicate, counts.deleted) == (31, 30, 1, 31)
    assert sorted(client.deleted) == sorted(b["ReceiptHandle"] for b in bodies)
    with session_for() as session:
        assert count(session, ProviderEvent) == 30
        states = session.scalars(select(Delivery.state)).all()
        assert states == ["delivered"] * 30


def test_poll_sqs_receivers_share_database_batches(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What several receive loops bring while a batch runs is applied as one batch (not one
    batch per receive of at most 10), each message still all-or-nothing and deleted once."""
    import threading

    an_hour_ago = utcnow() - timedelta(hours=1)
    with session_for() as session:
        subs = [add_subscriber(session, f"s{i}@example.org") for i in range(40)]
        mids = [add_delivery(session, sub).message_id for sub in subs]
    bodies = [
        {"MessageId": f"q{i}", "ReceiptHandle": f"rh-{i}",
         "Body": json.dumps(envelope(delivered(mid, [sub.email], sent_at=an_hour_ago)))}
        for i, (mid, sub) in enumerate(zip(mids, subs, strict=True))
    ]  # fmt: skip
    client = ScriptedSqs([bodies[i : i + 10] for i in range(0, 40, 10)])
    sizes: list[int] = []
    first = threading.Event()
    real = events.apply_batch

    def slow_first(session: Any, items: Any, **kw: Any) -> Any:
        sizes.append(len(items))
        if not first.is_set():  # the other loops' messages queue up meanwhile
            first.set()
            threading.Event().wait(0.5)
        return real(session, items, **kw)

    monkeypatch.setattr(events, "apply_batch", slow_first)
    unsigned = settings.model_copy(update={"sqs_verify_signatures": False})
    counts = events.poll_sqs(unsigned, once=True, client=client, queue_url="http://q", receivers=4)
    assert (counts.received, counts.applied, counts.deleted) == (40, 40, 40)
    assert sum(sizes) == 40 and max(sizes) > 10, sizes  # receives shared a batch
    assert sorted(client.deleted) == sorted(b["ReceiptHandle"] for b in bodies)
    with session_for() as session:
        assert session.scalars(select(Delivery.state)).all() == ["delivered"] * 40
