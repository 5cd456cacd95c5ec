"""Small helpers shared by the CLI commands: JSON output, dates, database readiness."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from datetime import date, datetime
from typing import Any

import click

from worker.clock import utcnow
from worker.errors import PapermailError


class FullHelpGroup(click.Group):
    """A group whose command list shows each summary whole (its ``short_help``, else its
    docstring's first sentence, wrapped), never click's 45-column cut ending in "..."."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON (keys sorted).

    Any iterator in it (a generator of rows, e.g. a database cursor) is written as a
    JSON array item by item, so a listing of a million rows never sits in memory; the
    bytes are the same as ``json.dumps(indent=2)`` of the materialised list.
    """
    if not _has_iterator(data):
        click.echo(_dumps(data))
        return
    buffer: list[str] = []
    size = 0
    for chunk in _stream(data, ""):
        buffer.append(chunk)
        size += len(chunk)
        if size >= 65536:  # one write per 64 KiB, not one per row
            click.echo("".join(buffer), nl=False)
            buffer.clear()
            size = 0
    click.echo("".join(buffer))


def _dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=_json_default, ensure_ascii=False)


def _has_iterator(data: Any) -> bool:
    if isinstance(data, Iterator):
        return True
    if isinstance(data, dict):
        return any(_has_iterator(v) for v in data.values())
    if isinstance(data, list | tuple):
        return any(_has_iterator(v) for v in data)
    return False


def _stream(data: Any, pad: str) -> Iterator[str]:
    """Chunks of ``_dumps(data)``, with iterators expanded lazily; ``pad`` is the indent."""
    inner = pad + "  "
    if isinstance(data, dict) and data and _has_iterator(data):
        yield "{"
        for n, key in enumerate(sorted(data)):
            yield ("," if n else "") + "\n" + inner + json.dumps(key, ensure_ascii=False) + ": "
            yield from _stream(data[key], inner)
        yield "\n" + pad + "}"
    elif isinstance(data, Iterator | list | tuple) and _has_iterator(data):
        items: Iterable[Any] = data
        empty = True
        for item in items:
            yield ("[" if empty else ",") + "\n" + inner
            empty = False
            if _has_iterator(item):
                yield from _stream(item, inner)
            else:
                yield _dumps(item).replace("\n", "\n" + inner)
        yield "[]" if empty else "\n" + pad + "]"
    else:
        yield _dumps(data).replace("\n", "\n" + pad)


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
