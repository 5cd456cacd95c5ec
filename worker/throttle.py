"""Sliding-window request limits for the public pages (e.g. subscribe requests).

One tiny interface, two implementations chosen by settings: a per-process window in
memory when there is no broker, and a window shared through Redis when the broker is
Redis (so every gunicorn worker on every machine counts together).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Protocol

from worker.config import Settings
from worker.redact import redact_url

HOUR = 3600.0


class ThrottleUnavailable(Exception):
    """The shared store behind the throttle cannot be reached; the request cannot be
    counted, so it is neither allowed nor refused (the page answers 503, try later)."""


class Throttle(Protocol):
    def hit(self, key: str) -> float:
        """Count one request for ``key``: 0.0 when allowed, else the seconds to wait.

        A refused request is not counted, so a blocked client does not extend its own ban.
        """
        ...


class MemoryWindow:
    """At most ``limit`` hits per ``window`` seconds per key, in this process."""

    def __init__(
        self, limit: int, window: float = HOUR, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str) -> float:
        with self._lock:
            now = self._clock()
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            if len(hits) >= self.limit:
                return max(0.001, hits[0] + self.window - now)
            hits.append(now)
            if len(self._hits) > 100_000:  # bound memory under a flood of distinct keys
                self._prune(now)
            return 0.0

    def _prune(self, now: float) -> None:
        for key in [k for k, v in self._hits.items() if not v or v[-1] <= now - self.window]:
            del self._hits[key]


# KEYS[1]: the key's sorted set. ARGV: limit, window (ms), member. Server time, so every
# machine agrees. Returns 0 when counted, else the milliseconds until a slot frees up.
_LUA_HIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
return 0
"""


class RedisWindow:
    """The same window, shared by every process through Redis."""

    def __init__(self, url: str, limit: int, window: float = HOUR, name: str = "web") -> None:
        import redis

        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        # Short timeouts: a sign-up page must answer "try later" fast, not hang.
        self._client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=2)
        self._script = self._client.register_script(_LUA_HIT)
        self._prefix = f"papermail:throttle:{name}:"
        self._where = redact_url(url)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

    def hit(self, key: str) -> float:
        try:
            wait_ms = int(
                self._script(
                    keys=[self._prefix + key],
                    args=[self.limit, int(self.window * 1000), uuid.uuid4().hex],
                )
            )
        except self._errors as exc:
            raise ThrottleUnavailable(
                f"the request limit store at {self._where} is unreachable: {redact_url(str(exc))}"
            ) from None
        return wait_ms / 1000.0


def make_throttle(
    settings: Settings, limit: int, window: float = HOUR, name: str = "web"
) -> Throttle:
    url = settings.broker_url
    if url and url.startswith(("redis://", "rediss://", "unix://")):
        return RedisWindow(url, limit, window, name)
    return MemoryWindow(limit, window)
