"""Paper sources: read a file, URL or stdin and parse it into `PaperRecord` objects.

Three formats are understood, detected from the content when not given:

``hf``
    The Hugging Face papers API. Three shapes are read: the daily-papers list
    (``https://huggingface.co/api/daily_papers``): a JSON list of items, each with a
    ``paper`` object (``id``, ``title``, ``summary``, ``authors[].name``, ``upvotes``,
    ``publishedAt``) and item-level fields such as ``publishedAt`` (when the paper was
    featured), ``title``, ``numComments``; one paper object (``/api/papers/{id}``: the
    ``paper`` object's fields at the top level, ``submittedOnDailyAt`` for the featured
    day); and a list of paper objects (e.g. ``/api/papers/search``). Lists may mix items
    and paper objects; a single item or paper object is read as a list of one. Unknown
    fields are ignored.

``arxiv``
    An arXiv API Atom feed (``http://export.arxiv.org/api/query?...``).

``jsonl``
    papermail's own JSON Lines format, one JSON object per line; blank lines are ignored::

        {"id": "2401.12345", "title": "A title", "abstract": "One paragraph.",
         "authors": ["Ada Lovelace", "Zoë Müller"], "upvotes": 42,
         "published_at": "2026-11-25T18:00:00Z", "url": "https://...",
         "pdf_url": "https://...", "hf_url": "https://..."}

    (shown wrapped; in the file each object is on one line). ``id`` and ``title`` are
    required non-empty strings. ``abstract`` (string, default ""), ``authors`` (list of
    strings, default []), ``upvotes`` (non-negative integer, default 0), ``published_at``
    (ISO-8601 date or date-time; without an offset it is taken as UTC; null or absent:
    undated, the paper then counts from its ingestion), ``url``, ``pdf_url``, ``hf_url``
    (strings or null), ``categories`` (list of arXiv categories, the primary first),
    ``comment`` and ``doi`` (strings or null) are optional. ``sample`` (boolean) marks
    sample data and is otherwise ignored. Any other field is an error, so that a misspelt
    name such as ``upvote`` does not silently drop data. A pretty-printed JSON object is
    read as one record. The full description is docs/papers-jsonl.md.

An id with an arXiv version (``2401.12345v2``) is stored without it, the version kept in
``version``: the same paper from any source, in any version, is one record.
Leading whitespace or a byte-order mark before the JSON or XML is ignored.

Missing links default to ``https://huggingface.co/papers/<id>`` (``url`` and ``hf_url``)
and, when the id looks like an arXiv id, ``https://arxiv.org/pdf/<id>``. Every link, given
or derived, must be an absolute ``http``/``https`` URL (`worker.urls`): a record with a
``javascript:``, ``data:`` or relative link is a bad record like any other.

A malformed source is rejected as a whole: `PaperSourceError` lists every bad record (up to
`MAX_REPORTED_ERRORS`) with its position and the offending field, and nothing is returned.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

from worker import __version__
from worker.errors import PapermailError
from worker.untrusted import UnsafeJSON, loads_json
from worker.urls import url_problem

Format = Literal["hf", "arxiv", "jsonl"]
FORMATS: tuple[Format, ...] = ("hf", "arxiv", "jsonl")

MAX_REPORTED_ERRORS = 20
MAX_ID_LENGTH = 64  # papers.id is String(64)
DEFAULT_TIMEOUT = 30.0  # seconds, for URL sources
MAX_SOURCE_BYTES = 64 * 1024 * 1024  # refuse absurd downloads instead of exhausting memory

# Every link field of a paper; each must pass worker.urls.url_problem to be stored.
URL_FIELDS = ("url", "pdf_url", "hf_url")

ATOM_NS = "http://www.w3.org/2005/Atom"
NS = {"atom": ATOM_NS, "arxiv": "http://arxiv.org/schemas/atom"}

# New-style (2401.12345, 0704.0001) and old-style (hep-th/9901001, math.GT/0309136) ids.
ARXIV_ID_RE = re.compile(r"^(?:\d{4}\.\d{4,5}|[a-z][a-z\-]*(?:\.[A-Z]{2})?/\d{7})$")
_ARXIV_ABS_RE = re.compile(r"arxiv\.org/abs/(?P<id>.+?)(?:v(?P<version>\d+))?$")
# An id as some sources and people write it: with the version (2401.12345v2).
_VERSIONED_ID_RE = re.compile(
    r"^(?P<id>\d{4}\.\d{4,5}|[a-z][a-z\-]*(?:\.[A-Z]{2})?/\d{7})v(?P<version>\d+)$"
)
# arXiv category names (cs.LG, hep-th, cond-mat.dis-nn, q-bio.NC); feeds also list ACM and
# MSC class codes as <category>, which are not categories and are left out.
ARXIV_CATEGORY_RE = re.compile(r"^[a-z][a-z\-]*(?:\.[A-Za-z][A-Za-z\-]*)?$")
MAX_CATEGORIES = 32


class PaperSourceError(PapermailError):
    """A source that cannot be read or parsed; nothing from it is ingested."""

    exit_code = 2

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [message]


@dataclass(frozen=True)
class PaperRecord:
    """One paper as read from a source, ready to upsert.

    ``None`` means "this source does not say": an upsert then keeps what another source
    stored (Hugging Face's upvotes survive an arXiv record of the same paper).
    """

    id: str
    title: str
    abstract: str = ""
    authors: list[str] = field(default_factory=list)
    upvotes: int | None = None
    published_at: datetime | None = None  # UTC-aware
    url: str | None = None
    pdf_url: str | None = None
    hf_url: str | None = None
    categories: list[str] = field(default_factory=list)  # arXiv categories, primary first
    version: int | None = None  # arXiv version
    comment: str | None = None  # arXiv author comment
    doi: str | None = None
    # Link fields filled from the id's defaults rather than given by the source; an
    # upsert never lets them replace a link another source gave.
    derived: frozenset[str] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        match = _VERSIONED_ID_RE.match(self.id)
        if match:
            object.__setattr__(self, "id", match.group("id"))
            version = int(match.group("version"))
            object.__setattr__(self, "version", max(version, self.version or 0))
        if self.published_at is not None:
            if self.published_at.tzinfo is None:
                raise ValueError("PaperRecord.published_at must be timezone-aware")
            object.__setattr__(self, "published_at", self.published_at.astimezone(UTC))
        derived = set(self.derived)
        for name, value in default_urls(self.id).items():
            if not getattr(self, name):
                object.__setattr__(self, name, value)
                derived.add(name)
        object.__setattr__(self, "derived", frozenset(derived))

    @property
    def primary_category(self) -> str | None:
        return self.categories[0] if self.categories else None


@dataclass(frozen=True)
class ParsedSource:
    name: str  # file path, URL or "<stdin>", for messages
    format: Format
    records: list[PaperRecord]


def looks_like_arxiv_id(paper_id: str) -> bool:
    return bool(ARXIV_ID_RE.match(paper_id))


def default_urls(paper_id: str) -> dict[str, str | None]:
    hf = f"https://huggingface.co/papers/{paper_id}"
    pdf = f"https://arxiv.org/pdf/{paper_id}" if looks_like_arxiv_id(paper_id) else None
    return {"url": hf, "hf_url": hf, "pdf_url": pdf}


# --------------------------------------------------------------------------- field checks


class _FieldError(Exception):
    """One bad field of one record; becomes a line of PaperSourceError."""


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return repr(shown) if value.strip() else "an empty string"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _clean(text: str) -> str:
    # Feeds wrap titles and abstracts over lines and indent them; one space is what we show.
    return " ".join(text.split())


def _req_str(obj: dict[str, Any], key: str, label: str | None = None) -> str:
    label = label or key
    if key not in obj:
        raise _FieldError(f"field '{label}' is missing")
    value = obj[key]
    if not isinstance(value, str):
        raise _FieldError(f"expected a string for '{label}', got {_describe(value)}")
    cleaned = _clean(value)
    if not cleaned:
        raise _FieldError(f"field '{label}' is empty")
    return cleaned


def _opt_str(obj: dict[str, Any], key: str, label: str | None = None) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _FieldError(f"expected a string for '{label or key}', got {_describe(value)}")
    return _clean(value) or None


def _check_url(value: str | None, label: str, source: str = "") -> str | None:
    """A link as given, or _FieldError unless it is an absolute http(s) URL."""
    if value is None:
        return None
    problem = url_problem(value)
    if problem:
        why = "" if problem.startswith("only ") else f" ({problem})"
        raise _FieldError(
            f"expected an absolute http:// or https:// URL for '{label}'{source}, "
            f"got {_describe(value)}{why}"
        )
    return value


def _opt_url(obj: dict[str, Any], key: str, label: str | None = None) -> str | None:
    # Not _clean()ed: a tab or line break inside a link is an error to show as it is.
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _FieldError(f"expected a string for '{label or key}', got {_describe(value)}")
    return _check_url(value.strip() or None, label or key)


def check_record_urls(record: PaperRecord) -> None:
    """_FieldError for the first link of ``record`` (given or derived) that is not http(s)."""
    for name in URL_FIELDS:
        value = getattr(record, name)
        if value is not None and url_problem(value):
            derived = value == default_urls(record.id).get(name)
            _check_url(value, name, " (made from the id)" if derived else "")


def _check_id(paper_id: str, label: str) -> str:
    if len(paper_id) > MAX_ID_LENGTH:
        raise _FieldError(f"field '{label}' is longer than {MAX_ID_LENGTH} characters")
    if " " in paper_id:
        raise _FieldError(f"field '{label}' contains spaces: {paper_id!r}")
    return paper_id


def _upvotes(obj: dict[str, Any], key: str, label: str | None = None) -> int:
    label = label or key
    value = obj.get(key)
    if value is None:
        return 0
    # bool is an int subclass; an integral float (12.0) is accepted, 1.5 is not.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _FieldError(f"expected a number for '{label}', got {_describe(value)}")
    if isinstance(value, float) and not value.is_integer():
        raise _FieldError(f"expected a whole number for '{label}', got {value!r}")
    if value < 0:
        raise _FieldError(f"expected a non-negative number for '{label}', got {value!r}")
    return int(value)


def parse_datetime(value: str, label: str) -> datetime:
    """ISO-8601 date or date-time; no offset means UTC. Raises _FieldError."""
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise _FieldError(
            f"expected an ISO-8601 date-time for '{label}' (e.g. 2026-11-25T18:00:00Z), "
            f"got {_describe(value)}"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _opt_datetime(obj: dict[str, Any], key: str, label: str | None = None) -> datetime | None:
    label = label or key
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _FieldError(
            f"expected an ISO-8601 date-time string for '{label}', got {_describe(value)}"
        )
    return parse_datetime(value, label)


def _str_list(value: Any, label: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _FieldError(f"expected a list of names for '{label}', got {_describe(value)}")
    names = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _FieldError(f"expected a string for '{label}[{i}]', got {_describe(item)}")
        if item.strip():
            names.append(_clean(item))
    return names


def _categories(value: Any, label: str) -> list[str]:
    """A list of arXiv category names, primary first (duplicates dropped)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise _FieldError(
            f"expected a list of arXiv categories for '{label}' (e.g. [\"cs.LG\", "
            f'"stat.ML"]), got {_describe(value)}'
        )
    if len(value) > MAX_CATEGORIES:
        raise _FieldError(f"'{label}' lists more than {MAX_CATEGORIES} categories")
    names: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _FieldError(f"expected a string for '{label}[{i}]', got {_describe(item)}")
        name = item.strip()
        if not ARXIV_CATEGORY_RE.match(name):
            raise _FieldError(
                f"expected an arXiv category like cs.LG for '{label}[{i}]', got {_describe(item)}"
            )
        if name not in names:
            names.append(name)
    return names


# --------------------------------------------------------------------------- collecting errors


class _Errors:
    """Collects per-record errors so one run reports every bad record, not just the first."""

    def __init__(self, name: str, fmt: Format) -> None:
        self.name = name
        self.fmt = fmt
        self.items: list[str] = []

    def add(self, where: str, problem: str) -> None:
        self.items.append(f"{where}: {problem}")

    def run(self, where: str, build: Callable[[], PaperRecord]) -> PaperRecord | None:
        try:
            record = build()
            check_record_urls(record)  # the links each parser took, and the defaults
            return record
        except _FieldError as exc:
            self.add(where, str(exc))
            return None

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = self.items[:MAX_REPORTED_ERRORS]
        extra = len(self.items) - len(shown)
        if len(self.items) == 1:
            message = f"{self.name} ({self.fmt}): {shown[0]}; nothing was ingested"
        else:
            lines = "\n  ".join(shown + ([f"... and {extra} more"] if extra else []))
            message = (
                f"{self.name} ({self.fmt}): {len(self.items)} bad records, nothing was "
                f"ingested:\n  {lines}"
            )
        raise PaperSourceError(message, list(self.items))


def _json_problem(text: str, exc: json.JSONDecodeError, with_line: bool = True) -> str:
    """Where and what, plus a hint when the data simply stops (a truncated download)."""
    where = f"line {exc.lineno}, column {exc.colno}" if with_line else f"column {exc.colno}"
    # Raw newlines inside strings are a different error, so an unterminated string always
    # means the input ended inside it.
    truncated = exc.msg.startswith("Unterminated string") or not text[exc.pos :].strip()
    hint = " (the data ends early: truncated?)" if truncated else ""
    if exc.msg.endswith(" at"):  # "Unterminated string starting at"
        return f"invalid JSON: {exc.msg[0].lower()}{exc.msg[1:]} {where}{hint}"
    return f"invalid JSON at {where}: {exc.msg}{hint}"


# --------------------------------------------------------------------------- parsers


def parse_hf(text: str, name: str = "<source>") -> list[PaperRecord]:
    """Parse Hugging Face papers JSON: daily-papers items, paper objects, or a list of them."""
    try:
        data = loads_json(text, what="the document", max_bytes=None)
    except UnsafeJSON as exc:
        raise PaperSourceError(f"{name} (hf): {exc}") from None
    except json.JSONDecodeError as exc:
        raise PaperSourceError(f"{name} (hf): {_json_problem(text, exc)}") from None
    if isinstance(data, dict):
        data = [data]  # one daily-papers item or one paper object (/api/papers/{id})
    if not isinstance(data, list):
        raise PaperSourceError(
            f"{name} (hf): expected a JSON list of daily-papers items or paper objects, "
            f"got {_describe(data)}"
        )
    errors = _Errors(name, "hf")
    records: list[PaperRecord] = []
    for index, item in enumerate(data):
        where = f"record {index + 1} (JSON index {index})"
        record = errors.run(where, lambda item=item: _hf_record(item))
        if record is not None:
            records.append(record)
    errors.raise_if_any()
    return records


# Fields only a Hugging Face paper object has (a papermail record has none of them).
HF_PAPER_FIELDS = frozenset(
    {
        "summary",
        "publishedAt",
        "submittedOnDailyAt",
        "discussionId",
        "mediaUrls",
        "ai_summary",
        "ai_keywords",
        "githubRepo",
        "submittedOnDailyBy",
        "numComments",
        "organization",
        "projectPage",
    }
)


def _is_hf_paper(obj: dict[str, Any]) -> bool:
    authors = obj.get("authors")
    return "id" in obj and (
        bool(HF_PAPER_FIELDS & set(obj))
        or (isinstance(authors, list) and any(isinstance(a, dict) for a in authors))
    )


def _hf_record(item: Any) -> PaperRecord:
    if not isinstance(item, dict):
        raise _FieldError(f"expected an object, got {_describe(item)}")
    if "paper" in item:
        paper = item["paper"]
        if not isinstance(paper, dict):
            raise _FieldError(f"expected an object for 'paper', got {_describe(paper)}")
        prefix = "paper."
    elif _is_hf_paper(item):
        paper, prefix = item, ""  # a paper object: /api/papers/{id}, or a list of them
    elif item and set(item) <= JSONL_FIELDS:
        raise _FieldError(
            "this is a papermail JSON Lines record, not a Hugging Face item: write one such "
            "object per line and ingest with --format jsonl"
        )
    else:
        raise _FieldError(
            "field 'paper' is missing (expected a daily-papers item with 'paper', or a "
            "paper object with 'id', 'title' and 'summary')"
        )
    paper_id = _check_id(_req_str(paper, "id", f"{prefix}id"), f"{prefix}id")
    # The item repeats the title; use it when the paper object lacks one.
    if prefix and "title" not in paper and "title" in item:
        title = _req_str(item, "title", "title")
    else:
        title = _req_str(paper, "title", f"{prefix}title")
    raw_authors = paper.get("authors")
    if raw_authors is not None and not isinstance(raw_authors, list):
        raise _FieldError(f"expected a list for '{prefix}authors', got {_describe(raw_authors)}")
    authors = []
    for i, author in enumerate(raw_authors or []):
        if not isinstance(author, dict):
            raise _FieldError(
                f"expected an object for '{prefix}authors[{i}]', got {_describe(author)}"
            )
        author_name = _opt_str(author, "name", f"{prefix}authors[{i}].name")
        if author_name:
            authors.append(author_name)
    # When the paper was featured on Daily Papers is what makes it "trending today": the
    # item's publishedAt, else the paper's submittedOnDailyAt; the arXiv date
    # (paper.publishedAt) is often days older and only the last resort.
    published = (
        (_opt_datetime(item, "publishedAt") if prefix else None)
        or _opt_datetime(paper, "submittedOnDailyAt", f"{prefix}submittedOnDailyAt")
        or _opt_datetime(paper, "publishedAt", f"{prefix}publishedAt")
    )
    upvotes = _upvotes(paper, "upvotes", f"{prefix}upvotes") if "upvotes" in paper else None
    return PaperRecord(
        id=paper_id,
        title=title,
        abstract=_opt_str(paper, "summary", f"{prefix}summary") or "",
        authors=authors,
        upvotes=upvotes,
        published_at=published,
    )


JSONL_FIELDS = frozenset(
    {
        "id",
        "title",
        "abstract",
        "authors",
        "upvotes",
        "published_at",
        "url",
        "pdf_url",
        "hf_url",
        "categories",
        "comment",
        "doi",
        "sample",
    }
)


def parse_jsonl(text: str, name: str = "<source>") -> list[PaperRecord]:
    """Parse papermail's JSON Lines format (see the module docstring).

    A pretty-printed JSON document is read as what it is: one object is one record, and a
    list is refused as such (not reported as a run of truncated lines).
    """
    errors = _Errors(name, "jsonl")
    document = _whole_document(text, name)
    if document is not _NOT_A_DOCUMENT:
        if isinstance(document, list):
            raise PaperSourceError(
                f"{name} (jsonl): this is one JSON list, not JSON Lines; write one object "
                "per line (a Hugging Face list: --format hf)"
            )
        record = errors.run("record 1 (the whole document)", lambda: _jsonl_record(document))
        errors.raise_if_any()
        return [record] if record is not None else []
    records: list[PaperRecord] = []
    number = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        number += 1
        where = f"record {number} (line {lineno})"
        try:
            obj = loads_json(line, what="the record", max_bytes=None)
        except UnsafeJSON as exc:
            errors.add(where, str(exc))
            continue
        except json.JSONDecodeError as exc:
            errors.add(where, _json_problem(line, exc, with_line=False))
            continue
        record = errors.run(where, lambda obj=obj: _jsonl_record(obj))
        if record is not None:
            records.append(record)
    errors.raise_if_any()
    return records


_NOT_A_DOCUMENT = object()


def _whole_document(text: str, name: str, fmt: str = "jsonl") -> Any:
    """The parsed JSON value when ``text`` is one JSON document spread over several lines
    (pretty-printed), else ``_NOT_A_DOCUMENT``. Raises PaperSourceError when it plainly
    is one (its first line opens it and nothing else) but is not valid JSON."""
    body = text.strip()
    if "\n" not in body or body[0] not in "[{":
        return _NOT_A_DOCUMENT
    first = body.split("\n", 1)[0].strip()
    try:
        loads_json(first, what="the record", max_bytes=None)
        return _NOT_A_DOCUMENT  # the first line is a record by itself: JSON Lines
    except (json.JSONDecodeError, UnsafeJSON):
        pass
    try:
        return loads_json(text, what="the document", max_bytes=None)
    except UnsafeJSON as exc:
        raise PaperSourceError(f"{name} ({fmt}): {exc}") from None
    except json.JSONDecodeError as exc:
        if first in ("{", "["):
            raise PaperSourceError(
                f"{name} ({fmt}): a pretty-printed JSON document with {_json_problem(text, exc)}"
            ) from None
        return _NOT_A_DOCUMENT


def _jsonl_record(obj: Any) -> PaperRecord:
    if not isinstance(obj, dict):
        raise _FieldError(f"expected a JSON object, got {_describe(obj)}")
    unknown = sorted(set(obj) - JSONL_FIELDS)
    if unknown:
        raise _FieldError(
            f"unknown field '{unknown[0]}' (allowed: {', '.join(sorted(JSONL_FIELDS))})"
        )
    sample = obj.get("sample")
    if sample is not None and not isinstance(sample, bool):
        raise _FieldError(f"expected true or false for 'sample', got {_describe(sample)}")
    return PaperRecord(
        id=_check_id(_req_str(obj, "id"), "id"),
        title=_req_str(obj, "title"),
        abstract=_opt_str(obj, "abstract") or "",
        authors=_str_list(obj.get("authors"), "authors"),
        upvotes=_upvotes(obj, "upvotes") if obj.get("upvotes") is not None else None,
        published_at=_opt_datetime(obj, "published_at"),
        url=_opt_url(obj, "url"),
        pdf_url=_opt_url(obj, "pdf_url"),
        hf_url=_opt_url(obj, "hf_url"),
        categories=_categories(obj.get("categories"), "categories"),
        comment=_opt_str(obj, "comment"),
        doi=_opt_str(obj, "doi"),
    )


def parse_arxiv(text: str, name: str = "<source>") -> list[PaperRecord]:
    """Parse an arXiv API Atom feed."""
    return parse_arxiv_feed(text, name).records


@dataclass(frozen=True)
class ArxivFeed:
    records: list[PaperRecord]
    total: int | None  # opensearch:totalResults, for paging
    start: int | None  # opensearch:startIndex
    entries: int  # <entry> elements on this page


OPENSEARCH_NS = "http://a9.com/-/spec/opensearch/1.1/"


def parse_arxiv_feed(text: str, name: str = "<source>") -> ArxivFeed:
    """:func:`parse_arxiv` with the paging figures of the feed."""
    # Leading whitespace (a newline before <?xml, as some servers and editors leave) is
    # not XML's business; line numbers in errors still count from the real first line.
    body = text.lstrip("\ufeff \t\r\n")
    skipped_lines = text[: len(text) - len(body)].count("\n")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        line, column = exc.position
        problem = re.sub(r": line \d+, column \d+$", "", str(exc))
        # expat's words for "the document stopped in the middle".
        truncated = problem.startswith(("no element found", "unclosed token"))
        hint = " (the data ends early: truncated?)" if truncated else ""
        raise PaperSourceError(
            f"{name} (arxiv): invalid XML at line {line + skipped_lines}, column {column + 1}: "
            f"{problem}{hint}"
        ) from None
    if root.tag != f"{{{ATOM_NS}}}feed":
        raise PaperSourceError(f"{name} (arxiv): expected an Atom <feed>, got <{root.tag}>")
    errors = _Errors(name, "arxiv")
    records: list[PaperRecord] = []
    entries = root.findall("atom:entry", NS)
    for number, entry in enumerate(entries, start=1):
        entry_id = (entry.findtext("atom:id", "", NS) or "").strip()
        # The API reports bad queries as a feed whose only entry is the error.
        if entry_id.startswith(("http://arxiv.org/api/errors", "https://arxiv.org/api/errors")):
            message = _clean(entry.findtext("atom:summary", "", NS) or "unknown error")
            raise PaperSourceError(f"{name} (arxiv): the arXiv API returned an error: {message}")
        record = errors.run(f"entry {number}", lambda entry=entry: _arxiv_record(entry))
        if record is not None:
            records.append(record)
    errors.raise_if_any()
    return ArxivFeed(
        records=records,
        total=_opensearch_int(root, "totalResults"),
        start=_opensearch_int(root, "startIndex"),
        entries=len(entries),
    )


def _opensearch_int(root: ET.Element, tag: str) -> int | None:
    value = (root.findtext(f"{{{OPENSEARCH_NS}}}{tag}") or "").strip()
    return int(value) if value.isdigit() else None


def _arxiv_record(entry: ET.Element) -> PaperRecord:
    fields: dict[str, Any] = {}
    for tag in ("id", "title", "summary", "published"):
        element = entry.find(f"atom:{tag}", NS)
        if element is not None:
            fields[tag] = element.text or ""
    raw_id = _req_str(fields, "id")
    match = _ARXIV_ABS_RE.search(raw_id)
    if not match:
        raise _FieldError(
            f"expected an arXiv abstract URL like http://arxiv.org/abs/2401.12345v1 for 'id', "
            f"got {_describe(raw_id)}"
        )
    paper_id = _check_id(match.group("id"), "id")
    version = int(match.group("version")) if match.group("version") else None
    authors = [
        _clean(author.findtext("atom:name", "", NS) or "")
        for author in entry.findall("atom:author", NS)
    ]
    url = pdf_url = None
    for link in entry.findall("atom:link", NS):
        href = link.get("href")
        if not href:
            continue
        if link.get("title") == "pdf" or link.get("type") == "application/pdf":
            pdf_url = _check_url(href.strip(), "pdf_url", " (the PDF <link> href)")
        elif link.get("rel", "alternate") == "alternate":
            url = _check_url(href.strip(), "url", ' (the <link rel="alternate"> href)')
    # The primary category first, then the others in the feed's order; class codes
    # (ACM, MSC) that feeds list as <category> are not arXiv categories.
    categories: list[str] = []
    primary = entry.find("arxiv:primary_category", NS)
    terms = [primary.get("term")] if primary is not None else []
    terms += [c.get("term") for c in entry.findall("atom:category", NS)]
    for term in terms:
        term = (term or "").strip()
        if ARXIV_CATEGORY_RE.match(term) and term not in categories:
            categories.append(term)
    return PaperRecord(
        id=paper_id,
        title=_req_str(fields, "title"),
        abstract=_opt_str(fields, "summary") or "",
        authors=[a for a in authors if a],
        published_at=_opt_datetime(fields, "published"),
        url=url,
        pdf_url=pdf_url,
        hf_url=None,
        categories=categories[:MAX_CATEGORIES],
        version=version,
        comment=_clean(entry.findtext("arxiv:comment", "", NS) or "") or None,
        doi=_clean(entry.findtext("arxiv:doi", "", NS) or "") or None,
    )


PARSERS: dict[Format, Callable[[str, str], list[PaperRecord]]] = {
    "hf": parse_hf,
    "arxiv": parse_arxiv,
    "jsonl": parse_jsonl,
}


# --------------------------------------------------------------------------- detection, reading


def detect_format(text: str, name: str = "<source>") -> Format:
    """Guess the format from the content: XML, a JSON document, or JSON Lines."""
    head = text.lstrip("\ufeff \t\r\n")
    if not head:
        raise PaperSourceError(f"{name}: the source is empty")
    if head.startswith("<"):
        if "<feed" in head[:4096] and ATOM_NS in head[:4096]:
            return "arxiv"
        raise PaperSourceError(
            f"{name}: this is XML but not an Atom feed; papermail reads arXiv API Atom feeds "
            "(pass --format arxiv to see the parse error)"
        )
    if head.startswith("["):
        return "hf"
    if head.startswith("{"):
        document = _whole_document(head, name, "json")
        if document is _NOT_A_DOCUMENT:
            return "jsonl"
        # One pretty-printed object: a Hugging Face item or paper object, or one papermail
        # record; anything else is said to be the wrong shape, not "truncated".
        if "paper" in document or _is_hf_paper(document):
            return "hf"
        unknown = sorted(set(document) - JSONL_FIELDS)
        if not unknown:
            return "jsonl"
        raise PaperSourceError(
            f"{name}: this is one JSON object, but neither a Hugging Face daily-papers item "
            "(with 'paper') or paper object (with 'id', 'title', 'summary') nor a papermail "
            f"record (unknown field{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(u) for u in unknown[:5])})"
        )
    raise PaperSourceError(
        f"{name}: cannot detect the format (starts with {head[:20]!r}); expected a "
        "Hugging Face papers JSON list or object, an arXiv Atom feed or papermail JSON "
        "Lines; pass --format hf|arxiv|jsonl"
    )


def parse(text: str, fmt: str | None = None, name: str = "<source>") -> ParsedSource:
    """Parse a whole source; raises PaperSourceError and returns nothing when any record is bad."""
    if fmt is None:
        fmt = detect_format(text, name)
    if fmt not in PARSERS:
        raise PaperSourceError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    # A byte-order mark is no part of the text; JSON allows leading whitespace and the
    # arXiv parser skips it (JSON Lines keeps its lines, for the line numbers of errors).
    text = text.lstrip("\ufeff")
    return ParsedSource(name=name, format=fmt, records=PARSERS[fmt](text, name))  # type: ignore[index]


def _decode(data: bytes, name: str, charset: str = "utf-8") -> str:
    try:
        return data.decode(charset)
    except (UnicodeDecodeError, LookupError) as exc:
        position = f" at byte {exc.start}" if isinstance(exc, UnicodeDecodeError) else ""
        raise PaperSourceError(f"{name}: not valid {charset} text{position}") from None


def _fetch(url: str, timeout: float) -> str:
    request = urllib.request.Request(
        url,
        headers={
            "User-Agent": f"papermail/{__version__} (+paper ingest)",
            "Accept": "application/json, application/atom+xml, application/x-ndjson, */*",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(MAX_SOURCE_BYTES + 1)
            charset = response.headers.get_content_charset() or "utf-8"
    except urllib.error.HTTPError as exc:
        raise PaperSourceError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise PaperSourceError(f"{url}: cannot fetch: {exc.reason}") from None
    except TimeoutError:
        raise PaperSourceError(f"{url}: no answer within {timeout:g} seconds") from None
    except OSError as exc:
        raise PaperSourceError(f"{url}: cannot fetch: {exc}") from None
    if len(data) > MAX_SOURCE_BYTES:
        raise PaperSourceError(f"{url}: larger than {MAX_SOURCE_BYTES // 2**20} MiB, refused")
    return _decode(data, url, charset)


def read_source(
    source: str, *, timeout: float = DEFAULT_TIMEOUT, stdin: IO[bytes] | None = None
) -> tuple[str, str]:
    """The text of SOURCE (a path, an http(s) URL or ``-`` for stdin) and its display name."""
    if source == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        return _decode(stream.read(), "<stdin>"), "<stdin>"
    if source.startswith(("http://", "https://")):
        return _fetch(source, timeout), source
    if "://" in source:
        raise PaperSourceError(f"{source}: only http:// and https:// URLs are supported")
    path = Path(source)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PaperSourceError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise PaperSourceError(f"{source}: is a directory, not a file") from None
    except OSError as exc:
        raise PaperSourceError(f"{source}: cannot read: {exc.strerror}") from None
    return _decode(data, source), source


def load_source(
    source: str,
    fmt: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    stdin: IO[bytes] | None = None,
) -> ParsedSource:
    """Read and parse SOURCE completely (nothing is written anywhere)."""
    text, name = read_source(source, timeout=timeout, stdin=stdin)
    return parse(text, fmt, name)


def dump_jsonl(records: Iterable[PaperRecord], extra: dict[str, Any] | None = None) -> str:
    """Records as papermail JSON Lines (the inverse of parse_jsonl)."""
    lines = []
    for record in records:
        obj: dict[str, Any] = {
            "id": record.id,
            "title": record.title,
            "abstract": record.abstract,
            "authors": record.authors,
            "upvotes": record.upvotes,
            "published_at": (
                record.published_at.isoformat().replace("+00:00", "Z")
                if record.published_at
                else None
            ),
            "url": record.url,
            "pdf_url": record.pdf_url,
            "hf_url": record.hf_url,
            **({"categories": record.categories} if record.categories else {}),
            **({"comment": record.comment} if record.comment else {}),
            **({"doi": record.doi} if record.doi else {}),
            **(extra or {}),
        }
        lines.append(json.dumps(obj, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)
