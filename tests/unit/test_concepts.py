"""Concept vocabulary, arXiv field weights and relevance bands of selection."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

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

    off, on = rel(replace(SelectionParams(), expansion_weight=0.0)), rel(SelectionParams())
    assert on["copula"] < off["copula"]
    assert all(on[m.id] == off[m.id] for m in mamba)  # categories: judged by them


def _paper(pid: str, title: str, abstract: str, upvotes: int = 0, cats: tuple[str, ...] = ()):
    return Candidate(pid, title, abstract, upvotes, END - timedelta(hours=2), cats)


def test_title_band_puts_the_papers_about_the_topic_first() -> None:
    # Names the topic in its title: a transformer is the paper's subject.
    about = _paper(
        "about",
        "Streaming Transformer Transducer for Speech Recognition",
        "A streaming transducer whose encoder is a transformer with chunked self-attention, "
        "for real-time recognition on a large-scale dataset.",
        0,
        ("eess.AS",),
    )
    # A strong match too, but the transformer is what it compares with, not its subject.
    compares = _paper(
        "compares",
        "Selective State Space Models for Visual Recognition",
        "A Mamba backbone for recognition that is faster than a vision transformer; against "
        "transformer baselines with self-attention, a transformer of the same size and a Swin "
        "transformer, it keeps their accuracy at linear cost.",
        5_000,
        ("cs.CV",),
    )
    prof = Profile(1, ("transformers",), 2, END - timedelta(hours=48), END)
    cands = [compares, about, *FILLER]
    picks = select_batch(cands, [prof])[1].picks
    assert [p.paper_id for p in picks] == ["about", "compares"]
    assert all(p.relevance >= SelectionParams().strong_relevance for p in picks)
    without = replace(SelectionParams(), title_relevance=0.0)
    got = select_batch(cands, [prof], params=without)[1].picks
    assert [p.paper_id for p in got] == ["compares", "about"]  # upvotes decided


def test_title_band_needs_the_field_and_the_whole_phrase() -> None:
    ml = _paper(
        "ml",
        "Policy Gradient Methods with Learned Baselines",
        "Reinforcement learning with policy gradient and actor-critic updates for Markov "
        "decision processes.",
        0,
        ("cs.LG",),
    )
    # "Reinforcement" and "learning" in the title, not the phrase; steel in cond-mat.
    steel = _paper(
        "steel",
        "Learning the Fatigue of Steel Reinforcement from Cyclic Tests",
        "Reinforcement learning is not used here: we learn fatigue curves of reinforcement bars.",
        9_000,
        ("cond-mat.mtrl-sci",),
    )
    # The phrase in the title, but the paper is from another science: no match at all.
    physics = _paper(
        "physics",
        "Reinforcement Learning of Spin Glass Ground States",
        "Reinforcement learning finds ground states of spin glasses.",
        9_000,
        ("cond-mat.dis-nn",),
    )
    assert _pick([steel, physics, ml, *FILLER], "RL") == ["ml"]


@pytest.mark.parametrize(
    ("topic", "title", "abstract"),
    [
        (
            "anomaly detection",
            "Few-Shot Out-of-Distribution Detection with CLIP Adapters",
            "We score test images for out-of-distribution detection (OOD detection) with a "
            "Gaussian process on frozen CLIP features.",
        ),
        (
            "VLMs",
            "Can GPT-4V Read Chest X-Rays?",
            "We evaluate GPT-4V and LLaVA on report generation from chest radiographs.",
        ),
        (
            "LLM agents",
            "A Plan Cache for LLM-Driven Agents",
            "An LLM-driven agent generates plans and calls tools; we reuse plans of similar "
            "requests to cut latency.",
        ),
        (
            "text embeddings",
            "When Should Dense Retrievers Be Updated?",
            "Dense retrievers encode documents into vectors; we detect when a dense retriever "
            "must be re-trained on an evolving corpus.",
        ),
        (
            "quantum computing",
            "Precoded Polar CSS Codes",
            "CSS codes from precoded polar codes reach logical error rates of a surface code "
            "with fewer qudits.",
        ),
        (
            "kernel methods",
            "Bayesian Optimisation with a Kernel-Based Acquisition",
            "A kernel-based, derivative-free acquisition for Bayesian optimisation.",
        ),
    ],
)
def test_vocabulary_matches_a_paper_by_its_synonyms(topic: str, title: str, abstract: str) -> None:
    concept = concept_for(topic)
    assert concept is not None
    field = "quant-ph" if topic == "quantum computing" else "cs.LG"
    paper = _paper("p", title, abstract, 0, (field,))
    prof = Profile(1, (topic,), 3, END - timedelta(hours=48), END)
    picks = select_batch([paper, *FILLER], [prof])[1].picks
    assert [p.paper_id for p in picks] == ["p"]
    assert picks[0].matched_topic == topic
    assert set(picks[0].matched_terms) <= {topic.lower(), *concept.phrases}
    off = replace(SelectionParams(), use_concepts=False)
    # The topic's own words are not in the paper: only the vocabulary makes it a match.
    if topic != "kernel methods":
        assert select_batch([paper, *FILLER], [prof], params=off)[1].picks == []


def test_title_band_takes_the_best_title_of_any_topic() -> None:
    gnn_abstract = _paper(
        "gnn",
        "Molecular Property Prediction at Scale",
        "A graph neural network with message passing over atoms; the graph neural network is "
        "trained on millions of molecules and beats every graph neural network baseline.",
        5_000,
        ("cs.LG",),
    )
    named = _paper(
        "named",
        "A Transformer for Protein Folding",
        "An encoder transformer with self-attention over residues predicts structures.",
        0,
        ("cs.LG",),
    )
    prof = Profile(1, ("graph neural networks", "transformers"), 2, END - timedelta(hours=48), END)
    picks = select_batch([gnn_abstract, named, *FILLER], [prof])[1].picks
    assert [(p.paper_id, p.matched_topic) for p in picks] == [
        ("named", "transformers"),
        ("gnn", "graph neural networks"),
    ]


def test_explain_names_the_topics_a_title_names() -> None:
    from worker.selection import explain_profile

    named = _paper("named", "A Transformer for Protein Folding", "A transformer.", 0, ("cs.LG",))
    body = _paper(
        "body",
        "Protein Folding at Scale",
        "A transformer with self-attention; the transformer is trained on every structure.",
        0,
        ("cs.LG",),
    )
    prof = Profile(1, ("transformers",), 2, END - timedelta(hours=48), END)
    got = {e.paper_id: e for e in explain_profile([named, body, *FILLER], prof)}
    assert got["named"].title_names == ("transformers",)
    assert got["body"].title_names == ()
