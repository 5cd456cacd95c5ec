"""Signed, purpose-bound tokens for every link in an email.

A link is a capability: whoever holds it may act for that subscriber, for that purpose
only. Each purpose has its own salt, so a token minted for "view" never opens
"unsubscribe". ``settings.signing_keys`` is a list: the first key signs, every key
verifies, so keys rotate without breaking emails already in inboxes.

Payloads are compact dicts; the keys every reader relies on:

=============  ========================  =========================================
purpose        route                     payload
=============  ========================  =========================================
preferences    /preferences/<token>      {"s": subscriber id}
unsubscribe    /unsubscribe/<token>      {"s": subscriber id}
view           /view/<token>             {"s": subscriber id, "d": edition ISO date}
feedback       /feedback/<token>         {"s": subscriber id, "p": paper id, "v": +1 | -1}
confirm        /confirm/<token>          {"s": subscriber id}  (valid 7 days)
=============  ========================  =========================================
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from itsdangerous import BadData, BadSignature, SignatureExpired, URLSafeTimedSerializer
from itsdangerous.encoding import int_to_bytes
from itsdangerous.timed import TimestampSigner

from worker.clock import utcnow
from worker.config import Settings, get_settings
from worker.errors import PapermailError

ROUTES: dict[str, str] = {
    "preferences": "preferences",
    "unsubscribe": "unsubscribe",
    "view": "view",
    "feedback": "feedback",
    "confirm": "confirm",
}
PURPOSES: tuple[str, ...] = tuple(ROUTES)

DAY = 24 * 3600
# Links must work for at least a year after the email went out.
DEFAULT_MAX_AGE = 400 * DAY
MAX_AGES: dict[str, int] = {"confirm": 7 * DAY}


def _clock() -> float:
    # The process clock (worker.clock); an indirection tests can still pin on its own.
    return utcnow().timestamp()


class BadLink(PapermailError):
    """The token cannot be used: tampered, expired, or minted for another purpose."""

    exit_code = 2

    def __init__(self, purpose: str, message: str) -> None:
        super().__init__(message)
        self.purpose = purpose


class TamperedLink(BadLink):
    pass


class ExpiredLink(BadLink):
    pass


class WrongPurpose(BadLink):
    def __init__(self, purpose: str, actual: str, message: str) -> None:
        super().__init__(purpose, message)
        self.actual = actual


def salt(purpose: str) -> str:
    return f"papermail.{_check_purpose(purpose)}.v1"


def _check_purpose(purpose: str) -> str:
    if purpose not in ROUTES:
        raise ValueError(f"unknown link purpose {purpose!r} (expected one of {', '.join(ROUTES)})")
    return purpose


class _ClockSigner(TimestampSigner):
    def get_timestamp(self) -> int:
        return int(_clock())


@lru_cache(maxsize=64)
def _serializer(purpose: str, keys: tuple[str, ...]) -> URLSafeTimedSerializer:
    # itsdangerous signs with the *last* key of its list; ours signs with the first.
    return URLSafeTimedSerializer(list(reversed(keys)), salt=salt(purpose), signer=_ClockSigner)


class _Minter:
    """Mints exactly what ``URLSafeTimedSerializer.dumps`` would, minus its per-call
    key derivation and zlib attempt (useless on a few-byte payload): a digest holds
    a dozen links, and 10,000 digests must render in seconds."""

    __slots__ = ("_inner", "_outer", "_stamp")

    def __init__(self, purpose: str, keys: tuple[str, ...]) -> None:
        signer = _serializer(purpose, keys).make_signer(salt(purpose))
        # HMAC (RFC 2104) from its two keyed hash states: copying two C hash objects per
        # link costs half of what ``hmac.HMAC.copy`` (Python) does; the bytes are the same.
        key = signer.derive_key()
        probe = signer.digest_method()
        if len(key) > probe.block_size:
            key = signer.digest_method(key).digest()
        key = key.ljust(probe.block_size, b"\0")
        self._inner = signer.digest_method(key.translate(_IPAD))
        self._outer = signer.digest_method(key.translate(_OPAD))
        self._stamp: tuple[int, bytes] = (-1, b"")  # one attribute: threads swap it whole

    def mint(self, payload: dict[str, Any]) -> str:
        return self.mint_json(_dumps(payload).encode())

    def mint_json(self, payload_json: bytes) -> str:
        """Mint from the payload already in compact JSON (a hot loop's shortcut)."""
        return self.mint_json_many((payload_json,))[0]

    def mint_json_many(self, payloads_json: Sequence[bytes], now: int | None = None) -> list[str]:
        """Mint several links at once (one email's), all stamped with the same second:
        ``now`` (from :func:`now_second`, so an email's minters share one clock read)."""
        if now is None:
            now = int(_clock())
        at, stamp = self._stamp
        if now != at:  # racing threads may both recompute: harmless
            stamp = b"." + _b64(int_to_bytes(now))
            self._stamp = (now, stamp)
        b2a, urlsafe = binascii.b2a_base64, _URLSAFE
        inner_key, outer_key = self._inner, self._outer
        out = []
        for payload_json in payloads_json:
            body = b2a(payload_json, newline=False).translate(urlsafe).rstrip(b"=") + stamp
            inner = inner_key.copy()
            inner.update(body)
            outer = outer_key.copy()
            outer.update(inner.digest())
            mac = b2a(outer.digest(), newline=False).translate(urlsafe).rstrip(b"=")
            out.append((body + b"." + mac).decode("ascii"))
        return out


_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64(data: bytes) -> bytes:
    # base64.urlsafe_b64encode without its Python-level wrapper.
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=")


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


@lru_cache(maxsize=64)
def _minter(purpose: str, keys: tuple[str, ...]) -> _Minter:
    return _Minter(purpose, keys)


def _keys(settings: Settings | None) -> tuple[str, ...]:
    return tuple((settings or get_settings()).signing_keys)


def now_second() -> int:
    """The second links are stamped with now (the process clock, see :func:`_clock`)."""
    return int(_clock())


def json_many_minter(
    purpose: str, settings: Settings | None = None
) -> Callable[[Sequence[bytes], int | None], list[str]]:
    """Like :func:`json_minter` for a batch of payloads (one clock read for all, or
    none given the second from :func:`now_second`)."""
    return _minter(_check_purpose(purpose), _keys(settings)).mint_json_many


def minter(purpose: str, settings: Settings | None = None) -> Callable[[dict[str, Any]], str]:
    """``make_token`` bound to one purpose and key set, for minting many links in a loop."""
    return _minter(_check_purpose(purpose), _keys(settings)).mint


def json_minter(purpose: str, settings: Settings | None = None) -> Callable[[bytes], str]:
    """Like :func:`minter`, taking the payload as compact JSON bytes (``{"s":1}``)."""
    return _minter(_check_purpose(purpose), _keys(settings)).mint_json


def make_token(purpose: str, payload: dict[str, Any], settings: Settings | None = None) -> str:
    """A URL-safe signed token carrying ``payload`` (JSON-serialisable) for ``purpose``."""
    _check_purpose(purpose)
    if not isinstance(payload, dict):
        raise TypeError("a link payload must be a dict")
    return _minter(purpose, _keys(settings)).mint(payload)


def read_token(
    purpose: str,
    token: str,
    settings: Settings | None = None,
    max_age: int | None = None,
) -> dict[str, Any]:
    """The payload of a token made for ``purpose``; raises a :class:`BadLink` subclass."""
    _check_purpose(purpose)
    keys = _keys(settings)
    age = max_age if max_age is not None else MAX_AGES.get(purpose, DEFAULT_MAX_AGE)
    if not isinstance(token, str) or not token or len(token) > 2048:
        raise TamperedLink(purpose, f"this {purpose} link is malformed")
    try:
        payload = _serializer(purpose, keys).loads(token, max_age=age)
    except SignatureExpired:
        raise ExpiredLink(
            purpose, f"this {purpose} link has expired; use the link in a newer email"
        ) from None
    except BadSignature:
        actual = _signed_for(token, keys, exclude=purpose)
        if actual is not None:
            raise WrongPurpose(
                purpose, actual, f"this link is a {actual} link, not a {purpose} link"
            ) from None
        raise TamperedLink(purpose, f"this {purpose} link is invalid or was altered") from None
    except BadData:  # the signature held but the payload does not decode
        raise TamperedLink(purpose, f"this {purpose} link is invalid or was altered") from None
    if not isinstance(payload, dict):
        raise TamperedLink(purpose, f"this {purpose} link is invalid or was altered")
    return payload


def _signed_for(token: str, keys: tuple[str, ...], exclude: str) -> str | None:
    """The other purpose whose salt validates this token's signature, if any."""
    for other in PURPOSES:
        if other == exclude:
            continue
        try:
            _serializer(other, keys).loads(token)  # no max_age: only the signature matters
        except BadData:
            continue
        return other
    return None


def link(purpose: str, settings: Settings | None = None, **payload: Any) -> str:
    """The absolute URL of ``purpose``'s page for ``payload``, e.g. link("view", s=1, d=...)."""
    settings = settings or get_settings()
    token = make_token(purpose, payload, settings)
    return f"{settings.base_url}/{ROUTES[purpose]}/{token}"
