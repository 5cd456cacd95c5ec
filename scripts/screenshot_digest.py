#!/usr/bin/env python3
"""Render sample digests and screenshot them in headless Chromium: phone and desktop, light
and dark.

    python scripts/screenshot_digest.py                 # PNGs + HTML in /tmp/papermail-shots
    python scripts/screenshot_digest.py --out /tmp/x --papers 3 --confirm

Writes, for a reader with topics (``digest``) and one without (``trending``),
NAME-375-light.png, NAME-375-dark.png, NAME-1200-light.png, NAME-1200-dark.png (dark:
prefers-color-scheme), the first phone screen of each at full resolution (``-top``), and
the HTML they were taken from. The images are for looking at (a reviewer, the README),
not for committing with every change. tests/integration/test_email_browser.py renders
through the same functions.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.config import Settings, load_settings  # noqa: E402
from worker.rendering import PaperView, Recipient, Renderer  # noqa: E402
from worker.resources import data_dir  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TOPICS = ("pruning", "gaussian processes", "reinforcement learning")
EDITION = date(2026, 11, 27)
WIDTHS = (375, 1200)
SCHEMES = ("light", "dark")


def sample_papers(count: int) -> list[PaperView]:
    """From the bundled sample papers (repeated with other ids if more are asked for)."""
    bundled = data_dir() / "sample_papers.jsonl"
    records = [json.loads(line) for line in bundled.read_text().splitlines() if line.strip()]
    views = []
    for i in range(count):
        rec = records[i % len(records)]
        pid = rec["id"] if i < len(records) else f"{rec['id']}v{i // len(records) + 1}"
        views.append(
            PaperView(
                id=pid,
                title=rec["title"],
                authors=rec.get("authors") or ["Zoë Müller", "李 数据", "A. Researcher"],
                upvotes=int(rec.get("upvotes", 100 - i)),
                abstract=rec.get("abstract", ""),
                url=rec.get("url") or f"https://huggingface.co/papers/{pid}",
                pdf_url=rec.get("pdf_url") or f"https://arxiv.org/pdf/{pid}",
                hf_url=rec.get("hf_url") or f"https://huggingface.co/papers/{pid}",
                matched_topic=TOPICS[i % len(TOPICS)] if i % 4 != 3 else None,
                arxiv_id=pid,
                primary_category=(rec.get("categories") or ["cs.LG"])[0],
                abs_url=f"https://arxiv.org/abs/{pid}",
                published=EDITION - timedelta(days=1 + i % 2),
            )
        )
    return views


def selected(count: int) -> list[PaperView]:
    """What the ranking picks for a reader of TOPICS from the bundled papers, with its real
    reasons (matched topic and terms); past the bundled papers (a size-budget sample), the
    repeated samples with topics assigned in turn."""
    from datetime import UTC, datetime

    from worker.selection import Candidate, Profile, select_batch

    if count > len(_records()):
        return sample_papers(count)
    views = sample_papers(len(_records()))
    end = datetime.combine(EDITION, datetime.min.time(), tzinfo=UTC) + timedelta(hours=7)
    cands = [
        Candidate(
            v.id,
            v.title,
            v.abstract,
            v.upvotes,
            end - timedelta(hours=6 + i),
            (v.primary_category,) if v.primary_category else (),
        )
        for i, v in enumerate(views)
    ]
    profile = Profile(1, TOPICS, max(1, count), end - timedelta(days=2), end)
    picks = select_batch(cands, [profile])[1].picks
    by_id = {v.id: v for v in views}
    chosen = [
        replace(by_id[p.paper_id], matched_topic=p.matched_topic, matched_terms=p.matched_terms)
        for p in picks
    ]
    return chosen or sample_papers(count)


def _records() -> list[dict[str, object]]:
    bundled = data_dir() / "sample_papers.jsonl"
    return [json.loads(line) for line in bundled.read_text().splitlines() if line.strip()]


def sample_settings() -> Settings:
    return load_settings(
        base_url="https://papermail.example.org",
        postal_address="Example Lab, 1 Main Street, Springfield, USA",
    )


def render_samples(papers: int = 5, *, confirm: bool = False) -> dict[str, str]:
    """{name: the HTML of the email as sent}: a topic reader's digest, a trending reader's."""
    renderer = Renderer(sample_settings())
    topical = Recipient(1, "reader@example.org", TOPICS, "daily", None, 7, "Europe/Paris")
    trending = Recipient(2, "trends@example.org", (), "daily", None, 7, "UTC")
    views = selected(papers)
    untopical = [
        PaperView(**{**v.__dict__, "matched_topic": None, "matched_terms": ()}) for v in views
    ]
    pages = {
        "digest": renderer.render_digest(topical, EDITION, views).html,
        "trending": renderer.render_digest(trending, EDITION, untopical).html,
    }
    if confirm:
        pages["confirm"] = renderer.render_confirm("reader@example.org", 1).html
    return pages


def open_email(browser, html: str, width: int, scheme: str):  # type: ignore[no-untyped-def]
    """A page showing ``html`` offline (the email must need no network) at this size."""
    page = browser.new_page(viewport={"width": width, "height": 800}, color_scheme=scheme)
    page.route("**/*", lambda route: route.abort())
    page.set_content(html, wait_until="load")
    return page


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "papermail-shots")
    parser.add_argument("--papers", type=int, default=5)
    parser.add_argument("--confirm", action="store_true", help="also the confirmation email")
    args = parser.parse_args()
    if args.papers < 1:
        parser.error("--papers must be at least 1")

    from playwright.sync_api import sync_playwright

    pages = render_samples(args.papers, confirm=args.confirm)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"cannot create {args.out}: {exc.strerror}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for name, html in pages.items():
                (args.out / f"{name}.html").write_text(html, encoding="utf-8")
                for scheme in SCHEMES:
                    for width in WIDTHS:
                        page = open_email(browser, html, width, scheme)
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
