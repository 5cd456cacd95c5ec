"""GET /metrics: the Prometheus scrape of the web app (edition gauges, this host's workers)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def scrape() -> Response:
    from worker import metrics
    from worker.web import app_settings

    settings = app_settings()
    if not metrics.authorized(settings, request.headers.get("Authorization")):
        return Response(
            "a bearer token is required (PAPERMAIL_METRICS_TOKEN)\n",
            status=401,
            mimetype="text/plain",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    registry = current_app.extensions.get("papermail_metrics")
    if registry is None:  # built once per process, at the first scrape
        registry = current_app.extensions["papermail_metrics"] = metrics.registry(settings)
    body, content_type = metrics.exposition(registry)
    return Response(body, status=200, headers={"Content-Type": content_type})
