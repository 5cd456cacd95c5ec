"""Shared fixtures: an isolated settings + database per test, real PostgreSQL and Redis.

Every test runs in its own temporary directory with its own SQLite file and outbox;
``PAPERMAIL_*`` variables from the caller's environment are cleared so nothing leaks in.
PostgreSQL and Redis tests use the real local servers and are skipped *loudly* (a warning
plus the skip reason in the summary) when those cannot be reached.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from worker import account, clock, config, db

PG_ADMIN_URL = os.environ.get(
    "PAPERMAIL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("PAPERMAIL_TEST_REDIS_URL", "redis://127.0.0.1:6379")
SEEDS = Path(__file__).resolve().parent / "data"
# Set by .ci/run: a missing service is a failure there, never a quiet skip.
REQUIRE_SERVICES = os.environ.get("PAPERMAIL_TEST_REQUIRE_SERVICES") == "1"


# The fixed instant of tests that run in one process (all of tests/unit, and in-process
# integration tests that ask for `fixed_clock`): early morning UTC, before every default
# send hour, so "papers from two hours ago" are in today's window; years after the dates
# the tests were written with, so a test that still reads the wall clock somewhere, or
# mixes it with its own NOW, fails at once instead of when the calendar moves on.
FIXED_NOW = datetime(2031, 3, 14, 5, 30, tzinfo=UTC)


@pytest.fixture
def fixed_clock() -> Iterator[clock.Clock]:
    """The process clock reads FIXED_NOW at the test's start and moves on in real time."""
    with clock.installed(clock.anchored(FIXED_NOW)) as source:
        yield source


def skip_loudly(reason: str) -> None:
    """Skip with a warning in the summary; fail instead when CI requires every service."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (PAPERMAIL_TEST_REQUIRE_SERVICES=1: services are required)")
    warnings.warn(reason, stacklevel=2)
    pytest.skip(reason)


def _clear_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(config.ENV_PREFIX) and not key.startswith("PAPERMAIL_TEST_"):
            monkeypatch.delenv(key, raising=False)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Isolated environment: cwd is tmp_path, settings read fresh from these variables.

    Tests may ``monkeypatch.setenv`` more ``PAPERMAIL_*`` variables, then call
    ``config.reset_settings()``.
    """
    _clear_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    values = {
        "PAPERMAIL_DATABASE_URL": f"sqlite:///{tmp_path / 'papermail.db'}",
        "PAPERMAIL_OUTBOX_DIR": str(tmp_path / "outbox"),
        "PAPERMAIL_BASE_URL": "http://papermail.test",
        # No test fetches papers from the internet, and editions do not wait for a fetch,
        # unless it says so (with a local server's URLs).
        "PAPERMAIL_SOURCES": "",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    config.reset_settings()
    db.dispose_engines()
    account.reset_account_cache()
    yield values
    db.dispose_engines()
    config.reset_settings()
    account.reset_account_cache()


@pytest.fixture
def settings(env: dict[str, str]) -> config.Settings:
    """Settings of the isolated environment, with the schema migrated to head."""
    from worker import migrate

    migrate.upgrade()
    return config.get_settings()


@pytest.fixture
def session(settings: config.Settings) -> Iterator[db.Session]:
    with db.session_scope() as s:
        yield s


def _pg_reachable() -> str | None:
    try:
        import psycopg

        url = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(url, connect_timeout=3):
            return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    problem = _pg_reachable()
    if problem:
        msg = f"PostgreSQL NOT REACHABLE at {PG_ADMIN_URL} ({problem}); PostgreSQL tests SKIPPED"
        skip_loudly(msg)
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A brand-new, empty PostgreSQL database for one test, dropped afterwards."""
    import psycopg

    admin = pg_admin_url.replace("postgresql+psycopg://", "postgresql://")
    name = f"papermail_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = pg_admin_url.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    db.dispose_engines()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_env(env: dict[str, str], pg_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Like ``env`` but on a fresh PostgreSQL database, migrated to head."""
    from worker import migrate

    monkeypatch.setenv("PAPERMAIL_DATABASE_URL", pg_url)
    config.reset_settings()
    db.dispose_engines()
    migrate.upgrade()
    return {**env, "PAPERMAIL_DATABASE_URL": pg_url}


@pytest.fixture(scope="session")
def redis_base_url() -> Iterator[str]:
    """The Redis server, with one database (1-15) leased to this pytest process.

    The lease (a key with a TTL in database 0) keeps two test runs on one machine from
    flushing each other's databases.
    """
    try:
        import redis

        admin = redis.Redis.from_url(f"{REDIS_URL}/0", socket_connect_timeout=2)
        admin.ping()
    except Exception as exc:
        msg = f"Redis NOT REACHABLE at {REDIS_URL} ({exc}); Redis tests SKIPPED"
        skip_loudly(msg)
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    for number in range(1, 16):
        if admin.set(f"papermail:test-lease:{number}", token, nx=True, ex=3600):
            break
    else:
        skip_loudly("all 15 Redis test databases are leased by other test runs")
    yield f"{REDIS_URL}/{number}"
    if admin.get(f"papermail:test-lease:{number}") == token.encode():
        admin.delete(f"papermail:test-lease:{number}")
    admin.close()


@pytest.fixture
def redis_url(redis_base_url: str) -> Iterator[str]:
    """This run's Redis database, flushed before and after the test."""
    import redis

    client = redis.Redis.from_url(redis_base_url)
    client.flushdb()
    yield redis_base_url
    client.flushdb()
    client.close()
