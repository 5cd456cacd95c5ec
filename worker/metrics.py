"""Prometheus metrics: the workers' counters and histograms, the edition gauges.

Two kinds of figures, two ways of getting them:

- **What the workers did** (emails sent, failed, retried, unknown by error kind; provider
  latency; rate-limit wait; chunk duration): counters and histograms updated on the send
  path, once per batch (``record_batch``), never per statement. Under Celery's prefork
  pool every process counts for itself; with ``PAPERMAIL_METRICS_DIR`` set they write
  prometheus_client's multiprocess files there, and whoever serves ``/metrics`` on that
  host adds them up (``MultiProcessCollector``), so a replaced child loses nothing.
- **Where the editions stand** (deliveries by state, oldest pending, bounce and complaint
  rates, last successful fetch, queue depth): read from the database and Redis when
  Prometheus scrapes (``EditionCollector``), so every server says the same, and nothing
  on the send path keeps them.

Nothing here imports Celery, Flask or click: the worker's signals, the web route and
``papermail metrics`` call these functions.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, ThreadingWSGIServer, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from worker.clock import Clock, utcnow
from worker.config import Settings, get_settings

log = logging.getLogger(__name__)

# The Celery queues (worker.tasks.PLAN_QUEUE, SEND_QUEUE; checked equal by the tests:
# this module must not import Celery).
QUEUES = ("plan", "send")
# Kombu's Redis transport keeps a queue's messages of priority p > 0 in "name\x06\x16p".
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (0, 3, 6, 9)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CHUNK_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class WorkerMetrics:
    """The counters and histograms of one process (its own registry, see ``collector``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sent = Counter("papermail_emails_sent", "Emails the provider accepted.", registry=r)
        self.failed = Counter(
            "papermail_emails_failed",
            "Deliveries that became failed, by error kind (permanent, gave_up, error, "
            "prepare, render).",
            ["kind"],
            registry=r,
        )
        self.retried = Counter(
            "papermail_emails_retried",
            "Sends handed back for a later retry, by error kind (transient, throttled).",
            ["kind"],
            registry=r,
        )
        self.unknown = Counter(
            "papermail_emails_unknown",
            "Sends whose outcome nobody can tell (the request may have left), by kind.",
            ["kind"],
            registry=r,
        )
        self.skipped = Counter(
            "papermail_emails_skipped",
            "Deliveries skipped before sending (nothing new, subscriber suppressed).",
            registry=r,
        )
        self.paused = Counter(
            "papermail_sending_stops",
            "Chunks stopped by an account-level error of the provider (sending paused).",
            registry=r,
        )
        self.latency = Histogram(
            "papermail_send_latency_seconds",
            "The provider call of one email (mailer.send), answered or failed.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.wait = Histogram(
            "papermail_ratelimit_wait_seconds",
            "Time a batch waited for its tokens from the shared rate limiter.",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.chunk = Histogram(
            "papermail_chunk_duration_seconds",
            "One chunk (send task) from its first read to its last record.",
            buckets=CHUNK_BUCKETS,
            registry=r,
        )
        self.alerts = Counter(
            "papermail_alerts",
            "Alert webhook posts, by kind of alert and result (sent, failed).",
            ["kind", "result"],
            registry=r,
        )
        # Child lookups cached: .labels() costs a lock and a dict walk each time.
        self._children: dict[tuple[int, str], Any] = {}
        # The send path's figures are gathered in plain numbers and written to the metric
        # values (each update a lock, and a file write in multiprocess mode) at most once
        # a second and at the end of each chunk: per email that leaves two clock reads, a
        # bisect and an addition (bench/metrics.py).
        self._buffer_lock = threading.Lock()
        self._latency = _HistogramBuffer(self.latency)
        self._wait = _HistogramBuffer(self.wait)
        self._sent = 0
        self._flushed_at = time.monotonic()

    def add_batch(self, sent: int, latencies: Sequence[float]) -> None:
        with self._buffer_lock:
            self._sent += sent
            self._latency.add_many(latencies)
            due = time.monotonic() - self._flushed_at >= FLUSH_SECONDS
        if due:
            self.flush()

    def add_wait(self, seconds: float) -> None:
        with self._buffer_lock:
            self._wait.add(seconds)

    def child(self, metric: Any, kind: str) -> Any:
        key = (id(metric), kind)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(kind=kind)
        return found

    def flush(self) -> None:
        """Write what was gathered since the last flush into the metric values."""
        with self._buffer_lock:
            sent, self._sent = self._sent, 0
            latency = self._latency.take()
            wait = self._wait.take()
            self._flushed_at = time.monotonic()
        if sent:
            self.sent.inc(sent)
        self._latency.write(latency)
        self._wait.write(wait)


# How stale a scrape's send-path figures may be while a chunk runs (it flushes at its end).
FLUSH_SECONDS = 1.0


class _HistogramBuffer:
    """Observations of one histogram, counted per bucket until written.

    Written through the histogram's own values (``_sum``, ``_buckets``: the same figures
    as one ``observe()`` each, checked by the tests); a prometheus_client without those
    internals gets plain ``observe()`` calls instead.
    """

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        bounds = tuple(getattr(histogram, "_upper_bounds", ()))
        direct = not (bounds and hasattr(histogram, "_buckets") and hasattr(histogram, "_sum"))
        self.bounds = bounds
        self.direct = direct
        self.values: list[float] = []  # only when direct
        self.counts = [0] * len(bounds)
        self.total = 0.0

    def add(self, value: float) -> None:
        if self.direct:
            self.values.append(value)
            return
        self.counts[bisect_left(self.bounds, value)] += 1  # first bucket with value <= bound
        self.total += value

    def add_many(self, values: Sequence[float]) -> None:
        if self.direct:
            self.values.extend(values)
            return
        counts, bounds = self.counts, self.bounds
        for value in values:
            counts[bisect_left(bounds, value)] += 1
        self.total += math.fsum(values)

    def take(self) -> tuple[list[int], float, list[float]]:
        taken = (self.counts, self.total, self.values)
        self.counts, self.total, self.values = [0] * len(self.bounds), 0.0, []
        return taken

    def write(self, taken: tuple[list[int], float, list[float]]) -> None:
        counts, total, values = taken
        h: Any = self.histogram
        for value in values:
            h.observe(value)
        if not any(counts):
            return
        h._sum.inc(total)
        for i, n in enumerate(counts):
            if n:
                h._buckets[i].inc(n)


_lock = threading.Lock()
_metrics: WorkerMetrics | None = None
_multiprocess_dir: Path | None = None
_configured = False


def configure(settings: Settings | None = None) -> None:
    """Choose where this process's metric values live, before the first one exists.

    With ``PAPERMAIL_METRICS_DIR`` set: prometheus_client's multiprocess files in it
    (it reads the directory from ``PROMETHEUS_MULTIPROC_DIR``, set here from the
    setting; a forked child starts its own file at its first update). Otherwise plain
    in-memory values.
    """
    global _metrics, _multiprocess_dir, _configured
    settings = settings or get_settings()
    with _lock:
        wanted = settings.metrics_dir
        if _configured and wanted == _multiprocess_dir:
            return
        if wanted is not None:
            wanted.mkdir(parents=True, exist_ok=True)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(wanted)
            values.ValueClass = values.MultiProcessValue()
        else:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            values.ValueClass = values.MutexValue
        _multiprocess_dir = wanted
        _metrics = None
        _configured = True


def reset() -> None:
    """Forget the configuration and the values (tests)."""
    global _metrics, _configured, _multiprocess_dir
    with _lock:
        _metrics = None
        _configured = False
        _multiprocess_dir = None
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        values.ValueClass = values.MutexValue


def worker_metrics() -> WorkerMetrics:
    """This process's metrics, created on first use."""
    global _metrics
    found = _metrics
    if found is not None:
        return found
    if not _configured:
        configure()
    with _lock:
        if _metrics is None:
            _metrics = WorkerMetrics()
        return _metrics


def wipe_directory(path: Path) -> int:
    """Remove the value files a previous run left (a worker starting on this host)."""
    removed = 0
    if path.is_dir():
        for item in path.glob("*.db"):
            item.unlink(missing_ok=True)
            removed += 1
    return removed


def process_exited(pid: int) -> None:
    """A pool process is gone: drop its live-gauge files (its counters still count)."""
    if _multiprocess_dir is not None:
        mark_process_dead(pid, str(_multiprocess_dir))


# ---------------------------------------------------------------------------------------
# The send path: one call per batch


def record_batch(
    sent: int,
    latencies: Sequence[float] = (),
    failures: Iterable[tuple[str, str]] = (),
) -> None:
    """A batch's outcomes: ``sent`` accepted, each provider call's seconds, and for each
    failure (what became of it: failed | retried | unknown | paused, the error kind)."""
    m = worker_metrics()
    m.add_batch(sent, latencies)
    for what, kind in failures:
        if what == "failed":
            m.child(m.failed, kind).inc()
        elif what == "retried":
            m.child(m.retried, kind).inc()
        elif what == "unknown":
            m.child(m.unknown, kind).inc()
        elif what == "paused":
            m.paused.inc()


def record_unsent(failed: int = 0, skipped: int = 0, kind: str = "prepare") -> None:
    """Deliveries settled before any send: ``failed`` of ``kind``, ``skipped``."""
    if not (failed or skipped):
        return
    m = worker_metrics()
    if failed:
        m.child(m.failed, kind).inc(failed)
    if skipped:
        m.skipped.inc(skipped)


def observe_wait(seconds: float) -> None:
    worker_metrics().add_wait(seconds)


def observe_chunk(seconds: float) -> None:
    """A chunk ended: its duration, and everything gathered for it written out."""
    m = worker_metrics()
    m.chunk.observe(seconds)
    m.flush()


def flush() -> None:
    """Write the gathered send-path figures now (before a scrape of this process)."""
    if _metrics is not None:
        _metrics.flush()


def record_alert(kind: str, result: str) -> None:
    worker_metrics().alerts.labels(kind=kind, result=result).inc()


# ---------------------------------------------------------------------------------------
# The edition gauges, read at scrape time


class EditionCollector:
    """Gauges of today's (UTC) edition and of the machinery, from the database and Redis.

    A part that cannot be read (database or broker down) is reported as
    ``papermail_scrape_ok{part=...} 0`` instead of failing the whole scrape.
    """

    def __init__(self, settings: Settings, clock: Clock = utcnow) -> None:
        self.settings = settings
        self.clock = clock

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only, never at registration

    def collect(self) -> Iterator[Metric]:
        ok = GaugeMetricFamily(
            "papermail_scrape_ok", "1 when this part of the scrape could be read.", labels=["part"]
        )
        now = self.clock()
        try:
            yield from self._database(now)
            ok.add_metric(["database"], 1)
        except Exception as exc:
            log.warning("metrics: cannot read the database: %s", exc)
            ok.add_metric(["database"], 0)
        if self.settings.broker_url:
            try:
                yield self._queues()
                ok.add_metric(["broker"], 1)
            except Exception as exc:
                log.warning("metrics: cannot read the queue depth: %s", exc)
                ok.add_metric(["broker"], 0)
        yield ok

    def _database(self, now: datetime) -> Iterator[Metric]:
        from sqlalchemy import func, select

        from worker.db import session_scope
        from worker.delivery import edition_counts, sending_paused
        from worker.events import edition_rates
        from worker.models import FETCH_SUCCEEDED, Delivery, DeliveryState, PaperFetch

        today = now.date()
        with session_scope() as session:
            counts = edition_counts(session, today)
            oldest = session.scalar(
                select(func.min(Delivery.created_at)).where(
                    Delivery.edition_date == today, Delivery.state == DeliveryState.PENDING
                )
            )
            rates = edition_rates(session, today, self.settings)
            paused = sending_paused(session)
            fetched = session.execute(
                select(PaperFetch.source, func.max(PaperFetch.finished_at))
                .where(PaperFetch.status.in_([s.value for s in FETCH_SUCCEEDED]))
                .group_by(PaperFetch.source)
            ).all()
        states = GaugeMetricFamily(
            "papermail_edition_deliveries",
            "Deliveries of today's (UTC) edition by state.",
            labels=["state"],
        )
        for state, n in sorted(counts.items()):
            states.add_metric([state], n)
        yield states
        yield GaugeMetricFamily(
            "papermail_edition_oldest_pending_age_seconds",
            "Age of today's oldest pending delivery (0: none pending).",
            value=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
        )
        yield GaugeMetricFamily(
            "papermail_edition_accepted",
            "Emails of today's edition the provider accepted.",
            value=rates["accepted"],
        )
        yield GaugeMetricFamily(
            "papermail_edition_bounce_rate",
            "Today's hard bounces over accepted emails (SES's bounce rate).",
            value=rates["bounce_rate"],
        )
        yield GaugeMetricFamily(
            "papermail_edition_complaint_rate",
            "Today's complaints over accepted emails (SES's complaint rate).",
            value=rates["complaint_rate"],
        )
        levels = GaugeMetricFamily(
            "papermail_rate_threshold",
            "Configured levels: warning (alert) and limit (the guard pauses sending).",
            labels=["rate", "level"],
        )
        levels.add_metric(["bounce", "warning"], self.settings.bounce_rate_warning)
        levels.add_metric(["bounce", "limit"], self.settings.bounce_rate_limit)
        levels.add_metric(["complaint", "warning"], self.settings.complaint_rate_warning)
        levels.add_metric(["complaint", "limit"], self.settings.complaint_rate_limit)
        yield levels
        yield GaugeMetricFamily(
            "papermail_sending_paused", "1 while sending is paused.", value=1 if paused else 0
        )
        last = GaugeMetricFamily(
            "papermail_paper_fetch_last_success_timestamp_seconds",
            "When each source last fetched successfully (Unix time).",
            labels=["source"],
        )
        for source, finished in sorted(fetched, key=lambda row: row[0]):
            if finished is not None:
                last.add_metric([source], finished.timestamp())
        yield last

    def _queues(self) -> Metric:
        import redis

        client = redis.Redis.from_url(
            self.settings.broker_url or "", socket_timeout=3, socket_connect_timeout=3
        )
        try:
            pipe = client.pipeline(transaction=False)
            for queue in QUEUES:
                for step in _PRIORITY_STEPS:
                    pipe.llen(queue if step == 0 else f"{queue}{_PRIORITY_SEP}{step}")
            lengths = pipe.execute()
        finally:
            client.close()
        depth = GaugeMetricFamily(
            "papermail_queue_depth",
            "Tasks waiting in each Celery queue (not those a worker holds).",
            labels=["queue"],
        )
        per = len(_PRIORITY_STEPS)
        for i, queue in enumerate(QUEUES):
            depth.add_metric([queue], sum(int(n) for n in lengths[i * per : (i + 1) * per]))
        return depth


class _ProcessMetrics:
    """This process's own WorkerMetrics, for a registry (without multiprocess files)."""

    def collect(self) -> Iterator[Metric]:
        m = worker_metrics()
        m.flush()
        yield from m.registry.collect()

    def describe(self) -> list[Metric]:
        return []


class _FlushFirst:
    """Registered before the multiprocess files are read: this process's gathered
    figures go into its file first."""

    def collect(self) -> Iterator[Metric]:
        flush()
        return iter(())

    def describe(self) -> list[Metric]:
        return []


def registry(
    settings: Settings | None = None, *, editions: bool = True, clock: Clock = utcnow
) -> CollectorRegistry:
    """What a /metrics answer shows: the workers' figures of this host (every process's
    files with ``PAPERMAIL_METRICS_DIR``, else this process's), and the edition gauges."""
    settings = settings or get_settings()
    configure(settings)
    reg = CollectorRegistry(auto_describe=False)
    if settings.metrics_dir is not None:
        reg.register(_FlushFirst())  # type: ignore[arg-type]
        MultiProcessCollector(reg, path=str(settings.metrics_dir))
    else:
        reg.register(_ProcessMetrics())  # type: ignore[arg-type]
    if editions:
        reg.register(EditionCollector(settings, clock))  # type: ignore[arg-type]
    return reg


def exposition(reg: CollectorRegistry) -> tuple[bytes, str]:
    """The text format of a scrape and its content type."""
    return generate_latest(reg), CONTENT_TYPE_LATEST


def authorized(settings: Settings, header: str | None) -> bool:
    """Whether an Authorization header passes ``PAPERMAIL_METRICS_TOKEN`` (unset: open)."""
    token = settings.metrics_token
    if not token:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)


# ---------------------------------------------------------------------------------------
# A small server of its own (`papermail metrics`, the Celery worker's parent)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds are not worth a log line each."""


def wsgi_app(
    settings: Settings, reg: CollectorRegistry
) -> Callable[[dict[str, Any], Callable[..., Any]], list[bytes]]:
    """``GET /metrics`` (bearer token when set), ``GET /`` a pointer, 404 otherwise."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found; metrics are at /metrics\n"]
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"papermail metrics: GET /metrics\n"]
        if not authorized(settings, environ.get("HTTP_AUTHORIZATION")):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics"')],
            )
            return [b"a bearer token is required (PAPERMAIL_METRICS_TOKEN)\n"]
        body, content_type = exposition(reg)
        start_response("200 OK", [("Content-Type", content_type)])
        return [body]

    return app


def serve(
    settings: Settings,
    host: str,
    port: int,
    *,
    editions: bool = True,
    clock: Clock = utcnow,
) -> tuple[ThreadingWSGIServer, threading.Thread]:
    """Serve /metrics on ``host:port`` from a daemon thread; the server and its thread."""
    server = make_server(
        host,
        port,
        wsgi_app(settings, registry(settings, editions=editions, clock=clock)),
        server_class=ThreadingWSGIServer,
        handler_class=_QuietHandler,
    )
    thread = threading.Thread(target=server.serve_forever, name="papermail-metrics", daemon=True)
    thread.start()
    return server, thread
