"""Alerts: one chat message (Slack- and Mattermost-compatible webhook) per thing that needs
an operator, whoever notices it first.

What is checked (``find_problems``), on the editions of today and yesterday (UTC):

- sending is paused (by an operator, by the provider's refusal, by the reputation guard);
- an edition is not finished: deliveries still pending or sending
  ``PAPERMAIL_EDITION_DEADLINE_MINUTES`` after they were planned (or let go, or due again);
- the day's paper fetch failed for a source (and has not succeeded since);
- the bounce or complaint rate passed its warning level (below SES's review levels, where
  the reputation guard pauses);
- ``unknown`` deliveries exist.

Each alert has a key (its kind and what it is about: ``unknown:2031-03-14``); the
``alerts`` table holds one row per key, and only the process that inserts and then claims
the row (a conditional UPDATE) posts it, so several workers, the beat and the command line
never send one twice. A post that fails (after the HTTP retries) is logged and tried again
at the next check while the problem lasts; it never raises into the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from worker import metrics
from worker.clock import Clock, utcnow
from worker.config import Settings, get_settings
from worker.db import insert_ignore_or_update, session_scope
from worker.models import (
    FETCH_SUCCEEDED,
    Alert,
    ControlFlag,
    Delivery,
    DeliveryState,
    FetchStatus,
    PaperFetch,
)

log = logging.getLogger(__name__)

KINDS = ("paused", "deadline", "fetch_failed", "bounce_rate", "complaint_rate", "unknown")
# A claim older than this is taken to belong to a process that died while posting.
CLAIM_SECONDS = 300
# After this many failed posts of one alert, stop trying (the log says so).
MAX_ATTEMPTS = 24
EDITION_DAYS = 2  # today and yesterday (UTC)


class AlertError(Exception):
    """The webhook did not take the message (after its retries)."""


class Webhook(Protocol):
    def post(self, text: str) -> None:
        """Deliver one message; raise AlertError when it could not."""


class HttpWebhook:
    """POST ``{"text": ...}`` (Slack's and Mattermost's incoming-webhook format).

    requests with urllib3's Retry: connection errors, 429 and 5xx are retried with
    backoff (honouring Retry-After), each attempt bounded by the timeout.
    """

    def __init__(self, url: str, *, timeout: float, retries: int, backoff: float = 0.5) -> None:
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.url = url
        self.timeout = timeout
        self.session = requests.Session()
        retry = Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            backoff_factor=backoff,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=frozenset({"POST"}),
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        _hide_in_urllib3_logs(urlsplit(url).path)
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    @property
    def shown(self) -> str:
        """The webhook's host, never its path (the path is the credential)."""
        return urlsplit(self.url).hostname or "?"

    def post(self, text: str) -> None:
        import requests

        try:
            response = self.session.post(self.url, json={"text": text}, timeout=self.timeout)
        except requests.RequestException as exc:
            from urllib3.exceptions import NewConnectionError
            from urllib3.exceptions import TimeoutError as Urllib3Timeout

            # urllib3's retries wrap a timeout in a MaxRetryError (requests: ConnectionError).
            cause = getattr(exc.args[0], "reason", None) if exc.args else None
            if isinstance(cause, NewConnectionError):  # (a subclass of urllib3's timeout)
                raise AlertError(f"cannot connect to {self.shown}") from None
            if isinstance(exc, requests.Timeout) or isinstance(cause, Urllib3Timeout):
                raise AlertError(f"no answer from {self.shown} within {self.timeout:g} s") from None
            # The exception text may carry the URL: name its kind and the host only.
            raise AlertError(f"{type(exc).__name__} posting to {self.shown}") from None
        if response.status_code >= 300:
            raise AlertError(f"{self.shown} answered HTTP {response.status_code}")


class _HidePaths(logging.Filter):
    """urllib3 logs each retry with the request path: a webhook's path is its secret."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(path in message for path in self.paths):
            for path in self.paths:
                message = message.replace(path, "/[webhook path]")
            record.msg, record.args = message, None
        return True


_hide_paths = _HidePaths()
logging.getLogger("urllib3.connectionpool").addFilter(_hide_paths)


def _hide_in_urllib3_logs(path: str) -> None:
    if len(path) > 1:
        _hide_paths.paths.add(path)


def get_webhook(settings: Settings) -> Webhook | None:
    if not settings.alert_webhook_url:
        return None
    return HttpWebhook(
        settings.alert_webhook_url,
        timeout=settings.alert_timeout_seconds,
        retries=settings.alert_retries,
    )


@dataclass(frozen=True)
class Finding:
    kind: str
    key: str
    text: str
    edition_date: date | None = None


@dataclass
class CheckResult:
    findings: list[Finding] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)  # keys posted now
    already: list[str] = field(default_factory=list)  # posted before, or being posted
    failed: dict[str, str] = field(default_factory=dict)  # key -> why

    def as_dict(self) -> dict[str, Any]:
        return {
            "findings": [
                {
                    "kind": f.kind,
                    "key": f.key,
                    "edition": f.edition_date.isoformat() if f.edition_date else None,
                    "text": f.text,
                }
                for f in self.findings
            ],
            "sent": self.sent,
            "already_sent": self.already,
            "failed": self.failed,
        }


# ---------------------------------------------------------------------------------------
# What needs an operator


def find_problems(
    session: Session,
    settings: Settings,
    now: datetime,
    kinds: Iterable[str] | None = None,
) -> list[Finding]:
    """Everything alert-worthy right now (only ``kinds`` when given)."""
    wanted = set(kinds or KINDS)
    found: list[Finding] = []
    if "paused" in wanted:
        found += _paused(session)
    days = [now.date() - timedelta(days=n) for n in range(EDITION_DAYS)]
    for day in days:
        if "deadline" in wanted:
            found += _late(session, settings, day, now)
        if "unknown" in wanted:
            found += _unknown(session, day)
        if wanted & {"bounce_rate", "complaint_rate"}:
            found += [f for f in _rates(session, settings, day) if f.kind in wanted]
    if "fetch_failed" in wanted and settings.sources:
        found += _fetch_failures(session, settings, now.date())
    return found


def _paused(session: Session) -> list[Finding]:
    from worker.delivery import PAUSE_FLAG

    flag = session.get(ControlFlag, PAUSE_FLAG)
    value = flag.value if flag else {}
    if not value.get("paused"):
        return []
    reason = str(value.get("reason") or "sending is paused")
    by = str(value.get("by") or "system")
    at = str(value.get("at") or "")
    who = {
        "cli": "by an operator",
        "reputation-guard": "by the reputation guard",
        "system": "after the provider refused to send",
    }.get(by, f"by {by}")
    then = "`papermail sending resume`"
    if by == "reputation-guard":
        look = "`papermail stats` (the edition's bounce and complaint rates)"
    elif by == "system":
        look = "`papermail sending status` (the provider's answer; check the SES account)"
    else:
        look = "`papermail sending status`"
    text = (
        f"Sending is PAUSED {who}: {reason}. Deliveries stay pending until it resumes. "
        f"Look: {look}; once the cause is fixed run {then}."
    )
    return [Finding("paused", f"paused:{at}", text)]


def _late(session: Session, settings: Settings, day: date, now: datetime) -> list[Finding]:
    cutoff = now - timedelta(minutes=settings.edition_deadline_minutes)
    late, oldest = session.execute(
        select(func.count(), func.min(Delivery.created_at)).where(
            Delivery.edition_date == day,
            Delivery.state.in_([DeliveryState.PENDING.value, DeliveryState.SENDING.value]),
            Delivery.waiting_for.is_(None),  # held for the day's papers: the fetch alerts
            Delivery.created_at < cutoff,
            or_(Delivery.scheduled_at.is_(None), Delivery.scheduled_at < cutoff),
        )
    ).one()
    if not late:
        return []
    d = day.isoformat()
    text = (
        f"Edition {d} is not finished: {late} deliveries still pending or sending more than "
        f"{settings.edition_deadline_minutes} minutes after they were due (oldest planned "
        f"{oldest:%Y-%m-%d %H:%M} UTC). Are the workers running and is the queue moving? "
        f"Run `papermail stats --date {d}`."
    )
    return [Finding("deadline", f"deadline:{d}", text, day)]


def _unknown(session: Session, day: date) -> list[Finding]:
    count = session.scalar(
        select(func.count())
        .select_from(Delivery)
        .where(Delivery.edition_date == day, Delivery.state == DeliveryState.UNKNOWN.value)
    )
    if not count:
        return []
    d = day.isoformat()
    text = (
        f"Edition {d} has {count} `unknown` deliveries: the provider may or may not have "
        "accepted them (a worker died mid-send, or a timeout after the request left); they are "
        f"never re-sent by themselves. Decide: `papermail resend --date {d} --state unknown "
        "--dry-run`, then without --dry-run to send them again."
    )
    return [Finding("unknown", f"unknown:{d}", text, day)]


def _rates(session: Session, settings: Settings, day: date) -> list[Finding]:
    from worker.events import edition_rates

    rates = edition_rates(session, day, settings)
    if not rates["sample_ok"]:
        return []
    d = day.isoformat()
    found = []
    for kind, rate, warn, limit, what in (
        (
            "bounce_rate",
            rates["bounce_rate"],
            settings.bounce_rate_warning,
            settings.bounce_rate_limit,
            f"{rates['hard_bounced']} hard bounces",
        ),
        (
            "complaint_rate",
            rates["complaint_rate"],
            settings.complaint_rate_warning,
            settings.complaint_rate_limit,
            f"{rates['complained']} complaints",
        ),
    ):
        if rate < warn:
            continue
        name = kind.replace("_", " ")
        text = (
            f"Edition {d}: {name} {rate:.2%} ({what} of {rates['accepted']} accepted) passed "
            f"the warning level {warn:.2%}; SES reviews the account at {limit:.2%}, where "
            f"sending pauses by itself. Run `papermail stats --date {d}`; to stop now: "
            '`papermail sending pause --reason "bounces"`.'
        )
        found.append(Finding(kind, f"{kind}:{d}", text, day))
    return found


def _fetch_failures(session: Session, settings: Settings, day: date) -> list[Finding]:
    rows = session.scalars(
        select(PaperFetch)
        .where(PaperFetch.fetch_date == day, PaperFetch.source.in_(list(settings.sources)))
        .order_by(PaperFetch.id)
    ).all()
    latest: dict[str, PaperFetch] = {}
    succeeded: set[str] = set()
    for row in rows:
        latest[row.source] = row
        if row.status in {s.value for s in FETCH_SUCCEEDED}:
            succeeded.add(row.source)
    found = []
    d = day.isoformat()
    for source, row in sorted(latest.items()):
        if source in succeeded or row.status != FetchStatus.FAILED.value:
            continue
        text = (
            f"The {source} paper fetch for {d} failed: {(row.error or 'no reason given')[:300]}. "
            f"The beat tries again every 15 minutes; editions wait up to "
            f"{settings.fetch_wait_minutes} minutes, then go as PAPERMAIL_FETCH_MISSED="
            f"{settings.fetch_missed} says. Try by hand: `papermail papers fetch --source "
            f"{source} --date {d}`."
        )
        found.append(Finding("fetch_failed", f"fetch_failed:{d}:{source}", text, day))
    return found


# ---------------------------------------------------------------------------------------
# Sending each one once


def _claim(finding: Finding, message: str, now: datetime) -> bool:
    """Store the alert (once) and claim it for posting; False if another has or had it."""
    stale = now - timedelta(seconds=CLAIM_SECONDS)
    with session_scope() as session:
        insert_ignore_or_update(
            session,
            Alert.__table__,
            [
                {
                    "key": finding.key[:200],
                    "kind": finding.kind,
                    "edition_date": finding.edition_date,
                    "message": message,
                    "created_at": now,
                    "attempts": 0,
                }
            ],
            ["key"],
        )
        res = session.execute(
            update(Alert)
            .where(
                Alert.key == finding.key[:200],
                Alert.sent_at.is_(None),
                Alert.attempts < MAX_ATTEMPTS,
                or_(Alert.claimed_at.is_(None), Alert.claimed_at < stale),
            )
            .values(claimed_at=now, attempts=Alert.attempts + 1)
        )
        return res.rowcount == 1  # type: ignore[attr-defined]


def _finish(key: str, now: datetime, error: str | None) -> None:
    with session_scope() as session:
        values: dict[str, Any] = (
            {"sent_at": now, "last_error": None}
            if error is None
            else {"claimed_at": None, "last_error": error[:2000]}
        )
        session.execute(update(Alert).where(Alert.key == key[:200]).values(**values))


def _message(settings: Settings, finding: Finding) -> str:
    host = urlsplit(settings.base_url).hostname or "papermail"
    return f"[papermail {host}] {finding.text}"


def notify(
    findings: Sequence[Finding],
    settings: Settings,
    *,
    webhook: Webhook | None = None,
    clock: Clock = utcnow,
) -> CheckResult:
    """Post each finding not posted yet; never raises for the webhook's failures."""
    result = CheckResult(findings=list(findings))
    webhook = webhook or get_webhook(settings)
    if webhook is None:
        return result
    for finding in findings:
        message = _message(settings, finding)
        if not _claim(finding, message, clock()):
            result.already.append(finding.key)
            continue
        try:
            webhook.post(message)
        except Exception as exc:
            why = str(exc) if isinstance(exc, AlertError) else type(exc).__name__
            log.error("alert %s not posted: %s (tried again at the next check)", finding.key, why)
            result.failed[finding.key] = why
            metrics.record_alert(finding.kind, "failed")
            _finish(finding.key, clock(), why)
            continue
        log.warning("alert posted: %s", finding.key)
        result.sent.append(finding.key)
        metrics.record_alert(finding.kind, "sent")
        _finish(finding.key, clock(), None)
    return result


def check(
    settings: Settings | None = None,
    *,
    webhook: Webhook | None = None,
    clock: Clock = utcnow,
    kinds: Iterable[str] | None = None,
    dry_run: bool = False,
) -> CheckResult:
    """Find what needs an operator and post what was not posted yet (the beat's task)."""
    settings = settings or get_settings()
    with session_scope() as session:
        findings = find_problems(session, settings, clock(), kinds)
    if dry_run:
        return CheckResult(findings=findings)
    return notify(findings, settings, webhook=webhook, clock=clock)


def check_quietly(settings: Settings | None = None, kinds: Iterable[str] | None = None) -> None:
    """At an event (a pause, a failed fetch): check those kinds now; log, never raise."""
    try:
        settings = settings or get_settings()
        if settings.alert_webhook_url:
            check(settings, kinds=kinds)
    except Exception:
        log.exception("alert check failed (the beat's next check tries again)")
