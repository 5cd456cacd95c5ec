"""Log output of the web app without link tokens (see worker.redact).

- :class:`RedactTokens`, a logging filter that rewrites a record's final text; installed
  on the app's own loggers, werkzeug's and gunicorn's;
- :class:`RedactingRequestHandler`, werkzeug's request handler for ``papermail web``,
  whose access lines (``"GET /preferences/[token] HTTP/1.1" 200 -``) keep the path's
  shape but not the token.

gunicorn's access log format is handled in worker.web.gunicorn_conf.
"""

from __future__ import annotations

import logging
from typing import Any

from werkzeug.serving import WSGIRequestHandler

from worker.redact import redact_tokens

# Loggers whose records may carry a request path or URL.
WEB_LOGGERS = ("worker.web", "worker.web.pages", "worker.web.webhooks", "worker.web.guards")


class RedactTokens(logging.Filter):
    """Replace a record's message by its redacted text (arguments merged in first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a broken format string: let logging report it as usual
            return True
        clean = redact_tokens(text)
        if clean != text or record.args:
            record.msg, record.args = clean, None
        return True


_FILTER = RedactTokens()


def install_filter(*names: str) -> None:
    """Add the filter to these loggers (idempotent)."""
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


class RedactingRequestHandler(WSGIRequestHandler):
    """werkzeug's handler, every line it logs (access lines, errors) redacted."""

    def log(self, type: str, message: str, *args: Any) -> None:
        text = message % args if args else message
        super().log(type, "%s", redact_tokens(text))
