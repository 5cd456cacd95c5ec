"""Unit tests run on a fixed process clock: none may depend on the calendar or the hour.

The instant is early morning UTC (before every default send hour, so "papers from two
hours ago" are in today's window) and years after the dates the tests were written with,
so a test that still reads the wall clock somewhere, or mixes it with its own ``NOW``,
fails here at once instead of when the calendar moves on.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from worker import clock

FIXED_NOW = datetime(2031, 3, 14, 5, 30, tzinfo=UTC)


@pytest.fixture(autouse=True)
def fixed_clock() -> Iterator[clock.Clock]:
    with clock.installed(clock.anchored(FIXED_NOW)) as source:
        yield source
