"""`papermail db ...`: create and upgrade the schema."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click
from alembic.util import CommandError

from worker import migrate
from worker.cli.common import FullHelpGroup
from worker.errors import PapermailError


@click.group("db", cls=FullHelpGroup)
def command() -> None:
    """Database schema (Alembic migrations).

    \b
    Example:
      papermail db upgrade
    """


@command.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def upgrade(revision: str) -> None:
    """Create the schema or bring it up to date.

    \b
    Example:
      PAPERMAIL_DATABASE_URL=postgresql://localhost/papermail papermail db upgrade
    """
    with _revision_errors():
        migrate.upgrade(revision)
    click.echo(f"database at revision {migrate.current_revision()}")


@command.command("downgrade")
@click.argument("revision")
def downgrade(revision: str) -> None:
    """Step the schema back to REVISION (``base`` removes every table).

    \b
    Example:
      papermail db downgrade base
    """
    with _revision_errors():
        migrate.downgrade(revision)
    click.echo(f"database at revision {migrate.current_revision() or 'base'}")


@command.command("current")
def current() -> None:
    """Show the schema revision and whether it is the latest.

    \b
    Example:
      papermail db current
    """
    cur, head = migrate.current_revision(), migrate.head_revision()
    click.echo(f"current: {cur or 'none'}  head: {head}")
    if cur != head:
        raise SystemExit(1)


@contextmanager
def _revision_errors() -> Iterator[None]:
    # Alembic's refusal of a revision name is the operator's typo, not a crash.
    try:
        yield
    except CommandError as exc:
        raise PapermailError(f"{exc}; `papermail db current` shows the schema's revision") from None
