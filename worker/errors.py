"""Errors meant for the person at the keyboard: each says what went wrong and what to do."""

from __future__ import annotations


class PapermailError(Exception):
    """A user-facing error; the CLI prints it and exits non-zero."""

    exit_code = 1


class NotFound(PapermailError):
    pass


class InvalidInput(PapermailError):
    exit_code = 2
