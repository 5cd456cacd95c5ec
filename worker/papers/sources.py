"""Paper sources: read a file, URL or stdin and parse it into `PaperRecord` objects.

Three formats are understood, detected from the content when not given:

``hf``
    The Hugging Face daily-papers API (``https://huggingface.co/api/daily_papers``): a JSON
    list of items, each with a ``paper`` object (``id``, ``title``, ``summary``,
    ``authors[].name``, ``upvotes``, ``publishedAt``) and item-level fields such as
    ``publishedAt`` (when the paper was featured), ``title``, ``numComments``,
    ``thumbnail``. Unknown fields are ignored.

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
    (strings or null) are optional. ``sample`` (boolean) marks generated sample data and is
    otherwise ignored. Any other field is an error, so that a misspelt name such as
    ``upvote`` does not silently drop data. The full description is docs/papers-jsonl.md.

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
_ARXIV_ABS_RE = re.compile(r"arxiv\.org/abs/(?P<id>.+?)(?:v\d+)?$")


class PaperSourceError(PapermailError):
    """A source that cannot be read or parsed; nothing from it is ingested."""

    exit_code = 2

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [message]


@dataclass(frozen=True)
class PaperRecord:
    """One paper as read from a source, ready to upsert."""

    id: str
    title: str
    abstract: str = ""
    authors: list[str] = field(default_factory=list)
    upvotes: int = 0
    published_at: datetime | None = None  # UTC-aware
    url: str | None = None
    pdf_url: str | None = None
    hf_url: str | None = None

    def __post_init__(self) -> None:
        if self.published_at is not None:
            if self.published_at.tzinfo is None:
                raise ValueError("PaperRecord.published_at must be timezone-aware")
            object.__setattr__(self, "published_at", self.published_at.astimezone(UTC))
        defaults = default_urls(self.id)
        for name, value in defaults.items():
            if not getattr(self, name):
                object.__setattr__(self, name, value)


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
    """Parse the Hugging Face daily-papers API JSON (a list of items)."""
    try:
        data = loads_json(text, what="the document", max_bytes=None)
    except UnsafeJSON as exc:
        raise PaperSourceError(f"{name} (hf): {exc}") from None
    except json.JSONDecodeError as exc:
        raise PaperSourceError(f"{name} (hf): {_json_problem(text, exc)}") from None
    if not isinstance(data, list):
        raise PaperSourceError(
            f"{name} (hf): expected a JSON list of daily-papers items, got {_describe(data)}"
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


def _hf_record(item: Any) -> PaperRecord:
    if not isinstance(item, dict):
        raise _FieldError(f"expected an object, got {_describe(item)}")
    paper = item.get("paper")
    if paper is None:
        raise _FieldError("field 'paper' is missing")
    if not isinstance(paper, dict):
        raise _FieldError(f"expected an object for 'paper', got {_describe(paper)}")
    paper_id = _check_id(_req_str(paper, "id", "paper.id"), "paper.id")
    # The item repeats the title; use it when the paper object lacks one.
    if "title" in paper or "title" not in item:
        title = _req_str(paper, "title", "paper.title")
    else:
        title = _req_str(item, "title", "title")
    raw_authors = paper.get("authors")
    if raw_authors is not None and not isinstance(raw_authors, list):
        raise _FieldError(f"expected a list for 'paper.authors', got {_describe(raw_authors)}")
    authors = []
    for i, author in enumerate(raw_authors or []):
        if not isinstance(author, dict):
            raise _FieldError(
                f"expected an object for 'paper.authors[{i}]', got {_describe(author)}"
            )
        author_name = _opt_str(author, "name", f"paper.authors[{i}].name")
        if author_name:
            authors.append(author_name)
    # The item's publishedAt is when the paper was featured on Daily Papers, which is what
    # makes it "trending today"; the arXiv date (paper.publishedAt) is often days older.
    published = _opt_datetime(item, "publishedAt") or _opt_datetime(
        paper, "publishedAt", "paper.publishedAt"
    )
    return PaperRecord(
        id=paper_id,
        title=title,
        abstract=_opt_str(paper, "summary", "paper.summary") or "",
        authors=authors,
        upvotes=_upvotes(paper, "upvotes", "paper.upvotes"),
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
        "sample",
    }
)


def parse_jsonl(text: str, name: str = "<source>") -> list[PaperRecord]:
    """Parse papermail's JSON Lines format (see the module docstring)."""
    errors = _Errors(name, "jsonl")
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
        upvotes=_upvotes(obj, "upvotes"),
        published_at=_opt_datetime(obj, "published_at"),
        url=_opt_url(obj, "url"),
        pdf_url=_opt_url(obj, "pdf_url"),
        hf_url=_opt_url(obj, "hf_url"),
    )


def parse_arxiv(text: str, name: str = "<source>") -> list[PaperRecord]:
    """Parse an arXiv API Atom feed."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        line, column = exc.position
        problem = re.sub(r": line \d+, column \d+$", "", str(exc))
        # expat's words for "the document stopped in the middle".
        truncated = problem.startswith(("no element found", "unclosed token"))
        hint = " (the data ends early: truncated?)" if truncated else ""
        raise PaperSourceError(
            f"{name} (arxiv): invalid XML at line {line}, column {column + 1}: {problem}{hint}"
        ) from None
    if root.tag != f"{{{ATOM_NS}}}feed":
        raise PaperSourceError(f"{name} (arxiv): expected an Atom <feed>, got <{root.tag}>")
    errors = _Errors(name, "arxiv")
    records: list[PaperRecord] = []
    for number, entry in enumerate(root.findall("atom:entry", NS), start=1):
        entry_id = (entry.findtext("atom:id", "", NS) or "").strip()
        # The API reports bad queries as a feed whose only entry is the error.
        if entry_id.startswith(("http://arxiv.org/api/errors", "https://arxiv.org/api/errors")):
            message = _clean(entry.findtext("atom:summary", "", NS) or "unknown error")
            raise PaperSourceError(f"{name} (arxiv): the arXiv API returned an error: {message}")
        record = errors.run(f"entry {number}", lambda entry=entry: _arxiv_record(entry))
        if record is not None:
            records.append(record)
    errors.raise_if_any()
    return records


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
    return PaperRecord(
        id=paper_id,
        title=_req_str(fields, "title"),
        abstract=_opt_str(fields, "summary") or "",
        authors=[a for a in authors if a],
        published_at=_opt_datetime(fields, "published"),
        url=url,
        pdf_url=pdf_url,
        hf_url=None,
    )


PARSERS: dict[Format, Callable[[str, str], list[PaperRecord]]] = {
    "hf": parse_hf,
    "arxiv": parse_arxiv,
    "jsonl": parse_jsonl,
}


# --------------------------------------------------------------------------- detection, reading


def detect_format(text: str, name: str = "<source>") -> Format:
    """Guess the format from the first non-blank character(s)."""
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
        return "jsonl"
    raise PaperSourceError(
        f"{name}: cannot detect the format (starts with {head[:20]!r}); expected a "
        "Hugging Face daily-papers JSON list, an arXiv Atom feed or papermail JSON Lines; "
        "pass --format hf|arxiv|jsonl"
    )


def parse(text: str, fmt: str | None = None, name: str = "<source>") -> ParsedSource:
    """Parse a whole source; raises PaperSourceError and returns nothing when any record is bad."""
    if fmt is None:
        fmt = detect_format(text, name)
    if fmt not in PARSERS:
        raise PaperSourceError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
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
            **(extra or {}),
        }
        lines.append(json.dumps(obj, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)
