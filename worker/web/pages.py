"""Subscriber pages: preferences, unsubscribe (RFC 8058), subscribe + confirm, feedback,
view in browser.

Every page reached from an email is authorised by the signed, purpose-bound token in its
URL (worker.links). A GET or HEAD never changes anything — mail scanners follow links —
so each action is a POST from a button on the page. The logic lives in
worker.preferences; this module only speaks HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from datetime import date
from functools import lru_cache
from typing import Any
from zoneinfo import available_timezones

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    g,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from worker import links, preferences
from worker.config import Settings
from worker.db import session_scope
from worker.errors import NotFound
from worker.models import (
    ACCEPTED_DELIVERY_STATES,
    WEEKDAYS,
    Delivery,
    Paper,
    Subscriber,
    SubscriberStatus,
)
from worker.redact import redact_tokens
from worker.throttle import Throttle, ThrottleUnavailable, make_throttle
from worker.urls import safe_url
from worker.web.guards import validates
from worker.zones import canonical_zone, canonical_zones

log = logging.getLogger(__name__)

bp = Blueprint(
    "pages",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/assets",
)

ONE_CLICK = "One-Click"
CSRF_FIELD = "csrf_token"
SUGGESTION_DAYS = 14
RETRY_AFTER_UNAVAILABLE = 60  # seconds, when the sign-up throttle's store is down

# No asset from another host; inline styles/scripts are not needed, so none are allowed.
PAGE_CSP = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
# The archived email is table HTML with inline styles; it loads nothing and runs nothing.
EDITION_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)


# --- app wiring -------------------------------------------------------------------------


class _SessionInterface(SecureCookieSessionInterface):
    """Flask's cookie session, except on responses that must not set a cookie.

    RFC 8058's one-click POST (and every page authorised by its signed link alone) sets
    no cookie, not even the deletion of one an earlier page left behind.
    """

    def save_session(self, app: Flask, session: Any, response: Response) -> None:
        if g.get("papermail_no_cookie"):
            return
        super().save_session(app, session, response)


@bp.record_once
def _setup(state: Any) -> None:
    app: Flask = state.app
    settings: Settings = app.config["PAPERMAIL_SETTINGS"]
    app.session_interface = _SessionInterface()
    app.config["SESSION_COOKIE_NAME"] = "papermail_session"
    app.config["SESSION_COOKIE_SAMESITE"] = "Lax"
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    app.config["SESSION_COOKIE_SECURE"] = settings.base_url.startswith("https://")
    limit = settings.subscribe_rate_per_hour
    app.extensions["papermail_throttle"] = make_throttle(settings, limit, name="subscribe")


def _settings() -> Settings:
    return current_app.config["PAPERMAIL_SETTINGS"]  # type: ignore[no-any-return]


def _throttle() -> Throttle:
    return current_app.extensions["papermail_throttle"]  # type: ignore[no-any-return]


@contextmanager
def _db() -> Iterator[Session]:
    with session_scope(_settings().database_url) as s:
        yield s


def _no_cookie() -> None:
    g.papermail_no_cookie = True


@bp.after_request
def _private(response: Response) -> Response:
    # Pages carry personal data and capability URLs: never cache, never leak the URL.
    response.headers.setdefault("Cache-Control", "no-store")
    return response


@bp.after_app_request
def _security_headers(response: Response) -> Response:
    if response.mimetype == "text/html":
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        # The token in the URL must not travel to a paper's site in a Referer header.
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
    return response


# --- errors -----------------------------------------------------------------------------


def _error_page(status: int, title: str, message: str) -> Response:
    response = make_response(
        render_template("error.html", title=title, message=message, status=status), status
    )
    return response


@bp.app_errorhandler(links.BadLink)
def _bad_link(exc: links.BadLink) -> Response:
    # Log why, and a fingerprint to correlate reports, never the token itself.
    token = (request.view_args or {}).get("token", "")
    fingerprint = hashlib.sha256(str(token).encode()).hexdigest()[:12]
    log.warning(
        "refused %s link (%s: %s) from %s, token sha256 %s…",
        exc.purpose,
        type(exc).__name__,
        exc,
        request.remote_addr,
        fingerprint,
    )
    _no_cookie()
    if isinstance(exc, links.ExpiredLink):
        return _error_page(
            400,
            "This link has expired",
            "Links in our emails work for a limited time. Please use the link in a more "
            "recent email.",
        )
    return _error_page(
        400,
        "This link doesn't work",
        "It may have been cut short or changed on its way to you. Please open it again "
        "from the email, or copy the whole address.",
    )


@bp.app_errorhandler(NotFound)
def _not_found(exc: NotFound) -> Response:
    log.info("not found on %s: %s", redact_tokens(request.path), exc)
    _no_cookie()
    return _error_page(
        404,
        "We couldn't find that",
        "This subscription or paper no longer exists. If you think that's wrong, please "
        "contact the sender of the email.",
    )


@bp.app_errorhandler(preferences.NotAllowed)
def _not_allowed(exc: preferences.NotAllowed) -> Response:
    _no_cookie()
    return _error_page(409, "We can't do that from here", str(exc).capitalize() + ".")


@bp.app_errorhandler(404)
def _http_404(exc: HTTPException) -> Response | HTTPException:
    if not _wants_html():
        return exc
    return _error_page(404, "Page not found", "There is nothing at this address.")


@bp.app_errorhandler(405)
def _http_405(exc: HTTPException) -> Response | HTTPException:
    if not _wants_html():
        return exc
    response = _error_page(
        405, "That didn't work", "This page can't be used that way. Please go back and retry."
    )
    response.headers["Allow"] = ", ".join(getattr(exc, "valid_methods", None) or [])
    return response


def _wants_html() -> bool:
    # Machine endpoints (webhooks, health) keep their plain errors.
    return not request.path.startswith(("/webhooks", "/healthz"))


# --- tokens, CSRF -----------------------------------------------------------------------


def _read(purpose: str, token: str) -> dict[str, Any]:
    payload = links.read_token(purpose, token, _settings())
    sid = payload.get("s")
    if not isinstance(sid, int) or isinstance(sid, bool):
        raise links.TamperedLink(purpose, f"this {purpose} link carries no subscriber")
    return payload


def _subscriber(s: Session, payload: dict[str, Any]) -> Subscriber:
    sub = s.get(Subscriber, payload["s"])
    if sub is None:
        raise NotFound(f"subscriber {payload['s']} does not exist")
    return sub


def _csrf_token() -> str:
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def _csrf_ok() -> bool:
    sent = request.form.get(CSRF_FIELD, "")
    expected = session.get("csrf")
    return isinstance(expected, str) and hmac.compare_digest(sent.encode(), expected.encode())


@bp.app_context_processor
def _template_globals() -> dict[str, Any]:
    return {"csrf_token": _csrf_token, "csrf_field": CSRF_FIELD}


@bp.app_template_filter("longdate")
def _long_date(day: date) -> str:
    return f"{day:%A} {day.day} {day:%B %Y}"


# The same link rule as the emails: a paper link that is not http(s) renders as no link.
bp.add_app_template_filter(safe_url, "safe_url")


@bp.app_template_filter("sentence")
def _sentence(text: str) -> str:
    """Upper-case the first letter only (``capitalize`` would lower-case a zone name)."""
    return text[:1].upper() + text[1:]


# --- index ------------------------------------------------------------------------------


@bp.get("/")
def index() -> Response:
    return redirect(url_for("pages.subscribe"))  # type: ignore[return-value]


@bp.get("/favicon.ico")
def favicon() -> Response:
    # Browsers and feed readers ask for /favicon.ico at the root whatever the page says.
    response = bp.send_static_file("favicon.ico")
    response.headers["Cache-Control"] = "public, max-age=86400"
    return response


# --- preferences ------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _zone_aliases() -> str:
    # For the "use this device's zone" button: browsers report some old names (Chromium
    # says Asia/Calcutta, Europe/Kiev), which must compare equal to the saved canonical one.
    aliases = {}
    for name in sorted(available_timezones()):
        canonical = canonical_zone(name)
        if canonical != name:
            aliases[name] = canonical
    return json.dumps(aliases, separators=(",", ":"))


def _form_values(sub: Subscriber) -> dict[str, Any]:
    return {
        "topics": list(sub.topics or []),
        "new_topics": "",
        "max_papers": str(sub.max_papers),
        "frequency": sub.frequency,
        "weekday": "" if sub.weekday is None else str(sub.weekday),
        "send_hour": str(sub.send_hour),
        "timezone": canonical_zone(sub.timezone),
        "paused_until": sub.paused_until.isoformat() if sub.paused_until else "",
        "categories": ", ".join(sub.categories_only or ()),
        "exclude_categories": ", ".join(sub.categories_exclude or ()),
    }


# The preference form's fields posted as they are validated (topics are put together).
_PLAIN_FIELDS = (
    "max_papers", "frequency", "weekday", "send_hour", "timezone", "paused_until",
    "categories", "exclude_categories",
)  # fmt: skip


def _submitted() -> tuple[dict[str, Any], dict[str, Any]]:
    """(values to validate, values to show again) from the posted form."""
    kept = [t for t in request.form.getlist("topic") if t.strip()]
    new_text = request.form.get("new_topics", "")
    from worker.subscribers import parse_topics

    try:
        added = list(parse_topics(new_text))
    except ValueError:
        added = [new_text]  # let the full validation report it
    shown = {
        "topics": kept,
        "new_topics": new_text,
        **{k: request.form.get(k, "") for k in _PLAIN_FIELDS},
    }
    form = {**shown, "topics": kept + added}
    form.pop("new_topics")
    return form, shown


def _preferences_page(
    s: Session,
    sub: Subscriber,
    token: str,
    values: dict[str, Any],
    errors: dict[str, str],
    status: int = 200,
    saved: bool = False,
) -> Response:
    settings = _settings()
    suggestions = preferences.topic_suggestions(s, days=SUGGESTION_DAYS, exclude=values["topics"])
    next_date = preferences.next_edition_date(sub, session=s)
    preview = None
    preview_failed = False
    if sub.status == SubscriberStatus.ACTIVE.value and sub.suppressed_at is None:
        from worker.previews import previews_for

        try:
            preview = previews_for(s, [sub], next_date, settings=settings, with_html=False)[0]
        except Exception:  # the page must work even if the preview cannot be computed
            log.exception("preview of the next digest failed for subscriber %s", sub.id)
            preview_failed = True
    sid = sub.id
    body = render_template(
        "preferences.html",
        sub=sub,
        token=token,
        values=values,
        errors=errors,
        field_errors={k: v for k, v in errors.items() if k != "form"},
        saved=saved,
        suggestions=suggestions,
        zones=canonical_zones(),
        zone_aliases=_zone_aliases(),
        weekdays=WEEKDAYS,
        next_date=next_date,
        preview=preview,
        preview_failed=preview_failed,
        today=preferences.local_today(sub),
        unsubscribe_url=url_for(
            "pages.unsubscribe", token=links.make_token("unsubscribe", {"s": sid}, settings)
        ),
    )
    return make_response(body, status)


@bp.route("/preferences/<token>", methods=["GET", "POST"])
@validates(
    "topic",
    "new_topics",
    "max_papers",
    "frequency",
    "weekday",
    "send_hour",
    "timezone",
    "paused_until",
    "categories",
    "exclude_categories",
)
def preferences_page(token: str) -> Response:
    payload = _read("preferences", token)
    with _db() as s:
        sub = _subscriber(s, payload)
        if request.method != "POST":
            return _preferences_page(
                s, sub, token, _form_values(sub), {}, saved=request.args.get("saved") == "1"
            )
        form, shown = _submitted()
        if not _csrf_ok():
            log.warning("preferences of subscriber %s: CSRF token missing or wrong", sub.id)
            errors = {
                "form": "This form had expired, so nothing was saved. Please check your "
                "changes and save again."
            }
            return _preferences_page(s, sub, token, shown, errors, status=400)
        try:
            changes = preferences.update_preferences(s, sub.id, form)
        except preferences.InvalidPreferences as exc:
            s.rollback()
            sub = _subscriber(s, payload)
            return _preferences_page(s, sub, token, shown, exc.errors, status=400)
    log.info("subscriber %s changed preferences: %s", sub.id, "; ".join(changes) or "nothing")
    # Post/redirect/get: a reload does not post again.
    return redirect(url_for("pages.preferences_page", token=token, saved=1), 303)  # type: ignore[return-value]


# --- unsubscribe (RFC 8058) -------------------------------------------------------------


@bp.route("/unsubscribe/<token>", methods=["GET", "POST"])
def unsubscribe(token: str) -> Response:
    """GET/HEAD: a page with a button. POST List-Unsubscribe=One-Click: unsubscribe.

    The POST needs no cookie or CSRF token (the signed link is the authority), answers
    200 without a redirect, sets no cookie, and is idempotent. A POST with
    ``action=resubscribe`` (the page's own button) undoes it.
    """
    _no_cookie()
    payload = _read("unsubscribe", token)
    settings = _settings()
    with _db() as s:
        sub = _subscriber(s, payload)
        done = None
        if request.method == "POST":
            if request.form.get("List-Unsubscribe") == ONE_CLICK:
                changed = preferences.unsubscribe(s, sub.id, how=_unsubscribe_how())
                log.info("subscriber %s unsubscribed (changed=%s)", sub.id, changed)
                done = "unsubscribed"
            elif request.form.get("action") == "resubscribe":
                changed = preferences.resubscribe(s, sub.id)
                log.info("subscriber %s re-subscribed (changed=%s)", sub.id, changed)
                done = "resubscribed"
            else:
                return _error_page(
                    400,
                    "That didn't work",
                    "This request was missing what it needed. Please use the button on "
                    "the unsubscribe page.",
                )
        body = render_template(
            "unsubscribe.html",
            sub=sub,
            token=token,
            done=done,
            unsubscribed=sub.status == SubscriberStatus.UNSUBSCRIBED.value,
            one_click=ONE_CLICK,
            preferences_url=url_for(
                "pages.preferences_page",
                token=links.make_token("preferences", {"s": sub.id}, settings),
            ),
        )
    return make_response(body, 200)


def _unsubscribe_how() -> str:
    # The mail client's own button posts without our page's marker field.
    if request.form.get("source") == "page":
        return "the unsubscribe page"
    return "one-click (List-Unsubscribe-Post)"


# --- subscribe and confirm --------------------------------------------------------------


def _subscribe_form(values: dict[str, str], errors: dict[str, str], status: int) -> Response:
    return make_response(render_template("subscribe.html", values=values, errors=errors), status)


@bp.route("/subscribe", methods=["GET", "POST"])
@validates("email", "topics", "timezone")
def subscribe() -> Response:
    values = {k: request.form.get(k, "") for k in ("email", "topics", "timezone")}
    if request.method != "POST":
        return _subscribe_form(values, {}, 200)
    if not _csrf_ok():
        log.warning("subscribe: CSRF token missing or wrong from %s", request.remote_addr)
        return _subscribe_form(
            values,
            {"form": "This form had expired, so nothing was sent. Please press Subscribe again."},
            400,
        )
    try:
        parsed = preferences.parse_subscribe(values["email"], values["topics"], values["timezone"])
    except preferences.InvalidPreferences as exc:
        errors = dict(exc.errors)
        if "timezone" in errors:  # the zone is a hidden field: say it above the form
            errors.setdefault("form", _sentence(errors["timezone"]))
        return _subscribe_form(values, errors, 400)
    try:
        wait = _rate_limited(parsed["email"])
    except ThrottleUnavailable as exc:
        # Without the shared counter a flood could not be stopped: ask to retry later.
        log.error("subscribe: %s; answering 503", exc)
        response = _error_page(
            503,
            "Please try again in a minute",
            "We can't take sign-ups right now, through no fault of yours. Nothing was sent "
            "or saved. Please try again in a minute or two.",
        )
        response.headers["Retry-After"] = str(RETRY_AFTER_UNAVAILABLE)
        return response
    if wait:
        minutes = max(1, round(wait / 60))
        response = _error_page(
            429,
            "Please wait a little",
            f"We've received several requests like this one. Please try again in about "
            f"{minutes} minute{'s' if minutes != 1 else ''}.",
        )
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    with _db() as s:
        outcome = preferences.subscribe_request(
            s, parsed["email"], list(parsed["topics"]), parsed["timezone"]
        )
    # The same page, answered as fast, whatever the outcome: the email (if any) is sent in
    # the background, so neither content nor timing tells whether an address is subscribed.
    dispatch_confirmation(outcome, _settings())
    log.info("subscribe request: action=%s", outcome.action)
    return make_response(render_template("subscribe_sent.html", email=parsed["email"]), 200)


_confirmations = ThreadPoolExecutor(max_workers=1, thread_name_prefix="papermail-confirm")
_in_flight: list[Future[bool]] = []
_in_flight_lock = threading.Lock()


def dispatch_confirmation(outcome: preferences.SubscribeOutcome, settings: Settings) -> None:
    """Send the confirmation off the request path (one background sender per process)."""
    if not outcome.send_confirmation:
        return
    future = _confirmations.submit(preferences.send_confirmation, outcome, settings)
    future.add_done_callback(_log_confirmation_crash)
    with _in_flight_lock:
        _in_flight[:] = [f for f in _in_flight if not f.done()]
        _in_flight.append(future)


def _log_confirmation_crash(future: Future[bool]) -> None:
    # send_confirmation logs and records its own failures; this catches anything that
    # escaped it, which a Future would otherwise keep to itself.
    exc = future.exception()
    if exc is not None:
        log.error("confirmation email crashed: %s: %s", type(exc).__name__, exc, exc_info=exc)


def wait_for_confirmations(timeout: float = 30.0) -> None:
    """Block until the confirmations queued so far are sent (tests, graceful shutdown)."""
    with _in_flight_lock:
        pending = list(_in_flight)
    futures_wait(pending, timeout=timeout)


def _rate_limited(email: str) -> float:
    """Seconds to wait if this client or this address asked too often, else 0."""
    throttle = _throttle()
    client = request.remote_addr or "unknown"
    wait = throttle.hit(f"ip:{client}")
    if wait:
        log.warning("subscribe: rate limit reached for client %s", client)
        return wait
    # Hashed: the shared store never holds addresses in clear.
    address = hashlib.sha256(email.encode()).hexdigest()[:32]
    wait = throttle.hit(f"email:{address}")
    if wait:
        log.warning("subscribe: rate limit reached for an address (sha256 %s…)", address[:12])
    return wait


@bp.route("/confirm/<token>", methods=["GET", "POST"])
def confirm(token: str) -> Response:
    _no_cookie()
    payload = _read("confirm", token)
    settings = _settings()
    with _db() as s:
        sub = _subscriber(s, payload)
        outcome = None
        if request.method == "POST":
            outcome = preferences.confirm(s, sub.id)
            log.info("subscriber %s confirm: %s", sub.id, outcome)
        body = render_template(
            "confirm.html",
            sub=sub,
            token=token,
            outcome=outcome,
            pending=sub.status == SubscriberStatus.PENDING.value,
            preferences_url=url_for(
                "pages.preferences_page",
                token=links.make_token("preferences", {"s": sub.id}, settings),
            ),
        )
    return make_response(body, 200)


# --- feedback ---------------------------------------------------------------------------


@bp.route("/feedback/<token>", methods=["GET", "POST"])
def feedback(token: str) -> Response:
    _no_cookie()
    payload = _read("feedback", token)
    vote, paper_id = payload.get("v"), payload.get("p")
    if vote not in (1, -1) or isinstance(vote, bool) or not isinstance(paper_id, str):
        raise links.TamperedLink("feedback", "this feedback link carries no paper or vote")
    settings = _settings()
    with _db() as s:
        sub = _subscriber(s, payload)
        paper = s.get(Paper, paper_id)
        if paper is None:
            raise NotFound(f"paper {paper_id!r} does not exist")
        previous = None
        recorded = False
        if request.method == "POST":
            previous = preferences.record_feedback(s, sub.id, paper.id, vote)
            recorded = True
            log.info("subscriber %s voted %+d on paper %s", sub.id, vote, paper.id)
        body = render_template(
            "feedback.html",
            sub=sub,
            paper=paper,
            vote=vote,
            recorded=recorded,
            previous=previous,
            token=token,
            other_url=url_for(
                "pages.feedback",
                token=links.make_token(
                    "feedback", {"s": sub.id, "p": paper.id, "v": -vote}, settings
                ),
            ),
            preferences_url=url_for(
                "pages.preferences_page",
                token=links.make_token("preferences", {"s": sub.id}, settings),
            ),
        )
    return make_response(body, 200)


# --- view in browser --------------------------------------------------------------------


@bp.get("/view/<token>")
def view(token: str) -> Response:
    _no_cookie()
    payload = _read("view", token)
    try:
        edition = date.fromisoformat(str(payload.get("d")))
    except ValueError:
        raise links.TamperedLink("view", "this view link carries no edition date") from None
    from worker.previews import edition_html

    with _db() as s:
        sub = _subscriber(s, payload)
        delivery = s.scalar(
            select(Delivery).where(
                Delivery.subscriber_id == sub.id,
                Delivery.edition_date == edition,
                Delivery.state.in_([st.value for st in ACCEPTED_DELIVERY_STATES]),
            )
        )
        if delivery is None:
            raise NotFound(f"no edition {edition} for subscriber {sub.id}")
        html = edition_html(s, delivery, _settings())
    response = make_response(html, 200)
    response.headers["Content-Security-Policy"] = EDITION_CSP
    return response
