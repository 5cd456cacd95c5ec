"""The one typed settings object. Nothing else in papermail reads the environment.

Every setting is a ``PAPERMAIL_*`` variable (also read from ``.env``). Defaults are those
of the embedded mode: SQLite file, no broker (in-process), outbox mailer.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Refused whenever mail can leave the machine (MAILER != outbox).
DEV_SECRET_KEY = "dev-insecure-papermail-secret-change-me"

ENV_PREFIX = "PAPERMAIL_"


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
    send_rate: float = Field(default=14.0, gt=0)
    send_burst: int = Field(default=0, ge=0)  # 0: about one second's worth
    chunk_size: int = Field(default=200, ge=1, le=5000)
    max_attempts: int = Field(default=5, ge=1, le=50)
    retry_base_seconds: float = Field(default=30.0, gt=0)
    sending_timeout_seconds: int = Field(default=900, ge=30)
    send_timeout_seconds: float = Field(default=20.0, gt=0)
    # Every 15 minutes, so zones with :30 and :45 offsets get their hour on time too.
    plan_interval_minutes: int = Field(default=15, ge=1, le=1440)
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
    # SNS/SQS endpoints for SNS- and SQS-compatible services (unset: AWS).
    sns_endpoint_url: str | None = None
    sqs_endpoint_url: str | None = None
    soft_bounce_limit: int = Field(default=3, ge=1)
    bounce_rate_limit: float = Field(default=0.05, gt=0, le=1)
    complaint_rate_limit: float = Field(default=0.001, gt=0, le=1)
    reputation_min_sample: int = Field(default=200, ge=1)
    orphan_grace_seconds: int = Field(default=300, ge=0)
    # Web
    subscribe_rate_per_hour: int = Field(default=5, ge=1)
    trusted_proxies: int = Field(default=0, ge=0, le=5)  # reverse proxies in front of web

    @field_validator("secret_key", "sns_topic_arns", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("secret_key")
    @classmethod
    def _keys_present(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one key is required")
        return value

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError("must be a SQLAlchemy URL such as sqlite:///papermail.db")
        # Accept the common postgres:// and postgresql:// spellings; use psycopg 3.
        for prefix in ("postgres://", "postgresql://"):
            if value.startswith(prefix):
                return "postgresql+psycopg://" + value[len(prefix) :]
        return value

    @model_validator(mode="after")
    def _production_secret(self) -> Settings:
        hint = '(python -c "import secrets; print(secrets.token_urlsafe(48))")'
        if self.mailer != "outbox" and DEV_SECRET_KEY in self.secret_key:
            raise ValueError(
                "PAPERMAIL_SECRET_KEY: the development key is refused when PAPERMAIL_MAILER "
                f"is {self.mailer!r}; set a long random secret {hint}"
            )
        if self.mailer != "outbox" and len(self.secret_key[0]) < 32:
            # The signing key guards every unsubscribe and preference link ever sent.
            raise ValueError(
                "PAPERMAIL_SECRET_KEY: the signing key (the first one) must be at least 32 "
                f"characters when mail leaves the machine; {hint}"
            )
        return self

    @property
    def signing_keys(self) -> list[str]:
        return self.secret_key

    @property
    def in_process(self) -> bool:
        return not self.broker_url

    @property
    def burst(self) -> int:
        return self.send_burst or max(1, round(self.send_rate))


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = item.get("loc") or ()
        if loc:
            name = ENV_PREFIX + str(loc[0]).upper()
            lines.append(f"{name}: {item.get('msg')} (got {item.get('input')!r})")
        else:
            msg = str(item.get("msg", ""))
            lines.append(msg.removeprefix("Value error, "))
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
