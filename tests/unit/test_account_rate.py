"""The limiter following the SES account's max send rate: one shared value (real Redis, TTL),
a local fallback, and no provider call on the per-batch path."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from worker import account, config
from worker.ratelimit import LocalBucket, RateSource, RedisBucket, make_limiter


class Provider:
    """What ``AccountInfo.max_send_rate`` answers, call by call (the fetch is injected)."""

    def __init__(self, *answers: float | Exception | None) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> float | None:
        self.calls += 1
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_local_value_is_kept_for_the_refresh_interval() -> None:
    provider, clock = Provider(40.0, 80.0), Clock()
    rate = account.AccountRate(provider, fallback=14.0, refresh_seconds=600, clock=clock)
    assert [rate.get() for _ in range(1000)] == [40.0] * 1000
    assert provider.calls == 1
    clock.now += 599
    assert rate.get() == 40.0 and provider.calls == 1
    clock.now += 2
    assert rate.get() == 80.0 and provider.calls == 2


def test_failure_keeps_the_last_value_and_retries_soon(caplog: pytest.LogCaptureFixture) -> None:
    provider, clock = Provider(None, RuntimeError("SES down"), 25.0), Clock()
    rate = account.AccountRate(provider, fallback=14.0, refresh_seconds=3600, clock=clock)
    assert rate.get() == 14.0  # no rate reported: SEND_RATE's default
    clock.now += account.RETRY_SECONDS + 1
    with caplog.at_level(logging.WARNING, logger="worker.account"):
        assert rate.get() == 14.0
    assert "could not ask SES for the account's max send rate (SES down)" in caplog.text
    clock.now += account.RETRY_SECONDS - 1
    assert rate.get() == 14.0 and provider.calls == 2  # not asked again yet
    clock.now += 2
    assert rate.get() == 25.0 and provider.calls == 3


def test_workers_share_one_value_through_redis(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    first, second = Provider(33.0), Provider(99.0)
    clock = Clock()
    a = account.AccountRate(first, fallback=14, refresh_seconds=600, redis=client, clock=clock)
    b = account.AccountRate(second, fallback=14, refresh_seconds=600, redis=client, clock=clock)
    assert a.get() == 33.0
    assert b.get() == 33.0  # read from Redis: the second worker never asked SES
    assert (first.calls, second.calls) == (1, 0)
    assert 590 <= client.ttl(account.RATE_KEY) <= 600
    # The shared value expires with its TTL; whoever looks next asks SES again.
    client.delete(account.RATE_KEY)
    clock.now += account.LOCAL_SECONDS + 1
    assert b.get() == 99.0 and second.calls == 1
    assert float(client.get(account.RATE_KEY) or 0) == 99.0


def test_unreachable_redis_falls_back_to_asking() -> None:
    import redis

    client = redis.Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.5)
    provider = Provider(21.0)
    rate = account.AccountRate(provider, fallback=14, refresh_seconds=600, redis=client)
    assert rate.get() == 21.0 and provider.calls == 1


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_buckets_follow_the_source(kind: str, request: pytest.FixtureRequest) -> None:
    settings = config.load_settings()
    value = {"rate": 200.0}
    source = RateSource(lambda: value["rate"], settings)
    if kind == "local":
        bucket: LocalBucket | RedisBucket = LocalBucket(14.0, 14, rate_source=source)
    else:
        bucket = RedisBucket(request.getfixturevalue("redis_url"), 14.0, 14, rate_source=source)
    assert bucket.base_rate == 200.0
    assert bucket.try_acquire(200)  # the burst is one second at the account's rate
    assert not bucket.try_acquire(200)
    value["rate"] = 5.0
    bucket.try_acquire(1)  # the next take follows the new rate
    assert bucket.base_rate == 5.0
    assert bucket.rate == 5.0


def test_make_limiter_follows_the_account_only_when_send_rate_is_unset(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ses = {
        "mailer": "ses",
        "secret_key": "k" * 40,
        "base_url": "https://papermail.example.org",
        "postal_address": "Example Lab, 1 Main St, Springfield, USA",
        "ses_endpoint_url": "http://127.0.0.1:9",
        "aws_access_key_id": "AKIATEST",
        "aws_secret_access_key": "secret",
    }
    following = config.load_settings(**ses)
    assert following.rate_from_account
    with caplog.at_level(logging.WARNING, logger="worker.account"):
        limiter = make_limiter(following)
    # Nobody answers at that endpoint: the default rate, and the reason in the log.
    assert isinstance(limiter, LocalBucket) and limiter.base_rate == 14.0
    assert "could not ask SES for the account's max send rate" in caplog.text
    fixed = config.load_settings(**ses, send_rate=50)
    assert not fixed.rate_from_account
    assert make_limiter(fixed).base_rate == 50.0  # type: ignore[attr-defined]
    monkeypatch.setenv("PAPERMAIL_SEND_RATE", "7")
    assert not config.load_settings(**ses).rate_from_account
    assert not config.load_settings().rate_from_account  # the outbox has no account rate


def test_batch_size_follows_the_account_rate() -> None:
    from worker.delivery import _batch_size

    ses = config.load_settings(
        mailer="ses",
        secret_key="k" * 40,
        base_url="https://papermail.example.org",
        postal_address="Example Lab, 1 Main St, Springfield, USA",
    )
    fast = LocalBucket(14.0, 14, rate_source=RateSource(lambda: 1280.0, ses))
    assert _batch_size(ses, fast) == 32  # as SEND_RATE=1280 would have it
    assert _batch_size(ses, LocalBucket(14.0, 14)) == ses.concurrency_at(14.0) == 1


def test_refresh_setting_is_validated(env: dict[str, str]) -> None:
    with pytest.raises(config.ConfigError, match="PAPERMAIL_ACCOUNT_REFRESH_SECONDS"):
        config.load_settings(account_refresh_seconds=5)


def test_quota_is_not_asked_of_mailers_without_one(settings: config.Settings) -> None:
    from datetime import date

    from worker.mailers.outbox import OutboxMailer

    assert not OutboxMailer.reports_quota
    assert account.check_quota(date(2026, 11, 27), 10**9, settings) is None


# ---------------------------------------------------------------------------------------
# AccountCache: the provider's answer, and its failures, shared for a while


def _info(sent: float = 0.0) -> Any:
    from worker.mailers.base import AccountInfo

    return AccountInfo(
        mailer="ses",
        max_send_rate=14.0,
        max_24h_send=200.0,
        sent_last_24h=sent,
        details={"region": "us-east-1"},
        warnings=("in the sandbox",),
    )


class Answers:
    """AccountInfo or an exception, call by call."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_cache_keeps_answers_and_failures_locally(caplog: pytest.LogCaptureFixture) -> None:
    from worker.mailers.errors import TransientError

    clock = Clock()
    fetch = Answers(TransientError("no answer from SES"), _info(5.0), _info(9.0))
    cache = account.AccountCache(fetch, ttl=60, failure_ttl=60, clock=clock)
    with caplog.at_level(logging.WARNING, logger="worker.account"):
        for _ in range(50):  # a failure is asked once, then remembered
            with pytest.raises(account.AccountUnavailable, match="no answer from SES"):
                cache.get()
    assert fetch.calls == 1
    assert caplog.text.count("could not ask the mail provider") == 1
    clock.now += 61
    assert cache.get() == _info(5.0) and fetch.calls == 2
    clock.now += 59
    assert cache.get().sent_last_24h == 5.0 and fetch.calls == 2
    clock.now += 2
    assert cache.get().sent_last_24h == 9.0 and fetch.calls == 3


def test_cache_shares_answers_and_failures_through_redis(redis_url: str) -> None:
    import redis

    from worker.mailers.errors import AccountError

    client = redis.Redis.from_url(redis_url)
    down = Answers(AccountError("credentials refused"))
    a = account.AccountCache(down, failure_ttl=30, redis=client, key="t:account")
    with pytest.raises(account.AccountUnavailable, match="credentials refused"):
        a.get()
    # Another process: the failure is read from Redis, the provider is not asked.
    never = Answers(_info())
    b = account.AccountCache(never, failure_ttl=30, redis=client, key="t:account")
    with pytest.raises(account.AccountUnavailable, match="credentials refused"):
        b.get()
    assert (down.calls, never.calls) == (1, 0)
    assert 0 < client.pttl("t:account") <= 30_000
    # Once it expires the next one asks, and shares the answer (info round-trips whole).
    client.delete("t:account")
    c = account.AccountCache(Answers(_info(7.0)), ttl=60, redis=client, key="t:account")
    assert c.get() == _info(7.0)
    d = account.AccountCache(Answers(_info(99.0)), ttl=60, redis=client, key="t:account")
    assert d.get() == _info(7.0) and d.fetches == 0
    assert 50_000 < client.pttl("t:account") <= 60_000


def test_cache_without_a_reachable_redis_asks_itself() -> None:
    import redis

    client = redis.Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.5)
    fetch = Answers(_info(3.0))
    cache = account.AccountCache(fetch, redis=client, key="t:account")
    assert cache.get().sent_last_24h == 3.0
    assert cache.get().sent_last_24h == 3.0 and fetch.calls == 1


def test_quota_check_asks_a_failing_provider_once_per_interval(
    settings: config.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import date

    from worker.mailers.errors import TransientError

    fetch = Answers(TransientError("read timeout"))
    cache = account.AccountCache(fetch)
    monkeypatch.setattr(account, "account_cache", lambda _settings: cache)
    ses = settings.model_copy(update={"mailer": "ses"})
    for _ in range(20):  # every plan_due tick of a minute
        assert account.check_quota(date(2026, 11, 27), 100, ses) is None
    assert fetch.calls == 1
