#!/usr/bin/env python3
"""Write worker/data/sample_papers.jsonl: the demo's papers, with nothing made up.

Titles and abstracts are those of the seed page tests/data/trending_page.txt (a copy of a
"trending papers" page: a few header lines, then per paper a title line and an abstract
line; the first title is glued to the header's last word, "SubscribeRobust Pruning...").
Each paper's arXiv id, authors and, where known, categories (primary first), comment and
DOI come from FACTS below, each looked up in a public record (the recorded feeds in
tests/data, or the paper's arXiv, proceedings or publisher page). What was not found is
left out: no upvotes (none was recorded), no publication date (the demo's papers count
from their ingestion, so they are always "today's"), authors only where the whole list
was found, and a paper whose arXiv id was not found is not in the sample at all. Links
are the arXiv abstract page, the PDF and the Hugging Face page of the id.

    python scripts/make_sample_papers.py            # rewrite the bundled file
    python scripts/make_sample_papers.py --check    # exit 1 if the bundled file is stale
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SEED = ROOT / "tests" / "data" / "trending_page.txt"
DEFAULT_OUTPUT = ROOT / "worker" / "data" / "sample_papers.jsonl"
HEADER_WORD = "Subscribe"

# title -> what public records say of it ("authors": None when the full list was not found).
FACTS: dict[str, dict[str, Any]] = {
    "Robust Pruning at Initialization": {  # tests/data/arxiv_feed.xml
        "id": "2002.08797",
        "authors": ["Soufiane Hayou", "Jean-Francois Ton", "Arnaud Doucet", "Yee Whye Teh"],
        "categories": ["stat.ML", "cs.LG"],
        "comment": "Published as a conference paper at ICLR 2021",
    },
    "Spherical Inducing Features for Orthogonally-Decoupled Gaussian Processes": {
        "id": "2305.01542",  # tests/data/arxiv_feed.xml
        "authors": ["Louis C. Tiao", "Vincent Dutordoir", "Victor Picheny"],
        "categories": ["cs.LG", "stat.ML"],
        "comment": "ICML 2023",
    },
    "Annotated History of Modern AI and Deep Learning": {  # tests/data/hf_daily_papers.json
        "id": "2212.11279",
        "authors": ["Jürgen Schmidhuber"],
    },
    "Invertible Diffusion Models for Compressed Sensing": {  # tests/data/hf_daily_papers.json
        "id": "2403.17006",
        "authors": [
            "Bin Chen",
            "Zhenyu Zhang",
            "Weiqi Li",
            "Chen Zhao",
            "Jiwen Yu",
            "Shijie Zhao",
            "Jie Chen",
            "Jian Zhang",
        ],
    },
    "Adaptive Regularization of Representation Rank as an Implicit Constraint of Bellman "
    "Equation": {  # tests/data/hf_daily_papers.json
        "id": "2404.12754",
        "authors": ["Qiang He", "Tianyi Zhou", "Meng Fang", "Setareh Maghsudi"],
    },
    "Forward Learning of Graph Neural Networks": {  # arXiv HTML of 2403.11004v2, ICLR 2024
        "id": "2403.11004",
        "authors": [
            "Namyong Park",
            "Xing Wang",
            "Antoine Simoulin",
            "Shuai Yang",
            "Grey Yang",
            "Ryan Rossi",
            "Puja Trivedi",
            "Nesreen Ahmed",
        ],
    },
    "NNSmith: Generating Diverse and Valid Test Cases for Deep Learning Compilers": {
        "id": "2207.13066",  # ADS record of arXiv:2207.13066, ASPLOS 2023
        "authors": [
            "Jiawei Liu",
            "Jinkun Lin",
            "Fabian Ruffy",
            "Cheng Tan",
            "Jinyang Li",
            "Aurojit Panda",
            "Lingming Zhang",
        ],
        "doi": "10.1145/3575693.3575707",
    },
    "NNV: The Neural Network Verification Tool for Deep Neural Networks and Learning-Enabled "
    "Cyber-Physical Systems": {"id": "2004.05519", "authors": None},  # CAV 2020
    "Accelerating In-Browser Deep Learning Inference on Diverse Edge Clients through "
    "Just-in-Time Kernel Optimizations": {  # arXiv 2309.08978 (v1 title)
        "id": "2309.08978",
        "authors": [
            "Fucheng Jia",
            "Shiqi Jiang",
            "Ting Cao",
            "Wei Cui",
            "Tianrui Xia",
            "Xu Cao",
            "Yuanchun Li",
            "Deyu Zhang",
            "Ju Ren",
            "Yunxin Liu",
            "Lili Qiu",
            "Mao Yang",
        ],
    },
    "Deep Unlearning via Randomized Conditionally Independent Hessians": {  # CVPR 2022
        "id": "2204.07655",
        "authors": ["Ronak Mehta", "Sourav Pal", "Vikas Singh", "Sathya N. Ravi"],
        "doi": "10.1109/cvpr52688.2022.01017",
    },
    "Information Bottleneck Analysis of Deep Neural Networks via Lossy Compression": {
        "id": "2305.08013",
        "authors": [
            "Ivan Butakov",
            "Alexander Tolmachev",
            "Sofia Malanchuk",
            "Anna Neopryatnaya",
            "Alexey Frolov",
            "Kirill Andreev",
        ],
    },
    "Convolutional Deep Kernel Machines": {  # arXiv 2309.09814, ICLR 2024
        "id": "2309.09814",
        "authors": ["Edward Milsom", "Ben Anson", "Laurence Aitchison"],
    },
    "COMPASS: High-Efficiency Deep Image Compression with Arbitrary-scale Spatial "
    "Scalability": {  # arXiv HTML of 2309.07926v2, ICCV 2023
        "id": "2309.07926",
        "authors": ["Jongmin Park", "Jooyoung Lee", "Munchurl Kim"],
    },
    "NNSplitter: An Active Defense Solution for DNN Model via Automated Weight "
    "Obfuscation": {  # ICML 2023 poster page
        "id": "2305.00097",
        "authors": ["Tong Zhou", "Yukui Luo", "Shaolei Ren", "Xiaolin Xu"],
        "comment": "To appear at ICML 2023",
    },
    "Minimum Latency Deep Online Video Stabilization": {"id": "2212.02073", "authors": None},
    "A theory of representation learning gives a deep generalisation of kernel methods": {
        "id": "2108.13097",  # arXiv abstract page, v6
        "authors": [
            "Adam X. Yang",
            "Maxime Robeyns",
            "Edward Milsom",
            "Ben Anson",
            "Nandi Schoots",
            "Laurence Aitchison",
        ],
        "categories": ["stat.ML", "cs.LG"],
    },
    "A Survey of Active Learning for Text Classification using Deep Neural Networks": {
        "id": "2008.07267",  # arXiv abstract page
        "authors": ["Christopher Schröder", "Andreas Niekler"],
        "categories": ["cs.CL", "cs.LG"],
    },
    "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer": {
        "id": "2203.03466",
        "authors": [
            "Greg Yang",
            "Edward J. Hu",
            "Igor Babuschkin",
            "Szymon Sidor",
            "Xiaodong Liu",
            "David Farhi",
            "Nick Ryder",
            "Jakub Pachocki",
            "Weizhu Chen",
            "Jianfeng Gao",
        ],
        "categories": ["cs.LG", "cond-mat.dis-nn", "cs.NE"],
    },
    "Like an Open Book? Read Neural Network Architecture with Simple Power Analysis on "
    "32-bit Microcontrollers": {  # arXiv 2311.01344, CARDIS 2023
        "id": "2311.01344",
        "authors": ["Raphaël Joud", "Pierre-Alain Moëllic", "Simon Pontié", "Jean-Baptiste Rigaud"],
    },
    "Rethinking Nearest Neighbors for Visual Classification": {
        "id": "2112.08459",
        "authors": [
            "Menglin Jia",
            "Bor-Chun Chen",
            "Zuxuan Wu",
            "Claire Cardie",
            "Serge Belongie",
            "Ser-Nam Lim",
        ],
        "categories": ["cs.CV"],
    },
    "A Chain Graph Interpretation of Real-World Neural Networks": {
        "id": "2006.16856",
        "authors": ["Yuesong Shen", "Daniel Cremers"],
    },
    "Probabilistic Discriminative Learning with Layered Graphical Models": {
        "id": "1902.00057",
        "authors": ["Yuesong Shen", "Tao Wu", "Csaba Domokos", "Daniel Cremers"],
    },
}


class SeedError(Exception):
    pass


def parse_seed(text: str, header_word: str = HEADER_WORD) -> list[tuple[str, str]]:
    """(title, abstract) pairs of the seed page, in page order."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    glued = re.compile(rf"^{re.escape(header_word)}(?=\S)")
    start = next((i for i, line in enumerate(lines) if glued.match(line)), None)
    if start is None:
        raise SeedError(f"no line starts with the header word {header_word!r} glued to a title")
    body = lines[start:]
    body[0] = body[0][len(header_word) :]
    if len(body) % 2:
        raise SeedError(f"expected title/abstract pairs, got {len(body)} lines after the header")
    pairs = [(body[i], body[i + 1]) for i in range(0, len(body), 2)]
    for number, (title, abstract) in enumerate(pairs, start=1):
        # A title longer than its abstract means the pairing slipped.
        if len(title) >= len(abstract):
            raise SeedError(f"paper {number}: title {title[:40]!r} is not followed by an abstract")
    return pairs


def make_records(pairs: list[tuple[str, str]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The sample's records, and the titles left out (no arXiv id found)."""
    records: list[dict[str, Any]] = []
    missing: list[str] = []
    for title, abstract in pairs:
        facts = FACTS.get(title)
        if facts is None:
            missing.append(title)
            continue
        paper_id = facts["id"]
        record: dict[str, Any] = {
            "id": paper_id,
            "title": title,
            "abstract": abstract,
            "authors": facts["authors"] or [],
            "url": f"https://arxiv.org/abs/{paper_id}",
            "pdf_url": f"https://arxiv.org/pdf/{paper_id}",
            "hf_url": f"https://huggingface.co/papers/{paper_id}",
        }
        for key in ("categories", "comment", "doi"):
            if facts.get(key):
                record[key] = facts[key]
        record["sample"] = True
        records.append(record)
    return records, missing


def render(seed_text: str) -> tuple[str, list[str]]:
    records, missing = make_records(parse_seed(seed_text))
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=Path, default=DEFAULT_SEED)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--check", action="store_true", help="fail if --output is stale")
    args = parser.parse_args(argv)
    try:
        content, missing = render(args.seed.read_text(encoding="utf-8"))
    except SeedError as exc:
        print(f"error: {args.seed}: {exc}", file=sys.stderr)
        return 2
    for title in missing:
        print(f"left out (no arXiv id found): {title}", file=sys.stderr)
    # Validate with papermail's own parser so the bundled file always ingests.
    from worker.papers.sources import parse_jsonl

    count = len(parse_jsonl(content, str(args.output)))
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != content:
            print(f"{args.output} is stale; run {Path(__file__).name}", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date ({count} papers)")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(content, encoding="utf-8")
    print(f"wrote {count} papers to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
