"""Is everything papermail needs there? One service for `papermail health` and `/healthz?deep=1`.

Each check talks to the real thing once (database, Redis, the broker, the mail provider,
SNS/SQS) with short timeouts and says, when something is wrong, what to do about it.
A check is ``ok``, ``warn`` (works, but limited: an SES sandbox, a probation), ``fail``
(something needs the operator) or ``skip`` (not configured). The report is healthy when
no check failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from worker.config import Settings
from worker.queues import QUEUES
from worker.redact import redact_url

Status = Literal["ok", "warn", "fail", "skip"]
TIMEOUT_SECONDS = 5.0


@dataclass
class Check:
    name: str
    status: Status
    summary: str
    fix: str | None = None  # what to do, when the status is warn or fail
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "summary": self.summary,
            "fix": self.fix,
            "details": self.details,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class HealthReport:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    @property
    def status(self) -> str:
        if not self.ok:
            return "fail"
        return "warn" if any(c.status == "warn" for c in self.checks) else "ok"

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "checks": [c.as_dict() for c in self.checks]}


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip() or type(exc).__name__
    return redact_url(" ".join(text.split()))


def _is_redis(url: str | None) -> bool:
    return bool(url) and str(url).startswith(("redis://", "rediss://", "unix://"))


# ---------------------------------------------------------------------------------------
# The checks


def check_database(settings: Settings) -> Check:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    from worker.migrate import alembic_config, current_revision

    url = settings.database_url
    try:
        current = current_revision(url)
    except Exception as exc:
        return Check(
            "database",
            "fail",
            f"cannot connect to the database: {_reason(exc)}",
            "check PAPERMAIL_DATABASE_URL and that the database server is running and "
            "reachable from this machine",
        )
    script = ScriptDirectory.from_config(alembic_config(url))
    head = script.get_current_head()
    details = {"url": redact_url(url), "revision": current, "head": head}
    if current is None:
        return Check(
            "database",
            "fail",
            "the database has no schema",
            "run `papermail db upgrade`",
            details,
        )
    if current == head:
        return Check("database", "ok", f"reachable, schema at {current} (head)", None, details)
    try:
        script.get_revision(current)
    except CommandError:
        return Check(
            "database",
            "fail",
            f"the schema is at {current}, a revision this code does not know",
            "a newer papermail migrated this database: run the same version everywhere",
            details,
        )
    return Check(
        "database",
        "fail",
        f"the schema is at {current}, behind the code's {head}",
        "run `papermail db upgrade`",
        details,
    )


def check_redis(settings: Settings) -> Check:
    url = settings.broker_url
    if not _is_redis(url):
        why = "no PAPERMAIL_BROKER_URL" if not url else "the broker is not Redis"
        return Check("redis", "skip", f"not used ({why}: the rate limit is per process)")
    import redis

    assert url is not None
    client = redis.Redis.from_url(
        url, socket_timeout=TIMEOUT_SECONDS, socket_connect_timeout=TIMEOUT_SECONDS
    )
    try:
        client.ping()
        info = client.info("server")
        memory = client.info("memory")
    except Exception as exc:
        return Check(
            "redis",
            "fail",
            f"cannot reach Redis at {redact_url(url)}: {_reason(exc)}",
            "check PAPERMAIL_BROKER_URL and that Redis is running",
        )
    finally:
        client.close()
    policy = str(memory.get("maxmemory_policy", ""))
    limit = int(memory.get("maxmemory", 0) or 0)
    details = {
        "url": redact_url(url),
        "version": info.get("redis_version"),
        "used_memory_bytes": memory.get("used_memory"),
        "maxmemory_bytes": limit,
        "maxmemory_policy": policy,
    }
    if limit and policy != "noeviction":
        return Check(
            "redis",
            "warn",
            f"Redis may evict keys when full (maxmemory-policy {policy}): queued tasks and "
            "the rate limit could vanish",
            "set `maxmemory-policy noeviction` (docker-compose.yml does)",
            details,
        )
    return Check("redis", "ok", f"reachable, Redis {info.get('redis_version')}", None, details)


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting in each papermail queue of the broker (not those being worked on)."""
    from kombu import Connection

    url = settings.broker_url
    if not url:
        return {}
    options = {"socket_connect_timeout": TIMEOUT_SECONDS, "socket_timeout": TIMEOUT_SECONDS}
    with Connection(url, connect_timeout=TIMEOUT_SECONDS, transport_options=options) as conn:
        conn.ensure_connection(max_retries=1)
        channel = conn.default_channel
        return {name: int(channel.queue_declare(queue=name).message_count) for name in QUEUES}


def check_broker(settings: Settings) -> Check:
    url = settings.broker_url
    if not url:
        return Check("broker", "skip", "no PAPERMAIL_BROKER_URL: editions are sent in-process")
    try:
        depths = queue_depths(settings)
    except Exception as exc:
        return Check(
            "broker",
            "fail",
            f"cannot reach the broker at {redact_url(url)}: {_reason(exc)}",
            "check PAPERMAIL_BROKER_URL and that the broker is running",
        )
    shown = ", ".join(f"{name} {n:,}" for name, n in depths.items())
    return Check("broker", "ok", f"queues waiting: {shown}", None, {"queues": depths})


def check_mailer(settings: Settings, mailer: Any | None = None) -> Check:
    from worker.mailers.base import create_mailer
    from worker.mailers.errors import MailerError

    own = mailer is None
    mailer = mailer or create_mailer(settings)
    try:
        info = mailer.account()
    except MailerError as exc:
        return Check(
            "mailer",
            "fail",
            f"{settings.mailer}: cannot ask the provider: {redact_url(exc.reason)} [{exc.kind}]",
            _mailer_fix(settings),
            {"mailer": settings.mailer},
        )
    finally:
        if own:
            mailer.close()
    details = info.as_dict()
    problems, warnings = list(info.problems), list(info.warnings)
    rate = info.max_send_rate
    if rate is not None and not settings.rate_from_account and settings.send_rate > rate:
        warnings.append(
            f"PAPERMAIL_SEND_RATE is {settings.send_rate:g}/s but the account allows {rate:g}/s: "
            "SES will throttle; lower it, or unset it to follow the account"
        )
    if settings.mailer == "ses":
        details["limiter_rate"] = rate if settings.rate_from_account and rate else None
        details["limiter_follows_account"] = settings.rate_from_account
    summary = _account_summary(info)
    if problems:
        return Check("mailer", "fail", summary, "; ".join(problems), details)
    if warnings:
        return Check("mailer", "warn", summary, "; ".join(warnings), details)
    return Check("mailer", "ok", summary, None, details)


def _account_summary(info: Any) -> str:
    parts = [f"{info.mailer}: {info.source}"]
    if info.sending_enabled is not None:
        parts.append("sending enabled" if info.sending_enabled else "sending DISABLED")
    if info.production_access is not None:
        parts.append("production access" if info.production_access else "sandbox")
    if info.max_send_rate is not None:
        parts.append(f"max {info.max_send_rate:g}/s")
    if info.max_24h_send is not None and info.max_24h_send >= 0:
        parts.append(
            f"24 h quota {info.max_24h_send:,.0f}, sent {info.sent_last_24h or 0:,.0f}, "
            f"left {info.remaining_24h:,.0f}"
        )
    for key in ("outbox_dir", "server"):
        if key in info.details:
            parts.append(str(info.details[key]))
    return ", ".join(parts)


def _mailer_fix(settings: Settings) -> str:
    if settings.mailer == "ses":
        return (
            "check the AWS credentials (PAPERMAIL_AWS_ACCESS_KEY_ID/SECRET_ACCESS_KEY or the "
            "instance role; they need ses:GetAccount), PAPERMAIL_SES_REGION and "
            "PAPERMAIL_SES_ENDPOINT_URL"
        )
    if settings.mailer == "smtp":
        return (
            "check PAPERMAIL_SMTP_HOST/PORT, PAPERMAIL_SMTP_STARTTLS and the SMTP credentials, "
            "and that the relay is reachable from this machine"
        )
    return "check PAPERMAIL_OUTBOX_DIR"


def _aws_client(settings: Settings, service: str, region: str, endpoint: str | None) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        service,
        region_name=region,
        endpoint_url=endpoint,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
        config=Config(
            connect_timeout=TIMEOUT_SECONDS,
            read_timeout=TIMEOUT_SECONDS,
            retries={"total_max_attempts": 1},
        ),
    )


def _queue_region(queue_url: str, default: str) -> str:
    from worker.events import _region_of_queue

    return _region_of_queue(queue_url, default)


def check_events(settings: Settings) -> list[Check]:
    """SNS topics reach papermail (webhook or SQS), and the SQS queue answers."""
    topics, queue_url = settings.sns_topic_arns, settings.sqs_queue_url
    if not topics and not queue_url:
        if settings.mailer == "ses":
            return [
                Check(
                    "events",
                    "warn",
                    "no PAPERMAIL_SNS_TOPIC_ARNS or PAPERMAIL_SQS_QUEUE_URL: bounces and "
                    "complaints never reach papermail",
                    "publish the configuration set's events to an SNS topic and set "
                    "PAPERMAIL_SNS_TOPIC_ARNS (README: Bounces, complaints)",
                )
            ]
        return [Check("events", "skip", "no SNS topic or SQS queue configured")]
    checks: list[Check] = []
    queue_arn: str | None = None
    if queue_url:
        check, queue_arn = _check_sqs(settings, queue_url)
        checks.append(check)
    webhook = f"{settings.base_url}/webhooks/ses"
    for arn in topics:
        checks.append(_check_topic(settings, arn, webhook, queue_arn))
    return checks


def _check_sqs(settings: Settings, queue_url: str) -> tuple[Check, str | None]:
    region = _queue_region(queue_url, settings.ses_region)
    client = _aws_client(settings, "sqs", region, settings.sqs_endpoint_url)
    try:
        attrs = client.get_queue_attributes(
            QueueUrl=queue_url,
            AttributeNames=[
                "QueueArn",
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
            ],
        )["Attributes"]
    except Exception as exc:
        return (
            Check(
                "sqs",
                "fail",
                f"cannot read the SQS queue {queue_url}: {_reason(exc)}",
                "check PAPERMAIL_SQS_QUEUE_URL, PAPERMAIL_SQS_ENDPOINT_URL and that the "
                "credentials may sqs:GetQueueAttributes and sqs:ReceiveMessage",
            ),
            None,
        )
    finally:
        client.close()
    waiting = int(attrs.get("ApproximateNumberOfMessages", 0))
    in_flight = int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0))
    details = {"queue": queue_url, "waiting": waiting, "in_flight": in_flight}
    return (
        Check(
            "sqs",
            "ok",
            f"{waiting:,} notifications waiting, {in_flight:,} in flight",
            None,
            details,
        ),
        attrs.get("QueueArn"),
    )


def _check_topic(settings: Settings, arn: str, webhook: str, queue_arn: str | None) -> Check:
    parts = arn.split(":")
    name = f"sns {parts[5] if len(parts) > 5 else arn}"
    if len(parts) < 6 or parts[0] != "arn" or parts[2] != "sns":
        return Check(
            name,
            "fail",
            f"{arn!r} is not an SNS topic ARN",
            "set PAPERMAIL_SNS_TOPIC_ARNS to arn:aws:sns:REGION:ACCOUNT:TOPIC values",
        )
    client = _aws_client(settings, "sns", parts[3], settings.sns_endpoint_url)
    subscriptions: list[dict[str, Any]] = []
    try:
        for page in client.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=arn):
            subscriptions.extend(page.get("Subscriptions") or [])
    except Exception as exc:
        return Check(
            name,
            "fail",
            f"cannot list the subscriptions of {arn}: {_reason(exc)}",
            "check the topic exists, PAPERMAIL_SNS_ENDPOINT_URL, and that the credentials "
            "may sns:ListSubscriptionsByTopic",
        )
    finally:
        client.close()
    ours = [
        s
        for s in subscriptions
        if (s.get("Protocol") in ("http", "https") and s.get("Endpoint") == webhook)
        or (queue_arn is not None and s.get("Protocol") == "sqs" and s.get("Endpoint") == queue_arn)
    ]
    details = {
        "topic": arn,
        "subscriptions": [
            {
                "protocol": s.get("Protocol"),
                "endpoint": redact_url(str(s.get("Endpoint"))),
                "confirmed": s.get("SubscriptionArn") != "PendingConfirmation",
            }
            for s in subscriptions
        ],
    }
    target = webhook if queue_arn is None else f"{webhook} or {queue_arn}"
    protocol, endpoint = ("https", webhook) if queue_arn is None else ("sqs", queue_arn)
    subscribe = (
        f"aws sns subscribe --topic-arn {arn} --protocol {protocol} "
        f"--notification-endpoint {endpoint}"
    )
    if not ours:
        return Check(
            name,
            "fail",
            f"no subscription of the topic reaches papermail ({target})",
            f"subscribe it: `{subscribe}`",
            details,
        )
    if all(s.get("SubscriptionArn") == "PendingConfirmation" for s in ours):
        return Check(
            name,
            "fail",
            "papermail's subscription is not confirmed yet",
            "the web app confirms it when SNS posts the confirmation: check that "
            f"{webhook} is reachable from SNS, then subscribe again: `{subscribe}`",
            details,
        )
    return Check(name, "ok", f"subscribed: {ours[0].get('Endpoint')}", None, details)


# ---------------------------------------------------------------------------------------


def run_checks(settings: Settings, *, mailer: Any | None = None) -> HealthReport:
    """Every check, in order; a check that raises unexpectedly fails with its reason."""
    steps: list[Callable[[], list[Check]]] = [
        lambda: [check_database(settings)],
        lambda: [check_redis(settings)],
        lambda: [check_broker(settings)],
        lambda: [check_mailer(settings, mailer)],
        lambda: check_events(settings),
    ]
    names = ["database", "redis", "broker", "mailer", "events"]
    checks: list[Check] = []
    for name, step in zip(names, steps, strict=True):
        started = time.monotonic()
        try:
            found = step()
        except Exception as exc:
            found = [Check(name, "fail", f"the check itself failed: {_reason(exc)}")]
        elapsed = time.monotonic() - started
        for check in found:
            check.seconds = elapsed / len(found)
        checks.extend(found)
    return HealthReport(checks)
