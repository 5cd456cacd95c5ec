"""The one typed settings object. Nothing else in papermail reads the environment.

Every setting is a ``PAPERMAIL_*`` variable (also read from ``.env``). Defaults are those
of the embedded mode: SQLite file, no broker (in-process), outbox mailer.
"""

from __future__ import annotations

import ipaddress
import math
import re
from datetime import time
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.redact import HIDDEN, redact_url

# Refused whenever mail can leave the machine (MAILER != outbox).
DEV_SECRET_KEY = "dev-insecure-papermail-secret-change-me"
# The outbox's stand-in for PAPERMAIL_POSTAL_ADDRESS (a real mailer refuses to start without one).
SAMPLE_POSTAL_ADDRESS = (
    "papermail demo, 1 Sample Street, Example City (set PAPERMAIL_POSTAL_ADDRESS)"
)

ENV_PREFIX = "PAPERMAIL_"

# Never echoed in an error message, whatever their value.
SECRET_FIELDS = frozenset(
    {
        "secret_key",
        "aws_secret_access_key",
        "aws_access_key_id",
        "smtp_password",
        "metrics_token",
        # A Slack or Mattermost incoming-webhook URL is itself the credential.
        "alert_webhook_url",
    }
)

MAX_SEND_CONCURRENCY = 256
# What the automatic SEND_CONCURRENCY plans for: a provider answering within this long,
# and this many worker processes (the Procfile's default) sharing the rate.
AUTO_CONCURRENCY_LATENCY_SECONDS = 0.1
AUTO_CONCURRENCY_PROCESSES = 4
AUTO_CONCURRENCY_MAX = 32


class ConfigError(Exception):
    """A setting has an invalid value; the message names the variable."""


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # Storage and queue
    database_url: str = "sqlite:///papermail.db"
    broker_url: str | None = None
    # Mail
    mailer: Literal["outbox", "ses", "smtp"] = "outbox"
    outbox_dir: Path = Path("outbox")
    from_address: str = "papermail <digest@papermail.localhost>"
    reply_to: str | None = None
    list_id: str = "papermail daily papers <digest.papermail.localhost>"
    unsubscribe_mailto: str | None = None
    template_cache_dir: Path | None = None  # unset: ~/.cache/papermail/templates
    # The sender's postal address, in every digest's footer (CAN-SPAM); required with a real
    # mailer, a sample one stands in for the outbox (see `postal_address_line`).
    postal_address: str | None = None
    # A digest's HTML stays under this many bytes (Gmail clips at 102 KB and hides what
    # follows, the unsubscribe footer included): abstracts shorten, then the last papers
    # move to a "more on the web" link.
    email_max_bytes: int = Field(default=90 * 1024, ge=20 * 1024, le=10 * 1024 * 1024)
    base_url: str = "http://localhost:8000"
    # Comma-separated; the first key signs, all of them verify (key rotation).
    secret_key: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [DEV_SECRET_KEY])
    # SES
    ses_endpoint_url: str | None = None
    ses_region: str = "us-east-1"
    ses_configuration_set: str | None = None
    ses_max_message_bytes: int = Field(default=40 * 1024 * 1024, gt=0)
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    # SMTP
    smtp_host: str = "localhost"
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = True
    # Sending
    # Emails per second, all workers together. Unset with MAILER=ses: the account's own
    # maximum send rate (GetAccount), asked again every ACCOUNT_REFRESH_SECONDS; 14 until
    # the first answer and whenever SES cannot be asked.
    send_rate: float = Field(default=14.0, gt=0)
    account_refresh_seconds: int = Field(default=600, ge=30, le=86400)
    send_burst: int = Field(default=0, ge=0)  # 0: about one second's worth
    # Sends in flight per worker process (threads sharing the one mailer); 0: sized from
    # SEND_RATE (see `concurrency`).
    send_concurrency: int = Field(default=0, ge=0, le=MAX_SEND_CONCURRENCY)
    chunk_size: int = Field(default=200, ge=1, le=5000)
    max_attempts: int = Field(default=5, ge=1, le=50)
    retry_base_seconds: float = Field(default=30.0, gt=0)
    sending_timeout_seconds: int = Field(default=900, ge=30)
    send_timeout_seconds: float = Field(default=20.0, gt=0)
    # Every 15 minutes, so zones with :30 and :45 offsets get their hour on time too.
    plan_interval_minutes: int = Field(default=15, ge=1, le=1440)
    # The recovery sweep (stale `sending` -> `unknown`, lost or unpublished tasks queued
    # again): after a broker loss every pending delivery is queued again within this.
    sweep_interval_seconds: int = Field(default=60, ge=1, le=3600)
    # Selection
    lookback_daily_hours: int = Field(default=48, ge=1)
    lookback_weekly_hours: int = Field(default=192, ge=1)
    min_relevance: float = Field(default=0.15, ge=0)
    # Provider events
    sns_topic_arns: Annotated[list[str], NoDecode] = Field(default_factory=list)
    sns_require_signature_v2: bool = False
    sqs_queue_url: str | None = None
    # SNS envelopes read from SQS are verified like the webhook's; raw-message-delivery
    # bodies cannot be, so they are refused while this is on (README: Bounces, complaints).
    sqs_verify_signatures: bool = True
    # Receive loops of the SQS consumer side by side (each applies its receive as a batch).
    sqs_receivers: int = Field(default=4, ge=1, le=32)
    # SNS/SQS endpoints for SNS- and SQS-compatible services (unset: AWS).
    sns_endpoint_url: str | None = None
    sqs_endpoint_url: str | None = None
    soft_bounce_limit: int = Field(default=3, ge=1)
    bounce_rate_limit: float = Field(default=0.05, gt=0, le=1)
    complaint_rate_limit: float = Field(default=0.001, gt=0, le=1)
    reputation_min_sample: int = Field(default=200, ge=1)
    orphan_grace_seconds: int = Field(default=300, ge=0)
    # Papers arrive by themselves (worker.papers.fetch): the beat fetches each source at
    # FETCH_AT (UTC) and again every 15 minutes until it has succeeded for the day.
    sources: Annotated[list[Literal["hf", "arxiv"]], NoDecode] = Field(
        default_factory=lambda: ["hf"]
    )
    hf_api_url: str = "https://huggingface.co/api/daily_papers"
    arxiv_api_url: str = "https://export.arxiv.org/api/query"
    arxiv_categories: Annotated[list[str], NoDecode] = Field(default_factory=list)
    arxiv_max_results: int = Field(default=2000, ge=1, le=30000)
    # arXiv asks for no more than one request every 3 seconds.
    arxiv_delay_seconds: float = Field(default=3.0, ge=3.0, le=60.0)
    fetch_at: str = "05:00"
    fetch_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    fetch_retries: int = Field(default=4, ge=0, le=10)  # after the first attempt
    fetch_max_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    # An edition whose day's papers have not arrived by its send time waits this long,
    # then goes ahead as FETCH_MISSED says: `skip` ("no papers fetched today") or `send`
    # (with the papers that did arrive for the day, if any; never only older ones).
    fetch_wait_minutes: int = Field(default=180, ge=0, le=1440)
    fetch_missed: Literal["skip", "send"] = "skip"
    # Logs (worker.logs): `text` lines or `json` (one object per line); email addresses in
    # them are replaced by [address] unless LOG_ADDRESSES is on.
    log_format: Literal["text", "json"] = "text"
    log_addresses: bool = False
    # Monitoring (worker.metrics, worker.alerts)
    # Celery prefork: each process writes its counters here (prometheus_client's
    # multiprocess mode); whoever serves /metrics on the host reads them all. One
    # directory per host, emptied before the workers start.
    metrics_dir: Path | None = None
    metrics_token: str | None = None  # bearer token /metrics asks for; unset: open
    # The Celery worker's parent serves its processes' metrics on this port (unset: none).
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    alert_webhook_url: str | None = None  # Slack/Mattermost incoming webhook
    alert_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    alert_retries: int = Field(default=3, ge=0, le=10)
    alert_check_minutes: int = Field(default=5, ge=1, le=60)
    # An edition is late when a delivery is still pending or sending this long after it
    # was planned (or let go after waiting for the day's papers).
    edition_deadline_minutes: int = Field(default=240, ge=5, le=2880)
    # Warn well before SES's review levels (BOUNCE_RATE_LIMIT / COMPLAINT_RATE_LIMIT).
    bounce_rate_warning: float = Field(default=0.025, gt=0, le=1)
    complaint_rate_warning: float = Field(default=0.0005, gt=0, le=1)
    # Web
    subscribe_rate_per_hour: int = Field(default=5, ge=1)
    trusted_proxies: int = Field(default=0, ge=0, le=5)  # reverse proxies in front of web

    @field_validator("secret_key", "sns_topic_arns", "sources", "arxiv_categories", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @field_validator("arxiv_categories")
    @classmethod
    def _arxiv_categories(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[a-z][a-z\-]*(?:\.[A-Za-z][A-Za-z\-]*)?", name):
                raise ValueError(f"{name!r} is not an arXiv category (e.g. cs.LG,cs.CL)")
        return list(dict.fromkeys(value))

    @field_validator("hf_api_url", "arxiv_api_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment: papermail adds the query")
        return value

    @field_validator("fetch_at")
    @classmethod
    def _fetch_at(cls, value: str) -> str:
        match = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", value.strip())
        if not match:
            raise ValueError("must be a UTC time of day HH:MM, e.g. 05:00")
        return f"{int(match.group(1)):02d}:{match.group(2)}"

    @model_validator(mode="after")
    def _arxiv_needs_categories(self) -> Settings:
        if "arxiv" in self.sources and not self.arxiv_categories:
            raise ValueError(
                "PAPERMAIL_SOURCES includes arxiv but PAPERMAIL_ARXIV_CATEGORIES is empty; "
                "name the categories to fetch, e.g. cs.LG,cs.CL"
            )
        return self

    @field_validator("alert_webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL (a Slack or Mattermost webhook)")
        return value

    @field_validator("metrics_token")
    @classmethod
    def _metrics_token(cls, value: str | None) -> str | None:
        if value is not None and value.strip() != value:
            raise ValueError("must not start or end with spaces")
        if value is not None and len(value) < 16:
            raise ValueError("must be at least 16 characters (or unset for an open /metrics)")
        return value or None

    @model_validator(mode="after")
    def _warnings_below_limits(self) -> Settings:
        for warn, limit in (
            ("bounce_rate_warning", "bounce_rate_limit"),
            ("complaint_rate_warning", "complaint_rate_limit"),
        ):
            if getattr(self, warn) >= getattr(self, limit):
                raise ValueError(
                    f"{ENV_PREFIX}{warn.upper()} ({getattr(self, warn)}) must be below "
                    f"{ENV_PREFIX}{limit.upper()} ({getattr(self, limit)}): it warns before "
                    "the reputation guard pauses sending"
                )
        return self

    @property
    def fetch_time(self) -> time:
        hour, minute = self.fetch_at.split(":")
        return time(int(hour), int(minute))

    @field_validator("secret_key")
    @classmethod
    def _keys_present(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one key is required")
        return value

    @field_validator("postal_address")
    @classmethod
    def _postal_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", value):
            raise ValueError("must be one line (no line breaks or control characters)")
        value = " ".join(value.split())
        if len(value) > 300:
            raise ValueError(f"is {len(value)} characters; at most 300 (one footer line)")
        return value or None

    @property
    def postal_address_line(self) -> str:
        """The address in the footer: the configured one, else (outbox only, which the
        production guard ensures) a sample that says it is one."""
        return self.postal_address or SAMPLE_POSTAL_ADDRESS

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator(
        "broker_url", "ses_endpoint_url", "sns_endpoint_url", "sqs_endpoint_url", "sqs_queue_url"
    )
    @classmethod
    def _service_url(cls, value: str | None) -> str | None:
        # Checked here so a typo is one clear error (its password hidden, see _describe),
        # not a client library's traceback at the first connection.
        if not value:
            return None
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ValueError("is not a valid URL (the port must be a number)") from None
        if not parts.scheme or "://" not in value:
            raise ValueError("must be a URL such as redis://host:6379/0")
        return value

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError("must be a SQLAlchemy URL such as sqlite:///papermail.db")
        # Accept the common postgres:// and postgresql:// spellings; use psycopg 3.
        for prefix in ("postgres://", "postgresql://"):
            if value.startswith(prefix):
                value = "postgresql+psycopg://" + value[len(prefix) :]
                break
        # Parsed now, so a bad port or an unknown kind of database is one clear error here
        # rather than a traceback (which could show the URL) at the first connection.
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        try:
            url = make_url(value)
        except (ArgumentError, ValueError):
            raise ValueError(
                "is not a valid SQLAlchemy URL (e.g. postgresql://user@host:5432/db; "
                "the port must be a number, special characters in the password %-encoded)"
            ) from None
        try:
            url.get_dialect()
        except NoSuchModuleError:
            raise ValueError(
                f"unknown kind of database {url.drivername!r}; use postgresql://... or "
                "sqlite:///..."
            ) from None
        return value

    @model_validator(mode="after")
    def _production_guards(self) -> Settings:
        """When mail leaves the machine: a real signing key, and public HTTPS links."""
        if self.mailer == "outbox":
            return self
        problems = []
        hint = '(python -c "import secrets; print(secrets.token_urlsafe(48))")'
        if DEV_SECRET_KEY in self.secret_key:
            problems.append(
                "PAPERMAIL_SECRET_KEY: the development key is refused when PAPERMAIL_MAILER "
                f"is {self.mailer!r}; set a long random secret {hint}"
            )
        elif len(self.secret_key[0]) < 32:
            # The signing key guards every unsubscribe and preference link ever sent.
            problems.append(
                "PAPERMAIL_SECRET_KEY: the signing key (the first one) must be at least 32 "
                f"characters when mail leaves the machine; {hint}"
            )
        if not self.postal_address:
            problems.append(
                "PAPERMAIL_POSTAL_ADDRESS: the sender's postal address is required when "
                f"PAPERMAIL_MAILER is {self.mailer!r} (CAN-SPAM: every digest's footer shows "
                "it); set it to one line, e.g. 'Example Lab, 1 Main St, Springfield, USA'"
            )
        problem = _public_https_problem(self.base_url)
        if problem:
            problems.append(
                f"PAPERMAIL_BASE_URL: {problem} when PAPERMAIL_MAILER is {self.mailer!r}: the "
                "links in every email point there, and one-click unsubscribe (RFC 8058) needs "
                f"HTTPS; set the public https:// address of the web app (got "
                f"{redact_url(self.base_url)!r})"
            )
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @property
    def signing_keys(self) -> list[str]:
        return self.secret_key

    @property
    def in_process(self) -> bool:
        return not self.broker_url

    @property
    def rate_from_account(self) -> bool:
        """The limiter follows the SES account's max send rate: MAILER=ses, SEND_RATE unset."""
        return self.mailer == "ses" and "send_rate" not in self.model_fields_set

    @property
    def burst(self) -> int:
        return self.burst_at(self.send_rate)

    def burst_at(self, rate: float) -> int:
        """SEND_BURST, or about one second's worth of ``rate``."""
        return self.send_burst or max(1, round(rate))

    @property
    def concurrency(self) -> int:
        return self.concurrency_at(self.send_rate)

    def concurrency_at(self, rate: float) -> int:
        """Sends in flight per worker process: SEND_CONCURRENCY, or enough for SEND_RATE.

        Automatic: rate x latency in flight (Little's law) spread over the Procfile's worker
        processes, for a provider answering within 100 ms; 1 at the default 14/s, 32 from
        1,280/s on. Never more than the burst: a batch takes its tokens at once.
        """
        wanted = self.send_concurrency or math.ceil(
            rate * AUTO_CONCURRENCY_LATENCY_SECONDS / AUTO_CONCURRENCY_PROCESSES
        )
        if not self.send_concurrency:
            wanted = min(wanted, AUTO_CONCURRENCY_MAX)
        return max(1, min(wanted, self.burst_at(rate)))


def _public_https_problem(url: str) -> str | None:
    """Why ``url`` cannot be the public address in real emails, or None."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".").lower()
    except ValueError:
        return "it is not a valid URL"
    if parts.scheme != "https":
        return "it must start with https://"
    if not host:
        return "it has no host name"
    if host == "localhost" or host.endswith(".localhost"):
        return f"{host} is this machine, not a public address"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_loopback or ip.is_unspecified:
        return f"{host} is this machine, not a public address"
    return None


def mask_credentials(value: str) -> str:
    """``value`` with everything before its last "@" but the scheme hidden, for URLs
    too malformed for :func:`worker.redact.redact_url` to find their password."""
    if "@" not in value:
        return value
    head, _, tail = value.rpartition("@")
    scheme = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", head)
    return f"{scheme.group() if scheme else ''}{HIDDEN}@{tail}"


def _shown_input(field: str, value: Any) -> str:
    if field in SECRET_FIELDS:
        return HIDDEN
    if field.endswith("_url") and isinstance(value, str):
        return repr(mask_credentials(value))
    return redact_url(repr(value))


def _describe(error: ValidationError) -> str:
    # Values are echoed to help, but never a secret setting nor a password in a URL.
    lines = []
    for item in error.errors():
        loc = item.get("loc") or ()
        msg = redact_url(str(item.get("msg", ""))).removeprefix("Value error, ")
        if loc:
            field = str(loc[0])
            name = ENV_PREFIX + field.upper()
            lines.append(f"{name}: {msg} (got {_shown_input(field, item.get('input'))})")
        else:
            lines.append(msg)
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment (and ``.env``), with keyword overrides."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()


def reset_settings() -> None:
    """Forget the cached settings (tests, or after changing the environment)."""
    get_settings.cache_clear()


def validate_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r} (use an IANA name like Europe/Paris)"
        ) from None
    return name
