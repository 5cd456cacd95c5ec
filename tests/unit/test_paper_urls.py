"""Paper links: only absolute http(s) URLs are stored, and every page and email filters again.

Ingest refuses any other link, for every format and field, naming the record and the
field, and writes nothing. Rows that hold a bad link anyway (stored before the rule, or
written by hand) render without a link on the feedback page, the preferences preview,
"view in browser" and in both parts of the email.
"""

from __future__ import annotations

import html
import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from tests.unit.web_support import add_sub, make_client, outbox_messages, token
from worker import delivery
from worker.cli import main
from worker.config import Settings
from worker.db import session_scope
from worker.errors import InvalidInput
from worker.models import Delivery, Paper, utcnow
from worker.papers import PaperRecord, PaperSourceError, ingest_source, parse, upsert_papers
from worker.urls import safe_url, url_problem

DATA = Path(__file__).resolve().parent.parent / "data"

# Every one carries "pwnd", so a test can tell it never reached the output.
BAD = [
    "javascript:alert('pwnd')",
    "JAVASCRIPT:alert('pwnd')",
    " javascript:alert('pwnd')",
    "java\tscript:alert('pwnd')",
    "java\nscript:alert('pwnd')",
    "\x01javascript:alert('pwnd')",
    "javascript&colon;alert('pwnd')",
    "data:text/html;base64,pwnd",
    "vbscript:msgbox('pwnd')",
    "/pwnd/relative",
    "pwnd/relative",
    "//pwnd.example/protocol-relative",
    "https:pwnd.example",
    "https://",
    "ftp://pwnd.example/file",
    "mailto:pwnd@example.org",
    "https://pwnd.example\u2028/x",
    "https://pwnd.example/\u202eevil",
    "https:\\\\pwnd.example",
]
GOOD = [
    "https://huggingface.co/papers/2611.00001",
    "http://arxiv.org/abs/2611.00001v2",
    "https://example.org/a?b=1&c=%20#frag",
    "https://[2001:db8::1]:8443/paper",
    "https://bücher.example/paper",
]


@pytest.mark.parametrize("url", BAD)
def test_bad_urls_are_refused_with_a_reason(url: str) -> None:
    assert safe_url(url) is None
    assert url_problem(url)


@pytest.mark.parametrize("url", GOOD)
def test_web_urls_pass_unchanged(url: str) -> None:
    assert url_problem(url) is None
    assert safe_url(url) == url


def test_the_scheme_is_lower_cased_and_odd_values_are_no_link() -> None:
    assert safe_url("HTTPS://Example.org/A") == "https://Example.org/A"
    for value in (None, "", 3, ["https://x.org"], b"https://x.org"):
        assert safe_url(value) is None


# --------------------------------------------------------------------------- ingest


def _paper_count() -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(Paper)) or 0


def _jsonl(*records: dict[str, object]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.mark.parametrize("field", ["url", "pdf_url", "hf_url"])
@pytest.mark.parametrize("url", BAD)
def test_jsonl_bad_link_names_record_and_field_and_ingests_nothing(
    settings: Settings, tmp_path: Path, field: str, url: str
) -> None:
    source = tmp_path / "papers.jsonl"
    good = {"id": "2611.00001", "title": "Good"}
    source.write_text(_jsonl(good, {"id": "2611.00002", "title": "Bad", field: url}))
    with pytest.raises(PaperSourceError) as info, session_scope() as s:
        ingest_source(s, str(source))
    message = str(info.value)
    assert message.startswith(f"{source} (jsonl): record 2 (line 2): ")
    assert f"http:// or https:// URL for '{field}'" in message
    assert "nothing was ingested" in message
    assert _paper_count() == 0  # the good record is not ingested either


def test_jsonl_collects_every_bad_link() -> None:
    text = _jsonl(
        {"id": "a1", "title": "A", "url": "javascript:x"},
        {"id": "a2", "title": "B", "pdf_url": "data:x"},
        {"id": "a3", "title": "C", "hf_url": "https://huggingface.co/papers/a3"},
    )
    with pytest.raises(PaperSourceError) as info:
        parse(text, "jsonl", "p.jsonl")
    assert [e.split(": ")[0] for e in info.value.errors] == [
        "record 1 (line 1)",
        "record 2 (line 2)",
    ]
    assert "'url'" in info.value.errors[0] and "'pdf_url'" in info.value.errors[1]


def test_jsonl_accepts_web_links_and_lower_cases_nothing_else() -> None:
    text = _jsonl({"id": "a1", "title": "A", "url": " https://example.org/A \n"})
    [record] = parse(text, "jsonl").records
    assert record.url == "https://example.org/A"


def _feed(links: str) -> str:
    return (
        '<?xml version="1.0"?><feed xmlns="http://www.w3.org/2005/Atom">'
        "<entry><id>http://arxiv.org/abs/2611.00001v1</id><title>Good</title></entry>"
        f"<entry><id>http://arxiv.org/abs/2611.00002v1</id><title>Bad</title>{links}</entry>"
        "</feed>"
    )


@pytest.mark.parametrize(
    ("link", "field"),
    [
        ('<link rel="alternate" href="{url}"/>', "url"),
        ('<link title="pdf" rel="related" href="{url}"/>', "pdf_url"),
        ('<link type="application/pdf" rel="related" href="{url}"/>', "pdf_url"),
    ],
)
@pytest.mark.parametrize(
    "url", ["javascript:alert(1)", "JavaScript:alert(1)", "data:x", "/abs/2611.00002", "x.pdf"]
)
def test_arxiv_bad_link_names_entry_and_field_and_ingests_nothing(
    settings: Settings, tmp_path: Path, link: str, field: str, url: str
) -> None:
    source = tmp_path / "feed.xml"
    source.write_text(_feed(link.format(url=url)))
    with pytest.raises(PaperSourceError) as info, session_scope() as s:
        ingest_source(s, str(source), "arxiv")
    message = str(info.value)
    assert message.startswith(f"{source} (arxiv): entry 2: ")
    assert f"http:// or https:// URL for '{field}' (the " in message and "<link" in message
    assert _paper_count() == 0


def test_arxiv_control_characters_in_a_link_are_refused() -> None:
    # An XML character reference puts a tab inside the scheme: java&#9;script:
    with pytest.raises(PaperSourceError, match=r"entry 2: .* for 'url' \(the <link"):
        parse(_feed('<link rel="alternate" href="java&#9;script:alert(1)"/>'), "arxiv")


@pytest.mark.parametrize("paper_id", ["2611\u200b00002", "a\\b", "x\x00y"])
def test_hf_links_made_from_the_id_are_checked_too(
    settings: Settings, tmp_path: Path, paper_id: str
) -> None:
    # The daily-papers API carries no link fields papermail stores: its links are made
    # from the paper id, so an id that makes a bad link is a bad record.
    items = json.loads((DATA / "hf_daily_papers.json").read_text(encoding="utf-8"))
    items[1]["paper"]["id"] = paper_id
    source = tmp_path / "daily.json"
    source.write_text(json.dumps(items))
    with pytest.raises(PaperSourceError) as info, session_scope() as s:
        ingest_source(s, str(source), "hf")
    message = str(info.value)
    assert message.startswith(f"{source} (hf): record 2 (JSON index 1): ")
    assert "URL for 'url' (made from the id)" in message
    assert _paper_count() == 0


def test_every_source_format_stores_only_web_links(settings: Settings) -> None:
    with session_scope() as s:
        for name, fmt in (("hf_daily_papers.json", "hf"), ("arxiv_feed.xml", "arxiv")):
            ingest_source(s, str(DATA / name), fmt)
        links = s.execute(select(Paper.url, Paper.pdf_url, Paper.hf_url)).all()
    assert links and all(safe_url(u) == u for row in links for u in row if u is not None)


def test_upsert_refuses_bad_links_from_any_caller(settings: Settings) -> None:
    records = [
        PaperRecord(id="2611.00001", title="Good"),
        PaperRecord(id="2611.00002", title="Bad", pdf_url="javascript:alert(1)"),
    ]
    with pytest.raises(InvalidInput) as info, session_scope() as s:
        upsert_papers(s, records, "script")
    assert "paper '2611.00002': field 'pdf_url' 'javascript:alert(1)'" in str(info.value)
    assert _paper_count() == 0


def test_cli_ingest_reports_the_bad_link(settings: Settings, tmp_path: Path) -> None:
    source = tmp_path / "papers.jsonl"
    source.write_text(_jsonl({"id": "a1", "title": "A", "url": "javascript:alert(1)"}))
    result = CliRunner().invoke(main, ["papers", "ingest", str(source)])
    assert result.exit_code == 2
    assert "record 1 (line 1): expected an absolute http:// or https:// URL for 'url'" in (
        result.output
    )
    assert _paper_count() == 0


# --------------------------------------------------------------------------- output


def _plant(pid: str, title: str, **links: str | None) -> None:
    """A paper row written straight to the database, past ingest's checks."""
    now = utcnow()
    with session_scope() as s:
        s.add(
            Paper(
                id=pid,
                title=title,
                abstract=f"{title}. About planted links.",
                authors=["A. Author"],
                upvotes=50,
                published_at=now - timedelta(hours=30),  # inside the window at any hour
                ingested_at=now,
                **links,
            )
        )


def _hrefs(page: str) -> list[str]:
    return [html.unescape(h) for h in re.findall(r'(?:href|src|action)="([^"]*)"', page)]


def _assert_clean(page: str) -> None:
    assert "pwnd" not in html.unescape(page).lower()
    for href in _hrefs(page):
        assert href.startswith(("https://", "http://", "/", "#")), href
        assert not href.startswith("//"), href


BAD_ROWS = [u for u in BAD if "pwnd" in u]


@pytest.mark.parametrize("url", BAD_ROWS)
def test_feedback_page_shows_no_bad_link(settings: Settings, url: str) -> None:
    _plant("2611.70001", "A Paper With A Planted Link", url=url, hf_url=url, pdf_url=url)
    sid = add_sub()
    page = make_client(settings).get(
        "/feedback/" + token("feedback", settings, s=sid, p="2611.70001", v=1)
    )
    body = page.get_data(as_text=True)
    assert page.status_code == 200 and "A Paper With A Planted Link" in body
    _assert_clean(body)


def test_feedback_page_falls_back_to_a_good_link(settings: Settings) -> None:
    _plant(
        "2611.70002",
        "Half Good",
        url="javascript:alert('pwnd')",
        hf_url="https://huggingface.co/papers/2611.70002",
    )
    sid = add_sub()
    body = (
        make_client(settings)
        .get("/feedback/" + token("feedback", settings, s=sid, p="2611.70002", v=-1))
        .get_data(as_text=True)
    )
    _assert_clean(body)
    assert 'href="https://huggingface.co/papers/2611.70002"' in body


@pytest.mark.parametrize("url", BAD_ROWS)
def test_preferences_preview_shows_no_bad_link(settings: Settings, url: str) -> None:
    _plant("2611.70003", "Diffusion Models With A Planted Link", url=url, hf_url=url)
    sid = add_sub(topics=["diffusion models"])
    page = make_client(settings).get("/preferences/" + token("preferences", settings, s=sid))
    body = page.get_data(as_text=True)
    section = body.split('id="next-title"', 1)[1]
    assert page.status_code == 200 and "Diffusion Models With A Planted Link" in section
    _assert_clean(body)


@pytest.mark.parametrize(
    "url", ["javascript:alert('pwnd')", " JAVASCRIPT:alert('pwnd')", "data:,pwnd"]
)
def test_email_parts_and_view_in_browser_show_no_bad_link(settings: Settings, url: str) -> None:
    _plant("2611.70004", "Robotic Grasping With A Planted Link", url=url, pdf_url=url, hf_url=url)
    _plant(
        "2611.70005",
        "Robotic Grasping Done Right",
        url="https://papers.example/2611.70005",
        pdf_url="https://arxiv.org/pdf/2611.70005",
    )
    sid = add_sub(topics=["robotic grasping"])
    today = utcnow().date()
    delivery.run_in_process(today, settings=settings)
    [mail] = outbox_messages(settings)
    html_part = mail.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
    text_part = mail.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    for part in (html_part, text_part):
        assert "Robotic Grasping With A Planted Link" in part
        assert "https://papers.example/2611.70005" in part  # good links stay
    _assert_clean(html_part)
    assert "pwnd" not in text_part.lower()
    with session_scope() as s:
        assert s.scalar(select(Delivery.state).where(Delivery.subscriber_id == sid)) == "sent"
    view = make_client(settings).get("/view/" + token("view", settings, s=sid, d=today.isoformat()))
    body = view.get_data(as_text=True)
    assert view.status_code == 200 and "Robotic Grasping With A Planted Link" in body
    _assert_clean(body)
