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

import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import InternalServerError, RequestEntityTooLarge
from werkzeug.http import HTTP_STATUS_CODES

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

log = logging.getLogger(__name__)

bp = Blueprint("webhooks", __name__)

_STATUS = {"malformed": 400, "refused": 403, "unavailable": 503}
# How long a batch waits for more of this process's concurrent requests (Coalescer.gather):
# SNS's answers come back together, so do its next requests; a batch of 15 costs hardly
# more than one of 5 (bench/events.py).
GATHER_SECONDS = 0.004


def _answer(code: int, **body: Any) -> ResponseReturnValue:
    return jsonify(body), code


def _coalescer(settings: Settings, extensions: dict[str, Any]) -> Coalescer:
    found = extensions.get("papermail_events")
    if found is None or found.settings is not settings:
        found = extensions.setdefault(
            "papermail_events", Coalescer(settings, via="sns", gather=GATHER_SECONDS)
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
    # Reached for requests the fast path hands on (a query string, a form body); the same
    # checks and answers (see SnsFastPath).
    # remote_addr honours X-Forwarded-For only behind PAPERMAIL_TRUSTED_PROXIES.
    peer = request.remote_addr or "?"
    # SNS posts text/plain: read the bytes, whatever the Content-Type says. Size and depth
    # are checked before parsing (a body of 100,000 "[" must not reach the parser).
    if (request.content_length or 0) > MAX_JSON_BYTES:
        code, answer = _too_large(peer, f"{request.content_length} bytes")
        return _answer(code, **answer)
    try:
        body = request.get_data(cache=False)
    except RequestEntityTooLarge:  # a chunked body over the app's MAX_CONTENT_LENGTH
        code, answer = _too_large(peer, "too large")
        return _answer(code, **answer)
    code, answer = handle_body(body, peer, current_app.config, current_app.extensions)
    return _answer(code, **answer)


def _too_large(peer: str, what: str) -> tuple[int, dict[str, Any]]:
    log.warning("SNS webhook: refused body from %s: %s", peer, what)
    return 400, {"error": f"body is too large (at most {MAX_JSON_BYTES:,} bytes)"}


def handle_body(
    body: bytes, peer: str, config: Mapping[str, Any], extensions: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """The answer (status, JSON body) to one POSTed SNS message: parse, verify, apply."""
    try:
        message = loads_json(body, what="body")
    except UnsafeJSON as exc:
        log.warning("SNS webhook: refused body from %s: %s", peer, exc)
        return 400, {"error": str(exc)}
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("SNS webhook: refused body from %s: not JSON (%s)", peer, exc)
        return 400, {"error": "body is not JSON"}
    settings: Settings = config["PAPERMAIL_SETTINGS"]
    try:
        sns.verify_message(
            message,
            settings,
            fetcher=config.get("SNS_CERT_FETCHER"),
            cache=config.get("SNS_CERT_CACHE"),
        )
    except sns.SnsVerificationError as exc:
        log.warning("SNS webhook: refused message from %s (%s): %s", peer, exc.kind, exc.reason)
        return _STATUS[exc.kind], {"error": exc.reason}

    kind = message["Type"]
    topic = message["TopicArn"]
    if kind == "SubscriptionConfirmation":
        return _confirm(settings, topic, message["Token"], config.get("SNS_CLIENT_FACTORY"))
    if kind == "UnsubscribeConfirmation":
        log.warning("SNS webhook: %s unsubscribed this endpoint from %s", peer, topic)
        return 200, {"status": "noted"}

    try:
        items = parse_envelope(message)
    except InvalidNotification as exc:
        log.error(
            "SNS webhook: authentic message %s is not an SES notification: %s",
            message.get("MessageId"),
            exc,
        )
        return 400, {"error": str(exc)}
    # Concurrent requests of this process are applied together (one transaction), each
    # answered with its own outcome: see worker.events.Coalescer.
    outcomes = _coalescer(settings, extensions).apply(items)
    waiting = next((o for o in outcomes if isinstance(o, RetryLater)), None)
    if waiting is not None:
        log.info("SNS webhook: %s", waiting)
        return 503, {"error": str(waiting)}
    results = [o for o in outcomes if isinstance(o, ApplyResult)]
    result = results[0]
    if log.isEnabledFor(logging.INFO):
        log.info(
            "SNS webhook: %s %s delivery=%s %s",
            result.event_type,
            result.status,
            result.delivery_id,
            "; ".join(result.changes),
        )
    return 200, {
        "status": result.status,
        "event_type": result.event_type,
        "delivery_id": result.delivery_id,
    }


class SnsFastPath:
    """WSGI middleware answering ``POST /webhooks/ses`` without Flask's request machinery
    (request context, session, URL map, before/after hooks, response object): that was a
    third of a notification's CPU in the web process, more than applying it. The same
    function (:func:`handle_body`) gives the same answers as the Flask view, which still
    serves every request this does not take: one with a query string or a form body (so
    the input guards see those, as before), or another method or path. An unexpected
    error is logged as Flask logs it and answered 500 as Flask would."""

    PATH = "/webhooks/ses"

    def __init__(self, app: Flask, wsgi_app: Any) -> None:
        self.app, self.wsgi_app = app, wsgi_app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if (
            environ.get("PATH_INFO") != self.PATH
            or environ.get("REQUEST_METHOD") != "POST"
            or environ.get("QUERY_STRING")
            or _is_form(environ.get("CONTENT_TYPE", ""))
        ):
            return self.wsgi_app(environ, start_response)
        peer = environ.get("REMOTE_ADDR") or "?"
        try:
            code, answer = self._answer(environ, peer)
        except Exception:
            self.app.logger.error(
                "Exception on %s [%s]", self.PATH, "POST", exc_info=sys.exc_info()
            )
            return InternalServerError()(environ, start_response)
        data = (json.dumps(answer, sort_keys=True, separators=(",", ":")) + "\n").encode()
        start_response(
            f"{code} {HTTP_STATUS_CODES.get(code, 'UNKNOWN').upper()}",  # as werkzeug writes it
            [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
        )
        return [data]

    def _answer(self, environ: dict[str, Any], peer: str) -> tuple[int, dict[str, Any]]:
        try:
            length: int | None = int(environ.get("CONTENT_LENGTH") or "")
        except ValueError:
            length = None  # as werkzeug reads it: no usable length
        if length is not None and length < 0:
            length = None
        if length is not None and length > MAX_JSON_BYTES:
            return _too_large(peer, f"{length} bytes")
        stream = environ["wsgi.input"]
        if length is not None:
            body = stream.read(length)
        elif environ.get("wsgi.input_terminated"):  # chunked: read up to the limit
            body = stream.read(MAX_JSON_BYTES + 1)
            if len(body) > MAX_JSON_BYTES:
                return _too_large(peer, "too large")
        else:
            body = b""
        return handle_body(body, peer, self.app.config, self.app.extensions)


def _is_form(content_type: str) -> bool:
    mimetype = content_type.split(";", 1)[0].strip().lower()
    return mimetype in ("application/x-www-form-urlencoded", "multipart/form-data")


def _confirm(
    settings: Settings, topic: str, token: str, factory: Any
) -> tuple[int, dict[str, Any]]:
    # Confirmed through the API with the (verified) token; the SubscribeURL in the message
    # is never fetched.
    try:
        region = sns.region_of_topic(topic)
        client = factory(region) if factory else sns_client(settings, region)
        response = client.confirm_subscription(
            TopicArn=topic, Token=token, AuthenticateOnUnsubscribe="true"
        )
    except ValueError as exc:
        log.warning("SNS webhook: cannot confirm subscription to %s: %s", topic, exc)
        return 400, {"error": str(exc)}
    except Exception as exc:
        log.error("SNS webhook: ConfirmSubscription for %s failed: %s", topic, exc)
        return 503, {"error": "could not confirm the subscription; try again"}
    arn = response.get("SubscriptionArn") if isinstance(response, dict) else None
    log.warning("SNS webhook: confirmed subscription to %s (%s)", topic, arn)
    return 200, {"status": "confirmed", "subscription_arn": arn}
