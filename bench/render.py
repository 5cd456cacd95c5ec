#!/usr/bin/env python3
"""Benchmark: select, render and build the MIME message for many subscribers.

    python bench/render.py                       # 10,000 subscribers, 300 papers, 50 naive
    python bench/render.py --subscribers 2000 --naive 20

Per email, "fast" is what a worker does: its share of the batch selection (chunks of
PAPERMAIL_CHUNK_SIZE subscribers, one matrix operation each), the PaperViews, the Jinja
fill of the templates compiled once, a dozen signed links and the MIME bytes.
"Naive" does the same but compiles MJML and inlines CSS with premailer for every email.
Run by hand, not in CI; the figures go in the notes.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker import rendering  # noqa: E402
from worker.config import load_settings  # noqa: E402
from worker.models import Paper  # noqa: E402
from worker.rendering import Recipient, Renderer, paper_view  # noqa: E402
from worker.resources import data_dir  # noqa: E402

try:  # another engineer's module; the benchmark still runs without it
    from worker import selection
except ImportError:  # pragma: no cover
    selection = None  # type: ignore[assignment]

EDITION = date(2026, 11, 27)
NOW = datetime(2026, 11, 27, 6, 0, tzinfo=UTC)
TOPICS = [
    "diffusion models", "neural networks", "graphical models", "pruning", "gaussian processes",
    "reinforcement learning", "deep learning", "variational inference", "image classification",
    "compressed sensing", "representation learning", "optimization", "language models",
    "bayesian inference", "convolutional networks", "theory",
]  # fmt: skip
ZONES = ["UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo", "Europe/Berlin"]
NAMES = ["Zoë Müller", "Kenji Watanabe", "Ines Carvalho", "José Álvarez", "李 数据", "Samuel Osei",
         "Grace Liu", "Elena Rossi", "Tomás Ó Briain", "Hannah Becker"]  # fmt: skip


def seed_records() -> list[dict]:
    bundled = data_dir() / "sample_papers.jsonl"
    if bundled.is_file():
        return [json.loads(x) for x in bundled.read_text().splitlines() if x.strip()]
    lines = [x for x in (ROOT / "tests/data/trending_page.txt").read_text().splitlines()[2:] if x]
    lines[0] = lines[0].removeprefix("Subscribe")
    return [{"title": lines[i], "abstract": lines[i + 1]} for i in range(0, len(lines) - 1, 2)]


def synthesise_papers(count: int, rng: random.Random) -> list[Paper]:
    seeds = seed_records()
    papers = []
    for n in range(count):
        seed = seeds[n % len(seeds)]
        sentences = seed["abstract"].split(". ")
        rng.shuffle(sentences)  # vary the text so no two candidates are identical
        pid = f"2611.{n:05d}"
        round_ = n // len(seeds)
        title = seed["title"] if round_ == 0 else f"{seed['title']} ({TOPICS[round_ % 16]})"
        papers.append(
            Paper(
                id=pid,
                title=title,
                abstract=". ".join(sentences),
                authors=rng.sample(NAMES, rng.randint(1, 6)),
                upvotes=int(rng.paretovariate(1.2) * 5),
                published_at=NOW - timedelta(hours=rng.uniform(0, 47)),
                ingested_at=NOW - timedelta(hours=1),
                url=f"https://huggingface.co/papers/{pid}",
                pdf_url=f"https://arxiv.org/pdf/{pid}",
                hf_url=f"https://huggingface.co/papers/{pid}",
                # What a stored Hugging Face paper holds (the column's default, set at
                # flush): every column a worker reads is loaded, none left to getattr.
                categories=[],
            )
        )
    return papers


def synthesise_recipients(count: int, rng: random.Random) -> tuple[list[Recipient], list[int]]:
    recipients, max_papers = [], []
    for sid in range(1, count + 1):
        topics = tuple(rng.sample(TOPICS, rng.choice([0, 1, 2, 2, 3, 4])))
        weekly = rng.random() < 0.2
        recipients.append(
            Recipient(
                subscriber_id=sid,
                email=f"reader{sid}@example.org",
                topics=topics,
                frequency="weekly" if weekly else "daily",
                weekday=rng.randrange(7) if weekly else None,
                send_hour=rng.randrange(24),
                timezone=rng.choice(ZONES),
            )
        )
        max_papers.append(rng.choice([3, 5, 5, 5, 8, 10]))
    return recipients, max_papers


def select_chunk(papers, recipients, max_papers, settings):  # type: ignore[no-untyped-def]
    """{subscriber id: [(paper id, matched topic)]} for one chunk."""
    if selection is None or not hasattr(selection, "select_batch"):
        top = sorted(papers, key=lambda p: (-p.upvotes, p.id))
        pairs = zip(recipients, max_papers, strict=True)
        return {r.subscriber_id: [(p.id, None) for p in top[:k]] for r, k in pairs}
    cands = [
        selection.Candidate(p.id, p.title, p.abstract, p.upvotes, p.published_at) for p in papers
    ]
    profiles = [
        selection.Profile(r.subscriber_id, r.topics, k, NOW - timedelta(hours=48), NOW)
        for r, k in zip(recipients, max_papers, strict=True)
    ]
    results = selection.select_batch(
        cands, profiles, params=selection.SelectionParams.from_settings(settings)
    )
    return {sid: [(p.paper_id, p.matched_topic) for p in res.picks] for sid, res in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--papers", type=int, default=300)
    parser.add_argument("--naive", type=int, default=50, help="emails rendered the naive way")
    args = parser.parse_args()

    rng = random.Random(20261127)
    settings = load_settings(base_url="https://papermail.example.org", secret_key="bench-key")
    papers = synthesise_papers(args.papers, rng)
    by_id = {p.id: p for p in papers}
    recipients, max_papers = synthesise_recipients(args.subscribers, rng)

    cache = Path(tempfile.mkdtemp(prefix="papermail-bench-"))
    rendering.clear_memory_cache()
    t0 = time.perf_counter()
    renderer = Renderer(settings, cache_dir=cache)
    cold = time.perf_counter() - t0
    rendering.clear_memory_cache()
    t0 = time.perf_counter()
    Renderer(settings, cache_dir=cache)
    warm_disk = time.perf_counter() - t0

    chunk = settings.chunk_size
    per_email: list[float] = []
    per_email_cpu: list[float] = []  # CPU time: the machine is shared, wall time is noisy
    render_only: list[float] = []
    select_total = 0.0
    select_cpu = 0.0  # thread CPU time of the selection: wall time counts other load
    sizes: list[int] = []
    counts: list[int] = []
    skipped = 0
    wall = time.perf_counter()
    for start in range(0, len(recipients), chunk):
        recs, ks = recipients[start : start + chunk], max_papers[start : start + chunk]
        t0, c0 = time.perf_counter(), time.thread_time()
        picks = select_chunk(papers, recs, ks, settings)
        share = (time.perf_counter() - t0) / len(recs)
        cpu_share = (time.thread_time() - c0) / len(recs)
        select_total += share * len(recs)
        select_cpu += cpu_share * len(recs)
        for recipient in recs:
            t0, c0 = time.perf_counter(), time.thread_time()
            chosen = picks.get(recipient.subscriber_id) or []
            if not chosen:
                skipped += 1
                continue
            views = [paper_view(by_id[pid], topic) for pid, topic in chosen]
            message = renderer.render_digest(
                recipient, EDITION, views, delivery_id=recipient.subscriber_id
            )
            spent, cpu = time.perf_counter() - t0, time.thread_time() - c0
            render_only.append(spent)
            per_email.append(spent + share)
            per_email_cpu.append(cpu + cpu_share)
            sizes.append(message.size)
            counts.append(len(views))
    wall = time.perf_counter() - wall

    # Naive: selection as above, then MJML -> premailer -> Jinja compile for every email.
    sources = rendering._read_sources(rendering.email_templates_dir())
    fast_templates = renderer.templates
    naive: list[float] = []
    naive_cpu: list[float] = []
    sample = recipients[: args.naive]
    t0, c0 = time.perf_counter(), time.thread_time()
    picks = select_chunk(papers, sample, max_papers[: len(sample)], settings)
    share = (time.perf_counter() - t0) / len(sample)  # the same selection as the fast path
    cpu_share = (time.thread_time() - c0) / len(sample)
    for recipient in sample:
        chosen = picks.get(recipient.subscriber_id) or [(papers[0].id, None)]
        views = [paper_view(by_id[pid], topic) for pid, topic in chosen]
        t0, c0 = time.perf_counter(), time.thread_time()
        # Only the digest's HTML is compiled per email; text and subject stay as they are.
        mjml = rendering.resolve_includes("digest.mjml", sources)
        html_template = rendering._html_env().from_string(rendering.compile_mjml(mjml, "digest"))
        templates = fast_templates._replace(digest_html=html_template)
        renderer.templates = templates
        renderer.render_digest(recipient, EDITION, views, delivery_id=recipient.subscriber_id)
        naive.append(time.perf_counter() - t0 + share)
        naive_cpu.append(time.thread_time() - c0 + cpu_share)

    def ms(x: float) -> str:
        return f"{x * 1000:.3f} ms"

    q = statistics.quantiles(per_email, n=100)
    fast_median = statistics.median(per_email)
    naive_median = statistics.median(naive)
    print(f"papers: {len(papers)}, subscribers: {len(recipients)}, chunk: {chunk}")
    print(f"emails rendered: {len(per_email)} (skipped, nothing selected: {skipped})")
    print(f"papers per email: mean {statistics.mean(counts):.1f}, max {max(counts)}")
    print(f"median message size: {statistics.median(sizes) / 1024:.1f} KiB")
    print(f"template compile: cold {ms(cold)}, from disk cache {ms(warm_disk)}")
    print(
        f"selection: {select_total:.2f} s in all, {ms(select_total / len(recipients))}/subscriber"
        f" (CPU {ms(select_cpu / len(recipients))}/subscriber)"
    )
    print(f"render+MIME only: median {ms(statistics.median(render_only))}")
    print(
        f"FAST  per email (selection share + render + MIME): median {ms(fast_median)}, "
        f"p90 {ms(q[89])}, p99 {ms(q[98])}, mean {ms(statistics.mean(per_email))}"
    )
    print(f"      wall time for all {len(recipients)}: {wall:.2f} s")
    fast_cpu, naive_cpu_median = statistics.median(per_email_cpu), statistics.median(naive_cpu)
    print(f"      CPU time per email: median {ms(fast_cpu)}")
    print(
        f"NAIVE per email ({len(naive)} emails, MJML+premailer each): median {ms(naive_median)}"
        f" (CPU {ms(naive_cpu_median)})"
    )
    print(
        f"RATIO naive/fast (medians): {naive_median / fast_median:.0f}x wall, "
        f"{naive_cpu_median / fast_cpu:.0f}x CPU"
    )
    ok = fast_median <= 0.0003 and naive_median / fast_median >= 30
    print("TARGET (<= 0.3 ms/email, >= 30x, wall medians):", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
