"""Subscribers' arXiv category filters: validation, the rule, selection, storage, footer."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import select

from worker import db, selection
from worker import subscribers as subs
from worker.arxiv_taxonomy import ALIASES, ARCHIVES, CATEGORIES
from worker.categories import (
    MAX_FILTER_CATEGORIES,
    candidate_mask,
    conflict,
    describe_filters,
    parse_categories,
    passes,
)
from worker.config import Settings
from worker.models import Paper, Subscriber
from worker.selection import Candidate, Profile, SelectionInputError, select_batch

END = datetime(2026, 11, 27, 7, 0, tzinfo=UTC)


# ------------------------------------------------------------------------- validation


def test_taxonomy_is_arxivs() -> None:
    assert {"cs.LG", "cs.CL", "math.CO", "hep-th", "q-bio.NC", "cond-mat.dis-nn"} <= set(CATEGORIES)
    assert {"cs", "math", "physics", "astro-ph", "q-bio", "stat", "hep-th"} <= set(ARCHIVES)
    # Every category belongs to a listed archive; every alias names two real categories.
    assert all(name.split(".")[0] in ARCHIVES for name in CATEGORIES)
    assert all(a in CATEGORIES and b in CATEGORIES for a, b in ALIASES.items())
    assert "cmp-lg" not in CATEGORIES  # retired


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("cs.LG", ("cs.LG",)),
        ("cs.lg, CS.CL", ("cs.LG", "cs.CL")),  # arXiv's spelling whatever the case
        ("cs.LG;math.CO  hep-th\tq-bio.NC", ("cs.LG", "math.CO", "hep-th", "q-bio.NC")),
        ("cs, MATH", ("cs", "math")),  # whole archives
        ("cond-mat.dis-nn, astro-ph", ("cond-mat.dis-nn", "astro-ph")),
        ("cs.LG, cs.lg, cs.LG", ("cs.LG",)),
        ("", ()),
        (" , ", ()),
        (None, ()),
        (["stat.ML", "cs.LG"], ("stat.ML", "cs.LG")),
    ],
)
def test_parse_accepts_names_and_archives(value: object, expected: tuple[str, ...]) -> None:
    assert parse_categories(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("cs.LG, cs.XYZ", "'cs.XYZ' in categories is not an arXiv category"),
        ("cs.LG!", "'cs.LG!' in categories is not an arXiv category; did you mean cs.LG?"),
        ("hep-thh", "did you mean hep-th?"),
        ("machine learning", "'machine' in categories is not an arXiv category"),
        ("cmp-lg", "'cmp-lg' in categories is not an arXiv category"),  # retired
        ("cs/LG", "'cs/LG' in categories is not an arXiv category"),
        ("zzzz", "(e.g. cs.LG, math.CO, hep-th, q-bio.NC, or a whole archive such as cs"),
    ],
)
def test_parse_names_the_bad_value(value: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_categories(value)
    assert message in str(info.value)


def test_parse_refuses_other_types_and_too_many() -> None:
    with pytest.raises(ValueError, match="must be text or a list"):
        parse_categories(3)
    with pytest.raises(ValueError, match="each of the exclude categories must be text"):
        parse_categories(["cs.LG", 4], "exclude categories")
    many = sorted(CATEGORIES)[: MAX_FILTER_CATEGORIES + 1]
    with pytest.raises(ValueError, match=f"at most {MAX_FILTER_CATEGORIES} arXiv categories"):
        parse_categories(many)
    assert len(parse_categories(many[:-1])) == MAX_FILTER_CATEGORIES


def test_conflict_only_when_nothing_could_be_left() -> None:
    assert conflict(("cs.LG",), ("cs.LG",))
    assert conflict(("cs.LG", "cs.CL"), ("cs",))
    assert conflict(("cs.SY",), ("eess.SY",))  # one category under two names
    assert conflict(("cs",), ("cs.CV",)) is None  # all of cs but vision
    assert conflict(("cs.LG", "math"), ("cs",)) is None  # math is left
    assert conflict((), ("cs",)) is None and conflict(("cs",), ()) is None


def test_describe() -> None:
    assert describe_filters((), ()) == ""
    assert describe_filters(("cs.LG", "stat.ML"), ()) == "only cs.LG, stat.ML"
    assert describe_filters(("cs",), ("cs.CV",)) == "only cs; excluding cs.CV"


# ----------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("categories", "only", "exclude", "expected"),
    [
        (("cs.LG", "stat.ML"), ("cs.LG",), (), True),
        (("stat.ML", "cs.LG"), ("cs.LG",), (), False),  # only: the primary category
        (("cs.LG",), ("cs",), (), True),  # an archive holds its categories
        (("math.CO", "cs.DM"), ("cs",), (), False),
        (("hep-th",), ("hep-th",), (), True),  # an archive without subcategories
        (("eess.SY",), ("cs.SY",), (), True),  # aliases are one category
        (("math-ph",), ("math",), (), True),  # math-ph is also math.MP
        ((), ("cs.LG",), (), False),  # unknown categories: not shown to be in them
        (("cs.LG", "cs.CV"), (), ("cs.CV",), False),  # exclude: any category
        (("cs.LG", "physics.optics"), (), ("physics",), False),
        (("cs.LG", "stat.ML"), (), ("cs.CV",), True),
        ((), (), ("cs.CV",), True),  # nothing to exclude
        (("cs.CV",), ("cs",), ("cs.CV",), False),
        (("cs.LG",), ("cs",), ("cs.CV",), True),
    ],
)
def test_passes(
    categories: tuple[str, ...], only: tuple[str, ...], exclude: tuple[str, ...], expected: bool
) -> None:
    assert passes(categories, only, exclude) is expected


def test_mask_is_the_rule_for_every_pair() -> None:
    rng = random.Random(7)
    names = ["cs.LG", "cs.CV", "cs.CL", "stat.ML", "math.CO", "hep-th", "eess.SY", "cs.SY"]
    filters = [*names, "cs", "math", "stat", "eess", "physics"]
    docs = [tuple(rng.sample(names, rng.randint(0, 3))) for _ in range(60)]
    only = [tuple(rng.sample(filters, rng.choice([0, 0, 1, 2]))) for _ in range(80)]
    exclude = [tuple(rng.sample(filters, rng.choice([0, 0, 1, 2]))) for _ in range(80)]
    mask = candidate_mask(only, exclude, docs)
    expected = np.array(
        [[passes(d, o, e) for d in docs] for o, e in zip(only, exclude, strict=True)]
    )
    assert mask.shape == (80, 60)
    assert (mask == expected).all()
    assert 0 < mask.sum() < mask.size  # the draw exercises both outcomes


def test_mask_edge_cases() -> None:
    assert candidate_mask([(), ()], [(), ()], [("cs.LG",)]).all()
    assert candidate_mask([("cs.LG",), ()], [(), ()], []).shape == (2, 0)
    # Values no candidate has.
    assert candidate_mask([("math.CO",)], [("hep-th",)], [("cs.LG",), ()]).tolist() == [
        [False, False]
    ]


# ------------------------------------------------------------------------------ selection


def _cands() -> list[Candidate]:
    specs = [
        ("p1", "Graph neural networks for molecules", ("cs.LG", "q-bio.BM"), 50),
        ("p2", "Graph neural networks for images", ("cs.CV", "cs.LG"), 40),
        ("p3", "Graph neural networks and random graphs", ("math.CO", "cs.LG"), 30),
        ("p4", "Graph neural networks, a survey", (), 20),
        ("p5", "Graph neural networks in string theory", ("hep-th",), 10),
    ]
    return [
        Candidate(pid, title, f"{title}: an abstract.", up, END - timedelta(hours=2), cats)
        for pid, title, cats, up in specs
    ]


def _profile(sid: int, topics: tuple[str, ...] = (), **filters: tuple[str, ...]) -> Profile:
    return Profile(sid, topics, 10, END - timedelta(hours=48), END, **filters)


def _picked(result: selection.Result) -> list[str]:
    return sorted(p.paper_id for p in result.picks)


def test_selection_applies_each_profiles_filters() -> None:
    cands = _cands()
    profiles = [
        _profile(1),
        _profile(2, categories_only=("cs.LG",)),
        _profile(3, categories_exclude=("cs.CV",)),
        _profile(
            4, ("graph neural networks",), categories_only=("cs",), categories_exclude=("cs.CV",)
        ),
        _profile(5, categories_only=("hep-th", "math")),
        _profile(6, ("graph neural networks",)),
    ]
    got = select_batch(cands, profiles)
    assert _picked(got[1]) == ["p1", "p2", "p3", "p4", "p5"]
    assert _picked(got[2]) == ["p1"]  # primary cs.LG only: not p2 (cs.CV), p3, p4 (unknown)
    assert _picked(got[3]) == ["p1", "p3", "p4", "p5"]  # p2 is cross-listed to cs.CV
    assert _picked(got[4]) == ["p1"]
    assert _picked(got[5]) == ["p3", "p5"]
    # Rows without filters get what they would get alone (what topics match is not the
    # filters' business).
    for sid in (1, 6):
        alone = select_batch(cands, [p for p in profiles if p.subscriber_id == sid])[sid]
        assert alone == got[sid]


def test_nothing_in_the_categories_is_the_skip_reason() -> None:
    cands = _cands()
    got = select_batch(
        cands,
        [
            _profile(1, categories_only=("astro-ph",)),
            _profile(2, ("graph neural networks",), categories_only=("q-fin",)),
            _profile(3, ("protein folding",), categories_only=("cs.LG",)),
        ],
    )
    assert got[1].picks == [] and got[2].picks == []
    assert got[1].skip_reason == "no new paper in your arXiv categories (only astro-ph)"
    assert got[2].skip_reason == "no new paper in your arXiv categories (only q-fin)"
    # Something passed the filters, but nothing matched the topic.
    assert got[3].skip_reason == "no new paper matches your topics: protein folding"


def test_explain_says_a_paper_is_outside_the_categories() -> None:
    prof = _profile(1, categories_exclude=("cs.CV",))
    explained = {e.paper_id: e for e in selection.explain_profile(_cands(), prof)}
    assert explained["p2"].why_not == "outside the subscriber's arXiv categories"
    assert explained["p2"].score is None and not explained["p2"].picked
    assert explained["p1"].why_not is None and explained["p1"].picked


def test_profile_refuses_a_string_of_categories() -> None:
    with pytest.raises(SelectionInputError, match="categories must be a sequence"):
        _profile(1, categories_only="cs.LG")  # type: ignore[arg-type]


def test_filters_and_categories_come_from_the_database(session: db.Session) -> None:
    now = END
    for pid, cats in (("2611.00001", ["cs.LG", "stat.ML"]), ("2611.00002", ["cs.CV"])):
        session.add(
            Paper(
                id=pid,
                title=f"Diffusion models {pid}",
                abstract="About diffusion models.",
                upvotes=5,
                published_at=now - timedelta(hours=3),
                ingested_at=now,
                categories=cats,
            )
        )
    data = subs.SubscriberInput(
        "ada@example.org", topics="diffusion models", exclude_categories="cs.CV"
    )
    sub, _ = subs.add_subscriber(session, data, confirmed=True)
    session.flush()
    cands = selection.load_candidates(session, now - timedelta(days=2), now)
    assert {c.id: c.categories for c in cands} == {
        "2611.00001": ("cs.LG", "stat.ML"),
        "2611.00002": ("cs.CV",),
    }
    settings = Settings()
    got = selection.select_for_subscribers(session, [sub], {sub.id: now}, settings)
    assert [p.paper_id for p in got[sub.id].picks] == ["2611.00001"]


# -------------------------------------------------------------------------------- storage


def test_subscriber_input_validates_and_stores(session: db.Session) -> None:
    data = subs.SubscriberInput(
        "Grace@Example.org", categories="cs.lg, stat", exclude_categories="CS.CV"
    )
    assert data.categories_only == ("cs.LG", "stat")
    assert data.categories_exclude == ("cs.CV",)
    assert data.describe().endswith("; arXiv categories: only cs.LG, stat; excluding cs.CV")
    sub, _ = subs.add_subscriber(session, data, confirmed=True)
    session.flush()
    stored = session.scalar(select(Subscriber).where(Subscriber.id == sub.id))
    assert stored is not None
    assert (stored.categories_only, stored.categories_exclude) == (["cs.LG", "stat"], ["cs.CV"])
    shown = subs.subscriber_to_dict(stored)
    assert (shown["categories"], shown["exclude_categories"]) == (["cs.LG", "stat"], ["cs.CV"])
    plain = subs.add_subscriber(session, subs.SubscriberInput("b@example.org"), confirmed=True)[0]
    assert (plain.categories_only, plain.categories_exclude) == ([], [])


def test_subscriber_input_reports_every_problem() -> None:
    with pytest.raises(subs.InvalidSubscriber) as info:
        subs.SubscriberInput("a@example.org", categories="cs.LG, nope", exclude_categories="x.Y")
    assert info.value.problems == [
        "'nope' in categories is not an arXiv category (e.g. cs.LG, math.CO, hep-th, "
        "q-bio.NC, or a whole archive such as cs or math)",
        "'x.Y' in exclude categories is not an arXiv category (e.g. cs.LG, math.CO, hep-th, "
        "q-bio.NC, or a whole archive such as cs or math)",
    ]
    with pytest.raises(subs.InvalidSubscriber, match="also excluded"):
        subs.SubscriberInput("a@example.org", categories="cs.LG", exclude_categories="cs")
    with pytest.raises(subs.InvalidSubscriber, match="control character"):
        subs.SubscriberInput("a@example.org", categories="cs.LG\x00")


CSV = (
    "email,topics,categories,exclude_categories\n"
    'a@example.org,llm,"cs.CL, cs.LG",\n'
    "b@example.org,,math,math.HO\n"
    "c@example.org,,,\n"
    'a@example.org,,,"cs.CV"\n'  # merged with line 2: later non-empty cells win
)


def _stored(session: db.Session) -> dict[str, tuple[list[str], list[str]]]:
    rows = session.execute(
        select(Subscriber.email, Subscriber.categories_only, Subscriber.categories_exclude)
    )
    return {email: (only, exclude) for email, only, exclude in rows}


def _import_checks() -> None:
    # One import per transaction, as the CLI does.
    with db.session_scope() as session:
        report = subs.import_csv(session, CSV, confirmed=True)
    assert report.created == 3 and report.merged == [{"email": "a@example.org", "lines": [2, 5]}]
    with db.session_scope() as session:
        assert _stored(session) == {
            "a@example.org": (["cs.CL", "cs.LG"], ["cs.CV"]),
            "b@example.org": (["math"], ["math.HO"]),
            "c@example.org": ([], []),
        }
    bad = "email,categories,exclude_categories\nd@example.org,cs.LG,\ne@example.org,cs.LG,cs\n"
    bad += "f@example.org,hep-thh,\n"
    with db.session_scope() as session, pytest.raises(subs.ImportRejected) as info:
        subs.import_csv(session, bad, confirmed=True)
    assert [(r.line, r.reason) for r in info.value.report.rejected] == [
        (3, "every category you keep (cs.LG) is also excluded (cs), so no paper would be left"),
        (4, "'hep-thh' in categories is not an arXiv category; did you mean hep-th?"),
    ]


def test_import_columns_on_sqlite(settings: Settings) -> None:
    _import_checks()


@pytest.mark.postgres
def test_import_columns_on_postgres(pg_env: dict[str, str]) -> None:
    _import_checks()


def test_import_header_lists_the_new_columns(session: db.Session) -> None:
    with pytest.raises(subs.InvalidInput, match="categories, exclude_categories"):
        subs.import_csv(session, "email,category\na@example.org,cs.LG\n")


def test_preferences_store_filters_and_report_by_field(session: db.Session) -> None:
    from worker import preferences

    sub, _ = subs.add_subscriber(session, subs.SubscriberInput("a@example.org"), confirmed=True)
    form = {"max_papers": "5", "frequency": "daily", "send_hour": "7", "timezone": "UTC"}
    changes = preferences.update_preferences(
        session, sub.id, {**form, "categories": "cs.lg", "exclude_categories": "cs.CV, eess"}
    )
    assert changes == [
        "categories_only [] -> [cs.LG]",
        "categories_exclude [] -> [cs.CV, eess]",
    ]
    with pytest.raises(preferences.InvalidPreferences) as info:
        preferences.update_preferences(
            session, sub.id, {**form, "categories": "cs.LG, foo.BAR", "exclude_categories": "?"}
        )
    assert set(info.value.errors) == {"categories", "exclude_categories"}
    assert "'foo.BAR' in categories" in info.value.errors["categories"]
    with pytest.raises(preferences.InvalidPreferences) as info:
        preferences.update_preferences(
            session, sub.id, {**form, "categories": "cs.LG", "exclude_categories": "cs"}
        )
    assert list(info.value.errors) == ["exclude_categories"]
    assert (sub.categories_only, sub.categories_exclude) == (["cs.LG"], ["cs.CV", "eess"])
    # Blank fields lift the filters.
    preferences.update_preferences(session, sub.id, {**form, "categories": ""})
    assert (sub.categories_only, sub.categories_exclude) == ([], [])


def test_digest_footer_names_the_filters() -> None:
    from worker.rendering import Recipient, categories_text

    base = dict(subscriber_id=1, email="a@example.org", topics=(), frequency="daily")
    plain = Recipient(**base, weekday=None, send_hour=7, timezone="UTC")  # type: ignore[arg-type]
    assert categories_text(plain) == ""
    filtered = Recipient(
        **base,  # type: ignore[arg-type]
        weekday=None,
        send_hour=7,
        timezone="UTC",
        categories_only=("cs.LG",),
        categories_exclude=("cs.CV",),
    )
    assert categories_text(filtered) == "; arXiv categories: only cs.LG; excluding cs.CV"
