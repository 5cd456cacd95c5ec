"""Refuse requests with control characters before any view (or the database) sees them.

The shared validation (worker.subscribers, worker.preferences) rejects control characters
in the fields it knows, so the CLI and the pages give the same message. This guard is the
net under it: the path, every query parameter and every form field a view does not
validate itself is checked here, and a request holding NUL, another control character or
a lone surrogate gets a 400 page that says which field, never a database error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, Response, current_app, jsonify, request

from worker.untrusted import WHITESPACE_CONTROLS, find_control
from worker.web.logs import redact_tokens

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def validates(*fields: str) -> Callable[[F], F]:
    """Mark form fields the view validates itself (it shows a message next to the field)."""

    def mark(view: F) -> F:
        view.papermail_validates = frozenset(fields)  # type: ignore[attr-defined]
        return view

    return mark


def _problem() -> tuple[str, str] | None:
    """(where, character) of the first control character in the request, or None."""
    char = find_control(request.path)
    if char:
        return "the address of the page", char
    for key, values in request.args.lists():
        for text in (key, *values):
            char = find_control(text)
            if char:
                return f"the query parameter {find_safe(key)!r}", char
    if request.method in ("POST", "PUT", "PATCH") and request.mimetype in _FORM_TYPES:
        view = current_app.view_functions.get(request.endpoint or "")
        own = getattr(view, "papermail_validates", frozenset())
        for key, values in request.form.lists():
            char = find_control(key)
            if char:
                return "the name of a form field", char
            if key in own:
                continue
            for text in values:
                # Multi-line text is legitimate in a form; other controls are not.
                char = find_control(text, WHITESPACE_CONTROLS)
                if char:
                    return f"the form field {key!r}", char
    return None


def find_safe(text: str) -> str:
    """A parameter name fit to show and log (its controls made visible)."""
    return "".join(c if find_control(c) is None else f"U+{ord(c):04X}" for c in text)


def refuse_control_characters() -> Response | None:
    found = _problem()
    if found is None:
        return None
    where, char = found
    code = f"U+{ord(char):04X}"
    log.warning(
        "refused %s %s: control character %s in %s",
        request.method,
        redact_tokens(find_safe(request.path)),
        code,
        where,
    )
    message = (
        f"Your request has a control character ({code}) in {where}, which we can't accept. "
        "Please remove it and try again."
    )
    if request.path.startswith(("/webhooks", "/healthz")):
        response = jsonify(error=message)
        response.status_code = 400
        return response
    from worker.web.pages import _error_page

    return _error_page(400, "That didn't work", message)


def install(app: Flask) -> None:
    app.before_request(refuse_control_characters)
