"""Redaction of link tokens, secret query values and URL passwords (worker.redact), and the
access-log atoms of gunicorn_conf, against the plain definitions they shortcut."""

from __future__ import annotations

import random
import string
from datetime import timedelta

import pytest
from gunicorn.config import Config
from gunicorn.glogging import SafeAtoms

from worker import links, redact
from worker.config import load_settings
from worker.web import gunicorn_conf


def reference(text: str) -> str:
    """redact_tokens as defined: the four substitutions, always."""
    text = redact._token_route().sub(rf"\g<head>{redact.TOKEN}", text)
    text = redact._SECRET_QUERY.sub(rf"\g<head>{redact.TOKEN}", text)
    text = redact._TOKEN_SHAPE.sub(redact.TOKEN, text)
    return redact._URL_PASSWORD.sub(rf"\g<head>{redact.HIDDEN}@", text)


def _token() -> str:
    settings = load_settings(secret_key="redact-test-key-" + "k" * 32, mailer="outbox")
    return links.make_token("preferences", {"s": 42}, settings)


PIECES = [
    "/preferences/", "/unsubscribe/", "?token=", "&sig=", ";key=", "postgresql://u:pw@h/db",
    "https://a:b@c", ".", "/", "=", "@", ":", "-", "_", " ", '"', "'", "%2F", "GET ", " HTTP/1.1",
    "127.0.0.1", "[01/Dec/2026:17:00:00 +0000]", "abcdefghijklmnop", "0123456789ABCDEF_-",
]  # fmt: skip


def generated(n: int) -> list[str]:
    rng = random.Random(7)
    token = _token()
    alphabet = string.ascii_letters + string.digits + "._-/=?&;:@ %'\""
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 6)):
            pick = rng.random()
            if pick < 0.4:
                parts.append(rng.choice(PIECES))
            elif pick < 0.5:
                parts.append(token[: rng.randint(10, len(token))])
            else:
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20))))
        out.append("".join(parts))
    return out


def test_redaction_equals_the_four_substitutions() -> None:
    texts = generated(20_000)
    changed = 0
    for text in texts:
        assert redact.redact_tokens(text) == reference(text), repr(text)
        changed += redact.redact_tokens(text) != text
    assert changed > 1000  # the texts do carry secrets, not only harmless words
    token = _token()
    assert redact.redact_tokens(f"GET /preferences/{token} HTTP/1.1") == (
        "GET /preferences/[token] HTTP/1.1"
    )
    assert redact.redact_tokens("127.0.0.1") == "127.0.0.1"


def _logger() -> gunicorn_conf.RedactingLogger:
    cfg = Config()
    cfg.set("accesslog", "-")
    return gunicorn_conf.RedactingLogger(cfg)


class _Response:
    status = "200 OK"
    sent = 57
    headers = [("Content-Type", "application/json"), ("X-Echo", "")]


@pytest.mark.parametrize("path", ["/preferences/{t}", '/unsubscribe/{t}"x', "/subscribe?token={t}",
                                  "/webhooks/ses", "/p/{t}?next=https://u:pw@h/"])  # fmt: skip
def test_access_log_atoms_are_those_redacted_one_by_one(path: str) -> None:
    """Each atom the format asks for is redacted, then its quotes escaped, as when every
    atom was redacted before SafeAtoms: the same line, byte for byte."""
    token = _token()
    uri = path.format(t=token)
    environ = {
        "REQUEST_METHOD": "GET", "RAW_URI": uri, "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "203.0.113.9", "PATH_INFO": uri.split("?")[0],
        "QUERY_STRING": uri.partition("?")[2], "HTTP_REFERER": f"https://x.example{uri}",
        "HTTP_USER_AGENT": f'Mozilla "quoted" {token}',
    }  # fmt: skip

    class Request:
        headers = [("REFERER", environ["HTTP_REFERER"]), ("X-TOKEN", token)]

    logger = _logger()
    took = timedelta(milliseconds=3)
    atoms = logger.atoms(_Response, Request, environ, took)
    old = SafeAtoms({k: redact.redact_tokens(v) if isinstance(v, str) else v
                     for k, v in atoms.items()})  # fmt: skip
    new = gunicorn_conf.RedactedAtoms(atoms)
    for key in [*atoms, "{referer}i", "{x-token}i", "{missing}i", "nope"]:
        assert new[key] == old[key], key
    fmt = logger.cfg.access_log_format + " %({x-token}i)s %({referer}i)s %(U)s %(q)s"
    line = fmt % new
    assert line == fmt % old
    assert token not in line and token.rsplit(".", 1)[-1][:16] not in line


def test_access_line_keeps_the_request_shape(capsys: pytest.CaptureFixture[str]) -> None:
    token = _token()
    logger = _logger()
    environ = {"REQUEST_METHOD": "GET", "RAW_URI": f"/preferences/{token}?saved=1",
               "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "203.0.113.9"}  # fmt: skip
    logger.access(_Response, type("R", (), {"headers": []}), environ, timedelta(0))
    out = capsys.readouterr().out
    assert '"GET /preferences/[token]?saved=1 HTTP/1.1" 200' in out
    assert token not in out
