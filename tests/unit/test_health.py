"""`papermail health` and `/healthz?deep=1`: real SQLite, real Redis, the outbox mailer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from worker import config, health, migrate
from worker.cli import main


def _by_name(report: health.HealthReport) -> dict[str, health.Check]:
    return {c.name: c for c in report.checks}


def test_healthy_embedded_setup(settings: config.Settings) -> None:
    report = health.run_checks(settings)
    checks = _by_name(report)
    assert report.ok and report.status == "ok"
    assert checks["database"].status == "ok"
    assert checks["database"].details["revision"] == migrate.head_revision()
    assert checks["redis"].status == "skip" and checks["broker"].status == "skip"
    assert checks["mailer"].status == "ok"
    assert checks["mailer"].details["details"]["outbox_dir"] == str(Path(settings.outbox_dir))
    assert checks["events"].status == "skip"

    result = CliRunner().invoke(main, ["health"])
    assert result.exit_code == 0, result.output
    assert "overall: ok" in result.output
    data = json.loads(CliRunner().invoke(main, ["health", "--json"]).output)
    assert data["status"] == "ok"
    assert [c["name"] for c in data["checks"]] == [
        "database",
        "redis",
        "broker",
        "mailer",
        "events",
    ]


def test_no_schema_fails_and_says_to_upgrade(env: dict[str, str]) -> None:
    result = CliRunner().invoke(main, ["health"])
    assert result.exit_code == 1
    assert "fail  database   the database has no schema" in result.output
    assert "fix: run `papermail db upgrade`" in result.output


def test_schema_behind_the_code(env: dict[str, str]) -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrate.alembic_config())
    head = script.get_revision(migrate.head_revision())
    previous = head.down_revision
    assert isinstance(previous, str)
    migrate.upgrade(previous)
    check = health.check_database(config.get_settings())
    assert check.status == "fail"
    assert check.summary == f"the schema is at {previous}, behind the code's {head.revision}"
    assert check.fix == "run `papermail db upgrade`"


def test_unreachable_database(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "PAPERMAIL_DATABASE_URL", "postgresql://papermail:s3cret@127.0.0.1:9/papermail"
    )
    config.reset_settings()
    check = health.check_database(config.get_settings())
    assert check.status == "fail"
    assert check.summary.startswith("cannot connect to the database:")
    assert "s3cret" not in check.summary
    assert "PAPERMAIL_DATABASE_URL" in (check.fix or "")


def test_redis_and_broker_queue_depth(
    settings: config.Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kombu import Connection

    monkeypatch.setenv("PAPERMAIL_BROKER_URL", redis_url)
    config.reset_settings()
    current = config.get_settings()
    with Connection(redis_url) as conn:
        queue = conn.SimpleQueue("send")
        queue.put({"task": "x"})
        queue.put({"task": "y"})
        queue.close()
    checks = _by_name(health.run_checks(current))
    assert checks["redis"].status == "ok", checks["redis"]
    assert checks["broker"].status == "ok"
    assert checks["broker"].details["queues"] == {"plan": 0, "send": 2}
    assert checks["broker"].summary == "queues waiting: plan 0, send 2"


def test_unreachable_redis_fails_both(
    settings: config.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAPERMAIL_BROKER_URL", "redis://:pw0rd@127.0.0.1:9/0")
    config.reset_settings()
    report = health.run_checks(config.get_settings())
    checks = _by_name(report)
    assert not report.ok
    for name in ("redis", "broker"):
        assert checks[name].status == "fail"
        assert "pw0rd" not in checks[name].summary
        assert "PAPERMAIL_BROKER_URL" in (checks[name].fix or "")
    result = CliRunner().invoke(main, ["health", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output)["status"] == "fail"


def test_outbox_that_cannot_be_created(
    settings: config.Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PAPERMAIL_OUTBOX_DIR", str(blocker / "outbox"))
    config.reset_settings()
    check = health.check_mailer(config.get_settings())
    assert check.status == "fail"
    assert f"{blocker} is not a directory" in (check.fix or "")
    assert "PAPERMAIL_OUTBOX_DIR" in (check.fix or "")
    assert not blocker.with_name("outbox").exists()


def test_outbox_probe_leaves_nothing(settings: config.Settings) -> None:
    outbox = Path(settings.outbox_dir)
    outbox.mkdir(parents=True)
    assert health.check_mailer(settings).status == "ok"
    assert list(outbox.iterdir()) == []


def test_a_check_that_raises_fails_alone(
    settings: config.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_: config.Settings) -> health.Check:
        raise RuntimeError("boom")

    monkeypatch.setattr(health, "check_redis", broken)
    checks = _by_name(health.run_checks(settings))
    assert checks["redis"].status == "fail"
    assert checks["redis"].summary == "the check itself failed: boom"
    assert checks["mailer"].status == "ok"


def test_healthz_deep(settings: config.Settings) -> None:
    from worker import web

    app = web.create_app(settings, dev=True)
    client = app.test_client()
    plain = client.get("/healthz")
    assert plain.status_code == 200 and plain.get_json() == {"status": "ok"}
    deep = client.get("/healthz?deep=1")
    assert deep.status_code == 200
    body = deep.get_json()
    assert body["status"] == "ok"
    assert {c["name"]: c["status"] for c in body["checks"]}["database"] == "ok"


def test_healthz_deep_fails_with_503(env: dict[str, str]) -> None:
    from worker import web

    app = web.create_app(config.get_settings(), dev=True)
    deep = app.test_client().get("/healthz?deep=1")
    assert deep.status_code == 503
    database = deep.get_json()["checks"][0]
    assert database["status"] == "fail" and database["fix"] == "run `papermail db upgrade`"


def test_ses_without_events_warns(settings: config.Settings) -> None:
    ses = config.load_settings(
        mailer="ses",
        secret_key="k" * 40,
        base_url="https://papermail.example.org",
        postal_address="Example Lab, 1 Main St, Springfield, USA",
    )
    [check] = health.check_events(ses)
    assert check.status == "warn"
    assert "PAPERMAIL_SNS_TOPIC_ARNS" in (check.fix or "")


def test_a_malformed_topic_arn_fails(settings: config.Settings) -> None:
    odd = config.load_settings(sns_topic_arns="not-an-arn")
    [check] = health.check_events(odd)
    assert check.status == "fail"
    assert check.summary == "'not-an-arn' is not an SNS topic ARN"
