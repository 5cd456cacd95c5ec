"""What the digest says (issue 14): heading, reasons, highlights, subject, text layout,
footer, and the HTML size budget (PAPERMAIL_EMAIL_MAX_BYTES)."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import date
from pathlib import Path

import pytest

from worker import config
from worker.config import Settings, load_settings
from worker.rendering import PaperView, Recipient, Renderer

EDITION = date(2026, 11, 27)  # a Friday
ADDRESS = "Example Lab, 1 Main Street, Springfield, USA"
TOPICAL = Recipient(1, "ada@example.org", ("pruning", "diffusion models"), "daily", None, 7, "UTC")
TRENDING = Recipient(2, "bob@example.org", (), "daily", None, 7, "UTC")


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return load_settings(postal_address=ADDRESS)


@pytest.fixture
def renderer(settings: Settings, tmp_path: Path) -> Renderer:
    return Renderer(settings, cache_dir=tmp_path / "cache")


def _paper(n: int, **kw: object) -> PaperView:
    pid = f"2401.{n:05d}"
    values: dict[str, object] = {
        "id": pid,
        "title": f"Paper number {n} on structured pruning",
        "authors": ["Ada Lovelace", "Alan Turing"],
        "upvotes": 100 - n,
        "abstract": (
            f"Paper {n}. We prune networks at initialization. Pruned models keep accuracy. "
            + "Further words of the abstract follow here to make it long. " * 8
        ),
        "url": f"https://huggingface.co/papers/{pid}",
        "pdf_url": f"https://arxiv.org/pdf/{pid}",
        "hf_url": f"https://huggingface.co/papers/{pid}",
        "matched_topic": "pruning",
        "arxiv_id": pid,
        "primary_category": "cs.LG",
        "abs_url": f"https://arxiv.org/abs/{pid}",
        "published": date(2026, 11, 26),
    }
    values.update(kw)
    return PaperView(**values)  # type: ignore[arg-type]


def _cards(html: str) -> list[str]:
    return re.findall(r'<h2 class="pm-p-title"[^>]*>.*?</h2>', html, re.S)


def test_heading_and_intro_say_what_the_selection_is(renderer: Renderer) -> None:
    papers = [_paper(n) for n in range(5)]
    html = renderer.digest_html(TOPICAL, EDITION, papers)
    assert ">Your 5 papers for Friday</h1>" in html
    assert "New papers from the last 2 days that match pruning or diffusion models." in html
    assert ">Your paper for Friday</h1>" in renderer.digest_html(TOPICAL, EDITION, papers[:1])
    trending = renderer.digest_html(TRENDING, EDITION, papers)
    assert ">Today&#39;s trending papers</h1>" in trending
    assert "The new papers of the last 2 days, ranked by upvotes and freshness." in trending
    weekly = replace(TRENDING, frequency="weekly", weekday=4)
    assert ">This week&#39;s trending papers</h1>" in renderer.digest_html(weekly, EDITION, papers)
    weekly_topics = replace(TOPICAL, frequency="weekly", weekday=4)
    html = renderer.digest_html(weekly_topics, EDITION, papers)
    assert ">Your 5 papers for the week of 27 Nov</h1>" in html
    assert "from the last 8 days" in html
    many = replace(TOPICAL, topics=("a1", "b2", "c3", "d4", "e5"))
    assert "match a1, b2, c3 or 2 more." in renderer.digest_html(many, EDITION, papers)


def test_each_paper_says_why_it_is_there(renderer: Renderer) -> None:
    papers = [
        _paper(0),
        _paper(1, matched_topic="diffusion models", matched_terms=("denoising", "score")),
        _paper(2, matched_topic=None),
    ]
    out = renderer.render_digest(TOPICAL, EDITION, papers)
    assert "Because you follow <em>pruning</em></p>" in out.html
    assert "Because you follow <em>diffusion models</em>: denoising, score</p>" in out.html
    assert "No topic match: picked by its upvotes and your 👍/👎 votes" in out.html
    assert "   Because you follow \u201cpruning\u201d\n" in out.text
    # Readers without topics see where each paper stands by upvotes (ties share a rank).
    votes = [_paper(n, matched_topic=None, upvotes=u) for n, u in enumerate((5, 50, 20, 20))]
    html = renderer.digest_html(TRENDING, EDITION, votes)
    kickers = re.findall(r'<p class="pm-p-kicker"[^>]*>(.*?)</p>', html)
    assert kickers == [
        "Trending: 4th most upvoted of these 4",
        "Trending: most upvoted of these 4",
        "Trending: 2nd most upvoted of these 4",
        "Trending: 2nd most upvoted of these 4",
    ]
    alone = renderer.digest_html(TRENDING, EDITION, votes[:1])
    assert "Trending: the most upvoted new paper" in alone


def test_matched_words_are_highlighted_and_escaped(renderer: Renderer) -> None:
    paper = _paper(0, abstract="<script>x</script> We prune. Pruned nets & PRUNING work.")
    html = renderer.digest_html(TOPICAL, EDITION, [paper])
    snippet = re.search(r'<p class="pm-p-abstract"[^>]*>(.*?)</p>', html).group(1)  # type: ignore[union-attr]
    assert snippet == (
        "&lt;script&gt;x&lt;/script&gt; We <b>prune</b>. <b>Pruned</b> nets &amp; "
        "<b>PRUNING</b> work."
    )
    # Terms given by the selection are highlighted instead of the topic's own words.
    termed = replace(paper, matched_terms=("work",))
    snippet = re.search(
        r'<p class="pm-p-abstract"[^>]*>(.*?)</p>', renderer.digest_html(TOPICAL, EDITION, [termed])
    ).group(1)  # type: ignore[union-attr]
    assert "<b>work</b>" in snippet and "<b>prune</b>" not in snippet
    # Trending readers: nothing matched, nothing highlighted.
    assert "<b>" not in renderer.digest_html(
        TRENDING, EDITION, [replace(paper, matched_topic=None)]
    )


def test_card_shows_authors_id_category_date_and_one_read_link(renderer: Renderer) -> None:
    html = renderer.digest_html(TOPICAL, EDITION, [_paper(7)])
    assert (
        "Ada Lovelace, Alan Turing · arXiv:2401.00007 · cs.LG · 26 Nov 2026 · ▲ 93 upvotes" in html
    )
    assert re.search(
        r'<h2 class="pm-p-title"[^>]*>\s*<a href="https://arxiv.org/abs/2401.00007"', html
    )
    assert re.findall(r'class="pm-read" href="([^"]+)"', html) == [
        "https://arxiv.org/abs/2401.00007"
    ]
    quiet = re.findall(r'class="pm-quiet" href="([^"]+)"[^>]*>([^<]+)<', html)
    assert quiet == [
        ("https://arxiv.org/pdf/2401.00007", "PDF"),
        ("https://huggingface.co/papers/2401.00007", "Hugging Face"),
    ]
    assert re.findall(r'class="pm-vote"[^>]*aria-label="([^"]+)"', html) == [
        "More like this",
        "Less like this",
    ]


def test_subject_is_count_and_top_title_within_70_characters(renderer: Renderer) -> None:
    short = renderer.render_digest(TOPICAL, EDITION, [_paper(0), _paper(1)])
    assert short.subject == "2 papers: Paper number 0 on structured pruning"
    long_title = "Scaling laws for " + "very deep sparse transformer networks " * 5
    out = renderer.render_digest(TOPICAL, EDITION, [_paper(0, title=long_title), _paper(1)])
    assert len(out.subject) <= 70 and out.subject.endswith("…")
    assert out.subject.startswith("2 papers: Scaling laws for very deep")
    assert long_title.startswith(out.subject.removeprefix("2 papers: ").removesuffix("…"))
    assert not out.subject.removesuffix("…").endswith(" ")  # cut at a word
    assert renderer.render_digest(TOPICAL, EDITION, [_paper(0)]).subject.startswith("1 paper: ")


def test_text_part_is_78_columns_except_urls_and_each_url_once(renderer: Renderer) -> None:
    papers = [
        _paper(0, title="A rather long title about pruning " * 6),
        _paper(1, authors=[f"Author With A Long Name {k}" for k in range(3)]),
        _paper(2, url="https://papers.example/2401.00002"),  # a page of its own
    ]
    out = renderer.render_digest(TOPICAL, EDITION, papers)
    for line in out.text.splitlines():
        assert len(line) <= 78 or re.search(r"https?://\S+$", line), line
    urls = re.findall(r"https?://\S+", out.text)
    assert len(urls) == len(set(urls))
    assert "   Paper page:     https://papers.example/2401.00002" in out.text
    assert "1. A rather long title about pruning" in out.text


def test_footer_has_why_controls_and_postal_address(renderer: Renderer) -> None:
    out = renderer.render_digest(TOPICAL, EDITION, [_paper(0)])
    footer = out.html[out.html.index("You get this because") :]
    for label in ("Manage preferences", "Unsubscribe", "View in browser", ADDRESS):
        assert label in footer, label
    assert out.text.rstrip().endswith(ADDRESS)


def test_fifty_papers_fit_the_budget_footer_included(renderer: Renderer) -> None:
    papers = [_paper(n) for n in range(50)]
    out = renderer.render_digest(TOPICAL, EDITION, papers)
    size = len(out.html.encode())
    assert size <= config.get_settings().email_max_bytes == 90 * 1024
    cards = _cards(out.html)
    shown = len(cards)
    assert 10 < shown < 50
    # The highest-ranked papers stay, in order; the rest are one link away.
    for n in range(shown):
        assert f"Paper number {n} on" in cards[n]
    hidden = 50 - shown
    more = re.search(r'<a class="pm-more-link" href="([^"]+)"[^>]*>([^<]+)</a>', out.html)
    assert more and more.group(2) == f"{hidden} more papers of this edition on the web"
    view = re.search(r'href="([^"]+)"[^>]*>View in browser<', out.html)
    assert view and more.group(1) == view.group(1)
    assert f"{hidden} more papers of this edition: open \u201cView in browser\u201d" in " ".join(
        out.text.split()
    )
    assert out.text.count("More like this:") == shown  # the text part matches the HTML
    # The footer is whole, inside the budget: its links and the postal address.
    tail = out.html[out.html.rindex(cards[-1]) :]
    for label in ("Unsubscribe", "Manage preferences", ADDRESS, "</html>"):
        assert label in tail
    # Abstracts were shortened before any paper was left out.
    assert "Further words of the abstract follow here to make it long. " * 3 not in out.html
    # The web page (view in browser) has every paper, no budget.
    assert len(_cards(renderer.digest_html(TOPICAL, EDITION, papers))) == 50


def test_abstracts_shorten_first_then_papers_move(env: dict[str, str], tmp_path: Path) -> None:
    papers = [_paper(n) for n in range(12)]
    full = Renderer(load_settings(email_max_bytes=10_000_000), cache_dir=tmp_path)
    whole = full.render_digest(TOPICAL, EDITION, papers)
    size = len(whole.html.encode())
    assert len(_cards(whole.html)) == 12 and 'class="pm-more-link"' not in whole.html
    # A budget just under the full size: shorter abstracts suffice, every paper stays.
    tight = Renderer(load_settings(email_max_bytes=size - 500), cache_dir=tmp_path)
    out = tight.render_digest(TOPICAL, EDITION, papers)
    assert len(_cards(out.html)) == 12 and 'class="pm-more-link"' not in out.html
    assert len(out.html.encode()) <= size - 500
    abstracts = re.findall(r'<p class="pm-p-abstract"[^>]*>(.*?)</p>', out.html)
    assert all(a.endswith("…") and len(a) < 260 for a in abstracts)
    # Much tighter: papers move to the web link too.
    small = Renderer(load_settings(email_max_bytes=30_000), cache_dir=tmp_path)
    out = small.render_digest(TOPICAL, EDITION, papers)
    assert len(out.html.encode()) <= 30_000 and 'class="pm-more-link"' in out.html
    assert len(_cards(out.html)) < 12


@pytest.mark.parametrize("value", ["100", "lots", "0"])
def test_budget_setting_is_checked(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("PAPERMAIL_EMAIL_MAX_BYTES", value)
    with pytest.raises(config.ConfigError, match="PAPERMAIL_EMAIL_MAX_BYTES"):
        config.load_settings()


def test_the_reason_names_only_terms_beyond_the_topic(renderer: Renderer) -> None:
    out = renderer.render_digest(
        TOPICAL,
        EDITION,
        [_paper(0, matched_topic="pruning", matched_terms=("pruning",)),
         _paper(1, matched_topic="reinforcement learning",
                matched_terms=("reinforcement learning", "policy gradient"))],
    )  # fmt: skip
    assert "Because you follow <em>pruning</em></p>" in out.html
    assert "Because you follow <em>reinforcement learning</em>: policy gradient</p>" in out.html
