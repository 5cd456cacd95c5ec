"""Batched apply == one by one: the same stream of notifications applied one at a time
(each in its own transaction, as the webhook does) and in batches (`apply_in_batches`,
as `events apply` and the SQS consumer do) leaves identical delivery, subscriber, event
and log rows, and gives identical outcomes. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from tests.unit.test_events import (
    NOW,
    add_delivery,
    add_subscriber,
    bounce,
    complaint,
    delivered,
    envelope,
    simple,
)
from worker import clock, config, events
from worker.db import Base, get_engine, session_scope
from worker.models import DeliveryAttempt

GUARDED = date(2026, 11, 28)  # an edition small enough for the guard to trip mid-stream
TABLES = ["subscribers", "deliveries", "delivery_attempts", "provider_events",
          "subscriber_log", "control_flags"]  # fmt: skip


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    request.getfixturevalue("settings" if request.param == "sqlite" else "pg_env")
    # Small thresholds so the reputation guard trips inside a batch.
    monkeypatch.setenv("PAPERMAIL_REPUTATION_MIN_SAMPLE", "5")
    monkeypatch.setenv("PAPERMAIL_BOUNCE_RATE_LIMIT", "0.45")
    monkeypatch.setenv("PAPERMAIL_COMPLAINT_RATE_LIMIT", "0.5")
    monkeypatch.setenv("PAPERMAIL_SOFT_BOUNCE_LIMIT", "3")
    config.reset_settings()
    with clock.installed(lambda: NOW):  # every stamp the same in both runs
        yield request.param


def world(session: Session) -> dict[str, str]:
    """Subscribers and sent deliveries; returns the message id of each named send."""
    ids: dict[str, str] = {}
    people = ["ann", "bob", "carol", "dave", "erin", "fay", "gus"]
    subs = {
        name: add_subscriber(
            session, f"{name}@example.org", soft_bounce_count=1 if name == "carol" else 0
        )
        for name in people
    }
    for name, sub in subs.items():
        ids[name] = add_delivery(session, sub, message_id=f"m-{name}").message_id or ""
    # carol's weekly edition of the next day too: two soft bounces in one batch.
    ids["carol2"] = add_delivery(session, subs["carol"], edition=GUARDED + timedelta(days=7),
                                 message_id="m-carol2").message_id or ""  # fmt: skip
    # gus's edition was re-sent: events about the first copy still count.
    session.add(DeliveryAttempt(delivery_id=session.get_one(type(subs["gus"]), subs["gus"].id)
                                .deliveries[0].id, kind="send", message_id="m-gus-first",
                                outcome="sent"))  # fmt: skip
    for i in range(6):  # the guarded edition: 6 sends, the guard trips at 3 hard bounces
        sub = add_subscriber(session, f"g{i}@example.org")
        ids[f"g{i}"] = add_delivery(session, sub, edition=GUARDED,
                                    message_id=f"m-g{i}").message_id or ""  # fmt: skip
    session.flush()
    return ids


def stream(ids: dict[str, str]) -> list[tuple[dict[str, Any], str | None]]:
    young = NOW - timedelta(seconds=30)
    old = NOW - timedelta(hours=2)
    ann_delivered = delivered(ids["ann"], ["ann@example.org"])
    no_key = complaint(ids["dave"], ["dave@example.org"])
    young_unknown = bounce("m-not-yet", ["zoe@example.org"], sent_at=young)
    out: list[tuple[dict[str, Any], str | None]] = [
        (ann_delivered, "k-ann"),
        (ann_delivered, "k-ann"),  # a repeat within the batch
        (bounce(ids["bob"], ["bob@example.org"]), "k-bob-bounce"),
        (delivered(ids["bob"], ["bob@example.org"]), "k-bob-delivery"),  # after the bounce
        (bounce(ids["carol"], ["carol@example.org"], "Transient"), "k-carol-1"),
        (bounce(ids["carol2"], ["carol@example.org"], "Transient"), "k-carol-2"),  # crosses 3
        (no_key, None),  # deduplicated by content
        (no_key, None),
        (bounce("m-gone", ["yan@example.org"], sent_at=old), "k-orphan"),
        (young_unknown, "k-young"),  # retry later
        (young_unknown, "k-young"),  # and its repeat too: nothing was stored
        (bounce(ids["erin"], ["erin@example.org", "ann@example.org"]), "k-multi"),
        (complaint(ids["fay"], ["nobody@example.org"]), "k-not-hers"),  # stored unlinked
        (bounce("m-gus-first", ["gus@example.org"]), "k-gus"),
        (simple("Reject", ids["fay"], ["fay@example.org"], {"reason": "Bad content"}), "k-rej"),
        (simple("Open", ids["ann"], ["ann@example.org"], {"timestamp": "x"}), "k-open"),
        (delivered(ids["bob"], ["bob@example.org"]), "k-bob-bounce"),  # same key, new content
    ]
    for i in range(4):  # hard bounces in the guarded edition: trips at the third
        out.append((bounce(ids[f"g{i}"], [f"g{i}@example.org"]), f"k-g{i}"))
    out.append((delivered(ids["g5"], ["g5@example.org"]), "k-g5"))
    out.append((envelope(delivered(ids["g4"], ["g4@example.org"]), "sns-g4"), None))
    return out


def outcomes(found: list[events.ApplyResult | events.RetryLater]) -> list[Any]:
    return [f"retry: {o}" if isinstance(o, events.RetryLater) else o.as_dict() for o in found]


def snapshot() -> dict[str, list[dict[str, Any]]]:
    with get_engine().connect() as conn:
        return {
            name: [
                dict(r._mapping) for r in conn.execute(text(f'SELECT * FROM "{name}" ORDER BY 1'))
            ]
            for name in TABLES
        }


def reset(backend: str) -> None:
    with get_engine().begin() as conn:
        if backend == "postgres":
            names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
            conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        else:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(table.delete())


def run(
    backend: str, given: list[tuple[dict[str, Any], str | None]], how: str, size: int = 0
) -> tuple[list[Any], dict[str, Any]]:
    reset(backend)
    with session_scope() as session:
        world(session)
    items = []
    for obj, key in given:
        if key is None and "Type" in obj:  # an SNS envelope: its MessageId is the key
            items += events.parse_envelope(obj)
        else:
            items.append((obj, key))
    found: list[events.ApplyResult | events.RetryLater] = []
    if how == "one":
        for notification, key in items:
            try:
                with session_scope() as session:
                    found.append(
                        events.apply_notification(session, notification, dedupe_key=key, via="x")
                    )
            except events.RetryLater as exc:
                found.append(exc)
    else:
        found = list(events.apply_in_batches(items, via="x", batch_size=size))
    return outcomes(found), snapshot()


def test_batches_give_the_outcome_of_one_by_one(backend: str) -> None:
    reset(backend)
    with session_scope() as session:
        given = stream(world(session))  # built once: builders add random feedback ids
    want_outcomes, want_rows = run(backend, given, "one")
    # The stream does what it is meant to (so the comparison is not of two empty runs).
    statuses = {r["email"]: (r["status"], r["soft_bounce_count"]) for r in want_rows["subscribers"]}
    assert statuses["bob@example.org"][0] == "bounced"
    assert statuses["carol@example.org"] == ("bounced", 3)
    assert statuses["dave@example.org"][0] == "complained"
    assert statuses["ann@example.org"][0] == "active"  # listed by erin's bounce: ignored
    assert statuses["gus@example.org"][0] == "bounced"
    assert [o for o in want_outcomes if isinstance(o, str)] == [want_outcomes[9]] * 2
    tripped = [o for o in want_outcomes if isinstance(o, dict)
               and any(c.startswith("sending paused") for c in o["changes"])]  # fmt: skip
    assert len(tripped) == 1 and tripped[0]["dedupe_key"] == "k-g2"
    assert "(3 hard bounces)" in tripped[0]["changes"][-1]
    for size in (len(want_outcomes), 5, 2):
        got_outcomes, got_rows = run(backend, given, "batch", size)
        assert got_outcomes == want_outcomes, f"batch size {size}"
        assert got_rows == want_rows, f"batch size {size}"


def test_sqs_groups_are_all_or_nothing(backend: str) -> None:
    """One SQS message (a group) with a notification that must wait writes nothing; the
    other messages of the batch apply."""
    reset(backend)
    with session_scope() as session:
        ids = world(session)
    young = bounce("m-not-yet", ["zoe@example.org"], sent_at=NOW - timedelta(seconds=5))
    items = [
        (delivered(ids["ann"], ["ann@example.org"]), "a"),
        (bounce(ids["bob"], ["bob@example.org"]), "b"),  # same group as the young one
        (young, "c"),
        (delivered(ids["bob"], ["bob@example.org"]), "d"),
    ]
    with session_scope() as session:
        found = events.apply_batch(session, items, via="sqs", groups=[0, 1, 1, 2])
    assert [type(o).__name__ for o in found] == [
        "ApplyResult", "RetryLater", "RetryLater", "ApplyResult"]  # fmt: skip
    rows = snapshot()
    assert sorted(r["dedupe_key"] for r in rows["provider_events"]) == ["a", "d"]
    states = {r["message_id"]: r["state"] for r in rows["deliveries"]}
    assert states["m-bob"] == "delivered" and states["m-ann"] == "delivered"


def test_invalid_item_in_a_batch_applies_nothing(backend: str) -> None:
    reset(backend)
    with session_scope() as session:
        ids = world(session)
    broken = bounce(ids["bob"], ["bob@example.org"])
    del broken["bounce"]["bounceType"]
    before = snapshot()
    problem = r"item 1: field 'bounce\.bounceType'"
    with pytest.raises(events.InvalidNotification, match=problem), session_scope() as session:
        events.apply_batch(session, [(delivered(ids["ann"], ["ann@example.org"]), "a"),
                                         (broken, "b")], via="x")  # fmt: skip
    assert snapshot() == before


def test_coalescer_answers_each_caller_its_own_outcome(backend: str) -> None:
    """Concurrent callers (the webhook's request threads) share batches; each gets what it
    would get alone: applied, a repeat, or retry later for its own young unknown message."""
    import threading

    reset(backend)
    with session_scope() as session:
        ids = world(session)
    young = bounce("m-not-yet", ["zoe@example.org"], sent_at=NOW - timedelta(seconds=5))
    calls = [[(delivered(ids[f"g{i}"], [f"g{i}@example.org"]), f"c{i}")] for i in range(6)]
    calls += [[(delivered(ids["g0"], ["g0@example.org"]), "c0")], [(young, "c-young")]]
    coalescer = events.Coalescer(config.get_settings(), via="sns", max_batch=3)
    answers: dict[int, Any] = {}
    start = threading.Barrier(len(calls))

    def call(n: int) -> None:
        start.wait()
        answers[n] = outcomes(coalescer.apply(calls[n]))[0]

    threads = [threading.Thread(target=call, args=(n,)) for n in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    statuses = {n: a if isinstance(a, str) else a["status"] for n, a in answers.items()}
    assert [statuses[n] for n in range(6)].count("applied") + (statuses[6] == "applied") == 6
    assert sorted(statuses[n] for n in (0, 6)) == ["applied", "duplicate"]
    assert statuses[7].startswith("retry:")
    rows = snapshot()
    assert sorted(r["dedupe_key"] for r in rows["provider_events"]) == [f"c{i}" for i in range(6)]
    guarded = {f"m-g{i}" for i in range(6)}
    assert {r["state"] for r in rows["deliveries"] if r["message_id"] in guarded} == {"delivered"}


def test_coalescer_keeps_a_failure_to_its_caller(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that fails is retried caller by caller: only the failing caller gets it."""
    reset(backend)
    with session_scope() as session:
        ids = world(session)
    real = events.apply_batch

    def fragile(session: Session, items: Any, **kw: Any) -> Any:
        if any(key == "poison" for _, key in items):
            raise RuntimeError("boom")
        return real(session, items, **kw)

    monkeypatch.setattr(events, "apply_batch", fragile)
    coalescer = events.Coalescer(config.get_settings(), via="sns")
    good = events._Job([(delivered(ids["ann"], ["ann@example.org"]), "ok")])
    bad = events._Job([(delivered(ids["bob"], ["bob@example.org"]), "poison")])
    coalescer._run([good, bad])
    assert good.outcomes is not None and good.outcomes[0].status == "applied"  # type: ignore[union-attr]
    assert isinstance(bad.error, RuntimeError) and bad.outcomes is None
    assert [r["dedupe_key"] for r in snapshot()["provider_events"]] == ["ok"]


def test_coalescer_gathers_callers_that_come_back_together(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``gather``, a leader waits for the callers still on their way (until all of
    ``callers`` are there) and applies them as one batch, each with its own answer; a lone
    caller is not held: the gathering ends when nobody comes."""
    import threading

    reset(backend)
    with session_scope() as session:
        ids = world(session)
    real = events.apply_batch
    sizes: list[int] = []

    def counted(session: Session, items: Any, **kw: Any) -> Any:
        sizes.append(len(items))
        return real(session, items, **kw)

    monkeypatch.setattr(events, "apply_batch", counted)
    coalescer = events.Coalescer(config.get_settings(), via="sns", gather=60, callers=4)
    answers: dict[int, str] = {}

    def call(n: int) -> None:
        found = coalescer.apply([(delivered(ids[f"g{n}"], [f"g{n}@example.org"]), f"c{n}")])
        answers[n] = found[0].status  # type: ignore[union-attr]

    first = threading.Thread(target=call, args=(0,))
    first.start()
    for _ in range(3000):  # the first caller leads and is gathering
        with coalescer._lock:
            if coalescer._gathering:
                break
        threading.Event().wait(0.01)
    later = [threading.Thread(target=call, args=(n,)) for n in (1, 2, 3)]
    for thread in later:
        thread.start()
    for thread in [first, *later]:
        thread.join(30)
    assert sizes == [4]
    assert answers == {0: "applied", 1: "applied", 2: "applied", 3: "applied"}

    alone = events.Coalescer(config.get_settings(), via="sns", gather=0.2)
    found = alone.apply([(delivered(ids["g4"], ["g4@example.org"]), "c4")])
    assert found[0].status == "applied" and sizes == [4, 1]  # type: ignore[union-attr]


@pytest.mark.parametrize("order", ["bounce first", "complaint first"])
def test_bounce_and_complaint_of_one_message_in_one_batch(backend: str, order: str) -> None:
    """One message bounced and complained about in the same batch: the delivery and its
    subscriber end as one by one leaves them, with both log lines in order."""
    reset(backend)
    with session_scope() as session:
        ids = world(session)
    pair = [(bounce(ids["bob"], ["bob@example.org"]), "b"),
            (complaint(ids["bob"], ["bob@example.org"]), "c")]  # fmt: skip
    if order == "complaint first":
        pair.reverse()
    given = [*pair, (delivered(ids["bob"], ["bob@example.org"]), "d")]
    want_outcomes, want_rows = run(backend, given, "one")
    got_outcomes, got_rows = run(backend, given, "batch", len(given))
    assert got_outcomes == want_outcomes and got_rows == want_rows
    bob = next(r for r in got_rows["subscribers"] if r["email"] == "bob@example.org")
    delivery = next(r for r in got_rows["deliveries"] if r["message_id"] == ids["bob"])
    if order == "bounce first":
        assert (bob["status"], delivery["state"]) == ("complained", "complained")
    else:  # a complaint is never downgraded by the bounce that follows
        assert (bob["status"], delivery["state"]) == ("complained", "complained")
        assert "already complained" in " ".join(want_outcomes[1]["changes"])
    actions = [r["action"] for r in got_rows["subscriber_log"] if r["subscriber_id"] == bob["id"]]
    assert actions == (["bounced", "complained"] if order == "bounce first" else ["complained"])


def test_repeats_inside_one_batch_are_applied_once(backend: str) -> None:
    """The same key three times, the same keyless content twice, one SNS message twice:
    each stored once, the repeats answered as duplicates of the first, in one batch."""
    reset(backend)
    with session_scope() as session:
        ids = world(session)
    soft = bounce(ids["carol"], ["carol@example.org"], "Transient")
    keyless = complaint(ids["dave"], ["dave@example.org"])
    sns = envelope(delivered(ids["ann"], ["ann@example.org"]), "sns-ann")
    given = [(soft, "k"), (soft, "k"), (keyless, None), (soft, "k"), (keyless, None),
             (sns, None), (sns, None)]  # fmt: skip
    want_outcomes, want_rows = run(backend, given, "one")
    got_outcomes, got_rows = run(backend, given, "batch", len(given))
    assert got_outcomes == want_outcomes and got_rows == want_rows
    statuses = [o["status"] for o in got_outcomes]
    assert statuses == ["applied", "duplicate", "applied", "duplicate", "duplicate",
                        "applied", "duplicate"]  # fmt: skip
    assert [o["event_id"] for o in got_outcomes] == [1, 1, 2, 1, 2, 3, 3]
    assert len(got_rows["provider_events"]) == 3
    carol = next(r for r in got_rows["subscribers"] if r["email"] == "carol@example.org")
    assert carol["soft_bounce_count"] == 2  # counted once, not three times


def test_the_callers_own_orm_objects_see_what_the_batch_wrote(backend: str) -> None:
    """apply_batch writes with Core statements; the ORM objects the caller's session holds
    are expired, so they read the new state (no stale subscriber or delivery)."""
    from worker.models import Delivery, Subscriber

    reset(backend)
    with session_scope() as session:
        ids = world(session)
    with session_scope() as session:
        bob = session.scalars(select(Subscriber).where(Subscriber.email == "bob@example.org")).one()
        row = session.scalars(select(Delivery).where(Delivery.message_id == ids["bob"])).one()
        assert (bob.status, row.state) == ("active", "sent")
        events.apply_batch(session, [(bounce(ids["bob"], ["bob@example.org"]), "x")], via="x")
        assert (bob.status, row.state) == ("bounced", "bounced")
        assert bob.suppression_reason == "hard bounce (Permanent/General)"
    with session_scope() as session:
        assert session.get_one(Subscriber, bob.id).status == "bounced"


def test_coalescer_groups_are_all_or_nothing_within_a_caller(backend: str) -> None:
    """A caller's own groups (one per SQS message): the group that must wait is returned
    as RetryLater and writes nothing, the caller's other groups apply."""
    reset(backend)
    with session_scope() as session:
        ids = world(session)
    young = bounce("m-not-yet", ["zoe@example.org"], sent_at=NOW - timedelta(seconds=5))
    coalescer = events.Coalescer(config.get_settings(), via="sqs")
    found = coalescer.apply(
        [(delivered(ids["ann"], ["ann@example.org"]), "a"),
         (bounce(ids["bob"], ["bob@example.org"]), "b"), (young, "c"),
         (delivered(ids["erin"], ["erin@example.org"]), "d")],
        groups=[0, 1, 1, 2],
    )  # fmt: skip
    assert [type(o).__name__ for o in found] == [
        "ApplyResult", "RetryLater", "RetryLater", "ApplyResult"]  # fmt: skip
    assert sorted(r["dedupe_key"] for r in snapshot()["provider_events"]) == ["a", "d"]


@pytest.mark.postgres
def test_guard_counts_are_edition_rates(pg_env: dict[str, str]) -> None:
    """The guard's one-statement counts (PostgreSQL) equal edition_rates', edition by
    edition: hard bounces without the suppression-list ones, complaints, a tripped guard."""
    from worker import event_rows
    from worker.models import ControlFlag

    with clock.installed(lambda: NOW), session_scope() as session:
        ids = world(session)
        items = [
            (bounce(ids["bob"], ["bob@example.org"]), "1"),
            (bounce(ids["carol"], ["carol@example.org"], "Permanent", "OnAccountSuppressionList"),
             "2"),
            (bounce(ids["g0"], ["g0@example.org"]), "3"),
            (bounce(ids["g1"], ["g1@example.org"], "Transient"), "4"),
            (complaint(ids["dave"], ["dave@example.org"]), "5"),
            (complaint(ids["g2"], ["g2@example.org"]), "6"),
            (simple("Reject", ids["fay"], ["fay@example.org"], {"reason": "x"}), "7"),
        ]  # fmt: skip
        events.apply_batch(session, items, via="x")
        session.add(ControlFlag(key=events.GUARD_FLAG_PREFIX + GUARDED.isoformat(), value={}))
        editions = sorted({date(2026, 11, 27), GUARDED, GUARDED + timedelta(days=7),
                           date(2020, 1, 1)})  # fmt: skip
        known = event_rows.guard_counts(session, editions, events.GUARD_FLAG_PREFIX)
        assert known is not None
        for edition in editions:
            rates = events.edition_rates(session, edition)
            want = (rates["accepted"], rates["hard_bounced"], rates["complained"],
                    rates["guard_tripped"])  # fmt: skip
            assert known[edition] == want, edition
        assert known[date(2026, 11, 27)][1] == 1  # bob; carol's is on the suppression list
        assert known[GUARDED][3] and not known[date(2026, 11, 27)][3]


@pytest.mark.postgres
def test_stored_json_is_the_text_received(pg_env: dict[str, str]) -> None:
    """On PostgreSQL the raw event is stored as the JSON text it came in (SNS's Message,
    or the canonical text a content key hashes), not serialised again: the same value."""
    with clock.installed(lambda: NOW), session_scope() as session:
        ids = world(session)
        note = delivered(ids["ann"], ["ann@example.org"])
        sns_text = (
            '{"eventType": "Delivery",  "mail": '
            + json.dumps(note["mail"])
            + (', "delivery": ' + json.dumps(note["delivery"]) + "}")
        )
        wrapped = {**envelope(note, "sns-1"), "Message": sns_text}
        bare = complaint(ids["dave"], ["dave@example.org"])
        items = events.parse_envelope([wrapped, bare])
        events.apply_batch(session, items, via="x")
        events.apply_batch(session, [(delivered(ids["bob"], ["bob@example.org"]), "plain")],
                           via="x")  # fmt: skip
        stored = dict(session.execute(text(
            "SELECT dedupe_key, raw::text FROM provider_events")).all())  # fmt: skip
    assert stored["sns-1"] == sns_text
    assert stored[events.content_key(bare)] == json.dumps(
        bare, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    assert json.loads(stored["plain"]) == delivered(ids["bob"], ["bob@example.org"])


@pytest.mark.postgres
def test_driver_errors_come_out_as_sqlalchemy_errors(pg_env: dict[str, str]) -> None:
    """The PostgreSQL statements run through psycopg directly; their errors still come out
    as SQLAlchemy's classes, so a database outage reads as one (OperationalError), and the
    batch's parameters stay out of the message."""
    from sqlalchemy import exc as sa_exc

    from worker import event_rows

    with pytest.raises(sa_exc.DataError) as info, session_scope() as session:
        event_rows._run(session, "SELECT 1 / %s", (0,))
    assert "division by zero" in str(info.value) and "[parameters" not in str(info.value)
    with pytest.raises(sa_exc.OperationalError), session_scope() as session:
        event_rows._run(session, "SELECT pg_terminate_backend(pg_backend_pid())", ())
    with session_scope() as session:  # the pool hands out a working connection again
        assert event_rows._run(session, "SELECT 1", ()) == [(1,)]


@pytest.mark.postgres
def test_array_literals_carry_any_string(pg_env: dict[str, str]) -> None:
    """The statements take their keys and message ids as one array literal: every
    character of an untrusted string stands for itself (quotes, backslashes, braces,
    commas, spaces, NULL, non-ASCII), and a batch finds rows by such keys and ids."""
    from worker import event_rows

    hostile = ['a"b', "c\\d", "{e,f}", " g ", "NULL", "", "é✓", '\\"', "h,i"]
    with session_scope() as session:
        got = event_rows._run(session, "SELECT %s::text[]", (event_rows.array(hostile),))
        assert got == [(hostile,)]
        assert event_rows._run(
            session, "SELECT %s::bigint[]", (event_rows.array([3, -1, 2**40]),)
        ) == [([3, -1, 2**40],)]
        assert event_rows._run(session, "SELECT %s::text[]", (event_rows.array([]),)) == [([],)]
    with clock.installed(lambda: NOW), session_scope() as session:
        sub = add_subscriber(session, "quote@example.org")
        message_id = add_delivery(session, sub, message_id='m-"q\\{x,y}').message_id or ""
        session.flush()
        note = delivered(message_id, ["quote@example.org"])
        first = events.apply_batch(session, [(note, 'k-"\\{,}')], via="x")
        again = events.apply_batch(session, [(note, 'k-"\\{,}')], via="x")
    assert [o.status for o in first + again] == ["applied", "duplicate"]  # type: ignore[union-attr]
    assert first[0].delivery_id is not None  # type: ignore[union-attr]
    assert again[0].event_id == first[0].event_id  # type: ignore[union-attr]
