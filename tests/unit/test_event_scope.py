"""A provider event touches only the delivery it names and the subscriber it went to.

Every other address a notification lists is recorded (in the event row, the result and,
for our own subscribers, their log as "ignored: not a recipient of message X") and never
suppressed or counted. Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.unit.test_events import (
    EDITION,
    NOW,
    add_delivery,
    add_subscriber,
    apply,
    bounce,
    complaint,
    delivered,
    logs,
    received,
    simple,
)
from worker import events, links
from worker.config import get_settings
from worker.db import session_scope
from worker.models import DeliveryAttempt, ProviderEvent, Subscriber


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def db(request: pytest.FixtureRequest) -> Iterator[Session]:
    request.getfixturevalue("settings" if request.param == "sqlite" else "pg_env")
    with session_scope() as session:
        yield session


def status(session: Session, *subs: Subscriber) -> tuple[str, ...]:
    for sub in subs:
        session.refresh(sub)
    return tuple(sub.status for sub in subs)


def ignored_logs(session: Session, sub: Subscriber) -> list[str]:
    return [e.detail or "" for e in logs(session, sub) if e.action == "event_ignored"]


@pytest.fixture
def people(db: Session) -> dict[str, Any]:
    """ann got the message; bob and carol are subscribers it did not go to."""
    ann = add_subscriber(db, "ann@example.org")
    bob = add_subscriber(db, "bob@example.org")
    carol = add_subscriber(db, "carol@example.org", soft_bounce_count=2)
    row = add_delivery(db, ann)
    other = add_delivery(db, bob)  # bob's own copy of the edition
    return {"ann": ann, "bob": bob, "carol": carol, "row": row, "bob_row": other}


# --- the right recipient plus others ---------------------------------------------------


@pytest.mark.parametrize("shape", ["event", "notification"])
def test_hard_bounce_listing_others_suppresses_only_the_recipient(
    db: Session, people: dict[str, Any], shape: str
) -> None:
    ann, bob, row = people["ann"], people["bob"], people["row"]
    listed = ["Ann <ANN@Example.ORG>", "bob@example.org", "nobody@example.org"]
    result = apply(db, bounce(row.message_id, listed, shape=shape))

    assert result.status == "applied" and result.delivery_id == row.id
    assert status(db, ann, bob, people["carol"]) == ("bounced", "active", "active")
    db.refresh(row)
    db.refresh(people["bob_row"])
    assert (row.state, people["bob_row"].state) == ("bounced", "sent")
    note = f"ignored: not a recipient of message {row.message_id}"
    assert f"recipient bob@example.org: {note}" in result.changes
    assert f"recipient nobody@example.org: {note}" in result.changes
    [entry] = ignored_logs(db, bob)
    assert note in entry and "Bounce (Permanent/General)" in entry
    assert bob.suppression_reason is None and ignored_logs(db, ann) == []
    event = db.scalars(select(ProviderEvent)).one()
    assert event.recipients == ["ann@example.org", "bob@example.org", "nobody@example.org"]
    assert event.delivery_id == row.id


def test_soft_bounces_count_only_for_the_recipient(db: Session, people: dict[str, Any]) -> None:
    ann, bob, carol = people["ann"], people["bob"], people["carol"]
    rows = [people["row"]] + [
        add_delivery(db, ann, edition=EDITION - timedelta(days=i)) for i in (1, 2)
    ]
    for row in rows:
        apply(db, bounce(row.message_id, [ann.email, bob.email, carol.email], "Transient"))
    assert status(db, ann, bob, carol) == ("bounced", "active", "active")
    assert (ann.soft_bounce_count, bob.soft_bounce_count, carol.soft_bounce_count) == (3, 0, 2)
    assert len(ignored_logs(db, bob)) == 3 and len(ignored_logs(db, carol)) == 3


def test_complaint_listing_others_suppresses_only_the_recipient(
    db: Session, people: dict[str, Any]
) -> None:
    ann, bob, row = people["ann"], people["bob"], people["row"]
    result = apply(db, complaint(row.message_id, ["bob@example.org", "ann@example.org"]))
    assert result.status == "applied"
    assert status(db, ann, bob) == ("complained", "active")
    db.refresh(row)
    assert row.state == "complained"
    assert ignored_logs(db, bob) and "Complaint (abuse)" in ignored_logs(db, bob)[0]


def test_delivery_resets_only_the_recipients_soft_bounce_count(
    db: Session, people: dict[str, Any]
) -> None:
    ann, carol = people["ann"], people["carol"]
    ann.soft_bounce_count = 1
    db.flush()
    result = apply(db, delivered(people["row"].message_id, ["ANN@example.org", carol.email]))
    assert result.status == "applied"
    db.refresh(ann)
    db.refresh(carol)
    assert (ann.soft_bounce_count, carol.soft_bounce_count) == (0, 2)
    assert ignored_logs(db, carol)


# --- a notification that lists only other addresses ------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda mid, to: bounce(mid, to, "Permanent"),
        lambda mid, to: bounce(mid, to, "Transient"),
        lambda mid, to: complaint(mid, to),
        lambda mid, to: delivered(mid, to),
        lambda mid, to: simple("Reject", mid, to, {"reason": "Bad content"}),
    ],
    ids=["hard-bounce", "soft-bounce", "complaint", "delivery", "reject"],
)
def test_event_naming_only_others_changes_nothing(
    db: Session, people: dict[str, Any], make: Any
) -> None:
    """The message id is ann's, the addresses are not: an anomaly or a forgery."""
    ann, bob, carol, row = people["ann"], people["bob"], people["carol"], people["row"]
    result = apply(db, make(row.message_id, ["bob@example.org", "Carol@Example.org"]))

    assert result.status == "ignored" and result.delivery_id is None
    assert status(db, ann, bob, carol) == ("active", "active", "active")
    assert (bob.soft_bounce_count, carol.soft_bounce_count) == (0, 2)
    db.refresh(row)
    assert row.state == "sent" and row.last_error is None
    assert any("went to ann@example.org" in c and "nothing changed" in c for c in result.changes)
    assert ignored_logs(db, bob) and ignored_logs(db, carol) and logs(db, ann) == []
    event = db.scalars(select(ProviderEvent)).one()
    # Stored as received, linked to no delivery, so it counts in no rate or history.
    assert event.delivery_id is None and not event.orphan
    assert event.recipients == ["bob@example.org", "carol@example.org"]
    assert events.edition_rates(db, EDITION)["hard_bounced"] == 0


def test_message_level_events_without_addresses_apply_to_the_recipient(db: Session) -> None:
    sub = add_subscriber(db, "whole@example.org", soft_bounce_count=1)
    row = add_delivery(db, sub)
    note = delivered(row.message_id, [sub.email])
    del note["delivery"]["recipients"]
    note["mail"]["destination"] = []
    assert apply(db, note).status == "applied"
    db.refresh(row)
    db.refresh(sub)
    assert row.state == "delivered" and sub.soft_bounce_count == 0
    other = add_delivery(db, sub, edition=EDITION - timedelta(days=1))
    reject = simple("Reject", other.message_id, [], {"reason": "Bad content"})
    assert apply(db, reject).status == "applied"
    db.refresh(other)
    assert other.state == "failed" and "Bad content" in (other.last_error or "")


def test_reject_of_the_recipients_message_fails_it(db: Session, people: dict[str, Any]) -> None:
    row = people["row"]
    apply(db, simple("Reject", row.message_id, ["ann@example.org", "bob@example.org"], {}))
    db.refresh(row)
    db.refresh(people["bob_row"])
    assert (row.state, people["bob_row"].state) == ("failed", "sent")


# --- unknown messages, re-sent editions, address forms ----------------------------------


def test_orphan_suppresses_nobody(db: Session, people: dict[str, Any]) -> None:
    bob = people["bob"]
    settings = get_settings()
    old = NOW - timedelta(seconds=settings.orphan_grace_seconds + 1)
    result = apply(db, bounce(f"unknown-{uuid.uuid4()}", [bob.email], sent_at=old))
    assert result.status == "orphan" and status(db, bob) == ("active",)
    young = NOW - timedelta(seconds=1)
    with pytest.raises(events.RetryLater):
        apply(db, complaint(f"unknown-{uuid.uuid4()}", [bob.email], sent_at=young))
    assert status(db, bob) == ("active",)
    assert len(db.scalars(select(ProviderEvent)).all()) == 1


def test_first_copy_of_a_resent_edition_is_scoped_too(db: Session, people: dict[str, Any]) -> None:
    ann, bob, row = people["ann"], people["bob"], people["row"]
    db.add(DeliveryAttempt(delivery_id=row.id, kind="send", message_id="first", outcome="sent"))
    db.flush()
    assert apply(db, bounce("first", [bob.email])).status == "ignored"
    assert status(db, ann, bob) == ("active", "active")
    assert apply(db, bounce("<first>", [bob.email, ann.email])).delivery_id == row.id
    assert status(db, ann, bob) == ("bounced", "active")


def test_internationalised_domain_matches_its_ascii_form(db: Session) -> None:
    ann = add_subscriber(db, "ann@bücher.example")
    bob = add_subscriber(db, "bob@bücher.example")
    row = add_delivery(db, ann)
    result = apply(
        db, bounce(row.message_id, ["ANN@xn--bcher-kva.example", "bob@xn--bcher-kva.example"])
    )
    assert result.status == "applied"
    assert status(db, ann, bob) == ("bounced", "active")
    assert ignored_logs(db, bob)


def test_repeat_of_a_scoped_event_records_nothing_twice(
    db: Session, people: dict[str, Any]
) -> None:
    note = bounce(people["row"].message_id, ["ann@example.org", "bob@example.org"])
    assert apply(db, note, "same").status == "applied"
    assert apply(db, note, "same").status == "duplicate"
    assert len(ignored_logs(db, people["bob"])) == 1


# --- mailto unsubscribe: the signed token decides, not the addresses --------------------


def test_mailto_unsubscribe_touches_the_token_holder_only(
    db: Session, people: dict[str, Any]
) -> None:
    ann, bob = people["ann"], people["bob"]
    note = received(f"unsubscribe {links.make_token('unsubscribe', {'s': ann.id})}")
    note["mail"]["destination"] = ["unsubscribe@papermail.localhost", bob.email]
    note["mail"]["source"] = bob.email
    note["mail"]["commonHeaders"]["from"] = [f"Bob <{bob.email}>"]
    result = apply(db, note)
    assert "unsubscribed by mailto" in result.changes[0]
    assert status(db, ann, bob) == ("unsubscribed", "active")
    # Mail from carol's own address without a token changes nothing.
    carol = people["carol"]
    plain = received("unsubscribe please")
    plain["mail"]["source"] = carol.email
    plain["mail"]["commonHeaders"]["from"] = [carol.email]
    assert "no unsubscribe token" in apply(db, plain).changes[0]
    assert status(db, carol) == ("active",)


def test_bare_addresses_are_read_as_parseaddr_reads_them() -> None:
    """normalise_address skips parseaddr for a bare dot-atom address: on generated ones
    (every atom character, dots, hyphens, mixed case) parseaddr gives the same address, and
    anything else still goes through parseaddr."""
    import random
    import string
    from email.utils import parseaddr

    rng = random.Random(3)
    atom = "!#$%&'*+/=?^_`{|}~-" + string.ascii_letters + string.digits
    label = string.ascii_letters + string.digits + "-"

    def word(chars: str) -> str:
        return "".join(rng.choice(chars) for _ in range(rng.randint(1, 8)))

    taken = 0
    for _ in range(20_000):
        local = ".".join(word(atom) for _ in range(rng.randint(1, 3)))
        domain = ".".join(word(label) for _ in range(rng.randint(1, 3)))
        address = f"{local}@{domain}"
        taken += events._BARE_ADDRESS.fullmatch(address) is not None
        assert events.normalise_address(address) == (parseaddr(address)[1] or address).lower()
    assert taken == 20_000
    for other in ["Ann <ANN@Example.org>", "ann..lee@example.org", ".ann@example.org",
                  "ann@example.org.", '"a b"@example.org', " ann@example.org ", "ann",
                  "ann@[192.0.2.1]", "Zoë <zoë@bücher.example>"]:  # fmt: skip
        assert events._BARE_ADDRESS.fullmatch(other) is None, other
        assert events.normalise_address(other) == (
            (parseaddr(other)[1] or other).strip().lower()
        ), other
