"""Amazon SES (or any SES-compatible API) through boto3's ``sesv2`` ``SendEmail``, raw MIME.

The request itself goes out through :mod:`worker.mailers.ses_http` (the same signed
request without botocore's per-call CPU) whenever that reproduces botocore's behaviour;
credentials, endpoint, error parsing and the error kinds are botocore's either way.

One botocore client per mailer (so per process, see ``get_mailer``), shared by the threads
of that process: botocore clients are thread-safe and pool their connections. SDK retries
are OFF: if SendEmail timed out after the request left, a retry could send the email twice;
the delivery layer retries only what is known not to have gone out.
"""

from __future__ import annotations

import email.utils
import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

import boto3
import botocore.exceptions as bx
import botocore.session
from botocore.config import Config

from worker.clock import utcnow
from worker.config import ConfigError, Settings
from worker.mailers import ses_http
from worker.mailers.base import AccountInfo, Mailer, SendResult
from worker.mailers.errors import (
    AccountError,
    AmbiguousError,
    MailerError,
    PermanentError,
    ThrottledError,
    TransientError,
)
from worker.mailers.ses_http import SendEmailTransport
from worker.message import OutgoingMessage

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 5.0
# GetAccount / GetSendQuota: a question, never a message; asked before editions and by
# health. Short and never retried, so a provider that is away costs seconds, not minutes.
ACCOUNT_CONNECT_TIMEOUT_SECONDS = 2.0
ACCOUNT_READ_TIMEOUT_SECONDS = 3.0
# At least the sends in flight of one worker process (the threads sharing the client).
MIN_POOL_CONNECTIONS = 50

# SES message tags: ASCII letters, digits, "_", "-", "." and "@"; at most 256 characters.
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_.@-]")
_TAG_MAX = 256
_PARAM_VALUE = re.compile(r"value: .*?, type:", re.DOTALL)

_THROTTLED_CODES = frozenset({"TooManyRequestsException", "Throttling", "ThrottlingException"})
_ACCOUNT_CODES = frozenset(
    {
        "AccountSuspendedException",
        "SendingPausedException",
        "LimitExceededException",
        # Credentials or configuration every message shares: nothing will get through.
        "NotFoundException",
        "ConfigurationSetDoesNotExist",
        "AccessDenied",
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "IncompleteSignature",
        "MissingAuthenticationToken",
    }
)
_PERMANENT_CODES = frozenset(
    {
        "MessageRejected",
        "BadRequestException",
        "InvalidParameterValue",
        "ValidationError",
        "ValidationException",
        "MailFromDomainNotVerifiedException",
        "MailFromDomainNotVerified",
        "InvalidRequest",
    }
)
_TRANSIENT_CODES = frozenset(
    {"InternalFailure", "InternalServerError", "ServiceUnavailable", "ServiceUnavailableException"}
)
# Messages that decide the kind whatever the code (SES v1 reports the daily quota as
# "Throttling", and the sandbox's unverified recipients as MessageRejected).
_ACCOUNT_PHRASES = ("daily message quota", "sending paused", "account suspended")


def tag_value(value: object) -> str:
    """A value SES accepts as a message-tag name or value."""
    cleaned = _TAG_UNSAFE.sub("_", str(value))[:_TAG_MAX]
    return cleaned or "_"


def email_tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Name": tag_value(name), "Value": tag_value(value)} for name, value in tags.items()]


class SesMailer(Mailer):
    name = "ses"
    reports_quota = True
    non_ascii_local_part = (
        "Amazon SES accepts only ASCII before the @ (it does not support SMTPUTF8)"
    )

    def __init__(self, settings: Settings, client: Any | None = None) -> None:
        super().__init__(settings)
        self.settings = settings
        self.configuration_set = settings.ses_configuration_set
        self.transport: SendEmailTransport | None = None
        self._client = client
        self._client_lock = threading.Lock()
        self._session: boto3.session.Session | None = None
        # The account questions' own clients (sesv2, and ses v1 for endpoints without
        # GetAccount), built on first use; once an endpoint answered 404 to GetAccount,
        # it is asked GetSendQuota directly.
        self._account_clients: dict[str, Any] = {}
        self._no_get_account = False
        if client is not None:  # the caller's own client: every call goes through it
            return
        botocore_session = botocore.session.Session()
        self._session = _session(settings, botocore_session)
        direct = ses_http.direct_endpoint(
            botocore_session, settings.ses_region, settings.ses_endpoint_url
        )
        if direct is not None:
            # The hot path: the same request, signed with the same credentials, without
            # botocore's per-call machinery (see worker/mailers/ses_http.py).
            endpoint_url, ca_bundle = direct
            self.transport = SendEmailTransport(
                endpoint_url,
                ca_bundle,
                settings.ses_region,
                self._session.get_credentials(),
                connect_timeout=_connect_timeout(settings),
                read_timeout=settings.send_timeout_seconds,
                pool_size=_pool_size(settings),
            )

    @property
    def client(self) -> Any:
        """The botocore client, built on first use (only where the direct path does not
        apply, or when asked for)."""
        with self._client_lock:
            if self._client is None:
                self._client = make_client(self.settings, self._session)
            return self._client

    def request_for(self, message: OutgoingMessage) -> dict[str, Any]:
        """The SendEmail arguments for ``message`` (tags come from ``message.tags``)."""
        kwargs: dict[str, Any] = {
            "FromEmailAddress": message.sender,
            "Destination": {"ToAddresses": [message.recipient]},
            "Content": {"Raw": {"Data": message.raw}},
        }
        if self.configuration_set:
            kwargs["ConfigurationSetName"] = self.configuration_set
        if message.tags:
            kwargs["EmailTags"] = email_tags(message.tags)
        return kwargs

    def _send(self, message: OutgoingMessage) -> SendResult:
        sender = self.transport or self.client
        try:
            response = sender.send_email(**self.request_for(message))
        except (bx.ClientError, bx.BotoCoreError) as exc:
            error = classify(exc)
            log.warning(
                "SES refused %s (delivery %s): %s [%s]",
                _mask(message.recipient),
                message.tags.get("delivery_id", "-"),
                error.reason,
                error.kind,
            )
            # ParamValidationError quotes the offending value (maybe the body): don't chain it.
            raise error from (None if isinstance(exc, bx.ParamValidationError) else exc)
        message_id = response.get("MessageId") if isinstance(response, dict) else None
        if not message_id:
            # Accepted (HTTP 200) but no id: it probably went out; never send it again.
            raise AmbiguousError("SES answered without a MessageId", code="NoMessageId")
        return SendResult(message_id)

    def account(self) -> AccountInfo:
        """sesv2 ``GetAccount``, one attempt with short timeouts (2 s to connect, 3 s to
        answer), through a client of its own: never the sending client's retries or its
        SEND_TIMEOUT_SECONDS.

        An SES-compatible API without it (answering 404, as moto's server does) is asked
        SES v1's ``GetSendQuota`` instead: the same rate and quota, nothing about the sandbox.
        """
        if not self._no_get_account:
            try:
                answer = self._account_client("sesv2").get_account()
            except bx.ClientError as exc:
                if not _unsupported(exc) or self._session is None:
                    raise classify(exc) from exc
                self._no_get_account = True
            except bx.BotoCoreError as exc:
                raise classify(exc) from exc
            else:
                return account_from_get_account(answer, self.settings.ses_region)
        return self._account_v1()

    def _account_client(self, service: str) -> Any:
        with self._client_lock:
            client = self._account_clients.get(service)
            if client is None:
                if self._session is None:  # the caller's own client answers everything
                    assert self._client is not None
                    return self._client
                client = self._session.client(
                    service,
                    endpoint_url=self.settings.ses_endpoint_url or None,
                    config=_account_config(),
                )
                self._account_clients[service] = client
            return client

    def _account_v1(self) -> AccountInfo:
        try:
            quota = self._account_client("ses").get_send_quota()
        except (bx.ClientError, bx.BotoCoreError) as exc:
            raise classify(exc) from exc
        return account_info(
            self.settings.ses_region,
            source="SES v1 GetSendQuota (this endpoint has no sesv2 GetAccount)",
            quota=quota,
            sending_enabled=None,
        )

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self._client is not None:
            self._client.close()
        for client in self._account_clients.values():
            client.close()


def _pool_size(settings: Settings) -> int:
    return max(MIN_POOL_CONNECTIONS, settings.concurrency)


def _connect_timeout(settings: Settings) -> float:
    return min(CONNECT_TIMEOUT_SECONDS, settings.send_timeout_seconds)


def _session(settings: Settings, botocore_session: Any = None) -> boto3.session.Session:
    key_id, secret = settings.aws_access_key_id, settings.aws_secret_access_key
    if bool(key_id) != bool(secret):
        raise ConfigError(
            "PAPERMAIL_AWS_ACCESS_KEY_ID and PAPERMAIL_AWS_SECRET_ACCESS_KEY must be set "
            "together (or neither, to use the standard AWS credential chain)"
        )
    # A private Session: boto3's default session is not safe to share between threads.
    return boto3.session.Session(
        aws_access_key_id=key_id or None,
        aws_secret_access_key=secret or None,
        region_name=settings.ses_region,
        botocore_session=botocore_session,
    )


def make_client(settings: Settings, session: boto3.session.Session | None = None) -> Any:
    """A sesv2 client: retries off, short connect timeout, pool >= concurrency."""
    session = session or _session(settings)
    return session.client(
        "sesv2", endpoint_url=settings.ses_endpoint_url or None, config=_config(settings)
    )


def _config(settings: Settings) -> Config:
    return Config(
        # total_max_attempts counts the first try; botocore's "max_attempts" counts RETRIES,
        # so {"max_attempts": 1} would still send a throttled or timed-out email twice.
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=_connect_timeout(settings),
        read_timeout=settings.send_timeout_seconds,
        max_pool_connections=_pool_size(settings),
        tcp_keepalive=True,
    )


def _account_config() -> Config:
    # One attempt (botocore's total_max_attempts counts the first try), short timeouts.
    return Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=ACCOUNT_CONNECT_TIMEOUT_SECONDS,
        read_timeout=ACCOUNT_READ_TIMEOUT_SECONDS,
        max_pool_connections=1,
    )


def _unsupported(exc: bx.ClientError) -> bool:
    """The endpoint does not implement the operation (not: the account may not call it)."""
    response: dict[str, Any] = exc.response or {}
    code = str((response.get("Error") or {}).get("Code") or "")
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    return status in (404, 501) or code in {"UnknownOperationException", "NotImplemented"}


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def account_info(
    region: str,
    *,
    source: str,
    quota: Mapping[str, Any],
    sending_enabled: bool | None,
    production_access: bool | None = None,
    enforcement_status: str | None = None,
    details: dict[str, str] | None = None,
) -> AccountInfo:
    """The figures of a ``SendQuota`` (v2) or ``GetSendQuota`` (v1) answer, with what is
    wrong in words: each problem or warning says what to do."""
    max_24h = _number(quota.get("Max24HourSend"))
    sent = _number(quota.get("SentLast24Hours"))
    problems: list[str] = []
    warnings: list[str] = []
    if sending_enabled is False:
        problems.append(
            f"sending is disabled for the SES account in {region} (paused by an operator or "
            "by SES); fix the cause, then `aws sesv2 put-account-sending-attributes "
            "--sending-enabled`"
        )
    status = (enforcement_status or "").upper()
    if status == "SHUTDOWN":
        problems.append(
            f"SES has shut down sending for the account in {region} (enforcement status "
            "SHUTDOWN); see the SES console's reputation metrics and contact AWS support"
        )
    elif status == "PROBATION":
        warnings.append(
            f"the SES account in {region} is on probation (bounces or complaints too high); "
            "see `papermail stats` and the SES console's reputation metrics before it is shut down"
        )
    if production_access is False:
        warnings.append(
            f"the SES account in {region} is in the sandbox: only verified addresses receive "
            "mail, at most 200 a day; request production access in the SES console "
            "(Account dashboard)"
        )
    if max_24h is not None and max_24h >= 0 and sent is not None and sent >= max_24h:
        problems.append(
            f"the 24-hour sending quota is used up ({sent:,.0f} of {max_24h:,.0f}); sending "
            "resumes as the rolling window frees up; ask AWS for a higher quota (Service "
            "Quotas: Amazon SES, Sending quota)"
        )
    return AccountInfo(
        mailer="ses",
        sending_enabled=sending_enabled,
        production_access=production_access,
        max_send_rate=_number(quota.get("MaxSendRate")),
        max_24h_send=max_24h,
        sent_last_24h=sent,
        enforcement_status=enforcement_status,
        source=source,
        details={"region": region, **(details or {})},
        problems=tuple(problems),
        warnings=tuple(warnings),
    )


def account_from_get_account(answer: Mapping[str, Any], region: str) -> AccountInfo:
    """An ``AccountInfo`` from a sesv2 ``GetAccount`` answer."""
    details: dict[str, str] = {}
    review = (answer.get("Details") or {}).get("ReviewDetails") or {}
    if review.get("Status"):
        details["production_access_review"] = str(review["Status"])
    enabled = answer.get("SendingEnabled")
    production = answer.get("ProductionAccessEnabled")
    status = answer.get("EnforcementStatus")
    return account_info(
        region,
        source="sesv2 GetAccount",
        quota=answer.get("SendQuota") or {},
        sending_enabled=enabled if isinstance(enabled, bool) else None,
        production_access=production if isinstance(production, bool) else None,
        enforcement_status=str(status) if status else None,
        details=details,
    )


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), if any."""
    value = headers.get("retry-after") or headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - utcnow()).total_seconds())


def classify(exc: Exception) -> MailerError:
    """Map a botocore failure to the error kind that decides the delivery's fate."""
    if isinstance(exc, bx.ClientError):
        return _classify_client_error(exc)
    if isinstance(exc, bx.ReadTimeoutError):
        return AmbiguousError(
            f"no answer from SES within the read timeout: {exc}", code="ReadTimeout"
        )
    if isinstance(exc, bx.HTTPClientError):
        # ConnectionClosedError and the like: the request was (or may have been) sent.
        return AmbiguousError(f"connection to SES lost: {exc}", code=type(exc).__name__)
    if isinstance(exc, bx.ConnectionError):
        # Refused, unresolvable, connect timeout, proxy or TLS handshake: it never left.
        return TransientError(f"could not connect to SES: {exc}", code=type(exc).__name__)
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError | bx.NoRegionError):
        return AccountError(f"SES is not configured: {exc}", code=type(exc).__name__)
    if isinstance(exc, bx.ParamValidationError):
        # botocore quotes the offending value, which may be the message itself.
        report = _PARAM_VALUE.sub("value: (redacted), type:", str(exc))
        return PermanentError(f"invalid SendEmail request: {report}", code="ParamValidation")
    # Unknown botocore failure: we cannot tell whether it left, so assume it might have.
    return AmbiguousError(f"SES call failed: {exc}", code=type(exc).__name__)


def _classify_client_error(exc: bx.ClientError) -> MailerError:
    response: dict[str, Any] = exc.response or {}
    error = response.get("Error") or {}
    meta = response.get("ResponseMetadata") or {}
    code = str(error.get("Code") or "Unknown")
    message = str(error.get("Message") or "").strip()
    status = int(meta.get("HTTPStatusCode") or 0)
    reason = f"{code}: {message}" if message else code
    lowered = message.lower()

    if any(phrase in lowered for phrase in _ACCOUNT_PHRASES) or code in _ACCOUNT_CODES:
        return AccountError(reason, code=code)
    if code in _THROTTLED_CODES or status == 429:
        return ThrottledError(
            reason, code=code, retry_after=_retry_after(meta.get("HTTPHeaders") or {})
        )
    if code in _PERMANENT_CODES or "not verified" in lowered:
        return PermanentError(reason, code=code)
    if status == 504:
        # A gateway gave up waiting for SES: the request reached it and may have been sent.
        return AmbiguousError(reason, code=code)
    if code in _TRANSIENT_CODES or status >= 500:
        return TransientError(
            reason, code=code, retry_after=_retry_after(meta.get("HTTPHeaders") or {})
        )
    if 400 <= status < 500:
        return PermanentError(reason, code=code)
    return TransientError(reason, code=code)


def _mask(address: str) -> str:
    """``jane@example.com`` -> ``j***@example.com``: enough to correlate, not to harvest."""
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}"


class _RedactBotocoreRequests(logging.Filter):
    """botocore logs whole requests at DEBUG: the email body and the access key id.

    Keep the line (useful when debugging connectivity) but drop its arguments.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("Making request for"):
            operation = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg, record.args = "Making request for %s (params redacted)", (operation,)
        elif msg.startswith("Sending http request"):
            record.msg, record.args = "Sending http request (redacted)", ()
        return True


def _install_log_redaction() -> None:
    logger = logging.getLogger("botocore.endpoint")
    if not any(isinstance(f, _RedactBotocoreRequests) for f in logger.filters):
        logger.addFilter(_RedactBotocoreRequests())


_install_log_redaction()
