"""Engine, session scope and the declarative base."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import MetaData, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from worker.config import get_settings

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets the web app read while a run writes; busy_timeout rides out short locks.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


# A pooled connection idle for longer than this is pinged before it is handed out.
PING_AFTER_IDLE_SECONDS = 1.0


def _mark_checkin(_dbapi_conn: Any, record: Any) -> None:
    record.info["checked_in"] = time.monotonic()


def _ping_if_idle(engine: Engine, dbapi_conn: Any, record: Any) -> None:
    """SQLAlchemy's pre-ping, but only for a connection idle for a while.

    A sending chunk commits once per batch and checks its connection out again at once:
    pre-pinging every checkout was a round trip per batch (3.5% of a worker's samples). A
    connection the server dropped (restart, idle timeout) has been idle; the pool replaces
    it when the ping fails, as pre-ping would.
    """
    if time.monotonic() - record.info.get("checked_in", 0.0) < PING_AFTER_IDLE_SECONDS:
        return
    try:
        engine.dialect.do_ping(dbapi_conn)
    except Exception as exc:
        raise DisconnectionError(f"stale pooled connection: {exc}") from exc


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_size=5, max_overflow=10)
        event.listen(engine, "checkin", _mark_checkin)
        event.listen(
            engine, "checkout", lambda conn, record, _proxy: _ping_if_idle(engine, conn, record)
        )
    return engine


def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().database_url
    if url not in _engines:
        _engines[url] = make_engine(url)
    return _engines[url]


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    url = url or get_settings().database_url
    if url not in _factories:
        _factories[url] = sessionmaker(get_engine(url), expire_on_commit=False)
    return _factories[url]


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines() -> None:
    """Drop pooled connections (after fork, or between tests)."""
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()
    _factories.clear()


def dialect_insert(session: Session, table: Any) -> Any:
    """The INSERT construct with ON CONFLICT support of the session's backend."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - only the two supported backends
        raise RuntimeError(f"unsupported database dialect {dialect!r}")
    return insert(table)


def insert_ignore_or_update(
    session: Session,
    table: Any,
    rows: list[dict[str, Any]],
    conflict_cols: list[str],
    update_cols: list[str] | None = None,
) -> None:
    """Bulk INSERT ... ON CONFLICT (DO NOTHING | DO UPDATE) on SQLite and PostgreSQL.

    With ``update_cols`` the listed columns take the new values on conflict (an upsert);
    without, conflicting rows are left alone (idempotent inserts).
    """
    if not rows:
        return
    # One statement executed with the rows as parameters: SQLAlchemy batches it
    # ("insertmanyvalues") instead of compiling a giant multi-VALUES statement per call.
    stmt = dialect_insert(session, table)
    if update_cols:
        stmt = stmt.on_conflict_do_update(
            index_elements=conflict_cols,
            set_={col: getattr(stmt.excluded, col) for col in update_cols},
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=conflict_cols)
    session.execute(stmt, rows)


def is_infrastructure_error(exc: BaseException) -> bool:
    """True when ``exc`` says the database (or the process) is in trouble, not one row.

    The delivery path lets these stop the whole chunk (it is retried later, and nothing
    claimed is sent twice); any other exception while preparing one delivery fails that
    delivery alone.
    """
    from sqlalchemy import exc as sa_exc

    return isinstance(
        exc,
        sa_exc.OperationalError
        | sa_exc.InterfaceError
        | sa_exc.DisconnectionError
        | sa_exc.TimeoutError
        | sa_exc.ResourceClosedError
        | MemoryError,
    )
