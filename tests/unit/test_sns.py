"""SNS signature verification, with messages signed here by a self-signed test certificate.

The canonical string is built in this file independently of worker/sns.py, from AWS's
description, so a wrong field order or a signed-when-absent Subject in the module fails.
"""

from __future__ import annotations

import base64
import http.server
import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.conftest import FIXED_NOW
from worker import sns
from worker.config import Settings, load_settings

TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-events"
CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem"
# The unit tests' fixed process clock (tests/conftest.py): certificates, message
# timestamps and the verifier's `now` all agree whatever the calendar says.
NOW = FIXED_NOW.replace(microsecond=0)


# --- test keys and signing ----------------------------------------------------------------


def make_certificate(
    key: rsa.RSAPrivateKey,
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = NOW
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(days=1))
        .not_valid_after(not_after or now + timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


class SigningKeys:
    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.pem = make_certificate(self.key)


@pytest.fixture(scope="session")
def keys() -> SigningKeys:
    return SigningKeys()


class Fetcher:
    """A CertFetcher serving fixed PEMs by URL, recording what was asked."""

    def __init__(self, pems: dict[str, bytes]) -> None:
        self.pems = pems
        self.calls: list[str] = []

    def __call__(self, url: str) -> bytes:
        self.calls.append(url)
        if url not in self.pems:
            raise OSError(f"404 {url}")
        return self.pems[url]


SIGNED_KEYS = {
    "Notification": ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"],
    "SubscriptionConfirmation": [
        "Message",
        "MessageId",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ],
}
SIGNED_KEYS["UnsubscribeConfirmation"] = SIGNED_KEYS["SubscriptionConfirmation"]


def reference_canonical(message: dict[str, Any]) -> bytes:
    text = ""
    # An unknown Type is signed like a Notification, so only the Type rule can refuse it.
    for key in SIGNED_KEYS.get(message["Type"], SIGNED_KEYS["Notification"]):
        if key == "Subject" and message.get("Subject") is None:
            continue
        text += f"{key}\n{message[key]}\n"
    return text.encode()


def sign(message: dict[str, Any], key: rsa.RSAPrivateKey, version: str = "2") -> dict[str, Any]:
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    signature = key.sign(reference_canonical(message), padding.PKCS1v15(), algorithm)
    return {
        **message,
        "SignatureVersion": version,
        "Signature": base64.b64encode(signature).decode(),
    }


def notification(
    message: str = '{"eventType":"Delivery"}',
    *,
    subject: str | None = None,
    when: datetime | None = None,
    topic: str = TOPIC,
    cert_url: str = CERT_URL,
) -> dict[str, Any]:
    out = {
        "Type": "Notification",
        "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": topic,
        "Message": message,
        "Timestamp": (when or NOW).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "SigningCertURL": cert_url,
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&x=y",
    }
    if subject is not None:
        out["Subject"] = subject
    return out


def confirmation(kind: str = "SubscriptionConfirmation", **kw: Any) -> dict[str, Any]:
    base = notification(**kw)
    base.pop("UnsubscribeURL")
    return {
        **base,
        "Type": kind,
        "Message": "You have chosen to subscribe to the topic ...",
        "Token": "2336412f37fb687f5d51e6e2425c464de12884",
        "SubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&T=1",
    }


def make_settings(**kw: Any) -> Settings:
    return load_settings(**{"sns_topic_arns": [TOPIC], **kw})


@pytest.fixture
def fetcher(keys: SigningKeys) -> Fetcher:
    return Fetcher({CERT_URL: keys.pem})


def verify(message: dict[str, Any], fetcher: Fetcher, **kw: Any) -> None:
    settings = kw.pop("settings", None) or make_settings()
    kw.setdefault("now", NOW)  # NOW is fixed at import; the suite may run for minutes
    sns.verify_message(message, settings, fetcher=fetcher, cache=sns.CertCache(), **kw)


# --- the host rule on its own -------------------------------------------------------------

GOOD_URLS = [
    "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-9c6465fa7f48f5cacd23014631ec1136.pem",
    "https://sns.eu-west-3.amazonaws.com/SimpleNotificationService-abc.pem",
    "https://sns.ap-southeast-2.amazonaws.com/a/b/cert.pem",
    "https://sns.us-gov-west-1.amazonaws.com/SimpleNotificationService-x.pem",
    "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-x.pem",
    "https://sns.il-central-1.amazonaws.com/SimpleNotificationService-x.pem",
]
BAD_URLS = [
    "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-x.pem",  # not https
    "https://sns.foo.amazonaws.com.evil.com/x.pem",  # foreign host
    "https://sns.us-east-1.amazonaws.com.evil.com/x.pem",
    "https://evil.com/sns.us-east-1.amazonaws.com/x.pem",
    "https://my-bucket.s3.amazonaws.com/x.pem",  # S3-style: anyone can host there
    "https://s3.amazonaws.com/sns.us-east-1.amazonaws.com/x.pem",
    "https://sns.us-east-1.amazonaws.com.s3.amazonaws.com/x.pem",
    "https://evil.sns.us-east-1.amazonaws.com/x.pem",
    "https://sns.amazonaws.com/x.pem",  # no region
    "https://sns.us-east-1.amazonaws.co/x.pem",
    "https://sns.us-east-1.amazonaws.com.cn.evil.com/x.pem",
    "https://sns.us-east-1.amazonaws.com@evil.com/x.pem",  # userinfo tricks
    "https://evil.com@sns.us-east-1.amazonaws.com/x.pem",
    "https://evil.com:x@sns.us-east-1.amazonaws.com/x.pem",
    "https://sns.us-east-1.amazonaws.com\\@evil.com/x.pem",
    "https://sns.us-east-1.amazonaws.com:443/x.pem",  # ports
    "https://sns.us-east-1.amazonaws.com:8443/x.pem",
    "https://sns.us-east-1.amazonaws.com./x.pem",  # trailing dot
    "https://SNS.US-EAST-1.AMAZONAWS.COM/x.pem",
    "https://sns.us-east-1.amazonaws.com/x.txt",  # not .pem
    "https://sns.us-east-1.amazonaws.com/x.pem/",
    "https://sns.us-east-1.amazonaws.com/x.pem?a=b",
    "https://sns.us-east-1.amazonaws.com/x.pem#frag",
    "https://sns.us-east-1.amazonaws.com/.pem.evil/x",
    "https://sns.us-east-1.amazonaws.com/%2e%2e/x.pem",
    "https://sns.us-east-1.amazonaws.com/x.pem\n",
    "https://sns.us-east-1.amazonaws.com\t.evil.com/x.pem",
    " https://sns.us-east-1.amazonaws.com/x.pem",
    "https://sns.us-east-1.amazonaws.com",
    "https:///sns.us-east-1.amazonaws.com/x.pem",
    "//sns.us-east-1.amazonaws.com/x.pem",
    "file:///etc/sns.us-east-1.amazonaws.com/x.pem",
    "",
]


@pytest.mark.parametrize("url", GOOD_URLS)
def test_cert_url_accepted(url: str) -> None:
    assert sns.cert_url_problem(url) is None


@pytest.mark.parametrize("url", BAD_URLS)
def test_cert_url_refused(url: str) -> None:
    assert sns.cert_url_problem(url) is not None
    assert not sns.is_valid_cert_url(url)


@pytest.mark.parametrize("value", [None, 5, ["https://sns.us-east-1.amazonaws.com/x.pem"]])
def test_cert_url_must_be_text(value: object) -> None:
    assert sns.cert_url_problem(value) == "SigningCertURL is missing"


# --- canonical strings --------------------------------------------------------------------


def test_canonical_string_of_notification() -> None:
    message = notification("hello", subject="Amazon SES Email Event Notification")
    assert sns.canonical_string(message) == (
        b"Message\nhello\n"
        b"MessageId\n22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324\n"
        b"Subject\nAmazon SES Email Event Notification\n"
        + f"Timestamp\n{message['Timestamp']}\n".encode()
        + f"TopicArn\n{TOPIC}\n".encode()
        + b"Type\nNotification\n"
    )
    without = notification("hello")
    assert b"Subject" not in sns.canonical_string(without)
    assert sns.canonical_string(without) == reference_canonical(without)


@pytest.mark.parametrize("kind", ["SubscriptionConfirmation", "UnsubscribeConfirmation"])
def test_canonical_string_of_confirmations(kind: str) -> None:
    message = confirmation(kind)
    text = sns.canonical_string(message).decode()
    assert text.split("\n")[0::2][:7] == [
        "Message",
        "MessageId",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ]
    assert text == reference_canonical(message).decode()


# --- verification -------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("subject", [None, "Amazon SES Email Event Notification"])
def test_valid_notification_verifies(
    keys: SigningKeys, fetcher: Fetcher, version: str, subject: str | None
) -> None:
    verify(sign(notification(subject=subject), keys.key, version), fetcher)
    assert fetcher.calls == [CERT_URL]


@pytest.mark.parametrize("kind", ["SubscriptionConfirmation", "UnsubscribeConfirmation"])
def test_valid_confirmations_verify(keys: SigningKeys, fetcher: Fetcher, kind: str) -> None:
    verify(sign(confirmation(kind), keys.key), fetcher)


def test_certificate_is_cached(keys: SigningKeys, fetcher: Fetcher) -> None:
    cache = sns.CertCache()
    settings = make_settings()
    for text in ("one", "two", "three"):
        message = sign(notification(text), keys.key)
        sns.verify_message(message, settings, fetcher=fetcher, cache=cache, now=NOW)
    assert fetcher.calls == [CERT_URL]


def test_cached_public_key_still_checks_every_message(keys: SigningKeys, fetcher: Fetcher) -> None:
    """The key is parsed out of the certificate once per URL; each message's signature is
    checked all the same: a forged one after good ones is refused."""
    cache = sns.CertCache()
    settings = make_settings()
    good = sign(notification("good"), keys.key)
    sns.verify_message(good, settings, fetcher=fetcher, cache=cache, now=NOW)
    cert = cache.get(CERT_URL)
    assert cert is not None
    key = cache.public_key(CERT_URL, cert)
    assert cache.public_key(CERT_URL, cert) is key  # kept beside its certificate
    forged = sign(notification("forged"), keys.other)
    with pytest.raises(sns.SnsVerificationError, match="does not verify"):
        sns.verify_message(forged, settings, fetcher=fetcher, cache=cache, now=NOW)
    tampered = {**good, "Message": "tampered"}
    with pytest.raises(sns.SnsVerificationError, match="does not verify"):
        sns.verify_message(tampered, settings, fetcher=fetcher, cache=cache, now=NOW)
    sns.verify_message(good, settings, fetcher=fetcher, cache=cache, now=NOW)
    # A certificate put again for the URL (another one) gets its own key, not the old one.
    other = x509.load_pem_x509_certificate(make_certificate(keys.other))
    cache.put(CERT_URL, other)
    assert cache.public_key(CERT_URL, other).public_numbers() == (
        keys.other.public_key().public_numbers()
    )
    sns.verify_message(forged, settings, fetcher=fetcher, cache=cache, now=NOW)
    with pytest.raises(sns.SnsVerificationError, match="does not verify"):
        sns.verify_message(good, settings, fetcher=fetcher, cache=cache, now=NOW)


def test_cache_is_bounded(keys: SigningKeys) -> None:
    cache = sns.CertCache(max_size=2)
    cert = x509.load_pem_x509_certificate(keys.pem)
    for i in range(5):
        cache.put(f"u{i}", cert)
    assert len(cache) == 2 and cache.get("u0") is None and cache.get("u4") is cert


def _refusal(message: dict[str, Any], fetcher: Fetcher, **kw: Any) -> sns.SnsVerificationError:
    with pytest.raises(sns.SnsVerificationError) as info:
        verify(message, fetcher, **kw)
    return info.value


def test_tampered_message_is_refused(keys: SigningKeys, fetcher: Fetcher) -> None:
    message = sign(notification('{"eventType":"Delivery"}'), keys.key)
    message["Message"] = '{"eventType":"Complaint"}'
    err = _refusal(message, fetcher)
    assert err.kind == "refused" and "signature does not verify" in err.reason


def test_adding_a_subject_breaks_the_signature(keys: SigningKeys, fetcher: Fetcher) -> None:
    message = sign(notification(), keys.key)
    message["Subject"] = "injected"
    assert "signature" in _refusal(message, fetcher).reason


def test_signature_by_another_key_is_refused(keys: SigningKeys, fetcher: Fetcher) -> None:
    err = _refusal(sign(notification(), keys.other), fetcher)
    assert "signature does not verify" in err.reason


def test_v1_signature_checked_with_sha1_only(keys: SigningKeys, fetcher: Fetcher) -> None:
    # Signed with SHA256 but labelled version 1: must not verify.
    message = sign(notification(), keys.key, "2")
    message["SignatureVersion"] = "1"
    assert "signature does not verify" in _refusal(message, fetcher).reason


def test_v1_refused_when_v2_required(keys: SigningKeys, fetcher: Fetcher) -> None:
    strict = make_settings(sns_require_signature_v2=True)
    err = _refusal(sign(notification(), keys.key, "1"), fetcher, settings=strict)
    assert "SignatureVersion 1" in err.reason and fetcher.calls == []
    verify(sign(notification(), keys.key, "2"), fetcher, settings=strict)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"SignatureVersion": None}, "SignatureVersion is missing"),
        ({"SignatureVersion": "3"}, "unknown SignatureVersion '3'"),
        ({"SignatureVersion": 2}, "unknown SignatureVersion 2"),
        ({"Type": "Bogus"}, "unknown Type 'Bogus'"),
        ({"Type": None}, "unknown Type None"),
        ({"Signature": None}, "Signature is missing"),
        ({"Signature": "%%% not base64"}, "Signature is not base64"),
        ({"MessageId": None}, "MessageId is missing"),
        ({"Message": 5}, "Message is missing or not a string"),
        ({"Timestamp": "yesterday"}, "Timestamp 'yesterday' is malformed"),
        ({"Timestamp": "2026-11-27T10:00:00"}, "has no time zone"),
        ({"Timestamp": None}, "Timestamp is missing"),
    ],
)
def test_malformed_messages(
    keys: SigningKeys, fetcher: Fetcher, change: dict[str, Any], expected: str
) -> None:
    message = sign(notification(), keys.key)
    for key, value in change.items():
        if value is None:
            message.pop(key, None)
        else:
            message[key] = value
    err = _refusal(message, fetcher)
    assert expected in err.reason and err.kind == "malformed"
    assert fetcher.calls == []  # refused before any certificate fetch


def test_not_an_object(fetcher: Fetcher) -> None:
    assert _refusal([1, 2], fetcher).kind == "malformed"  # type: ignore[arg-type]


@pytest.mark.parametrize("offset", [timedelta(hours=-2), timedelta(hours=2)])
def test_timestamp_outside_one_hour(keys: SigningKeys, fetcher: Fetcher, offset: timedelta) -> None:
    err = _refusal(sign(notification(when=NOW + offset), keys.key), fetcher)
    assert "more than an hour" in err.reason and fetcher.calls == []


def test_timestamp_inside_one_hour(keys: SigningKeys, fetcher: Fetcher) -> None:
    for offset in (timedelta(minutes=-59), timedelta(minutes=59)):
        verify(sign(notification(when=NOW + offset), keys.key), fetcher)


def test_a_longer_max_age_admits_older_messages_only(keys: SigningKeys, fetcher: Fetcher) -> None:
    """The SQS reader's window: a message that waited days in a queue is still authentic,
    one from the future never is."""
    old = sign(notification(when=NOW - timedelta(days=3)), keys.key)
    assert "more than an hour" in _refusal(old, fetcher).reason
    verify(old, fetcher, max_age=sns.SQS_MAX_AGE)
    ancient = sign(notification(when=NOW - sns.SQS_MAX_AGE - timedelta(minutes=1)), keys.key)
    err = _refusal(ancient, fetcher, max_age=sns.SQS_MAX_AGE)
    assert "more than 14 days" in err.reason
    ahead = sign(notification(when=NOW + timedelta(hours=2)), keys.key)
    assert "more than an hour" in _refusal(ahead, fetcher, max_age=sns.SQS_MAX_AGE).reason


def test_topic_not_allowed(keys: SigningKeys, fetcher: Fetcher) -> None:
    other = "arn:aws:sns:us-east-1:999999999999:someone-else"
    err = _refusal(sign(notification(topic=other), keys.key), fetcher)
    assert other in err.reason and fetcher.calls == []


def test_empty_topic_list_refuses_all_with_a_clear_log(
    keys: SigningKeys, fetcher: Fetcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="worker.sns")
    err = _refusal(
        sign(notification(), keys.key), fetcher, settings=load_settings(sns_topic_arns=[])
    )
    assert "PAPERMAIL_SNS_TOPIC_ARNS is empty" in err.reason
    assert "PAPERMAIL_SNS_TOPIC_ARNS is empty: every SNS message is refused" in caplog.text


@pytest.mark.parametrize(
    "url",
    [
        "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem",
        "https://sns.us-east-1.amazonaws.com.evil.com/SimpleNotificationService-test.pem",
        "https://attacker.s3.amazonaws.com/SimpleNotificationService-test.pem",
    ],
)
def test_bad_cert_url_is_never_fetched(keys: SigningKeys, url: str) -> None:
    fetcher = Fetcher({url: keys.pem})  # the attacker's host would serve a valid-looking key
    err = _refusal(sign(notification(cert_url=url), keys.key), fetcher)
    assert "SigningCertURL" in err.reason and fetcher.calls == []


def test_unreachable_certificate_is_retryable(keys: SigningKeys) -> None:
    err = _refusal(sign(notification(), keys.key), Fetcher({}))
    assert err.kind == "unavailable" and err.retryable


def test_not_a_certificate(keys: SigningKeys) -> None:
    err = _refusal(sign(notification(), keys.key), Fetcher({CERT_URL: b"<html>hi</html>"}))
    assert err.kind == "refused" and "not a PEM certificate" in err.reason


def test_expired_certificate(keys: SigningKeys) -> None:
    old = make_certificate(
        keys.key,
        not_before=NOW - timedelta(days=30),
        not_after=NOW - timedelta(days=1),
    )
    err = _refusal(sign(notification(), keys.key), Fetcher({CERT_URL: old}))
    assert "not valid now" in err.reason


def test_region_of_topic() -> None:
    assert sns.region_of_topic(TOPIC) == "us-east-1"
    assert sns.region_of_topic("arn:aws-cn:sns:cn-north-1:1:t") == "cn-north-1"
    with pytest.raises(ValueError, match="not an SNS topic ARN"):
        sns.region_of_topic("arn:aws:sqs:us-east-1:1:q")


# --- the default fetcher, against a real local HTTP server ---------------------------------


@pytest.fixture
def cert_server(keys: SigningKeys) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/cert.pem":
                body = keys.pem
            elif self.path == "/big.pem":
                body = b"x" * (sns.MAX_CERT_BYTES + 10)
            elif self.path == "/redirect.pem":
                self.send_response(302)
                self.send_header("Location", "/cert.pem")
                self.end_headers()
                return
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_default_fetcher(cert_server: str, keys: SigningKeys) -> None:
    assert sns.default_cert_fetcher(f"{cert_server}/cert.pem") == keys.pem
    with pytest.raises(OSError, match="larger than"):
        sns.default_cert_fetcher(f"{cert_server}/big.pem")
    with pytest.raises(OSError):  # redirects are not followed
        sns.default_cert_fetcher(f"{cert_server}/redirect.pem")
    with pytest.raises(OSError):
        sns.default_cert_fetcher(f"{cert_server}/missing.pem")
