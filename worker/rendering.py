"""Compile the email templates once; render one digest into an outgoing message.

Compile (once per template version, cached in memory and, sealed, in a private directory):
    Jinja ``{% include %}`` resolved as text -> every other Jinja tag swapped for an
    inert placeholder -> mjml-python (MJML -> HTML, no web fonts) -> premailer (CSS
    inlined, no network) -> placeholders swapped back: a Jinja template of the final HTML.
    Placeholders are needed because lxml percent-encodes ``{{ }}`` inside ``href`` and
    may move stray text; a statement tag becomes an HTML comment (safe between table
    rows), an expression becomes a bare alphanumeric word (safe in text and attributes).
Fill (per email): the Jinja render, a dozen signed links and a hand-built MIME message
(the stdlib ``EmailMessage`` costs more than the whole render; tests parse ours back).
The fill is the hot loop of a send (bench/render.py): templates compile through a code
generator that reads paper-view fields without a sandbox call and escapes a str with one
C call (no Markup per value); both MIME parts are quoted-printable, encoded from the
pieces the templates yield, which recur across an edition and are looked up (see "MIME
bodies"); tests/unit/test_render_golden.py holds every byte of the output to a golden
file, and the parts decode back to the html and text.
"""

from __future__ import annotations

import binascii
import contextlib
import email.utils
import hashlib
import hmac
import itertools
import json
import logging
import os
import random
import re
import stat
import tempfile
import textwrap
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

from jinja2 import Environment, StrictUndefined, Template, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup

from worker import links
from worker.categories import describe_filters
from worker.clock import utcnow
from worker.config import Settings, get_settings
from worker.errors import InvalidInput
from worker.message import OutgoingMessage, bare_address
from worker.models import WEEKDAYS, Paper
from worker.papers.sources import looks_like_arxiv_id
from worker.resources import email_templates_dir, shared_templates_dir
from worker.urls import safe_url

log = logging.getLogger(__name__)

# Bump when the compile pipeline changes in a way the template sources do not show.
COMPILER_VERSION = "4"
MJML_TEMPLATES = ("digest", "confirm")
ABSTRACT_CHARS = 300
# Shorter abstracts tried, in order, when a digest would pass PAPERMAIL_EMAIL_MAX_BYTES;
# after the last one the lowest-ranked papers move to the "more on the web" link.
ABSTRACT_BUDGET_STEPS = (200, 120)
TITLE_CHARS = 300
TEXT_WIDTH = 78
MAX_SUBJECT_CHARS = 70


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class PaperView:
    """What the email shows of one paper (``matched_topic`` is per subscriber)."""

    id: str
    title: str
    authors: list[str]
    upvotes: int
    abstract: str
    url: str
    pdf_url: str | None
    hf_url: str | None
    matched_topic: str | None
    # arXiv data of the merged record (issue 13), for the templates to show (issue 14).
    arxiv_id: str | None = None
    primary_category: str | None = None
    abs_url: str | None = None
    # When the paper appeared (its publication date, UTC), shown next to its arXiv id.
    published: date | None = None
    # The words of the paper that made it match ``matched_topic`` (selection's
    # explanation): named in the reason line and highlighted in the snippet. Empty: the
    # topic's own words are highlighted.
    matched_terms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipient:
    subscriber_id: int
    email: str
    topics: tuple[str, ...]
    frequency: str
    weekday: int | None
    send_hour: int
    timezone: str
    categories_only: tuple[str, ...] = ()  # the subscriber's arXiv category filters
    categories_exclude: tuple[str, ...] = ()


_VIEW_COLUMNS = (
    "id", "title", "authors", "upvotes", "abstract", "url", "pdf_url", "hf_url", "categories",
    "published_at",
)  # fmt: skip
_new_object = object.__new__


def paper_view(
    paper: Paper, matched_topic: str | None, matched_terms: Sequence[str] = ()
) -> PaperView:
    # A loaded row's column values sit in its __dict__, which is where SQLAlchemy's
    # attribute descriptor reads them from (after a few checks per read, ~1 us for the
    # eight); an unloaded or expired column, or another kind of object, goes through
    # getattr and loads as before.
    row = paper.__dict__ if type(paper) is Paper else {}
    try:
        pid, title, authors, upvotes = row["id"], row["title"], row["authors"], row["upvotes"]
        abstract, url, pdf_url, hf_url = row["abstract"], row["url"], row["pdf_url"], row["hf_url"]
        categories, published_at = row["categories"], row["published_at"]
    except KeyError:
        # Only the missing columns go through getattr (a Paper built in Python and never
        # flushed lacks the ones it was not given, such as categories: None, as before).
        pid, title, authors, upvotes, abstract, url, pdf_url, hf_url, categories, published_at = (
            row[name] if name in row else getattr(paper, name, None) for name in _VIEW_COLUMNS
        )
    arxiv = bool(pid) and looks_like_arxiv_id(pid)
    # The frozen dataclass's __init__ sets each field through object.__setattr__; its
    # __dict__ filled at once is the same object (fields, eq, repr, replace read it).
    view = _new_object(PaperView)
    view.__dict__.update(
        id=pid,
        title=title,
        authors=list(authors or ()),
        upvotes=int(upvotes or 0),
        abstract=abstract or "",
        # The paper's page, else its Hugging Face page when the page link is unusable.
        url=url if safe_url(url) else (hf_url or ""),
        pdf_url=pdf_url,
        hf_url=hf_url,
        matched_topic=matched_topic,
        arxiv_id=pid if arxiv else None,
        primary_category=categories[0] if categories else None,
        abs_url=f"https://arxiv.org/abs/{pid}" if arxiv else None,
        published=published_at.date() if isinstance(published_at, datetime) else None,
        matched_terms=tuple(matched_terms),
    )
    return view


# --------------------------------------------------------------------------- text helpers

# Anything that could end a header line in some parser: C0/C1 controls, DEL, U+2028/9.
_BREAKERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_SPACES = re.compile(r"\s+")


def clean_line(value: str) -> str:
    """One line of text: every control character and run of whitespace becomes one space."""
    return _SPACES.sub(" ", _BREAKERS.sub(" ", value)).strip()


@lru_cache(maxsize=8192)
def shorten(text: str, limit: int) -> str:
    """``text`` on one line, cut at a word boundary to at most ``limit`` chars plus "…"."""
    text = clean_line(text)
    if len(text) <= limit:
        return text
    cut = text[: limit + 1]
    space = cut.rfind(" ")
    cut = cut[:space] if space > limit // 2 else text[:limit]
    return cut.rstrip(" ,;:.-–—") + "…"


# Topics recur across subscribers (a few dozen distinct ones per edition).
_clean_topic = lru_cache(maxsize=4096)(clean_line)


def short_authors(authors: Sequence[str], keep: int = 3) -> str:
    names = [clean_line(a) for a in authors if a and a.strip()]
    if len(names) <= keep:
        return ", ".join(names)
    return ", ".join(names[:keep]) + " et al."


@lru_cache(maxsize=8192)
def _wrap(text: str, indent: str = "", first: str | None = None) -> str:
    """``textwrap.fill`` at TEXT_WIDTH (no hyphen breaks), every line indented (the first
    by ``first`` when given, e.g. a list number)."""
    if first is not None and first != indent:
        return textwrap.fill(
            text, TEXT_WIDTH, initial_indent=first, subsequent_indent=indent,
            break_on_hyphens=False,
        )  # fmt: skip
    words = text.split(" ")
    width = TEXT_WIDTH - len(indent)
    # textwrap splits on ASCII whitespace only; with single spaces between words that
    # all fit a line (the usual case: one footer per email, textwrap a tenth of the
    # render) it is the greedy fill below. Anything else is left to textwrap itself.
    if not text or "" in words or max(map(len, words)) > width or not text.isprintable():
        return textwrap.fill(
            text, TEXT_WIDTH, initial_indent=indent, subsequent_indent=indent,
            break_on_hyphens=False,
        )  # fmt: skip
    lines, line = [], words[0]
    for word in words[1:]:
        if len(line) + 1 + len(word) <= width:
            line += " " + word
        else:
            lines.append(indent + line)
            line = word
    lines.append(indent + line)
    return "\n".join(lines)


_MONTHS = (
    *("January", "February", "March", "April", "May", "June"),
    *("July", "August", "September", "October", "November", "December"),
)


@lru_cache(maxsize=512)
def _date_labels(day: date) -> tuple[str, str]:
    weekday = WEEKDAYS[day.weekday()].capitalize()
    return (
        f"{weekday}, {day.day} {_MONTHS[day.month - 1]} {day.year}",
        f"{day.day} {_MONTHS[day.month - 1][:3]}",
    )


_STOPWORDS = frozenset(
    {"a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "in", "into", "is"}
    | {"of", "on", "or", "the", "to", "via", "with", "using"}
)
_WORD = re.compile(r"\w+")
_SUFFIXES = ("ations", "ation", "ings", "ing", "ies", "es", "ed", "s")


def _stem(word: str) -> str:
    """A crude stem, enough to find "pruned" and "prune" for the topic "pruning"."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)]
    return word


@lru_cache(maxsize=4096)
def _term_pattern(terms: tuple[str, ...]) -> re.Pattern[str] | None:
    """A regex for the words worth highlighting of these terms (stems, stopwords out)."""
    stems = {
        _stem(word)
        for term in terms
        for word in _WORD.findall(term.lower())
        if len(word) >= 3 and word not in _STOPWORDS
    }
    if not stems:
        return None
    alternatives = "|".join(sorted(map(re.escape, stems), key=lambda x: (-len(x), x)))
    return re.compile(rf"\b(?:{alternatives})\w*", re.IGNORECASE)


@lru_cache(maxsize=16384)
def highlight(text: str, terms: tuple[str, ...]) -> Markup:
    """``text`` escaped for HTML, every word of ``terms`` (by stem) in <b>."""
    pattern = _term_pattern(terms) if terms else None
    if pattern is None:
        return Markup(_escape_str(text))
    out, last = [], 0
    for match in pattern.finditer(text):
        out += (_escape_str(text[last : match.start()]), "<b>", _escape_str(match[0]), "</b>")
        last = match.end()
    out.append(_escape_str(text[last:]))
    return Markup("".join(out))


def _ordinal(n: int) -> str:
    if n == 1:
        return ""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix} "


@lru_cache(maxsize=4096)
def _reason(
    topic: str | None, terms: tuple[str, ...], has_topics: bool, rank: int, count: int
) -> tuple[Markup, str]:
    """Why this paper is in the email, in words: (HTML, plain text)."""
    if topic:
        also = f": {', '.join(terms)}" if terms else ""
        return (
            Markup(f"Because you follow <em>{_escape_str(topic)}</em>{_escape_str(also)}"),
            f"Because you follow \u201c{topic}\u201d{also}",
        )
    if has_topics:  # selection names a topic only when it really matched
        text = "No topic match: picked by its upvotes and your 👍/👎 votes"
        return Markup(_escape_str(text)), text
    if count == 1:
        text = "Trending: the most upvoted new paper"
    else:
        text = f"Trending: {_ordinal(rank)}most upvoted of these {count}"
    return Markup(_escape_str(text)), text


def _upvote_ranks(upvotes: Sequence[int]) -> list[int]:
    """Each paper's rank by upvotes among these (ties share the better rank)."""
    order = sorted(upvotes, reverse=True)
    first = {}
    for position, value in enumerate(order, 1):
        first.setdefault(value, position)
    return [first[v] for v in upvotes]


def _span(hours: int) -> str:
    if hours % 24 == 0:
        days = hours // 24
        return "day" if days == 1 else f"{days} days"
    return f"{hours} hours"


def _topic_list(topics: Sequence[str]) -> str:
    shown = list(topics[:3])
    if len(topics) > 3:
        shown.append(f"{len(topics) - 3} more")
    if len(shown) == 1:
        return shown[0]
    return ", ".join(shown[:-1]) + " or " + shown[-1]


def schedule_text(recipient: Recipient) -> str:
    when = f"{recipient.send_hour:02d}:00 {recipient.timezone}"
    if recipient.frequency == "weekly" and recipient.weekday is not None:
        return f"weekly on {WEEKDAYS[recipient.weekday].capitalize()}s at {when}"
    return f"{recipient.frequency} at {when}"


def categories_text(recipient: Recipient) -> str:
    """The filters for the footer ("; arXiv categories: only cs.LG"), or "" without."""
    filters = describe_filters(recipient.categories_only, recipient.categories_exclude)
    return f"; arXiv categories: {clean_line(filters)}" if filters else ""


# --------------------------------------------------------------------------- compile

_INCLUDE = re.compile(r"\{%-?\s*include\s+[\"']([^\"']+)[\"']\s*-?%\}")
_JINJA_COMMENT = re.compile(r"\{#.*?#\}", re.S)
_JINJA_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.S)
_PLACEHOLDER = "pmjx{:05d}x"
_FONT_LINK = re.compile(r"<link\b[^>]*>", re.I)
_IMPORT = re.compile(r"@import\b[^;]*;?", re.I)
# MJML's client resets (border-collapse, mso-table-*) stay in <head> as MJML means them:
# inlined, they would add ~15% to every table cell for no client that needs it.
_MJML_RESET = re.compile(r'<style type="text/css">(\s*#outlook a)')
_EMPTY_IFNOTMSO = re.compile(r"<!--\[if !mso\]><!-->\s*<!--<!\[endif\]-->")
_DOCTYPE = "<!doctype html>\n"


class TemplateError(Exception):
    """An email template cannot be compiled; the message says which and why."""


def _read_sources(directory: Path) -> dict[str, str]:
    """The email templates of ``directory``, plus the partials shared with the pages
    (templates/shared, bundled with papermail) as ``shared/NAME``."""
    if not directory.is_dir():
        raise TemplateError(f"email templates directory {directory} is missing")
    sources = {
        path.name: path.read_text(encoding="utf-8")
        for path in sorted(directory.iterdir())
        if path.is_file() and not path.name.startswith(".")
    }
    shared = shared_templates_dir()
    if shared.is_dir():
        for path in sorted(shared.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                sources[f"shared/{path.name}"] = path.read_text(encoding="utf-8")
    return sources


def _versions() -> str:
    parts = [COMPILER_VERSION]
    for dist in ("mjml-python", "premailer", "lxml", "cssutils", "Jinja2"):
        try:
            parts.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist}=?")
    return ";".join(parts)


def cache_key(sources: Mapping[str, str]) -> str:
    digest = hashlib.sha256(_versions().encode())
    for name in sorted(sources):
        digest.update(f"\0{name}\0{len(sources[name])}\0".encode())
        digest.update(sources[name].encode())
    return digest.hexdigest()


def resolve_includes(name: str, sources: Mapping[str, str], _stack: tuple[str, ...] = ()) -> str:
    """The template's text with every ``{% include "x" %}`` replaced by x's text."""
    if name in _stack:
        raise TemplateError(f"email template include cycle: {' -> '.join((*_stack, name))}")
    if name not in sources:
        where = f" (included from {_stack[-1]})" if _stack else ""
        raise TemplateError(f"email template {name!r} not found{where}")
    text = _JINJA_COMMENT.sub("", sources[name])
    return _INCLUDE.sub(lambda m: resolve_includes(m.group(1), sources, (*_stack, name)), text)


def _protect(source: str) -> tuple[str, dict[str, tuple[str, str]]]:
    """Swap Jinja tags for placeholders: {placeholder: (form in the compiled HTML, tag)}."""
    if "pmjx" in source:
        raise TemplateError("email templates must not contain the reserved word 'pmjx'")
    found: dict[str, tuple[str, str]] = {}

    def swap(match: re.Match[str]) -> str:
        word = _PLACEHOLDER.format(len(found))
        tag = match.group(0)
        form = f"<!--{word}-->" if tag.startswith("{%") else word
        found[word] = (form, tag)
        return form

    return _JINJA_TAG.sub(swap, source), found


def _restore(html: str, found: Mapping[str, tuple[str, str]], name: str) -> str:
    for form, tag in found.values():
        if form not in html:
            raise TemplateError(
                f"{name}: the Jinja tag {tag!r} did not survive the MJML compile (put "
                "statement tags between elements in <mj-raw>; MJML computes with sizes, "
                "so those cannot be Jinja)"
            )
        html = html.replace(form, tag)
    if "pmjx" in html:
        raise TemplateError(f"{name}: a Jinja tag ended up somewhere MJML or premailer changed it")
    return html


def mjml2html(source: str, **options: Any) -> str:
    """mjml-python's compiler, imported on first use: a worker whose compiled templates
    are cached never loads it, nor premailer, cssutils and lxml (~10 MB per process)."""
    from mjml import mjml2html as compile_

    return str(compile_(source, **options))


def _inline_css(html: str, **options: Any) -> str:
    from premailer import Premailer

    return str(Premailer(html, **options).transform())


def compile_mjml(mjml_source: str, name: str = "template") -> str:
    """MJML with Jinja tags -> standalone HTML (inlined CSS) with the same Jinja tags."""
    protected, found = _protect(mjml_source)
    try:
        html = mjml2html(protected, disable_comments=False, fonts={})
    except Exception as exc:  # mrml raises its own error types
        raise TemplateError(f"{name}: MJML error: {exc}") from exc
    # No network at render time: MJML's web-font link and @import go, if any slipped in.
    html = _FONT_LINK.sub(lambda m: "" if "stylesheet" in m.group(0).lower() else m.group(0), html)
    html = _IMPORT.sub("", html)
    html = _EMPTY_IFNOTMSO.sub("", html)
    html = _MJML_RESET.sub(r'<style type="text/css" data-premailer="ignore">\1', html, count=1)
    html = _inline_css(
        html,
        allow_network=False,
        allow_loading_external_files=False,
        disable_link_rewrites=True,
        remove_classes=False,
        keep_style_tags=True,  # media queries (stacking, dark mode) and client hacks stay
        strip_important=False,
        disable_validation=True,
        cssutils_logging_level=logging.CRITICAL,
        method="html",
    )
    if not html.lstrip().lower().startswith("<!doctype"):
        html = _DOCTYPE + html
    # Static text as character references: an all-ASCII page stays a 1-byte-per-char
    # str when the content is ASCII, which makes the per-email UTF-8 encode a copy.
    html = html.encode("ascii", "xmlcharrefreplace").decode("ascii")
    html = _restore(html, found, name)
    lowered = html.lower()
    for banned in ("<mj-", "fonts.googleapis", "@import", 'rel="stylesheet"'):
        if banned in lowered:
            raise TemplateError(f"{name}: compiled HTML still contains {banned!r}")
    return html


def compile_sources(sources: Mapping[str, str]) -> dict[str, str]:
    """Every template's Jinja source, MJML ones compiled: {"digest.html": ..., ...}."""
    out: dict[str, str] = {}
    for name in MJML_TEMPLATES:
        out[f"{name}.html"] = compile_mjml(resolve_includes(f"{name}.mjml", sources), name)
        out[f"{name}.txt"] = resolve_includes(f"{name}.txt", sources)
        out[f"{name}.subject"] = resolve_includes(f"{name}.subject", sources)
    return out


# ----------------------------------------------------------------- the on-disk cache
#
# A cache file is a template papermail will run, so it is only read from a directory
# nobody else can write (checked, created 0700), only if it carries an HMAC made with
# the signing key (never stored next to it), and only ever rendered in Jinja's sandbox:
# a file that was planted anyway renders nothing but text. Anything that fails a check
# is compiled again and overwritten; a directory that fails one is refused.

_SEAL = b"papermail-templates-v1"


class TemplateCacheError(TemplateError):
    """The template cache directory is not private to papermail's user; says which and why."""


def default_cache_dir() -> Path | None:
    """``~/.cache/papermail/templates`` of the user papermail runs as (from the password
    database, not the environment), never a predictable path in the shared temp dir;
    None for a uid without a home (a container's arbitrary uid): compile in memory."""
    import pwd

    try:
        home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return None
    return Path(home) / ".cache" / "papermail" / "templates" if home else None


def _refuse(path: Path, problem: str) -> TemplateCacheError:
    return TemplateCacheError(
        f"template cache directory {path}: refused, {problem}; a planted file there would "
        "be rendered into every email. Fix it (chmod 700 / chown it to the user papermail "
        "runs as) or set PAPERMAIL_TEMPLATE_CACHE_DIR to a private directory"
    )


def _check_dir(path: Path, *, own: bool) -> None:
    """Refuse ``path`` unless only we (or root, for an ancestor) can change what is in it."""
    info = os.stat(path)
    uid = os.getuid()
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISDIR(info.st_mode):  # unusable, not unsafe: compiled in memory
        raise NotADirectoryError(f"{path} is not a directory")
    allowed = (uid,) if own else (uid, 0)
    if info.st_uid not in allowed:
        who = f"uid {uid}" if own else f"uid {uid} or root"
        raise _refuse(path, f"it is owned by uid {info.st_uid}, not {who}")
    # A sticky world-writable ancestor (/tmp) lets others add entries, not replace ours.
    if mode & 0o022 and (own or not mode & stat.S_ISVTX):
        raise _refuse(path, f"it is writable by group or others (mode {mode:04o})")


def _check_chain(path: Path, *, own: bool) -> Path:
    """Check ``path`` (``own``: as the cache itself) and every directory above it."""
    uid = os.getuid()
    for level in (*reversed(path.parents), path):
        info = os.lstat(level)
        if stat.S_ISLNK(info.st_mode) and info.st_uid not in (uid, 0):
            raise _refuse(level, f"it is a symlink owned by uid {info.st_uid}")
    real = Path(os.path.realpath(path))
    for level in reversed(real.parents):
        _check_dir(level, own=False)
    _check_dir(real, own=own)
    return real


def _private_dir(path: Path) -> Path | None:
    """``path`` checked (and created 0700 level by level), or None if it cannot be created.

    TemplateCacheError when it, or any directory above it, could be changed by another
    user: its owner must be us (ancestors: us or root) and none may be group- or
    world-writable (ancestors may be, when sticky, like /tmp). Symlinks are followed and
    checked where they point; a symlink on the way must itself belong to us or root.
    Nothing is created under a directory that fails."""
    path = Path(os.path.abspath(path))
    try:
        missing = []
        probe = path
        while not os.path.lexists(probe):
            missing.append(probe)
            probe = probe.parent
        _check_chain(probe, own=probe == path)
        for level in reversed(missing):
            with contextlib.suppress(FileExistsError):  # another worker made it first
                os.mkdir(level, 0o700)
            _check_chain(level, own=True)
        return _check_chain(path, own=True)
    except OSError as exc:
        log.warning("cannot use the template cache %s: %s; compiling in memory", path, exc)
        return None


def _mac(key: str, payload: bytes, secret: str) -> str:
    sealer = hmac.new(secret.encode(), _SEAL, hashlib.sha256).digest()  # purpose-bound key
    return hmac.new(sealer, key.encode() + b"\0" + payload, hashlib.sha256).hexdigest()


def cache_file_name(key: str, secret: str) -> str:
    """The cache file of these sources sealed with this secret: one per secret, so two
    deployments (or a staging and a production key) sharing a user's cache directory do
    not overwrite each other's file and recompile on every start."""
    sealer = hmac.new(secret.encode(), _SEAL, hashlib.sha256).digest()
    return f"{key}.{hmac.new(sealer, b'file name', hashlib.sha256).hexdigest()[:16]}.json"


def _seal(key: str, compiled: Mapping[str, str], secret: str) -> bytes:
    payload = json.dumps(compiled, sort_keys=True).encode()
    return b"\n".join((_SEAL, _mac(key, payload, secret).encode(), payload))


def _unseal(key: str, data: bytes, secret: str) -> dict[str, str] | None:
    head, mac, payload = [*data.split(b"\n", 2), b"", b""][:3]
    if head != _SEAL or not hmac.compare_digest(mac, _mac(key, payload, secret).encode()):
        return None
    try:
        compiled = json.loads(payload)
    except ValueError:
        return None
    expected = {f"{n}.{ext}" for n in MJML_TEMPLATES for ext in ("html", "txt", "subject")}
    if not isinstance(compiled, dict) or set(compiled) != expected:
        return None
    if not all(isinstance(v, str) for v in compiled.values()):
        return None
    return compiled


def _load_disk(path: Path, key: str, secret: str) -> dict[str, str] | None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return None
        compiled = _unseal(key, fh.read(16 * 2**20), secret)
    if compiled is None:
        log.warning("template cache %s failed its integrity check; compiling again", path)
    return compiled


def _store_disk(path: Path, key: str, compiled: Mapping[str, str], secret: str) -> None:
    # Write-then-rename: concurrent processes each write their own temp file (0600), and
    # readers only ever see a complete cache file.
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(_seal(key, compiled, secret))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:  # a read-only or full disk costs a recompile, not a failure
        log.warning("cannot write the template cache %s: %s", path, exc)


def _escape_text(value: str) -> str:
    """markupsafe's escape of a str, as a str: the five entities."""
    return (
        value.replace("&", "&amp;")
        .replace(">", "&gt;")
        .replace("<", "&lt;")
        .replace("'", "&#39;")
        .replace('"', "&#34;")
    )


try:  # the C function markupsafe.escape runs on a str (MarkupSafe 3): one call, not five
    from markupsafe._speedups import _escape_inner as _escape_str
except ImportError:  # pragma: no cover - pure-Python MarkupSafe, or another version
    _escape_str = _escape_text


def _html_out(value: Any) -> str:
    """``str(markupsafe.escape(value))``: the same checks in the same order (so an
    undefined value fails the same way), and the same five entities."""
    if type(value) is not str:
        if hasattr(value, "__html__"):
            return value.__html__()
        value = str(value)
    return _escape_str(value)


class _FieldAccess(CodeGenerator):
    """Compiles ``p.title`` (an attribute named like a paper field) to a plain attribute
    read when ``p`` is exactly a paper view, else to the sandbox's checked getattr: a
    digest makes about 200 such reads, and a method call each was a tenth of a render.
    Escaped output (about 70 values per digest) is escaped inline (see _output_child_pre)."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        self.writeline(
            "from worker.rendering import _Item as _pm_Item, _html_out as _pm_out,"
            " _escape_str as _pm_esc"
        )
        super().visit_Template(node, frame)

    def _escaped(self, frame: Frame) -> bool:
        return not frame.eval_ctx.volatile and bool(frame.eval_ctx.autoescape)

    def _output_child_pre(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        # An autoescaped {{ value }}: the same text as markupsafe.escape without a Markup
        # object per value (the output is joined into one str anyway); a str, nearly every
        # value, is escaped by one C call, anything else by _html_out. The value is
        # evaluated once, into _pm_w (the getattr below uses _pm_v inside it).
        if self._escaped(frame):
            self.write("(_pm_esc(_pm_w) if type(_pm_w := (")
        else:
            super()._output_child_pre(node, frame, finalize)

    def _output_child_post(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        if self._escaped(frame):
            self.write(")) is str else _pm_out(_pm_w))")
        else:
            super()._output_child_post(node, frame, finalize)

    def visit_Getattr(self, node: nodes.Getattr, frame: Frame) -> None:
        if node.attr not in _ITEM_FIELDS or self.environment.is_async:
            super().visit_Getattr(node, frame)
            return
        # The object is evaluated once, into _pm_v, before either branch reads it.
        self.write(f"(_pm_v.{node.attr} if type(_pm_v := (")
        self.visit(node.node, frame)
        self.write(f")) is _pm_Item else environment.getattr(_pm_v, {node.attr!r}))")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's sandbox: no template (a cached one included) can reach Python internals
    such as ``cycler.__init__.__globals__``, call unsafe functions or mutate anything.

    Its per-attribute check costs more than the rest of a render; the paper views and
    loop counters, plain data, which are nearly all the lookups, skip it (bench/render.py).
    """

    code_generator_class = _FieldAccess

    def getattr(self, obj: Any, attribute: str) -> Any:
        kind = type(obj)
        if (kind is _Item and attribute in _ITEM_FIELDS) or (
            kind is LoopContext and attribute in _LOOP_FIELDS
        ):
            return getattr(obj, attribute)
        return super().getattr(obj, attribute)


def _html_env() -> Environment:
    env = _Sandbox(autoescape=True, undefined=StrictUndefined, auto_reload=False)
    env.filters["safe_url"] = safe_url
    return env


def _text_env() -> Environment:
    env = _Sandbox(
        autoescape=False, undefined=StrictUndefined, auto_reload=False, keep_trailing_newline=True
    )
    env.filters["safe_url"] = safe_url
    return env


_GLOBALS: dict[int, tuple[Template, dict[str, Any]]] = {}


def _template_globals(template: Template) -> dict[str, Any]:
    """The template's globals (its environment's, plus its own: a ChainMap) as a plain
    dict, made once per template object."""
    hit = _GLOBALS.get(id(template))
    if hit is None or hit[0] is not template:
        if len(_GLOBALS) > 256:
            _GLOBALS.clear()
        hit = _GLOBALS[id(template)] = (template, dict(template.globals))
    return hit[1]


def _render_pieces(template: Template, values: dict[str, Any]) -> list[str]:
    """The pieces ``template.render(values)`` joins, minus two dict copies and a ChainMap
    iterated in Python per call (a tenth of a digest's render): what Template.render does
    in jinja2 3.1 (new_context, then root_render_func), with the context's variables
    merged once. Jinja never writes to a context's parent, only to its own ``vars``. The
    pieces themselves feed the quoted-printable encoding (see _qp_bodies)."""
    env = template.environment
    names = _template_globals(template)
    parent = {**names, **values}
    ctx = env.context_class(env, parent, template.name, template.blocks, globals=names)
    try:
        return list(template.root_render_func(ctx))  # type: ignore[attr-defined]
    except Exception:
        env.handle_exception()
    raise AssertionError("unreachable: handle_exception always raises")


def _render(template: Template, values: dict[str, Any]) -> str:
    """``template.render(values)`` (see _render_pieces)."""
    return template.environment.concat(_render_pieces(template, values))  # type: ignore[attr-defined]


class _Split(NamedTuple):
    """A template cut around its paper loop: rendering ``head``, then ``card`` once per
    paper (``p`` in its context), then ``tail`` yields the pieces of the whole."""

    head: Template
    card: Template
    tail: Template


# Nodes whose effect would not carry from one part of a split template to the next.
_UNSPLITTABLE = (
    nodes.Assign, nodes.AssignBlock, nodes.Macro, nodes.CallBlock, nodes.Import,
    nodes.FromImport, nodes.Include, nodes.Extends, nodes.Block, nodes.Scope, nodes.With,
    nodes.FilterBlock, nodes.EvalContextModifier,
)  # fmt: skip
_SPLITS: dict[int, tuple[Template, _Split]] = {}


def _split_paper_loop(env: Environment, source: str) -> _Split | None:
    """The parts of a template whose cards depend on ``p`` alone: one top-level
    ``{% for p in papers %}`` (no else, filter or recursion; no other loop) whose body
    reads no other variable, and nothing anywhere that assigns, defines or includes.
    Anything else: None, and the template renders whole."""
    tree = env.parse(source)
    if any(True for _ in tree.find_all(_UNSPLITTABLE)):
        return None
    at = [i for i, node in enumerate(tree.body) if isinstance(node, nodes.For)]
    if len(at) != 1 or sum(1 for _ in tree.find_all(nodes.For)) != 1:
        return None
    loop = tree.body[at[0]]
    assert isinstance(loop, nodes.For)
    target, over = loop.target, loop.iter
    if not (
        isinstance(target, nodes.Name)
        and target.name == "p"
        and isinstance(over, nodes.Name)
        and over.name == "papers"
        and not loop.else_
        and loop.test is None
        and not loop.recursive
    ):
        return None
    body = nodes.Template(loop.body)
    if {name.name for name in body.find_all(nodes.Name)} != {"p"}:
        return None

    def part(nodes_: list[nodes.Node]) -> Template:
        code = env.compile(nodes.Template(nodes_, lineno=1))
        return env.template_class.from_code(env, code, env.make_globals(None), None)

    return _Split(part(tree.body[: at[0]]), part(loop.body), part(tree.body[at[0] + 1 :]))


def _template(env: Environment, source: str) -> Template:
    """``env.from_string(source)``, its paper-loop split registered when it has one."""
    template = env.from_string(source)
    split = _split_paper_loop(env, source)
    if split is not None:
        if len(_SPLITS) > 64:
            _SPLITS.clear()
        _SPLITS[id(template)] = (template, split)
    return template


def _split_of(template: Template) -> _Split | None:
    hit = _SPLITS.get(id(template))
    return hit[1] if hit is not None and hit[0] is template else None


class _Templates(NamedTuple):
    key: str
    digest_html: Template
    digest_text: Template
    digest_subject: Template
    confirm_html: Template
    confirm_text: Template
    confirm_subject: Template


_MEMORY: dict[str, _Templates] = {}
_MEMORY_LOCK = threading.Lock()


def load_templates(
    templates_dir: Path | None = None, cache_dir: Path | None = None, *, secret: str = ""
) -> _Templates:
    """The compiled templates for the current sources: memory, else disk, else compile.

    The disk cache is used only with a ``secret`` (the signing key) to seal its files, and
    only in a private directory (TemplateCacheError otherwise)."""
    sources = _read_sources(templates_dir or email_templates_dir())
    key = cache_key(sources)
    with _MEMORY_LOCK:
        cached = _MEMORY.get(key)
        if cached is not None:
            return cached
        where = cache_dir or default_cache_dir()
        directory = _private_dir(where) if secret and where else None
        path = directory / cache_file_name(key, secret) if directory else None
        compiled = _load_disk(path, key, secret) if path else None
        if compiled is None:
            compiled = compile_sources(sources)
            if path:
                _store_disk(path, key, compiled, secret)
        html, text = _html_env(), _text_env()
        templates = _Templates(
            key,
            _template(html, compiled["digest.html"]),
            _template(text, compiled["digest.txt"]),
            text.from_string(compiled["digest.subject"]),
            html.from_string(compiled["confirm.html"]),
            text.from_string(compiled["confirm.txt"]),
            text.from_string(compiled["confirm.subject"]),
        )
        _MEMORY[key] = templates
        return templates


def clear_memory_cache() -> None:
    with _MEMORY_LOCK:
        _MEMORY.clear()


# --------------------------------------------------------------------------- MIME

_ATEXT_PHRASE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]*$")
_DOMAIN = re.compile(r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$")
_NAME_ADDR = re.compile(r"(.*?)\s*<([^<>\s]+)>|([^<>\s]+)")
_EW_BYTES = 45  # 45 bytes -> 60 base64 chars -> a 72-char encoded-word (limit 75)


def _encoded_words(text: str) -> list[str]:
    words, chunk, size = [], [], 0
    for char in text:
        n = len(char.encode())
        if size + n > _EW_BYTES:
            words.append("".join(chunk))
            chunk, size = [], 0
        chunk.append(char)
        size += n
    if chunk:
        words.append("".join(chunk))
    return [f"=?utf-8?b?{binascii.b2a_base64(w.encode(), newline=False).decode()}?=" for w in words]


def _fold_words(name: str, words: Sequence[str]) -> str:
    """``Name: w1 w2 ...`` folded before 78 columns (unfolding restores single spaces)."""
    lines, current = [], f"{name}:"
    for word in words:
        if len(current) + 1 + len(word) > 78 and current != f"{name}:":
            lines.append(current)
            current = " " + word
        else:
            current += " " + word
    lines.append(current)
    return "\r\n".join(lines)


def _plain_word(word: str) -> bool:
    return word.isascii() and "=?" not in word


@lru_cache(maxsize=4096)  # the same subjects recur across a batch
def unstructured_header(name: str, value: str) -> str:
    """A complete ``Name: value`` header; value cleaned to one line, RFC 2047 when needed.

    ASCII words stay readable; each run of other words becomes encoded-words, spaces
    inside the run encoded too (decoders drop whitespace between two encoded-words)."""
    value = clean_line(value)
    if _plain_word(value):
        return _fold_words(name, value.split(" ") if value else [])
    words: list[str] = []
    run: list[str] = []
    for word in value.split(" "):
        if _plain_word(word):
            if run:
                words += _encoded_words(" ".join(run))
                run = []
            words.append(word)
        else:
            run.append(word)
    if run:
        words += _encoded_words(" ".join(run))
    return _fold_words(name, words)


def _phrase(display: str) -> str:
    display = clean_line(display)
    if not display:
        return ""
    if not display.isascii():
        return " ".join(_encoded_words(display))
    if _ATEXT_PHRASE.match(display) and "=?" not in display:
        return display
    return '"' + display.replace("\\", "\\\\").replace('"', '\\"') + '"'


def address_header(value: str, what: str) -> tuple[str, str]:
    """(header value ``Name <addr>``, bare addr) from a configured address."""
    if _BREAKERS.search(value):
        raise InvalidInput(f"{what}: {value!r} contains a line break or control character")
    match = _NAME_ADDR.fullmatch(value.strip())
    if not match:
        raise InvalidInput(f"{what}: {value!r} is not an address like 'Name <name@example.org>'")
    display, addr = match.group(1) or "", match.group(2) or match.group(3)
    if display.startswith('"') and display.endswith('"') and len(display) >= 2:
        display = re.sub(r"\\(.)", r"\1", display[1:-1])
    addr = bare_address(addr)
    phrase = _phrase(display)
    return (f"{phrase} <{addr}>" if phrase else addr), addr


def list_id_header(value: str) -> str:
    if _BREAKERS.search(value):
        raise InvalidInput(f"PAPERMAIL_LIST_ID: {value!r} contains a line break")
    value = value.strip()
    match = re.fullmatch(r"(.*?)\s*<([^<>\s]+)>", value)
    display, ident = (match.group(1), match.group(2)) if match else ("", value)
    if not ident or not _DOMAIN.match(ident):
        raise InvalidInput(f"PAPERMAIL_LIST_ID: {value!r} needs an id like <digest.example.org>")
    phrase = _phrase(display)
    return f"{phrase} <{ident}>" if phrase else f"<{ident}>"


# --------------------------------------------------------------------------- MIME bodies

# Both parts are quoted-printable: every line 7-bit and at most 76 octets, as SES asks of
# raw messages and as any SMTP relay takes without 8BITMIME. The static text of the
# templates is ASCII, so most of the HTML goes out as it is (only "=" becomes "=3D").
#
# The encoding is made from the pieces the template yields, not from the joined text
# (encoding ~35 KB per email, base64 or quoted-printable, cost a third of a render): each
# piece is encoded from column 0 and ends with a soft line break ("=" CRLF) unless it ends
# with a line break of its own, so a piece's encoding does not depend on what came before
# it and is looked up. The static pieces are the same str objects in every email (their
# hashes cached) and most values recur across an edition (a paper's title, its links);
# only each email's own links are encoded anew. The price is a soft break around each
# value, a few hundred bytes per email; decoders join soft-broken lines (RFC 2045 6.7).
_QP_WIDTH = 75  # characters on a line before a soft break, whose "=" is the 76th
_SOFT = b"=\r\n"


class _QPMap(dict[int, str]):
    """``str.translate`` table: "=", controls and each non-ASCII character become =XX
    escapes of their UTF-8 bytes; printable ASCII, space and tab stay as they are."""

    def __missing__(self, code: int) -> str:
        char = chr(code)
        if (32 <= code < 127 and char != "=") or char == "\t":
            value = char
        else:  # a lone surrogate raises here, as str.encode would
            value = "".join(f"={byte:02X}" for byte in char.encode("utf-8"))
        self[code] = value
        return value


_QP_MAP = _QPMap()


_PRINTABLE = bytes(range(32, 127))


def _qp_wrap(enc: bytes) -> bytes:
    """``enc`` (escaped: every "=" in it starts a three-character escape) with a soft
    break wherever a line would pass column 75, none inside an escape."""
    n = len(enc)
    if n <= _QP_WIDTH:
        return enc
    if b"=" not in enc:  # no escape to keep whole (a link): a break every 75 characters
        if n <= 2 * _QP_WIDTH:  # most links: two slices cost a quarter of the loop below
            return enc[:_QP_WIDTH] + _SOFT + enc[_QP_WIDTH:]
        return _SOFT.join([enc[i : i + _QP_WIDTH] for i in range(0, n, _QP_WIDTH)])
    out = []
    i = 0
    while n - i > _QP_WIDTH:
        cut = i + _QP_WIDTH
        if enc[cut - 1] == 61:  # "="
            cut -= 1
        elif enc[cut - 2] == 61:
            cut -= 2
        out.append(enc[i:cut])
        i = cut
    out.append(enc[i:])
    return _SOFT.join(out)


def _qp_piece(piece: str) -> bytes:
    """Quoted-printable of ``piece`` (no CR in it) from column 0, ending with a soft break
    unless the piece ends with a line break. Line breaks become CRLF, and a blank before
    one is escaped (a blank before a soft break may stay, RFC 2045 6.7)."""
    if not piece:
        return b""
    if piece.isascii():
        data = piece.encode("ascii")
        if not data.translate(None, _PRINTABLE):
            # The usual piece (a link, a tag's attributes): one line of printable ASCII.
            return _qp_wrap(data.replace(b"=", b"=3D") if b"=" in data else data) + _SOFT
    lines = []
    for line in piece.split("\n"):
        if line == ".":  # a line of a lone dot ends an SMTP DATA left unstuffed
            lines.append("=2E")
        elif line.isascii() and line.isprintable():
            lines.append(line.replace("=", "=3D") if "=" in line else line)
        else:
            lines.append(line.translate(_QP_MAP))
    for n in range(len(lines) - 1):  # the blank before a line break
        if lines[n][-1:] in (" ", "\t"):
            lines[n] = lines[n][:-1] + ("=20" if lines[n][-1] == " " else "=09")
    text = b"\r\n".join([_qp_wrap(line.encode("ascii")) for line in lines])
    return text if piece.endswith("\n") else text + _SOFT


def _qp_link(piece: str) -> bytes:
    """``_qp_piece(piece)``, without its calls for the usual signed link: one line of
    printable ASCII without "=", 76 to 150 characters (a soft break after the 75th)."""
    if 75 < len(piece) <= 2 * _QP_WIDTH and piece.isascii() and piece.isprintable():
        data = piece.encode("ascii")
        if b"=" not in data:
            return data[:_QP_WIDTH] + _SOFT + data[_QP_WIDTH:] + _SOFT
    return _qp_piece(piece)


_ENTRY_BYTES = 200  # a cache entry's own objects: its key's hash slot, the bytes object


class _CarriageReturn(Exception):
    """A piece holds a CR: its body is encoded from the joined text instead."""


class _PieceCache:
    """Encoded pieces (see _qp_piece) by piece.

    A piece is kept from its second sighting on (the first is remembered as a hash in
    ``seen``, and the piece itself among the last few in ``recent``: the same link is in
    the text, then in the HTML), so the pieces unique to one email are encoded once and
    dropped, and what recurs (the templates' own pieces, each paper's) is kept. The kept
    ones live in two generations: looked up in the young one, then in the old one (and
    moved to the young one); when the young one holds about ``limit`` bytes it becomes
    the old one, so memory stays bounded without emptying the whole cache at once. A
    piece in ``recent`` met again by a later body (``body`` counts them) is kept: else a
    static piece first met when ``recent`` was nearly empty would stay there, served by
    the miss path in every email (dozens per digest).
    Threads may race on a turn; the worst outcome is a piece encoded twice."""

    __slots__ = ("body", "limit", "old", "recent", "seen", "size", "young")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.young = _Generation(self)
        self.old: dict[str, bytes] = {}
        self.seen: set[int] = set()
        # The last pieces seen once, with the body they were seen in: a link is in the
        # text and then in the HTML.
        self.recent: dict[str, tuple[bytes, int]] = {}
        self.size = 0
        self.body = 0


class _Generation(dict[str, bytes]):
    """The young generation of a _PieceCache. A body's pieces are all looked up by one C
    loop (``map(young.__getitem__, pieces)``); a miss is served here."""

    __slots__ = ("cache",)

    def __init__(self, cache: _PieceCache) -> None:
        super().__init__({"": b""})
        self.cache = cache

    def __missing__(self, piece: str) -> bytes:
        cache = self.cache
        first = cache.recent.get(piece)
        if first is not None:
            encoded, body = first
            if body == cache.body:  # twice in one email's bodies: not yet a recurring piece
                return encoded
            del cache.recent[piece]
        elif "\r" in piece:  # a CRLF may straddle two pieces
            raise _CarriageReturn
        else:
            encoded = cache.old.get(piece)
        if encoded is None:
            encoded = _qp_piece(str(piece))
            seen, mark = cache.seen, hash(piece)
            if mark not in seen:
                if len(seen) >= cache.limit // 64:
                    seen.clear()
                seen.add(mark)
                if len(cache.recent) >= 256:
                    cache.recent.clear()
                cache.recent[piece] = (encoded, cache.body)
                return encoded
            if len(piece) > cache.limit // 64:  # a one-off whole text: not kept
                return encoded
        # Into the current young generation (self may have turned old during the map).
        cache.young[piece] = encoded
        cache.size += len(piece) + len(encoded) + _ENTRY_BYTES
        if cache.size > cache.limit:
            cache.old, cache.young, cache.size = cache.young, _Generation(cache), 0
        return encoded


_QP_PIECES = _PieceCache(2_000_000)


def _qp_bodies(*bodies: Sequence[str], own: Sequence[str] = ()) -> list[bytes]:
    """The quoted-printable body of ``"".join(pieces)`` for each list of pieces, with CRLF
    line breaks (a CR or CRLF in the text is one line break, like LF).

    ``own`` are pieces known to be this email's alone (its signed links): they are encoded
    up front and put in the young generation for the time of the lookups, instead of each
    taking the miss path twice (text, HTML) and the doorkeeper's bookkeeping."""
    _QP_PIECES.body += 1  # the bodies of one call count as one (see _PieceCache)
    young = _QP_PIECES.young
    mine = {piece: _qp_link(piece) for piece in own if "\r" not in piece}
    young.update(mine)
    get = young.__getitem__
    try:
        out = []
        for pieces in bodies:
            try:  # a turn of generations during the map leaves the lookups valid, if stale
                if type(pieces) is _Pieces:  # the cards' encodings are at hand
                    head_end, plan, tail_start = pieces.plan
                    chunks = [b"".join(map(get, pieces[:head_end]))]
                    for qp_runs, card_links in plan:
                        chunks.append(qp_runs[0])
                        for run, link in zip(qp_runs[1:], card_links, strict=True):
                            chunks += (get(link), run)
                    chunks.append(b"".join(map(get, pieces[tail_start:])))
                    body = b"".join(chunks)
                else:
                    body = b"".join(map(get, pieces))
            except _CarriageReturn:
                text = "".join(pieces).replace("\r\n", "\n").replace("\r", "\n")
                body = _qp_piece(text) if text else b""
            # No soft break at the very end, unless it keeps a final blank from being trailing.
            if body.endswith(b"=\r\n") and body[-4:-3] not in (b" ", b"\t"):
                body = body[:-3]
            out.append(body)
        return out
    finally:
        for piece in mine:
            young.pop(piece, None)


def _qp_join(pieces: Sequence[str]) -> bytes:
    """The encodings of these pieces, joined (what _qp_bodies makes of them in a body)."""
    return b"".join(map(_QP_PIECES.young.__getitem__, pieces))


# (split, a card's pieces, where its links go: (index, _Item field), the encodings between)
_Card = tuple["_Split", list[str], tuple[tuple[int, int], ...], list[bytes]]


class _Pieces(list[str]):
    """A split template's pieces, with where its cards are (see Renderer._pieces):
    (end of the head, [(the encodings between a card's links, its links)], tail start)."""

    __slots__ = ("plan",)
    plan: tuple[int, list[tuple[list[bytes], list[str]]], int]


def _unique_hex(bits: int) -> str:
    """Random hex for Message-ID and MIME boundary: unique, not secret, so ``random``
    (reseeded in every forked child) rather than ``secrets``, whose system call per email
    showed as 6% of the render's samples."""
    return f"{random.getrandbits(bits):0{bits // 4}x}"


def _mime(headers: Sequence[str], text_qp: bytes, html_qp: bytes) -> bytes:
    """multipart/alternative (text, then HTML), UTF-8, CRLF, both parts quoted-printable."""
    # "=_" occurs in no quoted-printable output: the boundary cannot collide.
    boundary = f"=_pm_{_unique_hex(96)}"
    head = "\r\n".join(
        (
            *headers,
            "MIME-Version: 1.0",
            f'Content-Type: multipart/alternative; boundary="{boundary}"',
            "",
            "",
        )
    ).encode("ascii")
    part = (
        '\r\n--{b}\r\nContent-Type: text/{k}; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    )
    return b"".join(
        (
            head,
            b"This is a multipart message in MIME format.",
            part.format(b=boundary, k="plain").encode(),
            text_qp,
            part.format(b=boundary, k="html").encode(),
            html_qp,
            f"\r\n--{boundary}--\r\n".encode(),
        )
    )


def build_mime(headers: Sequence[str], text: str, html: str) -> bytes:
    """The complete message of these headers and bodies (see _mime)."""
    return _mime(headers, *_qp_bodies((text,), (html,)))


@lru_cache(maxsize=4)
def _date_header(second: int) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(second, UTC))


# --------------------------------------------------------------------------- renderer


class _Parts(NamedTuple):
    """What one paper shows, the same for every subscriber (cached per content)."""

    title: str
    title_plain: str  # the title on one line, for the text part's numbered heading
    meta: str  # authors · arXiv id · category · date · upvotes
    meta_text: str  # the same, wrapped for the text part
    abstract: str  # the shortened abstract (one line)
    read_url: str | None  # the abstract page: arXiv's when known, else the paper's page
    pdf_url: str | None
    hf_url: str | None  # None when it is the read link already
    page_url: str | None  # the paper's own page, when it is neither of the above
    id_json: bytes  # the paper id as a JSON string, for the feedback tokens
    arxiv_id: str | None
    category: str | None  # the primary arXiv category


class _Item(NamedTuple):
    """One paper as the templates see it (attribute access: Jinja tries getattr first)."""

    id: str
    title: str
    title_text: str  # numbered and wrapped, for the text part
    reason_html: Markup
    reason_text: str
    meta: str
    meta_text: str
    abstract: str  # shortened, one line
    terms: tuple[str, ...]  # the words highlighted in the snippet
    snippet: Markup  # the abstract, matched words in <b>
    abstract_text: str
    upvotes: int
    matched_topic: str | None
    read_url: str | None
    pdf_url: str | None
    hf_url: str | None
    page_url: str | None
    more_url: str
    less_url: str
    arxiv_id: str | None
    category: str | None


_new_tuple = tuple.__new__
_MORE_AT = _Item._fields.index("more_url")  # less_url follows it

# Attributes the sandbox may hand out unchecked: data fields, no callables or internals.
_ITEM_FIELDS = frozenset(_Item._fields)
_LOOP_FIELDS = frozenset(
    ("index", "index0", "revindex", "revindex0", "first", "last", "length", "depth")
)


def _own_links(ctx: Mapping[str, Any]) -> list[str]:
    """The links of a digest that no other email has (see _qp_bodies), and its footer's
    "You get this because ... with <address>" (in the HTML as is unless escaped)."""
    own = [ctx["preferences_url"], ctx["unsubscribe_url"], ctx["view_url"]]
    own += (ctx["reason"], ctx["reason_text"])
    for item in ctx["papers"]:
        own += (item.more_url, item.less_url)
    return own


def _day_label(day: date) -> str:
    return f"{day.day} {_MONTHS[day.month - 1][:3]} {day.year}"


class Renderer:
    """Fills the compiled templates. One per process; thread-safe after construction."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        templates_dir: Path | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.settings = settings = settings or get_settings()
        self.templates = load_templates(
            templates_dir,
            cache_dir or settings.template_cache_dir,
            secret=settings.signing_keys[0],
        )
        self.from_header, self.sender = address_header(
            settings.from_address, "PAPERMAIL_FROM_ADDRESS"
        )
        self.domain = self.sender.rpartition("@")[2]
        self.reply_to = (
            address_header(settings.reply_to, "PAPERMAIL_REPLY_TO")[0]
            if settings.reply_to
            else None
        )
        self.list_id = list_id_header(settings.list_id)
        mailto = (settings.unsubscribe_mailto or f"unsubscribe@{self.domain}").removeprefix(
            "mailto:"
        )
        self.unsubscribe_mailto = bare_address(mailto)
        self.max_bytes = settings.email_max_bytes
        self.postal_address = clean_line(settings.postal_address_line)
        self._postal_text = _wrap(self.postal_address)
        self._spans = {
            "daily": _span(settings.lookback_daily_hours),
            "weekly": _span(settings.lookback_weekly_hours),
        }
        self._base = settings.base_url
        self._mint: dict[str, Callable[[dict[str, Any]], str]] = {
            purpose: links.minter(purpose, settings) for purpose in links.PURPOSES
        }
        self._mint_many = {p: links.json_many_minter(p, settings) for p in links.PURPOSES}
        self._mint_feedback_many = self._mint_many["feedback"]
        # Papers repeat across thousands of emails (in fresh PaperViews each time): their
        # cleaned text is computed once per content. Hashing the key is cheap because the
        # strings are the same objects, whose hashes Python caches.
        self._parts: dict[tuple[Any, ...], _Parts] = {}
        self._more_block: int | None = None  # bytes of the "more on the web" block
        # Each card's rendered pieces, by its fields but its vote links (see _pieces): only
        # when every link is the same text escaped for HTML or not (no "&<>'\"" in it).
        self._card_pieces: dict[tuple[Any, ...], _Card] = {}
        self._split_ok = _escape_str(self._base) == self._base
        # Each paper's card fields but its vote links, by place and reason (see digest_context).
        self._cards: dict[tuple[Any, ...], tuple[_Parts, tuple[Any, ...], tuple[Any, ...]]] = {}

    # -- links

    def _url(self, purpose: str, payload: dict[str, Any]) -> str:
        return f"{self._base}/{links.ROUTES[purpose]}/{self._mint[purpose](payload)}"

    def _url_json(self, purpose: str, payload_json: bytes, now: int | None = None) -> str:
        token = self._mint_many[purpose]((payload_json,), now)[0]
        return f"{self._base}/{links.ROUTES[purpose]}/{token}"

    # -- digest

    def _paper_parts(self, paper: PaperView) -> _Parts:
        key = (
            paper.id,
            paper.title,
            paper.abstract,
            tuple(paper.authors),
            paper.upvotes,
            paper.url,
            paper.pdf_url,
            paper.hf_url,
            paper.arxiv_id,
            paper.primary_category,
            paper.published,
        )
        parts = self._parts.get(key)
        if parts is not None:
            return parts
        # The output filter of every email: the same safe_url as the pages' Jinja filter,
        # applied once per paper here (the templates see only its result).
        url, hf_url = safe_url(paper.url), safe_url(paper.hf_url)
        read_url = safe_url(paper.abs_url) or url or hf_url
        arxiv_id = clean_line(paper.arxiv_id) if paper.arxiv_id else None
        category = clean_line(paper.primary_category) if paper.primary_category else None
        upvotes = int(paper.upvotes or 0)
        meta = [shorten(short_authors(paper.authors), 200)]
        if arxiv_id:
            meta.append(f"arXiv:{arxiv_id}")
        if category:
            meta.append(category)
        if paper.published:
            meta.append(_day_label(paper.published))
        meta.append(f"▲ {upvotes} upvote{'' if upvotes == 1 else 's'}")
        meta_line = " · ".join(m for m in meta if m)
        title = shorten(paper.title, TITLE_CHARS) or paper.id
        parts = _Parts(
            title=title,
            title_plain=title,
            meta=meta_line,
            meta_text=_wrap(meta_line, "   "),
            abstract=shorten(paper.abstract, ABSTRACT_CHARS),
            read_url=read_url,
            pdf_url=safe_url(paper.pdf_url),
            hf_url=hf_url if hf_url != read_url else None,
            page_url=url if url not in (read_url, hf_url) else None,
            id_json=json.dumps(paper.id).encode(),
            arxiv_id=arxiv_id,
            category=category,
        )
        if len(self._parts) > 20_000:
            self._parts.clear()
        self._parts[key] = parts
        return parts

    def _card(
        self, paper: PaperView, parts: _Parts, n: int, has_topics: bool, rank: int, count: int
    ) -> tuple[_Parts, tuple[Any, ...], tuple[Any, ...]]:
        """(parts, the _Item fields before its vote links, the fields after them)."""
        topic = _clean_topic(paper.matched_topic) if paper.matched_topic else None
        found = tuple(t for t in map(_clean_topic, paper.matched_terms) if t) if topic else ()
        # "Because you follow pruning: pruning" says nothing: the reason names only the
        # terms beyond the topic; the snippet highlights them all.
        terms = tuple(t for t in found if topic and t.casefold() != topic.casefold())
        reason_html, reason_text = _reason(topic, terms, has_topics, rank, count)
        marked = found or ((topic,) if topic else ())
        head = (
            paper.id,
            parts.title,
            _wrap(parts.title_plain, "   ", f"{n + 1}. "),
            reason_html,
            _wrap(reason_text, "   "),
            parts.meta,
            parts.meta_text,
            parts.abstract,
            marked,
            highlight(parts.abstract, marked),
            _wrap(parts.abstract, "   "),
            int(paper.upvotes or 0),
            topic,
            parts.read_url,
            parts.pdf_url,
            parts.hf_url,
            parts.page_url,
        )
        return parts, head, (parts.arxiv_id, parts.category)

    def digest_context(
        self,
        recipient: Recipient,
        edition_date: date,
        papers: Sequence[PaperView],
        *,
        as_sent: bool = False,
    ) -> dict[str, Any]:
        """The template context; ``as_sent``: an archived edition ("view in browser"),
        whose footer tells what was true when it went out."""
        if not papers:
            raise InvalidInput("a digest needs at least one paper (skip the delivery instead)")
        sid = int(recipient.subscriber_id)
        fb = f"{self._base}/{links.ROUTES['feedback']}/"
        all_parts = [self._paper_parts(paper) for paper in papers]
        # Every link of the email stamped with one clock read; the votes of every paper
        # minted in one call, no per-link setup.
        now = links.now_second()
        votes = iter(
            self._mint_feedback_many(
                [
                    b'{"s":%d,"p":%s,"v":%s}' % (sid, parts.id_json, vote)
                    for parts in all_parts
                    for vote in (b"1", b"-1")
                ],
                now,
            )
        )
        topics = [t for t in (_clean_topic(t) for t in recipient.topics) if t]
        has_topics = bool(topics)
        count = len(papers)
        ranks = _upvote_ranks([int(p.upvotes or 0) for p in papers]) if not has_topics else None
        items = []
        cards = self._cards
        for n, (paper, parts) in enumerate(zip(papers, all_parts, strict=True)):
            rank = ranks[n] if ranks else 0
            # The card is the same for every subscriber who gets this paper at this place
            # for the same reason: only its two vote links are theirs (parts identifies
            # the paper's content, id, upvotes included; it is kept alive in the value).
            terms = tuple(paper.matched_terms)  # the same object when it is a tuple
            key = (id(parts), n, paper.matched_topic, terms, has_topics, rank, count)
            hit = cards.get(key)
            if hit is None or hit[0] is not parts:
                hit = self._card(paper, parts, n, has_topics, rank, count)
                if len(cards) > 20_000:
                    cards.clear()
                cards[key] = hit
            # _Item(...) without the named tuple's Python-level __new__.
            items.append(_new_tuple(_Item, (*hit[1], fb + next(votes), fb + next(votes), *hit[2])))
        long_label, short_label = _date_labels(edition_date)
        iso = edition_date.isoformat()
        weekly = recipient.frequency == "weekly"
        span = self._spans["weekly" if weekly else "daily"]
        if has_topics:
            noun = "paper" if count == 1 else f"{count} papers"
            when = f"the week of {short_label}" if weekly else long_label.partition(",")[0]
            heading = f"Your {noun} for {when}"
            intro = f"New papers from the last {span} that match {_topic_list(topics)}."
        else:
            heading = "This week's trending papers" if weekly else "Today's trending papers"
            intro = f"The new papers of the last {span}, ranked by upvotes and freshness."
        email_addr = clean_line(recipient.email)
        why = (
            (
                f"You got this because you were subscribed to papermail with {email_addr}, "
                if as_sent
                else f"You get this because you subscribed to papermail with {email_addr}, "
            )
            + f"{schedule_text(recipient)}, topics: "
            + (", ".join(topics) if topics else "none (the overall trending top)")
            + categories_text(recipient)
            + "."
        )
        lead = shorten(items[0].title, MAX_SUBJECT_CHARS)
        return {
            "subject": "",  # filled below, once the subject template has run
            "subject_line": f"{'1 paper' if count == 1 else f'{count} papers'}: {lead}",
            "preheader": shorten(" · ".join(i.title for i in items), 140),
            "edition_label": long_label,
            "short_date": short_label,
            "edition_date": iso,
            "heading": heading,
            "intro": intro,
            "intro_text": _wrap(intro),
            "papers": items,
            "lead_title": lead,
            "more": count - 1,
            "more_on_web": 0,
            "more_on_web_label": "",
            "more_on_web_text": "",
            "preferences_url": self._url_json("preferences", b'{"s":%d}' % sid, now),
            "unsubscribe_url": self._url_json("unsubscribe", b'{"s":%d}' % sid, now),
            "view_url": self._url_json("view", b'{"s":%d,"d":"%s"}' % (sid, iso.encode()), now),
            "email": email_addr,
            "topics": topics,
            "schedule": schedule_text(recipient),
            "reason": why,
            "reason_text": _wrap(why),
            "postal_address": self.postal_address,
            "postal_address_text": self._postal_text,
        }

    def _fill(
        self, ctx: dict[str, Any], html_t: Template, text_t: Template, subj_t: Template
    ) -> tuple[str, list[str], list[str]]:
        """The subject, and the pieces of the text and of the HTML (see _render_pieces)."""
        subject = shorten(_render(subj_t, ctx), MAX_SUBJECT_CHARS - 1)  # "…" is the 70th
        ctx["subject"] = subject
        return subject, self._pieces(text_t, ctx), self._pieces(html_t, ctx)

    def _pieces(self, template: Template, ctx: dict[str, Any]) -> list[str]:
        """``_render_pieces(template, ctx)``; for a split digest template, each paper's
        card from its rendered pieces (cached by the card's fields but its vote links,
        so the same card for the next subscriber is two list stores, not a Jinja run),
        with the plan _qp_bodies encodes it by (each card's quoted-printable cached too)."""
        split = _split_of(template) if self._split_ok else None
        if split is None:
            return _render_pieces(template, ctx)
        cards = self._card_pieces
        out = _Pieces(_render_pieces(split.head, ctx))
        head_end = len(out)
        plan = []
        for item in ctx["papers"]:
            key = (id(split), item[:_MORE_AT], item[_MORE_AT + 2 :])
            hit = cards.get(key)
            if hit is None or hit[0] is not split:
                hit = self._card_render(split, item, ctx)
                if hit is None:  # this card reads its links otherwise: the whole, as is
                    return _render_pieces(template, ctx)
                if len(cards) > 4_000:  # ~6 KB each, its quoted-printable included
                    cards.clear()
                cards[key] = hit
            _, pieces, slots, qp_runs = hit
            pieces = pieces.copy()
            for at, field in slots:
                pieces[at] = item[field]
            plan.append((qp_runs, [item[field] for _, field in slots]))
            out += pieces
        tail_start = len(out)
        out += _render_pieces(split.tail, ctx)
        out.plan = (head_end, plan, tail_start)
        return out

    def _card_render(self, split: _Split, item: _Item, ctx: dict[str, Any]) -> _Card | None:
        """(split, the card's pieces, where its vote links go: (index, _Item field), the
        quoted-printable of the pieces between them), from two renders with stand-ins of
        different lengths for the links: the card must output each link whole as a piece
        of its own and depend on it in no other way; None if it does not."""
        renders = []
        for more, less in (("\0pm-more\0", "\0pm-less\0"), ("\0pm-more-link\0", "\0l\0")):
            stand_in = item._replace(more_url=more, less_url=less)
            pieces = _render_pieces(split.card, {**ctx, "p": stand_in})
            slots = tuple(
                (at, _MORE_AT if piece == more else _MORE_AT + 1)
                for at, piece in enumerate(pieces)
                if piece in (more, less)
            )
            if any("\0" in piece for n, piece in enumerate(pieces) if n not in dict(slots)):
                return None
            renders.append((pieces, slots))
        (first, slots), (second, slots2) = renders
        if slots != slots2 or len(first) != len(second):
            return None
        fixed = dict(slots)
        if any(
            a != b for n, (a, b) in enumerate(zip(first, second, strict=True)) if n not in fixed
        ):
            return None
        bounds = [-1, *fixed, len(first)]
        try:
            qp_runs = [_qp_join(first[a + 1 : b]) for a, b in itertools.pairwise(bounds)]
        except _CarriageReturn:  # encoded from the joined text instead: no plan
            return None
        return split, first, slots, qp_runs

    def digest_html(
        self,
        recipient: Recipient,
        edition_date: date,
        papers: Sequence[PaperView],
        *,
        as_sent: bool = False,
    ) -> str:
        """The digest as a web page ("view in browser"): every paper, no size budget."""
        t = self.templates
        ctx = self.digest_context(recipient, edition_date, papers, as_sent=as_sent)
        return "".join(self._fill(ctx, t.digest_html, t.digest_text, t.digest_subject)[2])

    # -- the size budget

    def _with_budget(
        self, ctx: dict[str, Any], level: int, keep: int, total: int
    ) -> dict[str, Any]:
        """``ctx`` with abstracts cut to ``level`` characters and only the first ``keep``
        of ``total`` papers, the rest behind the "more on the web" link."""
        items = []
        for item in ctx["papers"][:keep]:
            abstract = shorten(item.abstract, level)
            items.append(
                item._replace(
                    abstract=abstract,
                    snippet=highlight(abstract, item.terms),
                    abstract_text=_wrap(abstract, "   "),
                )
            )
        out = {**ctx, "papers": items}
        hidden = total - keep
        if hidden:
            noun = "paper" if hidden == 1 else "papers"
            out["more_on_web"] = hidden
            out["more_on_web_label"] = f"{hidden} more {noun} of this edition on the web"
            out["more_on_web_text"] = _wrap(
                f"{hidden} more {noun} of this edition: open \u201cView in browser\u201d below."
            )
        return out

    def _fit(
        self, ctx: dict[str, Any], html: list[str]
    ) -> tuple[dict[str, Any], list[str], list[str]]:
        """The context and pieces (text, HTML) of a digest within PAPERMAIL_EMAIL_MAX_BYTES,
        for one whose HTML (``html``) is over it: shorter abstracts first, then fewer papers.

        Sizes are worked out from the one render already made (the byte offsets of each
        paper's own vote link mark where its card ends, and each abstract's bytes are
        known), so a digest over the budget costs one more render, not one per paper."""
        budget = self.max_bytes
        data = "".join(html).encode()
        size = len(data)
        t = self.templates
        items = ctx["papers"]
        total = len(items)
        # ends[i]: where card i's "more like this" link is; the cards after card k-1 take
        # ends[-1] - ends[k-1] bytes (every card's tail after that link is the same).
        ends, at = [], 0
        for item in items:
            at = data.find(item.more_url.encode(), at)
            ends.append(at)
        abstract_bytes = [len(str(item.snippet).encode()) for item in items]
        if self._more_block is None:
            probe = {**ctx, "more_on_web": 99, "more_on_web_label": "99 more papers on the web"}
            more = len("".join(_render_pieces(t.digest_html, probe)).encode())
            self._more_block = more - size + 64  # and room for a longer label
        reserve = self._more_block

        # Bytes each abstract saves at each shorter level, made once per level.
        savings = {
            level: [
                full - len(highlight(shorten(item.abstract, level), item.terms).encode())
                for item, full in zip(items, abstract_bytes, strict=True)
            ]
            for level in ABSTRACT_BUDGET_STEPS
        }

        def estimate(level: int, keep: int) -> int:
            dropped = ends[-1] - ends[keep - 1]
            saved = sum(savings[level][:keep])
            return size - saved - dropped + (reserve if keep < total else 0)

        choice = None
        for level in ABSTRACT_BUDGET_STEPS:
            if estimate(level, total) <= budget:
                choice = (level, total)
                break
        if choice is None:
            level = ABSTRACT_BUDGET_STEPS[-1]
            keep = total - 1
            while keep > 1 and estimate(level, keep) > budget:
                keep -= 1
            choice = (level, keep)
        level, keep = choice
        while True:  # the estimate is exact but for the label's digits: check, rarely again
            fitted = self._with_budget(ctx, level, keep, total)
            _, text, html = self._fill(fitted, t.digest_html, t.digest_text, t.digest_subject)
            if keep == 1 or len("".join(html).encode()) <= budget:
                return fitted, text, html
            keep -= 1

    def render_digest(
        self,
        recipient: Recipient,
        edition_date: date,
        papers: Sequence[PaperView],
        *,
        delivery_id: int | None = None,
    ) -> OutgoingMessage:
        to = bare_address(recipient.email)
        t = self.templates
        ctx = self.digest_context(recipient, edition_date, papers)
        subject, text, html = self._fill(ctx, t.digest_html, t.digest_text, t.digest_subject)
        # The size budget, checked for free on the usual digest: the HTML's characters
        # are at most its UTF-8 bytes, which are at most its quoted-printable bytes.
        # (The joined HTML is the message's html anyway: its length is free.)
        budget = self.max_bytes
        html_str = "".join(html)
        over = len(html_str) > budget
        if not over:
            text_qp, html_qp = _qp_bodies(text, html, own=_own_links(ctx))
            over = len(html_qp) > budget and len(html_str.encode()) > budget
        if over:
            ctx, text, html = self._fit(ctx, html)
            text_qp, html_qp = _qp_bodies(text, html, own=_own_links(ctx))
            html_str = "".join(html)
        iso = edition_date.isoformat()
        ref = str(delivery_id) if delivery_id is not None else f"s{recipient.subscriber_id}"
        message_id = f"<{iso}.{ref}.{_unique_hex(48)}@{self.domain}>"
        token = ctx["unsubscribe_url"].rpartition("/")[2]
        headers = [
            *self._common_headers(to, subject, message_id),
            f"List-Id: {self.list_id}",
            f"List-Unsubscribe: <{ctx['unsubscribe_url']}>,\r\n"
            f" <mailto:{self.unsubscribe_mailto}?subject=unsubscribe%20{token}>",
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
            # Gmail's feedback loop: campaign:customer:mail type:sender id.
            f"Feedback-ID: digest-{iso.replace('-', '')}:papermail:digest:{self.domain}",
        ]
        tags = {"edition": iso}
        if delivery_id is not None:
            tags["delivery_id"] = str(delivery_id)
        return OutgoingMessage(
            sender=self.sender,
            recipient=to,
            subject=subject,
            message_id=message_id,
            raw=_mime(headers, text_qp, html_qp),
            html=html_str,
            text="".join(text),
            tags=tags,
        )

    # -- confirmation (double opt-in)

    def render_confirm(self, email_addr: str, subscriber_id: int) -> OutgoingMessage:
        to = bare_address(email_addr)
        t = self.templates
        ctx: dict[str, Any] = {
            "subject": "",
            "preheader": "One click to start receiving trending research papers.",
            "email": to,
            "confirm_url": self._url("confirm", {"s": subscriber_id}),
            "valid_days": links.MAX_AGES["confirm"] // links.DAY,
        }
        subject, text, html = self._fill(ctx, t.confirm_html, t.confirm_text, t.confirm_subject)
        message_id = f"<confirm.{subscriber_id}.{_unique_hex(48)}@{self.domain}>"
        return OutgoingMessage(
            sender=self.sender,
            recipient=to,
            subject=subject,
            message_id=message_id,
            raw=_mime(self._common_headers(to, subject, message_id), *_qp_bodies(text, html)),
            html="".join(html),
            text="".join(text),
            tags={"kind": "confirm"},
        )

    def _common_headers(self, to: str, subject: str, message_id: str) -> list[str]:
        headers = [
            f"From: {self.from_header}",
            f"To: {to}",
            unstructured_header("Subject", subject),
            f"Date: {_date_header(int(utcnow().timestamp()))}",
            f"Message-ID: {message_id}",
        ]
        if self.reply_to:
            headers.append(f"Reply-To: {self.reply_to}")
        return headers


_RENDERER: tuple[Settings, Renderer] | None = None
_RENDERER_LOCK = threading.Lock()


def get_renderer(settings: Settings | None = None) -> Renderer:
    """The process-wide renderer for these settings (rebuilt if the settings change)."""
    global _RENDERER
    settings = settings or get_settings()
    with _RENDERER_LOCK:
        if _RENDERER is None or _RENDERER[0] is not settings:
            _RENDERER = (settings, Renderer(settings))
        return _RENDERER[1]
