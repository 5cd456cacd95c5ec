"""Where the bundled non-Python files live, in a source checkout or an installed wheel."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    # An installed wheel carries them under worker/_bundled; a checkout has them at the root.
    for candidate in (_PKG / "_bundled" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"papermail's {name}/ directory is missing from the installation")


def migrations_dir() -> Path:
    return _find("migrations")


def templates_dir() -> Path:
    return _find("templates")


def email_templates_dir() -> Path:
    return templates_dir() / "email"


def shared_templates_dir() -> Path:
    """Partials used by both the emails and the pages (the wordmark)."""
    return templates_dir() / "shared"


def data_dir() -> Path:
    return _PKG / "data"
