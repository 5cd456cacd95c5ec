"""The Redis bucket's local batches of tokens at high rates (one Redis call per batch)."""

from __future__ import annotations

import time

import pytest
import redis

from worker.ratelimit import RedisBucket

# 1000/s with a one-second burst: batches of 20 tokens, held for at most 0.25 s.
RATE, BURST, BATCH = 1000.0, 1000, 20


def _state(url: str, name: str) -> tuple[float, str]:
    tokens, stamp = redis.Redis.from_url(url).hmget(
        f"papermail:ratelimit:{name}", "tokens", "stamp"
    )
    return float(tokens), stamp.decode()


def test_high_rate_takes_a_batch_per_round_trip(redis_url: str) -> None:
    bucket = RedisBucket(redis_url, RATE, BURST, name="batch")
    assert bucket.try_acquire()
    tokens, stamp = _state(redis_url, "batch")
    assert tokens == BURST - BATCH  # one call took the whole batch
    for _ in range(BATCH - 1):
        assert bucket.try_acquire()
    assert _state(redis_url, "batch") == (tokens, stamp)  # spent locally, no Redis call
    assert bucket.try_acquire()
    assert _state(redis_url, "batch")[1] != stamp  # the batch was used up: a new call


def test_no_batch_once_the_bucket_is_half_empty(redis_url: str) -> None:
    bucket = RedisBucket(redis_url, RATE, BURST, name="half")
    assert bucket.acquire(BURST - 100) == 0.0  # 100 left: the bucket is what limits now
    stamps = set()
    for _ in range(5):
        assert bucket.try_acquire()
        tokens, stamp = _state(redis_url, "half")
        stamps.add(stamp)
        assert tokens < BURST / 2
    assert len(stamps) == 5  # every token was its own call: nothing held locally


def test_held_tokens_expire(redis_url: str) -> None:
    bucket = RedisBucket(redis_url, RATE, BURST, name="expire")
    assert bucket.try_acquire()
    stamp = _state(redis_url, "expire")[1]
    time.sleep(0.3)  # longer than a batch may be held (burst / 4 / rate)
    assert bucket.try_acquire()
    assert _state(redis_url, "expire")[1] != stamp


def test_slow_down_drops_held_tokens(redis_url: str) -> None:
    bucket = RedisBucket(redis_url, RATE, BURST, name="slow")
    assert bucket.try_acquire()
    bucket.slow_down(0.5, seconds=5)
    stamp = _state(redis_url, "slow")[1]
    assert bucket.try_acquire()
    assert _state(redis_url, "slow")[1] != stamp
    assert bucket.rate == pytest.approx(RATE / 2)


def test_ordinary_rates_take_one_token_per_call(redis_url: str) -> None:
    bucket = RedisBucket(redis_url, 40.0, 40, name="single")
    stamps = set()
    for _ in range(5):
        assert bucket.try_acquire()
        stamps.add(_state(redis_url, "single")[1])
    assert len(stamps) == 5
    # Five tokens taken; what refilled meanwhile depends on how fast this machine ran the
    # calls, so allow exactly that (the stamps are the server's microseconds).
    elapsed = (max(map(float, stamps)) - min(map(float, stamps))) / 1e6
    tokens = _state(redis_url, "single")[0]
    assert 35 - 0.01 <= tokens <= 35 + 40.0 * elapsed + 0.01
