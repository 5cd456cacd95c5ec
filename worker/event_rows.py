"""The statements of a batch of provider events (see worker/events.py).

A batch reads its deliveries and their subscribers once, locked in id order, into plain
rows (:class:`DeliveryRow`, :class:`SubscriberRow`), not ORM objects: the identity map,
attribute instrumentation and the unit of work cost more per event than the policy itself.
The policy edits the rows and :class:`Changes` writes back what changed, one statement per
table. On PostgreSQL every statement takes one array per column (``= ANY(:keys)``,
``UPDATE ... FROM unnest(...)``, ``INSERT ... SELECT FROM unnest(...)``), so its text is
short and fixed: neither SQLAlchemy nor psycopg compiles or re-parses a statement of
thousands of placeholders per batch (they did: a third of the batch's CPU), and the
server runs one statement per table instead of one per row. SQLite gets the same rows
through executemany.

A session that holds ORM copies of rows written here (a caller's own objects, or rows the
mailto unsubscribe loaded) has them expired after each write, so it reads the new values.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import date, datetime
from typing import Any

from sqlalchemy import any_, bindparam, insert, select, text, update
from sqlalchemy.orm import Session
from sqlalchemy.types import ARRAY

from worker.db import dialect_insert
from worker.models import Delivery, DeliveryAttempt, ProviderEvent, Subscriber, SubscriberLog

_SQLITE_CHUNK = 500  # values per IN (...) list on SQLite (its parameter limit)

_DELIVERIES = Delivery.__table__
_SUBSCRIBERS = Subscriber.__table__
_EVENTS = ProviderEvent.__table__
_LOG = SubscriberLog.__table__


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _member(column: Any, values: list[Any], pg: bool) -> Any:
    """``column IN values``: one array parameter on PostgreSQL."""
    if pg:
        return column == any_(bindparam(None, values, type_=ARRAY(column.type)))
    return column.in_(values)


def _chunks(values: list[Any], pg: bool) -> Iterator[list[Any]]:
    if pg:
        if values:
            yield values
        return
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

    def __init__(self, values: Iterable[Any]) -> None:
        for name, value in zip(self.COLUMNS, values, strict=True):
            setattr(self, name, value)


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

    id: int
    subscriber_id: int
    edition_date: date
    state: str
    subscriber: SubscriberRow

    def __init__(self, values: Iterable[Any]) -> None:
        for name, value in zip(self.COLUMNS, values, strict=True):
            setattr(self, name, value)


_SUB_COLS = [_SUBSCRIBERS.c[name] for name in SubscriberRow.COLUMNS]
_DELIVERY_COLS = [_DELIVERIES.c[name] for name in DeliveryRow.COLUMNS]
# What the policy may change, written back whole for each row it changed.
_DELIVERY_WRITES = ("state", "updated_at", "last_error", "delivered_at", "bounced_at",
                    "complained_at", "finished_at")  # fmt: skip
_SUB_WRITES = ("status", "updated_at", "suppression_reason", "soft_bounce_count")


def stored_keys(session: Session, keys: list[str]) -> dict[str, tuple[int, int | None]]:
    """Dedupe key -> (event id, delivery id) of the keys already stored."""
    pg = is_postgres(session)
    found: dict[str, tuple[int, int | None]] = {}
    for chunk in _chunks(sorted(set(keys)), pg):
        rows = session.execute(
            select(_EVENTS.c.dedupe_key, _EVENTS.c.id, _EVENTS.c.delivery_id).where(
                _member(_EVENTS.c.dedupe_key, chunk, pg)
            )
        )
        found.update({key: (event_id, delivery_id) for key, event_id, delivery_id in rows})
    return found


def _locked_deliveries(session: Session, condition: Any) -> list[DeliveryRow]:
    # In id order, so two batches lock shared rows in the same order (no deadlock).
    stmt = select(*_DELIVERY_COLS).where(condition).order_by(_DELIVERIES.c.id).with_for_update()
    return [DeliveryRow(row) for row in session.execute(stmt)]


def deliveries_by_message(session: Session, message_ids: list[str]) -> dict[str, DeliveryRow]:
    """The delivery each provider message id belongs to (its latest send, or an earlier
    attempt of it: the events of a re-sent edition's first copy still count), locked, with
    its subscriber loaded and locked too (the only subscriber its events may touch; one
    row per subscriber, shared by its deliveries)."""
    pg = is_postgres(session)
    wanted = {}
    for message_id in set(message_ids):
        bare = message_id.strip("<>")
        wanted[message_id] = tuple(sorted({message_id, bare, f"<{bare}>"}))
    if not wanted:
        return {}
    variants = sorted({v for forms in wanted.values() for v in forms})
    by_variant: dict[str, DeliveryRow] = {}
    for chunk in _chunks(variants, pg):
        for row in _locked_deliveries(session, _member(_DELIVERIES.c.message_id, chunk, pg)):
            if row.message_id is not None:
                by_variant.setdefault(row.message_id, row)
    missing = sorted(
        {v for m, forms in wanted.items() if not any(f in by_variant for f in forms) for v in forms}
    )
    if missing:
        via_attempt: dict[str, int] = {}
        attempts = DeliveryAttempt.__table__
        for chunk in _chunks(missing, pg):
            for delivery_id, message_id in session.execute(
                select(attempts.c.delivery_id, attempts.c.message_id)
                .where(_member(attempts.c.message_id, chunk, pg))
                .order_by(attempts.c.id)
            ):
                via_attempt.setdefault(message_id, delivery_id)
        by_id = {row.id: row for row in by_variant.values()}
        needed = sorted(set(via_attempt.values()) - set(by_id))
        for chunk in _chunks(needed, pg):
            by_id.update(
                (row.id, row)
                for row in _locked_deliveries(session, _member(_DELIVERIES.c.id, chunk, pg))
            )
        for variant, delivery_id in via_attempt.items():
            if delivery_id in by_id:
                by_variant.setdefault(variant, by_id[delivery_id])
    found: dict[str, DeliveryRow] = {}
    for message_id, forms in wanted.items():
        for form in forms:
            if form in by_variant:
                found[message_id] = by_variant[form]
                break
    subscribers = load_subscribers(session, {d.subscriber_id for d in found.values()})
    for row in found.values():
        row.subscriber = subscribers[row.subscriber_id]
    return found


def load_subscribers(session: Session, ids: Iterable[int]) -> dict[int, SubscriberRow]:
    """Subscribers by id, locked in id order (read fresh: under the lock)."""
    pg = is_postgres(session)
    out: dict[int, SubscriberRow] = {}
    for chunk in _chunks(sorted(set(ids)), pg):
        stmt = (
            select(*_SUB_COLS)
            .where(_member(_SUBSCRIBERS.c.id, chunk, pg))
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
    pg = is_postgres(session)
    out: dict[str, int] = {}
    for chunk in _chunks(sorted(set(emails)), pg):
        stmt = select(_SUBSCRIBERS.c.email, _SUBSCRIBERS.c.id).where(
            _member(_SUBSCRIBERS.c.email, chunk, pg)
        )
        out.update((email, sub_id) for email, sub_id in session.execute(stmt))
    return out


# Each statement takes its rows as one JSON document, typed by json_to_recordset and read
# in order (so ids are assigned in batch order): psycopg dumps a list of JSON texts as an
# array at ~20 µs an element, a document costs one json.dumps.
_PG_INSERT_EVENTS = text(
    """
    INSERT INTO provider_events (dedupe_key, event_type, subtype, provider_message_id,
        delivery_id, recipients, occurred_at, received_at, via, orphan, raw)
    SELECT v.dedupe_key, v.event_type, v.subtype, v.provider_message_id, v.delivery_id,
        v.recipients, v.occurred_at, v.received_at, v.via, v.orphan, v.raw
    FROM json_to_recordset(CAST(:rows AS json)) AS v(dedupe_key varchar, event_type varchar,
        subtype varchar, provider_message_id varchar, delivery_id bigint, recipients json,
        occurred_at timestamptz, received_at timestamptz, via varchar, orphan boolean, raw json)
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING id, dedupe_key
    """
)


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
        found = session.execute(_PG_INSERT_EVENTS, {"rows": document})
        return {key: event_id for event_id, key in found}
    stmt = (
        dialect_insert(session, _EVENTS)
        .on_conflict_do_nothing(index_elements=["dedupe_key"])
        .returning(_EVENTS.c.id, _EVENTS.c.dedupe_key, sort_by_parameter_order=True)
    )
    values = [{k: v for k, v in r.items() if k != "raw_json"} for r in rows]
    return {key: event_id for event_id, key in session.execute(stmt, values)}


_PG_UPDATE_DELIVERIES = text(
    """
    UPDATE deliveries AS d SET state = v.state, updated_at = v.updated_at,
        last_error = v.last_error, delivered_at = v.delivered_at, bounced_at = v.bounced_at,
        complained_at = v.complained_at, finished_at = v.finished_at
    FROM json_to_recordset(CAST(:rows AS json)) AS v(id bigint, state varchar,
        updated_at timestamptz, last_error text, delivered_at timestamptz,
        bounced_at timestamptz, complained_at timestamptz, finished_at timestamptz)
    WHERE d.id = v.id
    """
)
_PG_UPDATE_SUBSCRIBERS = text(
    """
    UPDATE subscribers AS s SET status = v.status, updated_at = v.updated_at,
        suppression_reason = v.suppression_reason, soft_bounce_count = v.soft_bounce_count
    FROM json_to_recordset(CAST(:rows AS json)) AS v(id integer, status varchar,
        updated_at timestamptz, suppression_reason text, soft_bounce_count integer)
    WHERE s.id = v.id
    """
)
_PG_INSERT_LOG = text(
    """
    INSERT INTO subscriber_log (subscriber_id, at, action, detail, actor)
    SELECT v.subscriber_id, v.at, v.action, v.detail, v.actor
    FROM json_to_recordset(CAST(:rows AS json)) AS v(subscriber_id integer, at timestamptz,
        action varchar, detail text, actor varchar)
    """
)
_LOG_COLUMNS = ("subscriber_id", "at", "action", "detail", "actor")


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
        pg = is_postgres(session)
        deliveries = [self.deliveries[k] for k in sorted(self.deliveries)]
        subscribers = [self.subscribers[k] for k in sorted(self.subscribers)]
        if subscribers:
            self._update(session, pg, subscribers, _SUB_WRITES, _PG_UPDATE_SUBSCRIBERS,
                         _SQLITE_UPDATE_SUBSCRIBERS)  # fmt: skip
        if deliveries:
            self._update(session, pg, deliveries, _DELIVERY_WRITES, _PG_UPDATE_DELIVERIES,
                         _SQLITE_UPDATE_DELIVERIES)  # fmt: skip
        if self.logs:
            lines = [dict(zip(_LOG_COLUMNS, line, strict=True)) for line in self.logs]
            if pg:
                session.execute(_PG_INSERT_LOG, {"rows": _document(lines)})
            else:
                session.execute(insert(_LOG), lines)
        _expire_orm_copies(session, Delivery, self.deliveries)
        _expire_orm_copies(session, Subscriber, self.subscribers)
        self.deliveries, self.subscribers, self.logs = {}, {}, []

    @staticmethod
    def _update(session: Session, pg: bool, rows: list[Any], columns: tuple[str, ...],
                pg_stmt: Any, sqlite_stmt: Any) -> None:  # fmt: skip
        if pg:
            document = _document(
                {"id": row.id, **{name: getattr(row, name) for name in columns}} for row in rows
            )
            session.execute(pg_stmt, {"rows": document})
        else:
            session.execute(sqlite_stmt, [
                {"w_id": row.id, **{f"w_{name}": getattr(row, name) for name in columns}}
                for row in rows])  # fmt: skip


def _expire_orm_copies(session: Session, model: type, ids: Iterable[int]) -> None:
    """Expire the session's ORM objects of rows written by Core here, if it holds any."""
    identity = session.identity_map
    if not len(identity):
        return
    for row_id in ids:
        obj = identity.get(session.identity_key(model, row_id))  # type: ignore[call-overload]
        if obj is not None:
            session.expire(obj)
