"""Which links papermail shows: absolute ``http``/``https`` URLs and nothing else.

One rule, used twice: ingest refuses any other paper URL (`url_problem`), and every
email and page filters again at output (`safe_url`, the Jinja filter ``safe_url`` in the
email and web template environments), so rows stored before the rule, or written by
hand, render without a link rather than as ``javascript:``, ``data:`` or a relative path.
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import urlsplit

SCHEMES = ("http", "https")

# Browsers drop tabs and line breaks anywhere in a URL and trim controls and spaces at
# its ends before they read the scheme (``java\tscript:``, `` JAVASCRIPT:``), and format
# characters (zero-width, bidi overrides) disguise what a link shows. A URL never needs
# any of them, nor a raw space: such a string is refused whole, never "cleaned".
_FORBIDDEN = re.compile(
    "[\x00-\x20\x7f-\xa0\u00ad\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u206f"
    "\u3000\ufeff\ufff9-\ufffb\\\\]"
)


def url_problem(value: object) -> str | None:
    """Why ``value`` is not a link papermail may show, or None when it is one."""
    if not isinstance(value, str) or not value:
        return "it is not a URL"
    bad = _FORBIDDEN.search(value)
    if bad:
        what = "a backslash" if bad.group() == "\\" else "whitespace or a control character"
        return f"it contains {what}: {bad.group()!r} at position {bad.start()}"
    scheme, colon, rest = value.partition(":")
    if not colon or not rest.startswith("//") or scheme.lower() not in SCHEMES:
        return "only absolute http:// and https:// URLs are allowed"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        return f"it is not a valid URL ({exc})"
    if not parts.hostname:
        return "it has no host"
    return None


def safe_url(value: object) -> str | None:
    """``value`` as a link (scheme lower-cased) if it passes `url_problem`, else None.

    Use it for every URL that did not come from papermail itself: ``{% if x|safe_url %}``
    drops the link, ``href="{{ x|safe_url }}"`` renders an empty attribute for a bad one."""
    return _safe_str(value) if isinstance(value, str) else None


@lru_cache(maxsize=16384)  # the same paper links recur in every email of an edition
def _safe_str(value: str) -> str | None:
    if url_problem(value) is not None:
        return None
    scheme, _, rest = value.partition(":")
    return f"{scheme.lower()}:{rest}"
