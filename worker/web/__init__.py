"""The Flask app: subscriber pages and provider webhooks (served by gunicorn in production).

`create_app()` is the factory: `gunicorn 'worker.web:create_app()'`.
"""

from __future__ import annotations

import importlib
import logging

from flask import Flask, jsonify

from worker.config import Settings, get_settings

log = logging.getLogger(__name__)

# Each module defines a Blueprint named `bp`.
_BLUEPRINTS = [
    "worker.web.webhooks",
    "worker.web.pages",
]


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    app = Flask(__name__)
    app.config["PAPERMAIL_SETTINGS"] = settings
    app.config["SECRET_KEY"] = settings.signing_keys[0]
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024  # SNS messages are far smaller
    for name in _BLUEPRINTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # blueprint not part of this build yet
        app.register_blueprint(module.bp)

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
