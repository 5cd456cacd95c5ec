"""One conformance suite for both token buckets, and the Redis bucket across processes."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable

import pytest

from worker.ratelimit import LocalBucket, RateLimiter, RedisBucket, make_limiter

RATE = 50.0
BURST = 5

Factory = Callable[[float, int], RateLimiter]


@pytest.fixture(params=["local", "redis"])
def make_bucket(request: pytest.FixtureRequest) -> Factory:
    if request.param == "local":
        return lambda rate, burst: LocalBucket(rate, burst)
    url = request.getfixturevalue("redis_url")
    return lambda rate, burst: RedisBucket(url, rate, burst, name="conformance")


def timed(bucket: RateLimiter, n: int) -> float:
    start = time.monotonic()
    for _ in range(n):
        bucket.acquire()
    return time.monotonic() - start


def test_burst_is_free_then_tokens_wait(make_bucket: Factory) -> None:
    bucket = make_bucket(RATE, BURST)
    start = time.monotonic()
    waits = [bucket.acquire() for _ in range(BURST)]
    assert waits == [0.0] * BURST
    # The bucket is empty now: the next token exists 1/rate after it was full. However
    # slow the machine (time passing between the calls refills it), the six tokens took
    # at least that long, and the wait was never more than about one token's time.
    waited = bucket.acquire()
    total = time.monotonic() - start
    assert total >= 0.9 / RATE
    assert 0.0 <= waited < 5 / RATE


def test_sustained_rate(make_bucket: Factory) -> None:
    bucket = make_bucket(RATE, BURST)
    timed(bucket, BURST)  # drain the burst
    n = 50
    elapsed = timed(bucket, n)
    assert elapsed == pytest.approx(n / RATE, rel=0.1)


def test_idle_time_refills_no_more_than_the_burst(make_bucket: Factory) -> None:
    bucket = make_bucket(RATE, BURST)
    timed(bucket, BURST)
    time.sleep(0.5)  # 25 tokens' worth of time, but the bucket holds only BURST
    # Counted, not timed: the free tokens are the BURST plus what refilled while taking
    # them (a loaded machine is slow between calls), never the 25 of the idle time.
    start, free = time.monotonic(), 0
    while free < 100 and bucket.acquire() == 0.0:
        free += 1
    elapsed = time.monotonic() - start
    assert BURST <= free <= BURST + elapsed * RATE + 1


def test_slow_down_lowers_the_rate_for_a_while(make_bucket: Factory) -> None:
    bucket = make_bucket(RATE, BURST)
    assert bucket.rate == pytest.approx(RATE)
    timed(bucket, BURST)
    bucket.slow_down(0.5, seconds=1.5)
    assert bucket.rate == pytest.approx(RATE / 2)
    elapsed = timed(bucket, 20)
    assert elapsed == pytest.approx(20 / (RATE / 2), rel=0.12)
    # Repeated throttling compounds, with a floor of 5% of the configured rate.
    for _ in range(10):
        bucket.slow_down(0.5, seconds=1.5)
    assert bucket.rate == pytest.approx(RATE * 0.05)
    time.sleep(1.6)
    assert bucket.rate == pytest.approx(RATE)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1.0, 1), (1.0, 0)])
def test_bad_parameters_are_refused(make_bucket: Factory, rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="rate must be > 0"):
        make_bucket(rate, burst)


def test_two_redis_buckets_share_their_tokens(redis_url: str) -> None:
    # One token a second: the next one comes a second after a's burst, however slow the
    # machine is between the calls (at RATE a loaded machine refilled it in time).
    a = RedisBucket(redis_url, 1.0, BURST, name="shared")
    b = RedisBucket(redis_url, 1.0, BURST, name="shared")
    timed(a, BURST)
    assert not b.try_acquire()  # a spent the burst for both
    a.slow_down(0.5, seconds=5)
    assert b.rate == pytest.approx(0.5)


def test_make_limiter_follows_the_broker(redis_url: str, settings: object) -> None:
    from worker.config import load_settings

    assert isinstance(make_limiter(load_settings()), LocalBucket)
    assert isinstance(make_limiter(load_settings(broker_url=redis_url)), RedisBucket)


def _hammer(url: str, rate: float, burst: int, ready: object, go: object, window: object) -> None:
    bucket = RedisBucket(url, rate, burst, name="multi")
    ready.put(True)  # type: ignore[attr-defined]
    go.wait(60)  # type: ignore[attr-defined]
    start_at, stop_at = window[0], window[1]  # type: ignore[index]
    stamps = []
    while time.time() < start_at:
        time.sleep(0.001)
    while True:
        bucket.acquire()
        now = time.time()
        if now >= stop_at:
            break
        stamps.append(now)
    ready.put(stamps)  # type: ignore[attr-defined]


@pytest.mark.slow
def test_redis_bucket_keeps_the_total_rate_across_processes(redis_url: str) -> None:
    rate, burst, procs = 40.0, 4, 4
    ctx = mp.get_context("spawn")
    queue, go, window = ctx.Queue(), ctx.Event(), ctx.Array("d", 2)
    workers = [
        ctx.Process(target=_hammer, args=(redis_url, rate, burst, queue, go, window))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    # Start the clock only once every process is up: a loaded machine may take seconds
    # to spawn them, which must not eat the measured window.
    for _ in workers:
        assert queue.get(timeout=60) is True
    start_at = time.time() + 0.2
    stop_at = start_at + 3.0
    window[0], window[1] = start_at, stop_at
    go.set()
    results = [queue.get(timeout=30) for _ in workers]
    for w in workers:
        w.join(timeout=10)
        assert w.exitcode == 0
    stamps = sorted(t for r in results for t in r)
    assert all(results), "every process got tokens"
    # Steady state: skip the first half second (the initial burst), count the rest.
    window = [t for t in stamps if t >= start_at + 0.5]
    achieved = len(window) / (stop_at - (start_at + 0.5))
    assert achieved == pytest.approx(rate, rel=0.05)
    # One process alone would have run at the full rate: the bucket is what shares it.
    assert len(stamps) <= burst + rate * 3.0 + 2
