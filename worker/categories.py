"""Subscribers' arXiv category filters: validation, description, and the candidate masks
that selection applies.

A subscriber may keep **only** papers of some categories and **exclude** others. Both take
arXiv names: a category (``cs.LG``, ``math.CO``, ``hep-th``, ``q-bio.NC``) or a whole
archive (``cs``, ``math``, ``physics``: every category in it). Names are matched
case-insensitively and stored in arXiv's spelling; the two names arXiv gives one category
(``cs.SY`` and ``eess.SY``, ``math.MP`` and ``math-ph``, ...) count as the same.

* **only** looks at a paper's *primary* category (the first listed): a cs.LG subscriber
  does not get every physics paper that is also cross-listed to cs.LG. A paper whose
  categories are unknown (Hugging Face lists none) is left out, since nothing says it is
  in them.
* **exclude** looks at *all* its categories: excluding ``cs.CV`` drops a cs.LG paper
  cross-listed to cs.CV too, which is what "I never want vision papers" means. A paper
  with no categories is never excluded.

Selection works on many subscribers at once, so :func:`candidate_mask` builds one boolean
(subscribers x candidates) matrix with two small matrix products, not a loop over pairs.
"""

from __future__ import annotations

import difflib
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np

from worker.arxiv_taxonomy import ALIASES, ARCHIVES, CATEGORIES

__all__ = [
    "MAX_FILTER_CATEGORIES",
    "candidate_mask",
    "conflict",
    "describe_filters",
    "parse_categories",
    "passes",
]

# More than this many is a pasted list, not a choice (there are about 175 names in all).
MAX_FILTER_CATEGORIES = 40
_SEPARATORS = re.compile(r"[,;\s]+")
# Every accepted name, by its lower-cased spelling.
_KNOWN: dict[str, str] = {name.lower(): name for name in (*ARCHIVES, *CATEGORIES)}
# Both directions of each alias pair.
_SAME: dict[str, str] = {**ALIASES, **{new: old for old, new in ALIASES.items()}}
EXAMPLES = "e.g. cs.LG, math.CO, hep-th, q-bio.NC, or a whole archive such as cs or math"


def _problem(raw: str, what: str) -> str:
    close = difflib.get_close_matches(raw.lower(), list(_KNOWN), n=1, cutoff=0.75)
    hint = f"; did you mean {_KNOWN[close[0]]}?" if close else f" ({EXAMPLES})"
    shown = raw if len(raw) <= 40 else raw[:39] + "…"
    return f"{shown!r} in {what} is not an arXiv category{hint}"


def parse_categories(value: object, what: str = "categories") -> tuple[str, ...]:
    """arXiv names from ``"cs.LG, math.CO"`` (commas, semicolons or spaces) or a list.

    Returns them in arXiv's spelling, in the order given, duplicates dropped; blank gives
    ``()``. Raises ``ValueError`` naming the first unknown value (with the closest real
    name when there is one), ``what`` saying which field it came from.
    """
    if value is None:
        return ()
    if isinstance(value, str):
        items: Iterable[object] = _SEPARATORS.split(value)
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise ValueError(f"{what} must be text or a list of arXiv categories, got {value!r}")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"each of the {what} must be text, got {item!r}")
        raw = item.strip()
        if not raw:
            continue
        name = _KNOWN.get(raw.lower())
        if name is None:
            raise ValueError(_problem(raw, what))
        if name not in out:
            out.append(name)
    if len(out) > MAX_FILTER_CATEGORIES:
        raise ValueError(
            f"at most {MAX_FILTER_CATEGORIES} arXiv categories are allowed in {what}, "
            f"got {len(out)}"
        )
    return tuple(out)


@lru_cache(maxsize=4096)
def _tokens(category: str) -> frozenset[str]:
    """The filter values that a paper filed under ``category`` matches: the category, its
    alias, and the archive of each (``cs.SY`` -> cs.SY, cs, eess.SY, eess)."""
    name = _KNOWN.get(category.lower(), category)
    out: set[str] = set()
    for each in (name, _SAME.get(name)):
        if each:
            out.add(each)
            out.add(each.split(".", 1)[0])
    return frozenset(out)


def conflict(only: Sequence[str], exclude: Sequence[str]) -> str | None:
    """Why these two filters together leave nothing, or None: every "only" value is
    also excluded (itself, or its archive)."""
    if not only or not exclude:
        return None
    gone = set(exclude)
    if all(_tokens(value) & gone for value in only):
        return (
            f"every category you keep ({', '.join(only)}) is also excluded "
            f"({', '.join(exclude)}), so no paper would be left"
        )
    return None


def describe_filters(only: Sequence[str], exclude: Sequence[str]) -> str:
    """One phrase for messages and emails; "" when there is no filter."""
    parts = []
    if only:
        parts.append("only " + ", ".join(only))
    if exclude:
        parts.append("excluding " + ", ".join(exclude))
    return "; ".join(parts)


def passes(categories: Sequence[str], only: Sequence[str], exclude: Sequence[str]) -> bool:
    """Whether one paper passes one subscriber's filters (the rule of the module doc)."""
    if only and not (categories and _tokens(categories[0]) & set(only)):
        return False
    return not (exclude and any(_tokens(c) & set(exclude) for c in categories))


class _DocTokens:
    """For one candidate list: per filter value, which candidates' primary category matches
    it and which have any category that does. Every chunk of a run has the same candidates,
    so the last few lists are kept."""

    def __init__(self, categories_by_doc: Sequence[Sequence[str]]) -> None:
        self.n_docs = n = len(categories_by_doc)
        primary: dict[str, list[int]] = {}
        listed: dict[str, set[int]] = {}
        for j, cats in enumerate(categories_by_doc):
            for pos, cat in enumerate(cats):
                for token in _tokens(cat):
                    listed.setdefault(token, set()).add(j)
                    if pos == 0:
                        primary.setdefault(token, []).append(j)
        self.primary = {t: self._row(js, n) for t, js in primary.items()}
        self.listed = {t: self._row(js, n) for t, js in listed.items()}
        self.none = np.zeros(n, dtype=np.float32)

    @staticmethod
    def _row(cols: Iterable[int], n: int) -> np.ndarray:
        row = np.zeros(n, dtype=np.float32)
        row[list(cols)] = 1.0
        return row

    def stack(self, values: Sequence[str], primary: bool) -> np.ndarray:
        """(values x candidates) 0/1: which candidates match each value."""
        rows = self.primary if primary else self.listed
        return np.stack([rows.get(v, self.none) for v in values])


_DOC_CACHE: OrderedDict[tuple[tuple[str, ...], ...], _DocTokens] = OrderedDict()
_DOC_CACHE_SIZE = 2
_DOC_LOCK = threading.Lock()


def _doc_tokens(categories_by_doc: Sequence[Sequence[str]]) -> _DocTokens:
    key = tuple(map(tuple, categories_by_doc))
    with _DOC_LOCK:
        hit = _DOC_CACHE.get(key)
        if hit is not None:
            _DOC_CACHE.move_to_end(key)
            return hit
    built = _DocTokens(categories_by_doc)
    with _DOC_LOCK:
        _DOC_CACHE[key] = built
        while len(_DOC_CACHE) > _DOC_CACHE_SIZE:
            _DOC_CACHE.popitem(last=False)
    return built


def candidate_mask(
    only_by_row: Sequence[Sequence[str]],
    exclude_by_row: Sequence[Sequence[str]],
    categories_by_doc: Sequence[Sequence[str]],
) -> np.ndarray:
    """``passes`` for every (row, candidate) pair: a (rows x candidates) boolean matrix.

    Rows with the same filters share one row of the answer (a list has far fewer distinct
    filters than subscribers), computed from the candidates' 0/1 matches of each value;
    the matrix is then one gather.
    """
    docs = _doc_tokens(categories_by_doc)
    groups: dict[tuple[tuple[str, ...], tuple[str, ...]], int] = {}
    setdefault = groups.setdefault
    which = np.fromiter(
        (
            setdefault((tuple(o), tuple(e)), len(groups))
            for o, e in zip(only_by_row, exclude_by_row, strict=True)
        ),
        dtype=np.intp,
        count=len(only_by_row),
    )
    # Groups x distinct values, 0/1, times the candidates' matches of each value.
    index: dict[str, int] = {}
    only_at: list[tuple[int, int]] = []
    exclude_at: list[tuple[int, int]] = []
    for g, (only, exclude) in enumerate(groups):
        only_at += [(g, index.setdefault(v, len(index))) for v in only]
        exclude_at += [(g, index.setdefault(v, len(index))) for v in exclude]
    table = np.ones((len(groups), docs.n_docs), dtype=bool)
    values = list(index)
    for pairs, primary in ((only_at, True), (exclude_at, False)):
        if not pairs:
            continue
        chosen = np.zeros((len(groups), len(values)), dtype=np.float32)
        chosen[tuple(zip(*pairs, strict=True))] = 1.0
        hits = chosen @ docs.stack(values, primary=primary)
        if primary:
            has = chosen.any(axis=1)
            table[has] = hits[has] > 0
        else:
            table &= hits == 0
    return table[which]
