"""Every command given bad input says what to do in one line and exits non-zero: no
traceback. And the operator's second `demo` says that nothing new was sent, and changes
nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import FIXED_NOW
from worker.cli import main
from worker.config import Settings
from worker.db import session_scope
from worker.papers import load_sample_papers
from worker.subscribers import SubscriberInput, add_subscriber

MISSING = "/nonexistent-dir/nothing-here"

# (arguments, a word the one-line error must contain)
BAD_INPUTS: list[tuple[list[str], str]] = [
    (["digest", "preview", "ada@example.org", "-o", MISSING + "/x.html"], "nonexistent-dir"),
    (["digest", "preview", "nobody@example.org"], "nobody@example.org"),
    (["digest", "preview", "ada@example.org", "--date", "someday"], "YYYY-MM-DD"),
    (["digest", "run", "--date", "2026-13-40"], "YYYY-MM-DD"),
    (["papers", "ingest", MISSING + ".jsonl"], "nothing-here"),
    (["papers", "ingest", "/"], "/"),
    (["subscribers", "import", MISSING + ".csv"], "nothing-here"),
    (["subscribers", "show", "nobody@example.org"], "nobody@example.org"),
    (["subscribers", "add", "not-an-address"], "not-an-address"),
    (["subscribers", "add", "bob@example.org", "--timezone", "Mars/Olympus"], "Mars/Olympus"),
    (["subscribers", "suppress", "nobody@example.org", "--reason", "x"], "nobody@example.org"),
    (["subscribers", "unsuppress", "nobody@example.org", "--reason", "x"], "nobody@example.org"),
    (["resend", "--date", "2026-11-27", "--subscriber", "nobody@example.org"], "nobody"),
    (["resend", "--state", "failed"], "--date"),
    (["events", "apply", MISSING + ".json"], "nothing-here"),
    (["stats", "--date", "yesterday-ish"], "YYYY-MM-DD"),
    (["db", "downgrade", "no-such-revision"], "no-such-revision"),
]


@pytest.fixture
def ada(settings: Settings) -> Settings:
    with session_scope() as s:
        load_sample_papers(s, now=FIXED_NOW)
        add_subscriber(s, SubscriberInput("ada@example.org", topics="pruning"), confirmed=True)
    return settings


@pytest.mark.parametrize(("args", "word"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_no_traceback(args: list[str], word: str, ada: Settings) -> None:
    result = CliRunner().invoke(main, args)
    output = result.output
    assert result.exit_code != 0, output
    # An exception click did not turn into a message would be result.exception with
    # exit code 1 and no SystemExit: that is the traceback a user would see.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith(("error", "usage"))]
    assert errors, output
    assert word.lower() in output.lower(), output


def _tree(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_demo_twice_sends_nothing_new_and_changes_nothing(env: dict[str, str], tmp_path) -> None:
    first = CliRunner().invoke(main, ["demo"])
    assert first.exit_code == 0, first.output
    assert "4 sent, 1 skipped" in first.output
    before = _tree(tmp_path)
    second = CliRunner().invoke(main, ["demo"])
    assert second.exit_code == 0, second.output
    assert "nothing new was sent and nothing changed" in second.output
    assert "already done by an earlier run (4 sent, 1 skipped)" in second.output
    assert "updated" not in second.output and "skipped katherine" not in second.output
    assert ".html" in second.output  # the previews of the first run are still listed
    assert _tree(tmp_path) == before  # database, outbox and previews byte for byte
