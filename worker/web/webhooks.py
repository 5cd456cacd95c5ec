"""`POST /webhooks/ses`: SES notifications delivered by SNS over HTTPS.

The SNS signature is verified before anything else (worker/sns.py). Answers:
200 applied / duplicate / orphan / ignored, confirmed or unsubscribe noted;
400 not a well-formed SNS message (or an authentic one that is not an SES notification);
403 not authentic or not for us; 503 try again (unknown message id still in its grace
period, signing certificate or SNS API unreachable) — SNS retries 5xx answers.

Test hooks (app.config): ``SNS_CERT_FETCHER`` (a :class:`worker.sns.CertFetcher`),
``SNS_CERT_CACHE`` (a :class:`worker.sns.CertCache`), ``SNS_CLIENT_FACTORY``
(``region -> client`` with ``confirm_subscription``).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import RequestEntityTooLarge

from worker import sns
from worker.config import Settings
from worker.events import (
    ApplyResult,
    Coalescer,
    InvalidNotification,
    RetryLater,
    parse_envelope,
)
from worker.untrusted import MAX_JSON_BYTES, UnsafeJSON, loads_json
from worker.web import app_settings

log = logging.getLogger(__name__)

bp = Blueprint("webhooks", __name__)

_STATUS = {"malformed": 400, "refused": 403, "unavailable": 503}


def _answer(code: int, **body: Any) -> ResponseReturnValue:
    return jsonify(body), code


def _coalescer(settings: Settings) -> Coalescer:
    found = current_app.extensions.get("papermail_events")
    if found is None or found.settings is not settings:
        found = current_app.extensions.setdefault(
            "papermail_events", Coalescer(settings, via="sns")
        )
    return found  # type: ignore[no-any-return]


def sns_client(settings: Settings, region: str) -> Any:
    """boto3 SNS client for the topic's region (endpoint: optional `sns_endpoint_url`)."""
    import boto3

    return boto3.client(
        "sns",
        region_name=region,
        endpoint_url=settings.sns_endpoint_url,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
    )


@bp.post("/webhooks/ses")
def ses_webhook() -> ResponseReturnValue:
    # remote_addr honours X-Forwarded-For only behind PAPERMAIL_TRUSTED_PROXIES.
    peer = request.remote_addr or "?"
    # SNS posts text/plain: read the bytes, whatever the Content-Type says. Size and depth
    # are checked before parsing (a body of 100,000 "[" must not reach the parser).
    if (request.content_length or 0) > MAX_JSON_BYTES:
        log.warning("SNS webhook: refused body from %s: %s bytes", peer, request.content_length)
        return _answer(400, error=f"body is too large (at most {MAX_JSON_BYTES:,} bytes)")
    try:
        message = loads_json(request.get_data(cache=False), what="body")
    except RequestEntityTooLarge:  # a chunked body over the app's MAX_CONTENT_LENGTH
        log.warning("SNS webhook: refused body from %s: too large", peer)
        return _answer(400, error=f"body is too large (at most {MAX_JSON_BYTES:,} bytes)")
    except UnsafeJSON as exc:
        log.warning("SNS webhook: refused body from %s: %s", peer, exc)
        return _answer(400, error=str(exc))
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("SNS webhook: refused body from %s: not JSON (%s)", peer, exc)
        return _answer(400, error="body is not JSON")
    settings = app_settings()
    try:
        sns.verify_message(
            message,
            settings,
            fetcher=current_app.config.get("SNS_CERT_FETCHER"),
            cache=current_app.config.get("SNS_CERT_CACHE"),
        )
    except sns.SnsVerificationError as exc:
        log.warning("SNS webhook: refused message from %s (%s): %s", peer, exc.kind, exc.reason)
        return _answer(_STATUS[exc.kind], error=exc.reason)

    kind = message["Type"]
    topic = message["TopicArn"]
    if kind == "SubscriptionConfirmation":
        return _confirm(settings, topic, message["Token"])
    if kind == "UnsubscribeConfirmation":
        log.warning("SNS webhook: %s unsubscribed this endpoint from %s", peer, topic)
        return _answer(200, status="noted")

    try:
        items = parse_envelope(message)
    except InvalidNotification as exc:
        log.error(
            "SNS webhook: authentic message %s is not an SES notification: %s",
            message.get("MessageId"),
            exc,
        )
        return _answer(400, error=str(exc))
    # Concurrent requests of this process are applied together (one transaction), each
    # answered with its own outcome: see worker.events.Coalescer.
    outcomes = _coalescer(settings).apply(items)
    waiting = next((o for o in outcomes if isinstance(o, RetryLater)), None)
    if waiting is not None:
        log.info("SNS webhook: %s", waiting)
        return _answer(503, error=str(waiting))
    results = [o for o in outcomes if isinstance(o, ApplyResult)]
    result = results[0]
    log.info(
        "SNS webhook: %s %s delivery=%s %s",
        result.event_type,
        result.status,
        result.delivery_id,
        "; ".join(result.changes),
    )
    return _answer(
        200, status=result.status, event_type=result.event_type, delivery_id=result.delivery_id
    )


def _confirm(settings: Settings, topic: str, token: str) -> ResponseReturnValue:
    # Confirmed through the API with the (verified) token; the SubscribeURL in the message
    # is never fetched.
    factory = current_app.config.get("SNS_CLIENT_FACTORY")
    try:
        region = sns.region_of_topic(topic)
        client = factory(region) if factory else sns_client(settings, region)
        response = client.confirm_subscription(
            TopicArn=topic, Token=token, AuthenticateOnUnsubscribe="true"
        )
    except ValueError as exc:
        log.warning("SNS webhook: cannot confirm subscription to %s: %s", topic, exc)
        return _answer(400, error=str(exc))
    except Exception as exc:
        log.error("SNS webhook: ConfirmSubscription for %s failed: %s", topic, exc)
        return _answer(503, error="could not confirm the subscription; try again")
    arn = response.get("SubscriptionArn") if isinstance(response, dict) else None
    log.warning("SNS webhook: confirmed subscription to %s (%s)", topic, arn)
    return _answer(200, status="confirmed", subscription_arn=arn)
