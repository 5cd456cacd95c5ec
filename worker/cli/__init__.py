"""The operator CLI: a click group whose commands call the same functions as tasks and web."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click
from sqlalchemy.exc import OperationalError

from worker import __version__
from worker.cli.common import FullHelpGroup
from worker.config import ConfigError, get_settings
from worker.errors import PapermailError
from worker.redact import redact_url

# Each module defines a click command or group named `command`, of the module's name. They
# are imported when used: `papermail deliveries list` does not pay for Celery's, boto's or
# the renderer's imports (about 0.8 s of CPU on the machine of the benchmarks).
_COMMAND_MODULES = [
    "db",
    "papers",
    "subscribers",
    "digest",
    "resend",
    "deliveries",
    "stats",
    "health",
    "sending",
    "demo",
    "events",
    "web",
    "metrics",
    "alerts",
]


def _broker_errors() -> tuple[type[BaseException], ...]:
    """The broker's connection errors, from the libraries this process has imported (an
    error of a library never imported cannot have been raised)."""
    errors: list[type[BaseException]] = []
    if "kombu" in sys.modules:
        from kombu.exceptions import OperationalError as KombuOperationalError

        errors.append(KombuOperationalError)
    if "redis" in sys.modules:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        errors += [RedisConnectionError, RedisTimeoutError]
    return tuple(errors)


class PapermailGroup(FullHelpGroup):
    """Turns expected errors into one clear line and a non-zero exit, not a traceback;
    loads each command's module when the command is used (``lazy``: name -> module)."""

    lazy: dict[str, str] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            module = importlib.import_module(f"worker.cli.{self.lazy[name]}")
            self.add_command(module.command, name)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)
        except PapermailError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)
        except OperationalError as exc:
            # One line, not a traceback; a driver message never shows the URL's password.
            reason = redact_url(str(getattr(exc, "orig", None) or exc)).strip()
            click.secho(f"error: cannot use the database: {reason}", fg="red", err=True)
            sys.exit(1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
            # A bad path given on the command line (-o /nonexistent-dir/x.html, FILE):
            # say which path and why, not a traceback.
            where = f" {exc.filename}" if exc.filename else ""
            why = (exc.strerror or str(exc)).lower()
            click.secho(f"error: cannot use{where}: {why}; check the path", fg="red", err=True)
            sys.exit(1)
        except Exception as exc:
            if not isinstance(exc, _broker_errors()):
                raise
            # Kombu's publish, or papermail's own read of the broker (its epoch) first.
            reason = redact_url(str(exc)).strip()
            click.secho(
                f"error: cannot reach the broker (PAPERMAIL_BROKER_URL): {reason}",
                fg="red",
                err=True,
            )
            sys.exit(1)


@click.group(cls=PapermailGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="papermail")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """papermail: trending research papers by email, personalised, exactly once.

    \b
    Example:
      papermail demo              # schema, sample papers and subscribers, one edition
      papermail digest run        # send today's edition to everyone due
    """
    from worker.logs import configure_logging

    level = logging.WARNING - 10 * min(verbose, 2)
    try:
        settings = get_settings()
    except ConfigError:
        settings = None  # the command reports the bad setting itself
    configure_logging(settings, level)


main.lazy = {name: name for name in _COMMAND_MODULES}


def settings_or_exit() -> Any:
    """Settings for a command, as a clean error when the configuration is invalid."""
    try:
        return get_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
