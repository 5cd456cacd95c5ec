"""Every byte of a rendered email, against a golden file made by an earlier renderer.

The render path is optimised by hand (fragments reused, MIME assembled as bytes), so this
pins its output: headers, quoted-printable text and HTML parts, the HTML and text strings
and the tags, for digests that cover the branches of the templates (matched
topic or not, missing and unsafe links, non-ASCII and long titles, weekly and daily, no
topics, one paper and ten, a Reply-To or none) and a confirmation email. The clock is
fixed (worker.clock.installed), so every signed link and the Date header are fixed, and the
only random parts, Message-ID suffix and MIME boundary (``_unique_hex`` in
worker.rendering), come from a counter.

To regenerate after an *intended* change of the output (a template, a header):
    .venv/bin/python -m tests.unit.test_render_golden --write
and review the diff of tests/data/render_golden.json. It was first generated from main
before the render-speed work, so a faster renderer must reproduce it unchanged. Its body
hashes were regenerated once since, when the HTML part went from base64 to
quoted-printable and both parts came to be encoded piece by piece (soft line breaks
elsewhere): headers, html and text stayed the same, and the test below checks that both
parts decode to them. It was regenerated again for issue 14, whose new templates change
every email on purpose (heading, reasons, card, footer, Feedback-ID, 70-character subject,
78-column text); the last digest case is over its size budget, so the budget's output is
pinned too.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import itertools
import json
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from worker import rendering
from worker.clock import installed
from worker.config import Settings, load_settings
from worker.rendering import PaperView, Recipient, Renderer

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "render_golden.json"
NOW = datetime(2026, 11, 27, 6, 0, 7, tzinfo=UTC)
# The titles and abstracts the golden file was made from: the seed page of the old sample
# (the bundled sample now has real ids and authors, and one paper fewer).
SEED = Path(__file__).resolve().parent.parent / "data" / "trending_page.txt"


def _settings(variant: str) -> Settings:
    if variant == "a":
        return load_settings(
            base_url="https://papermail.example.org",
            from_address="Zoë's papers <digest@papermail.example.org>",
            reply_to="help@papermail.example.org",
            secret_key="golden-key-0123456789abcdef0123456789,old-key",
            list_id="papermail daily papers <digest.papermail.example.org>",
            unsubscribe_mailto=None,
            postal_address="Zoë's Lab, 1 Rue de la Paix, 75002 Paris, France",
            email_max_bytes=90 * 1024,
            lookback_daily_hours=48,
            lookback_weekly_hours=192,
        )
    # Everything the renderer reads is given, so the environment cannot change the output.
    return load_settings(
        base_url="https://mail.example.com/pm",
        from_address="digest@example.com",
        reply_to=None,
        secret_key="other-golden-key-0123456789abcdef0123",
        list_id="Ünïcode list <list.example.com>",
        unsubscribe_mailto="mailto:leave@example.com",
        postal_address=None,  # the outbox's sample address
        email_max_bytes=60_000,  # small enough for case 7 to go over it
        lookback_daily_hours=36,
        lookback_weekly_hours=168,
    )


def _paper(pid: str, title: str, **kw: Any) -> PaperView:
    values: dict[str, Any] = {
        "id": pid,
        "title": title,
        "authors": ["Zoë Müller", "李 数据"],
        "upvotes": 12,
        "abstract": "A short abstract.",
        "url": f"https://huggingface.co/papers/{pid}",
        "pdf_url": f"https://arxiv.org/pdf/{pid}",
        "hf_url": f"https://huggingface.co/papers/{pid}",
        "matched_topic": "diffusion models",
    }
    values.update(kw)
    return PaperView(**values)


def _seed_pairs() -> list[tuple[str, str]]:
    """(title, abstract) of the seed page: after the line glued to "Subscribe", pairs."""
    lines = [x.strip() for x in SEED.read_text(encoding="utf-8").splitlines() if x.strip()]
    start = next(i for i, x in enumerate(lines) if x.startswith("Subscribe") and x != "Subscribe")
    body = [lines[start].removeprefix("Subscribe"), *lines[start + 1 :]]
    return [(body[i], body[i + 1]) for i in range(0, len(body), 2)]


def _sample_papers() -> list[PaperView]:
    records = [{"title": t, "abstract": a} for t, a in _seed_pairs()]
    topics = [None, "diffusion models", "pruning", "language models"]
    return [
        _paper(
            f"2611.{n:05d}",
            rec["title"],
            abstract=rec["abstract"],
            authors=[f"Author {n} {k}" for k in range(n % 6)],
            upvotes=n % 4,  # 1 upvote, 0 upvotes: both plural branches
            matched_topic=topics[n % len(topics)],
        )
        for n, rec in enumerate(records)
    ]


def _edge_papers() -> list[PaperView]:
    return [
        _paper("2611.00001", "数据 Diffusion for Zoë Müller"),
        _paper("2611.00002", '<script>alert(1)</script> & "quotes"', matched_topic=None),
        _paper(
            "2611.00003",
            "Many authors\r\nBcc: victim@example.org",
            authors=["Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra"],
            abstract=("word " * 120).strip(),
            pdf_url=None,
            hf_url="javascript:alert(2)",
        ),
        _paper("2611.00004", "", url="data:text/html,x", hf_url=None, upvotes=1),
        _paper(
            "2611.00005",
            "A very long title " * 12,
            url="HTTPS://Example.org/a?b=1&c=<2>",
            matched_topic="ümlaut topic",
        ),
    ]


def _cases() -> list[tuple[str, Recipient, date, list[PaperView], int | None]]:
    sample, edge = _sample_papers(), _edge_papers()
    return [
        (
            "a",
            Recipient(
                42, "reader@example.org", ("diffusion models", "RLHF"), "daily", None, 7, "UTC"
            ),
            date(2026, 11, 27),
            edge,
            9001,
        ),
        (
            "a",
            Recipient(7, "zoe@bücher.example", (), "weekly", 2, 18, "Asia/Tokyo"),
            date(2026, 11, 30),
            sample[:10],
            None,
        ),
        (
            "a",
            Recipient(8, "x@example.org", ("pruning",), "daily", None, 0, "UTC"),
            date(2026, 1, 1),
            sample[10:11],
            1,
        ),
        (
            "b",
            Recipient(9, "y@example.org", ("a",) * 3, "weekly", 6, 23, "America/New_York"),
            date(2026, 12, 31),
            sample[11:] + edge[:2],
            123456789,
        ),
        (
            "b",
            Recipient(10, "z@example.org", (), "daily", None, 5, "UTC"),
            date(2027, 2, 28),
            [edge[0]],
            5,
        ),
        (  # papers already rendered above, now with another matched topic and order
            "a",
            Recipient(11, "w@example.org", ("theory",), "daily", None, 9, "Europe/Paris"),
            date(2026, 11, 27),
            [replace(p, matched_topic="theory") for p in (sample[3], edge[1], sample[0])],
            11,
        ),
        (  # over the size budget: shorter abstracts, then a "more on the web" link
            "b",
            Recipient(12, "v@example.org", ("pruning",), "daily", None, 8, "UTC"),
            date(2026, 11, 27),
            [
                replace(p, id=f"{p.id}{k}", matched_terms=("pruning", "sparse") if k else ())
                for k in range(3)
                for p in sample
            ][:50],
            12,
        ),
    ]


def _record(out: Any) -> dict[str, Any]:
    head, _, body = out.raw.partition(b"\r\n\r\n")
    return {
        # Every header and body line is ASCII (RFC 2047, quoted-printable).
        "headers": head.decode("ascii").split("\r\n"),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "html": out.html,
        "text": out.text,
        "subject": out.subject,
        "message_id": out.message_id,
        "raw_body": body,
        "sender": out.sender,
        "recipient": out.recipient,
        "tags": out.tags,
    }


class _Counter:
    """Stands in for ``_unique_hex`` in worker.rendering: hex from a counter."""

    def __init__(self) -> None:
        self._n = itertools.count(1)

    def __call__(self, bits: int) -> str:
        return f"{next(self._n):0{bits // 4}x}"


def _strip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the golden file keeps: no raw bytes, and a repeat's html/text only once."""
    out = []
    for n, record in enumerate(records):
        record = {k: v for k, v in record.items() if k != "raw_body"}
        if n and records[n - 1]["html"] == record["html"]:
            record["html"] = record["text"] = "(as the email before)"
        out.append(record)
    return out


def render_all(cache: Path) -> list[dict[str, Any]]:
    """Every golden email, rendered with the current code (fresh renderers, fixed clock)."""
    out: list[dict[str, Any]] = []
    saved = rendering._unique_hex
    rendering._unique_hex = _Counter()  # type: ignore[assignment]
    try:
        with installed(lambda: NOW):
            renderers = {v: Renderer(_settings(v), cache_dir=cache) for v in ("a", "b")}
            for variant, recipient, edition, papers, delivery_id in _cases():
                renderer = renderers[variant]
                for _ in range(2):  # a second time: caches warm, same bytes expected
                    message = renderer.render_digest(
                        recipient, edition, papers, delivery_id=delivery_id
                    )
                    out.append(_record(message))
            out.append(_record(renderers["a"].render_confirm("new@example.org", 77)))
            out.append(_record(renderers["b"].render_confirm("n2@example.org", 78)))
    finally:
        rendering._unique_hex = saved  # type: ignore[assignment]
    return out


@pytest.fixture
def rendered(env: dict[str, str], tmp_path: Path) -> Iterator[list[dict[str, Any]]]:
    rendering.clear_memory_cache()
    yield render_all(tmp_path / "cache")
    rendering.clear_memory_cache()


def test_emails_are_byte_identical_to_the_golden_file(rendered: list[dict[str, Any]]) -> None:
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert len(rendered) == len(golden)
    before: dict[str, Any] = {}
    for n, (got, want) in enumerate(zip(rendered, golden, strict=True)):
        if want["html"] == "(as the email before)":  # a repeat: the same html and text
            want = {**want, "html": before["html"], "text": before["text"]}
        before = want
        for key in want:  # one field at a time: a failure says which part changed
            assert got[key] == want[key], f"email {n}: {key} differs from {GOLDEN.name}"
        # The body's bytes (hashed in the file) are the MIME encoding of html and text.
        msg = email.message_from_bytes(
            "\r\n".join(got["headers"]).encode() + b"\r\n\r\n" + got["raw_body"],
            policy=email.policy.default,
        )
        assert isinstance(msg, EmailMessage)
        text, html = (part.get_content() for part in msg.iter_parts())
        assert (text.replace("\r\n", "\n"), html.replace("\r\n", "\n")) == (
            want["text"],
            want["html"],
        )


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m tests.unit.test_render_golden --write")
    with tempfile.TemporaryDirectory() as tmp:
        rendering.clear_memory_cache()
        records = render_all(Path(tmp))
    GOLDEN.write_text(
        json.dumps(_strip(records), ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    print(f"wrote {len(records)} emails to {GOLDEN}")
