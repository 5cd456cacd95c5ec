"""The pool's ping: only connections idle for a while, and a dropped one is replaced."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from worker import db


def test_a_connection_back_at_once_is_not_pinged(pg_url: str, monkeypatch: pytest.MonkeyPatch):
    engine = db.make_engine(pg_url)
    pings: list[object] = []
    real = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda c: pings.append(c) or real(c))
    try:
        for _ in range(5):
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar() == 1
        # The first checkout of a new connection is pinged; the next four came straight back.
        assert len(pings) == 1
        monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.0)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        assert len(pings) == 2
    finally:
        engine.dispose()


def test_a_connection_the_server_dropped_is_replaced(pg_url: str, monkeypatch: pytest.MonkeyPatch):
    engine = db.make_engine(pg_url)
    try:
        with engine.connect() as conn:
            first = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        # The server ends the idle pooled connection (a restart, an idle timeout).
        killer = db.make_engine(pg_url)
        with killer.connect() as k:
            assert k.execute(text("SELECT pg_terminate_backend(:p)"), {"p": first}).scalar()
        killer.dispose()
        monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.0)
        with engine.connect() as conn:
            again = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        assert again != first
    finally:
        engine.dispose()
