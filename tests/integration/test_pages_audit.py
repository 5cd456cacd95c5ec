"""Every subscriber page in Chromium at 375 px (a phone) and 1280 px (a desktop), light and
dark: no horizontal scroll on the phone, every control at least 44 x 44 px, and an axe-core
audit (axe-playwright-python's bundled axe.min.js) with no serious or critical violation.

The pages are reached as a reader reaches them: from the links of an edition sent by
`papermail digest run`, from a confirmation email, or by submitting the page's own form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import skip_loudly
from tests.integration import test_browser as tb
from tests.integration.test_browser import DESKTOP, PHONE, Site, _add, _page, _shoot
from worker import links
from worker.db import session_scope
from worker.models import utcnow
from worker.subscribers import SubscriberInput, add_subscriber

pytestmark = pytest.mark.browser

# The Chromium and the served app of the browser tests (fixtures).
browser = tb.browser
site = tb.site

MIN_TARGET = 44  # px, WCAG 2.5.5 (AAA) and Apple's / Google's guidance for touch

# Controls a finger must hit. Links inside a sentence are exempt (WCAG 2.5.8's inline
# exception): only links laid out on their own (display other than inline) are measured.
_TARGETS_JS = """
() => {
  const small = [];
  const visible = (el) => {
    const r = el.getBoundingClientRect();
    const style = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && style.visibility !== 'hidden';
  };
  const measure = (el, box) => {
    const r = box.getBoundingClientRect();
    if (r.width < MIN || r.height < MIN) {
      small.push(`${el.outerHTML.slice(0, 90)} is ${Math.round(r.width)}x${Math.round(r.height)}`);
    }
  };
  document.querySelectorAll('button, select, input, textarea, a').forEach((el) => {
    if (el.type === 'hidden' || !visible(el) || el.classList.contains('skip')) return;
    if (el.tagName === 'A' && getComputedStyle(el).display === 'inline') return;
    // A checkbox or radio is hit through its label, which is the target.
    const box = (el.type === 'checkbox' || el.type === 'radio') && el.closest('label')
      ? el.closest('label') : el;
    measure(el, box);
  });
  return small;
}
""".replace("MIN", str(MIN_TARGET))


def _axe() -> Any:
    try:
        from axe_playwright_python.sync_playwright import Axe
    except ImportError as exc:
        skip_loudly(f"BROWSER TESTS SKIPPED: axe-playwright-python is not installed ({exc})")
    return Axe()


def _audit(page: Any, site: Site, name: str, *, phone: bool) -> list[str]:
    problems: list[str] = []
    if phone:
        scroll = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        if scroll[0] > scroll[1]:
            problems.append(f"{name}: horizontal scroll ({scroll[0]} px in {scroll[1]} px)")
    problems += [f"{name}: small target {t}" for t in page.evaluate(_TARGETS_JS)]
    results = _axe().run(page)
    for v in results.response["violations"]:
        if v["impact"] in ("serious", "critical"):
            where = "; ".join(n["target"][0] for n in v["nodes"][:3])
            problems.append(f"{name}: axe {v['impact']} {v['id']} ({v['help']}) at {where}")
    assert page.foreign_requests == [], page.foreign_requests
    _shoot(page, site, name)
    return problems


def _pages(site: Site) -> dict[str, Callable[[Any], None]]:
    """name -> how to bring a fresh browser page to it."""
    settings = site.settings
    sid = _add("ada@example.org", topics=["diffusion models"], max_papers="3")
    site.run_digest(utcnow().date())
    [mail] = site.mails("ada@example.org")
    with session_scope() as s:
        pending, _ = add_subscriber(s, SubscriberInput("hedy@example.org"), confirmed=False)
        pending_id = pending.id
    confirm = "/confirm/" + links.make_token("confirm", {"s": pending_id}, settings)

    def goto(path: str) -> Callable[[Any], None]:
        return lambda page: page.goto(site.base + path)

    def subscribed(page: Any) -> None:
        page.goto(site.base + "/subscribe")
        page.fill("#email", "new.reader@example.org")
        page.click("button[type=submit]")
        page.wait_for_selector("text=Check your inbox")

    def preferences_error(page: Any) -> None:
        page.goto(site.link(mail, "/preferences/"))
        page.fill("#max_papers", "500")
        page.click("button:has-text('Save preferences')")
        page.wait_for_selector("#error-summary")

    def unsubscribed(page: Any) -> None:
        page.goto(site.link(mail, "/unsubscribe/"))
        if page.is_visible("button:has-text('Re-subscribe')"):  # the previous size's doing
            page.click("button:has-text('Re-subscribe')")
            page.wait_for_selector("text=Welcome back")
            page.goto(site.link(mail, "/unsubscribe/"))
        page.click("button:has-text('Unsubscribe')")
        page.wait_for_selector("text=You're unsubscribed")

    def feedback_done(page: Any) -> None:
        page.goto(site.link(mail, "/feedback/"))
        page.click("button[type=submit] >> nth=0")
        page.wait_for_selector("text=Thanks, noted")

    assert sid
    return {
        "subscribe": goto("/subscribe"),
        "subscribe-sent": subscribed,
        "confirm": goto(confirm),
        "preferences": lambda page: page.goto(site.link(mail, "/preferences/")),
        "preferences-error": preferences_error,
        "feedback": lambda page: page.goto(site.link(mail, "/feedback/")),
        "feedback-done": feedback_done,
        "unsubscribe": lambda page: page.goto(site.link(mail, "/unsubscribe/")),
        "unsubscribed": unsubscribed,
        "bad-link": goto("/preferences/not-a-real-token"),
        "not-found": goto("/no-such-page"),
    }


def test_every_page_fits_a_phone_has_big_targets_and_passes_axe(browser: Any, site: Site) -> None:
    problems: list[str] = []
    for name, reach in _pages(site).items():
        for size, label, dark in ((PHONE, "phone", False), (PHONE, "phone-dark", True),
                                  (DESKTOP, "desktop", False)):  # fmt: skip
            page = _page(browser, size, dark=dark)
            reach(page)
            problems += _audit(page, site, f"{name}-{label}", phone=size is PHONE)
            page.context.close()
    assert problems == [], "\n".join(problems)


def test_the_zone_button_shows_only_when_the_device_zone_differs(browser: Any, site: Site) -> None:
    settings = site.settings
    same = _add("paris@example.org", timezone="Europe/Paris")  # the browser's zone
    other = _add("tokyo@example.org", timezone="Asia/Tokyo")
    for sid, shown in ((same, False), (other, True)):
        page = _page(browser, PHONE)
        page.goto(
            site.base + "/preferences/" + links.make_token("preferences", {"s": sid}, settings)
        )
        assert page.is_visible("button[data-browser-tz]") is shown
        page.context.close()
    # A browser that reports an old alias of the saved zone (Chromium says Asia/Calcutta).
    kolkata = _add("kolkata@example.org", timezone="Asia/Kolkata")
    context = browser.new_context(viewport=PHONE, timezone_id="Asia/Calcutta")
    page = context.new_page()
    page.goto(
        site.base + "/preferences/" + links.make_token("preferences", {"s": kolkata}, settings)
    )
    assert page.evaluate("Intl.DateTimeFormat().resolvedOptions().timeZone") == "Asia/Calcutta"
    assert not page.is_visible("button[data-browser-tz]")
    page.fill("#timezone", "UTC")
    page.dispatch_event("#timezone", "input")
    assert page.is_visible("button[data-browser-tz]")
    assert page.inner_text("[data-tz-name]") == "Asia/Kolkata"  # offered by its canonical name
    context.close()


def test_favicon_loads_in_the_browser(browser: Any, site: Site) -> None:
    page = _page(browser, DESKTOP)
    page.goto(site.base + "/subscribe")
    # The page's CSP allows no fetch(): the browser loads the icon as a document instead.
    response = page.goto(site.base + "/favicon.ico")
    assert response is not None and response.status == 200
    assert response.headers["content-type"] == "image/vnd.microsoft.icon"
    page.context.close()
