"""`papermail web`: serve the subscriber pages and webhooks (development server)."""

from __future__ import annotations

import click

from worker.cli.common import require_schema


@click.command("web")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="TCP port."
)
@click.option(
    "--debug", is_flag=True, help="Flask debug mode: reloader and tracebacks (never in production)."
)
def command(host: str, port: int, debug: bool) -> None:
    """Serve the subscriber pages and provider webhooks with Flask's development server.

    Links in emails point at PAPERMAIL_BASE_URL, so set it to where this server is
    reachable. In production run gunicorn instead (see the Procfile).

    \b
    Example:
      PAPERMAIL_BASE_URL=http://localhost:8000 papermail web --port 8000
      gunicorn 'worker.web:create_app()'        # production
    """
    require_schema()
    from worker.config import get_settings
    from worker.web import create_app

    settings = get_settings()
    app = create_app(settings)
    click.echo(f"serving on http://{host}:{port} (links in emails use {settings.base_url})")
    # werkzeug reports a taken port or a foreign address in one line and exits 1.
    app.run(host=host, port=port, debug=debug, use_reloader=debug)
