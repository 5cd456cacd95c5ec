"""A small ML/AI concept vocabulary shipped with the package (no download, no network).

A subscriber's topic that names a known concept ("RL", "reinforcement learning", "GNNs") is
matched by the concept's *phrases*, its acronyms and synonyms (MDP, policy gradient,
Q-learning...), so a policy-gradient paper that never says "reinforcement learning" still
matches; and by the concept's *fields*, arXiv categories: a paper from another science
(steel reinforcement in cond-mat, heat kernels in math.AP) is not a match, whatever words it
shares (selection._field_weight has the weights). A phrase may carry a weight ("prompt=0.3"):
generic evidence counts less than the topic's own words.

Topics the vocabulary does not know are matched by their own words, as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["CONCEPTS", "Concept", "concept_for"]

# Where machine learning papers live on arXiv (primary or cross-listed).
ML_FIELDS = frozenset(
    {
        "cs.LG", "cs.AI", "stat.ML", "cs.CV", "cs.CL", "cs.NE", "cs.RO", "cs.IR", "cs.SD",
        "eess.AS", "eess.IV", "eess.SP", "cs.MA", "cs.HC", "cs.CR", "cs.DC", "cs.SI",
        "cs.MM", "cs.GR", "cs.SE", "cs.CY", "q-bio.QM", "math.OC", "cs.SY", "eess.SY",
    }
)  # fmt: skip
STATS_FIELDS = frozenset({"stat.ME", "stat.TH", "math.ST", "stat.CO", "stat.AP", "physics.data-an"})


@dataclass(frozen=True, slots=True)
class Concept:
    name: str
    aliases: tuple[str, ...]  # what a subscriber may type for it (besides the name)
    phrases: tuple[str, ...]  # text that is evidence of the concept in a paper
    weights: tuple[float, ...]  # per phrase: a generic one ("prompt") counts less
    fields: frozenset[str] | None  # arXiv categories it lives in; None: any


_WORDS = re.compile(r"[^\W_]+")


def _whole(phrase: str) -> bool:
    """A phrase the text analysis keeps whole: "q-learning" would shrink to "learning" (the
    analysis drops one-letter words), and would then match every learning paper."""
    return all(len(w) > 1 for w in _WORDS.findall(phrase))


def _c(name: str, aliases: str, phrases: str, fields: frozenset[str] | None = ML_FIELDS) -> Concept:
    """``phrases``: "a; b=0.5": "b" counts half as much as the topic's own words."""
    split = lambda s: tuple(x.strip() for x in s.split(";") if x.strip())  # noqa: E731
    kept = []
    for item in split(phrases):
        phrase, _, w = item.partition("=")
        if _whole(phrase.strip()):
            kept.append((phrase.strip(), float(w) if w else 1.0))
    return Concept(
        name, split(aliases), tuple(p for p, _ in kept), tuple(w for _, w in kept), fields
    )


CONCEPTS: tuple[Concept, ...] = (
    _c(
        "diffusion models",
        "diffusion model; denoising diffusion; score-based models; ddpm",
        "diffusion model; latent diffusion; video diffusion; diffusion transformer; denoising "
        "diffusion; ddpm; ddim; score-based generative; score matching; stable diffusion; "
        "text-to-image diffusion; diffusion policy; diffusion sampling; flow matching",
    ),
    _c(
        "reinforcement learning",
        "rl; deep reinforcement learning; deep rl",
        "reinforcement learning; policy gradient; q-learning; deep q-network; markov decision "
        "process; mdp; actor-critic; ppo; proximal policy optimization; rlhf; rlvr; grpo; "
        "reward model; multi-agent reinforcement learning; marl; temporal difference",
    ),
    _c(
        "graph neural networks",
        "gnn; gnns; graph neural network; graph learning",
        "graph neural network; gnn; graph convolutional network; graph convolution; gcn; "
        "graph attention network; message passing; node embedding; node classification; "
        "link prediction; graph transformer; spatio-temporal graph; graph representation learning",
    ),
    _c(
        "large language models",
        "llm; llms; large language model; language models; gpt",
        "large language model; llm; gpt; chatgpt; gpt-4; llama; language model=0.5; instruction "
        "tuning; in-context learning; chain-of-thought; hallucination=0.6; jailbreak; prompt=0.3",
    ),
    _c(
        "transformers",
        "transformer; transformer models; vision transformers; vit",
        "transformer; self-attention; vision transformer; vit; swin transformer; multi-head "
        "attention; attention mechanism; encoder-decoder transformer",
    ),
    _c(
        "attention mechanisms",
        "attention; self-attention; attention mechanism",
        "self-attention; attention mechanism; multi-head attention; cross-attention; "
        "transformer; attention map; linear attention",
    ),
    _c(
        "kernel methods",
        "kernel method; kernel machines; kernel learning",
        "kernel method; kernel learning; kernelized; reproducing kernel; rkhs; support vector "
        "machine; svm; one-class svm; gaussian process; kernel trick; kernel regression; kernel "
        "estimator; kernel-based; maximum mean discrepancy; mmd=0.5; kernelized correlation "
        "filter; kernel correlation filter; gaussian kernel; random fourier feature; deep kernel; "
        "multiple kernel",
        ML_FIELDS | STATS_FIELDS,
    ),
    _c(
        "embeddings",
        "embedding; text embeddings; sentence embeddings; word embeddings",
        "embedding model; text embedding; sentence embedding; word embedding; word2vec; "
        "universal multimodal embedding; contrastive embedding; dense retrieval; dense retriever",
    ),
    _c(
        "llm agents",
        "ai agents; agents; agentic ai; language agents; coding agents",
        "llm agent; agentic; ai agent; coding agent; language agent; tool use; autonomous "
        "agent; multi-agent llm; alphaevolve; web agent; gui agent; agent framework; llm-based "
        "agent; llm-driven agent; llm-powered agent; llm-powered=0.8; llm-driven=0.8",
    ),
    _c(
        "vision-language models",
        "vlm; vlms; vision language models; multimodal llm; mllm",
        "vision-language model; vision language model; vlm; multimodal large language model; "
        "mllm; visual question answering; vqa; image-text; clip; visual instruction tuning; "
        "vision-and-language; gpt-4v; gpt-4o; llava; large multimodal model; lmm; multimodal "
        "foundation model",
    ),
    _c(
        "computer vision",
        "vision",
        "computer vision; image classification; object detection; segmentation; image "
        "recognition; convolutional neural network; visual",
    ),
    _c(
        "speech recognition",
        "asr; automatic speech recognition",
        "speech recognition; asr; automatic speech recognition; ctc; connectionist temporal "
        "classification; speech-to-text; transducer; acoustic model; wav2vec",
    ),
    _c(
        "semantic segmentation",
        "segmentation; image segmentation",
        "semantic segmentation; image segmentation; pixel-wise classification; scene parsing; "
        "panoptic segmentation; segmentation network; medical image segmentation; segment "
        "anything; segmentation=0.6",
    ),
    _c(
        "federated learning",
        "fl; federated",
        "federated learning; federated; client selection; fedavg; federated averaging; "
        "decentralized training; privacy-preserving training",
    ),
    _c(
        "object tracking",
        "visual tracking; multi-object tracking; mot",
        "object tracking; visual tracking; single object tracking; multi-object tracking; "
        "siamese tracker; siamese network tracking; tracker; correlation filter tracking",
    ),
    _c(
        "anomaly detection",
        "outlier detection; novelty detection",
        "anomaly detection; anomaly; outlier detection; novelty detection; anomalous; "
        "one-class classification; anomaly segmentation; out-of-distribution detection; ood "
        "detection",
    ),
    _c(
        "state space models",
        "ssm; ssms; mamba; structured state spaces",
        "state space model; state-space model; ssm; mamba; structured state space; s4; "
        "selective state space; linear recurrence",
    ),
    _c(
        "knowledge distillation",
        "distillation; model distillation",
        "knowledge distillation; distillation; teacher-student; student model; teacher model; "
        "distilled",
    ),
    _c(
        "quantum computing",
        "quantum computation; quantum algorithms",
        "quantum computing; quantum computation; quantum algorithm; quantum computer; qubit=0.5; "
        "quantum circuit; shor's algorithm; quantum gate; fault-tolerant quantum; quantum error "
        "correction; quantum code; quantum ldpc; stabilizer code; quantum error-correcting; "
        "variational quantum; qaoa; quantum machine learning; quantum annealing; qudit; css code; "
        "surface code; logical error rate",
        frozenset({"quant-ph", "cs.ET", "cs.DS", "cs.CC", "cs.LG", "cs.AR"}),
    ),
    _c(
        "graph theory",
        "graphs; combinatorics",
        "graph theory; graph=0.9; random graph; regular graph; graph isomorphism; graph "
        "decomposition; subgraph; bipartite graph; chromatic; hypercube; spanning tree; planar "
        "graph; graph coloring",
        frozenset({"math.CO", "cs.DM", "cs.DS", "math.GT", "cs.CG", "math.PR"}),
    ),
    _c(
        "generative adversarial networks",
        "gan; gans",
        "generative adversarial network; gan; adversarial training generator discriminator",
    ),
    _c(
        "self-supervised learning",
        "ssl; self-supervised",
        "self-supervised; contrastive learning; masked image modeling; simclr; byol; pretext task",
    ),
    _c(
        "retrieval-augmented generation",
        "rag",
        "retrieval-augmented generation; rag; retrieval augmented; dense retrieval; retriever",
    ),
)

_KEY = re.compile(r"[^a-z0-9]+")


def _key(text: str) -> str:
    words = _KEY.sub(" ", text.lower()).split()
    # Plurals do not change the concept ("transformer" / "transformers").
    return " ".join(w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words)


_BY_KEY: dict[str, Concept] = {}
for _concept in CONCEPTS:
    for _name in (_concept.name, *_concept.aliases):
        _BY_KEY.setdefault(_key(_name), _concept)


def concept_for(topic: str) -> Concept | None:
    """The concept a subscriber's topic names, if the vocabulary knows it."""
    return _BY_KEY.get(_key(topic))
