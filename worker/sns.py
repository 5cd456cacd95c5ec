"""SNS message signature verification.

Every message posted to the webhook is checked before anything else reads it:

- ``Type`` is one of Notification, SubscriptionConfirmation, UnsubscribeConfirmation;
- ``SignatureVersion`` 1 (SHA1withRSA) or 2 (SHA256withRSA); 1 is refused when
  ``PAPERMAIL_SNS_REQUIRE_SIGNATURE_V2`` is set;
- ``TopicArn`` is one of ``PAPERMAIL_SNS_TOPIC_ARNS`` (an empty list refuses everything);
- ``Timestamp`` is within one hour of now, either way;
- ``SigningCertURL`` is ``https://sns.<region>.amazonaws.com[.cn]/....pem`` and nothing else;
- the signature over the exact canonical string of the type verifies with the public key of
  that certificate (fetched once, then cached in memory).

The certificate fetcher is injectable (tests sign with a self-signed certificate; Amazon's
certificate host cannot be reached from everywhere).
"""

from __future__ import annotations

import base64
import functools
import logging
import re
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from worker.clock import utcnow
from worker.config import Settings

log = logging.getLogger(__name__)

MAX_CLOCK_SKEW = timedelta(hours=1)
# A message read from SQS may have waited in the queue (poller down, dead-letter redrive)
# up to SQS's longest retention; replaying an authentic message is harmless (deduplicated
# by its MessageId), so only the webhook insists on a fresh one.
SQS_MAX_AGE = timedelta(days=14)
MAX_CERT_BYTES = 64 * 1024
CERT_FETCH_TIMEOUT = 10.0

# The canonical string of each type: these keys, in this order, as "key\nvalue\n".
CANONICAL_KEYS: dict[str, tuple[str, ...]] = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": (
        "Message",
        "MessageId",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ),
    "UnsubscribeConfirmation": (
        "Message",
        "MessageId",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ),
}
OPTIONAL_KEYS = frozenset({"Subject"})  # Notification only, signed only when present

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}

# A region is letters-letters(-letters)-digits (us-east-1, ap-southeast-2, us-gov-west-1,
# cn-north-1). The whole URL must match: no userinfo, port, query or fragment, and no
# character that URL parsers silently drop or reinterpret.
_REGION = r"[a-z]{2}(?:-[a-z]+)+-\d{1,2}"
_CERT_URL = re.compile(
    r"https://(?P<host>sns\.(?P<region>" + _REGION + r")\.amazonaws\.com(?:\.cn)?)"
    r"/[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*\.pem"
)

FailureKind = Literal["malformed", "refused", "unavailable"]


class SnsVerificationError(Exception):
    """The message is not an authentic, current SNS message for an allowed topic.

    ``kind``: ``malformed`` (not a well-formed SNS message), ``refused`` (not authentic or
    not for us), ``unavailable`` (the signing certificate could not be fetched: worth a
    retry by the sender).
    """

    def __init__(self, reason: str, kind: FailureKind = "refused") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind: FailureKind = kind

    @property
    def retryable(self) -> bool:
        return self.kind == "unavailable"


class CertFetcher(Protocol):
    """Returns the PEM bytes at a (validated) certificate URL, or raises."""

    def __call__(self, url: str) -> bytes: ...


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # The URL was validated; a redirect would lead to a host that was not.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def default_cert_fetcher(url: str, timeout: float = CERT_FETCH_TIMEOUT) -> bytes:
    """Fetch a certificate over https (TLS verified by urllib), no redirects, size-bounded."""
    opener = urllib.request.build_opener(_NoRedirect)
    with opener.open(url, timeout=timeout) as response:
        if response.status != 200:
            raise OSError(f"HTTP {response.status}")
        data: bytes = response.read(MAX_CERT_BYTES + 1)
    if len(data) > MAX_CERT_BYTES:
        raise OSError(f"certificate larger than {MAX_CERT_BYTES} bytes")
    return data


class CertCache:
    """Loaded certificates by URL; least recently used dropped beyond ``max_size``. The
    public key of each is kept beside it (:meth:`public_key`), so a message costs only its
    signature check, not parsing the key out of the certificate again."""

    def __init__(self, max_size: int = 32) -> None:
        self.max_size = max_size
        self._items: OrderedDict[str, x509.Certificate] = OrderedDict()
        self._keys: dict[str, tuple[x509.Certificate, rsa.RSAPublicKey]] = {}
        self._lock = threading.Lock()

    def get(self, url: str) -> x509.Certificate | None:
        with self._lock:
            cert = self._items.get(url)
            if cert is not None:
                self._items.move_to_end(url)
            return cert

    def put(self, url: str, cert: x509.Certificate) -> None:
        with self._lock:
            self._items[url] = cert
            self._items.move_to_end(url)
            while len(self._items) > self.max_size:
                dropped, _ = self._items.popitem(last=False)
                self._keys.pop(dropped, None)

    def public_key(self, url: str, cert: x509.Certificate) -> rsa.RSAPublicKey:
        """The RSA public key of ``cert`` (the certificate cached for ``url``)."""
        found = self._keys.get(url)
        if found is not None and found[0] is cert:
            return found[1]
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise SnsVerificationError(f"{url} does not hold an RSA key")
        with self._lock:
            if self._items.get(url) is cert:
                self._keys[url] = (cert, key)
        return key

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._keys.clear()

    def __len__(self) -> int:
        return len(self._items)


default_cache = CertCache()


def cert_url_problem(url: object) -> str | None:
    """Why ``url`` is not an acceptable SigningCertURL (None when it is)."""
    if not isinstance(url, str) or not url:
        return "SigningCertURL is missing"
    return _cert_url_problem(url)


@functools.lru_cache(maxsize=256)  # every message of a topic names the same certificate
def _cert_url_problem(url: str) -> str | None:
    if _CERT_URL.fullmatch(url) is None:
        return f"SigningCertURL {url[:200]!r} is not https://sns.<region>.amazonaws.com[.cn]/...pem"
    # Belt and braces: the parser used to fetch must see the very same host.
    parts = urlsplit(url)
    if (
        parts.scheme != "https"
        or parts.netloc != parts.hostname
        or parts.port is not None
        or parts.query
        or parts.fragment
    ):
        return f"SigningCertURL {url[:200]!r} has an unexpected form"
    return None


def is_valid_cert_url(url: object) -> bool:
    return cert_url_problem(url) is None


def region_of_topic(topic_arn: str) -> str:
    """``arn:aws:sns:us-east-1:123456789012:name`` -> ``us-east-1``."""
    parts = topic_arn.split(":")
    if len(parts) < 6 or parts[0] != "arn" or parts[2] != "sns" or not parts[3]:
        raise ValueError(f"not an SNS topic ARN: {topic_arn!r}")
    return parts[3]


def canonical_string(message: Mapping[str, Any]) -> bytes:
    """The bytes SNS signed for this message type."""
    kind = message.get("Type")
    keys = CANONICAL_KEYS.get(kind) if isinstance(kind, str) else None
    if keys is None:
        raise SnsVerificationError(f"unknown Type {kind!r}", "malformed")
    out: list[str] = []
    for key in keys:
        value = message.get(key)
        if value is None and key in OPTIONAL_KEYS:
            continue
        if not isinstance(value, str):
            raise SnsVerificationError(f"{key} is missing or not a string", "malformed")
        out.append(f"{key}\n{value}\n")
    return "".join(out).encode("utf-8")


def parse_timestamp(value: object) -> datetime:
    if not isinstance(value, str) or not value:
        raise SnsVerificationError("Timestamp is missing", "malformed")
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        raise SnsVerificationError(f"Timestamp {value[:64]!r} is malformed", "malformed") from None
    if stamp.tzinfo is None:
        raise SnsVerificationError(f"Timestamp {value[:64]!r} has no time zone", "malformed")
    return stamp.astimezone(UTC)


def _load_certificate(
    url: str, fetcher: CertFetcher, cache: CertCache, now: datetime
) -> x509.Certificate:
    cert = cache.get(url)
    if cert is None:
        try:
            pem = fetcher(url)
        except Exception as exc:  # any fetch failure is "try again later"
            raise SnsVerificationError(
                f"could not fetch signing certificate {url}: {exc}", "unavailable"
            ) from None
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise SnsVerificationError(f"{url} is not a PEM certificate") from None
        if not isinstance(cert.public_key(), rsa.RSAPublicKey):
            raise SnsVerificationError(f"{url} does not hold an RSA key")
        cache.put(url, cert)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise SnsVerificationError(f"signing certificate {url} is not valid now")
    return cert


def _span(delta: timedelta) -> str:
    hours = delta / timedelta(hours=1)
    if hours == 1:
        return "an hour"
    return f"{hours / 24:g} days" if hours >= 48 else f"{hours:g} hours"


def verify_message(
    message: Mapping[str, Any],
    settings: Settings,
    *,
    fetcher: CertFetcher | None = None,
    cache: CertCache | None = None,
    now: datetime | None = None,
    max_age: timedelta = MAX_CLOCK_SKEW,
) -> None:
    """Raise :class:`SnsVerificationError` unless ``message`` is authentic and for us.

    Cheap checks come first, so a forged message costs no certificate fetch. ``max_age``:
    how old its Timestamp may be (the webhook: an hour; SQS: :data:`SQS_MAX_AGE`); it may
    never be more than :data:`MAX_CLOCK_SKEW` ahead.
    """
    if not isinstance(message, Mapping):
        raise SnsVerificationError("the body is not a JSON object", "malformed")
    kind = message.get("Type")
    if not isinstance(kind, str) or kind not in CANONICAL_KEYS:
        raise SnsVerificationError(f"unknown Type {kind!r}", "malformed")
    version = message.get("SignatureVersion")
    if version is None:
        raise SnsVerificationError("SignatureVersion is missing", "malformed")
    if version not in _HASHES:
        raise SnsVerificationError(f"unknown SignatureVersion {version!r}", "malformed")
    if version == "1" and settings.sns_require_signature_v2:
        raise SnsVerificationError(
            "SignatureVersion 1 (SHA1) refused: PAPERMAIL_SNS_REQUIRE_SIGNATURE_V2 is set"
        )
    canonical = canonical_string(message)  # checks every signed field is present

    topic = message["TopicArn"]
    if not settings.sns_topic_arns:
        log.error(
            "PAPERMAIL_SNS_TOPIC_ARNS is empty: every SNS message is refused; "
            "set it to the ARN(s) of the topic(s) SES publishes to"
        )
        raise SnsVerificationError(
            f"topic {topic!r} not allowed (PAPERMAIL_SNS_TOPIC_ARNS is empty)"
        )
    if topic not in settings.sns_topic_arns:
        raise SnsVerificationError(f"topic {topic!r} is not in PAPERMAIL_SNS_TOPIC_ARNS")

    now = now or utcnow()
    stamp = parse_timestamp(message["Timestamp"])
    oldest = max(max_age, MAX_CLOCK_SKEW)
    if stamp - now > MAX_CLOCK_SKEW or now - stamp > oldest:
        window = MAX_CLOCK_SKEW if stamp > now else oldest
        raise SnsVerificationError(
            f"Timestamp {message['Timestamp']} is more than {_span(window)} from now "
            f"({now.isoformat()})"
        )

    url = message.get("SigningCertURL")
    problem = cert_url_problem(url)
    if problem:
        raise SnsVerificationError(problem)
    assert isinstance(url, str)

    signature_b64 = message.get("Signature")
    if not isinstance(signature_b64, str) or not signature_b64:
        raise SnsVerificationError("Signature is missing", "malformed")
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except ValueError:
        raise SnsVerificationError("Signature is not base64", "malformed") from None

    cache = cache if cache is not None else default_cache  # an empty cache is falsy
    cert = _load_certificate(
        url, fetcher if fetcher is not None else default_cert_fetcher, cache, now
    )
    key = cache.public_key(url, cert)
    try:
        key.verify(signature, canonical, padding.PKCS1v15(), _HASHES[version]())
    except InvalidSignature:
        raise SnsVerificationError("signature does not verify") from None
