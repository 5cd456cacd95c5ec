"""normalize_email's fast path (plain ASCII addresses, domains checked once each) gives
exactly email-validator's verdict, normalised form and message, on a broad corpus of
valid and invalid addresses compared against email-validator itself."""

from __future__ import annotations

import itertools
import random

import email_validator
import pytest
from email_validator import EmailNotValidError, validate_email

from worker import subscribers as subs
from worker.untrusted import find_control

LOCALS = [
    "a", "Reader.12", "o'brien", "x+tag", "first.last", "UPPER", "postmaster", "Info",
    "SUPPORT", "~!#$%&'*+-/=?^_`{|}~", "a" * 64, "a" * 65, "b" * 200, "a..b", ".a", "a.",
    "..", ".", "", '"quoted"', '"a b"', '"a\\"b"', '"a@b"', "a b", "a(b)", "a,b", "a<b",
    "a>b", "a[b]", "a\\b", "a:b", "a;b", "{x}", "tést", "ü", "Ünïcödé", "日本", "a\u0301",
    "\u0301a", "a\u200bb", "a=?utf-8?q?b?=", "-", "_", "1234567890",
]  # fmt: skip

DOMAINS = [
    "example.org", "Example.ORG", "lab1.example.org", "EXAMPLE.com", "a.b", "a.b.c.d.e.f",
    "gmail.com", "sub-domain.example.co.uk", "1.2.3.4", "a.123", "a_b.org", "ex ample.org",
    "exa..mple.org", ".example.org", "example.org.", "-a.org", "a-.org", "a.-b.org",
    "ab--cd.org", "xn--bcher-kva.example", "XN--BCHER-KVA.example", "xn--invalid-.org",
    "xn--a.org", "xn--zz.org", "xn--wgv71a.jp", "bücher.example", "BÜCHER.example",
    "münchen.de", "日本.jp", "example\uff0eorg", "\uff45xample.org", "example.org\u200b",
    "x.test", "test", "a.localhost", "localhost", "foo.local", "abc.onion", "x.invalid",
    "something.arpa", "1.168.192.in-addr.arpa", "testing.org", "localhost.org",
    "[1.2.3.4]", "[IPv6:::1]", "[ipv6:2001:db8::1]", "[999.1.1.1]", "[foo]", "[]",
    "example", "com", "a" * 63 + ".org", "a" * 64 + ".org",
    ".".join(["a" * 63] * 4)[:253], ".".join(["a" * 63] * 4)[:252] + ".org",
    ".".join(["b" * 49] * 5), ".".join(["c" * 50] * 5), "ex%ample.org", "ex!ample.org",
    "exa@mple.org", "", "例え.テスト", "xn--r8jz45g.xn--zckzah", "ドメイン.example",
    "a.b1", "a.1b", "x" * 250 + ".org", "mail.xn--80ak6aa92e.com", "اختبار.example",
    "1.xn--4dbc.com", "xn--4dbc.1.com",
]  # fmt: skip

ODDITIES = [
    "a@b@example.org", "@example.org", "a@", "@", "a", "<a@example.org>",
    "Name <a@example.org>", '"a@b"@example.org', "a@example.org>", "a\u0338@example.org",
    "a@example.org\u0338", "a<\u0338b@example.org", "a＠example.org", "a﹫example.org",
    "a @example.org", "a@ example.org", "a@example.org (comment)", "(c)a@example.org",
    "a\t@example.org", '"a"@example.org', '""@example.org', "a.@example.org",
    "Postmaster@Example.ORG", "abuse@XN--BCHER-KVA.example",
]  # fmt: skip


def reference(raw: str) -> str:
    """What normalize_email did before the fast path: email-validator on every address."""
    try:
        return validate_email(raw, check_deliverability=False).normalized.lower()
    except EmailNotValidError as exc:
        raise ValueError(f"invalid email {raw!r}: {exc}") from None


def outcome(fn: object, raw: str) -> tuple[str, str]:
    try:
        return ("ok", fn(raw))  # type: ignore[operator]
    except ValueError as exc:
        return ("error", str(exc))


def corpus() -> list[str]:
    built = [f"{local}@{domain}" for local, domain in itertools.product(LOCALS, DOMAINS)]
    built += ODDITIES
    # Lengths around the 254-octet limit, with ASCII and IDN domains (whose ASCII form is
    # longer than the domain as typed, and whose Unicode form is longer in bytes).
    for domain in ("example.org", "xn--bcher-kva.example", "bücher.example", "日本.jp"):
        for total in (253, 254, 255, 256):
            local = "l" * max(1, total - 1 - len(domain))
            built.append(f"{local}@{domain}")
    rng = random.Random(12)
    alphabet = "abcXYZ019.-_+'!#%&*/=?^`{|}~@\"<>[]() ,:;\\é日\u0301\uff0e"
    for _ in range(3000):
        local = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        domain = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        tld = rng.choice(["", ".org", ".test", ".local", ".1", ".com.", ".xn--p1ai"])
        built.append(f"{local}@{domain}{tld}")
    for _ in range(2000):  # mostly well-formed, so that the fast path is taken often
        local = ".".join(
            "".join(rng.choice("abcdefXYZ0189+_-'") for _ in range(rng.randint(1, 6)))
            for _ in range(rng.randint(1, 3))
        )
        labels = [
            "".join(rng.choice("abcxyzABC019-") for _ in range(rng.randint(1, 8)))
            for _ in range(rng.randint(1, 4))
        ]
        tld = rng.choice(["org", "COM", "test", "localhost", "invalid", "x1", "xn--p1ai"])
        built.append(f"{local}@{'.'.join([*labels, tld])}")
    return built


def test_the_fast_path_agrees_with_email_validator_on_every_address() -> None:
    subs._domain_forms.clear()
    addresses = corpus()
    fast_hits = 0
    for raw in addresses:
        raw = raw.strip()
        if not raw or find_control(raw) is not None:
            continue  # refused before any validation, by the same check on both paths
        expected = outcome(reference, raw)
        assert outcome(subs.normalize_email, raw) == expected, raw
        fast = subs._plain_address(raw)
        if fast is not None:
            fast_hits += 1
            assert expected == ("ok", fast), raw
    # Run twice: the second time every domain comes from the cache.
    for raw in addresses[:500]:
        raw = raw.strip()
        if raw and find_control(raw) is None:
            assert outcome(subs.normalize_email, raw) == outcome(reference, raw), raw
    valid = sum(outcome(reference, a.strip())[0] == "ok" for a in addresses if a.strip())
    # The corpus exercises both paths: many addresses are plain, many are not valid.
    assert fast_hits > 800
    assert len(addresses) - valid > 3000


@pytest.mark.parametrize(
    "raw",
    [
        "reader.1@lab1.example.org",
        "Reader.1@Lab1.Example.ORG",
        "a@xn--bcher-kva.example",  # Punycode in, Unicode form out
        "o'brien+news@sub.example.co.uk",
    ],
)
def test_plain_addresses_take_the_fast_path(raw: str) -> None:
    assert subs._plain_address(raw) == reference(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "a@x.test",  # special-use names are refused by the library, with its message
        "a@foo.local",
        "a@localhost",
        "a@[1.2.3.4]",
        '"a b"@example.org',
        "tést@example.org",
        "a@bücher.example",  # not ASCII as typed: the library does the whole address
        "a@example.org.",
        "a@" + "a" * 64 + ".org",
        "l" * 243 + "@example.org",  # 255 octets
    ],
)
def test_unusual_addresses_are_left_to_email_validator(raw: str) -> None:
    assert subs._plain_address(raw) is None
    assert outcome(subs.normalize_email, raw) == outcome(reference, raw)


def test_library_settings_that_change_the_verdict_turn_the_fast_path_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(email_validator, "TEST_ENVIRONMENT", True)
    assert subs._plain_address("a@x.test") is None
    assert subs.normalize_email("a@x.test") == "a@x.test"  # what the library says then
    monkeypatch.setattr(email_validator, "TEST_ENVIRONMENT", False)
    monkeypatch.setattr(email_validator, "STRICT", True)
    assert subs._plain_address("a" * 65 + "@example.org") is None
    with pytest.raises(ValueError, match="too long before the @-sign"):
        subs.normalize_email("a" * 65 + "@example.org")
