"""`papermail health`: is everything papermail needs there, and what to do if not."""

from __future__ import annotations

import click

from worker.cli.common import echo_json
from worker.config import get_settings

_COLOURS = {"ok": "green", "warn": "yellow", "fail": "red", "skip": None}


@click.command("health")
@click.option("--json", "as_json", is_flag=True, help="Stable JSON for scripts and probes.")
def command(as_json: bool) -> None:
    """Check the database and its schema, Redis, the broker's queues, the mail provider
    (for SES: GetAccount's sending status, sandbox, max rate and 24-hour quota) and the
    SNS topic subscriptions; each problem says what to do.

    Exits 1 when a check failed (warnings, such as an SES sandbox, exit 0). The web app's
    `GET /healthz?deep=1` runs the same checks.

    \b
    Example:
      papermail health
      papermail health --json | jq '.checks[] | select(.status != "ok")'
    """
    from worker.health import run_checks

    report = run_checks(get_settings())
    if as_json:
        echo_json(report.as_dict())
    else:
        for check in report.checks:
            click.secho(f"{check.status:<5}", fg=_COLOURS[check.status], nl=False)
            click.echo(f" {check.name:<10} {check.summary}")
            if check.fix:
                click.echo(f"      {'':<10} fix: {check.fix}")
        click.echo(f"overall: {report.status}")
    if not report.ok:
        raise SystemExit(1)
