"""Shared helpers for the subscriber-page tests (imported by tests/unit/test_web_*.py)."""

from __future__ import annotations

import html
import re
from datetime import timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from worker import links
from worker.config import Settings
from worker.db import session_scope
from worker.models import Feedback, Paper, Subscriber, SubscriberLog, utcnow
from worker.subscribers import SubscriberInput, add_subscriber


def make_app(settings: Settings) -> Flask:
    from worker.web import create_app

    app = create_app(settings, dev=True)  # the tests sign with the development key
    app.config["TESTING"] = True
    return app


def make_client(settings: Settings) -> FlaskClient:
    return make_app(settings).test_client()


def add_sub(email: str = "ada@example.org", confirmed: bool = True, **prefs: Any) -> int:
    with session_scope() as s:
        sub, _ = add_subscriber(s, SubscriberInput(email, **prefs), confirmed=confirmed)
        return sub.id


def add_papers(specs: list[tuple[str, str]], hours_ago: float = 2.0) -> None:
    """Papers (id, title) published a little while ago, so they are in the window."""
    now = utcnow()
    with session_scope() as s:
        for i, (pid, title) in enumerate(specs):
            s.add(
                Paper(
                    id=pid,
                    title=title,
                    abstract=f"{title}. An abstract about {title.lower()}.",
                    authors=["A. Author", "B. Author"],
                    upvotes=10 + i,
                    published_at=now - timedelta(hours=hours_ago),
                    ingested_at=now,
                    url=f"https://papers.example/{pid}",
                )
            )


def token(purpose: str, settings: Settings, **payload: Any) -> str:
    return links.make_token(purpose, payload, settings)


def snapshot(sid: int) -> dict[str, Any]:
    """Everything a page could change about a subscriber, for before/after comparisons."""
    with session_scope() as s:
        sub = s.get(Subscriber, sid)
        assert sub is not None
        row = {c.name: getattr(sub, c.name) for c in Subscriber.__table__.columns}
        row["_log"] = s.scalar(
            select(func.count())
            .select_from(SubscriberLog)
            .where(SubscriberLog.subscriber_id == sid)
        )
        row["_feedback"] = s.scalar(select(func.count()).select_from(Feedback))
        row["_subscribers"] = s.scalar(select(func.count()).select_from(Subscriber))
        return row


def csrf_from(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def status_of(sid: int) -> str:
    with session_scope() as s:
        sub = s.get(Subscriber, sid)
        assert sub is not None
        return sub.status


def outbox_messages(settings: Settings, to: str | None = None) -> list[EmailMessage]:
    """Every .eml under the outbox (optionally only those to one address), oldest first."""
    from worker.web.pages import wait_for_confirmations

    wait_for_confirmations()  # confirmation emails are sent in the background
    root = Path(settings.outbox_dir)
    files = sorted(root.rglob("*.eml"), key=lambda p: p.stat().st_mtime_ns) if root.exists() else []
    out = []
    for path in files:
        msg = BytesParser(policy=policy.default).parse(path.open("rb"))
        if to is None or msg["To"] == to:
            out.append(msg)
    return out  # type: ignore[return-value]


def html_links(msg: EmailMessage) -> list[str]:
    """The href of every link in the message's HTML part, in order."""
    part = msg.get_body(preferencelist=("html",))
    assert part is not None, "the message has no HTML part"
    return [html.unescape(h) for h in re.findall(r'href="([^"]+)"', part.get_content())]


def path_of(url: str, settings: Settings) -> str:
    assert url.startswith(settings.base_url + "/"), url
    return url[len(settings.base_url) :]
