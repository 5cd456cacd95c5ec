"""Concept vocabulary, arXiv field weights and relevance bands of selection."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from worker.concepts import ML_FIELDS, concept_for
from worker.selection import Candidate, Profile, SelectionParams, _field_weight, select_batch

END = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)

FILLER = [
    Candidate(
        f"f{i}",
        f"Measurement {i} of a property",
        "We report measurements of a property in samples.",
        0,
        END - timedelta(hours=2),
        ("cond-mat.mtrl-sci",),
    )
    for i in range(20)
]


def _pick(cands: list[Candidate], topic: str, k: int = 5) -> list[str]:
    prof = Profile(1, (topic,), k, END - timedelta(hours=48), END)
    return [p.paper_id for p in select_batch(cands, [prof])[1].picks]


def test_aliases_name_the_concept() -> None:
    rl = concept_for("reinforcement learning")
    assert rl is not None
    assert concept_for("RL") is rl
    assert concept_for("Deep Reinforcement Learning") is rl
    assert concept_for("GNNs") is concept_for("graph neural networks")
    assert concept_for("steel reinforcement") is None


def test_field_weight_primary_cross_list_other() -> None:
    assert _field_weight(("cs.LG", "stat.ML"), ML_FIELDS) == 1.0
    assert _field_weight(("cond-mat.stat-mech", "cs.LG"), ML_FIELDS) == 0.5
    assert _field_weight(("cond-mat.mtrl-sci",), ML_FIELDS) == 0.0


def test_steel_reinforcement_never_matches_reinforcement_learning() -> None:
    steel = Candidate(
        "steel",
        "Fatigue of Steel Reinforcement in Concrete",
        "Reinforcement bars in concrete beams under cyclic loading; fatigue of the reinforcement.",
        10_000,
        END - timedelta(hours=1),
        ("cond-mat.mtrl-sci",),
    )
    # Even without categories (as from Hugging Face) the phrase is not there.
    steel_nocat = Candidate("steel2", steel.title, steel.abstract, 10_000, END - timedelta(hours=1))
    pg = Candidate(
        "pg",
        "Variance-Reduced Policy Gradient for Continuous Control",
        "We study policy gradient methods for Markov decision processes with an actor-critic.",
        0,
        END - timedelta(hours=3),
        ("cs.LG",),
    )
    got = _pick([steel, steel_nocat, pg, *FILLER], "reinforcement learning")
    assert got == ["pg"]


def test_other_field_homonym_is_not_a_match() -> None:
    physics = Candidate(
        "porous",
        "Anomalous Diffusion Models for Solute Transport in Porous Media",
        "Diffusion models of solute transport in porous media with anomalous dispersion.",
        500,
        END - timedelta(hours=1),
        ("physics.flu-dyn",),
    )
    ddpm = Candidate(
        "ddpm",
        "Faster Sampling for Denoising Diffusion Probabilistic Models",
        "A sampler for DDPM and score-based generative models.",
        0,
        END - timedelta(hours=5),
        ("cs.LG",),
    )
    assert _pick([physics, ddpm, *FILLER], "diffusion models") == ["ddpm"]


def test_upvotes_order_only_within_a_band() -> None:
    strong = Candidate(
        "strong",
        "Graph Neural Networks for Molecules",
        "A message passing graph neural network for molecular property prediction.",
        0,
        END - timedelta(hours=20),
        ("cs.LG",),
    )
    weak = Candidate(
        "weak",
        "Scaling laws of image classifiers",
        "We measure how the error of image classifiers falls with data, parameters and compute "
        "across convolutional and residual architectures trained on large labelled image "
        "collections, fit power laws to the curves, study the effect of augmentation, label "
        "noise and resolution, and in passing compare with a graph neural network baseline.",
        100_000,
        END - timedelta(hours=1),
        ("cs.CV",),
    )
    got = _pick([weak, strong, *FILLER], "graph neural networks")
    assert got[0] == "strong"


def test_reader_without_topics_gets_trending_top() -> None:
    hot = Candidate("hot", "Anything", "Text.", 900, END - timedelta(hours=1), ("hep-th",))
    prof = Profile(1, (), 1, END - timedelta(hours=48), END)
    picks = select_batch([hot, *FILLER], [prof], params=SelectionParams())[1].picks
    assert [p.paper_id for p in picks] == ["hot"]
    assert picks[0].matched_topic is None and picks[0].matched_terms == ()


def test_expansion_checks_the_context_of_papers_without_categories() -> None:
    mamba = [
        Candidate(
            f"m{i}",
            f"Mamba {name}: selective state space models for {name}",
            f"A selective state space model (Mamba) with linear-time sequence modeling for {name}, "
            "faster than transformers with long-range dependencies and a hardware-aware scan.",
            0,
            END - timedelta(hours=2),
            ("cs.CV",),
        )
        for i, name in enumerate(["video", "speech", "point clouds"])
    ]
    copula = Candidate(
        "copula",
        "Bayesian multivariate nonlinear state space copula models",
        "We propose state space models based on copulas; inference by Hamiltonian Monte Carlo "
        "for the observation and state equations of econometric series.",
        0,
        END - timedelta(hours=2),
    )
    prof = Profile(1, ("state space models",), 10, END - timedelta(hours=48), END)

    def rel(params: SelectionParams) -> dict[str, float]:
        res = select_batch([*mamba, copula, *FILLER], [prof], params=params)[1]
        return {p.paper_id: p.relevance for p in res.picks}

    from dataclasses import replace

    off, on = rel(replace(SelectionParams(), expansion_weight=0.0)), rel(SelectionParams())
    assert on["copula"] < off["copula"]
    assert all(on[m.id] == off[m.id] for m in mamba)  # categories: judged by them
