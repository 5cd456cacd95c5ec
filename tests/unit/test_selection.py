"""Selection: relevance, windows, exclusions, ties, feedback, batching, and the DB helpers.

The papers are the seed page in tests/data/trending_page.txt (title line, abstract line).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import event

from worker import config, db, selection
from worker.models import (
    Delivery,
    DeliveryPaper,
    DeliveryState,
    Feedback,
    Paper,
    Subscriber,
)
from worker.selection import (
    RECEIVED_STATES,
    Candidate,
    Profile,
    Result,
    SelectionInputError,
    SelectionParams,
    analyse,
    load_candidates,
    load_profiles,
    lookback,
    select_batch,
    select_for_subscribers,
    stem,
)

SEED_PAGE = Path(__file__).resolve().parents[1] / "data" / "trending_page.txt"
END = datetime(2026, 11, 27, 7, 0, tzinfo=UTC)
DAY = timedelta(hours=24)


def seed_papers() -> list[tuple[str, str]]:
    """(title, abstract) pairs of the seed page; the first title is glued to "Subscribe"."""
    lines = [line.strip() for line in SEED_PAGE.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    first = next(i for i, line in enumerate(lines) if line.startswith("Subscribe"))
    body = lines[first:]
    body[0] = body[0].removeprefix("Subscribe")
    assert len(body) % 2 == 0, "the seed page should alternate title and abstract lines"
    return list(zip(body[0::2], body[1::2], strict=True))


PAPERS = seed_papers()


def seed_candidates(
    *, same_upvotes: bool = False, same_date: bool = False, ids: Sequence[str] | None = None
) -> list[Candidate]:
    ids = ids or [f"p{i:02d}" for i in range(len(PAPERS))]
    return [
        Candidate(
            id=pid,
            title=title,
            abstract=abstract,
            upvotes=10 if same_upvotes else (i * 37) % 50,
            published=END - timedelta(hours=3 if same_date else 1 + i % 40),
        )
        for i, (pid, (title, abstract)) in enumerate(zip(ids, PAPERS, strict=True))
    ]


def paper_id(cands: Sequence[Candidate], title_start: str) -> str:
    (match,) = [c.id for c in cands if c.title.startswith(title_start)]
    return match


def profile(
    topics: Sequence[str] = (),
    max_papers: int = 5,
    *,
    sid: int = 1,
    end: datetime = END,
    hours: int = 48,
    exclude: Sequence[str] = (),
    votes: dict[str, int] | None = None,
) -> Profile:
    return Profile(
        subscriber_id=sid,
        topics=tuple(topics),
        max_papers=max_papers,
        window_start=end - timedelta(hours=hours),
        window_end=end,
        exclude=frozenset(exclude),
        votes=votes or {},
    )


def select_one(cands: Sequence[Candidate], prof: Profile, **kwargs: Any) -> Result:
    return select_batch(cands, [prof], **kwargs)[prof.subscriber_id]


def ids_of(result: Result) -> list[str]:
    return [p.paper_id for p in result.picks]


# ------------------------------------------------------------------------- text analysis


def test_seed_page_parses_into_title_abstract_pairs() -> None:
    assert len(PAPERS) == 23
    assert PAPERS[0][0] == "Robust Pruning at Initialization"
    assert all(len(abstract) > len(title) for title, abstract in PAPERS)


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("models", "model"),
        ("networks", "network"),
        ("processes", "process"),
        ("studies", "study"),
        ("approaches", "approach"),
        ("gps", "gp"),
        ("gaussian", "gaussian"),
        ("bias", "bias"),
        ("analysis", "analysis"),
        ("loss", "loss"),
        ("corpus", "corpus"),
        ("model", "model"),
    ],
)
def test_stem(word: str, expected: str) -> None:
    assert stem(word) == expected


def test_analyse_counts_unigrams_and_bigrams_case_insensitively() -> None:
    counts, length = analyse("Diffusion Models beat GANs. Models of diffusion")
    assert counts["diffusion model"] == 1  # "Models of diffusion": "of" dropped, reversed
    assert counts["model diffusion"] == 1
    assert counts["model"] == 2 and counts["diffusion"] == 2 and counts["gan"] == 1
    assert "gan model" not in counts  # bigrams never cross a sentence end
    assert length == 6
    assert analyse("Pruning at initialization")[0]["pruning initialization"] == 1


# ----------------------------------------------------------------------------- relevance


@pytest.mark.parametrize(
    ("topic", "title_start"),
    [
        ("pruning", "Robust Pruning at Initialization"),
        ("diffusion models", "Invertible Diffusion Models"),
        ("graph neural networks", "Forward Learning of Graph Neural Networks"),
        ("active learning", "A Survey of Active Learning"),
        ("reinforcement learning", "Adaptive Regularization of Representation Rank"),
    ],
)
def test_a_topic_ranks_its_paper_first(topic: str, title_start: str) -> None:
    cands = seed_candidates()
    result = select_one(cands, profile([topic]))
    assert result.skip_reason is None
    assert result.picks[0].paper_id == paper_id(cands, title_start)
    assert result.picks[0].matched_topic == topic
    assert result.picks[0].relevance >= 0.5


def test_gaussian_processes_picks_exactly_the_gp_papers() -> None:
    cands = seed_candidates()
    result = select_one(cands, profile(["gaussian processes"], 10))
    mentions = {
        c.id for c in cands if re.search(r"gaussian process", (c.title + " " + c.abstract).lower())
    }
    assert len(mentions) >= 3
    assert set(ids_of(result)) == mentions
    # The paper with the phrase in its title comes first.
    assert result.picks[0].paper_id == paper_id(cands, "Spherical Inducing Features")


def test_plural_and_case_variants_match_alike() -> None:
    cands = seed_candidates()
    variants = ["gaussian processes", "Gaussian Process", "GAUSSIAN  PROCESSES"]
    results = select_batch(cands, [profile([t], 10, sid=i) for i, t in enumerate(variants)])
    base = [(p.paper_id, p.relevance, p.score) for p in results[0].picks]
    for i, topic in enumerate(variants):
        assert [(p.paper_id, p.relevance, p.score) for p in results[i].picks] == base
        # The subscriber's own spelling (whitespace tidied) is what the email shows.
        assert {p.matched_topic for p in results[i].picks} == {" ".join(topic.split())}


def test_phrase_beats_scattered_words() -> None:
    # Same words, same lengths, same upvotes and date: only adjacency differs, and the
    # scattered paper has the smaller id so a tie would favour it.
    texts = {
        "diffusion models": (
            "We study models of heat flow in detail; diffusion results follow.",
            "We study diffusion models of heat flow in detail; results follow.",
        ),
        "reinforcement learning": (
            "Learning agents with reinforcement of rewards: robots, games.",
            "Reinforcement learning agents with rewards: robots, games.",
        ),
    }
    for topic, (scattered, phrase) in texts.items():
        cands = [
            Candidate("a-scattered", "A study", scattered, 5, END - DAY),
            Candidate("b-phrase", "A study", phrase, 5, END - DAY),
        ]
        assert ids_of(select_one(cands, profile([topic])))[0] == "b-phrase", topic
        everything = SelectionParams(min_relevance=0.0)
        result = select_one(cands, profile([topic]), params=everything)
        by_id = {p.paper_id: p for p in result.picks}
        assert ids_of(result) == ["b-phrase", "a-scattered"], topic
        assert by_id["b-phrase"].relevance > by_id["a-scattered"].relevance, topic


def test_unrelated_topic_is_skipped_with_reason() -> None:
    cands = seed_candidates()
    results = select_batch(
        cands,
        [
            profile(["quantum chemistry"], sid=1),
            profile(["quantum chemistry", "pruning"], sid=2),
        ],
    )
    assert results[1].picks == []
    assert results[1].skip_reason == "no new paper matches your topics: quantum chemistry"
    assert ids_of(results[2]) == [paper_id(cands, "Robust Pruning")]
    assert results[2].picks[0].matched_topic == "pruning"
    assert results[2].skip_reason is None


def test_min_relevance_comes_from_settings(env: dict[str, str]) -> None:
    cands = seed_candidates()
    strict = SelectionParams.from_settings(config.load_settings(min_relevance=5.0))
    assert strict.min_relevance == 5.0
    assert SelectionParams.from_settings(config.load_settings()).min_relevance == 0.15
    result = select_one(cands, profile(["pruning"]), params=strict)
    assert result.picks == [] and result.skip_reason is not None
    assert result.skip_reason.startswith("no new paper matches your topics")


# ------------------------------------------------------------------- windows and exclusion


def test_no_repeats_across_consecutive_days_then_skip() -> None:
    cands = seed_candidates(same_date=True)
    for c in cands:  # every paper published the evening before day one
        assert END - DAY <= c.published <= END
    received: set[str] = set()
    day, editions = 0, []
    while True:
        result = select_one(cands, profile([], 5, end=END + day * DAY, exclude=sorted(received)))
        if not result.picks:
            break
        picked = set(ids_of(result))
        assert not picked & received, f"day {day} repeats {picked & received}"
        editions.append(picked)
        received |= picked
        day += 1
    # Published 3 hours before day one, the papers are in the 48-hour window of days one
    # and two only: two editions of five different papers, then nothing new is left.
    assert len(editions) == 2 and all(len(e) == 5 for e in editions)
    assert result.skip_reason == "no new papers in the last 48 hours"


def test_skip_when_everything_in_the_window_was_received() -> None:
    cands = seed_candidates()
    result = select_one(cands, profile([], 5, exclude=[c.id for c in cands]))
    assert result.picks == []
    assert result.skip_reason == "no new papers in the last 48 hours"


def test_window_bounds_and_weekly_lookback(env: dict[str, str]) -> None:
    settings = config.load_settings()
    assert lookback(settings, "daily") == timedelta(hours=48)
    assert lookback(settings, "weekly") == timedelta(hours=192)
    text = PAPERS[0]
    cands = [
        Candidate("edge", *text, 1, END - timedelta(hours=48)),  # exactly at the start
        Candidate("old", *text, 50, END - timedelta(hours=72)),
        Candidate("ancient", *text, 90, END - timedelta(days=30)),
        Candidate("future", *text, 99, END + timedelta(minutes=1)),
    ]
    daily = select_one(cands, profile(["pruning"], 10, hours=48))
    weekly = select_one(cands, profile(["pruning"], 10, hours=192))
    assert ids_of(daily) == ["edge"]
    assert sorted(ids_of(weekly)) == ["edge", "old"]
    empty = select_one(cands, profile(["pruning"], 10, end=END - timedelta(hours=100)))
    assert empty.skip_reason == "no new papers in the last 48 hours"
    weekly_empty = select_one(cands[:1], profile([], 3, end=END + timedelta(days=30), hours=192))
    assert weekly_empty.skip_reason == "no new papers in the last 8 days"


def test_voted_papers_are_never_sent_again() -> None:
    cands = seed_candidates()
    target = paper_id(cands, "Robust Pruning")
    result = select_one(cands, profile(["pruning"], 5, votes={target: 1}))
    assert target not in ids_of(result)


# --------------------------------------------------------------------- trending and ties


def test_subscriber_without_topics_gets_the_trending_top() -> None:
    cands = seed_candidates(same_date=True)
    result = select_one(cands, profile([], 6))
    expected = [c.id for c in sorted(cands, key=lambda c: (-c.upvotes, c.id))][:6]
    assert ids_of(result) == expected
    assert all(p.matched_topic is None for p in result.picks)
    scores = [p.score for p in result.picks]
    assert scores == sorted(scores, reverse=True)


def test_freshness_breaks_equal_upvotes() -> None:
    text = PAPERS[3]
    cands = [
        Candidate("a-older", *text, 10, END - timedelta(hours=40)),
        Candidate("b-newer", *text, 10, END - timedelta(hours=2)),
    ]
    assert ids_of(select_one(cands, profile([], 2))) == ["b-newer", "a-older"]


@pytest.mark.parametrize("max_papers", [1, 3, 7, 22, 50])
def test_max_papers_is_respected(max_papers: int) -> None:
    cands = seed_candidates()
    for topics in ([], ["neural networks"]):
        result = select_one(cands, profile(topics, max_papers))
        assert 1 <= len(result.picks) <= max_papers
        assert len(set(ids_of(result))) == len(result.picks)
    assert len(select_one(cands, profile([], max_papers)).picks) == min(max_papers, len(cands))


def test_ties_go_by_id_whatever_the_input_order() -> None:
    title, abstract = PAPERS[1]
    ids = ["c7", "a2", "b9", "a10", "z1", "m5"]
    cands = [Candidate(pid, title, abstract, 10, END - DAY) for pid in ids]
    expected = sorted(ids)[:4]
    rng = random.Random(3)
    for _ in range(5):
        rng.shuffle(cands)
        result = select_one(cands, profile(["gaussian processes"], 4))
        assert ids_of(result) == expected
        assert len({p.score for p in result.picks}) == 1  # a genuine tie


def test_equal_scores_then_upvotes_decide() -> None:
    title, abstract = PAPERS[1]
    cands = [
        Candidate("a", title, abstract, 3, END - DAY),
        Candidate("b", title, abstract, 30, END - DAY),
        Candidate("c", title, abstract, 30, END - DAY),
    ]
    flat = SelectionParams(trending_weight=0.0)
    result = select_one(cands, profile([], 3), params=flat)
    assert len({p.score for p in result.picks}) == 1
    assert ids_of(result) == ["b", "c", "a"]


# ------------------------------------------------------------------------------ feedback


def _feedback_candidates(kernel_id: str) -> tuple[list[Candidate], str, str]:
    """Equal upvotes and dates, so only ids (and votes) order the papers.

    The kernel-machine paper is the one most similar to the representation-learning
    theory paper; ``kernel_id`` decides whether it wins ("a...") or loses ("z...") ties.
    """
    cands = seed_candidates(same_upvotes=True, same_date=True)
    rename = {
        paper_id(cands, "Convolutional Deep Kernel Machines"): kernel_id,
        paper_id(cands, "A theory of representation learning"): "theory",
    }
    cands = [
        Candidate(rename.get(c.id, c.id), c.title, c.abstract, c.upvotes, c.published)
        for c in cands
    ]
    return cands, kernel_id, "theory"


def test_more_like_this_pulls_similar_papers_in() -> None:
    cands, kernel, theory = _feedback_candidates("zz-kernel")
    before = select_one(cands, profile([], 3))
    assert kernel not in ids_of(before)  # it loses every tie
    after = select_one(cands, profile([], 3, votes={theory: 1}))
    assert ids_of(after)[0] == kernel
    assert theory not in ids_of(after)
    assert after.picks[0].relevance > 0  # the feedback term


def test_less_like_this_pushes_similar_papers_out() -> None:
    cands, kernel, theory = _feedback_candidates("a-kernel")
    before = select_one(cands, profile([], 3))
    assert ids_of(before)[0] == kernel  # it wins every tie
    after = select_one(cands, profile([], 3, votes={theory: -1}))
    assert kernel not in ids_of(after)
    assert len(after.picks) == 3


def test_votes_shift_topic_relevance_and_membership() -> None:
    cands, kernel, theory = _feedback_candidates("a-kernel")
    base = select_one(cands, profile(["gaussian processes"], 5))
    liked = select_one(cands, profile(["gaussian processes"], 5, votes={theory: 1}))
    disliked = select_one(cands, profile(["gaussian processes"], 5, votes={theory: -1}))
    rel = {
        name: {p.paper_id: p.relevance for p in r.picks}
        for name, r in (("base", base), ("liked", liked), ("disliked", disliked))
    }
    assert rel["liked"][kernel] > rel["base"][kernel] > rel["disliked"][kernel]
    # A strong dislike can drop a weak match below the minimum relevance.
    strong = SelectionParams(feedback_weight=10.0)
    gone = select_one(cands, profile(["gaussian processes"], 5, votes={theory: -1}), params=strong)
    assert kernel in ids_of(base) and kernel not in ids_of(gone)


def test_a_vote_on_an_older_paper_uses_its_text() -> None:
    cands, kernel, theory = _feedback_candidates("zz-kernel")
    cands = [c for c in cands if c.id != kernel]  # the liked paper is no longer a candidate
    liked = Candidate(kernel, *PAPERS[11], 10, END - timedelta(days=20))
    assert liked.title.startswith("Convolutional Deep Kernel Machines")
    before = select_one(cands, profile([], 3))
    assert theory not in ids_of(before)
    after = select_one(cands, profile([], 3, votes={kernel: 1}), voted_papers={kernel: liked})
    assert ids_of(after)[0] == theory
    # Without its text the vote cannot steer anything (and is ignored, not an error).
    assert select_one(cands, profile([], 3, votes={kernel: 1})) == before


# ------------------------------------------------------------------------------ batching


def _random_profiles(cands: Sequence[Candidate], n: int, seed: int) -> list[Profile]:
    rng = random.Random(seed)
    pool = [
        "pruning",
        "Gaussian processes",
        "diffusion models",
        "graph neural networks",
        "quantum chemistry",
        "neural networks",
        "kernel methods",
        "deep learning",
        "compression",
    ]
    ids = [c.id for c in cands]
    out = []
    for sid in range(n):
        votes = {pid: rng.choice((-1, 1)) for pid in rng.sample(ids, rng.choice((0, 0, 1, 2)))}
        out.append(
            profile(
                rng.sample(pool, rng.randint(0, 3)),
                rng.randint(1, 8),
                sid=sid,
                end=END + timedelta(hours=rng.randint(-30, 30)),
                hours=rng.choice((48, 192)),
                exclude=rng.sample(ids, rng.randint(0, 6)),
                votes=votes,
            )
        )
    return out


def test_batch_equals_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selection, "_ROW_CHUNK", 7)  # several chunks, uneven sizes
    cands = seed_candidates()
    extra = Candidate("old-voted", *PAPERS[11], 5, END - timedelta(days=40))
    profiles = _random_profiles(cands, 60, seed=11)
    profiles.append(profile(["kernel methods"], 4, sid=999, votes={"old-voted": 1}))
    voted = {"old-voted": extra}
    batch = select_batch(cands, profiles, voted_papers=voted)
    assert set(batch) == {p.subscriber_id for p in profiles}
    assert any(r.picks for r in batch.values()) and any(not r.picks for r in batch.values())
    for prof in profiles:
        alone = select_batch(list(reversed(cands)), [prof], voted_papers=voted)
        assert alone[prof.subscriber_id] == batch[prof.subscriber_id], prof.subscriber_id


def test_topic_rows_are_kept_per_corpus_and_equal_fresh_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A topic's relevance row is computed once per corpus and reused by later chunks; it
    # must equal the row computed with any other set of topics, bit for bit.
    cands = sorted(seed_candidates(), key=lambda c: (-c.upvotes, c.id))
    corpus = selection._corpus_for(cands, SelectionParams())
    topics = ["pruning", "gaussian processes", "diffusion models", "no such topic"]

    def rows(some: list[str]) -> np.ndarray:
        return np.array([row for row, _, _ in selection._concept_scores(corpus, some)])

    together = rows(topics)
    for n, topic in enumerate(topics):
        alone = rows([topic])
        assert alone.tobytes() == together[n].tobytes()
    corpus.topic_rows.clear()
    first = selection._topic_scores(corpus, topics[:2])
    assert set(corpus.topic_rows) == set(topics[:2])
    again = selection._topic_scores(corpus, topics[::-1])  # two kept rows, two new ones
    assert again.tobytes() == together[::-1].tobytes()
    assert first.tobytes() == together[:2].tobytes()
    # Bounded: past the limit the kept rows are dropped, and the answer is still right.
    monkeypatch.setattr(selection, "_TOPIC_ROW_BYTES", 3 * 8 * corpus.n_docs)  # 3 rows
    corpus.topic_rows.clear()
    selection._topic_scores(corpus, topics[:2])
    assert selection._topic_scores(corpus, topics[2:]).tobytes() == together[2:].tobytes()
    assert set(corpus.topic_rows) == set(topics[2:])


def test_every_result_obeys_the_rules() -> None:
    cands = seed_candidates()
    by_id = {c.id: c for c in cands}
    profiles = _random_profiles(cands, 200, seed=5)
    results = select_batch(cands, profiles)
    for prof in profiles:
        result = results[prof.subscriber_id]
        assert (result.skip_reason is None) == bool(result.picks)
        assert len(result.picks) <= prof.max_papers
        for pick in result.picks:
            paper = by_id[pick.paper_id]
            assert prof.window_start <= paper.published <= prof.window_end
            assert pick.paper_id not in prof.exclude and pick.paper_id not in prof.votes
            if prof.topics:
                assert pick.relevance >= 0.15
        keys = [(-p.score, -by_id[p.paper_id].upvotes, p.paper_id) for p in result.picks]
        assert keys == sorted(keys)


def test_changed_texts_are_not_served_from_the_corpus_cache() -> None:
    cands = seed_candidates()
    first = select_one(cands, profile(["pruning"]))
    target = paper_id(cands, "Robust Pruning")
    edited = [
        Candidate(c.id, "Garden birds", "A survey of garden birds.", c.upvotes, c.published)
        if c.id == target
        else c
        for c in cands
    ]
    second = select_one(edited, profile(["pruning"]))
    assert ids_of(first) == [target]
    assert second.picks == [] and second.skip_reason is not None
    assert select_one(cands, profile(["pruning"])) == first


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_a_specific_error(env: dict[str, str]) -> None:
    naive = datetime(2026, 11, 27, 7)
    with pytest.raises(SelectionInputError, match="timezone-aware"):
        Candidate("x", "t", "a", 1, naive)
    with pytest.raises(SelectionInputError, match="max_papers must be >= 1"):
        profile(["x"], 0)
    with pytest.raises(SelectionInputError, match="is after window_end"):
        Profile(1, (), 3, END, END - DAY)
    with pytest.raises(SelectionInputError, match=r"must be \+1 or -1"):
        profile([], 3, votes={"p00": 2})
    with pytest.raises(SelectionInputError, match="appears twice in a batch"):
        select_batch(seed_candidates(), [profile(sid=4), profile(sid=4)])
    cands = seed_candidates()
    clash = Candidate(cands[0].id, "other", "text", 1, END)
    with pytest.raises(SelectionInputError, match="appears twice with different data"):
        select_batch([*cands, clash], [profile()])
    with pytest.raises(SelectionInputError, match="unknown frequency 'hourly'"):
        lookback(config.load_settings(), "hourly")
    with pytest.raises(SelectionInputError, match="feedback_weight must be >= 0"):
        SelectionParams(feedback_weight=-1)
    assert issubclass(SelectionInputError, ValueError)


def test_empty_inputs() -> None:
    assert select_batch(seed_candidates(), []) == {}
    result = select_one([], profile(["pruning"]))
    assert result == Result([], "no new papers in the last 48 hours")


# ------------------------------------------------------------------------------ database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_session(request: pytest.FixtureRequest) -> Iterator[db.Session]:
    if request.param == "postgres":
        request.getfixturevalue("pg_env")
    else:
        request.getfixturevalue("settings")
    with db.session_scope() as s:
        yield s


class QueryCounter:
    def __init__(self, session: db.Session) -> None:
        self.engine = session.get_bind()
        self.count = 0

    def _on_execute(self, *_args: Any) -> None:
        self.count += 1

    def __enter__(self) -> QueryCounter:
        event.listen(self.engine, "before_cursor_execute", self._on_execute)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._on_execute)


def _store_papers(session: db.Session) -> list[Paper]:
    papers = []
    for i, (title, abstract) in enumerate(PAPERS):
        papers.append(
            Paper(
                id=f"2611.{i:05d}",
                title=title,
                abstract=abstract,
                upvotes=(i * 37) % 50,
                # Every fifth paper has no publication date: it counts from its ingestion.
                published_at=None if i % 5 == 4 else END - timedelta(hours=1 + i),
                ingested_at=END - timedelta(hours=2 + i),
            )
        )
    papers.append(
        Paper(
            id="old",
            title="Pruning old",
            abstract="pruning",
            published_at=END - 10 * DAY,
            ingested_at=END - 10 * DAY,
        )
    )
    session.add_all(papers)
    session.flush()
    return papers


def _subscriber(session: db.Session, n: int, topics: list[str], **kw: Any) -> Subscriber:
    sub = Subscriber(email=f"s{n}@example.org", status="active", topics=topics, **kw)
    session.add(sub)
    session.flush()
    return sub


def _deliver(session: db.Session, sub: Subscriber, day: date, state: str, ids: list[str]) -> None:
    delivery = Delivery(subscriber_id=sub.id, edition_date=day, state=state)
    session.add(delivery)
    session.flush()
    session.add_all(
        DeliveryPaper(delivery_id=delivery.id, paper_id=pid, position=i)
        for i, pid in enumerate(ids)
    )
    session.flush()


def test_load_candidates_uses_the_effective_date(any_session: db.Session) -> None:
    papers = _store_papers(any_session)
    start, end = END - timedelta(hours=10), END
    got = load_candidates(any_session, start, end)
    expected = {p.id for p in papers if start <= p.effective_date <= end}
    assert {c.id for c in got} == expected
    assert any(p.published_at is None for p in papers if p.id in expected)
    for cand in got:
        paper = next(p for p in papers if p.id == cand.id)
        assert cand.published == paper.effective_date and cand.published.tzinfo is not None
    with pytest.raises(SelectionInputError, match="is after window_end"):
        load_candidates(any_session, end, start)


def test_load_profiles_excludes_what_was_received(any_session: db.Session) -> None:
    settings = config.get_settings()
    papers = _store_papers(any_session)
    pid = [p.id for p in papers]
    sub = _subscriber(any_session, 1, ["pruning", " Pruning ", ""], max_papers=4)
    weekly = _subscriber(any_session, 2, [], frequency="weekly", weekday=4)
    states = sorted(DeliveryState)
    for i, state in enumerate(states):
        _deliver(any_session, sub, date(2026, 11, 1 + i), state, [pid[i]])
    _deliver(any_session, sub, date(2026, 10, 1), DeliveryState.SENT, ["old"])  # too old
    any_session.add(Feedback(subscriber_id=sub.id, paper_id=pid[20], vote=-1))
    any_session.add(Feedback(subscriber_id=weekly.id, paper_id="old", vote=1))
    any_session.flush()

    ends = {sub.id: END, weekly.id: END}
    profiles, voted = load_profiles(any_session, [sub, weekly], ends, settings)
    by_sub = {p.subscriber_id: p for p in profiles}
    received = {pid[i] for i, state in enumerate(states) if state in RECEIVED_STATES}
    assert len(received) == 6
    assert by_sub[sub.id].exclude == received  # pending, skipped and failed do not count
    assert by_sub[sub.id].topics == ("pruning",)
    assert by_sub[sub.id].max_papers == 4
    assert by_sub[sub.id].window_start == END - timedelta(hours=48)
    assert by_sub[weekly.id].window_start == END - timedelta(hours=192)
    assert by_sub[sub.id].votes == {pid[20]: -1}
    assert by_sub[weekly.id].votes == {"old": 1}
    assert set(voted) == {pid[20], "old"} and voted["old"].title == "Pruning old"

    with pytest.raises(SelectionInputError, match=f"no window end given for subscriber {sub.id}"):
        load_profiles(any_session, [sub], {}, settings)


def test_db_selection_costs_a_constant_number_of_queries(any_session: db.Session) -> None:
    settings = config.get_settings()
    papers = _store_papers(any_session)
    subs = [_subscriber(any_session, n, ["neural networks"] if n % 2 else []) for n in range(12)]
    for n, sub in enumerate(subs):
        _deliver(any_session, sub, date(2026, 11, 26), DeliveryState.SENT, [papers[n].id])
        any_session.add(Feedback(subscriber_id=sub.id, paper_id=papers[n + 1].id, vote=1))
    any_session.flush()
    counts = []
    for size in (1, 3, 12):
        batch = subs[:size]
        with QueryCounter(any_session) as counter:
            results = select_for_subscribers(
                any_session, batch, {s.id: END for s in batch}, settings
            )
        counts.append(counter.count)
        assert set(results) == {s.id for s in batch}
        for n, sub in enumerate(batch):
            assert papers[n].id not in ids_of(results[sub.id])  # received
            assert papers[n + 1].id not in ids_of(results[sub.id])  # voted on
    assert counts[0] == counts[1] == counts[2] == 3, counts


def test_a_vote_changes_the_next_digest(any_session: db.Session) -> None:
    settings = config.get_settings()
    cands, kernel, theory = _feedback_candidates("a-kernel")
    for c in cands:
        any_session.add(
            Paper(
                id=c.id,
                title=c.title,
                abstract=c.abstract,
                upvotes=c.upvotes,
                published_at=c.published,
            )
        )
    sub = _subscriber(any_session, 1, [], max_papers=3)
    any_session.flush()
    ends = {sub.id: END}
    before = select_for_subscribers(any_session, [sub], ends, settings)[sub.id]
    assert kernel in ids_of(before)
    any_session.add(Feedback(subscriber_id=sub.id, paper_id=theory, vote=-1))
    any_session.flush()
    after = select_for_subscribers(any_session, [sub], ends, settings)[sub.id]
    assert kernel not in ids_of(after) and theory not in ids_of(after)
    assert len(after.picks) == 3
