"""Rendering: the message parsed back with the stdlib, links, escaping, injection, cache."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import re
import shutil
import uuid
from datetime import date
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path

import pytest

from worker import links, rendering
from worker.config import Settings, load_settings
from worker.errors import InvalidInput
from worker.rendering import PaperView, Recipient, Renderer

EDITION = date(2026, 11, 27)
INJECT = "x\r\nBcc: victim@example.org"
BASE = "http://papermail.test"


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:  # no database needed here
    return load_settings(
        from_address="Zoë's papers <digest@papermail.test>",
        reply_to="help@papermail.test",
        secret_key="new-key,old-key",
    )


@pytest.fixture
def renderer(settings: Settings, tmp_path: Path) -> Renderer:
    return Renderer(settings, cache_dir=tmp_path / "cache")


def _paper(pid: str, title: str, **kw: object) -> PaperView:
    values: dict[str, object] = {
        "id": pid,
        "title": title,
        "authors": ["Zoë Müller", "李 数据"],
        "upvotes": 12,
        "abstract": "A short abstract.",
        "url": f"https://huggingface.co/papers/{pid}",
        "pdf_url": f"https://arxiv.org/pdf/{pid}",
        "hf_url": f"https://huggingface.co/papers/{pid}",
        "matched_topic": "diffusion models",
    }
    values.update(kw)
    return PaperView(**values)  # type: ignore[arg-type]


PAPERS = [
    _paper("2611.00001", "数据 Diffusion for Zoë Müller"),
    _paper("2611.00002", "<script>alert(1)</script>", matched_topic=None),
    _paper(
        "2611.00003",
        "Many authors",
        authors=["Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra"],
        abstract=("word " * 120).strip(),
        pdf_url=None,
        hf_url="javascript:alert(2)",
    ),
]
RECIPIENT = Recipient(
    42, "reader@example.org", ("diffusion models", "RLHF"), "daily", None, 7, "Europe/Paris"
)


def settings_address() -> str:
    from worker.config import SAMPLE_POSTAL_ADDRESS

    return SAMPLE_POSTAL_ADDRESS


def _parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _parts(msg: EmailMessage) -> tuple[str, str]:
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert all(p.get_content_charset() == "utf-8" for p in parts)
    return parts[0].get_content(), parts[1].get_content()


class _Hrefs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.hrefs += [v for k, v in attrs if k == "href" and v is not None]


def _hrefs(html: str) -> list[str]:
    parser = _Hrefs()
    parser.feed(html)
    return parser.hrefs


def _read_link(url: str, settings: Settings) -> tuple[str, dict]:
    route, token = url.removeprefix(BASE + "/").split("/")
    purpose = {v: k for k, v in links.ROUTES.items()}[route]
    return purpose, links.read_token(purpose, token, settings)


def test_digest_message_parses_back(renderer: Renderer, settings: Settings) -> None:
    out = renderer.render_digest(RECIPIENT, EDITION, PAPERS, delivery_id=9001)
    msg = _parse(out.raw)
    for name in (
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "List-Id",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "Reply-To",
        "Feedback-ID",
    ):
        assert len(msg.get_all(name) or []) == 1, name
    # Gmail's feedback loop format, campaign:customer:mail type:sender id.
    assert msg["Feedback-ID"] == "digest-20261127:papermail:digest:papermail.test"
    assert msg["To"] == "reader@example.org"
    assert msg["From"].addresses[0].display_name == "Zoë's papers"
    assert msg["From"].addresses[0].addr_spec == "digest@papermail.test" == out.sender
    assert msg["Reply-To"] == "help@papermail.test"
    assert msg["List-Id"] == "papermail daily papers <digest.papermail.localhost>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Date"].datetime is not None
    assert re.fullmatch(r"<2026-11-27\.9001\.[0-9a-f]+@papermail\.test>", msg["Message-ID"])
    assert out.message_id == msg["Message-ID"] and out.recipient == "reader@example.org"
    assert out.tags == {"delivery_id": "9001", "edition": "2026-11-27"}
    # UTF-8 survives in the subject and both bodies.
    assert msg["Subject"] == out.subject
    assert "数据 Diffusion for Zoë Müller" in msg["Subject"]
    text, html = _parts(msg)
    assert (text.replace("\r\n", "\n"), html.replace("\r\n", "\n")) == (out.text, out.html)
    for body in (text, html):
        assert "Zoë Müller" in body and "数据" in body
    assert "Because you follow <em>diffusion models</em>" in html
    assert "Because you follow \u201cdiffusion models\u201d" in text
    # Wire format: CRLF only, no line over 78 octets after the headers.
    _head, _, body_raw = out.raw.partition(b"\r\n\r\n")
    assert b"\n" not in out.raw.replace(b"\r\n", b"")
    assert max(len(line) for line in body_raw.split(b"\r\n")) <= 78
    assert out.raw.isascii()


def test_content(renderer: Renderer) -> None:
    out = renderer.render_digest(RECIPIENT, EDITION, PAPERS, delivery_id=1)
    text, html = _parts(_parse(out.raw))
    # The script title is text, never markup.
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert(1)</script>" in text
    assert "javascript:" not in html and "javascript:" not in text
    # Authors shortened, abstract trimmed at a word boundary.
    assert "Ada Lovelace, Alan Turing, Grace Hopper et al." in html
    assert "Edsger" not in html
    trimmed = re.search(r"((?:word )+word…)", html)
    assert trimmed and len(trimmed.group(1)) <= rendering.ABSTRACT_CHARS + 1
    assert "word " * 100 not in html
    # Header, footer and the reason for this email.
    assert "Friday, 27 November 2026" in html
    for label in (
        "Manage preferences",
        "Unsubscribe",
        "View in browser",
        "Read",
        "PDF",
        "More like this",
        "Less like this",
    ):
        assert label in html and label in text, label
    # The sender's postal address (the outbox's sample one here) closes the footer.
    assert settings_address() in html and settings_address() in " ".join(text.split())
    # Every URL once in the text part: the title's page is the Read link, and the
    # Hugging Face page is that same page here, so it is not listed again.
    urls = re.findall(r"https?://\S+", text)
    assert len(urls) == len(set(urls))
    assert "https://huggingface.co/papers/2611.00001" in urls
    assert "Hugging Face:" not in text
    reason = (
        "You get this because you subscribed to papermail with reader@example.org, "
        "daily at 07:00 Europe/Paris, topics: diffusion models, RLHF."
    )
    assert reason in html
    assert reason in " ".join(text.split())
    assert "12 upvotes" in text


def test_html_is_self_contained_and_responsive(renderer: Renderer) -> None:
    html = renderer.digest_html(RECIPIENT, EDITION, PAPERS)
    assert html.lower().startswith("<!doctype html>")
    lowered = html.lower()
    for banned in ("<mj-", "</mj-", "@import", "fonts.googleapis", "{{", "{%", "pmjx"):
        assert banned not in lowered, banned
    assert not re.search(r"<link[^>]+stylesheet", lowered)
    assert '<meta name="viewport"' in html
    assert '<meta name="color-scheme" content="light dark">' in html
    assert '<meta name="supported-color-schemes" content="light dark">' in html
    assert "@media (prefers-color-scheme: dark)" in html
    assert "mj-column-per-50" in html  # the two-column masthead that stacks on phones
    assert 'style="' in html and "color:#1f2937" in html.replace(" ", "")  # CSS inlined


def test_every_link_carries_a_valid_token(renderer: Renderer, settings: Settings) -> None:
    out = renderer.render_digest(RECIPIENT, EDITION, PAPERS, delivery_id=5)
    msg = _parse(out.raw)
    text, html = _parts(msg)
    ours = [h for h in _hrefs(html) if h.startswith(BASE)]
    assert len(ours) == 3 + 2 * len(PAPERS)  # footer links, then more/less per paper
    seen: dict[str, list[dict]] = {}
    for url in ours + [u for u in re.findall(r"https?://\S+", text) if u.startswith(BASE)]:
        purpose, payload = _read_link(url, settings)
        assert payload["s"] == 42
        seen.setdefault(purpose, []).append(payload)
    assert set(seen) == {"preferences", "unsubscribe", "view", "feedback"}
    assert {p["d"] for p in seen["view"]} == {"2026-11-27"}
    votes = {(p["p"], p["v"]) for p in seen["feedback"]}
    assert votes == {(p.id, v) for p in PAPERS for v in (1, -1)}
    # List-Unsubscribe: the http(s) URL (an unsubscribe token) and a mailto.
    unsub = re.findall(r"<([^>]+)>", msg["List-Unsubscribe"])
    assert len(unsub) == 2
    assert _read_link(unsub[0], settings)[0] == "unsubscribe"
    assert unsub[1].startswith("mailto:unsubscribe@papermail.test?subject=unsubscribe%20")
    token = unsub[1].rpartition("%20")[2]
    assert links.read_token("unsubscribe", token, settings) == {"s": 42}


def test_header_injection_is_impossible(renderer: Renderer) -> None:
    papers = [_paper("2611.09999", INJECT, matched_topic=INJECT, authors=[INJECT])]
    recipient = Recipient(42, "reader@example.org", (INJECT, "ok"), "daily", None, 7, "UTC")
    out = renderer.render_digest(recipient, EDITION, papers, delivery_id=1)
    msg = _parse(out.raw)
    assert msg.get_all("Bcc") is None
    head = out.raw.partition(b"\r\n\r\n")[0]
    assert not re.search(rb"(?im)^bcc:", head)
    assert "\r" not in out.subject and "\n" not in out.subject
    assert msg["Subject"].startswith("1 paper: x Bcc: victim@example.org")
    # An address with a line break is refused outright, not cleaned.
    for bad in (
        INJECT,
        "a@b.org\nBcc: v@x.org",
        "a b@example.org",
        "no-at-sign",
        "zoë@example.org",
    ):
        with pytest.raises(InvalidInput):
            renderer.render_digest(
                Recipient(1, bad, (), "daily", None, 7, "UTC"), EDITION, PAPERS[:1]
            )
        with pytest.raises(InvalidInput):
            renderer.render_confirm(bad, 1)


def test_injection_through_settings_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        Renderer(load_settings(from_address="a@b.org\r\nBcc: v@x.org"), cache_dir=tmp_path)
    with pytest.raises(InvalidInput):
        Renderer(load_settings(list_id="x\r\nBcc: v@x.org"), cache_dir=tmp_path)
    # A non-ASCII display name is fine (RFC 2047), an IDN domain becomes punycode.
    r = Renderer(load_settings(from_address="Données <d@exämple.org>"), cache_dir=tmp_path)
    msg = _parse(r.render_confirm("reader@exämple.org", 3).raw)
    assert msg["From"].addresses[0].display_name == "Données"
    assert msg["To"] == "reader@xn--exmple-cua.org"


def test_weekly_no_topics_and_defaults(renderer: Renderer) -> None:
    recipient = Recipient(8, "w@example.org", (), "weekly", 0, 9, "America/New_York")
    out = renderer.render_digest(recipient, EDITION, PAPERS[:1])
    msg = _parse(out.raw)
    _text, html = _parts(msg)
    assert "weekly on Mondays at 09:00 America/New_York" in html
    assert "topics: none" in html
    assert "delivery_id" not in out.tags
    assert re.fullmatch(r"<2026-11-27\.s8\.[0-9a-f]+@papermail\.test>", out.message_id)
    with pytest.raises(InvalidInput, match="at least one paper"):
        renderer.render_digest(recipient, EDITION, [])


def test_confirm_message(renderer: Renderer, settings: Settings) -> None:
    out = renderer.render_confirm("new@example.org", 77)
    msg = _parse(out.raw)
    text, html = _parts(msg)
    assert msg["Subject"] == "Confirm your papermail subscription"
    assert msg.get_all("List-Unsubscribe") is None  # not a list message yet
    assert "Confirm your subscription" in html and "new@example.org" in text
    urls = {h for h in _hrefs(html) if h.startswith(BASE)}
    assert len(urls) == 1
    assert _read_link(urls.pop(), settings) == ("confirm", {"s": 77})
    assert '<meta name="color-scheme" content="light dark">' in html


def test_paper_view_from_model() -> None:
    from worker.models import Paper

    paper = Paper(
        id="2611.1",
        title="T",
        abstract="A",
        authors=["X"],
        upvotes=3,
        url=None,
        pdf_url="https://arxiv.org/pdf/2611.1",
        hf_url="https://huggingface.co/papers/2611.1",
    )
    view = rendering.paper_view(paper, "topic")
    assert view.url == "https://huggingface.co/papers/2611.1"  # falls back to the HF page
    assert (view.matched_topic, view.upvotes, view.authors) == ("topic", 3, ["X"])
    assert view == PaperView(
        "2611.1", "T", ["X"], 3, "A", "https://huggingface.co/papers/2611.1",
        "https://arxiv.org/pdf/2611.1", "https://huggingface.co/papers/2611.1", "topic",
    )  # fmt: skip
    assert view.authors is not paper.authors  # a copy: the view cannot change the row
    # Columns never set are not in the row's __dict__: read through the ORM (None).
    sparse = rendering.paper_view(Paper(id="2611.2", title="S"), None)
    assert (sparse.abstract, sparse.upvotes, sparse.authors, sparse.url) == ("", 0, [], "")
    # Any object with the columns as attributes will do.
    from types import SimpleNamespace

    other = SimpleNamespace(**{c: getattr(paper, c) for c in rendering._VIEW_COLUMNS})
    assert rendering.paper_view(other, "topic") == view  # type: ignore[arg-type]


def test_compile_cache_memory_then_disk(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = rendering.mjml2html

    def counting(*args: object, **kwargs: object) -> str:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rendering, "mjml2html", counting)
    templates = tmp_path / "templates"
    shutil.copytree(rendering.email_templates_dir(), templates)
    head = templates / "_head.mjml"  # a version no other test has compiled yet
    head.write_text(head.read_text() + f"{{# {uuid.uuid4()} #}}\n")
    cache = tmp_path / "cache"

    first = Renderer(settings, templates_dir=templates, cache_dir=cache)
    assert len(calls) == len(rendering.MJML_TEMPLATES)  # compiled: one per MJML template
    calls.clear()
    second = Renderer(settings, templates_dir=templates, cache_dir=cache)
    assert calls == [] and second.templates is first.templates  # memory hit

    rendering.clear_memory_cache()  # as a new process would be
    third = Renderer(settings, templates_dir=templates, cache_dir=cache)
    assert calls == []  # disk hit
    files = list(cache.iterdir())
    assert [f.name for f in files] == [
        rendering.cache_file_name(third.templates.key, settings.signing_keys[0])
    ]  # no temp file left over
    assert third.digest_html(RECIPIENT, EDITION, PAPERS).count("数据") >= 1

    # A corrupt cache file is recompiled, not trusted.
    rendering.clear_memory_cache()
    files[0].write_text("{not json")
    Renderer(settings, templates_dir=templates, cache_dir=cache)
    assert len(calls) == len(rendering.MJML_TEMPLATES)

    # Editing a template (here the footer partial) is a new version.
    calls.clear()
    footer = templates / "_footer.mjml"
    footer.write_text(footer.read_text().replace("View in browser", "Open in browser"))
    edited = Renderer(settings, templates_dir=templates, cache_dir=cache)
    assert len(calls) == len(rendering.MJML_TEMPLATES)
    assert "Open in browser" in edited.digest_html(RECIPIENT, EDITION, PAPERS)


def test_jinja_tags_survive_or_fail_loudly() -> None:
    src = (
        "<mjml><mj-body><mj-section><mj-column>"
        '<mj-button href="{{ url }}?a=1&amp;b={{ b }}">Go {{ name }}</mj-button>'
        '<mj-text>{% if flag %}<a href="{{ url }}">yes</a>{% endif %}</mj-text>'
        "</mj-column></mj-section></mj-body></mjml>"
    )
    compiled = rendering.compile_mjml(src)
    assert 'href="{{ url }}?a=1&amp;b={{ b }}"' in compiled
    assert "{% if flag %}" in compiled and "{% endif %}" in compiled
    in_attribute = src.replace('href="{{ url }}?', 'href="{% if x %}u{% endif %}?')
    assert 'href="{% if x %}u{% endif %}?a=1' in rendering.compile_mjml(in_attribute)
    # MJML computes with an image width: a placeholder there cannot come back.
    bad = src.replace("<mj-text>", '<mj-image src="{{ s }}" width="{{ w }}" /><mj-text>')
    with pytest.raises(rendering.TemplateError, match="did not survive"):
        rendering.compile_mjml(bad)
    with pytest.raises(rendering.TemplateError, match="cycle"):
        rendering.resolve_includes("a", {"a": '{% include "b" %}', "b": '{% include "a" %}'})
    with pytest.raises(rendering.TemplateError, match="not found"):
        rendering.resolve_includes("a", {"a": '{% include "missing.mjml" %}'})


def test_get_renderer_is_cached(settings: Settings) -> None:
    assert rendering.get_renderer(settings) is rendering.get_renderer(settings)
    other = load_settings(base_url="https://elsewhere.example")
    assert rendering.get_renderer(other) is not rendering.get_renderer(settings)


# A quoted-printable line: literal printable ASCII (no "="), blanks and =XX escapes, then
# at most one "=" for a soft break; a blank only before a printable (RFC 2045 6.7).
_QP_LINE = re.compile(r"(?:[!-<>-~ \t]|=[0-9A-F]{2})*(?:=|(?<![ \t]))")


def _check_qp(pieces: list[str] | tuple[str, ...]) -> None:
    import binascii

    text = "".join(pieces)
    encoded = rendering._qp_bodies(pieces)[0]
    assert encoded.isascii()
    lines = encoded.split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    for line in lines:
        assert len(line) <= 76, line
        assert _QP_LINE.fullmatch(line.decode()), line
    # It decodes to the text, with CRLF for every line break (CR, LF or CRLF).
    canonical = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
    assert binascii.a2b_qp(encoded) == canonical.encode()
    assert rendering._qp_bodies(pieces)[0] == encoded  # again, from the cache
    # The same through the stdlib's parser, as a mail client's would see it.
    message = email.message_from_bytes(
        b'Content-Type: text/plain; charset="utf-8"\r\n'
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + encoded,
        policy=email.policy.default,
    )
    assert message.get_payload(decode=True) == canonical.encode()


QP_EDGES = [
    "",
    "\n",
    "a",
    ".",
    ".\n",
    "a.\n.\n. \n",
    "trailing space \nand tab\t\nend ",
    "end\t",
    "x" * 75 + "\n" + "y" * 76 + "\n" + "z" * 77 + "\n" + "=" * 80,
    "u" * 75 + ".\n" + "v" * 150 + ".\n" + "w" * 151 + "\n" + "a " * 80 + "\n" + "b" * 75 + " c",
    "   More like this: https://papermail.example.org/feedback/" + "eyJzIjo0Mn0" * 9 + "\n",
    "crlf\r\nlines\rmixed\n\n\n",
    "Zoë · 数据 = 1\n" * 3 + "\x00.\n\x7f\n",
    " " * 100 + "\n" + "\t" * 30,
    "x" * 74 + " \n" + "x" * 73 + " \n" + "x" * 72 + "\t\n" + "x" * 75 + " ",
    "x" * 73 + "é" + "x" * 72 + "=" + "数" * 30,
]


@pytest.mark.parametrize("text", QP_EDGES)
def test_quoted_printable_decodes_to_the_text(text: str) -> None:
    _check_qp((text,))
    _check_qp(list(text))  # one character per piece
    for cut in range(0, len(text), 7):
        _check_qp((text[:cut], text[cut:]))


def test_quoted_printable_of_random_pieces() -> None:
    import random

    rng = random.Random(12)
    # HTML-like lines (long, many "="), blanks before line breaks, non-ASCII, controls.
    alphabet = ["a", "b", " ", "\t", "=", ".", "\n", "é", "数", "\x00", "~", "_", '"', "<a "]
    for _ in range(3000):
        weights = [rng.random() for _ in alphabet]
        text = "".join(rng.choices(alphabet, weights, k=rng.randrange(0, 400)))
        if rng.random() < 0.1:
            text = text.replace("\n", rng.choice(["\r\n", "\r"]))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(1, 30))))
        _check_qp([text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)])


def test_quoted_printable_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # A small cache turns its generations often: outputs stay right, memory bounded,
    # pieces that recur are kept and survive a turn, pieces seen once are not kept.
    import binascii

    cache = rendering._PieceCache(20_000)
    monkeypatch.setattr(rendering, "_QP_PIECES", cache)
    static = '<td style="padding:0">static</td>\n'
    for n in range(2000):
        once = f"link {n} = {'x' * (n % 90)}"
        body = rendering._qp_bodies([static, once, "\n", static])[0]
        text = static + once + "\n" + static
        assert binascii.a2b_qp(body) == text.replace("\n", "\r\n").encode()
        assert once not in cache.young and once not in cache.old
        if n % 100 == 0:
            _check_qp([static, once, "\n", static])
        assert cache.size <= 20_000 + 400
        assert len(cache.young) + len(cache.old) <= 2 * 20_000 // rendering._ENTRY_BYTES
        assert len(cache.seen) <= 20_000 // 64
    assert static in cache.young or static in cache.old


def test_own_pieces_encode_the_same_and_are_not_kept() -> None:
    link = "https://papermail.example.org/feedback/" + "eyJzIjo0Mn0.x-_" * 9
    pieces = ['<a href="', link, '">more</a>\n', "text ", link, "\n"]
    plain = rendering._qp_bodies(pieces, pieces[::-1])
    assert rendering._qp_bodies(pieces, pieces[::-1], own=[link]) == plain
    cache = rendering._QP_PIECES
    assert link not in cache.young and link not in cache.old


def test_html_part_is_quoted_printable(renderer: Renderer) -> None:
    out = renderer.render_digest(RECIPIENT, EDITION, PAPERS, delivery_id=3)
    html_part = list(_parse(out.raw).iter_parts())[1]
    assert html_part["Content-Transfer-Encoding"] == "quoted-printable"
    # Canonical text: CRLF line breaks on the wire and after decoding (RFC 2046 4.1.1).
    assert html_part.get_payload(decode=True) == out.html.replace("\n", "\r\n").encode()


def test_field_reads_skip_the_sandbox_only_for_paper_views() -> None:
    # Templates compile ``x.title`` to a plain read only when x is exactly a paper view;
    # anything else (a dict, another object) takes the sandbox's checked getattr as before.
    from jinja2.exceptions import SecurityError, UndefinedError

    env = rendering._html_env()
    fields = dict.fromkeys(rendering._Item._fields, "")
    item = rendering._Item(**{**fields, "title": "<b>t</b>", "upvotes": 3})
    template = env.from_string("{{ p.title }}|{{ p.upvotes + 1 }}|{{ d.title }}|{{ (d).url }}")
    assert template.render(p=item, d={"title": "from a dict", "url": "u"}) == (
        "&lt;b&gt;t&lt;/b&gt;|4|from a dict|u"
    )

    class Other:
        title = "other"

    assert env.from_string("{{ o.title }}{{ p.title.upper() }}").render(o=Other(), p=item) == (
        "other&lt;B&gt;T&lt;/B&gt;"
    )
    with pytest.raises(UndefinedError):
        env.from_string("{{ o.url }}").render(o=Other())
    with pytest.raises(SecurityError):  # the checked path still guards what follows
        env.from_string("{{ p.title.__class__.__mro__ }}").render(p=item)
    with pytest.raises(SecurityError):
        env.from_string("{{ p.authors.__class__.__subclasses__() }}").render(p=item)


def test_wrap_is_textwrap_fill() -> None:
    import random
    import textwrap

    rng = random.Random(5)
    pieces = ["a", "bb", "reader@example.org,", "Ünïcode", "x" * 77, "y" * 78, "z" * 80, "-"]
    texts = ["", " ", "a  b", " lead", "trail ", "tab\there", "nbsp\xa0word", "line\nbreak"]
    for _ in range(3000):
        sep = rng.choice([" ", " ", " ", "  ", "\t"])
        texts.append(sep.join(rng.choices(pieces, k=rng.randrange(1, 30))))
    for text in texts:
        for indent in ("", "   "):
            rendering._wrap.cache_clear()
            want = textwrap.fill(
                text, 78, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
            )
            assert rendering._wrap(text, indent) == want, (text, indent)


def test_both_escapes_are_markupsafes() -> None:
    # Templates escape a str with markupsafe's C function when it is there, else with
    # the replace chain: both must give markupsafe.escape's text.
    import random

    from markupsafe import escape

    rng = random.Random(3)
    alphabet = ["&", "<", ">", "'", '"', "a", "é", "数", " ", "&amp;", "\x00"]
    for _ in range(2000):
        text = "".join(rng.choices(alphabet, k=rng.randrange(0, 40)))
        assert rendering._escape_text(text) == str(escape(text)) == rendering._escape_str(text)


def test_undefined_output_fails_as_in_jinja() -> None:
    from jinja2.exceptions import UndefinedError

    with pytest.raises(UndefinedError, match="'nothing' is undefined"):
        rendering._html_env().from_string("<p>{{ nothing }}</p>").render()


@pytest.mark.parametrize(
    "source",
    [
        "{{ s }}|{{ n }}|{{ m }}|{{ s|safe }}|{{ s|e }}|{{ s ~ m }}|{{ q }}",
        "{% autoescape false %}{{ s }}{% endautoescape %}{{ s }}",
        "{% macro b(x) %}<b>{{ x }}</b>{% endmacro %}{{ b(s) }}{{ b(m) }}",
        "{% set block %}<i>{{ s }}</i>{% endset %}{{ block }}{{ block|length }}",
        "{% for c in s %}{{ loop.index }}{{ c }}{% endfor %}{{ u|safe_url }}",
        "{% if p.title %}{{ p.title }}{% endif %}{{ p.abstract|upper }}{{ p.upvotes * 2 }}",
    ],
)
def test_compiled_templates_render_what_jinjas_sandbox_renders(source: str) -> None:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from markupsafe import Markup

    plain = ImmutableSandboxedEnvironment(autoescape=True, undefined=StrictUndefined)
    plain.filters["safe_url"] = rendering.safe_url
    fields = dict.fromkeys(rendering._Item._fields, "")
    item = rendering._Item(**{**fields, "title": "<t>", "abstract": "a'b\"c&", "upvotes": 2})
    values = {
        "s": "<a href='x'>&\"</a>",
        "n": 42,
        "m": Markup("<em>ok</em>"),
        "q": None,
        "u": "HTTPS://e.org/?a=1&b=<2>",
        "p": item,
    }
    want = plain.from_string(source).render(values)
    assert rendering._html_env().from_string(source).render(values) == want


def test_arxiv_id_category_and_abstract_link(renderer: Renderer) -> None:
    """A merged record (issue 13) shows its arXiv id and primary category; the title and
    the one Read link go to its arXiv abstract page, the Hugging Face page is a quieter
    link of its own."""
    merged = _paper(
        "2401.12345", "Merged paper", arxiv_id="2401.12345", primary_category="cs.LG",
        abs_url="https://arxiv.org/abs/2401.12345",
    )  # fmt: skip
    arxiv_only = _paper(
        "2401.54321", "arXiv only", url="https://arxiv.org/abs/2401.54321",
        arxiv_id="2401.54321", primary_category=None, abs_url="https://arxiv.org/abs/2401.54321",
    )  # fmt: skip
    out = renderer.render_digest(RECIPIENT, EDITION, [merged, arxiv_only, PAPERS[0]])
    text, html = _parts(_parse(out.raw))
    for part in (text, html):
        assert "arXiv:2401.12345 · cs.LG · " in part
        assert "arXiv:2401.54321 · ▲" in part  # no category known: none claimed
        assert "arXiv:2611.00001" not in part  # no arXiv id known: nothing claimed
    hrefs = _hrefs(html)
    assert hrefs.count("https://arxiv.org/abs/2401.12345") == 2  # the title and Read
    assert hrefs.count("https://arxiv.org/abs/2401.54321") == 2
    assert hrefs.count("https://huggingface.co/papers/2401.12345") == 1  # Hugging Face
    assert "Read:           https://arxiv.org/abs/2401.12345" in text
    assert "Hugging Face:   https://huggingface.co/papers/2401.12345" in text
    assert text.count("https://arxiv.org/abs/2401.54321") == 1  # each URL once


def _digest_variants() -> list[tuple[Recipient, list[PaperView]]]:
    trending = Recipient(7, "t@example.org", (), "weekly", 2, 9, "UTC")
    many = [_paper(f"2611.{n:05d}", f"Paper {n} & <co>", upvotes=n) for n in range(1, 11)]
    return [
        (RECIPIENT, PAPERS),
        (RECIPIENT, PAPERS[::-1]),  # the same cards at other places
        (dataclasses.replace(RECIPIENT, subscriber_id=43), PAPERS),  # other vote links
        (trending, many),
        (trending, many[:1]),
        (RECIPIENT, [_paper("2611.00009", "Terms", matched_terms=("denoising", "score"))]),
    ]


def test_split_cards_render_what_the_whole_template_renders(renderer: Renderer) -> None:
    t = renderer.templates
    assert rendering._split_of(t.digest_html) and rendering._split_of(t.digest_text)
    for _ in range(2):  # cards rendered, then from the cache
        for recipient, papers in _digest_variants():
            ctx = renderer.digest_context(recipient, EDITION, papers)
            ctx["subject"] = "s"
            pieces = [renderer._pieces(x, ctx) for x in (t.digest_text, t.digest_html)]
            whole = [rendering._render_pieces(x, ctx) for x in (t.digest_text, t.digest_html)]
            assert pieces == whole
            assert all(type(p) is rendering._Pieces for p in pieces)  # the planned path
            own = rendering._own_links(ctx)
            # The cards' cached encodings give the bytes the pieces one by one give.
            assert rendering._qp_bodies(*pieces, own=own) == rendering._qp_bodies(
                *map(list, whole), own=own
            )
    assert renderer._card_pieces


def test_over_budget_digest_is_the_same_with_split_cards(
    settings: Settings, tmp_path: Path
) -> None:
    small = Renderer(settings.model_copy(update={"email_max_bytes": 20_000}), cache_dir=tmp_path)
    papers = [_paper(f"2611.{n:05d}", f"P{n}", abstract="words " * 60) for n in range(10)]
    out = small.render_digest(RECIPIENT, EDITION, papers, delivery_id=1)
    whole = Renderer(settings.model_copy(update={"email_max_bytes": 20_000}), cache_dir=tmp_path)
    whole._split_ok = False
    ref = whole.render_digest(RECIPIENT, EDITION, papers, delivery_id=1)
    assert "more papers of this edition" in out.text  # the budget moved some to the web
    assert out.html == ref.html and out.text == ref.text
    text, html = _parts(_parse(out.raw))
    assert html.replace("\r\n", "\n") == out.html and text.replace("\r\n", "\n") == out.text


@pytest.mark.parametrize(
    "card",
    [
        "{{ loop.index }} {{ p.title }}",  # the loop's own variable
        "{{ email }} {{ p.title }}",  # another variable: not the same card for everyone
        "{% set x = p.title %}{{ x }}",  # an assignment
    ],
)
def test_loops_that_are_not_one_card_per_paper_are_not_split(card: str) -> None:
    env = rendering._text_env()
    source = "a{% for p in papers %}" + card + "{% endfor %}b"
    assert rendering._split_paper_loop(env, source) is None


@pytest.mark.parametrize(
    "card",
    [
        "{{ p.more_url|length }}",  # depends on the link's text
        "{{ p.more_url[:12] }}",  # a cut link
        "<{{ p.more_url ~ p.less_url }}>",  # not a piece of its own
    ],
)
def test_cards_that_use_their_links_otherwise_render_whole(renderer: Renderer, card: str) -> None:
    env = rendering._text_env()
    source = "head {% for p in papers %}[{{ p.title }} " + card + "]{% endfor %} tail"
    template = rendering._template(env, source)
    assert rendering._split_of(template) is not None
    ctx = renderer.digest_context(RECIPIENT, EDITION, PAPERS)
    assert renderer._pieces(template, ctx) == rendering._render_pieces(template, ctx)
    assert "".join(renderer._pieces(template, ctx)) == template.render(ctx)
