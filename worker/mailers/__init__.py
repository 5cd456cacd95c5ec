"""Mailers: one interface (``base.Mailer``), outbox / SES / SMTP implementations, error kinds."""

from worker.mailers.base import Mailer, SendResult, create_mailer, get_mailer, reset_mailer

__all__ = ["Mailer", "SendResult", "create_mailer", "get_mailer", "reset_mailer"]
