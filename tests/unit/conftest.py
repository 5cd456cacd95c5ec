"""Unit tests run on the fixed process clock (tests/conftest.py `fixed_clock`): none may
depend on the calendar, the hour or the machine's time zone."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _unit_tests_on_the_fixed_clock(fixed_clock: object) -> None:
    """Every unit test runs on FIXED_NOW."""
