"""Write worker/web/static/favicon.ico from favicon.svg (16, 32 and 48 px, PNG inside ICO).

Run by hand after changing the SVG: `.venv/bin/python scripts/make_favicon.py`. Chromium
(Playwright, /usr/bin/chromium) draws the SVG, so the ICO matches what browsers show for
the SVG; the ICO is for clients that ask for /favicon.ico without reading the page.
"""

from __future__ import annotations

import struct
from pathlib import Path

from playwright.sync_api import sync_playwright

STATIC = Path(__file__).resolve().parent.parent / "worker" / "web" / "static"
SIZES = (16, 32, 48)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def main() -> None:
    svg = (STATIC / "favicon.svg").read_text(encoding="utf-8")
    pngs = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        for size in SIZES:
            page = browser.new_page(viewport={"width": size, "height": size})
            sized = svg.replace("<svg ", f'<svg width="{size}" height="{size}" ', 1)
            page.set_content(f'<body style="margin:0;background:transparent">{sized}</body>')
            pngs.append((size, page.screenshot(omit_background=True)))
        browser.close()
    offset = 6 + 16 * len(pngs)
    entries, data = b"", b""
    for size, png in pngs:
        # ICONDIRENTRY: width, height, colours, reserved, planes, bpp, bytes, offset.
        entries += struct.pack("<BBBBHHII", size, size, 0, 0, 1, 32, len(png), offset + len(data))
        data += png
    (STATIC / "favicon.ico").write_bytes(struct.pack("<HHH", 0, 1, len(pngs)) + entries + data)
    print(f"wrote {STATIC / 'favicon.ico'} ({6 + len(entries) + len(data)} bytes)")


if __name__ == "__main__":
    main()
