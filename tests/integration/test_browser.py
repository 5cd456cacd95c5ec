"""The subscriber pages in a real browser: headless Chromium (Debian's) driven by Playwright.

The app runs on a real HTTP server (werkzeug, a thread, a free port); digests are sent by
`papermail digest run` in-process into the outbox, and the browser follows the links of
the `.eml` files there, as a reader would. Screenshots (phone 375x812 and desktop
1280x800) are written under the test's tmp dir, ``screenshots/``, to be looked at.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from tests.conftest import skip_loudly
from tests.unit.web_support import html_links, outbox_messages
from worker import config, migrate
from worker.config import Settings
from worker.db import session_scope
from worker.models import Paper, Subscriber, utcnow
from worker.subscribers import SubscriberInput, add_subscriber

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PHONE = {"width": 375, "height": 812}
DESKTOP = {"width": 1280, "height": 800}
BROWSER_ZONE = "Europe/Paris"

PAPERS = [
    ("2611.60001", "Diffusion Models for Protein Design", 40),
    ("2611.60002", "Latent Diffusion Models with Sparse Attention", 30),
    ("2611.60003", "Consistency Distillation of Diffusion Models", 20),
    ("2611.60004", "Graph Neural Networks for Weather Forecasting", 12),
    ("2611.60005", "Scaling Graph Neural Networks to Billion-Edge Graphs", 8),
    ("2611.60006", "Reinforcement Learning from Human Feedback, Revisited", 25),
    ("2611.60007", "Speech Recognition with Mixture of Experts", 5),
]


def _skip_loudly(reason: str) -> None:
    skip_loudly(f"BROWSER TESTS SKIPPED: {reason}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        _skip_loudly(f"{CHROMIUM} is missing (apt-get install -y chromium chromium-driver)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _skip_loudly(f"the playwright package is not installed ({exc})")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Site:
    base: str
    settings: Settings
    shots: Path

    def run_digest(self, day: date) -> str:
        from worker.cli import main

        result = CliRunner().invoke(main, ["digest", "run", "--date", day.isoformat()])
        assert result.exit_code == 0, result.output + repr(result.exception)
        return result.output

    def mails(self, to: str) -> list[EmailMessage]:
        return outbox_messages(self.settings, to=to)

    def link(self, mail: EmailMessage, part: str) -> str:
        found = [u for u in html_links(mail) if part in u]
        assert found, f"no {part} link in the email"
        assert found[0].startswith(self.base + "/")
        return found[0]


@pytest.fixture
def site(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fixed_clock: object
) -> Iterator[Site]:
    """The app served from a thread of this process, on the fixed clock: what a page shows
    ("your next digest", today's edition) must not depend on the hour the suite runs."""
    from werkzeug.serving import make_server

    from worker.web import create_app

    # Bind first: the links in emails must carry the server's real port.
    server = make_server("127.0.0.1", 0, lambda environ, start: [], threaded=True)
    base = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("PAPERMAIL_BASE_URL", base)
    config.reset_settings()
    migrate.upgrade()
    settings = config.get_settings()
    server.app = create_app(settings, dev=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    now = utcnow()
    with session_scope() as s:
        for pid, title, upvotes in PAPERS:
            s.add(
                Paper(
                    id=pid,
                    title=title,
                    abstract=f"We study {title.lower()}. Results improve on prior work.",
                    authors=["Ada Lovelace", "Alan Turing", "Grace Hopper", "Emmy Noether"],
                    upvotes=upvotes,
                    published_at=now - timedelta(hours=3),
                    ingested_at=now,
                    url=f"https://papers.example/{pid}",
                )
            )
    try:
        yield Site(base, settings, shots)
    finally:
        server.shutdown()
        thread.join(5)
        print(f"\nscreenshots: {shots}")


def _add(email: str, **prefs: Any) -> int:
    with session_scope() as s:
        sub, _ = add_subscriber(s, SubscriberInput(email, **prefs), confirmed=True)
        return sub.id


def _sub(sid: int) -> Subscriber:
    with session_scope() as s:
        sub = s.get(Subscriber, sid)
        assert sub is not None
        s.expunge(sub)
        return sub


def _page(browser: Any, size: dict[str, int], dark: bool = False) -> Any:
    context = browser.new_context(
        viewport=size, timezone_id=BROWSER_ZONE, color_scheme="dark" if dark else "light"
    )
    page = context.new_page()
    page.set_default_timeout(10_000)
    # No request may leave for another host (the pages load nothing from elsewhere).
    foreign: list[str] = []
    page.on(
        "request",
        lambda req: (
            None if req.url.startswith(("http://127.0.0.1", "data:")) else foreign.append(req.url)
        ),
    )
    page.foreign_requests = foreign  # type: ignore[attr-defined]
    return page


def _shoot(page: Any, site: Site, name: str) -> None:
    page.screenshot(path=str(site.shots / f"{name}.png"), full_page=True)


def _digest_text(mail: EmailMessage) -> str:
    body = mail.get_body(preferencelist=("html",))
    assert body is not None
    return str(body.get_content())


def test_preferences_changed_in_the_browser_shape_the_next_digest(browser: Any, site: Site) -> None:
    sid = _add("ada@example.org", topics=["diffusion models"], max_papers="5")
    today = utcnow().date()
    tomorrow = today + timedelta(days=1)
    site.run_digest(today)
    [first] = site.mails("ada@example.org")
    assert "Diffusion Models for Protein Design" in _digest_text(first)

    page = _page(browser, PHONE)
    page.goto(site.link(first, "/preferences/"))
    assert page.locator("h1").inner_text() == "Your digest preferences"
    assert page.is_checked('input[name="topic"][value="diffusion models"]')
    _shoot(page, site, "preferences-phone")

    # A mistake first: the error shows next to the field and nothing is saved.
    page.fill("#timezone", "Mars/Olympus_Mons")
    page.click("button:has-text('Save preferences')")
    assert "Unknown time zone" in page.locator("#timezone-error").inner_text()
    assert page.get_attribute("#timezone", "aria-invalid") == "true"
    assert _sub(sid).timezone == "UTC"
    _shoot(page, site, "preferences-error-phone")

    # Now the real changes, with the keyboard-reachable controls of the page.
    page.uncheck('input[name="topic"][value="diffusion models"]')
    page.fill("#new_topics", "graph neural networks")
    page.fill("#max_papers", "1")
    page.check("#frequency-weekly")
    assert page.is_visible("#weekday")
    page.select_option("#weekday", str(tomorrow.weekday()))
    page.select_option("#send_hour", "6")
    page.click("button[data-browser-tz]")  # "Use this device's zone"
    assert page.input_value("#timezone") == BROWSER_ZONE
    page.click("button:has-text('Save preferences')")
    page.wait_for_selector("text=Saved.")
    _shoot(page, site, "preferences-saved-phone")
    sub = _sub(sid)
    assert sub.topics == ["graph neural networks"]
    assert (sub.max_papers, sub.frequency, sub.weekday) == (1, "weekly", tomorrow.weekday())
    assert (sub.send_hour, sub.timezone) == (6, BROWSER_ZONE)
    # The "next digest" box already reflects the new topic.
    next_box = page.locator("section[aria-labelledby=next-title]").inner_text()
    assert "Graph Neural Networks for Weather Forecasting" in next_box
    assert "Diffusion" not in next_box

    site.run_digest(tomorrow)
    mails = site.mails("ada@example.org")
    assert len(mails) == 2
    second = _digest_text(mails[1])
    assert "Graph Neural Networks for Weather Forecasting" in second
    assert "Billion-Edge" not in second  # max papers 1
    assert "Diffusion" not in second
    assert page.foreign_requests == []

    desktop = _page(browser, DESKTOP)
    desktop.goto(site.link(first, "/preferences/"))
    _shoot(desktop, site, "preferences-desktop")
    dark = _page(browser, PHONE, dark=True)
    dark.goto(site.link(first, "/preferences/"))
    _shoot(dark, site, "preferences-dark-phone")


def test_feedback_and_view_in_browser(browser: Any, site: Site) -> None:
    sid = _add("emmy@example.org", topics=["diffusion models"])
    site.run_digest(utcnow().date())
    [mail] = site.mails("emmy@example.org")
    for size, label in ((PHONE, "phone"), (DESKTOP, "desktop")):
        page = _page(browser, size)
        page.goto(site.link(mail, "/view/"))
        assert "Diffusion Models for Protein Design" in page.content()
        _shoot(page, site, f"view-{label}")
        page.goto(site.link(mail, "/feedback/"))
        assert page.locator("h1").inner_text() == "More papers like this?"
        _shoot(page, site, f"feedback-{label}")
    page.click("button:has-text('Yes, more like this')")
    page.wait_for_selector("text=Thanks, noted")
    _shoot(page, site, "feedback-done-desktop")
    from worker.models import Feedback

    with session_scope() as s:
        votes = [(f.subscriber_id, f.vote) for f in s.scalars(select(Feedback))]
    assert votes == [(sid, 1)]


def test_unsubscribe_through_the_page_and_back(browser: Any, site: Site) -> None:
    sid = _add("grace@example.org", topics=["diffusion models"])
    today = utcnow().date()
    site.run_digest(today)
    [mail] = site.mails("grace@example.org")
    # The List-Unsubscribe header's https URL is the page a person can open too.
    header = str(mail["List-Unsubscribe"])
    url = header.split("<", 1)[1].split(">", 1)[0]
    assert url.startswith(site.base + "/unsubscribe/")

    page = _page(browser, PHONE)
    page.goto(url)
    assert page.locator("h1").inner_text() == "Unsubscribe?"
    assert _sub(sid).status == "active"  # opening the page changed nothing
    _shoot(page, site, "unsubscribe-phone")
    page.click("button:has-text('Unsubscribe')")
    page.wait_for_selector("text=You're unsubscribed")
    assert _sub(sid).status == "unsubscribed"
    _shoot(page, site, "unsubscribed-phone")

    with session_scope() as s:  # something she would otherwise get
        s.add(
            Paper(
                id="2611.69999",
                title="Diffusion Models Everywhere",
                upvotes=99,
                published_at=utcnow() - timedelta(hours=1),
                ingested_at=utcnow(),
            )
        )
    site.run_digest(today + timedelta(days=1))
    assert len(site.mails("grace@example.org")) == 1

    page.click("button:has-text('Re-subscribe')")
    page.wait_for_selector("text=Welcome back")
    assert _sub(sid).status == "active"
    _shoot(page, site, "resubscribed-phone")
    desktop = _page(browser, DESKTOP)
    desktop.goto(url)
    _shoot(desktop, site, "unsubscribe-desktop")


def test_subscribe_and_confirm_end_to_end(browser: Any, site: Site) -> None:
    for size, label in ((DESKTOP, "desktop"), (PHONE, "phone")):
        page = _page(browser, size)
        page.goto(site.base + "/subscribe")
        _shoot(page, site, f"subscribe-{label}")
    # Keyboard only: type, Tab to the next field, Enter submits.
    page.focus("#email")
    page.keyboard.type("Hedy@Example.org")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "topics"
    page.keyboard.type("graph neural networks")
    page.keyboard.press("Tab")
    _shoot(page, site, "subscribe-focus-phone")  # the focused button shows its ring
    page.keyboard.press("Enter")
    page.wait_for_selector("text=Check your inbox")
    _shoot(page, site, "subscribe-sent-phone")
    with session_scope() as s:
        sub = s.scalars(select(Subscriber).where(Subscriber.email == "hedy@example.org")).one()
        assert (sub.status, sub.timezone) == ("pending", BROWSER_ZONE)
        assert sub.topics == ["graph neural networks"]
        sid = sub.id

    [confirmation] = site.mails("hedy@example.org")
    page.goto(site.link(confirmation, "/confirm/"))
    assert page.locator("h1").inner_text() == "Confirm your subscription"
    assert _sub(sid).status == "pending"
    _shoot(page, site, "confirm-phone")
    page.click("button:has-text('Yes, subscribe me')")
    page.wait_for_selector("text=You're subscribed")
    _shoot(page, site, "confirmed-phone")
    sub = _sub(sid)
    assert sub.status == "active" and sub.confirmed_at is not None

    site.run_digest(utcnow().date())
    mails = site.mails("hedy@example.org")
    assert len(mails) == 2
    assert "Graph Neural Networks for Weather Forecasting" in _digest_text(mails[1])
    assert page.foreign_requests == []

    error = _page(browser, PHONE)
    error.goto(site.base + "/preferences/not-a-real-token")
    assert error.locator("h1").inner_text() == "This link doesn't work"
    _shoot(error, site, "bad-link-phone")
