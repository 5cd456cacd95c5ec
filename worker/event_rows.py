"""The statements of a batch of provider events (see worker/events.py).

A batch reads its deliveries and their subscribers once, locked in id order, into plain
rows (:class:`DeliveryRow`, :class:`SubscriberRow`), not ORM objects: the identity map,
attribute instrumentation and the unit of work cost more per event than the policy itself.
The policy edits the rows and :class:`Changes` writes back what changed, one statement per
table.

On PostgreSQL the statements are fixed SQL run on the session's own connection (so in its
transaction) through psycopg, with no SQLAlchemy statement in between: each takes one
array (``= ANY(%s::text[])``, one literal: :func:`array`) or one JSON document of rows
(``json_to_recordset``), so its text never grows with the batch, psycopg prepares it once,
and the server runs one statement per table instead of one per row. For a webhook's small
batches the SQLAlchemy layers cost more than the database did (about 0.5 ms of CPU per
statement). SQLite gets the same rows through SQLAlchemy Core.

A session that holds ORM copies of rows written here (a caller's own objects, or rows the
mailto unsubscribe loaded) has them expired after each write, so it reads the new values.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from worker.db import dialect_insert
from worker.models import (
    ACCEPTED_DELIVERY_STATES,
    HARD_BOUNCE_PREDICATE,
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    ProviderEvent,
    Subscriber,
    SubscriberLog,
)

_SQLITE_CHUNK = 500  # values per IN (...) list on SQLite (its parameter limit)

_DELIVERIES = Delivery.__table__
_SUBSCRIBERS = Subscriber.__table__
_EVENTS = ProviderEvent.__table__
_ATTEMPTS = DeliveryAttempt.__table__
_LOG = SubscriberLog.__table__


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _driver(session: Session) -> Any:
    """The psycopg connection of the session's transaction (its pending ORM changes
    flushed first, as a query through the session would). Kept for the transaction:
    finding it through the session costs more than most statements of a small batch."""
    session.flush()
    transaction = session.get_transaction()
    cached = session.info.get("papermail_driver")
    if cached is not None and cached[0] is transaction:
        return cached[1]
    driver = session.connection().connection.driver_connection
    session.info["papermail_driver"] = (session.get_transaction(), driver)
    return driver


def _run(session: Session, sql: str, params: Any) -> list[Any]:
    """One statement on the session's psycopg connection; its rows (none for a write). A
    driver error comes out as SQLAlchemy's own class (OperationalError, IntegrityError...),
    as from any other statement: callers tell a database outage by those."""
    import psycopg

    try:
        cursor = _driver(session).execute(sql, params)
        return cursor.fetchall() if cursor.description is not None else []
    except psycopg.Error as exc:
        # Parameters left out of the message: a batch's JSON document is long, and personal.
        raise sa_exc.DBAPIError.instance(
            sql, params, exc, psycopg.Error, hide_parameters=True
        ) from exc


def array(values: Iterable[str | int]) -> str:
    """A PostgreSQL array literal of strings or integers, for a ``%s::text[]`` (or
    ``::bigint[]``) parameter: psycopg dumps a Python list by inspecting every element to
    choose its type (about 4 µs an element, 0.1 ms for a list of 30), one str costs
    nothing. Each string is quoted, so any character stands for itself."""
    return (
        "{"
        + ",".join(
            str(v)
            if isinstance(v, int)
            else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            for v in values
        )
        + "}"
    )


def _utc(value: datetime | None) -> datetime | None:
    # As the UTCDateTime column type reads them.
    return None if value is None else value.astimezone(UTC)


def _chunks(values: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(values), _SQLITE_CHUNK):
        yield values[start : start + _SQLITE_CHUNK]


class SubscriberRow:
    """The columns of a subscriber the event policy reads and writes."""

    __slots__ = (
        "email",
        "id",
        "soft_bounce_count",
        "status",
        "suppressed_at",
        "suppression_reason",
        "updated_at",
    )
    COLUMNS = __slots__
    _TIMES = ("suppressed_at", "updated_at")

    id: int
    email: str
    status: str
    soft_bounce_count: int
    suppressed_at: datetime | None
    suppression_reason: str | None
    updated_at: datetime | None

    def __init__(self, values: Iterable[Any], *, raw: bool = False) -> None:
        for name, value in zip(self.COLUMNS, values, strict=True):
            setattr(self, name, _utc(value) if raw and name in self._TIMES else value)


class DeliveryRow:
    """The columns of a delivery the event policy reads and writes, and its subscriber."""

    __slots__ = (
        "bounced_at",
        "complained_at",
        "delivered_at",
        "edition_date",
        "finished_at",
        "id",
        "last_error",
        "message_id",
        "state",
        "subscriber",
        "subscriber_id",
        "updated_at",
    )
    COLUMNS = tuple(name for name in __slots__ if name != "subscriber")
    _TIMES = ("bounced_at", "complained_at", "delivered_at", "finished_at", "updated_at")

    id: int
    subscriber_id: int
    edition_date: date
    state: str
    message_id: str | None
    last_error: str | None
    subscriber: SubscriberRow

    def __init__(self, values: Iterable[Any], *, raw: bool = False) -> None:
        for name, value in zip(self.COLUMNS, values, strict=True):
            setattr(self, name, _utc(value) if raw and name in self._TIMES else value)


_SUB_COLS = [_SUBSCRIBERS.c[name] for name in SubscriberRow.COLUMNS]
_DELIVERY_COLS = [_DELIVERIES.c[name] for name in DeliveryRow.COLUMNS]
_SUB_SQL = ", ".join(SubscriberRow.COLUMNS)
_DELIVERY_SQL = ", ".join(DeliveryRow.COLUMNS)
# What the policy may change, written back whole for each row it changed.
_DELIVERY_WRITES = ("state", "updated_at", "last_error", "delivered_at", "bounced_at",
                    "complained_at", "finished_at")  # fmt: skip
_SUB_WRITES = ("status", "updated_at", "suppression_reason", "soft_bounce_count")
_LOG_COLUMNS = ("subscriber_id", "at", "action", "detail", "actor")


def message_id_forms(message_id: str) -> tuple[str, ...]:
    """The stored forms a provider message id may have (with or without <>)."""
    bare = message_id.strip("<>")
    return tuple(sorted({message_id, bare, f"<{bare}>"}))


# --- reading ----------------------------------------------------------------------------

# Stored keys, the deliveries of the message ids, and those deliveries' subscribers (both
# locked in id order, so two batches lock shared rows in the same order: no deadlock).
_PG_STORED = (
    "SELECT dedupe_key, id, delivery_id FROM provider_events WHERE dedupe_key = ANY(%s::text[])"
)
_PG_DELIVERIES = (
    f"SELECT {_DELIVERY_SQL} FROM deliveries WHERE message_id = ANY(%s::text[]) "
    "ORDER BY id FOR UPDATE"
)
_PG_DELIVERIES_BY_ID = (
    f"SELECT {_DELIVERY_SQL} FROM deliveries WHERE id = ANY(%s::bigint[]) ORDER BY id FOR UPDATE"
)
_PG_SUBSCRIBERS_OF = (
    f"SELECT {_SUB_SQL} FROM subscribers WHERE id IN "
    "(SELECT subscriber_id FROM deliveries WHERE message_id = ANY(%s::text[])) "
    "ORDER BY id FOR UPDATE"
)
_PG_SUBSCRIBERS = (
    f"SELECT {_SUB_SQL} FROM subscribers WHERE id = ANY(%s::integer[]) ORDER BY id FOR UPDATE"
)
_PG_ATTEMPTS = (
    "SELECT delivery_id, message_id FROM delivery_attempts "
    "WHERE message_id = ANY(%s::text[]) ORDER BY id"
)


def read_batch(
    session: Session, keys: list[str], message_ids: list[str]
) -> tuple[dict[str, tuple[int, int | None]], dict[str, DeliveryRow]]:
    """The stored dedupe keys among ``keys`` (key -> (event id, delivery id)), and the
    delivery each provider message id belongs to (its latest send, or an earlier attempt
    of it: the events of a re-sent edition's first copy still count), locked, with its
    subscriber loaded and locked too (the only subscriber its events may touch; one row
    per subscriber, shared by its deliveries)."""
    wanted = {m: message_id_forms(m) for m in set(message_ids)}
    variants = sorted({v for forms in wanted.values() for v in forms})
    unique_keys = sorted(set(keys))
    if is_postgres(session):
        stored, by_variant, subs = _pg_read(session, unique_keys, variants)
    else:
        stored = _stored_keys(session, unique_keys)
        by_variant, subs = {}, {}
        for chunk in _chunks(variants):
            for row in _locked_deliveries(session, _DELIVERIES.c.message_id.in_(chunk)):
                if row.message_id is not None:
                    by_variant.setdefault(row.message_id, row)
    missing = sorted(
        {v for m, forms in wanted.items() if not any(f in by_variant for f in forms) for v in forms}
    )
    if missing:
        _add_earlier_sends(session, missing, by_variant)
    found: dict[str, DeliveryRow] = {}
    for message_id, forms in wanted.items():
        for form in forms:
            if form in by_variant:
                found[message_id] = by_variant[form]
                break
    need = {d.subscriber_id for d in found.values()} - set(subs)
    if need:
        subs.update(load_subscribers(session, need))
    for row in found.values():
        row.subscriber = subs[row.subscriber_id]
    return stored, found


def _pg_read(
    session: Session, keys: list[str], variants: list[str]
) -> tuple[dict[str, tuple[int, int | None]], dict[str, DeliveryRow], dict[int, SubscriberRow]]:
    # Three statements, not one pipeline: on a busy machine psycopg's pipeline costs more
    # CPU than the two round trips it saves.
    stored = _run(session, _PG_STORED, (array(keys),)) if keys else []
    deliveries = _run(session, _PG_DELIVERIES, (array(variants),)) if variants else []
    subscribers = _run(session, _PG_SUBSCRIBERS_OF, (array(variants),)) if variants else []
    found = {k: (event_id, delivery_id) for k, event_id, delivery_id in stored}
    by_variant: dict[str, DeliveryRow] = {}
    for values in deliveries:
        row = DeliveryRow(values, raw=True)
        if row.message_id is not None:
            by_variant.setdefault(row.message_id, row)
    subs = {row.id: row for row in (SubscriberRow(v, raw=True) for v in subscribers)}
    return found, by_variant, subs


def _add_earlier_sends(
    session: Session, missing: list[str], by_variant: dict[str, DeliveryRow]
) -> None:
    """Message ids of no delivery's latest send: the delivery an attempt of it belongs to."""
    via_attempt: dict[str, int] = {}
    pg = is_postgres(session)
    if pg:
        pairs: Iterable[Any] = _run(session, _PG_ATTEMPTS, (array(missing),))
    else:
        pairs = [
            pair
            for chunk in _chunks(missing)
            for pair in session.execute(
                select(_ATTEMPTS.c.delivery_id, _ATTEMPTS.c.message_id)
                .where(_ATTEMPTS.c.message_id.in_(chunk))
                .order_by(_ATTEMPTS.c.id)
            )
        ]
    for delivery_id, message_id in pairs:
        via_attempt.setdefault(message_id, delivery_id)
    by_id = {row.id: row for row in by_variant.values()}
    needed = sorted(set(via_attempt.values()) - set(by_id))
    if needed and pg:
        found = _run(session, _PG_DELIVERIES_BY_ID, (array(needed),))
        by_id.update((row.id, row) for row in (DeliveryRow(v, raw=True) for v in found))
    elif needed:
        for chunk in _chunks(needed):
            for row in _locked_deliveries(session, _DELIVERIES.c.id.in_(chunk)):
                by_id[row.id] = row
    for variant, delivery_id in via_attempt.items():
        if delivery_id in by_id:
            by_variant.setdefault(variant, by_id[delivery_id])


def _stored_keys(session: Session, keys: list[str]) -> dict[str, tuple[int, int | None]]:
    found: dict[str, tuple[int, int | None]] = {}
    for chunk in _chunks(keys):
        rows = session.execute(
            select(_EVENTS.c.dedupe_key, _EVENTS.c.id, _EVENTS.c.delivery_id).where(
                _EVENTS.c.dedupe_key.in_(chunk)
            )
        )
        found.update({key: (event_id, delivery_id) for key, event_id, delivery_id in rows})
    return found


def stored_keys(session: Session, keys: list[str]) -> dict[str, tuple[int, int | None]]:
    """Dedupe key -> (event id, delivery id) of the keys already stored."""
    unique = sorted(set(keys))
    if not unique:
        return {}
    if is_postgres(session):
        found = _run(session, _PG_STORED, (array(unique),))
        return {key: (event_id, delivery_id) for key, event_id, delivery_id in found}
    return _stored_keys(session, unique)


def _locked_deliveries(session: Session, condition: Any) -> list[DeliveryRow]:
    stmt = select(*_DELIVERY_COLS).where(condition).order_by(_DELIVERIES.c.id).with_for_update()
    return [DeliveryRow(row) for row in session.execute(stmt)]


def load_subscribers(session: Session, ids: Iterable[int]) -> dict[int, SubscriberRow]:
    """Subscribers by id, locked in id order (read fresh: under the lock)."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    if is_postgres(session):
        found = _run(session, _PG_SUBSCRIBERS, (array(wanted),))
        return {row.id: row for row in (SubscriberRow(v, raw=True) for v in found)}
    out: dict[int, SubscriberRow] = {}
    for chunk in _chunks(wanted):
        stmt = (
            select(*_SUB_COLS)
            .where(_SUBSCRIBERS.c.id.in_(chunk))
            .order_by(_SUBSCRIBERS.c.id)
            .with_for_update()
        )
        out.update((row.id, row) for row in map(SubscriberRow, session.execute(stmt)))
    return out


def refresh_subscribers(session: Session, subscribers: Iterable[SubscriberRow]) -> None:
    """Read these rows again in place (after something else wrote them, in this
    transaction: the rows are locked already)."""
    wanted = {sub.id: sub for sub in subscribers}
    for fresh in load_subscribers(session, wanted).values():
        row = wanted[fresh.id]
        for name in SubscriberRow.COLUMNS:
            setattr(row, name, getattr(fresh, name))


def subscriber_ids_by_email(session: Session, emails: list[str]) -> dict[str, int]:
    wanted = sorted(set(emails))
    if is_postgres(session):
        sql = "SELECT email, id FROM subscribers WHERE email = ANY(%s::text[])"
        return dict(_run(session, sql, (array(wanted),)))
    out: dict[str, int] = {}
    for chunk in _chunks(wanted):
        stmt = select(_SUBSCRIBERS.c.email, _SUBSCRIBERS.c.id).where(
            _SUBSCRIBERS.c.email.in_(chunk)
        )
        out.update((email, sub_id) for email, sub_id in session.execute(stmt))
    return out


# What the reputation guard's bound needs of each edition (worker.events._guard_may_trip),
# in one statement: the counts of edition_rates and whether its guard has tripped. The hard
# bounces are counted with the partial index's own predicate, so the planner reads
# ix_provider_events_hard_bounces instead of every stored event.
_HARD = " AND ".join(f"pe.{part}" for part in HARD_BOUNCE_PREDICATE.split(" AND "))
_PG_GUARD = (
    """
SELECT e.d,
    (SELECT count(*) FROM deliveries
        WHERE edition_date = e.d AND state = ANY(%(accepted)s::text[])),
    (SELECT count(DISTINCT pe.delivery_id) FROM provider_events pe
        JOIN deliveries d ON d.id = pe.delivery_id WHERE d.edition_date = e.d AND """
    + _HARD.replace("%", "%%")
    + """),
    (SELECT count(*) FROM deliveries WHERE edition_date = e.d AND state = %(complained)s),
    EXISTS (SELECT 1 FROM control_flags WHERE key = e.flag)
FROM unnest(%(editions)s::date[], %(flags)s::text[]) AS e(d, flag)
"""
)


def guard_counts(
    session: Session, editions: Sequence[date], flag_prefix: str
) -> dict[date, tuple[int, int, int, bool]] | None:
    """Edition -> (accepted, hard bounced, complained, guard tripped), as edition_rates
    counts them, in one round trip; None where only edition_rates can tell (SQLite)."""
    if not is_postgres(session):
        return None
    params = {
        "accepted": array(sorted(s.value for s in ACCEPTED_DELIVERY_STATES)),
        "complained": DeliveryState.COMPLAINED.value,
        "editions": array([e.isoformat() for e in editions]),
        "flags": array([flag_prefix + e.isoformat() for e in editions]),
    }
    session.flush()  # a flag added through the ORM (the guard tripping) counts
    rows = _run(session, _PG_GUARD, params)
    return {d: (accepted, hard, complained, tripped) for d, accepted, hard, complained, tripped
            in rows}  # fmt: skip


# --- writing ----------------------------------------------------------------------------

# Each statement takes its rows as one JSON document, typed by json_to_recordset and read
# in order (so ids are assigned in batch order): psycopg dumps a list of JSON texts as an
# array at ~20 µs an element, a document costs one json.dumps. An UPDATE names its ids as
# an array too: the planner guesses 100 rows for any json_to_recordset and would join them
# to a sequential scan of the whole table (2 ms at 10,000 deliveries, 0.2 s at a million).
_PG_INSERT_EVENTS = """
INSERT INTO provider_events (dedupe_key, event_type, subtype, provider_message_id,
    delivery_id, recipients, occurred_at, received_at, via, orphan, raw)
SELECT v.dedupe_key, v.event_type, v.subtype, v.provider_message_id, v.delivery_id,
    v.recipients, v.occurred_at, v.received_at, v.via, v.orphan, v.raw
FROM json_to_recordset(%s::json) AS v(dedupe_key varchar, event_type varchar,
    subtype varchar, provider_message_id varchar, delivery_id bigint, recipients json,
    occurred_at timestamptz, received_at timestamptz, via varchar, orphan boolean, raw json)
ON CONFLICT (dedupe_key) DO NOTHING
RETURNING id, dedupe_key
"""
_PG_UPDATE_DELIVERIES = """
UPDATE deliveries AS d SET state = v.state, updated_at = v.updated_at,
    last_error = v.last_error, delivered_at = v.delivered_at, bounced_at = v.bounced_at,
    complained_at = v.complained_at, finished_at = v.finished_at
FROM json_to_recordset(%s::json) AS v(id bigint, state varchar,
    updated_at timestamptz, last_error text, delivered_at timestamptz,
    bounced_at timestamptz, complained_at timestamptz, finished_at timestamptz)
WHERE d.id = v.id AND d.id = ANY(%s::bigint[])
"""
_PG_UPDATE_SUBSCRIBERS = """
UPDATE subscribers AS s SET status = v.status, updated_at = v.updated_at,
    suppression_reason = v.suppression_reason, soft_bounce_count = v.soft_bounce_count
FROM json_to_recordset(%s::json) AS v(id integer, status varchar,
    updated_at timestamptz, suppression_reason text, soft_bounce_count integer)
WHERE s.id = v.id AND s.id = ANY(%s::integer[])
"""
_PG_INSERT_LOG = """
INSERT INTO subscriber_log (subscriber_id, at, action, detail, actor)
SELECT v.subscriber_id, v.at, v.action, v.detail, v.actor
FROM json_to_recordset(%s::json) AS v(subscriber_id integer, at timestamptz,
    action varchar, detail text, actor varchar)
"""


def _iso(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _document(rows: Iterable[dict[str, Any]]) -> str:
    return json.dumps(list(rows), default=_iso, separators=(",", ":"))


def insert_events(session: Session, rows: list[dict[str, Any]]) -> dict[str, int]:
    """INSERT ... ON CONFLICT (dedupe_key) DO NOTHING RETURNING, all rows in one statement;
    the new id of each key stored now (a key missing was stored by a concurrent apply,
    which ours waited for: two deliveries of one SNS message apply once).

    A row's ``raw`` is the notification; ``raw_json``, when given, is that notification's
    JSON text already (what SNS sent, or the canonical text of its content key), stored as
    it is instead of serialising the object again."""
    if not rows:
        return {}
    if is_postgres(session):
        parts = []
        for row in rows:
            fields = {k: v for k, v in row.items() if k not in ("raw", "raw_json")}
            raw = row.get("raw_json") or json.dumps(row["raw"])
            # The stored JSON text spliced in as it is: {"raw":<text>,<the other fields>}.
            parts.append('{"raw":' + raw + "," + _document([fields])[2:-1])
        document = "[" + ",".join(parts) + "]"
        found = _run(session, _PG_INSERT_EVENTS, (document,))
        return {key: event_id for event_id, key in found}
    stmt = (
        dialect_insert(session, _EVENTS)
        .on_conflict_do_nothing(index_elements=["dedupe_key"])
        .returning(_EVENTS.c.id, _EVENTS.c.dedupe_key, sort_by_parameter_order=True)
    )
    values = [{k: v for k, v in r.items() if k != "raw_json"} for r in rows]
    return {key: event_id for event_id, key in session.execute(stmt, values)}


def _sqlite_update(table: Any, columns: tuple[str, ...]) -> Any:
    return (
        update(table)
        .where(table.c.id == bindparam("w_id"))
        .values({name: bindparam(f"w_{name}") for name in columns})
    )


_SQLITE_UPDATE_DELIVERIES = _sqlite_update(_DELIVERIES, _DELIVERY_WRITES)
_SQLITE_UPDATE_SUBSCRIBERS = _sqlite_update(_SUBSCRIBERS, _SUB_WRITES)


class Changes:
    """What the policy changed in a batch, written in one statement per table by
    :meth:`write` (called before anything reads those tables again: the reputation
    guard's counts, the mailto unsubscribe, the end of the batch). Log lines keep their
    order, so their ids are those one by one would give."""

    def __init__(self) -> None:
        self.deliveries: dict[int, DeliveryRow] = {}
        self.subscribers: dict[int, SubscriberRow] = {}
        self.logs: list[tuple[int, datetime, str, str, str]] = []

    def __bool__(self) -> bool:
        return bool(self.deliveries or self.subscribers or self.logs)

    def log(self, subscriber_id: int, at: datetime, action: str, detail: str, actor: str) -> None:
        self.logs.append((subscriber_id, at, action, detail, actor))

    def write(self, session: Session) -> None:
        if not self:
            return
        deliveries = [self.deliveries[k] for k in sorted(self.deliveries)]
        subscribers = [self.subscribers[k] for k in sorted(self.subscribers)]
        lines = [dict(zip(_LOG_COLUMNS, line, strict=True)) for line in self.logs]
        if is_postgres(session):
            if subscribers:
                document = _rows(subscribers, _SUB_WRITES)
                ids = array([row.id for row in subscribers])
                _run(session, _PG_UPDATE_SUBSCRIBERS, (document, ids))
            if deliveries:
                document = _rows(deliveries, _DELIVERY_WRITES)
                ids = array([row.id for row in deliveries])
                _run(session, _PG_UPDATE_DELIVERIES, (document, ids))
            if lines:
                _run(session, _PG_INSERT_LOG, (_document(lines),))
        else:
            if subscribers:
                session.execute(_SQLITE_UPDATE_SUBSCRIBERS, _params(subscribers, _SUB_WRITES))
            if deliveries:
                session.execute(_SQLITE_UPDATE_DELIVERIES, _params(deliveries, _DELIVERY_WRITES))
            if lines:
                session.execute(insert(_LOG), lines)
        _expire_orm_copies(session, Delivery, self.deliveries)
        _expire_orm_copies(session, Subscriber, self.subscribers)
        self.deliveries, self.subscribers, self.logs = {}, {}, []


def _rows(rows: list[Any], columns: tuple[str, ...]) -> str:
    return _document({"id": row.id, **{name: getattr(row, name) for name in columns}}
                     for row in rows)  # fmt: skip


def _params(rows: list[Any], columns: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"w_id": row.id, **{f"w_{name}": getattr(row, name) for name in columns}}
            for row in rows]  # fmt: skip


def _expire_orm_copies(session: Session, model: type, ids: Iterable[int]) -> None:
    """Expire the session's ORM objects of rows written here, if it holds any."""
    identity = session.identity_map
    if not len(identity):
        return
    for row_id in ids:
        obj = identity.get(session.identity_key(model, row_id))  # type: ignore[call-overload]
        if obj is not None:
            session.expire(obj)
