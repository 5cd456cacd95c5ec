#!/usr/bin/env python3
"""Generate worker/data/sample_papers.jsonl from the seed page tests/data/trending_page.txt.

The page is a copy of a "trending papers" page: a few header lines, then per paper a title
line and an abstract line; the first title is glued to the header's last word
("SubscribeRobust Pruning at Initialization"). Titles and abstracts are taken verbatim.
Everything the page does not give (ids, dates, upvotes, authors, links) is generated
deterministically from a hash of the title, and every record carries ``"sample": true``.

    python scripts/make_sample_papers.py            # rewrite the bundled file
    python scripts/make_sample_papers.py --check    # exit 1 if the bundled file is stale
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote_plus

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SEED = ROOT / "tests" / "data" / "trending_page.txt"
DEFAULT_OUTPUT = ROOT / "worker" / "data" / "sample_papers.jsonl"

# Fixed so the file is reproducible; load_sample_papers() shifts the dates to "now".
REFERENCE = datetime(2026, 11, 25, 18, 0, tzinfo=UTC)
SPREAD = timedelta(days=3)
ID_PREFIX = "2611.0"  # looks like a November 2026 arXiv id: 2611.0xxxx
HEADER_WORD = "Subscribe"

AUTHORS = [
    "Zoë Müller",
    "Łukasz Kaiser",
    "José Álvarez",
    "Søren Kjærgaard",
    "Chloé Dubois",
    "Ayşe Yılmaz",
    "Nguyễn Thu Hà",
    "Priya Raghavan",
    "Wei Zhang",
    "Amara Okafor",
    "Mateo Fernández",
    "Hannah Becker",
    "Kenji Watanabe",
    "Olga Petrova",
    "Samuel Osei",
    "Elena Rossi",
    "Daniel Kim",
    "Fatima Al-Sayed",
    "Lars Eriksson",
    "Maya Cohen",
    "Tomás Ó Briain",
    "Ines Carvalho",
    "Arjun Mehta",
    "Grace Liu",
]


class SeedError(Exception):
    pass


def parse_seed(text: str, header_word: str = HEADER_WORD) -> list[tuple[str, str]]:
    """(title, abstract) pairs of the seed page, in page order."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    glued = re.compile(rf"^{re.escape(header_word)}(?=\S)")
    start = next((i for i, line in enumerate(lines) if glued.match(line)), None)
    if start is None:
        raise SeedError(f"no line starts with the header word {header_word!r} glued to a title")
    body = lines[start:]
    body[0] = body[0][len(header_word) :]
    if len(body) % 2:
        raise SeedError(f"expected title/abstract pairs, got {len(body)} lines after the header")
    pairs = [(body[i], body[i + 1]) for i in range(0, len(body), 2)]
    for number, (title, abstract) in enumerate(pairs, start=1):
        # A title longer than its abstract means the pairing slipped.
        if len(title) >= len(abstract):
            raise SeedError(f"paper {number}: title {title[:40]!r} is not followed by an abstract")
    return pairs


def _digest(title: str) -> bytes:
    return hashlib.sha256(title.encode("utf-8")).digest()


def make_records(pairs: list[tuple[str, str]]) -> list[dict[str, object]]:
    records: list[dict[str, object]] = []
    used: set[str] = set()
    for title, abstract in pairs:
        h = _digest(title)
        n = int.from_bytes(h[:8], "big")
        number = n % 10000
        while f"{ID_PREFIX}{number:04d}" in used:  # deterministic collision resolution
            number = (number + 1) % 10000
        paper_id = f"{ID_PREFIX}{number:04d}"
        used.add(paper_id)
        count = 2 + h[8] % 4
        authors: list[str] = []
        for byte in h[9:]:
            name = AUTHORS[byte % len(AUTHORS)]
            if name not in authors:
                authors.append(name)
            if len(authors) == count:
                break
        offset = timedelta(seconds=int.from_bytes(h[24:28], "big") % int(SPREAD.total_seconds()))
        published = REFERENCE - offset
        # The ids are invented, so links search for the real paper by its title.
        search = f"https://arxiv.org/search/?query={quote_plus(title)}&searchtype=title"
        records.append(
            {
                "id": paper_id,
                "title": title,
                "abstract": abstract,
                "authors": authors,
                "upvotes": 1 + int.from_bytes(h[16:20], "big") % 300,
                "published_at": published.isoformat().replace("+00:00", "Z"),
                "url": search,
                "pdf_url": search,
                "hf_url": f"https://huggingface.co/papers?q={quote_plus(title)}",
                "sample": True,
            }
        )
    return records


def render(seed_text: str) -> str:
    import json

    records = make_records(parse_seed(seed_text))
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=Path, default=DEFAULT_SEED)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--check", action="store_true", help="fail if --output is stale")
    args = parser.parse_args(argv)
    try:
        content = render(args.seed.read_text(encoding="utf-8"))
    except SeedError as exc:
        print(f"error: {args.seed}: {exc}", file=sys.stderr)
        return 2
    # Validate with papermail's own parser so the bundled file always ingests.
    from worker.papers.sources import parse_jsonl

    count = len(parse_jsonl(content, str(args.output)))
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != content:
            print(f"{args.output} is stale; run {Path(__file__).name}", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date ({count} papers)")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(content, encoding="utf-8")
    print(f"wrote {count} papers to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
