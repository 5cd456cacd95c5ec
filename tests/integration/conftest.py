"""Fixtures for integration tests: real servers on free ports.

Sections are owned by topic; add yours in a new section rather than editing others.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest

from worker.message import OutgoingMessage


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# =====================================================================================
# Mailers: outgoing messages, moto (server mode), the fault-injecting SES, aiosmtpd
# =====================================================================================

MAIL_SENDER = "digest@papermail.example"
MAIL_RECIPIENT = "reader@example.org"
MAIL_SECRET_KEY = "test-secret-key-for-mailer-tests-0123456789abcdef"
AWS_TEST_KEY_ID = "AKIATESTPAPERMAIL000"
AWS_TEST_SECRET = "papermail/test+secret/DoNotLogMe0123456789abc"


def build_message(
    *,
    body: str = "Hello reader, here are today's papers.",
    recipient: str = MAIL_RECIPIENT,
    sender: str = MAIL_SENDER,
    subject: str = "Your papers for 2026-11-27",
    tags: dict[str, str] | None = None,
    html: str | None = None,
    cte: str | None = None,
) -> OutgoingMessage:
    """A real RFC 5322 message built with the email package (independent of rendering)."""
    msg = EmailMessage(policy=SMTP)  # CRLF line endings, as rendering produces
    msg["From"] = f"papermail <{sender}>"
    msg["To"] = recipient
    msg["Subject"] = subject
    message_id = make_msgid(domain="papermail.example")
    msg["Message-ID"] = message_id
    if cte:
        msg.set_content(body, cte=cte)
    else:
        msg.set_content(body)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    return OutgoingMessage(
        sender=sender,
        recipient=recipient,
        subject=subject,
        message_id=message_id,
        raw=msg.as_bytes(),
        text=body,
        html=html or "",
        tags=dict(tags) if tags is not None else {"delivery_id": "42", "edition": "2026-11-27"},
    )


@pytest.fixture
def make_message() -> Callable[..., OutgoingMessage]:
    return build_message


@pytest.fixture
def mailer_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """``mailer_env("ses", SES_ENDPOINT_URL=...)`` -> fresh Settings for that mailer.

    Sets a non-development secret key, an https BASE_URL and a postal address (all refused
    otherwise for ses/smtp) and test AWS keys.
    """
    from worker import config

    def configure(mailer: str, **values: object) -> config.Settings:
        base = {
            "MAILER": mailer,
            "POSTAL_ADDRESS": "Example Lab, 1 Main Street, Springfield, USA",
            "SECRET_KEY": MAIL_SECRET_KEY,
            "AWS_ACCESS_KEY_ID": AWS_TEST_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": AWS_TEST_SECRET,
            "SEND_TIMEOUT_SECONDS": "5",
            # Real mailers need a public https address; links are never fetched.
            "BASE_URL": "https://papermail.example.org",
        }
        base.update({key: str(value) for key, value in values.items()})
        for key, value in base.items():
            monkeypatch.setenv(config.ENV_PREFIX + key, value)
        config.reset_settings()
        return config.get_settings()

    return configure


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto in server mode, as a real process on a free port; yields its URL.

    Shared by the whole session: never reset it globally (other tests' state lives
    there too); take snapshots instead, as ``moto_ses`` does.
    """
    port = free_port()
    workdir = tmp_path_factory.mktemp("moto")
    env = {
        **os.environ,
        "MOTO_RECORDER_FILEPATH": str(workdir / "recording.jsonl"),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    log = open(workdir / "moto.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=workdir,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/moto-api/data.json", timeout=30, proc=proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@dataclass
class MotoSes:
    """SES inside the moto server: what it stored, and what requests reached it."""

    url: str
    _known_ids: set[str]

    def _post(self, path: str) -> bytes:
        req = urllib.request.Request(self.url + path, data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return bytes(resp.read())

    def sent(self) -> list[dict[str, Any]]:
        """Messages moto stored since this test began (id, source, destinations, raw_data)."""
        with urllib.request.urlopen(self.url + "/moto-api/data.json", timeout=10) as resp:
            data = json.load(resp)
        stored = data.get("ses", {}).get("RawMessage", [])
        return [m for m in stored if m["id"] not in self._known_ids]

    def send_requests(self) -> list[dict[str, Any]]:
        """JSON bodies of the SendEmail requests moto received during this test."""
        import base64

        text = self._post("/moto-api/recorder/download-recording").decode()
        bodies = []
        for line in text.splitlines():
            entry = json.loads(line)
            if not entry["url"].endswith("/v2/email/outbound-emails"):
                continue
            body = entry.get("body") or ""
            raw = base64.b64decode(body) if entry.get("body_encoded") else body.encode()
            bodies.append(json.loads(raw))
        return bodies


@pytest.fixture
def moto_ses(moto_server: str) -> Iterator[MotoSes]:
    """moto's SES with the test sender's domain verified, recording this test's requests."""
    import boto3
    import botocore.exceptions

    client = boto3.client(
        "sesv2",
        endpoint_url=moto_server,
        region_name="us-east-1",
        aws_access_key_id=AWS_TEST_KEY_ID,
        aws_secret_access_key=AWS_TEST_SECRET,
    )
    domain = MAIL_SENDER.split("@", 1)[1]
    try:
        client.create_email_identity(EmailIdentity=domain)
    except botocore.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] != "AlreadyExistsException":
            raise
    client.close()
    ses = MotoSes(moto_server, set())
    ses._known_ids = {m["id"] for m in ses.sent()}
    ses._post("/moto-api/recorder/reset-recording")
    ses._post("/moto-api/recorder/start-recording")
    try:
        yield ses
    finally:
        ses._post("/moto-api/recorder/stop-recording")


@pytest.fixture
def fake_ses() -> Iterator[Any]:
    """The fault-injecting SES-compatible server (tests/integration/fake_ses.py)."""
    from tests.integration.fake_ses import FakeSes

    server = FakeSes().start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class SmtpReceived:
    sender: str
    recipients: list[str]
    raw: bytes


class SmtpSink:
    """aiosmtpd handler: stores every message; programmable replies and disconnects."""

    def __init__(self) -> None:
        self.messages: list[SmtpReceived] = []
        self.rcpt_replies: list[str] = []  # next RCPT answers (e.g. "451 4.3.0 try later")
        self.data_replies: list[str] = []  # next end-of-DATA answers, or "DROP" / "SLOW:<s>"
        self.sessions = 0  # EHLO/HELO greetings: SMTP sessions clients opened

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        self.sessions += 1
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.rcpt_replies:
            return self.rcpt_replies.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        import asyncio

        reply = self.data_replies.pop(0) if self.data_replies else "250 OK"
        if reply.startswith("5") or reply.startswith("4"):
            return reply
        # Accepted: the message counts as received whatever happens to the answer.
        self.messages.append(
            SmtpReceived(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content))
        )
        if reply == "DROP":
            server.transport.close()
            return "250 OK"  # never reaches the client
        if reply.startswith("SLOW:"):
            await asyncio.sleep(float(reply.split(":", 1)[1]))
            return "250 OK"
        return reply

    def copies(self, raw: bytes) -> int:
        return sum(1 for m in self.messages if m.raw == raw)


@dataclass
class SmtpServer:
    host: str
    port: int
    sink: SmtpSink
    controller: Any


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A real SMTP server (aiosmtpd) on a free port; plain text, no auth."""
    from aiosmtpd.controller import Controller

    sink = SmtpSink()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    server = SmtpServer("127.0.0.1", controller.port, sink, controller)
    try:
        yield server
    finally:
        server.controller.stop()  # a test may have replaced it (restart)


def write_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM), for STARTTLS tests."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    # OpenSSL checks validity on the operating system's clock, which CI's time-shifted
    # pass does not move: a window valid on any clock this suite may run on.
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2099, 12, 31, tzinfo=datetime.UTC))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# =====================================================================================
# A redis-server of our own (broker loss, chaos): killed and restarted by the tests
# =====================================================================================


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Any]:
    """A fresh redis-server on a free port (no persistence); never the shared one."""
    from tests.integration.redis_server import RedisServer

    try:
        server = RedisServer(tmp_path / "redis").start()
    except RuntimeError as exc:
        from tests.conftest import skip_loudly

        skip_loudly(f"cannot start a redis-server of our own: {exc}")
    try:
        yield server
    finally:
        server.stop()
