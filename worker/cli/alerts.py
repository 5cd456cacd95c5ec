"""`papermail alerts ...`: check what needs an operator, post it to the chat webhook."""

from __future__ import annotations

import click

from worker.cli.common import echo_json, require_schema
from worker.errors import PapermailError


@click.group("alerts")
def command() -> None:
    """Alerts to PAPERMAIL_ALERT_WEBHOOK_URL (Slack- or Mattermost-compatible).

    The beat runs the check every PAPERMAIL_ALERT_CHECK_MINUTES; each alert is posted once.

    \b
    Example:
      papermail alerts check --dry-run
      papermail alerts test
    """


@command.command("check")
@click.option("--dry-run", is_flag=True, help="List what would be alerted; post nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def check(dry_run: bool, as_json: bool) -> None:
    """Check now, as the beat does; post the alerts not posted yet.

    Exits 1 when a post failed (it is tried again at the next check).

    \b
    Example:
      papermail alerts check --json
    """
    from worker import alerts
    from worker.config import get_settings

    require_schema()
    settings = get_settings()
    if not dry_run and not settings.alert_webhook_url:
        raise PapermailError(
            "PAPERMAIL_ALERT_WEBHOOK_URL is not set: nothing to post to (use --dry-run to "
            "see what would be alerted)"
        )
    result = alerts.check(settings, dry_run=dry_run)
    if as_json:
        echo_json(result.as_dict())
    else:
        if not result.findings:
            click.echo("nothing needs an operator")
        for finding in result.findings:
            if dry_run:
                state = "would post"
            elif finding.key in result.sent:
                state = "posted"
            elif finding.key in result.failed:
                state = f"NOT POSTED ({result.failed[finding.key]})"
            else:
                state = "already posted"
            click.echo(f"{finding.key}: {state}\n  {finding.text}")
    if result.failed:
        raise SystemExit(1)


@command.command("test")
@click.option("--text", default="papermail alert test: the webhook works.", show_default=True)
def test(text: str) -> None:
    """Post one test message (not stored, not de-duplicated).

    \b
    Example:
      papermail alerts test
    """
    from worker import alerts
    from worker.config import get_settings

    webhook = alerts.get_webhook(get_settings())
    if webhook is None:
        raise PapermailError("PAPERMAIL_ALERT_WEBHOOK_URL is not set")
    try:
        webhook.post(text)
    except alerts.AlertError as exc:
        raise PapermailError(f"the webhook did not take the message: {exc}") from None
    click.echo("posted")
