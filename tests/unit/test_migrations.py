"""The same migrations run from empty to head and back down on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from worker import db, migrate
from worker.models import Base

TABLES = set(Base.metadata.tables)


def _round_trip(url: str) -> None:
    migrate.upgrade("head", url=url)
    assert migrate.current_revision(url) == migrate.head_revision(url)
    assert set(inspect(db.get_engine(url)).get_table_names()) >= TABLES
    migrate.downgrade("base", url=url)
    assert migrate.current_revision(url) is None
    assert set(inspect(db.get_engine(url)).get_table_names()) <= {"alembic_version"}
    migrate.upgrade("head", url=url)  # and up again: downgrade left nothing behind
    assert set(inspect(db.get_engine(url)).get_table_names()) >= TABLES


def test_sqlite_round_trip(env: dict[str, str]) -> None:
    _round_trip(env["PAPERMAIL_DATABASE_URL"])


@pytest.mark.postgres
def test_postgres_round_trip(env: dict[str, str], pg_url: str) -> None:
    _round_trip(pg_url)


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_schema_matches_models(
    backend: str, env: dict[str, str], request: pytest.FixtureRequest
) -> None:
    """Autogenerate finds nothing to add: models and migrations agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    url = (
        env["PAPERMAIL_DATABASE_URL"] if backend == "sqlite" else request.getfixturevalue("pg_url")
    )
    migrate.upgrade("head", url=url)
    with db.get_engine(url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_delivery_unique_per_subscriber_and_date(session: db.Session) -> None:
    from datetime import date

    from sqlalchemy.exc import IntegrityError

    from worker.models import Delivery, Subscriber

    sub = Subscriber(email="a@example.org", status="active")
    session.add(sub)
    session.flush()
    session.add(Delivery(subscriber_id=sub.id, edition_date=date(2026, 1, 1)))
    session.flush()
    session.add(Delivery(subscriber_id=sub.id, edition_date=date(2026, 1, 1)))
    with pytest.raises(IntegrityError):
        session.flush()
    session.rollback()


@pytest.mark.postgres
def test_postgres_send_tables_analyze_early(env: dict[str, str], pg_url: str) -> None:
    from sqlalchemy import text

    migrate.upgrade("head", url=pg_url)
    with db.get_engine(pg_url).connect() as conn:
        opts = conn.execute(
            text("SELECT reloptions FROM pg_class WHERE relname = 'delivery_papers'")
        ).scalar()
    assert "autovacuum_analyze_threshold=1000" in opts
