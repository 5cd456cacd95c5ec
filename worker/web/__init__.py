"""The Flask app: subscriber pages and provider webhooks (served by gunicorn in production).

`create_app()` is the factory: `gunicorn 'worker.web:create_app()'`.
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.middleware.proxy_fix import ProxyFix

from worker.config import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    app = Flask(__name__)
    app.config["PAPERMAIL_SETTINGS"] = settings
    app.config["SECRET_KEY"] = settings.signing_keys[0]
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024  # SNS messages are far smaller
    from worker.web import pages, webhooks

    app.register_blueprint(webhooks.bp)
    app.register_blueprint(pages.bp)
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
        from sqlalchemy import text

        from worker.db import get_engine

        try:
            with get_engine().connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            log.warning("healthz: database unreachable: %s", exc)
            return jsonify(status="error", database="unreachable"), 503
        return jsonify(status="ok")

    return app


def app_settings() -> Settings:
    from flask import current_app

    return current_app.config["PAPERMAIL_SETTINGS"]  # type: ignore[no-any-return]
