"""The Flask app: subscriber pages and provider webhooks (served by gunicorn in production).

`create_app()` is the factory:
`gunicorn -c python:worker.web.gunicorn_conf 'worker.web:create_app()'`.

It refuses the public development ``SECRET_KEY`` (anyone could mint working links with
it) unless called with ``dev=True``: ``papermail web --dev``, or
``gunicorn 'worker.web:create_app(dev=True)'`` on a development machine.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from flask import Flask, jsonify
from jinja2 import ChoiceLoader, FileSystemLoader, PrefixLoader
from werkzeug.middleware.proxy_fix import ProxyFix

from worker.config import DEV_SECRET_KEY, ConfigError, Settings, get_settings
from worker.resources import shared_templates_dir

log = logging.getLogger(__name__)

DEV_KEY_REFUSED = (
    "PAPERMAIL_SECRET_KEY is the public development key, so anyone could mint working "
    "unsubscribe and preference links; set a long random secret "
    '(python -c "import secrets; print(secrets.token_urlsafe(48))"), or, on a development '
    "machine only, run `papermail web --dev` (gunicorn: 'worker.web:create_app(dev=True)')"
)


def create_app(settings: Settings | None = None, *, dev: bool = False) -> Flask:
    """The web app; ``dev=True`` accepts the development secret key (never in production)."""
    settings = settings or get_settings()
    if DEV_SECRET_KEY in settings.signing_keys and not dev:
        raise ConfigError(DEV_KEY_REFUSED)
    from worker.web.logs import WEB_LOGGERS, install_filter

    # Tokens never reach a log line: the app's, werkzeug's (papermail web), Flask's own.
    install_filter(*WEB_LOGGERS, "werkzeug")
    app = Flask(__name__)
    # The partials shared with the emails (the wordmark) as "shared/NAME", as the email
    # renderer names them (worker.rendering), so both include the same file.
    app.jinja_loader = ChoiceLoader(  # type: ignore[assignment]
        [
            FileSystemLoader(Path(__file__).parent / "templates"),
            PrefixLoader({"shared": FileSystemLoader(shared_templates_dir())}),
        ]
    )
    app.config["PAPERMAIL_SETTINGS"] = settings
    app.config["SECRET_KEY"] = settings.signing_keys[0]
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024  # SNS messages are far smaller
    from worker.web import guards, metrics, pages, webhooks

    guards.install(app)
    app.register_blueprint(webhooks.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(metrics.bp)
    # SNS's POSTs skip Flask's per-request machinery (same answers); inside ProxyFix, so
    # the client address it logs is the one Flask would see.
    app.wsgi_app = webhooks.SnsFastPath(app, app.wsgi_app)  # type: ignore[method-assign]
    if settings.trusted_proxies:
        # Behind N reverse proxies: take the client address (per-client rate limits) and
        # scheme from their X-Forwarded-* headers, never more hops than configured.
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app,
            x_for=settings.trusted_proxies,
            x_proto=settings.trusted_proxies,
            x_host=settings.trusted_proxies,
        )

    @app.get("/healthz")
    def healthz():  # type: ignore[no-untyped-def]
        from flask import request
        from sqlalchemy import text

        from worker.db import get_engine

        if request.args.get("deep") in ("1", "true", "yes"):
            report = deep_health(settings)
            return jsonify(report.as_dict()), 200 if report.ok else 503
        try:
            with get_engine().connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            log.warning("healthz: database unreachable: %s", exc)
            return jsonify(status="error", database="unreachable"), 503
        return jsonify(status="ok")

    return app


# The deep check asks the database, Redis, the broker, SES and SNS: a probe (or anyone) calling
# it in a loop must not turn into a stream of provider API calls, so one answer serves this
# process for a few seconds.
DEEP_CACHE_SECONDS = 10.0
_deep_lock = threading.Lock()
_deep_cache: tuple[float, Settings, Any] | None = None


def deep_health(settings: Settings) -> Any:
    """The report of :func:`worker.health.run_checks` (this process's mailer), cached briefly."""
    global _deep_cache
    from worker.health import run_checks
    from worker.mailers.base import get_mailer

    with _deep_lock:
        now = time.monotonic()
        if (
            _deep_cache is not None
            and _deep_cache[1] is settings
            and now - _deep_cache[0] < DEEP_CACHE_SECONDS
        ):
            return _deep_cache[2]
        report = run_checks(settings, mailer=get_mailer(settings))
        _deep_cache = (time.monotonic(), settings, report)
        return report


def app_settings() -> Settings:
    from flask import current_app

    return current_app.config["PAPERMAIL_SETTINGS"]  # type: ignore[no-any-return]
