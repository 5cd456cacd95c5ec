"""Addresses the configured mailer cannot send to are refused at every door: `subscribers
add`, `subscribers import` (by line, nothing imported), `/subscribe`; and a confirmation
email that cannot be sent is logged and recorded, never lost silently."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from tests.unit.web_support import csrf_from, make_client, outbox_messages
from worker import config
from worker.cli import main
from worker.db import session_scope
from worker.mailers.base import address_problem, mailer_class
from worker.models import Subscriber, SubscriberLog
from worker.web.pages import wait_for_confirmations

BAD = "tést@example.com"


def subscriber_count() -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(Subscriber)) or 0


@pytest.mark.parametrize("mailer", ["outbox", "ses", "smtp"])
def test_each_mailer_says_why_it_cannot_send_to_a_non_ascii_local_part(
    env: Any, mailer: str
) -> None:
    settings = config.get_settings().model_copy(update={"mailer": mailer})
    problem = address_problem(BAD, settings)
    assert problem is not None and problem.startswith(f"cannot send to {BAD!r} with the {mailer}")
    assert "only ASCII" in problem
    assert mailer_class(settings).name == mailer
    # An IDN domain is fine (it travels as punycode); a plain address too.
    assert address_problem("ada@münchen.de", settings) is None
    assert address_problem("ada@example.org", settings) is None


def test_ses_names_smtputf8(env: Any) -> None:
    problem = address_problem(BAD, config.get_settings().model_copy(update={"mailer": "ses"}))
    assert problem and "Amazon SES" in problem and "SMTPUTF8" in problem


def test_add_refuses_it_and_changes_nothing(settings: Any) -> None:
    result = CliRunner().invoke(main, ["subscribers", "add", BAD, "--confirmed"])
    assert result.exit_code == 2
    assert f"cannot send to {BAD!r}" in result.stderr and "only ASCII" in result.stderr
    assert subscriber_count() == 0


def test_import_reports_the_row_by_line_and_imports_nothing(settings: Any, tmp_path: Path) -> None:
    path = tmp_path / "subs.csv"
    path.write_text(f"email,topics\nok@example.org,vision\n{BAD},nlp\nok2@example.org,\n")
    result = CliRunner().invoke(main, ["subscribers", "import", str(path), "--confirmed"])
    assert result.exit_code == 2
    assert f"line 3: cannot send to {BAD!r}" in result.stderr
    assert "nothing was imported" in result.stderr
    assert subscriber_count() == 0

    skipped = CliRunner().invoke(
        main, ["subscribers", "import", str(path), "--confirmed", "--skip-invalid"]
    )
    assert skipped.exit_code == 1
    with session_scope() as s:
        assert set(s.scalars(select(Subscriber.email))) == {"ok@example.org", "ok2@example.org"}


def test_subscribe_page_says_so_and_creates_nothing(settings: Any) -> None:
    client = make_client(settings)
    csrf = csrf_from(client.get("/subscribe").get_data(as_text=True))
    response = client.post("/subscribe", data={"email": BAD, "topics": "", "csrf_token": csrf})
    body = response.get_data(as_text=True)
    assert response.status_code == 400
    assert re.search(r'id="email-error">We can(\'|&#39;)t send email to this address', body)
    assert subscriber_count() == 0 and outbox_messages(settings) == []


def test_a_confirmation_that_cannot_be_sent_is_logged_and_recorded(
    settings: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("the outbox cannot be created here")
    broken = settings.model_copy(update={"outbox_dir": str(blocked / "outbox")})
    client = make_client(broken)
    csrf = csrf_from(client.get("/subscribe").get_data(as_text=True))
    response = client.post(
        "/subscribe", data={"email": "new@example.org", "topics": "", "csrf_token": csrf}
    )
    assert response.status_code == 200  # the same page whatever happens (no address oracle)
    wait_for_confirmations()
    with session_scope() as s:
        [entry] = s.scalars(
            select(SubscriberLog).where(SubscriberLog.action == "confirmation_failed")
        )
        assert entry.detail.startswith("confirmation email not sent: AccountError: ")
        assert "cannot write to the outbox" in entry.detail
    assert any("confirmation email to subscriber" in r.getMessage() for r in caplog.records)
