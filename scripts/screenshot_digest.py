#!/usr/bin/env python3
"""Render a sample digest and screenshot it in headless Chromium, phone and desktop sizes.

    python scripts/screenshot_digest.py                 # PNGs + HTML in /tmp/papermail-shots
    python scripts/screenshot_digest.py --out /tmp/x --papers 3 --confirm

Writes digest-375-light.png, digest-1200-light.png and the same in dark mode
(prefers-color-scheme: dark), plus the HTML they were taken from. The images are for
looking at, not for committing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.config import load_settings  # noqa: E402
from worker.rendering import PaperView, Recipient, Renderer  # noqa: E402
from worker.resources import data_dir  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TOPICS = ("diffusion models", "neural networks", "graphical models")


def sample_papers(count: int) -> list[PaperView]:
    """From the bundled sample papers, else straight from the seed page."""
    bundled = data_dir() / "sample_papers.jsonl"
    records: list[dict] = []
    if bundled.is_file():
        records = [json.loads(line) for line in bundled.read_text().splitlines() if line.strip()]
    else:
        lines = (ROOT / "tests" / "data" / "trending_page.txt").read_text().splitlines()
        body = [ln for ln in lines[2:] if ln.strip()]
        body[0] = body[0].removeprefix("Subscribe")
        for i in range(0, len(body) - 1, 2):
            records.append({"id": f"2611.{i:05d}", "title": body[i], "abstract": body[i + 1]})
    views = []
    for i, rec in enumerate(records[:count]):
        views.append(
            PaperView(
                id=rec["id"],
                title=rec["title"],
                authors=rec.get("authors")
                or ["Zoë Müller", "李 数据", "A. Researcher", "B. Other"],
                upvotes=int(rec.get("upvotes", 100 - i)),
                abstract=rec.get("abstract", ""),
                url=rec.get("url") or f"https://huggingface.co/papers/{rec['id']}",
                pdf_url=rec.get("pdf_url") or f"https://arxiv.org/pdf/{rec['id']}",
                hf_url=rec.get("hf_url") or f"https://huggingface.co/papers/{rec['id']}",
                matched_topic=TOPICS[i % len(TOPICS)] if i % 4 != 3 else None,
            )
        )
    return views


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "papermail-shots")
    parser.add_argument("--papers", type=int, default=5)
    parser.add_argument("--confirm", action="store_true", help="also the confirmation email")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    settings = load_settings(base_url="https://papermail.example.org")
    renderer = Renderer(settings)
    recipient = Recipient(1, "reader@example.org", TOPICS, "daily", None, 7, "Europe/Paris")
    pages = {
        "digest": renderer.digest_html(recipient, date(2026, 11, 27), sample_papers(args.papers))
    }
    if args.confirm:
        pages["confirm"] = renderer.render_confirm("reader@example.org", 1).html

    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for name, html in pages.items():
                html_path = args.out / f"{name}.html"
                html_path.write_text(html, encoding="utf-8")
                for scheme in ("light", "dark"):
                    for width in (375, 1200):
                        page = browser.new_page(
                            viewport={"width": width, "height": 800}, color_scheme=scheme
                        )
                        # Offline: the email must not need the network (no fonts, no CSS).
                        page.route("**/*", lambda route: route.abort())
                        page.set_content(html, wait_until="load")
                        shot = args.out / f"{name}-{width}-{scheme}.png"
                        page.screenshot(path=str(shot), full_page=True)
                        print(shot)
                        if width < 600:  # the first screen at full resolution, too
                            top = shot.with_name(shot.stem + "-top.png")
                            page.screenshot(path=str(top))
                            print(top)
                        page.close()
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
