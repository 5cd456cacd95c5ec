"""The digest email in a real browser (headless Chromium through Playwright): desktop
1200 px and phone 375 px, light and dark (prefers-color-scheme).

Rendered through scripts/screenshot_digest.py's own functions, so the script a reviewer
runs and what is tested are the same emails. Checked: no horizontal scroll on the phone,
tap targets of the main links at least 44 px, the 👍/👎 pair on the row of its Read link,
dark-mode colours applied, nothing loaded from the network, and axe-core's audit
(axe-playwright-python) with no serious or critical violation.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import skip_loudly

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
MAIN_LINKS = "a.pm-read, a.pm-vote, a.pm-more-link, .pm-footer-links a"


def _script() -> Any:
    spec = importlib.util.spec_from_file_location(
        "screenshot_digest", ROOT / "scripts" / "screenshot_digest.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shots = _script()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        skip_loudly(f"BROWSER TESTS SKIPPED: {CHROMIUM} is missing")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        skip_loudly(f"BROWSER TESTS SKIPPED: playwright is not installed ({exc})")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=shots.CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def emails() -> dict[str, str]:
    # Outbox settings of the script (no environment needed beyond a clean one).
    pages = shots.render_samples(5)
    pages["long"] = shots.render_samples(50)["digest"]  # over the size budget
    return pages


def _open(browser: Any, html: str, width: int, scheme: str) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": width, "height": 800}, color_scheme=scheme)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.route("**/*", lambda route: route.abort())
    page.set_content(html, wait_until="load")
    return page, requests


def _boxes(page: Any, selector: str) -> list[dict[str, float]]:
    return page.eval_on_selector_all(
        selector,
        "els => els.map(e => { const r = e.getBoundingClientRect();"
        " return {x: r.x, y: r.y, w: r.width, h: r.height, text: e.textContent}; })",
    )


@pytest.mark.parametrize("scheme", shots.SCHEMES)
@pytest.mark.parametrize("width", shots.WIDTHS)
@pytest.mark.parametrize("name", ["digest", "trending", "long"])
def test_email_in_chromium(
    browser: Any, emails: dict[str, str], name: str, width: int, scheme: str
) -> None:
    page, requests = _open(browser, emails[name], width, scheme)
    try:
        scroll = page.evaluate("document.documentElement.scrollWidth")
        assert scroll <= width, f"horizontal scroll: {scroll} px wide at {width} px"
        links = _boxes(page, MAIN_LINKS)
        assert len(links) >= 3 * 5 + 3
        small = [b for b in links if b["h"] < 44 or b["w"] < 44]
        assert small == [], f"tap targets under 44 px: {small[:3]}"
        # Each card's 👍/👎 sit together on the row of its Read link, never alone.
        reads, votes = _boxes(page, "a.pm-read"), _boxes(page, "a.pm-vote")
        assert len(votes) == 2 * len(reads) > 0
        for n, read in enumerate(reads):
            up, down = votes[2 * n], votes[2 * n + 1]
            assert abs(up["y"] - down["y"]) < 2 and abs(up["y"] - read["y"]) < 12, (n, read, up)
            assert up["x"] > read["x"] + read["w"]
        # Dark mode is applied (and light mode is not dark).
        card = page.eval_on_selector(".pm-card", "e => getComputedStyle(e).backgroundColor")
        title = page.eval_on_selector("h2.pm-p-title a", "e => getComputedStyle(e).color")
        if scheme == "dark":
            assert (card, title) == ("rgb(30, 41, 59)", "rgb(241, 245, 249)")
        else:
            assert (card, title) == ("rgb(255, 255, 255)", "rgb(17, 24, 39)")
        assert page.locator("h1").count() == 1
        if name == "long":
            assert page.locator("a.pm-more-link").count() == 1
        from axe_playwright_python.sync_playwright import Axe

        found = Axe().run(page).response["violations"]
        bad = [(v["id"], v["impact"]) for v in found if v["impact"] in ("serious", "critical")]
        assert bad == [], bad
        assert [u for u in requests if not u.startswith(("about:", "data:"))] == []
    finally:
        page.close()


def test_screenshot_script_writes_the_set(tmp_path: Path, browser: Any) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "screenshot_digest.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for name in ("digest", "trending"):
        for width in shots.WIDTHS:
            for scheme in shots.SCHEMES:
                shot = tmp_path / f"{name}-{width}-{scheme}.png"
                assert shot.stat().st_size > 10_000, shot
    bad = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "screenshot_digest.py"), "--papers", "0"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "--papers must be at least 1" in bad.stderr
    assert "Traceback" not in bad.stderr
