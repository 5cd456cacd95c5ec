"""The mail provider's own limits: the send rate the limiter follows, the 24-hour quota.

With ``MAILER=ses`` and ``SEND_RATE`` unset, the shared limiter sends at the account's
maximum send rate (sesv2 ``GetAccount``). Asking SES on every batch would cost a request
per batch; instead the answer is kept in Redis with a TTL of ``ACCOUNT_REFRESH_SECONDS``,
so all workers share one value and SES is asked about once per interval for the whole
deployment, and each process re-reads Redis at most every ``LOCAL_SECONDS``. Without Redis
the process keeps the value itself for the interval. When SES cannot be asked the last
value known stays in force (or ``SEND_RATE``'s default before any answer), and it is
asked again a minute later.

Once an edition is queued, :func:`check_quota` compares the emails planned with what the
24-hour quota still allows and warns (log line and :func:`on_quota_shortfall`) when the
edition would pass it. It reads :class:`AccountCache`: the provider's answer shared in
Redis for ``CACHE_SECONDS``, and a failure to answer for ``FAILURE_SECONDS`` too, so a
provider that is away (or an endpoint without the call) is asked once a minute for the
whole deployment, each time with one short attempt, never once per planning tick.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

from worker.config import Settings
from worker.redact import redact_url

log = logging.getLogger(__name__)

RATE_KEY = "papermail:account:max-send-rate"
# How long a process trusts its copy of the shared value before reading Redis again.
LOCAL_SECONDS = 30.0
# After a failed GetAccount: ask again this soon, whatever the refresh interval.
RETRY_SECONDS = 60.0
INFO_KEY = "papermail:account:info"
# How long an answer of the provider (the quota, the rate) is shared; the 24-hour quota's
# "sent" moves with every edition, so not for longer.
CACHE_SECONDS = 60.0
# How long a failure to answer is shared: nobody asks again before it expires.
FAILURE_SECONDS = 60.0


class AccountRate:
    """The account's max send rate, for the limiter: cheap to read, refreshed periodically.

    ``fetch`` asks the provider (returns emails per second, or None when it reports no
    rate) and may raise; ``redis`` is a client for the shared copy, or None.
    """

    def __init__(
        self,
        fetch: Callable[[], float | None],
        *,
        fallback: float,
        refresh_seconds: float,
        redis: Any | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._fallback = fallback
        self._refresh = refresh_seconds
        self._redis = redis
        self._clock = clock
        self._value: float | None = None
        self._next_check = 0.0
        self._lock = threading.Lock()
        self.source = f"PAPERMAIL_SEND_RATE's default ({fallback:g}/s) until SES answers"
        self.fetches = 0  # GetAccount calls made by this process (tests, health)

    def get(self) -> float:
        """Emails per second now; one float comparison unless a refresh is due."""
        value = self._value
        if value is not None and self._clock() < self._next_check:
            return value
        with self._lock:
            now = self._clock()
            if self._value is not None and now < self._next_check:
                return self._value
            return self._refresh_now(now)

    def _refresh_now(self, now: float) -> float:
        shared = self._read_shared()
        if shared is not None:
            self._set(shared, "the account's max send rate (shared copy)", now, LOCAL_SECONDS)
            return shared
        try:
            self.fetches += 1
            fetched = self._fetch()
        except Exception as exc:  # any failure: keep sending at the last known rate
            fetched = None
            log.warning(
                "could not ask SES for the account's max send rate (%s); sending at %g/s",
                redact_url(str(exc)),
                self._value or self._fallback,
            )
        if fetched is None or fetched <= 0:
            value = self._value or self._fallback
            self._value, self._next_check = value, now + min(RETRY_SECONDS, self._refresh)
            return value
        self._write_shared(fetched)
        step = LOCAL_SECONDS if self._redis is not None else self._refresh
        if self._value != fetched:
            log.info("send rate: the account's max send rate, %g/s", fetched)
        self._set(fetched, "the account's max send rate (GetAccount)", now, step)
        return fetched

    def _set(self, value: float, source: str, now: float, step: float) -> None:
        self._value, self.source = value, source
        self._next_check = now + min(step, self._refresh)

    def _read_shared(self) -> float | None:
        if self._redis is None:
            return None
        try:
            raw = self._redis.get(RATE_KEY)
            return float(raw) if raw else None
        except Exception as exc:  # Redis away or a bad value: ask the provider instead
            log.warning("send rate: cannot read the shared account rate (%s)", exc)
            return None

    def _write_shared(self, value: float) -> None:
        if self._redis is None:
            return
        try:
            self._redis.set(RATE_KEY, repr(value), ex=int(self._refresh))
        except Exception as exc:
            log.warning("send rate: cannot share the account rate (%s)", exc)


class AccountUnavailable(Exception):
    """The provider could not be asked (now, or within ``FAILURE_SECONDS`` before)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AccountCache:
    """The provider's :class:`AccountInfo`, shared by every process through Redis.

    ``fetch`` asks the provider (``Mailer.account()``) and may raise; its answer is kept for
    ``ttl`` seconds, a failure for ``failure_ttl`` (the negative cache: raised again as
    :class:`AccountUnavailable` without asking). Each process also keeps its copy until it
    expires, at most ``LOCAL_SECONDS`` when shared. Redis away: the process's own copy only.
    """

    def __init__(
        self,
        fetch: Callable[[], Any],
        *,
        ttl: float = CACHE_SECONDS,
        failure_ttl: float = FAILURE_SECONDS,
        redis: Any | None = None,
        key: str = INFO_KEY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._key = key
        self._ttl, self._failure_ttl = ttl, failure_ttl
        self._redis = redis
        self._clock = clock
        self._entry: dict[str, Any] | None = None  # {"info": {...}} or {"error": reason}
        self._until = 0.0
        self._lock = threading.Lock()
        self.fetches = 0  # provider calls made by this process (tests)

    def get(self) -> Any:
        """The AccountInfo; raises AccountUnavailable when the provider cannot be asked."""
        with self._lock:
            now = self._clock()
            if self._entry is None or now >= self._until:
                self._entry, life = self._shared() or self._ask()
                self._until = now + (min(life, LOCAL_SECONDS) if self._redis else life)
            entry = self._entry
        if "error" in entry:
            raise AccountUnavailable(str(entry["error"]))
        return _info_from(entry["info"])

    def _ask(self) -> tuple[dict[str, Any], float]:
        self.fetches += 1
        try:
            entry: dict[str, Any] = {"info": asdict(self._fetch())}
            life = self._ttl
        except Exception as exc:  # remembered, so nobody asks again for a while
            reason = redact_url(str(getattr(exc, "reason", None) or exc))
            entry, life = {"error": reason}, self._failure_ttl
            log.warning(
                "could not ask the mail provider about the account (%s); not asked again for %g s",
                reason,
                life,
            )
        if self._redis is not None:
            try:
                self._redis.set(self._key, json.dumps(entry), px=max(1, int(life * 1000)))
            except Exception as exc:
                log.warning("account: cannot share the provider's answer (%s)", exc)
        return entry, life

    def _shared(self) -> tuple[dict[str, Any], float] | None:
        if self._redis is None:
            return None
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(self._key)
            pipe.pttl(self._key)
            raw, pttl = pipe.execute()
            if not raw or not isinstance(pttl, int) or pttl <= 0:
                return None
            entry = json.loads(raw)
            if not isinstance(entry, dict) or not ({"info", "error"} & entry.keys()):
                return None
            return entry, pttl / 1000
        except Exception as exc:  # Redis away or a bad value: ask the provider instead
            log.warning("account: cannot read the shared answer (%s)", exc)
            return None


def _info_from(fields: dict[str, Any]) -> Any:
    from worker.mailers.base import AccountInfo

    return AccountInfo(
        **{
            **fields,
            "details": dict(fields.get("details") or {}),
            "problems": tuple(fields.get("problems") or ()),
            "warnings": tuple(fields.get("warnings") or ()),
        }
    )


_cache: AccountCache | None = None
_cache_key: tuple[object, ...] | None = None
_cache_lock = threading.Lock()


def account_cache(settings: Settings) -> AccountCache:
    """This process's AccountCache of the configured mailer (shared in Redis when the
    broker is Redis); rebuilt when the settings it depends on change (tests)."""
    global _cache, _cache_key
    key = (settings.mailer, settings.ses_endpoint_url, settings.ses_region, settings.broker_url)
    with _cache_lock:
        if _cache is None or key != _cache_key:
            from worker.mailers.base import get_mailer

            redis = None
            url = settings.broker_url or ""
            if url.startswith(("redis://", "rediss://", "unix://")):
                import redis as redis_lib

                # Short timeouts: a Redis that is away must not hold up planning either.
                redis = redis_lib.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
            # One answer per account: another region or endpoint is another account.
            where = hashlib.sha256(repr(key[:3]).encode()).hexdigest()[:16]
            _cache = AccountCache(
                lambda: get_mailer(settings).account(), redis=redis, key=f"{INFO_KEY}:{where}"
            )
            _cache_key = key
        return _cache


def reset_account_cache() -> None:
    """Forget this process's copy (tests; the shared one expires by itself)."""
    global _cache, _cache_key
    with _cache_lock:
        _cache, _cache_key = None, None


def account_rate(settings: Settings, redis: Any | None = None) -> AccountRate:
    """The AccountRate of the configured mailer (its ``account()``)."""

    def fetch() -> float | None:  # the answer the quota check shares, at most a minute old
        return account_cache(settings).get().max_send_rate

    return AccountRate(
        fetch,
        fallback=settings.send_rate,
        refresh_seconds=settings.account_refresh_seconds,
        redis=redis,
    )


# ---------------------------------------------------------------------------------------
# The 24-hour quota, before an edition goes out


@dataclass(frozen=True)
class QuotaShortfall:
    edition_date: date
    planned: int  # emails about to go out
    remaining: float  # what the 24-hour quota still allows
    max_24h_send: float
    sent_last_24h: float

    @property
    def message(self) -> str:
        return (
            f"edition {self.edition_date}: {self.planned:,} emails planned but the SES 24-hour "
            f"quota allows {self.remaining:,.0f} more ({self.sent_last_24h:,.0f} of "
            f"{self.max_24h_send:,.0f} sent in the last 24 hours); the rest will be refused "
            "with 'daily message quota exceeded' and sending pauses. Ask AWS for a higher "
            "quota, or let the edition finish tomorrow: `papermail stats`, then "
            "`papermail sending resume` once the quota allows"
        )


_hooks: list[Callable[[QuotaShortfall], None]] = []


def _alert(shortfall: QuotaShortfall, settings: Settings) -> None:
    """One alert per edition (PAPERMAIL_ALERT_WEBHOOK_URL), de-duplicated like the others."""
    if not settings.alert_webhook_url:
        return
    from worker import alerts

    finding = alerts.Finding(
        "quota", f"quota:{shortfall.edition_date}", shortfall.message, shortfall.edition_date
    )
    try:
        alerts.notify([finding], settings)
    except Exception:  # the alerts table unreachable: the warning above was logged
        log.exception("could not post the quota alert of edition %s", shortfall.edition_date)


def on_quota_shortfall(hook: Callable[[QuotaShortfall], None]) -> Callable[[QuotaShortfall], None]:
    """Register ``hook`` to be called with every :class:`QuotaShortfall` (e.g. an alert)."""
    _hooks.append(hook)
    return hook


def check_quota(
    edition_date: date, planned: int, settings: Settings, mailer: Any | None = None
) -> QuotaShortfall | None:
    """Warn when ``planned`` emails would pass what the 24-hour quota still allows.

    Reads the shared :class:`AccountCache` (``mailer`` given: asks it directly), only when
    something is planned and the mailer reports a quota (SES); never raises: a provider
    that cannot be asked is logged when it is asked, and sending goes on. Callers queue
    the edition first, so even the one short attempt a minute never delays it.
    """
    from worker.mailers.base import mailer_class

    if planned <= 0 or not (mailer or mailer_class(settings)).reports_quota:
        return None
    try:
        info = mailer.account() if mailer is not None else account_cache(settings).get()
    except AccountUnavailable as exc:  # the failure itself is logged once, when it happens
        log.info("edition %s: 24-hour quota unknown (%s)", edition_date, exc.reason)
        return None
    except Exception as exc:
        log.warning(
            "edition %s: could not ask the mail provider for its 24-hour quota (%s)",
            edition_date,
            redact_url(str(exc)),
        )
        return None
    remaining = info.remaining_24h
    if remaining is None or planned <= remaining:
        return None
    shortfall = QuotaShortfall(
        edition_date,
        planned,
        remaining,
        float(info.max_24h_send or 0),
        float(info.sent_last_24h or 0),
    )
    log.warning("%s", shortfall.message)
    _alert(shortfall, settings)
    for hook in list(_hooks):
        try:
            hook(shortfall)
        except Exception:  # a broken hook must not stop the edition
            log.exception("quota shortfall hook %r failed", hook)
    return shortfall
