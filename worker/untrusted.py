"""Checks for text and JSON that come from outside: forms, CSV files, webhooks, queues.

Two kinds of input crash deeper layers instead of being refused with a clear message:

- control characters: PostgreSQL refuses NUL in text columns, lone surrogates cannot be
  encoded at all, and the rest have no business in an address, a topic or a zone name;
- deeply nested JSON: ``json.loads`` recurses once per ``[`` or ``{`` and a body of
  100,000 brackets ends in ``RecursionError``.

Both raise ``ValueError`` subclasses, so every caller that already reports a bad value
reports these too.
"""

from __future__ import annotations

import json
import re
from typing import Any

# C0 controls, DEL, C1 controls and lone surrogates (U+D800-U+DFFF: what Python's
# surrogateescape makes of bytes that are not UTF-8, e.g. in a command-line argument).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# The whitespace controls a multi-line field may legitimately hold.
WHITESPACE_CONTROLS = "\t\n\r"

MAX_JSON_DEPTH = 64
MAX_JSON_BYTES = 1024 * 1024  # SNS messages are at most 256 KB


class ControlCharacter(ValueError):
    """A text value holds a control character (or a lone surrogate)."""

    def __init__(self, what: str, char: str) -> None:
        self.what = what
        self.char = char
        super().__init__(
            f"{what} contains a control character (U+{ord(char):04X}), which is not allowed; "
            "remove it and try again"
        )


def find_control(text: str, allow: str = "") -> str | None:
    """The first disallowed control character in ``text``, or None."""
    if _CONTROL.search(text) is None:  # the usual case, without an iterator
        return None
    for match in _CONTROL.finditer(text):
        if match.group() not in allow:
            return match.group()
    return None


def check_text(value: str, what: str, *, allow: str = "") -> str:
    """``value`` unchanged, or ``ControlCharacter`` naming ``what`` and the character."""
    char = find_control(value, allow)
    if char is not None:
        raise ControlCharacter(what, char)
    return value


class UnsafeJSON(ValueError):
    """A JSON document is too large or too deeply nested to be parsed safely."""


# A JSON string (escapes included), in the unrolled form that never backtracks.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(data: bytes, limit: int) -> int:
    """The nesting depth of ``data``, counted without recursion; stops above ``limit``.

    Brackets inside strings do not count. Malformed documents get some depth; the parser
    reports what is wrong with them.
    """
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKET)
    depth = deepest = 0
    for byte in brackets:
        if byte in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def loads_json(
    data: bytes | str,
    *,
    what: str = "the JSON document",
    max_depth: int = MAX_JSON_DEPTH,
    max_bytes: int | None = MAX_JSON_BYTES,
) -> Any:
    """``json.loads`` for untrusted input: size and nesting are checked before parsing.

    Raises ``UnsafeJSON`` (too large, too deep) or ``json.JSONDecodeError`` / ``ValueError``
    (not JSON, not UTF-8); all are ``ValueError``.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if max_bytes is not None and len(raw) > max_bytes:
        raise UnsafeJSON(f"{what} is too large ({len(raw):,} bytes; at most {max_bytes:,})")
    if json_depth(raw, max_depth) > max_depth:
        raise UnsafeJSON(f"{what} is nested more than {max_depth} levels deep")
    if isinstance(data, str):
        return json.loads(data)
    return json.loads(raw)
