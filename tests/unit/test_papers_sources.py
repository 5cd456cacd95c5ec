"""Parsers, format detection and source reading (files, URLs over real HTTP, stdin)."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from worker.errors import PapermailError
from worker.papers import (
    PaperRecord,
    PaperSourceError,
    default_urls,
    detect_format,
    dump_jsonl,
    load_source,
    parse,
    parse_arxiv,
    parse_hf,
    parse_jsonl,
    read_source,
)

DATA = Path(__file__).resolve().parent.parent / "data"
HF_FILE = DATA / "hf_daily_papers.json"
ARXIV_FILE = DATA / "arxiv_feed.xml"
SEED_LINES = (DATA / "trending_page.txt").read_text(encoding="utf-8").splitlines()


def hf_items() -> list[dict]:
    return json.loads(HF_FILE.read_text(encoding="utf-8"))


def error_of(fn, *args) -> PaperSourceError:  # type: ignore[no-untyped-def]
    with pytest.raises(PaperSourceError) as info:
        fn(*args)
    return info.value


# --------------------------------------------------------------------------- Hugging Face


def test_hf_fixture_parses_every_item() -> None:
    items = hf_items()
    records = parse_hf(HF_FILE.read_text(encoding="utf-8"))
    assert [r.id for r in records] == [item["paper"]["id"] for item in items]
    for record, item in zip(records, items, strict=True):
        paper = item["paper"]
        assert record.title == " ".join(paper["title"].split())
        assert record.title in SEED_LINES
        # Line breaks inside the summary become single spaces: the seed's exact abstract.
        assert record.abstract in SEED_LINES
        assert record.authors == [a["name"] for a in paper["authors"]]
        assert record.upvotes == paper["upvotes"]
        # The item-level publishedAt (featured on Daily Papers) wins over the arXiv date.
        assert record.published_at == datetime.fromisoformat(item["publishedAt"])
        assert record.published_at.tzinfo is not None
        assert record.url == record.hf_url == f"https://huggingface.co/papers/{record.id}"
        assert record.pdf_url == f"https://arxiv.org/pdf/{record.id}"
    assert "\n" in items[0]["paper"]["summary"]  # the fixture really exercises normalisation


def test_hf_fallbacks_and_extra_fields() -> None:
    items = hf_items()[:1]
    del items[0]["publishedAt"]
    del items[0]["paper"]["title"]
    items[0]["paper"]["upvotes"] = 12.0
    items[0]["paper"]["brandNewField"] = {"nested": [1, 2]}
    record = parse_hf(json.dumps(items))[0]
    # Without the item's date, the day it was featured (submittedOnDailyAt), not arXiv's.
    featured = items[0]["paper"]["submittedOnDailyAt"]
    assert record.published_at == datetime.fromisoformat(featured)
    assert record.title == items[0]["title"]
    assert record.upvotes == 12
    del items[0]["paper"]["submittedOnDailyAt"]
    record = parse_hf(json.dumps(items))[0]
    assert record.published_at == datetime.fromisoformat(items[0]["paper"]["publishedAt"])


def test_hf_minimal_item_gets_defaults() -> None:
    record = parse_hf('[{"paper": {"id": "2401.00001", "title": "T"}}]')[0]
    assert record == PaperRecord(id="2401.00001", title="T")
    # No upvotes given is not zero upvotes: a merge keeps what another source stored.
    assert (record.abstract, record.authors, record.upvotes, record.published_at) == (
        "",
        [],
        None,
        None,
    )


def test_hf_truncated_json_says_where() -> None:
    text = HF_FILE.read_text(encoding="utf-8")
    cut = text[: len(text) // 2]
    err = error_of(parse_hf, cut, "daily.json")
    line_count = cut.count("\n") + 1
    assert str(err).startswith("daily.json (hf): invalid JSON at line ")
    assert "truncated" in str(err)
    reported_line = int(str(err).split("at line ")[1].split(",")[0])
    assert line_count - 1 <= reported_line <= line_count


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda it: (it["paper"].pop("title"), it.pop("title")), "field 'paper.title' is missing"),
        (lambda it: it["paper"].pop("id"), "field 'paper.id' is missing"),
        (lambda it: it.pop("paper"), "field 'paper' is missing"),
        (
            lambda it: it["paper"].update(id=2403.17),
            "expected a string for 'paper.id', got the number 2403.17",
        ),
        (lambda it: it["paper"].update(title="   "), "field 'paper.title' is empty"),
        (
            lambda it: it["paper"].update(upvotes="abc"),
            "expected a number for 'paper.upvotes', got 'abc'",
        ),
        (
            lambda it: it["paper"].update(upvotes=True),
            "expected a number for 'paper.upvotes', got true",
        ),
        (lambda it: it["paper"].update(upvotes=-3), "non-negative number for 'paper.upvotes'"),
        (lambda it: it["paper"].update(upvotes=2.5), "whole number for 'paper.upvotes'"),
        (lambda it: it["paper"].update(authors="Ada"), "expected a list for 'paper.authors'"),
        (lambda it: it["paper"]["authors"].__setitem__(1, {"name": 7}), "'paper.authors[1].name'"),
        (lambda it: it.update(publishedAt="last tuesday"), "ISO-8601 date-time for 'publishedAt'"),
        (lambda it: it["paper"].update(summary=["a"]), "expected a string for 'paper.summary'"),
    ],
)
def test_hf_bad_record_names_record_and_field(mutate, expected) -> None:  # type: ignore[no-untyped-def]
    items = hf_items()
    mutate(items[1])
    err = error_of(parse_hf, json.dumps(items), "daily.json")
    assert "record 2 (JSON index 1): " in str(err)
    assert expected in str(err)
    assert err.errors == [str(err).split("daily.json (hf): ")[1].split("; nothing")[0]]


def test_hf_collects_every_bad_record() -> None:
    items = hf_items()
    items[0]["paper"].pop("title")
    items[0].pop("title")
    items[2]["paper"]["upvotes"] = "many"
    err = error_of(parse_hf, json.dumps(items), "daily.json")
    assert len(err.errors) == 2
    assert err.errors[0].startswith("record 1 (JSON index 0): field 'paper.title'")
    assert err.errors[1].startswith("record 3 (JSON index 2): expected a number")
    assert "2 bad records, nothing was ingested" in str(err)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"paper": {}}', "record 1 (JSON index 0): field 'paper.id' is missing"),
        ('"text"', "expected a JSON list of daily-papers items or paper objects"),
        ("[1]", "record 1 (JSON index 0): expected an object"),
    ],
)
def test_hf_wrong_shape(text: str, expected: str) -> None:
    assert expected in str(error_of(parse_hf, text))


# --------------------------------------------------------------------------- arXiv Atom


def test_arxiv_fixture() -> None:
    records = parse_arxiv(ARXIV_FILE.read_text(encoding="utf-8"))
    assert [r.id for r in records] == ["2002.08797", "2305.01542"]
    first = records[0]
    assert first.title == "Robust Pruning at Initialization"  # wrapped in the feed
    assert first.abstract == SEED_LINES[3]
    assert first.authors == ["Soufiane Hayou", "Jean-Francois Ton", "Arnaud Doucet", "Yee Whye Teh"]
    assert first.published_at == datetime(2020, 2, 20, 15, 12, 40, tzinfo=UTC)
    assert first.url == "http://arxiv.org/abs/2002.08797v5"
    assert first.pdf_url == "http://arxiv.org/pdf/2002.08797v5"
    assert first.hf_url == "https://huggingface.co/papers/2002.08797"
    assert records[1].title == SEED_LINES[4]
    assert records[1].abstract == SEED_LINES[5]
    assert all(r.upvotes is None for r in records)  # arXiv has no upvotes: it says nothing


def _feed(*entries: str) -> str:
    body = "".join(f"<entry>{e}</entry>" for e in entries)
    return f'<?xml version="1.0"?><feed xmlns="http://www.w3.org/2005/Atom">{body}</feed>'


def test_arxiv_old_style_id_and_no_links() -> None:
    text = _feed("<id>http://arxiv.org/abs/hep-th/9901001v3</id><title>Old</title>")
    record = parse_arxiv(text)[0]
    assert record.id == "hep-th/9901001"
    assert record.pdf_url == "https://arxiv.org/pdf/hep-th/9901001"
    assert record.published_at is None


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("<id>http://arxiv.org/abs/2401.00002v1</id>", "entry 2: field 'title' is missing"),
        (
            "<id>http://arxiv.org/abs/2401.00002v1</id><title> </title>",
            "entry 2: field 'title' is empty",
        ),
        ("<title>No id</title>", "entry 2: field 'id' is missing"),
        ("<id>urn:uuid:1234</id><title>T</title>", "entry 2: expected an arXiv abstract URL"),
        (
            "<id>http://arxiv.org/abs/2401.00002v1</id><title>T</title><published>soon</published>",
            "entry 2: expected an ISO-8601 date-time for 'published'",
        ),
    ],
)
def test_arxiv_bad_entry(entry: str, expected: str) -> None:
    good = "<id>http://arxiv.org/abs/2401.00001v1</id><title>Good</title>"
    err = error_of(parse_arxiv, _feed(good, entry), "feed.xml")
    assert expected in str(err)
    assert str(err).startswith("feed.xml (arxiv): entry 2")


def test_arxiv_truncated_xml() -> None:
    text = ARXIV_FILE.read_text(encoding="utf-8")
    err = error_of(parse_arxiv, text[: len(text) // 2], "feed.xml")
    assert str(err).startswith("feed.xml (arxiv): invalid XML at line ")
    assert "truncated" in str(err)
    err = error_of(parse_arxiv, "<feed><entry></feed>", "feed.xml")
    assert str(err) == "feed.xml (arxiv): invalid XML at line 1, column 16: mismatched tag"


def test_arxiv_api_error_feed_is_reported() -> None:
    text = _feed(
        "<id>http://arxiv.org/api/errors#incorrect_id_format_for_1234</id><title>Error</title>"
        "<summary>incorrect id format for 1234</summary>"
    )
    assert "arXiv API returned an error: incorrect id format for 1234" in str(
        error_of(parse_arxiv, text)
    )


def test_arxiv_rejects_non_atom_xml() -> None:
    assert "expected an Atom <feed>" in str(error_of(parse_arxiv, "<rss><channel/></rss>"))


# --------------------------------------------------------------------------- JSON Lines


def test_jsonl_good_with_blank_lines_sample_flag_and_defaults() -> None:
    lines = [
        "",
        json.dumps(
            {
                "id": "2401.12345",
                "title": "  A   title ",
                "abstract": "Line one.\nLine two.",
                "authors": ["Zoë Müller", "Łukasz Kaiser"],
                "upvotes": 7,
                "published_at": "2026-11-25T20:00:00+02:00",
                "url": "https://example.org/p",
                "sample": True,
            },
            ensure_ascii=False,
        ),
        "   ",
        '{"id": "local-7", "title": "Undated", "published_at": "2026-11-24"}',
        "",
    ]
    records = parse_jsonl("\n".join(lines))
    assert len(records) == 2
    first, second = records
    assert first.title == "A title" and first.abstract == "Line one. Line two."
    assert first.authors == ["Zoë Müller", "Łukasz Kaiser"]
    assert first.published_at == datetime(2026, 11, 25, 18, 0, tzinfo=UTC)
    assert first.url == "https://example.org/p"
    assert first.hf_url == "https://huggingface.co/papers/2401.12345"
    assert second.published_at == datetime(2026, 11, 24, tzinfo=UTC)  # bare date: UTC
    assert second.pdf_url is None  # not an arXiv id: no guessed PDF link


def test_jsonl_roundtrip_through_dump() -> None:
    records = parse_hf(HF_FILE.read_text(encoding="utf-8"))
    assert parse_jsonl(dump_jsonl(records)) == records


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"id": "x2"}', "field 'title' is missing"),
        ('{"id": "x2", "title": null}', "expected a string for 'title', got null"),
        ('{"title": "T"}', "field 'id' is missing"),
        ('{"id": 5, "title": "T"}', "expected a string for 'id', got the number 5"),
        (
            '{"id": "x2", "title": "T", "upvotes": "abc"}',
            "expected a number for 'upvotes', got 'abc'",
        ),
        ('{"id": "x2", "title": "T", "authors": "Ada"}', "expected a list of names for 'authors'"),
        ('{"id": "x2", "title": "T", "authors": ["A", 3]}', "expected a string for 'authors[1]'"),
        (
            '{"id": "x2", "title": "T", "published_at": "yesterday"}',
            "ISO-8601 date-time for 'published_at'",
        ),
        ('{"id": "x2", "title": "T", "published_at": 1732500000}', "ISO-8601 date-time string"),
        ('{"id": "x2", "title": "T", "upvote": 3}', "unknown field 'upvote'"),
        ('{"id": "x2", "title": "T", "sample": "yes"}', "expected true or false for 'sample'"),
        ('{"id": "x 2", "title": "T"}', "field 'id' contains spaces"),
        ('{"id": "' + "9" * 65 + '", "title": "T"}', "longer than 64 characters"),
        ('["x2", "T"]', "expected a JSON object, got a list"),
        ('{"id": "x2", "title": "T"', "invalid JSON at column 26"),
    ],
)
def test_jsonl_bad_line_names_record_line_and_field(line: str, expected: str) -> None:
    text = '{"id": "x1", "title": "One"}\n\n' + line + "\n"
    err = error_of(parse_jsonl, text, "p.jsonl")
    assert str(err).startswith("p.jsonl (jsonl): record 2 (line 3): ")
    assert expected in str(err)


def test_jsonl_truncated_last_line_is_flagged() -> None:
    err = error_of(parse_jsonl, '{"id": "x1", "title": "One"}\n{"id": "x2", "ti', "p.jsonl")
    assert "record 2 (line 2): invalid JSON: unterminated string starting at column 14" in str(err)
    assert "truncated" in str(err)
    err = error_of(parse_jsonl, '{"id": "x1", "title": "One"}\n{"id": "x2", "title": "T",', "p")
    assert "record 2 (line 2): invalid JSON at column 27: Expecting property name" in str(err)
    assert "truncated" in str(err)


def test_jsonl_reports_at_most_twenty_errors_but_counts_all() -> None:
    text = "\n".join(json.dumps({"id": f"x{i}"}) for i in range(25))
    err = error_of(parse_jsonl, text)
    assert len(err.errors) == 25
    assert "25 bad records" in str(err)
    assert "... and 5 more" in str(err)
    assert str(err).count("field 'title' is missing") == 20


# --------------------------------------------------------------------------- detection


def test_detect_format_of_each_fixture() -> None:
    assert detect_format(HF_FILE.read_text(encoding="utf-8")) == "hf"
    assert detect_format(ARXIV_FILE.read_text(encoding="utf-8")) == "arxiv"
    assert detect_format('\ufeff\n{"id": "a", "title": "b"}\n') == "jsonl"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the source is empty"),
        ("  \n\n", "the source is empty"),
        ("id,title\n1,x\n", "cannot detect the format (starts with 'id,title"),
        ("<html><body>Not found</body></html>", "XML but not an Atom feed"),
    ],
)
def test_detect_format_refuses_clearly(text: str, expected: str) -> None:
    err = error_of(detect_format, text, "thing")
    assert str(err).startswith("thing: ")
    assert expected in str(err)
    assert isinstance(err, PapermailError)


def test_explicit_format_overrides_detection_and_unknown_is_refused() -> None:
    text = HF_FILE.read_text(encoding="utf-8")
    assert "expected an Atom <feed>" not in str(error_of(parse, text, "arxiv"))
    assert "invalid XML" in str(error_of(parse, text, "arxiv"))
    assert "unknown format 'csv'" in str(error_of(parse, text, "csv"))
    assert parse(text).format == "hf"


def test_default_urls() -> None:
    assert default_urls("2401.12345") == {
        "url": "https://huggingface.co/papers/2401.12345",
        "hf_url": "https://huggingface.co/papers/2401.12345",
        "pdf_url": "https://arxiv.org/pdf/2401.12345",
    }
    assert default_urls("openreview-abc")["pdf_url"] is None


def test_record_requires_aware_datetime() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        PaperRecord(id="a", title="b", published_at=datetime(2026, 1, 1))


# --------------------------------------------------------------------------- reading sources


def test_read_file_errors(tmp_path: Path) -> None:
    assert "no such file" in str(error_of(read_source, str(tmp_path / "missing.json")))
    assert "is a directory" in str(error_of(read_source, str(tmp_path)))
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"id": "a", "title": "café"}'.encode("latin-1"))
    assert "not valid utf-8 text at byte 25" in str(error_of(read_source, str(bad)))
    assert "only http:// and https://" in str(error_of(read_source, "ftp://example.org/x"))


def test_read_stdin() -> None:
    text, name = read_source("-", stdin=io.BytesIO('{"id": "a", "title": "Zoë"}'.encode()))
    assert name == "<stdin>"
    assert parse(text).records[0].title == "Zoë"


@contextmanager
def serve(routes: dict[str, tuple[int, str, bytes]]) -> Iterator[str]:
    """A real HTTP server on a free port; routes map path -> (status, content type, body).

    The path ``/slow`` answers after two seconds.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/slow":
                time.sleep(2)
            status, ctype, body = routes.get(self.path, (404, "text/plain", b"not here"))
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_url_source_over_real_http() -> None:
    hf = HF_FILE.read_bytes()
    latin = '{"id": "a", "title": "Café"}'.encode("latin-1")
    routes = {
        "/api/daily_papers": (200, "application/json", hf),
        "/latin": (200, "application/x-ndjson; charset=iso-8859-1", latin),
        "/boom": (500, "text/plain", b"oops"),
    }
    with serve(routes) as base:
        parsed = load_source(f"{base}/api/daily_papers")
        assert parsed.format == "hf"
        assert parsed.name == f"{base}/api/daily_papers"
        assert [r.id for r in parsed.records] == [i["paper"]["id"] for i in hf_items()]
        assert load_source(f"{base}/latin").records[0].title == "Café"
        assert str(error_of(read_source, f"{base}/nope")) == f"{base}/nope: HTTP 404 Not Found"
        assert "HTTP 500" in str(error_of(read_source, f"{base}/boom"))
        slow = error_of(lambda: read_source(f"{base}/slow", timeout=0.3))
        assert "no answer within 0.3 seconds" in str(slow)


def test_url_source_connection_refused() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    err = error_of(read_source, f"http://127.0.0.1:{port}/papers")
    assert str(err).startswith(f"http://127.0.0.1:{port}/papers: cannot fetch: ")


# ------------------------------------------------------------------ what real services send


def test_leading_newline_and_bom_before_xml_are_not_an_error() -> None:
    feed = ARXIV_FILE.read_text(encoding="utf-8")
    for text in ("\n" + feed, "\ufeff" + feed, "\ufeff\r\n  \n" + feed):
        assert detect_format(text) == "arxiv"
        parsed = parse(text, None, "feed.xml")
        assert [r.id for r in parsed.records] == ["2002.08797", "2305.01542"]
        assert parse(text, "arxiv").records == parsed.records


def test_xml_error_lines_count_the_skipped_leading_lines() -> None:
    broken = "\n\n" + ARXIV_FILE.read_text(encoding="utf-8").replace("</title>", "</titl>", 1)
    message = str(error_of(parse_arxiv, broken))
    plain = str(error_of(parse_arxiv, broken.lstrip("\n")))
    line = int(message.split("invalid XML at line ")[1].split(",")[0])
    assert line == int(plain.split("invalid XML at line ")[1].split(",")[0]) + 2


def test_bom_and_whitespace_before_json() -> None:
    text = "\ufeff\n  " + HF_FILE.read_text(encoding="utf-8")
    assert detect_format(text) == "hf"
    assert len(parse(text).records) == 3
    assert len(parse(text, "hf").records) == 3
    line = '{"id": "2401.00001", "title": "T"}\n'
    assert parse("\ufeff" + line).records[0].id == "2401.00001"


def test_hf_paper_object_and_lists_of_them() -> None:
    item = hf_items()[0]
    paper = dict(item["paper"])  # the /api/papers/{id} shape: the paper object itself
    text = json.dumps(paper, indent=2)
    assert detect_format(text) == "hf"
    (record,) = parse(text).records
    assert record.id == "2403.17006" and record.upvotes == paper["upvotes"]
    assert len(record.authors) == len(paper["authors"])
    # Featured on Daily Papers that day, not the arXiv date.
    assert record.published_at == datetime.fromisoformat(paper["submittedOnDailyAt"])
    # A list of paper objects, and a list mixing items and paper objects.
    assert [r.id for r in parse(json.dumps([paper, paper | {"id": "2401.00002"}])).records] == [
        "2403.17006",
        "2401.00002",
    ]
    mixed = parse(json.dumps([hf_items()[1], paper])).records
    assert [r.id for r in mixed] == ["2404.12754", "2403.17006"]
    # One daily-papers item, pretty-printed.
    assert parse(json.dumps(item, indent=4)).records[0].id == "2403.17006"


def test_pretty_printed_papermail_record_is_one_record() -> None:
    text = json.dumps(
        {"id": "2401.00001v2", "title": "T", "categories": ["cs.LG", "stat.ML"]}, indent=2
    )
    assert detect_format(text) == "jsonl"
    for parsed in (parse(text), parse(text, "jsonl")):
        (record,) = parsed.records
        assert (record.id, record.version) == ("2401.00001", 2)
        assert record.categories == ["cs.LG", "stat.ML"]
        assert record.primary_category == "cs.LG"


def test_pretty_printed_json_of_the_wrong_shape_says_so_not_truncated() -> None:
    text = json.dumps({"name": "my papers", "items": [{"title": "x"}] * 20}, indent=2)
    assert text.count("\n") > 40
    message = str(error_of(detect_format, text, "papers.json"))
    assert "truncated" not in message and "bad records" not in message
    assert "one JSON object, but neither a Hugging Face" in message
    assert "'items', 'name'" in message
    # Given as JSON Lines, the whole document is still read as one.
    message = str(error_of(parse, text, "jsonl", "papers.json"))
    assert "truncated" not in message
    assert "record 1 (the whole document): unknown field 'items'" in message
    # A pretty-printed list is not JSON Lines either.
    message = str(error_of(parse, json.dumps([{"id": "a", "title": "b"}], indent=2), "jsonl"))
    assert "one JSON list, not JSON Lines" in message


def test_a_broken_pretty_printed_document_is_one_error_with_its_place() -> None:
    text = json.dumps(hf_items()[0]["paper"], indent=2)
    broken = text.replace('"upvotes": 17,', '"upvotes": 17', 1)  # a missing comma
    err = error_of(parse, broken, None, "paper.json")
    assert len(err.errors) == 1
    assert "pretty-printed JSON document with invalid JSON at line" in str(err)
    cut = error_of(parse, text[: len(text) // 2], None, "paper.json")
    assert len(cut.errors) == 1 and "truncated?" in str(cut)


def test_hf_list_of_papermail_records_says_what_they_are() -> None:
    message = str(error_of(parse_hf, '[{"id": "2401.00001", "title": "T", "abstract": "A"}]'))
    assert "this is a papermail JSON Lines record" in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"cs.LG"', "expected a list of arXiv categories for 'categories'"),
        ("[1]", "expected a string for 'categories[0]', got the number 1"),
        ('["I.2.6; I.2.7"]', "expected an arXiv category like cs.LG for 'categories[0]'"),
    ],
)
def test_jsonl_bad_categories(value: str, expected: str) -> None:
    line = '{"id": "2401.00001", "title": "T", "categories": ' + value + "}"
    assert expected in str(error_of(parse_jsonl, line))


def test_arxiv_categories_skip_class_codes_and_keep_primary_first() -> None:
    feed = ARXIV_FILE.read_text(encoding="utf-8").replace(
        '<category term="stat.ML" scheme="http://arxiv.org/schemas/atom"/>',
        '<category term="cs.LG" scheme="http://arxiv.org/schemas/atom"/>'
        '<category term="68T05" scheme="http://arxiv.org/schemas/atom"/>'
        '<category term="I.2.6; I.2.7" scheme="http://arxiv.org/schemas/atom"/>',
        1,
    )
    first = parse_arxiv(feed)[0]
    assert first.categories == ["stat.ML", "cs.LG"]
    assert (first.version, first.comment) == (5, "Published as a conference paper at ICLR 2021")
