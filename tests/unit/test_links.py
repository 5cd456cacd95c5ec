"""Signed links: round trip, tampering, foreign purpose, expiry, key rotation."""

from __future__ import annotations

import re

import pytest
from itsdangerous import URLSafeTimedSerializer

from worker import links
from worker.config import Settings, load_settings

T0 = 1_800_000_000.0  # a fixed clock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [T0]
    monkeypatch.setattr(links, "_clock", lambda: now[0])
    return now


def _settings(env: dict[str, str], keys: str) -> Settings:
    return load_settings(secret_key=keys)


PAYLOADS = {
    "preferences": {"s": 7},
    "unsubscribe": {"s": 7},
    "view": {"s": 7, "d": "2026-11-27"},
    "feedback": {"s": 7, "p": "2611.03585", "v": -1},
    "confirm": {"s": 7},
}


@pytest.mark.parametrize("purpose", links.PURPOSES)
def test_round_trip_every_purpose(env: dict[str, str], purpose: str) -> None:
    settings = _settings(env, "k1")
    token = links.make_token(purpose, PAYLOADS[purpose], settings)
    assert re.fullmatch(r"[A-Za-z0-9_\-.]+", token), token  # URL-safe as is
    assert len(token) < 120
    assert links.read_token(purpose, token, settings) == PAYLOADS[purpose]
    url = links.link(purpose, settings, **PAYLOADS[purpose])
    prefix = f"http://papermail.test/{purpose}/"
    assert url.startswith(prefix)
    assert links.read_token(purpose, url.removeprefix(prefix), settings) == PAYLOADS[purpose]


def test_tokens_are_what_itsdangerous_makes(env: dict[str, str], clock: list[float]) -> None:
    # The fast minter must stay byte-compatible with the library that verifies.
    settings = _settings(env, "new,old")
    payload = PAYLOADS["feedback"]
    reference = URLSafeTimedSerializer(
        ["old", "new"], salt="papermail.feedback.v1", signer=links._ClockSigner
    )
    assert links.make_token("feedback", payload, settings) == reference.dumps(payload)


@pytest.mark.parametrize(
    "mangle",
    [
        # signature (not its last char: base64's spare low bits there are not data)
        lambda t: t[:-5] + ("A" if t[-5] != "A" else "B") + t[-4:],
        lambda t: ("X" if t[0] != "X" else "Y") + t[1:],  # payload
        lambda t: t.split(".")[0] + ".AAAAAA." + t.split(".")[2],  # timestamp
        lambda t: t + "x",
        lambda t: t.replace(".", "", 1),
        lambda t: "",
        lambda t: "not-a-token",
        lambda t: "a" * 5000,
    ],
)
def test_tampered_tokens_are_refused(env: dict[str, str], mangle) -> None:  # type: ignore[no-untyped-def]
    settings = _settings(env, "k1")
    token = links.make_token("unsubscribe", {"s": 7}, settings)
    with pytest.raises(links.TamperedLink) as info:
        links.read_token("unsubscribe", mangle(token), settings)
    assert isinstance(info.value, links.BadLink)
    assert "unsubscribe" in str(info.value)


def test_foreign_purpose_is_told_apart_from_tampering(env: dict[str, str]) -> None:
    settings = _settings(env, "k1")
    view = links.make_token("view", {"s": 7, "d": "2026-11-27"}, settings)
    with pytest.raises(links.WrongPurpose) as info:
        links.read_token("unsubscribe", view, settings)
    assert info.value.actual == "view"
    assert isinstance(info.value, links.BadLink)
    # Same salt, other secret: that is tampering, not a foreign purpose.
    other = links.make_token("view", {"s": 7}, _settings(env, "someone-else"))
    with pytest.raises(links.TamperedLink):
        links.read_token("unsubscribe", other, settings)


def test_expiry_default_and_confirm(env: dict[str, str], clock: list[float]) -> None:
    settings = _settings(env, "k1")
    view = links.make_token("view", {"s": 7}, settings)
    confirm = links.make_token("confirm", {"s": 7}, settings)

    clock[0] = T0 + 366 * links.DAY  # a year later the digest links still work
    assert links.read_token("view", view, settings) == {"s": 7}
    with pytest.raises(links.ExpiredLink):
        links.read_token("confirm", confirm, settings)

    clock[0] = T0 + 7 * links.DAY  # confirm: exactly 7 days is fine
    assert links.read_token("confirm", confirm, settings) == {"s": 7}

    clock[0] = T0 + links.DEFAULT_MAX_AGE + 1
    with pytest.raises(links.ExpiredLink) as info:
        links.read_token("view", view, settings)
    assert isinstance(info.value, links.BadLink)

    clock[0] = T0 + 61
    assert links.read_token("view", view, settings, max_age=61) == {"s": 7}
    with pytest.raises(links.ExpiredLink):
        links.read_token("view", view, settings, max_age=60)


def test_key_rotation(env: dict[str, str]) -> None:
    old = _settings(env, "old-key")
    rotated = _settings(env, "new-key, old-key")
    new_only = _settings(env, "new-key")

    issued_before = links.make_token("preferences", {"s": 1}, old)
    assert links.read_token("preferences", issued_before, rotated) == {"s": 1}

    issued_after = links.make_token("preferences", {"s": 2}, rotated)
    assert links.read_token("preferences", issued_after, new_only) == {"s": 2}  # new key signs
    with pytest.raises(links.TamperedLink):
        links.read_token("preferences", issued_after, old)
    with pytest.raises(links.TamperedLink):  # once the old key is dropped, its links die
        links.read_token("preferences", issued_before, new_only)


def test_bad_arguments(env: dict[str, str]) -> None:
    settings = _settings(env, "k1")
    with pytest.raises(ValueError, match="unknown link purpose 'delete'"):
        links.make_token("delete", {"s": 1}, settings)
    with pytest.raises(ValueError, match="unknown link purpose"):
        links.read_token("delete", "x.y.z", settings)
    with pytest.raises(TypeError):
        links.make_token("view", [1, 2], settings)  # type: ignore[arg-type]


def test_default_settings_are_used(env: dict[str, str]) -> None:
    token = links.make_token("view", {"s": 3})
    assert links.read_token("view", token) == {"s": 3}
    assert links.link("view", s=3).startswith("http://papermail.test/view/")


@pytest.mark.parametrize("key", ["k", "x" * 64, "y" * 200, "ünïcode-kéy"])
@pytest.mark.parametrize("purpose", links.PURPOSES)
def test_minted_tokens_are_what_itsdangerous_makes_for_any_key(
    env: dict[str, str], clock: list[float], key: str, purpose: str
) -> None:
    # The minter computes HMAC from its own keyed hash states; itsdangerous verifies.
    settings = _settings(env, f"{key},old")
    reference = URLSafeTimedSerializer(
        ["old", key], salt=f"papermail.{purpose}.v1", signer=links._ClockSigner
    )
    for payload in (PAYLOADS[purpose], {"s": 2**40, "p": "2611.99999v2", "v": 1}):
        assert links.make_token(purpose, payload, settings) == reference.dumps(payload)
