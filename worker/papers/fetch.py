"""Papers arrive by themselves: fetch the day's papers from the configured sources.

One function, :func:`fetch_papers`, does the work for the beat task, ``papermail papers
fetch`` and the no-broker path alike. For each source and date it:

* asks over HTTP with a timeout, a descriptive User-Agent and a response-size limit
  (``requests``: connection reuse, decompression, and an error when a body is shorter than
  its Content-Length);
* retries a 429, a 5xx, a network error, a timeout or a body cut short, with exponential
  backoff, waiting what ``Retry-After`` asks instead when the server says (in seconds or as
  an HTTP date, read against :mod:`worker.clock`); other errors fail at once;
* sends the ETag / Last-Modified the source gave last time for the URL (stored per source
  and URL in ``fetch_validators``, only once the papers of that answer are stored), so a
  repeated fetch is answered 304 and costs no parsing and no writes;
* keeps arXiv's rule of at most one request every 3 s (``ARXIV_DELAY_SECONDS``), retries
  included, and pages through the day's submissions in the configured categories;
* validates everything it received exactly as ``papers ingest`` does (a bad record or page
  rejects the whole fetch, and nothing is written), then upserts the papers, merged with
  those of the other sources, in one transaction with the record of the fetch.

Every run is one ``paper_fetches`` row: source, date, status (``ok``, ``not_modified``,
``failed``), requests, pages, bytes, papers, new, updated, error, validators. Sleeping and
the monotonic clock are injectable, so the tests run a real HTTP server without waiting.
"""

from __future__ import annotations

import email.utils
import logging
import time as _time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import requests
from sqlalchemy import select
from sqlalchemy.orm import Session

from worker import __version__
from worker.clock import utcnow
from worker.config import Settings, get_settings
from worker.db import insert_ignore_or_update, session_scope
from worker.errors import PapermailError
from worker.models import FETCH_SUCCEEDED, FetchStatus, FetchValidator, PaperFetch
from worker.papers.ingest import upsert_papers
from worker.papers.sources import PaperRecord, PaperSourceError, parse, parse_arxiv_feed

log = logging.getLogger(__name__)

SOURCES = ("hf", "arxiv")
ARXIV_PAGE_SIZE = 200  # results per arXiv API request
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
BACKOFF_BASE_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 120.0
# A Retry-After longer than this is not waited for: the fetch fails now, and the beat
# tries again in a quarter of an hour.
MAX_RETRY_AFTER_SECONDS = 600.0
CHUNK_BYTES = 64 * 1024

Sleep = Callable[[float], None]
Monotonic = Callable[[], float]


class FetchError(PapermailError):
    """A source could not be fetched (after the retries it deserved)."""

    exit_code = 1

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Retryable(Exception):
    def __init__(self, message: str, status: int | None = None, wait: float | None = None):
        super().__init__(message)
        self.status = status
        self.wait = wait  # what Retry-After asked for, in seconds


@dataclass
class Response:
    url: str
    status: int  # 200 or 304
    text: str | None  # None on 304
    etag: str | None
    last_modified: str | None


@dataclass
class HttpStats:
    requests: int = 0
    bytes: int = 0
    last_status: int | None = None
    sleeps: list[float] = field(default_factory=list)


def user_agent(settings: Settings) -> str:
    return f"papermail/{__version__} (self-hosted paper digest; +{settings.base_url})"


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """Retry-After as seconds from ``now``: delta-seconds or an HTTP date; None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


class HttpClient:
    """GET with timeout, retries, backoff, Retry-After, politeness and a size limit."""

    def __init__(
        self,
        *,
        user_agent: str,
        timeout: float,
        max_bytes: int,
        retries: int,
        min_interval: float = 0.0,
        sleep: Sleep = _time.sleep,
        monotonic: Monotonic = _time.monotonic,
        session: requests.Session | None = None,
    ) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.retries = retries
        self.min_interval = min_interval
        self._sleep = sleep
        self._monotonic = monotonic
        self._last_request: float | None = None
        self.stats = HttpStats()
        self.session = session or requests.Session()
        self.session.headers.update(
            {
                "User-Agent": user_agent,
                "Accept": "application/json, application/atom+xml;q=0.9, */*;q=0.1",
                "Accept-Encoding": "gzip, deflate",
            }
        )

    def close(self) -> None:
        self.session.close()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.stats.sleeps.append(seconds)
            self._sleep(seconds)

    def _polite(self) -> None:
        """At most one request every ``min_interval`` seconds (arXiv's rule)."""
        if self._last_request is not None and self.min_interval > 0:
            self.sleep(self.min_interval - (self._monotonic() - self._last_request))
        self._last_request = self._monotonic()

    def get(
        self,
        url: str,
        params: dict[str, str] | None = None,
        *,
        etag: str | None = None,
        last_modified: str | None = None,
    ) -> Response:
        headers = {}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._once(url, params, headers)
            except _Retryable as exc:
                if attempt > self.retries:
                    raise FetchError(
                        f"{url}: {exc} (gave up after {attempt} attempt"
                        f"{'s' if attempt > 1 else ''})",
                        exc.status,
                    ) from None
                if exc.wait is not None and exc.wait > MAX_RETRY_AFTER_SECONDS:
                    raise FetchError(
                        f"{url}: {exc}; the server asks to wait {exc.wait:.0f} s (Retry-After), "
                        f"longer than {MAX_RETRY_AFTER_SECONDS:.0f} s: trying again later",
                        exc.status,
                    ) from None
                backoff = min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
                delay = exc.wait if exc.wait is not None else backoff
                log.warning("fetch %s: %s; retrying in %.1f s", url, exc, delay)
                self.sleep(delay)

    def _once(self, url: str, params: dict[str, str] | None, headers: dict[str, str]) -> Response:
        self._polite()
        self.stats.requests += 1
        started = self._monotonic()
        try:
            response = self.session.get(
                url,
                params=params,
                headers=headers,
                timeout=(min(10.0, self.timeout), self.timeout),
                stream=True,
                allow_redirects=True,
            )
        except requests.Timeout:
            raise _Retryable(f"no answer within {self.timeout:g} s") from None
        except requests.RequestException as exc:
            raise _Retryable(f"cannot connect: {_reason(exc)}") from None
        with response:
            status = response.status_code
            self.stats.last_status = status
            if status == 304:
                return Response(response.url, 304, None, None, None)
            if status in RETRY_STATUSES:
                wait = retry_after_seconds(response.headers.get("Retry-After"), utcnow())
                raise _Retryable(f"HTTP {status} {response.reason}", status, wait)
            if status >= 400:
                raise FetchError(f"{url}: HTTP {status} {response.reason}", status)
            if status != 200:
                raise FetchError(f"{url}: unexpected HTTP {status} {response.reason}", status)
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise FetchError(
                    f"{url}: {int(declared):,} bytes, more than the limit of "
                    f"{self.max_bytes:,} (PAPERMAIL_FETCH_MAX_BYTES), refused",
                    status,
                )
            body = bytearray()
            try:
                for chunk in response.iter_content(CHUNK_BYTES):
                    body += chunk
                    self.stats.bytes += len(chunk)
                    if len(body) > self.max_bytes:
                        raise FetchError(
                            f"{url}: more than the limit of {self.max_bytes:,} bytes "
                            "(PAPERMAIL_FETCH_MAX_BYTES), refused",
                            status,
                        )
                    if self._monotonic() - started > self.timeout:
                        raise _Retryable(f"the answer took longer than {self.timeout:g} s")
            except requests.exceptions.ChunkedEncodingError as exc:
                raise _Retryable(f"the answer was cut short: {_reason(exc)}", status) from None
            except requests.Timeout:
                raise _Retryable(f"the answer stalled for {self.timeout:g} s", status) from None
            except requests.RequestException as exc:
                raise _Retryable(f"reading the answer failed: {_reason(exc)}", status) from None
            # The charset the server declared, else UTF-8 (JSON's and XML's default; requests
            # would guess ISO-8859-1 for text/* without one).
            charset = _charset(response.headers.get("Content-Type", "")) or "utf-8"
            try:
                text = bytes(body).decode(charset)
            except (UnicodeDecodeError, LookupError):
                raise FetchError(f"{url}: not valid {charset} text", status) from None
            return Response(
                response.url,
                200,
                text,
                response.headers.get("ETag"),
                response.headers.get("Last-Modified"),
            )


def _charset(content_type: str) -> str | None:
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "charset" and value.strip('"'):
            return value.strip('"')
    return None


def _reason(exc: BaseException) -> str:
    # requests nests urllib3's errors; the innermost message is the one a person reads.
    while exc.args and isinstance(exc.args[0], BaseException):
        exc = exc.args[0]
    text = str(exc)
    return text if len(text) < 300 else text[:297] + "..."


# --------------------------------------------------------------------------- one source


@dataclass
class SourceFetch:
    """What one fetch of one source for one date did (one ``paper_fetches`` row)."""

    source: str
    fetch_date: date
    status: str = FetchStatus.FAILED
    url: str | None = None
    http_status: int | None = None
    requests: int = 0
    pages: int = 0
    bytes: int = 0
    papers: int = 0
    new: int = 0
    updated: int = 0
    error: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    id: int | None = None

    @property
    def succeeded(self) -> bool:
        return self.status in FETCH_SUCCEEDED

    def as_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "date": self.fetch_date.isoformat(),
            "status": str(self.status),
            "papers": self.papers,
            "new": self.new,
            "updated": self.updated,
            "requests": self.requests,
            "pages": self.pages,
            "bytes": self.bytes,
            "http_status": self.http_status,
            "error": self.error,
            "url": self.url,
            "etag": self.etag,
            "last_modified": self.last_modified,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


@dataclass
class _Page:
    url: str
    response: Response


def hf_request(settings: Settings, on_date: date) -> tuple[str, dict[str, str]]:
    return settings.hf_api_url, {"date": on_date.isoformat()}


def arxiv_query(settings: Settings, on_date: date) -> str:
    """The day before ``on_date`` (UTC), in the configured categories: the submissions
    that the morning of ``on_date`` brings."""
    day = on_date - timedelta(days=1)
    cats = " OR ".join(f"cat:{c}" for c in settings.arxiv_categories)
    span = f"submittedDate:[{day:%Y%m%d}0000 TO {day:%Y%m%d}2359]"
    return f"({cats}) AND {span}" if len(settings.arxiv_categories) > 1 else f"{cats} AND {span}"


def _full_url(url: str, params: dict[str, str]) -> str:
    return requests.Request("GET", url, params=params).prepare().url or url


def _validators(session: Session, source: str, url: str) -> tuple[str | None, str | None]:
    row = session.scalar(
        select(FetchValidator).where(FetchValidator.source == source, FetchValidator.url == url)
    )
    return (row.etag, row.last_modified) if row else (None, None)


def _fetch_hf(
    client: HttpClient, settings: Settings, on_date: date, report: SourceFetch
) -> tuple[list[PaperRecord], list[_Page]]:
    url, params = hf_request(settings, on_date)
    full = _full_url(url, params)
    report.url = full
    with session_scope() as session:
        etag, modified = _validators(session, "hf", full)
    response = client.get(url, params, etag=etag, last_modified=modified)
    report.pages = 1
    if response.status == 304:
        return [], []
    assert response.text is not None
    records = parse(response.text, "hf", full).records
    return records, [_Page(full, response)]


def _fetch_arxiv(
    client: HttpClient, settings: Settings, on_date: date, report: SourceFetch, page_size: int
) -> tuple[list[PaperRecord], list[_Page]]:
    query = arxiv_query(settings, on_date)
    records: list[PaperRecord] = []
    pages: list[_Page] = []
    start = 0
    total: int | None = None
    limit = settings.arxiv_max_results
    while start < limit and (total is None or start < total):
        params = {
            "search_query": query,
            "start": str(start),
            "max_results": str(min(page_size, limit - start)),
            "sortBy": "submittedDate",
            "sortOrder": "descending",
        }
        full = _full_url(settings.arxiv_api_url, params)
        report.url = report.url or full
        with session_scope() as session:
            etag, modified = _validators(session, "arxiv", full)
        empty_retries = 0
        while True:
            response = client.get(settings.arxiv_api_url, params, etag=etag, last_modified=modified)
            report.pages += 1
            if response.status == 304:
                break
            assert response.text is not None
            feed = parse_arxiv_feed(response.text, full)
            if total is None:
                total = feed.total if feed.total is not None else feed.entries
            # The API now and then answers an empty page inside the results: ask again.
            if feed.entries == 0 and start < (total or 0) and empty_retries < client.retries:
                empty_retries += 1
                client.sleep(BACKOFF_BASE_SECONDS * 2 ** (empty_retries - 1))
                continue
            break
        if response.status == 304:
            if start == 0:
                # The first page of a closed day, unchanged: so is the rest of the result.
                return [], []
            start += page_size
            continue
        if feed.entries == 0:
            if start < (total or 0):
                raise FetchError(
                    f"{full}: the arXiv API answered an empty page at {start} of {total} "
                    "results, several times"
                )
            break
        records.extend(feed.records)
        pages.append(_Page(full, response))
        start += feed.entries
    return records, pages


def fetch_source(
    source: str,
    on_date: date,
    *,
    settings: Settings | None = None,
    sleep: Sleep = _time.sleep,
    monotonic: Monotonic = _time.monotonic,
    page_size: int = ARXIV_PAGE_SIZE,
) -> SourceFetch:
    """Fetch ``source`` for ``on_date``, store its papers and record the fetch.

    Never raises for the source's own failures (they are the ``failed`` row's error);
    a database error does raise.
    """
    settings = settings or get_settings()
    if source not in SOURCES:
        raise PapermailError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")
    if source == "arxiv" and not settings.arxiv_categories:
        raise PapermailError(
            "PAPERMAIL_ARXIV_CATEGORIES is empty: name the arXiv categories to fetch, "
            "e.g. cs.LG,cs.CL"
        )
    report = SourceFetch(source, on_date, started_at=utcnow())
    client = HttpClient(
        user_agent=user_agent(settings),
        timeout=settings.fetch_timeout_seconds,
        max_bytes=settings.fetch_max_bytes,
        retries=settings.fetch_retries,
        min_interval=settings.arxiv_delay_seconds if source == "arxiv" else 0.0,
        sleep=sleep,
        monotonic=monotonic,
    )
    try:
        if source == "hf":
            records, pages = _fetch_hf(client, settings, on_date, report)
        else:
            records, pages = _fetch_arxiv(client, settings, on_date, report, page_size)
    except (FetchError, PaperSourceError) as exc:
        report.error = str(exc)
        report.status = FetchStatus.FAILED
    else:
        report.status = FetchStatus.OK if pages else FetchStatus.NOT_MODIFIED
        report.papers = len({r.id for r in records})
        if pages:
            report.etag = pages[0].response.etag
            report.last_modified = pages[0].response.last_modified
    finally:
        client.close()
    report.requests = client.stats.requests
    report.bytes = client.stats.bytes
    report.http_status = client.stats.last_status
    report.finished_at = utcnow()
    with session_scope() as session:
        if report.status == FetchStatus.OK:
            result = upsert_papers(session, records, source, now=report.finished_at)
            report.new, report.updated = result.new, result.updated
            # Saved with the papers they vouch for: a 304 must never stand for papers
            # that were not stored.
            _save_validators(session, source, pages)
        row = _row(report)
        session.add(row)
        session.flush()
        report.id = row.id
    level = logging.INFO if report.succeeded else logging.ERROR
    log.log(
        level,
        "fetch %s for %s: %s, %d papers (%d new), %d requests, %d bytes%s",
        source,
        on_date,
        report.status,
        report.papers,
        report.new,
        report.requests,
        report.bytes,
        f": {report.error}" if report.error else "",
    )
    return report


def _save_validators(session: Session, source: str, pages: Sequence[_Page]) -> None:
    rows = [
        {
            "source": source,
            "url": page.url,
            "etag": (page.response.etag or "")[:255] or None,
            "last_modified": (page.response.last_modified or "")[:64] or None,
            "updated_at": utcnow(),
        }
        for page in pages
        if page.response.etag or page.response.last_modified
    ]
    insert_ignore_or_update(
        session,
        FetchValidator.__table__,
        rows,
        ["source", "url"],
        ["etag", "last_modified", "updated_at"],
    )


def _row(report: SourceFetch) -> PaperFetch:
    return PaperFetch(
        source=report.source,
        fetch_date=report.fetch_date,
        status=str(report.status),
        started_at=report.started_at,
        finished_at=report.finished_at,
        url=report.url,
        http_status=report.http_status,
        requests=report.requests,
        pages=report.pages,
        bytes=report.bytes,
        papers=report.papers,
        new=report.new,
        updated=report.updated,
        error=(report.error or "")[:4000] or None,
        etag=(report.etag or "")[:255] or None,
        last_modified=(report.last_modified or "")[:64] or None,
    )


# --------------------------------------------------------------------------- all sources


def fetch_papers(
    *,
    settings: Settings | None = None,
    sources: Sequence[str] | None = None,
    on_date: date | None = None,
    only_missing: bool = False,
    sleep: Sleep = _time.sleep,
    monotonic: Monotonic = _time.monotonic,
    page_size: int = ARXIV_PAGE_SIZE,
) -> list[SourceFetch]:
    """Fetch the configured sources (or ``sources``) for ``on_date`` (default: today, UTC).

    ``only_missing`` skips sources that already have a successful fetch for the date (the
    beat's retries). The one function behind the beat task and ``papers fetch``.
    """
    settings = settings or get_settings()
    on_date = on_date or utcnow().date()
    wanted = list(sources) if sources is not None else list(settings.sources)
    if not wanted:
        raise PapermailError(
            "no paper sources configured: PAPERMAIL_SOURCES is empty (set hf, arxiv or "
            "hf,arxiv), or name one with --source"
        )
    if only_missing:
        with session_scope() as session:
            done = succeeded_sources(session, on_date)
        wanted = [s for s in wanted if s not in done]
    return [
        fetch_source(
            source,
            on_date,
            settings=settings,
            sleep=sleep,
            monotonic=monotonic,
            page_size=page_size,
        )
        for source in wanted
    ]


def fetch_due(
    *,
    settings: Settings | None = None,
    now: datetime | None = None,
    sleep: Sleep = _time.sleep,
    monotonic: Monotonic = _time.monotonic,
) -> list[SourceFetch]:
    """The beat's fetch: from FETCH_AT (UTC) on, today's sources that have not succeeded.

    Runs at FETCH_AT and every quarter of an hour after it; once every source has
    succeeded for the day it asks nothing more.
    """
    settings = settings or get_settings()
    now = (now or utcnow()).astimezone(UTC)
    if not settings.sources or now.time() < settings.fetch_time:
        return []
    return fetch_papers(
        settings=settings, on_date=now.date(), only_missing=True, sleep=sleep, monotonic=monotonic
    )


def succeeded_sources(session: Session, on_date: date) -> set[str]:
    """The sources with a successful fetch (ok or not modified) for ``on_date``."""
    return set(
        session.scalars(
            select(PaperFetch.source)
            .where(
                PaperFetch.fetch_date == on_date,
                PaperFetch.status.in_([s.value for s in FETCH_SUCCEEDED]),
            )
            .distinct()
        )
    )


def recent_fetches(
    session: Session, dates: Sequence[date] | None = None, limit: int = 20
) -> list[PaperFetch]:
    """The latest fetch of each source for each of ``dates`` (default: the last ``limit``
    fetches), newest first."""
    query = select(PaperFetch).order_by(PaperFetch.id.desc())
    if dates is not None:
        query = query.where(PaperFetch.fetch_date.in_(list(dates)))
    else:
        query = query.limit(limit)
    latest: dict[tuple[str, date], PaperFetch] = {}
    for row in session.scalars(query):
        latest.setdefault((row.source, row.fetch_date), row)
    return sorted(latest.values(), key=lambda r: (r.fetch_date, r.source), reverse=True)


def fetch_json(row: PaperFetch) -> dict[str, Any]:
    return {
        "source": row.source,
        "date": row.fetch_date.isoformat(),
        "status": row.status,
        "papers": row.papers,
        "new": row.new,
        "updated": row.updated,
        "requests": row.requests,
        "pages": row.pages,
        "bytes": row.bytes,
        "http_status": row.http_status,
        "error": row.error,
        "started_at": row.started_at.isoformat() if row.started_at else None,
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
    }
