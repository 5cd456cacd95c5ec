"""`papermail metrics`: serve /metrics for Prometheus on a worker host."""

from __future__ import annotations

import threading

import click

from worker.cli.common import require_schema
from worker.errors import PapermailError


@click.command("metrics")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=9100, show_default=True, type=click.IntRange(1, 65535), help="TCP port."
)
@click.option(
    "--edition-gauges/--no-edition-gauges",
    default=True,
    show_default=True,
    help="Also the gauges read from the database and Redis (deliveries by state, rates, "
    "queue depth); serve them from one place only if you do not want them twice.",
)
@click.option("--once", is_flag=True, help="Print one scrape to stdout and exit.")
def command(host: str, port: int, edition_gauges: bool, once: bool) -> None:
    """Serve GET /metrics (Prometheus text format) until stopped.

    The workers' counters and histograms of this host are read from PAPERMAIL_METRICS_DIR,
    where every Celery pool process writes its own (set the same directory for the worker);
    without it, only this process's. PAPERMAIL_METRICS_TOKEN, when set, is the bearer
    token a scrape must send. The web app serves the same at its /metrics.

    \b
    Example:
      PAPERMAIL_METRICS_DIR=/run/papermail-metrics papermail metrics --port 9100
      papermail metrics --once | grep papermail_edition_deliveries
    """
    from worker import metrics
    from worker.config import get_settings

    settings = get_settings()
    if edition_gauges:
        require_schema()
    if once:
        body, _ = metrics.exposition(metrics.registry(settings, editions=edition_gauges))
        click.echo(body.decode(), nl=False)
        return
    try:
        server, _ = metrics.serve(settings, host, port, editions=edition_gauges)
    except OSError as exc:
        raise PapermailError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    shown = "with a bearer token" if settings.metrics_token else "open"
    click.echo(f"serving metrics on http://{host}:{port}/metrics ({shown})")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
