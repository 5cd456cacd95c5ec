"""Every row and outcome of applying provider events, against a golden file made by the
ORM implementation of `worker.events` (main before the events-speed work).

The apply path is written for speed (Core statements, arrays on PostgreSQL, plain rows
instead of ORM objects), so this pins what it must still do: the same stream of
notifications (each kind of policy, repeats inside one batch and across batches, a bounce
and a complaint about one message in one batch, soft bounces crossing the limit, a
Delivery resetting the count, an address that is not the recipient, an operator's own
suppression, a mailto unsubscribe of a subscriber the batch also bounces, orphans, a young
unknown message, the reputation guard tripping mid-batch) applied one by one and in
batches of every size, on SQLite and PostgreSQL, must leave exactly the rows (ids
included) and give exactly the outcomes recorded in tests/data/events_golden.json.

The clock is fixed and the builders' random feedback ids come from a counter, so the
stream is the same on every run. To regenerate after an *intended* change of the policy:
    .venv/bin/python -m tests.unit.test_events_golden --write
and review the diff of tests/data/events_golden.json.
"""

from __future__ import annotations

import itertools
import json
import sys
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
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
from tests.unit.test_events_batch import TABLES, reset
from worker import clock, config, events, links
from worker.db import Base, get_engine, session_scope
from worker.models import DeliveryAttempt, Subscriber

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "events_golden.json"
GUARDED = date(2026, 11, 28)
ACCOUNT = "OnAccountSuppressionList"
SIZES = ("one", 1, 2, 3, 7, 500)  # "one": apply_notification, a transaction each


def _counter_uuids() -> Iterator[uuid.UUID]:
    for n in itertools.count(1):
        yield uuid.UUID(int=n)


def received(token: str, n: int) -> dict[str, Any]:
    return {
        "notificationType": "Received",
        "mail": {
            "timestamp": "2026-11-27T11:00:00.000Z",
            "messageId": f"inbound-{n}",
            "destination": ["unsubscribe@papermail.localhost"],
            "commonHeaders": {"subject": f"unsubscribe {token}", "from": ["r@example.org"]},
        },
        "receipt": {"action": {"type": "SNS"}},
    }


def world(session: Session) -> dict[str, Any]:
    """Subscribers and sent deliveries; the message id of each named send, and ids."""
    ids: dict[str, Any] = {}
    people = ["ann", "bob", "carol", "dave", "erin", "fay", "gus", "hal", "ida", "jo",
              "kim", "lou", "max", "ned"]  # fmt: skip
    extra: dict[str, dict[str, Any]] = {
        "carol": {"soft_bounce_count": 1},
        "hal": {"soft_bounce_count": 2},
        "ida": {"status": "paused"},
        "jo": {"suppressed_at": NOW - timedelta(days=3), "suppression_reason": "legal request"},
        "kim": {"status": "unsubscribed"},
    }
    subs = {name: add_subscriber(session, f"{name}@example.org", **extra.get(name, {}))
            for name in people}  # fmt: skip
    subs["zoe"] = add_subscriber(session, "zoë@bücher.example")
    for name, sub in subs.items():
        ids[name] = add_delivery(session, sub, message_id=f"m-{name}").message_id
        ids[f"id-{name}"] = sub.id
    ids["carol2"] = add_delivery(session, subs["carol"], edition=GUARDED + timedelta(days=7),
                                 message_id="m-carol2").message_id  # fmt: skip
    ids["hal2"] = add_delivery(session, subs["hal"], edition=GUARDED + timedelta(days=7),
                               message_id="<m-hal2>").message_id  # fmt: skip
    gus = session.get_one(Subscriber, subs["gus"].id)
    session.add(DeliveryAttempt(delivery_id=gus.deliveries[0].id, kind="send",
                                message_id="m-gus-first", outcome="sent"))  # fmt: skip
    for i in range(8):  # the guarded edition: trips at the fourth hard bounce of 8
        sub = add_subscriber(session, f"g{i}@example.org")
        ids[f"g{i}"] = add_delivery(session, sub, edition=GUARDED,
                                    message_id=f"m-g{i}").message_id  # fmt: skip
    session.flush()
    return ids


def stream(ids: dict[str, Any]) -> list[tuple[dict[str, Any], str | None]]:
    young = NOW - timedelta(seconds=30)
    old = NOW - timedelta(hours=2)
    ann = delivered(ids["ann"], ["ann@example.org"])
    dave = complaint(ids["dave"], ["dave@example.org"])
    unknown_young = bounce("m-not-yet", ["yves@example.org"], sent_at=young)
    lou_token = links.make_token("unsubscribe", {"s": ids["id-lou"]})
    kim_token = links.make_token("unsubscribe", {"s": ids["id-kim"]})
    delay = {"delayType": "MailboxFull", "timestamp": "2026-11-27T11:30:00Z"}
    out: list[tuple[dict[str, Any], str | None]] = [
        (ann, "k-ann"),
        (ann, "k-ann"),  # a repeat within the batch
        (bounce(ids["bob"], ["bob@example.org"]), "k-bob-bounce"),
        (complaint(ids["bob"], ["bob@example.org"]), "k-bob-complaint"),  # same message
        (delivered(ids["bob"], ["bob@example.org"]), "k-bob-delivery"),  # never downgrades
        (bounce(ids["carol"], ["carol@example.org"], "Transient"), "k-carol-1"),
        (bounce(ids["carol2"], ["Carol <CAROL@example.org>"], "Transient"), "k-carol-2"),
        (dave, None),  # deduplicated by content
        (dave, None),
        (bounce("m-gone", ["yan@example.org"], sent_at=old), "k-orphan"),
        (unknown_young, "k-young"),  # retry later
        (unknown_young, "k-young"),
        (bounce(ids["erin"], ["erin@example.org", "ann@example.org"]), "k-multi"),
        (complaint(ids["fay"], ["nobody@example.org", "gus@example.org"]), "k-not-hers"),
        (bounce("m-gus-first", ["gus@example.org"]), "k-gus"),
        (simple("Reject", ids["fay"], ["fay@example.org"], {"reason": "Bad content"}), "k-rej"),
        (simple("Open", ids["ann"], ["ann@example.org"], {"timestamp": "x"}), "k-open"),
        (simple("DeliveryDelay", ids["ann"], ["ann@example.org"], delay), "k-delay"),
        (delivered(ids["bob"], ["bob@example.org"]), "k-bob-bounce"),  # same key, new content
        (bounce(ids["hal"], ["hal@example.org"], "Undetermined"), "k-hal-1"),  # 2 -> 3: out
        (delivered("m-hal2", ["hal@example.org"]), "k-hal-2"),  # <id> form; no revival
        (bounce(ids["ida"], ["ida@example.org"], "Permanent", ACCOUNT), "k-ida"),
        (complaint(ids["jo"], ["jo@example.org"], feedback_type="not-spam"), "k-jo"),
        (bounce(ids["kim"], ["kim@example.org"]), "k-kim"),  # already unsubscribed
        (bounce(ids["lou"], ["lou@example.org"], "Transient"), "k-lou-soft"),
        (received(lou_token, 1), "k-lou-mailto"),  # after a soft bounce in the same batch
        (bounce(ids["lou"], ["lou@example.org"]), "k-lou-hard"),  # then hard: unsubscribed
        (received(kim_token, 2), "k-kim-mailto"),  # already unsubscribed
        (received("not-a-token-at-all-xxxxxxxx", 3), "k-forged"),
        (delivered(ids["max"], ["max@example.org"]), "k-max"),
        (bounce(ids["max"], ["max@example.org"], "Transient"), "k-max-soft"),  # after delivery
        (delivered(ids["ned"], []), "k-ned"),  # lists nobody: about the message
        (bounce(ids["zoe"], ["zoë@xn--bcher-kva.example"]), "k-zoe"),  # IDNA form
        (simple("Subscription", ids["ann"], ["ann@example.org"], {}), "k-sub"),
    ]
    for i in range(5):  # hard bounces in the guarded edition: trips at the fourth
        out.append((bounce(ids[f"g{i}"], [f"g{i}@example.org"]), f"k-g{i}"))
    out.append((complaint(ids["g6"], ["g6@example.org"]), "k-g6"))
    out.append((delivered(ids["g5"], ["g5@example.org"]), "k-g5"))
    out.append((envelope(delivered(ids["g7"], ["g7@example.org"]), "sns-g7"), None))
    out.append((envelope(delivered(ids["g7"], ["g7@example.org"]), "sns-g7"), None))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def snapshot() -> dict[str, list[dict[str, Any]]]:
    """Every row, read through the tables' types (so both backends give the same values)."""
    with get_engine().connect() as conn:
        out = {}
        for name in TABLES:
            table = Base.metadata.tables[name]
            order = list(table.primary_key.columns)
            out[name] = [_plain(dict(r._mapping))
                         for r in conn.execute(select(table).order_by(*order))]  # fmt: skip
        return out


def run(backend: str, size: str | int) -> dict[str, Any]:
    reset(backend)
    with session_scope() as session:
        given = stream(world(session))
    items: list[tuple[dict[str, Any], str | None]] = []
    for obj, key in given:
        items += events.parse_envelope(obj) if key is None and "Type" in obj else [(obj, key)]
    found: list[events.ApplyResult | events.RetryLater] = []
    if size == "one":
        for notification, key in items:
            try:
                with session_scope() as session:
                    found.append(
                        events.apply_notification(session, notification, dedupe_key=key, via="x")
                    )
            except events.RetryLater as exc:
                found.append(exc)
    else:
        found = list(events.apply_in_batches(items, via="x", batch_size=int(size)))
    outcomes = [f"retry: {o}" if isinstance(o, events.RetryLater) else o.as_dict()
                for o in found]  # fmt: skip
    return {"outcomes": outcomes, "rows": snapshot()}


def _configure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAPERMAIL_REPUTATION_MIN_SAMPLE", "6")
    monkeypatch.setenv("PAPERMAIL_BOUNCE_RATE_LIMIT", "0.45")
    monkeypatch.setenv("PAPERMAIL_COMPLAINT_RATE_LIMIT", "0.5")
    monkeypatch.setenv("PAPERMAIL_SOFT_BOUNCE_LIMIT", "3")
    config.reset_settings()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    request.getfixturevalue("settings" if request.param == "sqlite" else "pg_env")
    _configure(monkeypatch)
    with clock.installed(lambda: NOW):
        yield request.param


@pytest.mark.parametrize("size", SIZES)
def test_rows_and_outcomes_match_the_golden_file(
    backend: str, size: str | int, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = _counter_uuids()
    monkeypatch.setattr(uuid, "uuid4", lambda: next(fresh))
    got = run(backend, size)
    want = json.loads(GOLDEN.read_text(encoding="utf-8"))
    # The stream does what it is meant to (so a golden file of nothing cannot pass).
    statuses = {r["email"]: r["status"] for r in want["rows"]["subscribers"]}
    assert statuses["bob@example.org"] == "complained"
    assert statuses["lou@example.org"] == "unsubscribed"
    assert statuses["hal@example.org"] == "bounced"
    assert any("sending paused" in c for o in want["outcomes"] if isinstance(o, dict)
               for c in o["changes"])  # fmt: skip
    assert got["outcomes"] == want["outcomes"], f"outcomes differ (batch size {size})"
    for table in TABLES:
        rows = got["rows"][table]
        if want["rows"][table]:
            # Columns added to the schema after the golden file was written: the seed leaves
            # them empty and applying events must not write them.
            known = set(want["rows"][table][0])
            later = {c for row in rows for c in row} - known
            assert all(row[c] is None for row in rows for c in later), f"{table}: {later}"
            rows = [{k: v for k, v in row.items() if k in known} for row in rows]
        assert rows == want["rows"][table], f"{table} differs (batch size {size})"


def _write() -> None:  # pragma: no cover - run by hand
    import os
    import tempfile

    from worker import db, migrate

    with tempfile.TemporaryDirectory() as tmp:
        for key in [k for k in os.environ if k.startswith("PAPERMAIL_")]:
            del os.environ[key]
        os.environ["PAPERMAIL_DATABASE_URL"] = f"sqlite:///{tmp}/golden.db"
        os.environ.update({"PAPERMAIL_REPUTATION_MIN_SAMPLE": "6",
                           "PAPERMAIL_BOUNCE_RATE_LIMIT": "0.45",
                           "PAPERMAIL_COMPLAINT_RATE_LIMIT": "0.5",
                           "PAPERMAIL_SOFT_BOUNCE_LIMIT": "3"})  # fmt: skip
        config.reset_settings()
        db.dispose_engines()
        migrate.upgrade()
        fresh = _counter_uuids()
        uuid.uuid4 = lambda: next(fresh)  # type: ignore[assignment]
        with clock.installed(lambda: NOW):
            record = run("sqlite", "one")
        db.dispose_engines()
    GOLDEN.write_text(json.dumps(record, indent=1, ensure_ascii=False, sort_keys=True) + "\n",
                      encoding="utf-8")  # fmt: skip
    print(f"wrote {len(record['outcomes'])} outcomes to {GOLDEN}")


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.unit.test_events_golden --write")
    _write()
