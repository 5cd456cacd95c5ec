"""`papermail web`: serve the subscriber pages and webhooks (development server)."""

from __future__ import annotations

import click

from worker.cli.common import require_schema
from worker.redact import redact_url


@click.command("web")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="TCP port."
)
@click.option(
    "--debug", is_flag=True, help="Flask debug mode: reloader and tracebacks (never in production)."
)
@click.option(
    "--dev",
    is_flag=True,
    help="Development machine: accept the public development PAPERMAIL_SECRET_KEY.",
)
def command(host: str, port: int, debug: bool, dev: bool) -> None:
    """Serve the subscriber pages and provider webhooks with Flask's development server.

    Links in emails point at PAPERMAIL_BASE_URL, so set it to where this server is
    reachable. The development PAPERMAIL_SECRET_KEY (the default) is refused unless
    --dev is given: anyone can mint working links with it. In production run gunicorn
    instead (see the Procfile). Link tokens in the access log are shown as [token].

    \b
    Example:
      PAPERMAIL_BASE_URL=http://localhost:8000 papermail web --dev --port 8000
      gunicorn -c python:worker.web.gunicorn_conf 'worker.web:create_app()'   # production
    """
    from worker.config import get_settings
    from worker.web import create_app
    from worker.web.logs import RedactingRequestHandler

    settings = get_settings()
    app = create_app(settings, dev=dev)  # refuses the development key first
    require_schema()
    shown = redact_url(settings.base_url)
    click.echo(f"serving on http://{host}:{port} (links in emails use {shown})")
    # werkzeug reports a taken port or a foreign address in one line and exits 1.
    app.run(
        host=host,
        port=port,
        debug=debug,
        use_reloader=debug,
        request_handler=RedactingRequestHandler,
    )
