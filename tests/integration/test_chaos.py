"""The chaos suite: the fault-injecting endpoint's random faults, the report's judgement, and
the short run of ``bench/chaos.py`` (its own redis-server, PostgreSQL database, Celery
worker processes from the Procfile, the fake SES in its own process)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import fake_ses as faults
from tests.integration.conftest import build_message
from worker import config
from worker.mailers.errors import AmbiguousError, ThrottledError, TransientError
from worker.mailers.ses import SesMailer

ROOT = Path(__file__).resolve().parents[2]


def load_chaos() -> Any:
    spec = importlib.util.spec_from_file_location("chaos", ROOT / "bench" / "chaos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("chaos", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def random_ses() -> Iterator[Callable[..., faults.FakeSes]]:
    servers: list[faults.FakeSes] = []

    def make(rate: float, *names: str, slow: float = 2.0) -> faults.FakeSes:
        known = faults.random_faults(slow)
        server = faults.FakeSes(
            fault_rate=rate, faults={n: known[n] for n in names}, seed=1
        ).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def stats(server: faults.FakeSes) -> dict[str, Any]:
    with urllib.request.urlopen(server.url + faults.STATS_PATH, timeout=10) as resp:
        return dict(json.load(resp))


def test_random_faults_reach_the_mailer_as_their_kinds(
    random_ses: Callable[..., faults.FakeSes], mailer_env: Callable[..., config.Settings]
) -> None:
    cases = [
        ("throttle", ThrottledError, 0),
        ("internal", TransientError, 0),
        ("reset", AmbiguousError, 0),  # cut before the server took it
        ("slow", AmbiguousError, 1),  # taken, the answer came after the timeout
    ]
    for name, kind, accepted in cases:
        server = random_ses(1.0, name)
        mailer = SesMailer(
            mailer_env("ses", SES_ENDPOINT_URL=server.url, SEND_TIMEOUT_SECONDS="0.5")
        )
        with pytest.raises(kind):
            mailer.send(build_message())
        mailer.close()
        report = stats(server)
        assert report["faults"] == {name: 1}, name
        assert report["accepted"] == accepted, name
        assert report["ambiguous"] == (1 if name in ("reset", "slow") else 0)


def test_the_endpoint_counts_copies_per_recipient_and_reports_duplicates(
    random_ses: Callable[..., faults.FakeSes], mailer_env: Callable[..., config.Settings]
) -> None:
    server = random_ses(0.0)
    mailer = SesMailer(mailer_env("ses", SES_ENDPOINT_URL=server.url))
    for recipient in ["a@example.org", "b@example.org", "a@example.org"]:
        mailer.send(build_message(recipient=recipient))
    mailer.close()
    report = stats(server)
    assert report["per_recipient"] == {"a@example.org": 2, "b@example.org": 1}
    assert report["duplicates"] == {"a@example.org": 2}


def test_bad_fault_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="fault_rate"):
        faults.FakeSes(fault_rate=1.5)
    with pytest.raises(ValueError, match="at least one fault"):
        faults.FakeSes(fault_rate=0.1)
    bad = subprocess.run(
        [sys.executable, str(ROOT / "tests/integration/fake_ses.py"), "--faults", "nope"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2 and "unknown fault(s) nope" in bad.stderr


def test_the_report_fails_each_target_it_should() -> None:
    chaos = load_chaos()

    def judged(**changes: Any) -> dict[str, bool]:
        report = chaos.Report(planned=10, drained=True)
        report.states = Counter({"sent": 9, "unknown": 1})
        report.faults = [chaos.Fault("kill -9 worker", 3, 1)]
        report.endpoint = {"duplicates": {}, "ambiguous": 0}
        for key, value in changes.items():
            setattr(report, key, value)
        chaos.judge(report)
        return {name: ok for name, ok, _ in report.targets}

    assert all(judged().values())
    assert not judged(endpoint={"duplicates": {"a@x": 2}, "ambiguous": 0})[
        "0 duplicates at the endpoint"
    ]
    assert not judged(states=Counter({"sent": 8, "unknown": 2}))[
        "unknown <= sends in flight at the kills + ambiguous answers"
    ]
    left = judged(
        states=Counter({"sent": 8, "pending": 1, "unknown": 1}), problems=["x: still pending"]
    )
    assert not left["every delivery that could go out went out"]
    assert not left["0 deliveries without a terminal state and a reason"]
    assert not judged(drained=False)["0 deliveries without a terminal state and a reason"]


@pytest.mark.slow
@pytest.mark.postgres
def test_short_chaos_run_meets_every_target(pg_admin_url: str) -> None:
    """The CI version of `python bench/chaos.py`: few subscribers and faults, same targets."""
    if shutil.which("redis-server") is None:
        from tests.conftest import skip_loudly

        skip_loudly("redis-server is not installed: the chaos run needs one of its own")
    argv = [
        sys.executable, str(ROOT / "bench" / "chaos.py"), "--subscribers", "120",
        "--worker-kills", "1", "--redis-kills", "1", "--db-drops", "1", "--timeout", "80",
    ]  # fmt: skip
    env = {**os.environ, "PAPERMAIL_TEST_POSTGRES_URL": pg_admin_url}
    run = subprocess.run(argv, capture_output=True, text=True, timeout=110, env=env, cwd=ROOT)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-5000:]
    for target in (
        "[PASS] 0 duplicates at the endpoint",
        "[PASS] 0 deliveries without a terminal state and a reason",
        "[PASS] unknown <= sends in flight at the kills",
        "[PASS] every delivery that could go out went out",
    ):
        assert target in out, out[-5000:]
    assert "planned            120" in out
