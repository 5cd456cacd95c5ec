"""The operator CLI: a click group whose commands call the same functions as tasks and web."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import OperationalError

from worker import __version__
from worker.config import ConfigError, get_settings
from worker.errors import PapermailError
from worker.redact import redact_url

# Each module defines a click command or group named `command`.
_COMMAND_MODULES = [
    "db",
    "papers",
    "subscribers",
    "digest",
    "resend",
    "stats",
    "health",
    "sending",
    "demo",
    "events",
    "web",
]


class PapermailGroup(click.Group):
    """Turns expected errors into one clear line and a non-zero exit, not a traceback."""

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
        except (KombuOperationalError, RedisConnectionError, RedisTimeoutError) as exc:
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
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _register() -> None:
    for name in _COMMAND_MODULES:
        module = importlib.import_module(f"worker.cli.{name}")
        main.add_command(module.command)


_register()


def settings_or_exit() -> Any:
    """Settings for a command, as a clean error when the configuration is invalid."""
    try:
        return get_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
