"""`papermail stats` as an operator reads it: 100 columns, local human times, no stray
colour codes off a terminal, small samples marked, "no edition on D"."""

from __future__ import annotations

import json
import re

from click.testing import CliRunner

from tests.conftest import FIXED_NOW
from worker import delivery
from worker.cli import main
from worker.config import Settings
from worker.db import session_scope
from worker.papers import load_sample_papers
from worker.subscribers import SubscriberInput, add_subscriber


def _sent(settings: Settings) -> None:
    with session_scope() as s:
        load_sample_papers(s, now=FIXED_NOW)
        add_subscriber(s, SubscriberInput("ada@example.org", topics="pruning"), confirmed=True)
    _, out = delivery.run_in_process(FIXED_NOW.date(), settings=settings)
    assert out.sent == 1


def test_stats_fits_100_columns_with_human_times_and_no_ansi(settings: Settings) -> None:
    _sent(settings)
    result = CliRunner().invoke(main, ["stats", "--date", FIXED_NOW.date().isoformat()])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 100, result.output
    assert "\x1b[" not in result.output
    assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:", result.output)  # no raw ISO stamps
    assert re.search(r"started \w{3} \d{1,2} \w{3} \d\d:\d\d", result.output), result.output
    # One accepted email, far below the minimum sample: the rates are marked.
    assert "0.00*" in result.output
    assert "* fewer than 200 accepted emails" in result.output


def test_stats_of_a_date_without_an_edition_says_so(settings: Settings) -> None:
    _sent(settings)
    result = CliRunner().invoke(main, ["stats", "--date", "2020-01-01"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "no edition on 2020-01-01: nothing was planned that day; "
        "`papermail stats` lists the recent ones"
    )
    as_json = CliRunner().invoke(main, ["stats", "--date", "2020-01-01", "--json"])
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["editions"] == []
    assert "no edition on 2020-01-01" in as_json.stderr


def test_stats_fetch_lines_fit_100_columns_with_long_errors(settings: Settings) -> None:
    from worker.models import PaperFetch

    _sent(settings)
    error = "HTTPError: 503 Service Unavailable from https://huggingface.co/api/daily_papers" + (
        "?date=2026-11-27&limit=100 retrying\n after backoff " * 6
    )
    with session_scope() as s:
        day = FIXED_NOW.date()
        s.add(
            PaperFetch(
                source="hf", fetch_date=day, status="failed", error=error,
                started_at=FIXED_NOW, finished_at=FIXED_NOW,
            )
        )  # fmt: skip
        s.add(
            PaperFetch(
                source="arxiv", fetch_date=day, status="ok",
                started_at=FIXED_NOW, finished_at=FIXED_NOW, requests=12_345, pages=9_999,
                bytes=98_765_432_109, papers=123_456, new=123_456, updated=654_321,
            )
        )  # fmt: skip
    result = CliRunner().invoke(main, ["stats", "--date", FIXED_NOW.date().isoformat()])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 100, result.output
    [failed] = [line for line in lines if " failed " in line and "hf" in line]
    assert len(failed) == 100 and failed.endswith("…") and "HTTPError: 503" in failed
    [ok] = [line for line in lines if "arxiv" in line]
    assert "123456 papers" in ok
    # The whole error stays in the JSON.
    out = CliRunner().invoke(main, ["stats", "--date", day.isoformat(), "--json"]).stdout
    assert [f["error"] for f in json.loads(out)["fetches"] if f["source"] == "hf"] == [error]
