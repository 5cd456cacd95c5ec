"""Small helpers shared by the CLI commands: JSON output, dates, database readiness."""

from __future__ import annotations

import json
import sys
from datetime import date, datetime
from typing import Any

import click

from worker.clock import utcnow
from worker.errors import PapermailError


def echo_json(data: Any) -> None:
    click.echo(
        json.dumps(data, indent=2, sort_keys=True, default=_json_default, ensure_ascii=False)
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def parse_date(value: str | None) -> date:
    """A YYYY-MM-DD date; ``None`` or ``today`` is today in UTC."""
    if value is None or value == "today":
        return utcnow().date()
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date; use YYYY-MM-DD") from None


def date_option(help_text: str = "Edition date, YYYY-MM-DD (default: today, UTC).") -> Any:
    return click.option("--date", "date_", metavar="D", default=None, help=help_text)


def require_schema() -> None:
    """Fail with a hint when the database has not been created or is behind."""
    from sqlalchemy.exc import OperationalError

    from worker.migrate import current_revision, head_revision

    try:
        current = current_revision()
    except OperationalError as exc:
        raise PapermailError(f"cannot open the database: {exc.orig}") from None
    if current is None:
        raise PapermailError("the database has no schema yet; run `papermail db upgrade` first")
    if current != head_revision():
        raise PapermailError(
            f"the database schema is at {current}, not the latest; run `papermail db upgrade`"
        )


def is_tty() -> bool:
    return sys.stdout.isatty()
