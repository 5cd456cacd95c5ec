"""Rank candidate papers for many subscribers at once.

One call scores every (subscriber, paper) pair of a batch with a few matrix operations:

* **Relevance** is BM25 over title and abstract (the title counts ``title_weight`` times),
  with a vocabulary of stemmed unigrams *and* adjacent bigrams, so a topic phrase such as
  "diffusion models" scores higher where the words stand together than where they are
  scattered. A topic's score is divided by its *self-match* (the score of a paper of
  average length whose title is the topic) so 1.0 means "a strong match" whatever the
  topic, and multiplied by its *coverage* (the share of the topic's IDF mass the paper
  contains) so "graph neural networks" does not match every paper that says "neural
  networks". A subscriber's relevance is the best of their topics; that topic is the
  pick's ``matched_topic``.
* **Feedback** is Rocchio-like: the unit term vectors of the papers a subscriber voted on
  (+1 / -1, averaged per sign) are added to their query with ``feedback_weight``. The query
  is linear, so that is a cosine-similarity term added to the relevance of every topic.
* **Score** = min(relevance, cap) + feedback + trending (log1p(upvotes), relative to the
  best in the subscriber's window) + freshness (exponential decay before the window end).
  Topic subscribers only get papers whose relevance reaches ``min_relevance``; subscribers
  without topics get the trending top. Bands come first (``strong_relevance``, and above it
  the *title band*: strong matches whose title names the topic, ``title_relevance``), so
  trending and freshness only order papers within a band.
* Ties are broken by upvotes (desc), then paper id (asc): candidates are laid out in that
  order and the top-k is taken stably, so results do not depend on input order.

Work is shared as widely as it can be: the candidates' term matrices are built once per
candidate list (and kept for the next call with the same list, since every chunk of a run
has the same candidates); each distinct topic is one row of a sparse query matrix that is
multiplied with the document matrix once; the per-subscriber part is numpy over dense
(subscribers x candidates) blocks: window and exclusion masks, max over topics, top-k by
partition. The only Python loops are over subscribers (to gather indices) and picks.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from functools import lru_cache
from itertools import chain, pairwise
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import scipy.sparse as sp
from sqlalchemy import and_, or_, select

from worker.concepts import concept_for
from worker.errors import InvalidInput
from worker.models import (
    Delivery,
    DeliveryPaper,
    DeliveryState,
    Feedback,
    Frequency,
    Paper,
    Subscriber,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worker.config import Settings

__all__ = [
    "RECEIVED_STATES",
    "Candidate",
    "Edition",
    "EditionSelection",
    "Explained",
    "Pick",
    "Profile",
    "Result",
    "SelectionInputError",
    "SelectionParams",
    "analyse",
    "edition_rounds",
    "explain_profile",
    "load_candidates",
    "load_profiles",
    "lookback",
    "select_batch",
    "select_editions",
    "select_for_subscribers",
    "stem",
]

log = logging.getLogger(__name__)

# A paper counts as received once a delivery carrying it was (or may have been) sent.
RECEIVED_STATES = frozenset(
    {
        DeliveryState.SENDING,
        DeliveryState.SENT,
        DeliveryState.DELIVERED,
        DeliveryState.BOUNCED,
        DeliveryState.COMPLAINED,
        DeliveryState.UNKNOWN,
    }
)

# Only the most recent votes steer the query (bounded work, and tastes drift).
MAX_VOTES_PER_SUBSCRIBER = 50
# IN-lists are split so SQLite's bound-parameter limit is never reached; a batch of up to
# this many subscribers (settings.chunk_size is at most 5000) costs a constant 2 queries.
_ID_CHUNK = 5000
# Rows of the dense (subscribers x candidates) blocks scored at a time.
_ROW_CHUNK = 2048


class SelectionInputError(InvalidInput, ValueError):
    """Bad input to selection (naive datetime, empty window, invalid vote...)."""


# --------------------------------------------------------------------------- data types


def _aware(value: object) -> bool:
    return (
        isinstance(value, datetime) and value.tzinfo is not None and value.utcoffset() is not None
    )


def _require_aware(value: datetime, what: str) -> None:
    if not _aware(value):
        raise SelectionInputError(f"{what} must be a timezone-aware datetime, got {value!r}")


@dataclass(frozen=True, slots=True)
class Candidate:
    """One paper that may be picked."""

    id: str
    title: str
    abstract: str
    upvotes: int
    published: datetime  # effective date (published_at, or ingested_at), UTC-aware
    categories: tuple[str, ...] = ()  # arXiv categories, primary first; () when unknown

    def __post_init__(self) -> None:
        # The messages are formatted only on failure: a chunk builds hundreds of these.
        if not self.id:
            raise SelectionInputError("a candidate paper needs a non-empty id")
        if not _aware(self.published):
            _require_aware(self.published, f"published date of paper {self.id!r}")


@dataclass(frozen=True, slots=True)
class Profile:
    """One subscriber's edition: what they want and what they already have."""

    subscriber_id: int
    topics: tuple[str, ...]
    max_papers: int
    window_start: datetime
    window_end: datetime
    exclude: frozenset[str] = frozenset()  # paper ids already received
    votes: Mapping[str, int] = field(default_factory=dict)  # paper_id -> +1 / -1
    # arXiv filters (worker.categories): primary category in the first, none in the second.
    categories_only: tuple[str, ...] = ()
    categories_exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        who = f"subscriber {self.subscriber_id}"
        if isinstance(self.topics, str):
            raise SelectionInputError(f"{who}: topics must be a sequence of strings, not a str")
        if isinstance(self.categories_only, str) or isinstance(self.categories_exclude, str):
            raise SelectionInputError(f"{who}: categories must be a sequence of strings, not a str")
        if not isinstance(self.max_papers, int) or self.max_papers < 1:
            raise SelectionInputError(f"{who}: max_papers must be >= 1, got {self.max_papers!r}")
        if not (_aware(self.window_start) and _aware(self.window_end)):
            _require_aware(self.window_start, f"{who}: window_start")
            _require_aware(self.window_end, f"{who}: window_end")
        if self.window_start > self.window_end:
            raise SelectionInputError(
                f"{who}: window_start {self.window_start.isoformat()} is after "
                f"window_end {self.window_end.isoformat()}"
            )
        for paper_id, vote in self.votes.items():
            if vote not in (-1, 1):
                raise SelectionInputError(
                    f"{who}: vote on paper {paper_id!r} must be +1 or -1, got {vote!r}"
                )


# Picks and results are named tuples: as immutable as frozen dataclasses, and made
# several times faster (a frozen dataclass sets each field through object.__setattr__),
# which counted at ~6 picks and a result per subscriber of every chunk.
class Pick(NamedTuple):
    paper_id: str
    score: float
    relevance: float  # topic relevance (capped) plus the feedback term
    matched_topic: str | None  # None: no topics, or picked by trending/feedback alone
    # What in the paper matched the topic (its words, or the concept's phrases), for the
    # email's reason line; () when no topic matched.
    matched_terms: tuple[str, ...] = ()


class Result(NamedTuple):
    picks: list[Pick]
    skip_reason: str | None  # set iff picks is empty


_new_tuple = tuple.__new__  # Pick(...) without the named tuple's Python-level __new__


@dataclass(frozen=True)
class SelectionParams:
    min_relevance: float = 0.15
    trending_weight: float = 0.5
    freshness_weight: float = 0.25
    freshness_half_life_hours: float = 24.0
    feedback_weight: float = 2.0  # cosine similarities between papers are small (~0.05-0.3)
    # Relevance above this adds nothing: among strong matches, trending and freshness decide.
    relevance_cap: float = 1.0
    # Relevance first: every match at least this strong ranks above every weaker one;
    # upvotes and freshness only order papers within a band.
    strong_relevance: float = 0.5
    # A second, higher band (0: none): matches this strong rank above the other strong ones.
    top_relevance: float = 0.0
    # Title band (0: none): a strong match whose *title* names the topic (its own words, or
    # a concept phrase, times the phrase's and the field's weight) at least this much ranks
    # above the strong matches that name it only in the abstract: the topic is its subject.
    title_relevance: float = 0.5
    # A concept phrase (acronym, synonym) counts this much of the topic's own words.
    phrase_weight: float = 0.9
    use_concepts: bool = True  # off: a topic is matched by its own words only (as before)
    # Co-occurrence expansion (see _expansion_damp); 0 turns it off.
    expansion_weight: float = 0.3
    # A topic or concept phrase of several words matches only papers with the whole phrase.
    phrase_gate: bool = True
    title_weight: float = 3.0
    bigram_weight: float = 2.0  # a topic's phrase counts this much more than each word
    k1: float = 1.2
    b: float = 0.75

    def __post_init__(self) -> None:
        for name in (
            "min_relevance",
            "trending_weight",
            "freshness_weight",
            "feedback_weight",
            "bigram_weight",
            "k1",
            "strong_relevance",
            "top_relevance",
            "title_relevance",
            "phrase_weight",
            "expansion_weight",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise SelectionInputError(f"selection parameter {name} must be >= 0, got {value}")
        for name in ("freshness_half_life_hours", "relevance_cap", "title_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise SelectionInputError(f"selection parameter {name} must be > 0, got {value}")
        if not 0 <= self.b <= 1:
            raise SelectionInputError(f"selection parameter b must be in [0, 1], got {self.b}")

    @classmethod
    def from_settings(cls, settings: Settings) -> SelectionParams:
        return cls(min_relevance=settings.min_relevance)


# ------------------------------------------------------------------------- text analysis

_WORD = re.compile(r"[^\W_]+")
# Bigrams never span punctuation that separates phrases.
_PHRASE_BREAK = re.compile(r"[.!?;:,()\[\]{}\"“”«»|/]+")
_STOPWORD_TEXT = """
    a an and are as at be been being but by can could did do does for from had has have
    how however i if in into is it its itself may might more most no not of on or our over
    so such than that the their them then there these they this those through to under up
    us via was we were what when where which while who whom why will with within without
    would you your"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
# Words ending in "s" that are not plurals (the suffix rules below would mangle them).
_KEEP_S = ("ss", "us", "is", "as")


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """A light plural stemmer: models->model, processes->process, studies->study.

    Deliberately conservative: "gaussian", "bias", "analysis", "loss" stay as they are.
    """
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith("sses"):
        return word[:-2]
    if len(word) > 4 and word.endswith(("ches", "shes", "xes")):
        return word[:-2]
    if len(word) >= 3 and word.endswith("s") and not word.endswith(_KEEP_S):
        return word[:-1]
    return word


def analyse(text: str) -> tuple[Counter[str], int]:
    """Stemmed unigram and bigram counts of ``text``, and its number of unigrams.

    Case-insensitive; stop words and one-letter tokens are dropped; a bigram joins two
    consecutive kept words of the same phrase (so "pruning at initialization" yields
    "pruning initialization").
    """
    counts: Counter[str] = Counter()
    length = 0
    for phrase in _PHRASE_BREAK.split(text.lower()):
        words = [stem(w) for w in _WORD.findall(phrase) if len(w) > 1 and w not in _STOPWORDS]
        if not words:
            continue
        length += len(words)
        counts.update(words)
        counts.update(map(" ".join, pairwise(words)))
    return counts, length


def _clean_topics(topics: Iterable[str]) -> tuple[str, ...]:
    """Stripped, whitespace-collapsed, de-duplicated (case-insensitively) topics."""
    seen: set[str] = set()
    out: list[str] = []
    for raw in topics:
        if not isinstance(raw, str):
            raise SelectionInputError(f"a topic must be a string, got {raw!r}")
        topic = " ".join(raw.split())
        key = topic.lower()
        if topic and key not in seen:
            seen.add(key)
            out.append(topic)
    return tuple(out)


def _clean_profile_topics(topics: Sequence[str]) -> tuple[str, ...]:
    """:func:`_clean_topics` of a profile's topics; the same few lists recur across a batch."""
    if isinstance(topics, tuple):
        try:
            return _clean_topics_cached(topics)
        except TypeError:  # an unhashable item: let _clean_topics name it
            pass
    return _clean_topics(topics)


@lru_cache(maxsize=4096)
def _clean_topics_cached(topics: tuple[str, ...]) -> tuple[str, ...]:
    return _clean_topics(topics)


# ------------------------------------------------------------------------------ scoring


# Archives of computing: a paper whose primary category is one of these but not one of the
# concept's (an LLM paper in cs.GT, a GNN in cs.IT) is an application of the method, not a
# homonym from another science; its match counts this much. The phrase gate keeps their real
# homonyms ("embeddings of linear codes", "reinforced concrete") out anyway.
COMPUTING_ARCHIVES = ("cs.", "eess.")
COMPUTING_WEIGHT = 0.45  # below strong_relevance: never among the strong matches alone


def _field_weight(cats: Sequence[str], fields: frozenset[str]) -> float:
    if cats[0] in fields:
        return 1.0
    if not fields.isdisjoint(cats):
        return 0.5
    if cats[0].startswith(COMPUTING_ARCHIVES) and "cs.LG" in fields:
        return COMPUTING_WEIGHT
    return 0.0


class _Corpus:
    """BM25 statistics and matrices of one candidate list; immutable once built.

    Building it (tokenising every title and abstract) is the costly part of a call, and
    consecutive chunks of a run share their candidates, so the last few are cached.
    """

    def __init__(self, candidates: Sequence[Candidate], params: SelectionParams) -> None:
        self.params = params
        self.n_docs = n = len(candidates)
        self.vocab: dict[str, int] = {}
        vocab = self.vocab
        setdefault = vocab.setdefault
        indptr = [0]
        cols: list[int] = []
        tfs: list[float] = []
        lengths: list[float] = []
        t_indptr = [0]
        t_cols: list[int] = []
        seen: dict[str, tuple[Counter[str], int]] = {}  # tokenisation cache of this build
        for cand in candidates:
            counts, length = self._doc_terms(cand.title, cand.abstract, seen)
            # New terms extend the vocabulary in order of appearance: for a given candidate
            # list the columns, hence the float summation order, are always the same.
            cols.extend([setdefault(term, len(vocab)) for term in counts])
            tfs.extend(counts.values())
            indptr.append(len(cols))
            lengths.append(length)
            t_cols.extend([vocab[term] for term in seen[cand.title][0]])
            t_indptr.append(len(t_cols))
        n_terms = len(vocab)
        tf = sp.csr_matrix(
            (
                np.asarray(tfs, dtype=np.float64),
                np.asarray(cols, dtype=np.int64),
                np.asarray(indptr, dtype=np.int64),
            ),
            shape=(n, n_terms),
        )
        tf.sort_indices()
        doc_len = np.asarray(lengths, dtype=np.float64)
        total = float(doc_len.sum())
        self.avgdl = total / n if n and total > 0 else 1.0
        df = np.bincount(tf.indices, minlength=n_terms).astype(np.float64)
        # BM25's IDF (always positive); a term no candidate has gets the highest.
        self.idf = np.log1p((n - df + 0.5) / (df + 0.5))
        self.idf_unseen = math.log1p((n + 0.5) / 0.5)
        weights = self._bm25(tf, doc_len)
        self.doc_weights_t = weights.T.tocsr()  # terms x docs
        self.doc_units = _unit_rows(weights)  # docs x terms
        self.doc_units_t = self.doc_units.T.tocsr()
        unigram = np.fromiter((" " not in term for term in vocab), dtype=bool, count=n_terms)
        presence = tf.copy()
        presence.data = np.ones_like(presence.data)
        self.unigram_presence_t = (presence @ sp.diags(unigram.astype(np.float64))).T.tocsr()
        self.bigram_presence_t = (presence @ sp.diags((~unigram).astype(np.float64))).T.tocsr()
        # Terms x docs: 1 where the term is in the paper's title (for the title band).
        self.title_presence_t = sp.csr_matrix(
            (
                np.ones(len(t_cols)),
                np.asarray(t_cols, dtype=np.int64),
                np.asarray(t_indptr, dtype=np.int64),
            ),
            shape=(n, n_terms),
        ).T.tocsr()
        # Each topic's relevance row (see _topic_scores), kept for the next chunk: every
        # chunk of a run has these candidates, and topics recur from chunk to chunk.
        self.topic_rows: dict[str, np.ndarray] = {}
        # Per topic, how much each paper's title names it (see SelectionParams.title_relevance).
        self.title_rows: dict[str, np.ndarray] = {}
        # Per topic, its alternatives' names and rows (for the matched terms of a pick).
        self.topic_alts: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
        # (lower-cased topic, candidate column) -> matched terms of a pick.
        self.term_cache: dict[tuple[str, int], tuple[str, ...]] = {}
        self.categories = [c.categories for c in candidates]
        self.has_categories = np.fromiter(
            (bool(c) for c in self.categories), dtype=bool, count=self.n_docs
        )
        self._field_masks: dict[frozenset[str], np.ndarray] = {}  # fields -> weights

    def field_mask(self, fields: frozenset[str]) -> np.ndarray:
        """How much each candidate may belong to these fields (:func:`_field_weight`): 1 when
        its primary arXiv category is among them, 0.5 when only a cross-list is, 0.45 for
        another computing category under an ML concept, 0 otherwise. A paper without
        categories (Hugging Face lists only ML papers) counts as cs.LG."""
        mask = self._field_masks.get(fields)
        if mask is None:
            mask = np.fromiter(
                (_field_weight(cats or ("cs.LG",), fields) for cats in self.categories),
                dtype=np.float64,
                count=self.n_docs,
            )
            self._field_masks[fields] = mask
        return mask

    def _doc_terms(
        self, title: str, abstract: str, seen: dict[str, tuple[Counter[str], int]]
    ) -> tuple[Counter[str], float]:
        """Field-weighted term counts and length of one paper (the title counts more)."""
        weight = self.params.title_weight
        parts = []
        for text in (title, abstract):
            hit = seen.get(text)
            if hit is None:
                hit = seen[text] = analyse(text)
            parts.append(hit)
        (t_counts, t_len), (a_counts, a_len) = parts
        counts = a_counts.copy()
        for term, n in t_counts.items():
            counts[term] += weight * n
        return counts, weight * t_len + a_len

    def _bm25(self, tf: sp.csr_matrix, lengths: np.ndarray) -> sp.csr_matrix:
        p = self.params
        norm = p.k1 * (1 - p.b + p.b * lengths / self.avgdl)
        out = tf.copy()
        row_norm = np.repeat(norm, np.diff(out.indptr))
        out.data = self.idf[out.indices] * out.data * (p.k1 + 1) / (out.data + row_norm)
        return out

    def idf_of(self, term: str) -> float:
        col = self.vocab.get(term)
        return self.idf_unseen if col is None else float(self.idf[col])

    def unit_vectors(self, texts: Sequence[tuple[str, str]]) -> sp.csr_matrix:
        """Unit BM25 vectors of other papers (voted ones) with these statistics.

        The norm counts every term of the paper; only the candidates' terms get a column,
        since no other term can add to a similarity with a candidate.
        """
        p = self.params
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        seen: dict[str, tuple[Counter[str], int]] = {}
        for row, (title, abstract) in enumerate(texts):
            counts, length = self._doc_terms(title, abstract, seen)
            norm = p.k1 * (1 - p.b + p.b * length / self.avgdl)
            weights = {
                term: self.idf_of(term) * tf * (p.k1 + 1) / (tf + norm)
                for term, tf in sorted(counts.items())
            }
            size = math.sqrt(math.fsum(w * w for w in weights.values())) or 1.0
            for term, w in weights.items():
                col = self.vocab.get(term)
                if col is not None:
                    rows.append(row)
                    cols.append(col)
                    vals.append(w / size)
        return sp.csr_matrix((vals, (rows, cols)), shape=(len(texts), len(self.vocab)))


_CORPUS_CACHE: OrderedDict[tuple[Any, ...], _Corpus] = OrderedDict()
_CORPUS_CACHE_SIZE = 2
_CORPUS_LOCK = threading.Lock()


def _corpus_for(cands: Sequence[Candidate], params: SelectionParams) -> _Corpus:
    """The corpus of these candidates, from the cache when the same list comes again."""
    key = (
        params.title_weight,
        params.k1,
        params.b,
        params.bigram_weight,  # _topic_scores reads it from the corpus's params
        params.phrase_weight,
        params.use_concepts,
        params.phrase_gate,
        params.expansion_weight,
        params.strong_relevance,
        params.title_relevance > 0,  # whether the corpus's title rows are computed
        tuple((c.id, c.title, c.abstract, c.categories) for c in cands),
    )
    with _CORPUS_LOCK:
        corpus = _CORPUS_CACHE.get(key)
        if corpus is not None:
            _CORPUS_CACHE.move_to_end(key)
            return corpus
    corpus = _Corpus(cands, params)
    with _CORPUS_LOCK:
        _CORPUS_CACHE[key] = corpus
        while len(_CORPUS_CACHE) > _CORPUS_CACHE_SIZE:
            _CORPUS_CACHE.popitem(last=False)
    return corpus


def _unit_rows(matrix: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return (sp.diags(1.0 / norms) @ matrix).tocsr()


# Bytes of relevance rows a corpus keeps (8 per candidate per topic): 3,300 topics of
# 300 candidates; the corpus cache holds two corpora.
_TOPIC_ROW_BYTES = 8_000_000


def _topic_scores(corpus: _Corpus, topics: Sequence[str]) -> np.ndarray:
    """Normalised relevance of every unique topic to every candidate (topics x docs),
    each topic's row computed once per corpus. A row depends on its topic alone (the
    sparse product is row by row), so it is the same computed with any other topics."""
    if not topics or not corpus.n_docs:
        return np.zeros((len(topics), corpus.n_docs))
    kept = corpus.topic_rows
    rows = {topic: kept.get(topic) for topic in topics}
    new = [topic for topic, row in rows.items() if row is None]
    if new:
        if (len(kept) + len(new)) * 16 * corpus.n_docs > _TOPIC_ROW_BYTES:
            kept.clear()
            corpus.title_rows.clear()
            corpus.topic_alts.clear()
            corpus.term_cache.clear()
        for topic, (row, title, alts) in zip(new, _concept_scores(corpus, new), strict=True):
            rows[topic] = kept[topic] = row
            corpus.title_rows[topic] = title
            corpus.topic_alts[topic] = alts
    return np.array([rows[topic] for topic in topics])


def _title_scores(corpus: _Corpus, topics: Sequence[str]) -> np.ndarray:
    """How much each candidate's title names each topic (topics x docs); the topics'
    rows must have been computed (:func:`_topic_scores`)."""
    if not topics or not corpus.n_docs:
        return np.zeros((len(topics), corpus.n_docs))
    return np.array([corpus.title_rows[topic] for topic in topics])


def _concept_scores(
    corpus: _Corpus, topics: Sequence[str]
) -> list[tuple[np.ndarray, np.ndarray, tuple[tuple[str, ...], np.ndarray]]]:
    """Each topic's relevance row: the best of its alternatives (the topic's own words and,
    for a topic the concept vocabulary knows, each of its phrases, weighted), times the
    candidate's field weight for the concept (:meth:`_Corpus.field_mask`), then the
    co-occurrence check of papers without categories (:func:`_expansion_damp`)."""
    weight = corpus.params.phrase_weight
    names: list[tuple[str, ...]] = []
    flat: list[str] = []
    scale: list[float] = []
    for topic in topics:
        concept = concept_for(topic) if corpus.params.use_concepts else None
        alts = [topic]
        scale.append(1.0)
        if concept is not None:
            own = {topic.lower()}
            for phrase, w in zip(concept.phrases, concept.weights, strict=True):
                if phrase not in own:
                    alts.append(phrase)
                    scale.append(weight * w)
        names.append(tuple(alts))
        flat += alts
    raw, in_title = _score_topics(corpus, flat)
    scales = np.asarray(scale)[:, None]
    out = []
    lo = 0
    for topic, alts in zip(topics, names, strict=True):
        block = raw[lo : lo + len(alts)] * scales[lo : lo + len(alts)]
        named = in_title[lo : lo + len(alts)]
        lo += len(alts)
        concept = concept_for(topic) if corpus.params.use_concepts else None
        if concept is not None and concept.fields is not None:
            fields = corpus.field_mask(concept.fields)
            block = block * fields
            named = named * fields
        title = (named * scales[lo - len(alts) : lo]).max(axis=0)
        row = block.max(axis=0)
        if corpus.params.expansion_weight > 0:
            damp = _expansion_damp(corpus, row)
            row = row * damp
            title = title * damp
        out.append((row, title, (alts, block)))
    return out


def _expansion_damp(corpus: _Corpus, row: np.ndarray) -> np.ndarray:
    """Corpus co-occurrence as evidence of field for papers without arXiv categories.

    The papers of the day that clearly match the topic (relevance >= strong_relevance) and
    carry categories make a centroid of their terms; a paper without categories that shares
    little of that context loses up to ``expansion_weight`` of its relevance ("state space
    copula models" next to the day's Mamba papers). Papers with categories are judged by them.
    """
    p = corpus.params
    known = corpus.has_categories
    strong = np.flatnonzero((row >= p.strong_relevance) & known)
    if strong.size < 2:
        return np.ones_like(row)
    centroid = np.asarray(corpus.doc_units[strong].mean(axis=0)).ravel()
    sim = corpus.doc_units @ centroid
    typical = float(np.median(sim[strong])) or 1.0
    context = np.minimum(sim / typical, 1.0)
    return np.where(known, 1.0, 1 - p.expansion_weight + p.expansion_weight * context)


def _matched_terms(corpus: _Corpus, topic: str, col: int, floor: float) -> tuple[str, ...]:
    """The alternatives of ``topic`` that match candidate ``col``, strongest first."""
    hit = corpus.topic_alts.get(topic.lower())
    if hit is None:
        return ()
    alts, block = hit
    column = block[:, col]
    order = np.argsort(-column, kind="stable")
    return tuple(alts[i] for i in order[:4] if column[i] >= floor)


def _score_topics(corpus: _Corpus, topics: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """raw BM25 / self-match x coverage: 1.0 is a paper of average length with the topic in
    its title; a paper with only some of a topic's words gets the share of their IDF.

    A phrase of several words matches only a paper that has all of its adjacent pairs
    (``phrase_gate``): "steel reinforcement in concrete" has the rarer word of "reinforcement
    learning" but not the phrase, and is no match for it.

    Also returns, per topic and paper, 1.0 where the title alone has every word and adjacent
    pair of the topic (the topic names the paper's subject), else 0.
    """
    p = corpus.params
    q_rows: list[int] = []
    q_cols: list[int] = []
    q_vals: list[float] = []
    c_vals: list[float] = []
    g_vals: list[float] = []
    self_scores = np.zeros(len(topics))
    idf_mass = np.zeros(len(topics))
    n_bigrams = np.zeros(len(topics))
    for row, topic in enumerate(topics):
        counts, _ = analyse(topic)
        for term in sorted(counts):
            n = counts[term]
            bigram = " " in term
            weight = (p.bigram_weight if bigram else 1.0) * n
            idf = corpus.idf_of(term)
            tf = p.title_weight * n  # the topic once in the title of an average paper
            self_scores[row] += weight * idf * tf * (p.k1 + 1) / (tf + p.k1)
            if bigram:
                n_bigrams[row] += 1
            else:
                idf_mass[row] += idf
            col = corpus.vocab.get(term)
            if col is not None:  # other terms cannot match any candidate
                q_rows.append(row)
                q_cols.append(col)
                q_vals.append(weight)
                c_vals.append(0.0 if bigram else idf)
                g_vals.append(1.0 if bigram else 0.0)
    shape = (len(topics), len(corpus.vocab))
    query = sp.csr_matrix((q_vals, (q_rows, q_cols)), shape=shape)
    cover = sp.csr_matrix((c_vals, (q_rows, q_cols)), shape=shape)
    raw = (query @ corpus.doc_weights_t).toarray()
    coverage = (cover @ corpus.unigram_presence_t).toarray()
    gate = sp.csr_matrix((g_vals, (q_rows, q_cols)), shape=shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = (raw / self_scores[:, None]) * (coverage / idf_mass[:, None])
    if p.phrase_gate:
        pairs = (gate @ corpus.bigram_presence_t).toarray()
        rel *= pairs >= n_bigrams[:, None] - 0.5
    if p.title_relevance > 0:
        # Every word's IDF and every pair in the title (a word no candidate has never is).
        words = (cover @ corpus.title_presence_t).toarray()
        title_pairs = (gate @ corpus.title_presence_t).toarray()
        in_title = (words >= idf_mass[:, None] * (1 - 1e-9)) & (idf_mass[:, None] > 0)
        in_title &= title_pairs >= n_bigrams[:, None] - 0.5
        in_title &= rel > 0
        title = in_title.astype(np.float64)
    else:
        title = np.zeros_like(rel)
    return np.nan_to_num(rel, nan=0.0, posinf=0.0, neginf=0.0), title


def _nothing_new(prof: Profile) -> str:
    hours = round((prof.window_end - prof.window_start).total_seconds() / 3600)
    if hours > 48 and hours % 24 == 0:
        window = f"{hours // 24} days"
    elif hours == 1:
        window = "hour"
    else:
        window = f"{hours} hours"
    return f"no new papers in the last {window}"


def select_batch(
    candidates: Sequence[Candidate],
    profiles: Sequence[Profile],
    *,
    voted_papers: Mapping[str, Candidate] | None = None,
    params: SelectionParams | None = None,
) -> dict[int, Result]:
    """Pick papers for every profile; one :class:`Result` per subscriber id.

    ``voted_papers`` holds the texts of voted papers that are not among the candidates
    (votes on papers found in neither are ignored).
    """
    params = params or SelectionParams()
    voted_papers = voted_papers or {}
    seen_subs: set[int] = set()
    for prof in profiles:
        if prof.subscriber_id in seen_subs:
            raise SelectionInputError(f"subscriber {prof.subscriber_id} appears twice in a batch")
        seen_subs.add(prof.subscriber_id)
    by_id: dict[str, Candidate] = {}
    for cand in candidates:
        if cand.id in by_id and by_id[cand.id] != cand:
            raise SelectionInputError(f"paper {cand.id!r} appears twice with different data")
        by_id[cand.id] = cand
    if not profiles:
        return {}
    if not by_id:
        return {prof.subscriber_id: Result([], _nothing_new(prof)) for prof in profiles}
    # Canonical layout: column order is the tie-break order (upvotes desc, id asc).
    cands = sorted(by_id.values(), key=lambda c: (-c.upvotes, c.id))
    col_of = {c.id: j for j, c in enumerate(cands)}
    n_docs = len(cands)

    corpus = _corpus_for(cands, params)
    topics_per_profile = [_clean_profile_topics(prof.topics) for prof in profiles]
    # Unique topics, by their lower-cased text, scored once for the whole batch.
    topic_ids: dict[str, int] = {}
    for topics in topics_per_profile:
        for topic in topics:
            topic_ids.setdefault(topic.lower(), len(topic_ids))
    topic_rel = _topic_scores(corpus, list(topic_ids))
    title_band = None  # unique topics x candidates: the title names the topic enough
    if params.title_relevance > 0:
        title_band = _title_scores(corpus, list(topic_ids)) >= params.title_relevance
    # Similarity of each voted paper to each candidate (voted x docs), computed once.
    voted_ids = sorted(
        {pid for prof in profiles for pid in prof.votes if pid in by_id or pid in voted_papers}
    )
    voted_col = {pid: i for i, pid in enumerate(voted_ids)}
    voted_sim = np.zeros((len(voted_ids), n_docs))
    known = [pid for pid in voted_ids if pid in by_id]
    if known:
        units = corpus.doc_units[[col_of[pid] for pid in known]]
        voted_sim[[voted_col[pid] for pid in known]] = (units @ corpus.doc_units_t).toarray()
    extra = [pid for pid in voted_ids if pid not in by_id]
    if extra:
        units = corpus.unit_vectors(
            [(voted_papers[p].title, voted_papers[p].abstract) for p in extra]
        )
        voted_sim[[voted_col[pid] for pid in extra]] = (units @ corpus.doc_units_t).toarray()

    shared = _Shared(
        cands=cands,
        col_of=col_of,
        published=np.array([c.published.timestamp() for c in cands], dtype=np.float64),
        log_up=np.log1p(np.array([max(c.upvotes, 0) for c in cands], dtype=np.float64)),
        topic_ids=topic_ids,
        topic_rel=topic_rel,
        title_band=title_band,
        voted_col=voted_col,
        voted_sim=voted_sim,
        params=params,
        corpus=corpus,
    )
    # Rows sorted by number of topics (desc), so "rows with more than t topics" is a prefix.
    order = sorted(range(len(profiles)), key=lambda i: -len(topics_per_profile[i]))
    results: dict[int, Result] = {}
    for lo in range(0, len(order), _ROW_CHUNK):
        rows = order[lo : lo + _ROW_CHUNK]
        results.update(
            _score_chunk([profiles[i] for i in rows], [topics_per_profile[i] for i in rows], shared)
        )
    return {prof.subscriber_id: results[prof.subscriber_id] for prof in profiles}


class Explained(NamedTuple):
    """Every score of one candidate for one subscriber (``digest preview --explain``)."""

    paper_id: str
    title: str
    categories: tuple[str, ...]
    # Per topic: (topic, relevance, field weight, matched terms); relevance already carries
    # the field weight (a paper outside the concept's fields scores 0).
    topics: tuple[tuple[str, float, float, tuple[str, ...]], ...]
    trending: float  # trending_weight x log1p(upvotes) / best in the window
    freshness: float
    score: float | None  # the final score; None when the paper is not eligible
    picked: bool
    why_not: str | None  # why it is not eligible: outside the window, received, no match
    # The topics its title names enough for the title band (SelectionParams.title_relevance).
    title_names: tuple[str, ...] = ()


def explain_profile(
    candidates: Sequence[Candidate],
    profile: Profile,
    *,
    voted_papers: Mapping[str, Candidate] | None = None,
    params: SelectionParams | None = None,
) -> list[Explained]:
    """The scores of every candidate for one profile, best final score first.

    The final scores and picks are :func:`select_batch`'s own (run once with room for every
    candidate, and once as the subscriber has it), so this explains the real ranking.
    """
    params = params or SelectionParams()
    every = select_batch(
        candidates,
        [replace(profile, max_papers=max(1, len(candidates)))],
        voted_papers=voted_papers,
        params=params,
    )[profile.subscriber_id].picks
    chosen = {
        p.paper_id
        for p in select_batch(candidates, [profile], voted_papers=voted_papers, params=params)[
            profile.subscriber_id
        ].picks
    }
    scored = {p.paper_id: p for p in every}
    cands = sorted({c.id: c for c in candidates}.values(), key=lambda c: (-c.upvotes, c.id))
    if not cands:
        return []
    corpus = _corpus_for(cands, params)
    topics = _clean_topics(profile.topics)
    rel = _topic_scores(corpus, [t.lower() for t in topics])
    named = np.zeros(rel.shape, dtype=bool)
    if params.title_relevance > 0:
        named = _title_scores(corpus, [t.lower() for t in topics]) >= params.title_relevance
    start, end = profile.window_start.timestamp(), profile.window_end.timestamp()
    log_up = [math.log1p(max(c.upvotes, 0)) for c in cands]
    in_window = [start <= c.published.timestamp() <= end for c in cands]
    best = next((u for u, ok in zip(log_up, in_window, strict=True) if ok), 0.0)
    floor = 0.5 * params.min_relevance
    out = []
    for j, c in enumerate(cands):
        per = []
        for t, topic in enumerate(topics):
            concept = concept_for(topic) if params.use_concepts else None
            weight = 1.0
            if concept is not None and concept.fields is not None:
                weight = float(corpus.field_mask(concept.fields)[j])
            terms = _matched_terms(corpus, topic, j, floor)
            per.append((topic, float(rel[t, j]), weight, terms))
        age = max(0.0, end - c.published.timestamp()) / (3600.0 * params.freshness_half_life_hours)
        pick = scored.get(c.id)
        why = None
        if pick is None:
            if not in_window[j]:
                why = "outside the window"
            elif c.id in profile.exclude or c.id in profile.votes:
                why = "already received"
            elif not _passes_categories(profile, c):
                why = "outside the subscriber's arXiv categories"
            else:
                why = f"relevance below min_relevance {params.min_relevance}"
        out.append(
            Explained(
                c.id,
                c.title,
                c.categories,
                tuple(per),
                params.trending_weight * log_up[j] / best if best > 0 else 0.0,
                params.freshness_weight * 2.0 ** (-age),
                None if pick is None else pick.score,
                c.id in chosen,
                why,
                tuple(t for i, t in enumerate(topics) if named[i, j]),
            )
        )
    out.sort(key=lambda e: (e.score is None, -(e.score or 0.0), e.paper_id))
    return out


@dataclass
class _Shared:
    """Everything about the candidates that every chunk of subscribers uses."""

    cands: Sequence[Candidate]
    col_of: Mapping[str, int]
    published: np.ndarray  # epoch seconds per candidate
    log_up: np.ndarray  # log1p(upvotes) per candidate
    topic_ids: Mapping[str, int]
    topic_rel: np.ndarray  # unique topics x candidates
    title_band: np.ndarray | None  # unique topics x candidates, bool; None: no title band
    voted_col: Mapping[str, int]
    voted_sim: np.ndarray  # voted papers x candidates
    params: SelectionParams
    corpus: _Corpus


def _score_chunk(
    profiles: Sequence[Profile], topics_per_profile: Sequence[tuple[str, ...]], shared: _Shared
) -> dict[int, Result]:
    """Score and pick for rows sorted by number of topics, descending."""
    params = shared.params
    col_of = shared.col_of
    n_rows, n_docs = len(profiles), len(shared.cands)
    n_topics = np.array([len(t) for t in topics_per_profile], dtype=np.int64)
    max_topics = int(n_topics.max()) if n_rows else 0
    slot_topic = np.zeros((n_rows, max_topics), dtype=np.int64)
    starts = np.empty(n_rows)
    ends = np.empty(n_rows)
    k = np.empty(n_rows, dtype=np.int64)
    ex_rows: list[int] = []
    ex_cols: list[int] = []
    fb_rows: list[int] = []
    fb_cols: list[int] = []
    fb_vals: list[float] = []
    # This loop over subscribers only gathers indices; the scoring below is whole-matrix.
    for i, (prof, topics) in enumerate(zip(profiles, topics_per_profile, strict=True)):
        starts[i] = prof.window_start.timestamp()
        ends[i] = prof.window_end.timestamp()
        k[i] = prof.max_papers
        for t, topic in enumerate(topics):
            slot_topic[i, t] = shared.topic_ids[topic.lower()]
        # Voted papers were received: never send them again, whatever `exclude` says.
        for pid in chain(prof.exclude, prof.votes):
            j = col_of.get(pid)
            if j is not None:
                ex_rows.append(i)
                ex_cols.append(j)
        if prof.votes:
            # Rocchio: + mean of liked papers, - mean of disliked ones.
            for sign in (1, -1):
                group = sorted(
                    pid for pid, v in prof.votes.items() if v == sign and pid in shared.voted_col
                )
                for pid in group:
                    fb_rows.append(i)
                    fb_cols.append(shared.voted_col[pid])
                    fb_vals.append(sign / len(group))

    published = shared.published[None, :]
    in_window = (published >= starts[:, None]) & (published <= ends[:, None])
    available = in_window.copy()
    if ex_rows:
        available[ex_rows, ex_cols] = False

    # Topic relevance: the best of each subscriber's topics, and which one (first wins).
    relevance = np.zeros((n_rows, n_docs))
    best_slot = np.zeros((n_rows, n_docs), dtype=np.int32)
    with_topics = int(np.count_nonzero(n_topics))
    if with_topics and n_docs:
        relevance[:with_topics] = shared.topic_rel[slot_topic[:with_topics, 0]]
        for slot in range(1, max_topics):
            m = int(np.count_nonzero(n_topics > slot))  # a prefix, rows being sorted
            cand = shared.topic_rel[slot_topic[:m, slot]]
            better = cand > relevance[:m]
            np.copyto(relevance[:m], cand, where=better)
            np.copyto(best_slot[:m], slot, where=better)
    effective = np.minimum(relevance, params.relevance_cap)
    if fb_rows and n_docs:
        weights = sp.csr_matrix(
            (fb_vals, (fb_rows, fb_cols)), shape=(n_rows, len(shared.voted_col))
        )
        effective += params.feedback_weight * (weights @ shared.voted_sim)

    has_new = available.any(axis=1)
    eligible = available  # narrowed in place from here on
    in_categories = None  # per row: something new passes its arXiv category filters
    category_mask = _category_filter(profiles, shared.cands)
    if category_mask is not None:
        eligible &= category_mask
        in_categories = eligible.any(axis=1)
    if with_topics:
        eligible[:with_topics] &= effective[:with_topics] >= params.min_relevance

    # Trending: relative to the best paper in the window (columns go by upvotes, so the
    # first column in the window is the best). Freshness: halves every half-life.
    first = np.argmax(in_window, axis=1)
    best = np.where(in_window[np.arange(n_rows), first], shared.log_up[first], 0.0)
    scale = np.divide(params.trending_weight, best, out=np.zeros(n_rows), where=best > 0)
    score = np.multiply.outer(scale, shared.log_up)
    age = ends[:, None] - published
    np.maximum(age, 0.0, out=age)
    age *= -1.0 / (3600.0 * params.freshness_half_life_hours)
    np.exp2(age, out=age)
    age *= params.freshness_weight
    score += age
    score += effective

    # Relevance first: strong matches above weak ones whatever their upvotes.
    if with_topics and params.strong_relevance > 0:
        score[:with_topics] += 10.0 * (effective[:with_topics] >= params.strong_relevance)
    if with_topics and params.top_relevance > 0:
        score[:with_topics] += 10.0 * (effective[:with_topics] >= params.top_relevance)
    if with_topics and shared.title_band is not None:
        # The title names any of the row's topics, and the paper is a strong match.
        named = shared.title_band[slot_topic[:with_topics, 0]]
        for slot in range(1, max_topics):
            m = int(np.count_nonzero(n_topics > slot))
            named[:m] |= shared.title_band[slot_topic[:m, slot]]
        named &= effective[:with_topics] >= params.strong_relevance
        score[:with_topics] += 10.0 * named

    chosen = _top_k(score, eligible, k)
    rows_c, cols_c = np.nonzero(chosen)
    order = np.lexsort((cols_c, -score[rows_c, cols_c], rows_c))
    rows_c, cols_c = rows_c[order], cols_c[order]

    picks_by_row: list[list[Pick]] = [[] for _ in range(n_rows)]
    # Matched terms per (topic, candidate), kept on the corpus: topics recur from
    # subscriber to subscriber and from chunk to chunk.
    term_cache = shared.corpus.term_cache
    corpus = shared.corpus
    floor = 0.5 * params.min_relevance
    names = list(shared.topic_ids)  # lower-cased topics by id
    slots = best_slot[rows_c, cols_c]
    named = relevance[rows_c, cols_c] >= params.min_relevance
    if max_topics:
        tids = slot_topic[rows_c, np.minimum(slots, max_topics - 1)].tolist()
    else:
        tids = [0] * len(rows_c)
    ids = [c.id for c in shared.cands]
    for i, j, s, r, slot, ok, tid in zip(
        rows_c.tolist(),
        cols_c.tolist(),
        score[rows_c, cols_c].tolist(),
        effective[rows_c, cols_c].tolist(),
        slots.tolist(),
        named.tolist(),
        tids,
        strict=True,
    ):
        # Only a topic that really matched is named; otherwise trending or feedback chose.
        if ok and topics_per_profile[i]:
            topic = topics_per_profile[i][slot]
            key = (names[tid], j)
            terms = term_cache.get(key)
            if terms is None:
                terms = term_cache[key] = _matched_terms(corpus, topic, j, floor)
        else:
            topic, terms = None, ()
        picks_by_row[i].append(_new_tuple(Pick, (ids[j], s, r, topic, terms)))  # faster

    out: dict[int, Result] = {}
    for i, prof in enumerate(profiles):
        picks = picks_by_row[i]
        reason = None
        if not picks:
            if not has_new[i]:
                reason = _nothing_new(prof)
            elif in_categories is not None and not in_categories[i]:
                reason = _nothing_in_categories(prof)
            else:
                reason = "no new paper matches your topics: " + ", ".join(topics_per_profile[i])
        out[prof.subscriber_id] = _new_tuple(Result, (picks, reason))
    return out


def _category_filter(profiles: Sequence[Profile], cands: Sequence[Candidate]) -> np.ndarray | None:
    """(rows x candidates): which papers pass each row's arXiv category filters; None when
    no row has one (most batches), so they cost nothing then."""
    if not any(p.categories_only or p.categories_exclude for p in profiles):
        return None
    from worker.categories import candidate_mask

    return candidate_mask(
        [p.categories_only for p in profiles],
        [p.categories_exclude for p in profiles],
        [c.categories for c in cands],
    )


def _passes_categories(prof: Profile, cand: Candidate) -> bool:
    from worker.categories import passes

    return passes(cand.categories, prof.categories_only, prof.categories_exclude)


def _nothing_in_categories(prof: Profile) -> str:
    from worker.categories import describe_filters

    filters = describe_filters(prof.categories_only, prof.categories_exclude)
    return f"no new paper in your arXiv categories ({filters})"


def _top_k(score: np.ndarray, eligible: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Per row, the ``k[i]`` best eligible columns; among equal scores the lowest column."""
    n_rows, n_docs = score.shape
    if n_docs == 0 or n_rows == 0:
        return np.zeros_like(eligible)
    k = np.minimum(k, n_docs)
    key = np.negative(score)  # smaller is better
    np.copyto(key, np.inf, where=~eligible)
    kmax = int(k.max())
    head = np.partition(key, kmax - 1, axis=1)[:, :kmax] if kmax < n_docs else key.copy()
    head.sort(axis=1)
    threshold = head[np.arange(n_rows), k - 1]
    # With fewer eligible papers than k the threshold is inf: take all eligible ones.
    chosen = key < threshold[:, None]
    finite = np.isfinite(threshold)
    tie = (key == threshold[:, None]) & finite[:, None]
    need = k - chosen.sum(axis=1)
    tie_rows = np.flatnonzero(tie.sum(axis=1) > need)
    if tie_rows.size:  # more tied papers than places left: the lowest columns win
        sub = tie[tie_rows]
        tie[tie_rows] = sub & (np.cumsum(sub, axis=1) <= need[tie_rows, None])
    return chosen | tie


# -------------------------------------------------------------------------- DB helpers


def lookback(settings: Settings, frequency: str) -> timedelta:
    """The look-back window of an edition of this frequency."""
    if frequency == Frequency.DAILY:
        return timedelta(hours=settings.lookback_daily_hours)
    if frequency == Frequency.WEEKLY:
        return timedelta(hours=settings.lookback_weekly_hours)
    raise SelectionInputError(f"unknown frequency {frequency!r} (use daily or weekly)")


def _effective_between(start: datetime, end: datetime | None) -> Any:
    """Paper's effective date (published_at, else ingested_at) in [start, end]."""
    pub = [Paper.published_at.is_not(None), Paper.published_at >= start]
    ing = [Paper.published_at.is_(None), Paper.ingested_at >= start]
    if end is not None:
        pub.append(Paper.published_at <= end)
        ing.append(Paper.ingested_at <= end)
    return or_(and_(*pub), and_(*ing))


def load_candidates(
    session: Session, window_start: datetime, window_end: datetime
) -> list[Candidate]:
    """Papers whose effective date lies in [window_start, window_end], by id."""
    _require_aware(window_start, "window_start")
    _require_aware(window_end, "window_end")
    if window_start > window_end:
        raise SelectionInputError(
            f"window_start {window_start.isoformat()} is after window_end {window_end.isoformat()}"
        )
    rows = session.execute(
        select(
            Paper.id,
            Paper.title,
            Paper.abstract,
            Paper.upvotes,
            Paper.published_at,
            Paper.ingested_at,
            Paper.categories,
        )
        .where(_effective_between(window_start, window_end))
        .order_by(Paper.id)
    )
    return [
        Candidate(
            pid, title or "", abstract or "", upvotes or 0, published or ingested, tuple(cats or ())
        )
        for pid, title, abstract, upvotes, published, ingested, cats in rows
    ]


def _chunks(ids: Sequence[int]) -> Iterable[list[int]]:
    for lo in range(0, len(ids), _ID_CHUNK):
        yield list(ids[lo : lo + _ID_CHUNK])


def load_profiles(
    session: Session,
    subscribers: Sequence[Subscriber],
    window_end_by_sub: Mapping[int, datetime],
    settings: Settings,
    *,
    also_exclude: Mapping[int, Iterable[str]] | None = None,
) -> tuple[list[Profile], dict[str, Candidate]]:
    """Profiles of these subscribers and the texts of the papers they voted on.

    ``also_exclude`` adds, per subscriber id, papers the caller knows they will get
    anyway (recorded on another of their editions that is still to be sent).

    Two queries per batch (up to 5000 subscribers), whatever its size: the papers already
    received (deliveries in :data:`RECEIVED_STATES`; only papers recent enough to still
    be candidates), and the votes joined with their papers.
    """
    if not subscribers:
        return [], {}
    starts: dict[int, datetime] = {}
    for sub in subscribers:
        end = window_end_by_sub.get(sub.id)
        if end is None:
            raise SelectionInputError(f"no window end given for subscriber {sub.id}")
        _require_aware(end, f"window end of subscriber {sub.id}")
        starts[sub.id] = end - lookback(settings, sub.frequency)
    ids = sorted(starts)
    earliest = min(starts.values())

    received: dict[int, set[str]] = {}
    votes: dict[int, dict[str, int]] = {}
    voted: dict[str, Candidate] = {}
    for part in _chunks(ids):
        for sub_id, paper_id in session.execute(
            select(Delivery.subscriber_id, DeliveryPaper.paper_id)
            .join(DeliveryPaper, DeliveryPaper.delivery_id == Delivery.id)
            .join(Paper, Paper.id == DeliveryPaper.paper_id)
            .where(
                Delivery.subscriber_id.in_(part),
                Delivery.state.in_(sorted(RECEIVED_STATES)),
                _effective_between(earliest, None),
            )
        ):
            received.setdefault(sub_id, set()).add(paper_id)
        for (
            sub_id,
            paper_id,
            vote,
            title,
            abstract,
            upvotes,
            published,
            ingested,
        ) in session.execute(
            select(
                Feedback.subscriber_id,
                Feedback.paper_id,
                Feedback.vote,
                Paper.title,
                Paper.abstract,
                Paper.upvotes,
                Paper.published_at,
                Paper.ingested_at,
            )
            .join(Paper, Paper.id == Feedback.paper_id)
            .where(Feedback.subscriber_id.in_(part))
            .order_by(Feedback.subscriber_id, Feedback.updated_at.desc(), Feedback.paper_id)
        ):
            mine = votes.setdefault(sub_id, {})
            if len(mine) >= MAX_VOTES_PER_SUBSCRIBER or vote not in (-1, 1):
                continue
            mine[paper_id] = vote
            if paper_id not in voted:
                voted[paper_id] = Candidate(
                    paper_id, title or "", abstract or "", upvotes or 0, published or ingested
                )

    profiles = [
        Profile(
            subscriber_id=sub.id,
            topics=_clean_topics(sub.topics or ()),
            max_papers=sub.max_papers,
            window_start=starts[sub.id],
            window_end=window_end_by_sub[sub.id],
            exclude=frozenset(received.get(sub.id, ())).union((also_exclude or {}).get(sub.id, ())),
            votes=votes.get(sub.id, {}),
            categories_only=tuple(sub.categories_only or ()),
            categories_exclude=tuple(sub.categories_exclude or ()),
        )
        for sub in subscribers
    ]
    return profiles, voted


def select_for_subscribers(
    session: Session,
    subscribers: Sequence[Subscriber],
    window_end_by_sub: Mapping[int, datetime],
    settings: Settings,
    *,
    also_exclude: Mapping[int, Iterable[str]] | None = None,
) -> dict[int, Result]:
    """Load profiles and candidates (one window covering the batch) and select.

    Each subscriber once: for several editions of one subscriber use :func:`select_editions`.
    """
    profiles, voted = load_profiles(
        session, subscribers, window_end_by_sub, settings, also_exclude=also_exclude
    )
    if not profiles:
        return {}
    candidates = load_candidates(
        session,
        min(p.window_start for p in profiles),
        max(p.window_end for p in profiles),
    )
    return select_batch(
        candidates, profiles, voted_papers=voted, params=SelectionParams.from_settings(settings)
    )


# ------------------------------------------------------------------- editions of a batch


@dataclass(frozen=True)
class Edition:
    """One edition to select for: the caller's key (a delivery id) and its subscriber."""

    key: int
    subscriber: Subscriber
    edition_date: date
    window_end: datetime


@dataclass
class EditionSelection:
    results: dict[int, Result] = field(default_factory=dict)  # by Edition.key
    failures: dict[int, str] = field(default_factory=dict)  # by Edition.key: why, in words


def edition_rounds(editions: Sequence[Edition]) -> list[list[Edition]]:
    """Round r holds the r-th edition (by date, then key) of every subscriber, so no
    subscriber appears twice in a round and earlier editions are selected first."""
    by_sub: dict[int, list[Edition]] = {}
    for ed in sorted(editions, key=lambda e: (e.edition_date, e.key)):
        by_sub.setdefault(ed.subscriber.id, []).append(ed)
    rounds: list[list[Edition]] = []
    for mine in by_sub.values():
        for r, ed in enumerate(mine):
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(ed)
    return rounds


def select_editions(
    session: Session,
    editions: Sequence[Edition],
    settings: Settings,
    *,
    also_exclude: Mapping[int, Iterable[str]] | None = None,
    is_fatal: Callable[[BaseException], bool] = lambda exc: False,
) -> EditionSelection:
    """Select papers for any mix of editions: several of one subscriber, any dates.

    Each edition gets its own window; "already received" is what the subscriber received
    (:data:`RECEIVED_STATES`), plus ``also_exclude`` (per subscriber id), plus what an
    earlier edition of the same batch picked for them: two editions of one subscriber
    never carry the same paper. Editions are selected round by round (see
    :func:`edition_rounds`), each round in one batch.

    One bad edition fails alone: when a round's batch raises, each of its editions is
    selected by itself, and the ones that still raise are reported in ``failures`` (the
    others get their result). An exception for which ``is_fatal`` is true (the database
    is gone) is raised instead. After a failed attempt the session is rolled back, so the
    caller must have committed everything before calling this.
    """
    out = EditionSelection()
    taken: dict[int, set[str]] = {
        sub_id: set(papers) for sub_id, papers in (also_exclude or {}).items()
    }

    def attempt(group: Sequence[Edition]) -> dict[int, Result]:
        subs = [ed.subscriber for ed in group]
        ends = {ed.subscriber.id: ed.window_end for ed in group}
        excluded = {sid: taken[sid] for sid in ends if sid in taken}
        by_sub = select_for_subscribers(session, subs, ends, settings, also_exclude=excluded)
        return {ed.key: by_sub[ed.subscriber.id] for ed in group}

    for group in edition_rounds(editions):
        try:
            got = attempt(group)
        except Exception as exc:
            if is_fatal(exc):
                raise
            session.rollback()
            if len(group) == 1:
                out.failures[group[0].key] = _failure(exc)
                continue
            log.warning(
                "selection of %d editions failed (%s: %s); selecting them one by one",
                len(group),
                type(exc).__name__,
                exc,
            )
            got = {}
            for ed in group:
                try:
                    got.update(attempt([ed]))
                except Exception as one:
                    if is_fatal(one):
                        raise
                    session.rollback()
                    out.failures[ed.key] = _failure(one)
        for ed in group:
            result = got.get(ed.key)
            if result is None:
                continue
            out.results[ed.key] = result
            taken.setdefault(ed.subscriber.id, set()).update(p.paper_id for p in result.picks)
    return out


def _failure(exc: BaseException) -> str:
    log.warning("selection failed for one edition: %s: %s", type(exc).__name__, exc)
    return f"could not select papers: {type(exc).__name__}: {exc}"[:2000]
