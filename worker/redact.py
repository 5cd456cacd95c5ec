"""Keep secrets out of logs and messages: link tokens, URL passwords, secret settings.

A link token is a capability valid for 400 days; an access log line with one in it is a
key to someone's subscription. Every log format papermail controls (the Flask app's own
lines, ``papermail web``'s werkzeug access log, gunicorn's access and error logs, see
worker.web.logs and worker.web.gunicorn_conf) passes its text through
:func:`redact_tokens`; settings errors and printed URLs go through :func:`redact_url`.
"""

from __future__ import annotations

import re
from functools import lru_cache

TOKEN = "[token]"
HIDDEN = "***"

# scheme://user:password@host -> scheme://user:***@host (also inside longer text). Up to
# the last "@" of the word: a password may hold an unescaped "@" or "/".
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@'\"]*:)[^\s'\"]*@")
# Query parameters whose value is a secret whatever it looks like.
_SECRET_QUERY = re.compile(
    r"(?i)(?P<head>[?&;](?:token|t|key|sig|signature|secret|password|pass|code|auth)=)[^&;#\s\"']*"
)
# The shape of an itsdangerous token (payload.timestamp.signature, payload possibly
# prefixed with "." when compressed), wherever it appears: a mistyped route, a query.
_TOKEN_SHAPE = re.compile(r"\.?[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{16,}")


@lru_cache(maxsize=1)
def _token_route() -> re.Pattern[str]:
    from worker.links import ROUTES

    names = "|".join(re.escape(r) for r in sorted(set(ROUTES.values())))
    # /preferences/<token>, in any case, with any run of slashes, up to the next
    # separator; percent-encoded or truncated tokens included.
    return re.compile(rf"(?i)(?P<head>/+(?:{names})/+)[^/?#\s\"']+")


# Every text the four patterns above can match holds a "/" (a route, a URL), an "=" (a
# query) or a run of 16 token characters (a signature): the rest is returned as it is.
_MAYBE_SECRET = re.compile(r"[/=]|[A-Za-z0-9_-]{16}")


def redact_tokens(text: str) -> str:
    """``text`` with every link token, secret query value and URL password replaced."""
    if _MAYBE_SECRET.search(text) is None:
        return text
    text = _token_route().sub(rf"\g<head>{TOKEN}", text)
    text = _SECRET_QUERY.sub(rf"\g<head>{TOKEN}", text)
    text = _TOKEN_SHAPE.sub(TOKEN, text)
    return _URL_PASSWORD.sub(rf"\g<head>{HIDDEN}@", text)


def redact_url(text: str) -> str:
    """A URL (or text holding URLs) with the password of each one hidden."""
    return _URL_PASSWORD.sub(rf"\g<head>{HIDDEN}@", text)
