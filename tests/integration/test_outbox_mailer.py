"""Outbox mailer: one .eml per email on the real file system; the per-process get_mailer."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest

from worker import config
from worker.mailers.base import get_mailer, reset_mailer
from worker.mailers.errors import AccountError, DeliveryAction
from worker.mailers.outbox import OutboxMailer

from .conftest import build_message


@pytest.fixture
def outbox(env: dict[str, str]) -> Path:
    return Path(env["PAPERMAIL_OUTBOX_DIR"])


def _emls(root: Path) -> list[Path]:
    return sorted(root.rglob("*.eml"))


def test_layout_by_edition_and_delivery(outbox: Path) -> None:
    message = build_message(tags={"delivery_id": "42", "edition": "2026-11-27"})

    result = OutboxMailer(config.get_settings()).send(message)

    path = outbox / "2026-11-27" / "42-reader@example.org.eml"
    assert _emls(outbox) == [path]
    assert path.read_bytes() == message.raw
    parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert parsed["Message-ID"] == result.message_id == message.message_id


def test_without_tags_the_file_is_named_after_the_message_id(outbox: Path) -> None:
    message = build_message(tags={})

    OutboxMailer(config.get_settings()).send(message)

    [path] = _emls(outbox)
    assert path.parent == outbox
    assert path.stem == message.message_id.strip("<>")


def test_hostile_tags_and_recipient_cannot_escape_the_outbox(outbox: Path) -> None:
    message = build_message(
        recipient="../../../tmp/evil@example.org",
        tags={"delivery_id": "../1/2", "edition": "../../.."},
    )

    OutboxMailer(config.get_settings()).send(message)

    [path] = _emls(outbox)
    assert path.resolve().is_relative_to(outbox.resolve())
    assert ".." not in path.relative_to(outbox).parts
    assert not any(part.startswith(".") for part in path.relative_to(outbox).parts)


def test_a_resend_adds_a_copy_and_never_overwrites(outbox: Path) -> None:
    mailer = OutboxMailer(config.get_settings())
    first = build_message(body="first edition text")
    again = build_message(body="forced resend text")  # same delivery, a new Message-ID

    mailer.send(first)
    mailer.send(again)

    names = [p.name for p in _emls(outbox)]
    assert names == ["42-reader@example.org-2.eml", "42-reader@example.org.eml"]
    folder = outbox / "2026-11-27"
    assert (folder / "42-reader@example.org.eml").read_bytes() == first.raw
    assert (folder / "42-reader@example.org-2.eml").read_bytes() == again.raw
    assert [p.name for p in folder.iterdir() if p.suffix != ".eml"] == []  # no temp files


def test_unwritable_outbox_stops_the_run(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the outbox should be")
    monkeypatch.setenv("PAPERMAIL_OUTBOX_DIR", str(blocker))
    config.reset_settings()

    with pytest.raises(AccountError) as caught:
        OutboxMailer(config.get_settings()).send(build_message())

    assert caught.value.action is DeliveryAction.STOP_RUN
    assert str(blocker) in str(caught.value)
    assert blocker.read_text() == "a file where the outbox should be"


def test_get_mailer_defaults_to_one_outbox_per_settings(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    try:
        first = get_mailer()
        assert isinstance(first, OutboxMailer)
        assert get_mailer() is first
        monkeypatch.setenv("PAPERMAIL_OUTBOX_DIR", str(tmp_path / "elsewhere"))
        config.reset_settings()
        second = get_mailer()
        assert second is not first
        assert isinstance(second, OutboxMailer) and second.root == tmp_path / "elsewhere"
    finally:
        reset_mailer()


def test_get_mailer_honours_explicit_settings(env: dict[str, str], tmp_path: Path) -> None:
    settings = config.load_settings(outbox_dir=tmp_path / "explicit")
    try:
        mailer = get_mailer(settings)
        assert isinstance(mailer, OutboxMailer) and mailer.root == tmp_path / "explicit"
    finally:
        reset_mailer()
