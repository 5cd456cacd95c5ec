"""arXiv category filters through the shells: the preference page, the CLI, the migration."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from click.testing import CliRunner, Result
from flask.testing import FlaskClient
from sqlalchemy import text

from tests.unit.web_support import add_sub, csrf_from, make_client, snapshot, token
from worker import db, migrate
from worker.cli import main
from worker.config import Settings
from worker.db import session_scope
from worker.models import Paper, Subscriber, utcnow

# --------------------------------------------------------------------------- the page


@pytest.fixture
def client(settings: Settings) -> FlaskClient:
    return make_client(settings)


def _url(settings: Settings, sid: int) -> str:
    return "/preferences/" + token("preferences", settings, s=sid)


def _form(csrf: str, **changes: str) -> dict[str, object]:
    form: dict[str, object] = {
        "csrf_token": csrf,
        "topic": ["graph neural networks"],
        "new_topics": "",
        "max_papers": "5",
        "frequency": "daily",
        "weekday": "0",
        "send_hour": "7",
        "timezone": "UTC",
        "paused_until": "",
        "categories": "",
        "exclude_categories": "",
    }
    form.update(changes)
    return form


def _add_papers() -> None:
    now = utcnow()
    with session_scope() as s:
        for pid, cats in (
            ("2611.00001", ["cs.LG"]),
            ("2611.00002", ["cs.CV", "cs.LG"]),
            ("2611.00003", ["hep-th"]),
        ):
            s.add(
                Paper(
                    id=pid,
                    title=f"Graph Neural Networks {pid}",
                    abstract="Graph neural networks, again.",
                    upvotes=5,
                    published_at=now - timedelta(hours=2),
                    ingested_at=now,
                    url=f"https://papers.example/{pid}",
                    categories=cats,
                )
            )


def test_page_has_the_fields_with_help(client: FlaskClient, settings: Settings) -> None:
    sid = add_sub(categories="cs.LG, stat.ML", exclude_categories="cs.CV")
    html = client.get(_url(settings, sid)).get_data(as_text=True)
    assert 'name="categories" value="cs.LG, stat.ML"' in html
    assert 'name="exclude_categories" value="cs.CV"' in html
    assert 'aria-describedby="categories-hint"' in html
    # Examples and the meaning of an archive, in the help text.
    assert "<em>cs.LG</em>, <em>math.CO</em>, <em>hep-th</em>" in html
    assert "an archive such as <em>cs</em>" in html
    assert 'autocapitalize="none"' in html  # phones do not write "Cs.LG"


def test_saving_filters_changes_the_next_digest(client: FlaskClient, settings: Settings) -> None:
    _add_papers()
    sid = add_sub(topics=["graph neural networks"])
    url = _url(settings, sid)
    csrf = csrf_from(client.get(url).get_data(as_text=True))
    response = client.post(
        url, data=_form(csrf, categories="CS", exclude_categories="cs.cv"), follow_redirects=True
    )
    assert response.status_code == 200
    with session_scope() as s:
        sub = s.get(Subscriber, sid)
        assert sub is not None
        assert (sub.categories_only, sub.categories_exclude) == (["cs"], ["cs.CV"])
    html = response.get_data(as_text=True)
    assert 'name="categories" value="cs"' in html
    preview = html.split('id="next-title"', 1)[1]
    assert "2611.00001" in preview  # cs.LG
    assert "2611.00002" not in preview  # cross-listed to cs.CV
    assert "2611.00003" not in preview  # hep-th


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        (
            {"categories": "cs.LG, cs.XX"},
            "categories",
            "&#39;cs.XX&#39; in categories is not an arXiv category",
        ),
        (
            {"exclude_categories": "hep-thh"},
            "exclude_categories",
            "did you mean hep-th?",
        ),
        (
            {"categories": "cs.LG", "exclude_categories": "cs"},
            "exclude_categories",
            "is also excluded (cs), so no paper would be left",
        ),
    ],
)
def test_bad_filters_are_refused_next_to_the_field(
    client: FlaskClient, settings: Settings, changes: dict[str, str], field: str, message: str
) -> None:
    sid = add_sub(topics=["graph neural networks"])
    before = snapshot(sid)
    url = _url(settings, sid)
    csrf = csrf_from(client.get(url).get_data(as_text=True))
    response = client.post(url, data=_form(csrf, **changes))
    assert response.status_code == 400
    html = response.get_data(as_text=True)
    assert f'id="{field}-error"' in html and message in html
    assert f'<a href="#{field}">' in html  # the summary links to the field
    for name, value in changes.items():  # what was typed is shown again
        assert f'name="{name}" value="{value}"' in html
    assert snapshot(sid) == before


# ---------------------------------------------------------------------------- the CLI


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_cli_add_and_show(settings: Settings) -> None:
    result = run(
        "subscribers",
        "add",
        "grace@example.org",
        "--categories",
        "cs.lg,stat.ML",
        "--exclude-categories",
        "cs.CV",
        "--confirmed",
    )
    assert result.exit_code == 0, result.output
    assert "arXiv categories: only cs.LG, stat.ML; excluding cs.CV" in result.output
    shown = run("subscribers", "show", "grace@example.org")
    assert "arXiv categories: only cs.LG, stat.ML; excluding cs.CV" in shown.output
    as_json = json.loads(run("subscribers", "show", "grace@example.org", "--json").stdout)
    assert as_json["subscriber"]["categories"] == ["cs.LG", "stat.ML"]
    assert as_json["subscriber"]["exclude_categories"] == ["cs.CV"]
    listed = json.loads(run("subscribers", "list", "--json").stdout)
    assert listed[0]["categories"] == ["cs.LG", "stat.ML"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--categories", "cs.LG,quantum"], "'quantum' in categories is not an arXiv category"),
        (["--exclude-categories", "math.XY"], "'math.XY' in exclude categories"),
        (["--categories", "cs.LG", "--exclude-categories", "cs"], "is also excluded"),
    ],
)
def test_cli_add_refuses_bad_categories(settings: Settings, args: list[str], message: str) -> None:
    result = run("subscribers", "add", "a@example.org", *args)
    assert result.exit_code != 0
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    with session_scope() as s:
        assert s.query(Subscriber).count() == 0


def test_cli_help_shows_the_options(settings: Settings) -> None:
    out = run("subscribers", "add", "--help").output
    assert "--categories" in out and "--exclude-categories" in out
    assert "--categories cs.LG,stat.ML --exclude-categories cs.CV" in out


def test_cli_import_reads_the_columns(settings: Settings, tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "people.csv"
    path.write_text("email,categories,exclude-categories\na@example.org,math,math.HO\n")
    result = run("subscribers", "import", str(path), "--confirmed")
    assert result.exit_code == 0, result.output
    shown = run("subscribers", "show", "a@example.org")
    assert "arXiv categories: only math; excluding math.HO" in shown.output


# ---------------------------------------------------------------------- the migration


def _upgrade_keeps_subscribers(url: str) -> None:
    migrate.upgrade("0012", url=url)
    with db.get_engine(url).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO subscribers (email, status, topics, max_papers, frequency, "
                "send_hour, timezone, soft_bounce_count, source, created_at, updated_at) "
                "VALUES ('old@example.org', 'active', '[\"llm\"]', 5, 'daily', 7, 'UTC', 0, "
                "'cli', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
    migrate.upgrade("head", url=url)
    with db.get_engine(url).connect() as conn:
        row = conn.execute(
            text("SELECT categories_only, categories_exclude FROM subscribers")
        ).one()
    assert [json.loads(v) if isinstance(v, str) else v for v in row] == [[], []]
    migrate.downgrade("0012", url=url)
    with db.get_engine(url).connect() as conn:
        assert conn.execute(text("SELECT email FROM subscribers")).scalar() == "old@example.org"


def test_migration_on_sqlite(env: dict[str, str]) -> None:
    _upgrade_keeps_subscribers(env["PAPERMAIL_DATABASE_URL"])


@pytest.mark.postgres
def test_migration_on_postgres(env: dict[str, str], pg_url: str) -> None:
    _upgrade_keeps_subscribers(pg_url)
