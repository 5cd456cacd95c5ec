"""Operator commands: resend (every refusal and the race), stats, sending pause/resume."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from tests.conftest import FIXED_NOW
from worker import delivery, operations
from worker.cli import main
from worker.config import Settings
from worker.db import session_scope
from worker.models import Delivery, DeliveryAttempt, Paper, Subscriber
from worker.papers import load_sample_papers
from worker.subscribers import SubscriberInput, add_subscriber

NOW = FIXED_NOW  # the unit tests' fixed clock (tests/conftest.py)
TODAY = NOW.date().isoformat()


@pytest.fixture
def sent_edition(settings: Settings) -> Settings:
    with session_scope() as s:
        load_sample_papers(s, now=NOW)
        for email, topics in [
            ("ada@example.org", "pruning"),
            ("grace@example.org", "gaussian processes"),
            ("alan@example.org", ""),
        ]:
            add_subscriber(s, SubscriberInput(email, topics=topics), confirmed=True)
    _, out = delivery.run_in_process(NOW.date(), settings=settings)
    assert out.sent == 3
    return settings


def cli(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def eml_count(settings: Settings, email: str) -> int:
    return sum(1 for _ in Path(settings.outbox_dir).rglob(f"*{email}*.eml"))


def set_state(email: str, state: str) -> int:
    with session_scope() as s:
        d = s.scalar(select(Delivery).join(Delivery.subscriber).where(Subscriber.email == email))
        d.state = state
        return d.id


def test_resend_sent_needs_force(sent_edition: Settings) -> None:
    r = cli("resend", "--date", TODAY, "--subscriber", "ada@example.org")
    assert r.exit_code == 1 and "use --force" in r.output
    assert eml_count(sent_edition, "ada@example.org") == 1
    r = cli(
        "resend",
        "--date",
        TODAY,
        "--subscriber",
        "ada@example.org",
        "--force",
        "--reason",
        "reader lost it",
    )
    assert r.exit_code == 0, r.output
    assert "re-sent 1" in r.output
    assert eml_count(sent_edition, "ada@example.org") == 2
    with session_scope() as s:
        d = s.scalar(
            select(Delivery).join(Delivery.subscriber).where(Subscriber.email == "ada@example.org")
        )
        kinds = [(a.kind, a.reason) for a in d.attempts_log]
    assert ("resend", "reader lost it") in kinds and kinds[0][0] == "send"


def test_resend_carries_the_same_papers(sent_edition: Settings) -> None:
    with session_scope() as s:
        before = [
            dp.paper_id
            for dp in s.scalar(
                select(Delivery)
                .join(Delivery.subscriber)
                .where(Subscriber.email == "grace@example.org")
            ).papers
        ]
    set_state("grace@example.org", "failed")
    r = cli("resend", "--date", TODAY, "--state", "failed", "--json")
    data = json.loads(r.stdout)
    assert r.exit_code == 0 and data["sent"] == 1
    assert data["items"][0]["papers"] == before


def test_resend_dry_run_changes_nothing(sent_edition: Settings) -> None:
    set_state("alan@example.org", "unknown")
    r = cli("resend", "--date", TODAY, "--state", "unknown", "--dry-run")
    assert r.exit_code == 0 and "would resend" in r.output and "alan@example.org" in r.output
    with session_scope() as s:
        assert (
            s.scalar(
                select(Delivery.state)
                .join(Delivery.subscriber)
                .where(Subscriber.email == "alan@example.org")
            )
            == "unknown"
        )
    assert eml_count(sent_edition, "alan@example.org") == 1


def test_resend_refuses_suppressed_unless_confirmed(sent_edition: Settings) -> None:
    set_state("ada@example.org", "bounced")
    with session_scope() as s:
        s.execute(
            update(Subscriber).where(Subscriber.email == "ada@example.org").values(status="bounced")
        )
    r = cli("resend", "--date", TODAY, "--state", "bounced")
    assert r.exit_code == 1 and "suppressed" in r.output
    r = cli("resend", "--date", TODAY, "--state", "bounced", "--include-suppressed", input="n\n")
    assert r.exit_code != 0 and "not confirmed" in r.output
    assert eml_count(sent_edition, "ada@example.org") == 1
    r = cli("resend", "--date", TODAY, "--state", "bounced", "--include-suppressed", input="y\n")
    assert r.exit_code == 0, r.output
    assert eml_count(sent_edition, "ada@example.org") == 2


def test_resend_bad_arguments(sent_edition: Settings) -> None:
    assert cli("resend", "--state", "failed").exit_code == 2  # no --date
    r = cli("resend", "--date", TODAY)
    assert r.exit_code == 2 and "exactly one of" in r.output
    r = cli("resend", "--date", TODAY, "--subscriber", "nobody@example.org")
    assert r.exit_code == 1 and "no subscriber" in r.output
    r = cli("resend", "--date", "2020-01-01", "--subscriber", "ada@example.org")
    assert r.exit_code == 1 and "has no edition" in r.output
    r = cli("resend", "--date", "yesterday-ish", "--state", "failed")
    assert r.exit_code == 2


def test_resend_refuses_in_flight(sent_edition: Settings) -> None:
    set_state("ada@example.org", "sending")
    r = cli("resend", "--date", TODAY, "--subscriber", "ada@example.org", "--force")
    assert r.exit_code == 1 and "still sending" in r.output


def test_resend_racing_a_running_edition_sends_once(sent_edition: Settings) -> None:
    """The operator re-queues a failed delivery while an edition worker holds the same id:
    both race to claim it; exactly one email goes out."""
    did = set_state("grace@example.org", "failed")
    with session_scope() as s:
        plan = operations.plan_resend(s, NOW.date(), state="failed")
        assert operations.requeue_for_resend(s, plan.to_send, reason="race") == [did]
    # A second operator (or a stale plan) can no longer re-queue it.
    with session_scope() as s:
        assert operations.requeue_for_resend(s, plan.to_send, reason="again") == []
    barrier = threading.Barrier(2)
    outcomes = []

    def worker(kind: str) -> None:
        barrier.wait()
        outcomes.append(
            delivery.process_deliveries([did], settings=sent_edition, attempt_kind=kind)
        )

    threads = [threading.Thread(target=worker, args=(k,)) for k in ("send", "resend")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(o.sent for o in outcomes) == 1
    assert eml_count(sent_edition, "grace@example.org") == 2  # original + one resend
    with session_scope() as s:
        n = len(
            s.scalars(
                select(DeliveryAttempt).where(
                    DeliveryAttempt.delivery_id == did, DeliveryAttempt.outcome == "sent"
                )
            ).all()
        )
    assert n == 2


def test_stats_json_and_exit_codes(sent_edition: Settings) -> None:
    r = cli("stats", "--json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    ed = data["editions"][0]
    assert ed["edition"] == TODAY and ed["states"]["sent"] == 3 and ed["total"] == 3
    assert set(ed) >= {
        "bounce_rate",
        "complaint_rate",
        "bounce_threshold",
        "started_at",
        "ended_at",
        "send_rate_per_second",
        "oldest_pending_at",
    }
    set_state("alan@example.org", "failed")
    r = cli("stats", "--date", TODAY)
    assert r.exit_code == 1 and " fail " in r.output.splitlines()[0]
    # No edition that day: said, exit 1 (tests/unit/test_cli_stats.py has the text).
    r = cli("stats", "--date", "2001-01-01", "--json")
    assert r.exit_code == 1 and json.loads(r.stdout.split("\nno edition")[0])["editions"] == []


def test_sending_pause_and_resume(sent_edition: Settings) -> None:
    assert "active" in cli("sending", "status").output
    r = cli("sending", "pause", "--reason", "investigating")
    assert r.exit_code == 0
    status = json.loads(cli("sending", "status", "--json").stdout)
    assert status == {"paused": True, "reason": "investigating"}
    assert cli("stats").exit_code == 1
    assert "resumed" in cli("sending", "resume").output
    assert "not paused" in cli("sending", "resume").output


@pytest.mark.parametrize(
    "args", [["resend"], ["stats"], ["sending"], ["digest", "run"], ["digest", "preview"], ["demo"]]
)
def test_help_has_an_example(args: list[str], env: dict[str, str]) -> None:
    r = cli(*args, "--help")
    assert r.exit_code == 0 and "Example" in r.output


def test_resend_refused_while_paused_and_resets_attempts(sent_edition: Settings) -> None:
    did = set_state("grace@example.org", "failed")
    with session_scope() as s:
        s.execute(update(Delivery).where(Delivery.id == did).values(attempts=5))
    cli("sending", "pause", "--reason", "provider paused us")
    r = cli("resend", "--date", TODAY, "--state", "failed")
    assert r.exit_code == 1 and "sending is paused" in r.output
    with session_scope() as s:
        assert s.get(Delivery, did).state == "failed"  # nothing re-queued
    cli("sending", "resume")
    r = cli("resend", "--date", TODAY, "--state", "failed")
    assert r.exit_code == 0, r.output
    with session_scope() as s:
        d = s.get(Delivery, did)
        assert d.state == "sent" and d.attempts == 1  # a fresh retry budget


def test_preview_after_the_edition_shows_what_was_sent(sent_edition: Settings, tmp_path) -> None:
    out = tmp_path / "ada.html"
    r = cli("digest", "preview", "ada@example.org", "--date", TODAY, "-o", str(out))
    assert r.exit_code == 0 and "already sent" in r.output
    assert "Pruning" in out.read_text()
    r = cli("digest", "preview", "nobody@example.org")
    assert r.exit_code == 1 and "no subscriber" in r.output


def test_resume_sends_what_the_pause_left_pending(sent_edition: Settings) -> None:
    from datetime import timedelta

    tomorrow = NOW.date() + timedelta(days=1)
    cli("sending", "pause", "--reason", "quota")
    with session_scope() as s:
        planned = delivery.plan_edition(s, tomorrow, now=NOW)
    _, out = delivery.run_in_process(tomorrow, settings=sent_edition)
    assert out.paused and out.sent == 0
    r = cli("sending", "resume", "--no-send")
    assert "resumed" in r.output
    cli("sending", "pause", "--reason", "again")
    r = cli("sending", "resume")
    assert r.exit_code in (0, 1), r.output
    with session_scope() as s:
        counts = delivery.edition_counts(s, tomorrow)
    assert counts["pending"] == 0
    assert counts["sent"] + counts["skipped"] == len(planned.pending_ids)
    assert "no pending deliveries" in cli("sending", "resume").output


def _resend_json(*args: str) -> dict:
    r = cli("resend", "--date", TODAY, "--json", *args)
    return {"exit": r.exit_code, **json.loads(r.stdout)}


def _by_row(data: dict) -> dict[int, tuple]:
    return {
        i["delivery_id"]: (i["email"], i["action"], i["result"], i["result_why"])
        for i in data["items"]
    }


def test_resend_dry_run_predicts_the_real_outcome_per_row(settings: Settings) -> None:
    """The dry run runs the real resend's decisions: on the same data, for every row, the
    forecast is what the real resend then does (sent, skipped and why, failed and why)."""
    _dry_run_predicts_the_real_outcome(settings)


def test_resend_dry_run_predicts_the_real_outcome_on_postgres(pg_env: dict[str, str]) -> None:
    """The same on PostgreSQL (its SAVEPOINTs and rollback, not SQLite's)."""
    from worker.config import get_settings

    _dry_run_predicts_the_real_outcome(get_settings())


def _dry_run_predicts_the_real_outcome(settings: Settings) -> None:
    with session_scope() as s:
        load_sample_papers(s, now=NOW)
        for email, topics in [
            ("ada@example.org", "pruning"),
            ("grace@example.org", "gaussian processes"),
            ("alan@example.org", ""),
            ("carol@example.org", "diffusion"),
            ("bob@example.org", "lattice quantum chromodynamics"),
        ]:
            add_subscriber(s, SubscriberInput(email, topics=topics), confirmed=True)
    delivery.run_in_process(NOW.date(), settings=settings)
    with session_scope() as s:
        states = dict(
            s.execute(select(Subscriber.email, Delivery.state).join(Delivery.subscriber)).all()
        )
    assert states["bob@example.org"] == "skipped", states  # nothing new for bob's topic
    for email in ("ada", "grace", "alan", "carol"):
        set_state(f"{email}@example.org", "failed")
    with session_scope() as s:
        subs = {x.email: x for x in s.scalars(select(Subscriber))}
        subs["ada@example.org"].status = "bounced"  # suppressed: refused
        subs["alan@example.org"].paused_until = NOW.date()  # paused: skipped at send time
        # An address stored before the door checked it: the mailer's reason, failed.
        subs["carol@example.org"].email = "cárol@example.org"
    emails_before = sum(1 for _ in Path(settings.outbox_dir).rglob("*.eml"))

    # "nothing new" stays skipped: the dry run no longer says it would be re-sent.
    dry = _resend_json("--state", "skipped", "--dry-run")
    real = _resend_json("--state", "skipped")
    assert _by_row(dry) == _by_row(real)
    assert [i["result"] for i in real["items"]] == ["skipped"]
    assert real["sent"] == 0 and real["skipped"] == 1
    text = cli("resend", "--date", TODAY, "--state", "skipped", "--dry-run").output
    assert "would skip" in text and "dry run: 0 would be re-sent, 1 skipped" in text

    dry = _resend_json("--state", "failed", "--dry-run")
    with session_scope() as s:  # the dry run changed nothing
        assert s.scalars(select(Delivery.state)).all().count("failed") == 4
    assert sum(1 for _ in Path(settings.outbox_dir).rglob("*.eml")) == emails_before
    real = _resend_json("--state", "failed")
    assert _by_row(dry) == _by_row(real)
    got = {i["email"]: (i["action"], i["result"]) for i in real["items"]}
    assert got == {
        "ada@example.org": ("refused", None),
        "grace@example.org": ("resend", "sent"),
        "alan@example.org": ("resend", "skipped"),
        "cárol@example.org": ("resend", "failed"),
    }
    why = {i["email"]: i["result_why"] for i in real["items"]}
    assert why["alan@example.org"].startswith("paused until")
    assert "ASCII" in why["cárol@example.org"]
    assert (real["sent"], real["skipped"], real["failed"]) == (1, 1, 1)


def test_preview_explain_prints_every_candidates_scores(settings: Settings) -> None:
    with session_scope() as s:
        load_sample_papers(s, now=NOW)
        n_papers = len(list(s.scalars(select(Paper.id))))
        add_subscriber(s, SubscriberInput("ada@example.org", topics="pruning"), confirmed=True)
    r = cli("digest", "preview", "ada@example.org", "--date", TODAY, "--explain", "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert rows and len(rows) <= n_papers
    picked = [x for x in rows if x["picked"]]
    assert picked and all(x["score"] is not None for x in picked)
    top = rows[0]
    assert top["topics"][0]["topic"] == "pruning" and top["topics"][0]["relevance"] > 0
    assert {"field_weight", "matched_terms"} <= set(top["topics"][0])
    assert {"trending", "freshness", "why_not", "categories", "title_names"} <= set(top)
    # Scores are the selection's own: best first, and no paper below a picked one is picked.
    scores = [x["score"] for x in rows if x["score"] is not None]
    assert scores == sorted(scores, reverse=True)
    r = cli("digest", "preview", "ada@example.org", "--date", TODAY, "--explain")
    assert r.exit_code == 0 and "pruning: relevance" in r.output and "picked (*)" in r.output
    r = cli("digest", "preview", "ada@example.org", "--json")
    assert r.exit_code != 0 and "--json goes with --explain" in r.output
