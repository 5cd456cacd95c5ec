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

from typing import Any

from gunicorn.glogging import Logger, SafeAtoms

from worker.redact import redact_tokens
from worker.web.logs import RedactTokens

accesslog = "-"
# Threads per worker (gthread): concurrent SNS deliveries to one process are applied as
# one batch (worker.events.Coalescer); a batch costs about a millisecond of CPU whatever
# its size, so more requests in flight make cheaper events: 32 measured better than 16
# (bench/events.py: +15-25% events/s, less CPU per event), 64 no better than 32.
threads = 32
logger_class = "worker.web.gunicorn_conf.RedactingLogger"


class RedactedAtoms(SafeAtoms):
    """gunicorn's atoms, each one redacted (then its quotes escaped, as SafeAtoms does)
    when the format asks for it: the few atoms of the format line, not every header and
    environ entry of every request (that cost a quarter of a webhook request's CPU)."""

    def __init__(self, atoms: dict[str, Any]) -> None:
        dict.__init__(self, atoms)

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        return redact_tokens(value).replace('"', '\\"') if isinstance(value, str) else value


class RedactingLogger(Logger):
    """gunicorn's logger, with every access-log atom and error line redacted."""

    atoms_wrapper_class = RedactedAtoms

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            if not any(isinstance(f, RedactTokens) for f in logger.filters):
                logger.addFilter(RedactTokens())
        # PAPERMAIL_LOG_FORMAT for gunicorn's two logs and for the app's own loggers
        # (through the root logger, at gunicorn's --log-level).
        from worker.config import ConfigError, get_settings
        from worker.logs import configure_logging, format_handlers

        try:
            settings = get_settings()
        except ConfigError:
            settings = None  # create_app reports it
        format_handlers(settings, self.error_log, self.access_log)
        configure_logging(settings, self.error_log.level or "INFO")
