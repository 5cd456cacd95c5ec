"""Streaming import and streamed --json listings: files bigger than one staging batch,
on SQLite and PostgreSQL. (Memory and time at 1M rows: bench/operator_scale.py.)"""

from __future__ import annotations

import json
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from worker import db
from worker import subscribers as subs
from worker.cli import main
from worker.cli.common import _dumps, echo_json
from worker.models import Paper, Subscriber, SubscriberLog

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
# Enough rows for three staging batches.
ROWS = 3 * subs._IMPORT_BATCH + 17


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    request.getfixturevalue("settings" if request.param == "sqlite" else "pg_env")
    return str(request.param)


def counts() -> tuple[int, int]:
    with db.session_scope() as s:
        return (
            s.scalar(select(func.count()).select_from(Subscriber)) or 0,
            s.scalar(select(func.count()).select_from(SubscriberLog)) or 0,
        )


def big_file(path: Path, tail: str = "") -> Path:
    body = "".join(f"reader{i}@example.org,llm; robots,{i % 50 + 1}\n" for i in range(ROWS))
    path.write_text("email,topics,max_papers\n" + body + tail, encoding="utf-8")
    return path


def test_a_bad_row_at_the_end_of_a_big_file_imports_nothing(backend: str, tmp_path: Path) -> None:
    path = big_file(tmp_path / "people.csv", tail="last@example.org,,0\n")
    last_line = ROWS + 2
    with db.session_scope() as session, pytest.raises(subs.ImportRejected) as info:
        subs.import_csv(session, path, confirmed=True)
    report = info.value.report
    assert (report.rows, report.created, report.imported) == (ROWS + 1, 0, False)
    assert [(r.line, r.email) for r in report.rejected] == [(last_line, "last@example.org")]
    assert counts() == (0, 0)

    result = CliRunner().invoke(main, ["subscribers", "import", str(path), "--confirmed"])
    assert result.exit_code == 2
    assert f"line {last_line} (last@example.org): max papers" in result.stderr
    assert counts() == (0, 0)

    with db.session_scope() as session:
        report = subs.import_csv(session, path, confirmed=True, skip_invalid=True)
    assert (report.created, len(report.rejected), report.imported) == (ROWS, 1, True)
    assert counts() == (ROWS, ROWS)


def test_duplicates_in_different_batches_are_merged(backend: str, tmp_path: Path) -> None:
    # Line 2 and the very last line name the same person, three batches apart.
    path = big_file(
        tmp_path / "people.csv", tail='READER0@Example.org,"vision, audio",\nother@x.org,,\n'
    )
    last = ROWS + 2
    with db.session_scope() as session:
        report = subs.import_csv(session, path, confirmed=True)
    assert report.merged == [{"email": "reader0@example.org", "lines": [2, last]}]
    assert (report.rows, report.created) == (ROWS + 2, ROWS + 1)
    with db.session_scope() as session:
        sub = subs.get_subscriber(session, "reader0@example.org")
        # Later non-empty cells win; the empty max_papers cell keeps the earlier value.
        assert (sub.topics, sub.max_papers) == (["vision", "audio"], 1)
        detail = session.scalar(
            select(SubscriberLog.detail).where(SubscriberLog.subscriber_id == sub.id)
        )
        assert f"people.csv lines 2, {last}; status active" in (detail or "")
        assert "topics: vision, audio" in (detail or "")
    assert counts() == (ROWS + 1, ROWS + 1)

    # Again: every address exists now, reported at its first line, nothing written.
    with db.session_scope() as session:
        again = subs.import_csv(session, path, confirmed=True)
    assert again.created == 0 and len(again.existing) == ROWS + 1
    assert again.existing[0] == {"email": "reader0@example.org", "line": 2, "status": "active"}
    assert counts() == (ROWS + 1, ROWS + 1)


def test_import_from_a_stream_of_unknown_size(backend: str, tmp_path: Path) -> None:
    path = big_file(tmp_path / "people.csv")
    with path.open(encoding="utf-8") as fh, db.session_scope() as session:
        report = subs.import_csv(session, fh, confirmed=False)
    assert report.created == ROWS


def test_the_line_of_a_bad_byte_is_named(settings: Any, tmp_path: Path) -> None:
    path = tmp_path / "mixed.csv"
    good = "".join(f"r{i}@example.org\n" for i in range(3000)).encode()
    path.write_bytes(b"email\n" + good + "zo\xeb@example.org\n".encode("latin-1"))
    with db.session_scope() as session, pytest.raises(subs.InvalidInput) as info:
        subs.import_csv(session, path)
    assert f"line {3002}" in str(info.value)
    assert f"at byte {6 + len(good) + 2}" in str(info.value)
    assert counts() == (0, 0)


def test_list_json_is_valid_complete_and_unchanged_in_format(backend: str) -> None:
    empty = CliRunner().invoke(main, ["subscribers", "list", "--json"])
    assert (empty.exit_code, empty.stdout) == (0, "[]\n")
    n = 2 * 1000 + 3  # more rows than one cursor batch
    with db.session_scope() as session:
        text = "email,topics\n" + "".join(f"u{i}@example.org,llm\n" for i in range(n))
        subs.import_csv(session, text, confirmed=True)
    result = CliRunner().invoke(main, ["subscribers", "list", "--json"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["email"] for r in rows] == [f"u{i}@example.org" for i in range(n)]
    with db.session_scope() as session:
        expected = [subs.subscriber_to_dict(s) for s in subs.list_subscribers(session)]
    # Byte for byte what the materialised list printed before streaming.
    assert result.stdout == _dumps(expected) + "\n"
    text_list = CliRunner().invoke(main, ["subscribers", "list"])
    assert text_list.stdout.splitlines()[-1] == f"{n:,}".replace(",", "") + " subscribers"
    assert len(text_list.stdout.splitlines()) == n + 2


def test_papers_list_json_streams_every_paper(backend: str) -> None:
    with db.session_scope() as session:
        for i in range(1203):
            session.add(Paper(id=f"2611.{i:05d}", title=f"Paper {i}", upvotes=i % 7))
    result = CliRunner().invoke(main, ["papers", "list", "--json", "--limit", "0"])
    assert result.exit_code == 0, result.stderr
    papers = json.loads(result.stdout)
    assert len(papers) == 1203 and len({p["id"] for p in papers}) == 1203
    limited = CliRunner().invoke(main, ["papers", "list", "--limit", "5"])
    assert len(limited.stdout.splitlines()) == 1 + 5 + 1  # header, rows, "(first 5 ...)"


def test_echo_json_streams_iterators_with_the_same_bytes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = {
        "z": [1, {"b": [date(2026, 1, 2)], "a": "é"}],
        "rows": [{"n": i, "when": datetime(2026, 1, 1, i)} for i in range(3)],
        "empty": [],
        "nested": {"deep": [[1, 2], []]},
    }

    def lazily(value: Any) -> Any:
        if isinstance(value, list):
            return (lazily(v) for v in value)
        if isinstance(value, dict):
            return {k: lazily(v) for k, v in value.items()}
        return value

    echo_json(lazily(data))
    assert capsys.readouterr().out == _dumps(data) + "\n"
    echo_json(iter([]))
    assert capsys.readouterr().out == "[]\n"


@pytest.mark.parametrize("ending", ["\r", "\r\n", "\n"])
def test_every_line_ending_imports(session: Any, tmp_path: Path, ending: str) -> None:
    """CR (old Mac exports), CRLF (Excel) and LF files give the same rows."""
    path = tmp_path / "people.csv"
    rows = ["email,topics", "ada@example.org,pruning", '"bob@example.org","a, b"']
    path.write_bytes(ending.join(rows).encode() + ending.encode())
    report = subs.import_csv(session, path, confirmed=True)
    assert report.created == 2 and report.rows == 2 and not report.rejected, report
    topics = dict(session.execute(select(Subscriber.email, Subscriber.topics)).all())
    assert topics == {"ada@example.org": ["pruning"], "bob@example.org": ["a", "b"]}


# A file with every reading hazard: a BOM, CRLF, a bare CR, a quoted cell spanning lines,
# multi-byte characters, blank lines, and rows with problems (so line numbers show).
TRICKY = (
    "\ufeffemail,topics,max_papers\r\n"
    "ada@example.org,réseaux,3\r\n"  # line 2
    '"bob@example.org","llm,\r\nrobots",4\r'  # lines 3-4, the second ended by a bare CR
    "\r\n"  # line 5: blank
    "zoë@example.org,,2\n"  # line 6: a non-ASCII local part, refused
    "cat@exämple.org,ünïcode,0\n"  # line 7: max papers 0
    'dan@example.org,"a\nb\nc",5\r\n'  # lines 8-10
    "eve@example.org,,6"  # line 11, no final line break
)


def import_outcome(session: Any, source: Any) -> tuple[Any, ...]:
    try:
        report = subs.import_csv(session, source, skip_invalid=True)
    except subs.InvalidInput as exc:
        session.rollback()
        return ("refused", str(exc))
    topics = dict(session.execute(select(Subscriber.email, Subscriber.topics)).all())
    session.rollback()  # every block size starts from the same empty database
    return (report.rows, [(r.line, r.reason) for r in report.rejected], report.created, topics)


@pytest.mark.parametrize("block", [1, 2, 3, 5, 7, 16, 64])
def test_any_block_size_reads_the_same_rows_and_lines(
    session: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    """Blocks are cut at line breaks: a CRLF, a quoted line break or a multi-byte
    character split across blocks reads the same as in one piece, from a file, text or a
    stream, and a bad byte is named at the same byte and line."""
    path = tmp_path / "tricky.csv"
    path.write_bytes(TRICKY.encode())
    bad = tmp_path / "bad.csv"
    bad.write_bytes(TRICKY.encode()[:-4] + b"\xff" + TRICKY.encode()[-4:])
    expected = [import_outcome(session, path), import_outcome(session, bad)]
    assert expected[0][0] == 6 and expected[0][2] == 4
    assert [line for line, _ in expected[0][1]] == [6, 7]
    assert f"at byte {len(TRICKY.encode()) - 4}, line 11" in expected[1][1]
    assert expected[0][3]["bob@example.org"] == ["llm", "robots"]
    assert expected[0][3]["dan@example.org"] == ["a b c"]
    monkeypatch.setattr(subs, "_READ_BLOCK", block)
    assert import_outcome(session, path) == expected[0]
    assert import_outcome(session, bad) == expected[1]
    assert import_outcome(session, TRICKY) == expected[0]
    with path.open(encoding="utf-8", newline="") as fh:
        assert import_outcome(session, fh) == expected[0]


def test_a_line_longer_than_a_block_is_read_whole(session: Any, tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    long_topics = "; ".join(f"{i:04d}" + "x" * 86 for i in range(1000))  # 92 KB: > a block
    assert len(long_topics) > subs._READ_BLOCK
    path.write_text(f'email,topics\nada@example.org,"{long_topics}"\nbob@example.org,llm\n')
    with pytest.raises(subs.ImportRejected) as info:
        subs.import_csv(session, path)
    (row,) = info.value.report.rejected
    assert (row.line, row.email) == (2, "ada@example.org")
    assert row.reason == "at most 20 topics are allowed, got 1000"
    assert info.value.report.rows == 2


def test_a_bad_byte_after_the_first_block_is_named(settings: Any, tmp_path: Path) -> None:
    path = tmp_path / "mixed.csv"
    good = "".join(f"reader{i}@example.org\n" for i in range(20000)).encode()
    assert len(good) > 3 * subs._READ_BLOCK
    path.write_bytes(b"email\r\n" + good + b"bad\xc3(@example.org\n")
    with db.session_scope() as session, pytest.raises(subs.InvalidInput) as info:
        subs.import_csv(session, path)
    assert f"at byte {7 + len(good) + 3}, line {20002}" in str(info.value)
    assert counts() == (0, 0)


def row_cells(rng: Any) -> dict[str, str]:
    """A CSV row's non-blank cells as import_csv passes them on: good and bad values of
    every column (a bad one in about one row of three), repeated often as in real lists,
    and sometimes unique."""
    good = {
        "email": [
            "ada@example.org",
            "Bob.Smith@Example.ORG",
            "x+tag@sub.lab.example.co.uk",
            "a@xn--bcher-kva.example",
            "postmaster@Example.org",
            "o'neil@example.org",
        ],
        "topics": [
            "llm",
            "llm; robots",
            "LLM, llm, Robots",
            "a;;b,,c",
            "  spaced   out  ; x",
            "tab\there",
            "réseaux, ünïcode",
            ",",
            "vision, audio",
            "x" * 100,
        ],
        "max_papers": ["1", "5", "50", "+7", "007"],
        "frequency": ["daily", "weekly", "WEEKLY", "Daily"],
        "weekday": ["mon", "Friday", "0", "6", "thu", "sun", "sat", "tue"],
        "send_hour": ["0", "7", "23", "08"],
        "timezone": ["UTC", "Europe/Paris", "Asia/Tokyo", "utc", "Etc/GMT+5"],
    }
    bad = {
        "email": [
            "zoë@example.org", "a@bücher.example", "foo@", "a@localhost", "a@x.test",
            "not an address", "a..b@example.org", '"q"@example.org', "a@[1.2.3.4]",
        ],
        "topics": ["x" * 101, "; ".join(f"t{i}" for i in range(21)), "ctl\x01x"],
        "max_papers": ["0", "51", "-3", "seven", "²", "3.5"],
        "frequency": ["monthly", "week"],
        "weekday": ["7", "t", "tu", "x", "-1"],
        "send_hour": ["24", "-1", "noon"],
        "timezone": ["Mars/Olympus", "Europe/Nowhere"],
    }  # fmt: skip
    raw: dict[str, str] = {}
    for column in good:
        roll = rng.random()
        if roll < 0.25 and column != "email":
            continue  # blank: the default
        if roll > 0.99:
            raw[column] = f"{rng.randrange(10**6)}{rng.choice(['', '@example.org'])}"
        else:
            raw[column] = rng.choice(bad[column] if rng.random() < 0.05 else good[column])
    return raw


def test_the_row_fast_path_stages_what_subscriber_input_does() -> None:
    """_RowParser.staged is SubscriberInput + _staged, faster: on rows of valid and invalid
    cells of every column it gives the same values, or leaves the row to SubscriberInput
    (which must then reject it, or accept an unusual address)."""
    import random

    rng = random.Random(5)
    parser = subs._RowParser()
    fast = accepted = 0
    for _ in range(20000):
        raw = row_cells(rng)
        try:
            expected: Any = subs._staged(subs.SubscriberInput(**raw))
            accepted += 1
        except subs.InvalidSubscriber:
            expected = None
        got = parser.staged([raw.get(name, "") for name in subs.CSV_COLUMNS])
        if got is not None:
            fast += 1
            assert got == expected, raw
        else:
            assert expected is None, raw  # every good address here is a plain one
    assert fast == accepted and accepted > 10000 and 20000 - accepted > 4000


@pytest.mark.parametrize("bits", [8, 1 << 27])
def test_rows_that_only_share_a_filter_bit_are_not_merged(
    backend: str, monkeypatch: pytest.MonkeyPatch, bits: int
) -> None:
    """The filter that picks the addresses to look at for duplicates may mark an address
    that never came before (with 8 bits, nearly all do): only real duplicates merge."""
    monkeypatch.setattr(subs, "_SEEN_BITS", bits)
    text = "email,max_papers,topics\n" + "".join(
        f"u{i}@example.org,{i % 50 + 1},\n" for i in range(300)
    )
    text += "U7@example.org,,vision\nu250@EXAMPLE.org,9,\n"  # lines 302 and 303
    with db.session_scope() as session:
        report = subs.import_csv(session, text, confirmed=True)
    assert report.merged == [
        {"email": "u7@example.org", "lines": [9, 302]},
        {"email": "u250@example.org", "lines": [252, 303]},
    ]
    assert (report.rows, report.created) == (302, 300)
    with db.session_scope() as session:
        u7, u250 = (subs.get_subscriber(session, f"u{i}@example.org") for i in (7, 250))
        assert (u7.max_papers, u7.topics, u250.max_papers) == (8, ["vision"], 9)
        rows = session.execute(select(Subscriber.email).order_by(Subscriber.id)).scalars()
        assert list(rows) == [f"u{i}@example.org" for i in range(300)]  # in file order
    assert counts() == (300, 300)
