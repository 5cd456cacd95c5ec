"""The compiled-template cache cannot be planted: private directory, sealed files, sandbox.

A planted cache file (at the path papermail uses, or at the old predictable temp path)
is never executed; a cache directory someone else could write to is refused with an
error naming it; a normal run still writes the cache once and reuses it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import uuid
from datetime import date
from pathlib import Path

import pytest
from jinja2.exceptions import SecurityError

from worker import rendering
from worker.config import Settings, load_settings
from worker.rendering import PaperView, Recipient, Renderer, TemplateCacheError

EDITION = date(2026, 11, 27)
RECIPIENT = Recipient(7, "reader@example.org", ("diffusion",), "daily", None, 7, "UTC")
PAPERS = [
    PaperView(
        "2611.00001",
        "A paper",
        ["Ada"],
        3,
        "Abstract.",
        "https://huggingface.co/papers/2611.00001",
        None,
        None,
        None,
    )
]
NAMES = {f"{n}.{ext}" for n in rendering.MJML_TEMPLATES for ext in ("html", "txt", "subject")}


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return load_settings(secret_key="a-test-key-nobody-else-knows")


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    """A copy of the email templates at a version no other test compiled (memory misses)."""
    rendering.clear_memory_cache()
    copy = tmp_path / "email-templates"
    shutil.copytree(rendering.email_templates_dir(), copy)
    head = copy / "_head.mjml"
    head.write_text(head.read_text() + f"{{# {uuid.uuid4()} #}}\n")
    yield copy
    rendering.clear_memory_cache()


def _key(templates: Path) -> str:
    return rendering.cache_key(rendering._read_sources(templates))


def _payload(marker: Path) -> dict[str, str]:
    """Cache content whose every template tries to run shell commands (the issue's payload,
    with an output that appears nowhere in the sources: PWNED-42)."""
    evil = (
        "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
        "{{ cycler.__init__.__globals__.os.popen('echo PWNED-$((6*7))').read() }}"
        "{{ lipsum.__globals__['os'].system('touch " + str(marker) + "') }}"
    )
    return dict.fromkeys(NAMES, evil)


def _assert_not_run(renderer: Renderer, marker: Path) -> None:
    msg = renderer.render_digest(RECIPIENT, EDITION, PAPERS)
    assert not marker.exists()
    assert "PWNED-42" not in msg.html + msg.text + msg.subject
    assert "A paper" in msg.html and "A paper" in msg.text  # the real templates ran
    assert "cycler" not in msg.html and "__globals__" not in msg.text


def test_planted_file_at_the_old_temp_path_is_not_run(
    settings: Settings, templates: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The system temp dir of this test only: other test runs on this machine share /tmp.
    fake_tmp = tmp_path / "systmp"
    fake_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(fake_tmp))
    old = fake_tmp / f"papermail-{os.getuid()}" / "templates"
    old.mkdir(parents=True)
    marker = tmp_path / "pwned"
    key = _key(templates)
    name = rendering.cache_file_name(key, settings.signing_keys[0])
    (old / name).write_text(json.dumps(_payload(marker)))
    try:
        _assert_not_run(Renderer(settings, templates_dir=templates), marker)
    finally:  # the default cache (not in the temp dir) got this test's one-off version
        (rendering.default_cache_dir() / name).unlink(missing_ok=True)


def test_planted_file_at_the_cache_path_is_not_run(
    settings: Settings, templates: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    marker = tmp_path / "pwned"
    key = _key(templates)
    Renderer(settings, templates_dir=templates, cache_dir=cache)
    path = cache / rendering.cache_file_name(key, settings.signing_keys[0])
    good = path.read_bytes()
    # Plain JSON (the old format), then the sealed format with a forged or missing seal.
    plants = [
        json.dumps(_payload(marker)).encode(),
        good.replace(good.split(b"\n", 2)[2], json.dumps(_payload(marker)).encode()),
        b"\n".join([good.split(b"\n", 1)[0], b"0" * 64, json.dumps(_payload(marker)).encode()]),
    ]
    for planted in plants:
        path.write_bytes(planted)
        rendering.clear_memory_cache()
        _assert_not_run(Renderer(settings, templates_dir=templates, cache_dir=cache), marker)
        assert path.read_bytes() != planted  # recompiled and sealed again
    # Sealed with another secret (e.g. the public development key): not ours either.
    path.write_bytes(rendering._seal(key, _payload(marker), "dev-insecure-other-key"))
    rendering.clear_memory_cache()
    _assert_not_run(Renderer(settings, templates_dir=templates, cache_dir=cache), marker)


def test_even_a_validly_sealed_template_cannot_run_python(
    settings: Settings, templates: Path, tmp_path: Path
) -> None:
    # Someone who knows the secret key and can write the directory: the sandbox still holds.
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    marker = tmp_path / "pwned"
    key = _key(templates)
    secret = settings.signing_keys[0]
    (cache / rendering.cache_file_name(key, secret)).write_bytes(
        rendering._seal(key, _payload(marker), secret)
    )
    renderer = Renderer(settings, templates_dir=templates, cache_dir=cache)
    with pytest.raises(SecurityError):
        renderer.render_digest(RECIPIENT, EDITION, PAPERS)
    assert not marker.exists()
    for env in (rendering._html_env(), rendering._text_env()):
        with pytest.raises(SecurityError):
            env.from_string(_payload(marker)["digest.html"]).render()
    assert not marker.exists()


def test_a_normal_run_caches_once_and_reuses(
    settings: Settings, templates: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiles: list[str] = []
    real = rendering.compile_sources
    monkeypatch.setattr(rendering, "compile_sources", lambda s: compiles.append("x") or real(s))
    cache = tmp_path / "deep" / "cache"  # created, every missing level private
    first = Renderer(settings, templates_dir=templates, cache_dir=cache)
    assert compiles == ["x"]
    for directory in (cache, cache.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    (path,) = cache.iterdir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    rendering.clear_memory_cache()  # as a new process would be
    second = Renderer(settings, templates_dir=templates, cache_dir=cache)
    assert compiles == ["x"]  # loaded from disk, verified
    assert second.digest_html(RECIPIENT, EDITION, PAPERS) == first.digest_html(
        RECIPIENT, EDITION, PAPERS
    )
    # Another secret (key rotation) cannot verify the file: compiled again, not trusted.
    rendering.clear_memory_cache()
    Renderer(load_settings(secret_key="rotated-key"), templates_dir=templates, cache_dir=cache)
    assert compiles == ["x", "x"]
    # ...into a file of its own: the first key's file is still there and still loads.
    assert len(list(cache.iterdir())) == 2
    rendering.clear_memory_cache()
    Renderer(settings, templates_dir=templates, cache_dir=cache)
    assert compiles == ["x", "x"]


def test_the_default_cache_is_private_and_not_in_the_temp_dir() -> None:
    default = rendering.default_cache_dir()
    assert not str(default).startswith(tempfile.gettempdir() + os.sep)
    assert default.name == "templates" and default.parent.name == "papermail"


def test_setting_chooses_the_cache_dir(
    env: dict[str, str], templates: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "configured"
    Renderer(load_settings(template_cache_dir=str(cache)), templates_dir=templates)
    assert [p.suffix for p in cache.iterdir()] == [".json"]


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722, 0o702])
def test_a_cache_dir_others_can_write_is_refused(
    settings: Settings, templates: Path, tmp_path: Path, mode: int
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(mode)
    with pytest.raises(TemplateCacheError) as info:
        Renderer(settings, templates_dir=templates, cache_dir=cache)
    message = str(info.value)
    assert str(cache) in message and f"{mode:04o}" in message
    assert "writable by" in message and "chmod 700" in message
    assert list(cache.iterdir()) == []  # nothing read, nothing written


def test_a_parent_others_can_write_is_refused_unless_sticky(
    settings: Settings, templates: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    cache = shared / "cache"
    with pytest.raises(TemplateCacheError, match=f"{shared}.*writable by"):
        Renderer(settings, templates_dir=templates, cache_dir=cache)
    assert not cache.exists()
    shared.chmod(0o1777)  # like /tmp: others cannot rename or remove what is ours
    Renderer(settings, templates_dir=templates, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1


@pytest.mark.skipif(os.getuid() != 0, reason="changing a directory's owner needs root")
def test_a_cache_dir_owned_by_someone_else_is_refused(
    settings: Settings, templates: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, 4242, 4242)
    with pytest.raises(TemplateCacheError, match=f"{cache}.*owned by uid 4242"):
        Renderer(settings, templates_dir=templates, cache_dir=cache)
    # A parent owned by another (non-root) user could swap the directory: refused too.
    os.chown(cache, 0, 0)
    os.chown(tmp_path, 4242, 4242)
    try:
        with pytest.raises(TemplateCacheError, match=f"{tmp_path}.*owned by uid 4242"):
            Renderer(settings, templates_dir=templates, cache_dir=cache)
    finally:
        os.chown(tmp_path, 0, 0)


def test_a_symlinked_cache_dir_is_checked_where_it_points(
    settings: Settings, templates: Path, tmp_path: Path
) -> None:
    target = tmp_path / "open"
    target.mkdir()
    target.chmod(0o777)
    link = tmp_path / "cache"
    link.symlink_to(target)
    with pytest.raises(TemplateCacheError, match=f"{target}.*writable by"):
        Renderer(settings, templates_dir=templates, cache_dir=link)


def test_a_cache_that_cannot_be_created_costs_a_compile_not_a_failure(
    settings: Settings, templates: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    renderer = Renderer(settings, templates_dir=templates, cache_dir=blocker / "cache")
    assert "A paper" in renderer.digest_html(RECIPIENT, EDITION, PAPERS)
