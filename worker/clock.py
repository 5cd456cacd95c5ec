"""The one source of the current time.

Everything that stamps or compares a wall-clock time reads it here, so a test moves time
for the whole process by installing another source, and a function handed an explicit
``now`` (a replay, a test, an operator's ``--date``) keeps every stamp it writes
consistent with it through :func:`anchored`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

Clock = Callable[[], datetime]


def system_now() -> datetime:
    return datetime.now(UTC)


_source: Clock = system_now


def utcnow() -> datetime:
    """The current time, timezone-aware UTC, from the installed source."""
    return _source()


def anchored(now: datetime | None) -> Clock:
    """A clock that reads ``now`` at this instant and moves on in real (monotonic) time.

    ``None`` gives the installed source itself. Work that takes minutes (a chunk waiting
    for rate-limit tokens) thus stamps real elapsed time on top of the caller's ``now``,
    instead of freezing every stamp at the start or mixing it with the wall clock.
    """
    if now is None:
        return utcnow
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    start = time.monotonic()

    def read() -> datetime:
        return now + timedelta(seconds=time.monotonic() - start)

    return read


@contextmanager
def installed(source: Clock) -> Iterator[Clock]:
    """Install ``source`` as the process's clock for the duration of the block."""
    global _source
    previous = _source
    _source = source
    try:
        yield source
    finally:
        _source = previous
