"""gunicorn settings of papermail's web process.

    gunicorn -c python:worker.web.gunicorn_conf 'worker.web:create_app()' --bind 0.0.0.0:8000

Access lines go to stdout in gunicorn's usual (combined) format, except that link tokens
are replaced by ``[token]`` in every atom (request line, path, query, referer, headers,
environ), so ``GET /preferences/[token] HTTP/1.1`` keeps the shape of the request and none
of the capability. gunicorn's own error log is redacted the same way. Command-line flags
(``--bind``, ``--workers``, ``--threads``, ``--access-logfile``) still override what is set
here.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from gunicorn.glogging import Logger

from worker.redact import redact_tokens
from worker.web.logs import RedactTokens

accesslog = "-"
# Threads per worker (gthread): concurrent SNS deliveries to one process are applied as
# one batch (worker.events.Coalescer), 16 per worker measured best (bench/events.py).
threads = 16
logger_class = "worker.web.gunicorn_conf.RedactingLogger"


class RedactingLogger(Logger):
    """gunicorn's logger, with every access-log atom and error line redacted."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            if not any(isinstance(f, RedactTokens) for f in logger.filters):
                logger.addFilter(RedactTokens())

    def atoms(
        self, resp: Any, req: Any, environ: dict[str, Any], request_time: timedelta
    ) -> dict[str, Any]:
        atoms = super().atoms(resp, req, environ, request_time)
        return {k: redact_tokens(v) if isinstance(v, str) else v for k, v in atoms.items()}
