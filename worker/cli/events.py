"""`papermail events ...`: apply provider notifications from a file, or consume them from SQS."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections import Counter
from typing import IO, Any

import click

from worker import events
from worker.cli.common import FullHelpGroup, echo_json, require_schema
from worker.config import get_settings
from worker.errors import InvalidInput, PapermailError


@click.group("events", cls=FullHelpGroup)
def command() -> None:
    """Provider notifications (SES bounces, complaints, deliveries).

    The webhook (`POST /webhooks/ses`) is the usual way in; these commands are the others.

    \b
    Example:
      papermail events apply dead-letters.json
      papermail events poll-sqs --once
    """


@command.command("apply")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--json", "as_json", is_flag=True, help="Print the outcome of each as JSON.")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 5000),
    default=events.BATCH_SIZE,
    show_default=True,
    help="Notifications applied per transaction.",
)
def apply(file: click.utils.LazyFile, as_json: bool, batch_size: int) -> None:
    """Apply notification JSON from FILE (or - for stdin).

    FILE holds one SES notification, one SNS envelope, or a JSON list of either, e.g.
    messages saved from a dead-letter queue. The whole file is checked before anything is
    applied (signatures are not: you vouch for the file); then it is applied in batches,
    one transaction each (a file over 16 MB is read a second time for that). Repeats of
    notifications already applied change nothing, so a file can always be applied again.

    \b
    Example:
      papermail events apply bounces.json
      aws sqs receive-message ... | jq '[.Messages[].Body | fromjson]' | papermail events apply -
    """
    with contextlib.ExitStack() as stack:
        stream: IO[str] = file  # type: ignore[assignment]
        if not stream.seekable():  # stdin: kept in a temporary file to be read twice
            stream = stack.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8"))
            shutil.copyfileobj(file, stream)
        _apply_file(stream, getattr(file, "name", "FILE"), as_json, batch_size)


# A file whose notifications hold up to this much JSON is kept as read by the check and
# applied from memory (tens of MB at most); a bigger one is read a second time, so memory
# stays flat whatever the size of a dead-letter dump.
KEEP_READ_BYTES = 16 * 1024 * 1024


def _apply_file(stream: IO[str], name: str, as_json: bool, batch_size: int) -> None:
    stream.seek(0)
    kept: list[tuple[dict[str, Any], str]] | None = []
    size = 0
    for item in events.read_file_items(stream, name):  # check everything first
        if kept is not None:
            size += len(getattr(item[0], "json_text", "")) or KEEP_READ_BYTES
            kept.append(item)
            if size > KEEP_READ_BYTES:
                kept = None
    require_schema()
    settings = get_settings()
    if kept is None:
        stream.seek(0)
    counts: Counter[str] = Counter()
    results: list[dict[str, object]] = []
    changes: list[str] = []
    retry: list[str] = []
    outcomes = events.apply_in_batches(
        kept if kept is not None else events.read_file_items(stream, name),
        via="file",
        batch_size=batch_size,
        settings=settings,
    )
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, events.RetryLater):
            retry.append(f"item {index}: {outcome}")
            continue
        counts[outcome.status] += 1
        if as_json:
            results.append(outcome.as_dict())
        else:
            changes.extend(outcome.changes)
    summary = {
        status: counts.get(status, 0) for status in ("applied", "duplicate", "orphan", "ignored")
    }
    summary["retry_later"] = len(retry)
    if as_json:
        echo_json({"counts": summary, "results": results, "retry_later": retry})
    else:
        click.echo(", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary.items()))
        for change in changes:
            click.echo(f"  {change}")
    if retry:
        for line in retry:
            click.echo(line, err=True)
        raise PapermailError(
            f"{len(retry)} notification(s) name messages not known yet; "
            "the rest was applied; apply the file again in a few minutes"
        )


@command.command("poll-sqs")
@click.option("--queue-url", metavar="URL", help="Queue (default: PAPERMAIL_SQS_QUEUE_URL).")
@click.option("--once", is_flag=True, help="Process what is waiting, then exit.")
@click.option(
    "--max-messages",
    type=click.IntRange(1, 10),
    default=10,
    show_default=True,
    help="Messages per receive (SQS allows 1-10).",
)
@click.option(
    "--wait-seconds",
    type=click.IntRange(0, 20),
    default=None,
    help="Long-poll wait per receive (default 20; 2 with --once).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the final counts as JSON.")
def poll_sqs(
    queue_url: str | None,
    once: bool,
    max_messages: int,
    wait_seconds: int | None,
    as_json: bool,
) -> None:
    """Consume SES notifications from an SQS queue (SNS -> SQS, raw delivery on or off).

    Each message is deleted only after it is applied. Messages about sends not recorded
    yet, malformed ones and ones that fail SNS signature verification (on by default:
    PAPERMAIL_SQS_VERIFY_SIGNATURES, topics in PAPERMAIL_SNS_TOPIC_ARNS) stay in the queue
    (the last two reach its dead-letter queue). Each receive is applied as one batch;
    PAPERMAIL_SQS_RECEIVERS loops receive side by side. Runs until Ctrl-C unless --once.

    \b
    Example:
      papermail events poll-sqs --queue-url https://sqs.eu-west-1.amazonaws.com/123456789012/ses
    """
    require_schema()
    settings = get_settings()
    if not (queue_url or settings.sqs_queue_url):
        raise InvalidInput("no SQS queue: set PAPERMAIL_SQS_QUEUE_URL or pass --queue-url")
    seen = {"received": -1}
    latest: list[events.PollCounts] = []

    def progress(counts: events.PollCounts) -> None:
        if not latest:
            latest.append(counts)
        if counts.received != seen["received"]:  # a line per batch that brought something
            seen["received"] = counts.received
            click.echo(counts.summary(), err=True)

    try:
        counts = events.poll_sqs(
            settings,
            once=once,
            max_messages=max_messages,
            wait_seconds=wait_seconds,
            queue_url=queue_url,
            on_batch=progress,
            receivers=settings.sqs_receivers,
        )
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
        counts = latest[0] if latest else events.PollCounts()
    if as_json:
        echo_json(counts.as_dict())
    else:
        click.echo(counts.summary())
    if counts.invalid or counts.unverified or counts.failed:
        sys.exit(1)
