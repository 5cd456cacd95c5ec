"""Mailers: one interface (``base.Mailer``), outbox / SES / SMTP implementations, error kinds."""

from worker.mailers.base import (
    AccountInfo,
    Mailer,
    SendResult,
    create_mailer,
    get_mailer,
    reset_mailer,
)

__all__ = ["AccountInfo", "Mailer", "SendResult", "create_mailer", "get_mailer", "reset_mailer"]
