"""One send-rate limit for every worker: a token bucket in Redis, or in-process.

The Redis bucket is a single Lua script, so refill-and-take is atomic across every
worker process on every machine. Celery's ``rate_limit`` is per worker and would
multiply the provider's rate by the number of workers; this is not that.

Throttling from the provider calls :meth:`slow_down`, which lowers the shared rate for
a while (all workers see it) before it recovers on its own.

At high rates a Redis round trip per email costs more than the email's own SQL, so the
Redis bucket hands out single tokens from a small batch it took at once, but only while
the shared bucket is more than half full (it is not what limits sending then), and only
for a short while: every token spent was taken from the shared bucket, so the sustained
rate holds exactly, and tokens held locally add at most a quarter of the burst to it.

Redis going away: ``try_acquire`` answers "not now" (the chunk records what it sent, then
waits in ``acquire``), ``acquire`` rides out an outage of up to ``OUTAGE_SECONDS`` and then
raises ``redis.ConnectionError`` (the task hands its unclaimed rows back; nothing is marked
failed), and ``slow_down`` is advisory: it never turns a provider's "not sent" into an error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from worker.config import Settings, get_settings

log = logging.getLogger(__name__)

# How long acquire() waits for an unreachable Redis before giving up on the chunk.
OUTAGE_SECONDS = 10.0


class RateLimiter(Protocol):
    def acquire(self, tokens: int = 1) -> float:
        """Block until ``tokens`` may be spent; return the seconds waited."""
        ...

    def try_acquire(self, tokens: int = 1) -> bool:
        """Take ``tokens`` if available now, without waiting."""
        ...

    def slow_down(self, factor: float = 0.5, seconds: float = 60.0) -> None:
        """Multiply the rate by ``factor`` for ``seconds`` (provider throttling)."""
        ...

    @property
    def rate(self) -> float: ...


class _Bucket:
    """Waiting on top of a subclass's ``_take`` (seconds until the tokens exist, 0 = taken)."""

    def _take(self, tokens: int) -> float:
        raise NotImplementedError

    def try_acquire(self, tokens: int = 1) -> bool:
        return self._take(tokens) <= 0

    def acquire(self, tokens: int = 1) -> float:
        waited = 0.0
        while True:
            wait = self._take(tokens)
            if wait <= 0:
                return waited
            time.sleep(wait)
            waited += wait


class LocalBucket(_Bucket):
    """Thread-safe token bucket for one process (no broker configured)."""

    def __init__(self, rate: float, burst: int, rate_source: RateSource | None = None) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        if rate_source is not None:  # starts full at the rate it follows
            rate = rate_source.rate()
            burst = rate_source.burst(rate)
        self._base_rate = rate
        self._burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._slow_until = 0.0
        self._factor = 1.0
        self._lock = threading.Lock()
        self._source = rate_source

    @property
    def base_rate(self) -> float:
        """The rate before any slow-down: SEND_RATE, or the account's."""
        return self._base_rate

    def _follow(self, rate: float) -> None:
        if self._source is not None and rate != self._base_rate:
            with self._lock:
                self._base_rate = rate
                self._burst = self._source.burst(rate)
                self._tokens = min(self._tokens, float(self._burst))

    @property
    def rate(self) -> float:
        if time.monotonic() < self._slow_until:
            return self._base_rate * self._factor
        return self._base_rate

    def _take(self, tokens: int) -> float:
        """Take tokens if available; else the seconds until they will be."""
        if self._source is not None:
            self._follow(self._source.rate())
        with self._lock:
            now = time.monotonic()
            rate = self.rate
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * rate)
            self._stamp = now
            if self._tokens >= tokens:
                self._tokens -= tokens
                return 0.0
            return (tokens - self._tokens) / rate

    def slow_down(self, factor: float = 0.5, seconds: float = 60.0) -> None:
        with self._lock:
            # Repeated throttling compounds; the rate never drops below 5%.
            current = self._factor if time.monotonic() < self._slow_until else 1.0
            self._factor = max(0.05, min(1.0, factor * current))
            self._slow_until = time.monotonic() + seconds


# KEYS[1] bucket hash, KEYS[2] slow-down factor key.
# ARGV: rate, burst, requested tokens, batch (take up to this many, only as long as the
# bucket stays at least half full). Time comes from the Redis server (TIME), so clocks of
# different worker machines never disagree. Returns {wait in microseconds (0 = taken),
# tokens taken}.
_LUA_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local batch = tonumber(ARGV[4] or ARGV[3])
local factor = tonumber(redis.call('GET', KEYS[2]) or '1')
rate = rate * factor
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil then tokens = burst; stamp = now end
local elapsed = math.max(0, now - stamp)
tokens = math.min(burst, tokens + elapsed * rate / 1000000)
local wait = 0
local taken = 0
if tokens >= want then
  taken = want
  if batch > want then
    local spare = math.floor(tokens - burst / 2)
    if spare > taken then taken = math.min(batch, spare) end
  end
  tokens = tokens - taken
else
  wait = math.ceil((want - tokens) * 1000000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(1000 * burst / rate) + 60000)
return {wait, taken}
"""


class RedisBucket(_Bucket):
    """Token bucket shared through Redis by every worker process on every machine."""

    def __init__(
        self,
        url: str,
        rate: float,
        burst: int,
        name: str = "send",
        outage_seconds: float = OUTAGE_SECONDS,
        rate_source: RateSource | None = None,
        client: Any | None = None,
    ) -> None:
        import redis
        from redis.exceptions import ConnectionError, TimeoutError

        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self._client = client or redis.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=5
        )
        self._script = self._client.register_script(_LUA_TAKE)
        self._key = f"papermail:ratelimit:{name}"
        self._slow_key = f"papermail:ratelimit:{name}:factor"
        self._held = 0
        self._held_until = 0.0
        self._lock = threading.Lock()
        self._outage = outage_seconds
        self._unreachable: tuple[type[Exception], ...] = (ConnectionError, TimeoutError)
        self._source = rate_source
        self._tune(rate, burst)
        if rate_source is not None:
            self._follow(rate_source.rate())

    def _tune(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = burst
        # Batch of single tokens per round trip: 1 at ordinary rates (below 100/s).
        self._batch = max(1, min(burst // 4, int(rate // 50), 64))
        # Held tokens expire: together they never add more than burst / 4 to a burst.
        self._hold = burst / (4 * rate)

    def _follow(self, rate: float) -> None:
        if self._source is not None and rate != self._rate:
            with self._lock:
                self._held = 0  # taken at the old rate
                self._tune(rate, self._source.burst(rate))

    @property
    def base_rate(self) -> float:
        """The rate before any slow-down: SEND_RATE, or the account's."""
        return self._rate

    @property
    def rate(self) -> float:
        factor = self._client.get(self._slow_key)
        return self._rate * (float(factor) if factor else 1.0)

    def try_acquire(self, tokens: int = 1) -> bool:
        try:
            return self._take(tokens) <= 0
        except self._unreachable:
            return False  # "not now": the caller records its work, then waits in acquire()

    def acquire(self, tokens: int = 1) -> float:
        waited = 0.0
        down_since: float | None = None
        pause = 0.1
        while True:
            try:
                wait = self._take(tokens)
                down_since = None
            except self._unreachable as exc:
                now = time.monotonic()
                down_since = down_since if down_since is not None else now
                if now - down_since >= self._outage:
                    raise
                if pause == 0.1:
                    log.warning("rate limiter: Redis unreachable (%s); waiting for it", exc)
                wait, pause = pause, min(pause * 2, 2.0)
            if wait <= 0:
                return waited
            time.sleep(wait)
            waited += wait

    def _take(self, tokens: int) -> float:
        """Take tokens (from the local batch when possible); else the seconds to wait."""
        if self._source is not None:
            self._follow(self._source.rate())  # a float compare unless a refresh is due
        now = time.monotonic()
        if tokens == 1 and self._held:
            with self._lock:
                if self._held and now < self._held_until:
                    self._held -= 1
                    return 0.0
                self._held = 0
        batch = self._batch if tokens == 1 else tokens
        wait_us, taken = self._script(
            keys=[self._key, self._slow_key], args=[self._rate, self._burst, tokens, batch]
        )
        if int(wait_us) > 0:
            return int(wait_us) / 1_000_000
        if int(taken) > tokens:
            with self._lock:
                self._held = int(taken) - tokens
                self._held_until = now + self._hold
        return 0.0

    def slow_down(self, factor: float = 0.5, seconds: float = 60.0) -> None:
        self._held = 0  # throttled: nothing taken at the old rate is spent any more
        try:
            current = self._client.get(self._slow_key)
            new = max(0.05, min(1.0, factor * (float(current) if current else 1.0)))
            self._client.set(self._slow_key, str(new), px=int(seconds * 1000))
        except self._unreachable as exc:
            # Advisory: the throttled email is recorded as a retry either way.
            log.warning("rate limiter: could not slow down (%s)", exc)


_limiter: RateLimiter | None = None
_limiter_lock = threading.Lock()


class RateSource:
    """Where a bucket takes its rate when it follows the SES account (SEND_RATE unset)."""

    def __init__(self, rate: Callable[[], float], settings: Settings) -> None:
        self.rate = rate
        self._settings = settings

    def burst(self, rate: float) -> int:
        return self._settings.burst_at(rate)


def _is_redis(url: str | None) -> bool:
    return bool(url) and str(url).startswith(("redis://", "rediss://", "unix://"))


def make_limiter(settings: Settings) -> RateLimiter:
    redis_url = settings.broker_url if _is_redis(settings.broker_url) else None
    source = None
    client = None
    if settings.rate_from_account:
        from worker.account import account_rate

        if redis_url:
            import redis

            client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        source = RateSource(account_rate(settings, client).get, settings)
    if redis_url:
        return RedisBucket(
            redis_url, settings.send_rate, settings.burst, rate_source=source, client=client
        )
    return LocalBucket(settings.send_rate, settings.burst, rate_source=source)


def get_limiter(settings: Settings | None = None) -> RateLimiter:
    """The process-wide limiter chosen by settings."""
    global _limiter
    with _limiter_lock:
        if _limiter is None:
            _limiter = make_limiter(settings or get_settings())
        return _limiter


def reset_limiter() -> None:
    global _limiter
    with _limiter_lock:
        _limiter = None
