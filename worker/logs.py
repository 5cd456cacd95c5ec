"""Log output of every papermail process: text (the default) or JSON Lines.

``PAPERMAIL_LOG_FORMAT=json`` makes each line one JSON object (python-json-logger) with
``timestamp`` (UTC, ISO 8601), ``level``, ``logger``, ``message`` and, where the code
knows them, ``edition_date``, ``delivery_id``, ``subscriber_id``, ``provider_message_id``
and ``error_kind`` (given with ``extra=`` or by :func:`log_context`). Both formats keep
link tokens and URL passwords out (worker.redact), and replace email addresses by
``[address]`` unless ``PAPERMAIL_LOG_ADDRESSES=true``: a log shipped to a log service is
then no list of the subscribers.

The CLI (worker.cli), the Celery worker and beat (worker.tasks, ``setup_logging``) and
gunicorn (worker.web.gunicorn_conf) call :func:`configure_logging`.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from pythonjsonlogger.json import JsonFormatter

from worker.redact import redact_tokens

ADDRESS = "[address]"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The fields papermail gives its records, in this order after the four of every line.
CONTEXT_FIELDS = (
    "edition_date",
    "delivery_id",
    "subscriber_id",
    "provider_message_id",
    "error_kind",
)
_FIRST = ("timestamp", "level", "logger", "message")

# An address anywhere in a line; not the user part of a URL (``scheme://user:pw@host``:
# redact_url hides the password, the host's name stays).
_ADDRESS_RE = re.compile(
    r"(?P<url>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#@]*@)"
    r"|(?<![\w.+/%-])[A-Za-z0-9._%+'!#$&^`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"
)


def _address_or_url(match: re.Match[str]) -> str:
    return match.group("url") or ADDRESS


_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "papermail_log_context", default=None
)


def redact_addresses(text: str) -> str:
    return _ADDRESS_RE.sub(_address_or_url, text) if "@" in text else text


def redact(text: str, addresses: bool = False) -> str:
    """``text`` without tokens and passwords, and without addresses unless ``addresses``."""
    text = redact_tokens(text)
    return text if addresses else redact_addresses(text)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add these fields (e.g. ``edition_date``) to every record logged inside the block,
    in this thread or task, unless a record brings its own."""
    current = _context.get() or {}
    token = _context.set({**current, **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Puts the fields of :func:`log_context` on each record the handler emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class TextFormatter(logging.Formatter):
    """The usual one-line text, redacted."""

    def __init__(self, fmt: str = TEXT_FORMAT, *, addresses: bool = False) -> None:
        super().__init__(fmt)
        self.addresses = addresses

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.addresses)


class PapermailJsonFormatter(JsonFormatter):
    """One JSON object per record: the four fields first, then the context, then any
    other ``extra``; every string in it redacted before it is serialised."""

    def __init__(self, *, addresses: bool = False) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp=True,
            json_ensure_ascii=False,
        )
        self.addresses = addresses

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        ordered = {k: log_data[k] for k in (*_FIRST, *CONTEXT_FIELDS) if k in log_data}
        ordered.update(log_data)
        return {k: self._clean(v) for k, v in ordered.items()}

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return redact(value, self.addresses)
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        return value


def make_formatter(
    log_format: str = "text", *, addresses: bool = False, text_format: str = TEXT_FORMAT
) -> logging.Formatter:
    if log_format == "json":
        return PapermailJsonFormatter(addresses=addresses)
    return TextFormatter(text_format, addresses=addresses)


def _ours(handler: logging.Handler) -> bool:
    return getattr(handler, "_papermail", False)


def configure_logging(
    settings: Any | None,
    level: int | str = logging.WARNING,
    *,
    stream: IO[str] | None = None,
    filename: str | None = None,
    text_format: str = TEXT_FORMAT,
    force: bool = False,
) -> logging.Handler | None:
    """Send the root logger's records to stderr (or ``stream``, ``filename``) in the
    configured format. ``settings`` None (they are invalid; the command reports that
    itself): text, addresses redacted. A root logger someone else gave handlers (a test
    runner, an application embedding papermail) is left alone unless ``force``; calling
    it again replaces papermail's own handler. Returns the handler (None: left alone)."""
    root = logging.getLogger()
    foreign = [h for h in root.handlers if not _ours(h)]
    if foreign and not force:
        return None
    log_format = getattr(settings, "log_format", "text")
    addresses = bool(getattr(settings, "log_addresses", False))
    handler: logging.Handler = (
        logging.FileHandler(filename, encoding="utf-8")
        if filename
        else logging.StreamHandler(stream or sys.stderr)
    )
    handler._papermail = True  # type: ignore[attr-defined]
    handler.setFormatter(make_formatter(log_format, addresses=addresses, text_format=text_format))
    handler.addFilter(ContextFilter())
    for old in [h for h in root.handlers if _ours(h)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    # Python's warnings (a library's, Celery's privilege warning) as records: in JSON mode
    # every line of stderr is then an object.
    logging.captureWarnings(log_format == "json")
    return handler


def format_handlers(settings: Any | None, *loggers: logging.Logger) -> None:
    """Give the handlers of these loggers (gunicorn's own) papermail's formatter, in JSON
    mode; in text mode they keep their format (gunicorn redacts tokens itself)."""
    if getattr(settings, "log_format", "text") != "json":
        if getattr(settings, "log_addresses", False):
            return
        for logger in loggers:
            for handler in logger.handlers:
                handler.setFormatter(_AddressRedacting(handler.formatter))
        return
    addresses = bool(getattr(settings, "log_addresses", False))
    for logger in loggers:
        for handler in logger.handlers:
            handler.setFormatter(PapermailJsonFormatter(addresses=addresses))
            handler.addFilter(ContextFilter())


class _AddressRedacting(logging.Formatter):
    """Another formatter's text, addresses replaced."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact_addresses(self.inner.format(record))
