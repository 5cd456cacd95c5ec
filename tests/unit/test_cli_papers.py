"""`papermail papers ...` through click's CliRunner on a real SQLite database."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tests.unit.test_papers_sources import serve
from worker.cli import main

DATA = Path(__file__).resolve().parent.parent / "data"
HF_FILE = DATA / "hf_daily_papers.json"
ARXIV_FILE = DATA / "arxiv_feed.xml"


def run(*args: str, input: str | bytes | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input)


def listed(*args: str) -> list[dict[str, Any]]:
    result = run("papers", "list", "--json", "--limit", "0", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize(
    "args", [["papers", "--help"], ["papers", "ingest", "--help"], ["papers", "list", "-h"]]
)
def test_help_has_an_example(args: list[str]) -> None:
    result = run(*args)
    assert result.exit_code == 0
    assert "Example:" in result.output
    assert "papermail papers " in result.output


def test_papers_is_registered_in_the_root_help() -> None:
    result = run("--help")
    assert result.exit_code == 0
    assert "papers" in result.output.split("Commands:")[1]


def test_ingest_file_then_reingest(settings: Any) -> None:
    result = run("papers", "ingest", str(HF_FILE))
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ingested 3 papers (3 new, 0 updated)")
    result = run("papers", "ingest", str(HF_FILE), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "source": str(HF_FILE),
        "format": "hf",
        "total": 3,
        "new": 0,
        "updated": 3,
    }
    ids = sorted(p["id"] for p in listed())
    assert ids == sorted(i["paper"]["id"] for i in json.loads(HF_FILE.read_text("utf-8")))


def test_ingest_stdin(settings: Any) -> None:
    lines = [
        {"id": "2611.00001", "title": "Zoë's paper", "upvotes": 4, "sample": True},
        {"id": "2611.00002", "title": "Second", "published_at": "2026-11-25T10:00:00Z"},
    ]
    text = "\n".join(json.dumps(obj, ensure_ascii=False) for obj in lines) + "\n\n"
    result = run("papers", "ingest", "-", input=text.encode("utf-8"))
    assert result.exit_code == 0, result.output
    assert "ingested 2 papers (2 new, 0 updated) from <stdin> [jsonl]" in result.output
    titles = {p["id"]: p["title"] for p in listed()}
    assert titles == {"2611.00001": "Zoë's paper", "2611.00002": "Second"}


def test_ingest_url_over_real_http(settings: Any) -> None:
    routes = {"/api/query": (200, "application/atom+xml", ARXIV_FILE.read_bytes())}
    with serve(routes) as base:
        result = run("papers", "ingest", f"{base}/api/query", "--format", "arxiv")
        missing = run("papers", "ingest", f"{base}/gone")
    assert result.exit_code == 0, result.output
    assert "ingested 2 papers (2 new, 0 updated)" in result.output
    assert {p["id"] for p in listed()} == {"2002.08797", "2305.01542"}
    assert missing.exit_code == 2
    assert f"error: {base}/gone: HTTP 404 Not Found" in missing.output


def test_bad_source_is_refused_and_changes_nothing(settings: Any, tmp_path: Path) -> None:
    assert run("papers", "ingest", str(HF_FILE)).exit_code == 0
    before = listed()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"id": "2403.17006", "title": "Overwritten?", "upvotes": 1}\n'
        '{"id": "2611.1", "title": "T", "upvotes": "abc"}\n',
        encoding="utf-8",
    )
    result = run("papers", "ingest", str(bad))
    assert result.exit_code == 2
    assert "error:" in result.output
    assert "record 2 (line 2): expected a number for 'upvotes', got 'abc'" in result.output
    assert "Traceback" not in result.output
    assert listed() == before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["papers", "ingest", str(HF_FILE), "--format", "arxiv"], "invalid XML at line 1"),
        (["papers", "ingest", str(ARXIV_FILE), "--format", "jsonl"], "record 1 (line 1)"),
        (["papers", "ingest", "no-such-file.json"], "no-such-file.json: no such file"),
        (["papers", "ingest", str(DATA / "trending_page.txt")], "cannot detect the format"),
    ],
)
def test_ingest_errors_are_one_clear_message(settings: Any, args: list[str], expected: str) -> None:
    result = run(*args)
    assert result.exit_code == 2
    assert expected in result.output
    assert listed() == []


def test_unknown_format_option_is_a_usage_error(settings: Any) -> None:
    result = run("papers", "ingest", str(HF_FILE), "--format", "csv")
    assert result.exit_code == 2
    assert "'csv' is not one of 'hf', 'arxiv', 'jsonl'" in result.output


def test_commands_need_the_schema(env: Any) -> None:
    for args in (["papers", "ingest", str(HF_FILE)], ["papers", "list"]):
        result = run(*args)
        assert result.exit_code == 1
        assert "run `papermail db upgrade` first" in result.output


def test_list_table_date_filter_and_limit(settings: Any) -> None:
    assert run("papers", "ingest", str(HF_FILE)).exit_code == 0
    items = json.loads(HF_FILE.read_text("utf-8"))
    result = run("papers", "list")
    assert result.exit_code == 0, result.output
    header, *rows = result.output.splitlines()
    assert header.split() == ["id", "published", "upvotes", "title"]
    assert len(rows) == 3
    # Newest first; long titles are shortened to keep one paper per line.
    by_date = sorted(items, key=lambda i: i["publishedAt"], reverse=True)
    assert [r.split()[0] for r in rows] == [i["paper"]["id"] for i in by_date]
    longest = max(items, key=lambda i: len(i["paper"]["title"]))
    line = next(r for r in rows if r.startswith(longest["paper"]["id"]))
    assert line.endswith("…") and longest["paper"]["title"] not in line

    day = datetime.fromisoformat(items[1]["publishedAt"]).astimezone(UTC).date()
    result = run("papers", "list", "--date", day.isoformat())
    assert result.exit_code == 0
    assert [r.split()[0] for r in result.output.splitlines()[1:]] == [items[1]["paper"]["id"]]
    dated = listed("--date", day.isoformat())
    assert [p["id"] for p in dated] == [items[1]["paper"]["id"]]
    assert dated[0]["authors"] == [a["name"] for a in items[1]["paper"]["authors"]]
    assert dated[0]["published_at"].startswith(day.isoformat())

    result = run("papers", "list", "--limit", "1")
    assert len(result.output.splitlines()) == 3  # header, one paper, "first 1" note
    assert "use --limit N" in result.output

    result = run("papers", "list", "--date", "1999-01-01")
    assert result.exit_code == 0
    assert "no papers for 1999-01-01" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--date", "25/11/2026"], "'25/11/2026' is not a date; use YYYY-MM-DD"),
        (["--limit", "-1"], "-1 is not in the range x>=0"),
    ],
)
def test_list_bad_options(settings: Any, args: list[str], expected: str) -> None:
    result = run("papers", "list", *args)
    assert result.exit_code == 2
    assert expected in result.output
