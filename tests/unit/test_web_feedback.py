"""Feedback links and "view in browser", over HTTP; votes change the next digest."""

from __future__ import annotations

from datetime import timedelta

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from tests.unit.web_support import (
    add_papers,
    add_sub,
    html_links,
    make_client,
    outbox_messages,
    path_of,
    snapshot,
    token,
)
from worker import delivery, links
from worker.config import Settings
from worker.db import session_scope
from worker.models import Feedback, Paper, Subscriber, utcnow


@pytest.fixture
def client(settings: Settings) -> FlaskClient:
    return make_client(settings)


def _votes() -> dict[tuple[int, str], int]:
    with session_scope() as s:
        return {(f.subscriber_id, f.paper_id): f.vote for f in s.scalars(select(Feedback))}


def test_get_shows_the_paper_and_changes_nothing_post_records(
    client: FlaskClient, settings: Settings
) -> None:
    add_papers([("2611.20001", "Sparse Mixture of Experts for Speech")])
    sid = add_sub()
    url = "/feedback/" + token("feedback", settings, s=sid, p="2611.20001", v=1)
    before = snapshot(sid)
    page = client.get(url)
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert "Sparse Mixture of Experts for Speech" in html and "<button" in html
    assert client.head(url).status_code == 200
    assert snapshot(sid) == before and _votes() == {}
    done = client.post(url)
    assert done.status_code == 200 and "Thanks, noted" in done.get_data(as_text=True)
    assert "Set-Cookie" not in done.headers
    assert _votes() == {(sid, "2611.20001"): 1}
    client.post(url)  # again: still one row
    assert _votes() == {(sid, "2611.20001"): 1}
    # The page offers the opposite vote; it replaces the first.
    less = "/feedback/" + token("feedback", settings, s=sid, p="2611.20001", v=-1)
    assert 'action="' + less + '"' in done.get_data(as_text=True)
    client.post(less)
    assert _votes() == {(sid, "2611.20001"): -1}


@pytest.mark.parametrize(
    "payload, status",
    [
        ({"p": "2611.20001", "v": 5}, 400),  # signed, but not a vote
        ({"p": "2611.20001"}, 400),
        ({"p": "no-such-paper", "v": 1}, 404),
    ],
)
def test_bad_feedback_payloads_change_nothing(
    client: FlaskClient, settings: Settings, payload: dict[str, object], status: int
) -> None:
    add_papers([("2611.20001", "Sparse Mixture of Experts for Speech")])
    sid = add_sub()
    url = "/feedback/" + links.make_token("feedback", {"s": sid, **payload}, settings)
    assert client.post(url).status_code == status
    assert _votes() == {}


def test_votes_change_the_next_digest(client: FlaskClient, settings: Settings) -> None:
    """Two identical subscribers get the same first digest; one votes through the links
    in that email; on the next edition their digests differ as the votes say."""
    add_papers(
        [
            ("2611.30001", "Quantum Chemistry with Neural Wavefunctions"),
            ("2611.30002", "Vision Transformers for Image Segmentation"),
        ],
        hours_ago=5,
    )
    voter = add_sub("voter@example.org", max_papers="2")
    control = add_sub("control@example.org", max_papers="2")
    today = utcnow().date()
    delivery.run_in_process(today, settings=settings)
    [mail] = outbox_messages(settings, to="voter@example.org")
    votes = {}
    for url in html_links(mail):
        if "/feedback/" in url:
            payload = links.read_token("feedback", url.rsplit("/", 1)[1], settings)
            votes[(payload["p"], payload["v"])] = path_of(url, settings)
    # More like the quantum chemistry paper, less like the vision one.
    assert client.post(votes[("2611.30001", 1)]).status_code == 200
    assert client.post(votes[("2611.30002", -1)]).status_code == 200
    assert _votes() == {(voter, "2611.30001"): 1, (voter, "2611.30002"): -1}

    # The next day: one slot, and the vision paper is far more upvoted.
    with session_scope() as s:
        for sid in (voter, control):
            sub = s.get(Subscriber, sid)
            assert sub is not None
            sub.max_papers = 1
        now = utcnow()
        s.add_all(
            [
                Paper(
                    id="2611.40001",
                    title="Neural Wavefunctions for Quantum Chemistry at Scale",
                    abstract="Quantum chemistry simulations with neural wavefunctions.",
                    upvotes=3,
                    published_at=now - timedelta(hours=1),
                    ingested_at=now,
                ),
                Paper(
                    id="2611.40002",
                    title="Vision Transformers for Image Segmentation, Revisited",
                    abstract="Image segmentation with vision transformers.",
                    upvotes=80,
                    published_at=now - timedelta(hours=1),
                    ingested_at=now,
                ),
            ]
        )
    delivery.run_in_process(today + timedelta(days=1), settings=settings)

    def second_digest(address: str) -> str:
        mails = outbox_messages(settings, to=address)
        assert len(mails) == 2, address
        body = mails[-1].get_body(preferencelist=("html",))
        assert body is not None
        return str(body.get_content())

    assert "Revisited" in second_digest("control@example.org")
    voted = second_digest("voter@example.org")
    assert "Quantum Chemistry at Scale" in voted and "Revisited" not in voted


def test_view_in_browser_shows_the_edition_as_sent(client: FlaskClient, settings: Settings) -> None:
    add_papers([("2611.50001", "Robotic Grasping with Tactile Sensing")])
    sid = add_sub(topics=["robotic grasping"])
    today = utcnow().date()
    delivery.run_in_process(today, settings=settings)
    [mail] = outbox_messages(settings)
    view = next(u for u in html_links(mail) if "/view/" in u)
    before = snapshot(sid)
    response = client.get(path_of(view, settings))
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "Robotic Grasping with Tactile Sensing" in html
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert "Set-Cookie" not in response.headers
    assert snapshot(sid) == before
    # No edition that day: the friendly 404 page.
    other = "/view/" + token("view", settings, s=sid, d=(today - timedelta(days=3)).isoformat())
    missing = client.get(other)
    assert missing.status_code == 404 and "couldn" in missing.get_data(as_text=True)
    bad_date = "/view/" + token("view", settings, s=sid, d="someday")
    assert client.get(bad_date).status_code == 400
