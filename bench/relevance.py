#!/usr/bin/env python3
"""Benchmark: how often the digest picks what a reader of each topic wants.

    python bench/relevance.py                 # dev and test splits, today's and the new ranking
    python bench/relevance.py --split test --per-topic
    python bench/relevance.py --json

Over the labelled set in tests/data (real arXiv records; tests/data/RELEVANCE_README.md), one
subscriber per topic, every paper of the split a candidate on the same day. Upvotes are made
adversarial: papers no topic wants get 100 more, so trending alone would pick them.

Per topic: recall and precision of the top k (k = number of wanted papers), P@5, nDCG@10,
and whether the 5-paper digest holds a paper from another field that nobody following the
topic wants ("other field"). "today" is the ranking before the concept vocabulary (topic
words only, upvotes mixed into relevance); "new" is the shipped default.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.selection import Candidate, Profile, SelectionParams, select_batch  # noqa: E402

DATA = ROOT / "tests" / "data"
DAY = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)


def load() -> tuple[list[dict], list[dict]]:
    papers = [json.loads(x) for x in (DATA / "relevance_papers.jsonl").read_text().splitlines()]
    topics = json.loads((DATA / "relevance_labels.json").read_text())["topics"]
    return papers, topics


def _upvotes(pid: str, wanted_by_any: bool) -> int:
    base = int(hashlib.sha256(pid.encode()).hexdigest(), 16) % 100
    return base if wanted_by_any else base + 100


def ranking(papers: list[dict], topics: list[dict], params: SelectionParams, depth: int) -> dict:
    wanted_any = {pid for t in topics for pid in t["wanted"]}
    cands = [
        Candidate(
            p["id"],
            p["title"],
            p["abstract"],
            _upvotes(p["id"], p["id"] in wanted_any),
            DAY - timedelta(hours=1 + int(p["id"][-2:].strip(".") or 0) % 24),
            tuple(p["categories"]),
        )
        for p in papers
    ]
    profiles = [
        Profile(i + 1, (t["topic"],), depth, DAY - timedelta(hours=48), DAY)
        for i, t in enumerate(topics)
    ]
    res = select_batch(cands, profiles, params=params)
    return {t["topic"]: [p.paper_id for p in res[i + 1].picks] for i, t in enumerate(topics)}


def metrics(papers: list[dict], topics: list[dict], params: SelectionParams) -> dict:
    ids = {p["id"] for p in papers}
    field = {p["id"]: p["field"] for p in papers}
    scoped = [dict(t, wanted=[w for w in t["wanted"] if w in ids]) for t in topics]
    scoped = [t for t in scoped if t["wanted"]]
    ranked = ranking(papers, scoped, params, 50)
    out = {}
    for t in scoped:
        wanted = set(t["wanted"])
        got = ranked[t["topic"]]
        k = len(wanted)
        top_k = got[:k]
        hits_k = sum(1 for x in top_k if x in wanted)
        dcg = sum(1 / math.log2(i + 2) for i, x in enumerate(got[:10]) if x in wanted)
        idcg = sum(1 / math.log2(i + 2) for i in range(min(10, k)))
        digest = got[:5]
        other = [x for x in digest if x not in wanted and field[x] != t["field"]]
        out[t["topic"]] = {
            "k": k,
            "recall_at_k": hits_k / k,
            "precision_at_k": hits_k / len(top_k) if top_k else 0.0,
            "p_at_5": sum(1 for x in digest if x in wanted) / min(5, k),
            "ndcg_at_10": dcg / idcg,
            "other_field": other,
            "misses": sorted(wanted - set(top_k)),
            "false": [x for x in top_k if x not in wanted],
        }
    return out


def summary(per: dict) -> dict:
    n = len(per)
    return {
        "recall_at_k": sum(v["recall_at_k"] for v in per.values()) / n,
        "precision_at_k": sum(v["precision_at_k"] for v in per.values()) / n,
        "p_at_5": sum(v["p_at_5"] for v in per.values()) / n,
        "ndcg_at_10": sum(v["ndcg_at_10"] for v in per.values()) / n,
        "other_field_digests": sum(1 for v in per.values() if v["other_field"]) / n,
        "topics": n,
    }


METHODS = {
    # Before issue 17: topic words only, upvotes mixed into relevance.
    "today": replace(
        SelectionParams(),
        use_concepts=False,
        strong_relevance=0.0,
        phrase_gate=False,
        expansion_weight=0.0,
        title_relevance=0.0,
    ),
    # + concept vocabulary (phrases, arXiv fields as evidence) and relevance bands.
    "+concepts,fields,bands": replace(
        SelectionParams(), phrase_gate=False, expansion_weight=0.0, title_relevance=0.0
    ),
    # + a phrase of several words matches only where the whole phrase is.
    "+phrase gate": replace(SelectionParams(), expansion_weight=0.0, title_relevance=0.0),
    # + a second band for the strongest matches (not shipped: no gain on dev).
    "+phrase gate,top band 0.9": replace(
        SelectionParams(), expansion_weight=0.0, top_relevance=0.9, title_relevance=0.0
    ),
    # + co-occurrence expansion for papers without categories (the previous default).
    "+expansion 0.5": replace(SelectionParams(), expansion_weight=0.5, title_relevance=0.0),
    # + title band: strong matches whose title names the topic first.
    "+title band": replace(SelectionParams(), expansion_weight=0.5),
    # The shipped default: + title band, expansion 0.3 (tuned on dev with the band).
    "new": SelectionParams(),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--split", choices=["dev", "test", "all"], action="append")
    ap.add_argument("--per-topic", action="store_true", help="print every topic's figures")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    papers, topics = load()
    splits = args.split or ["dev", "test"]
    report: dict = {}
    for split in splits:
        subset = papers if split == "all" else [p for p in papers if p["split"] == split]
        report[split] = {}
        for name, params in METHODS.items():
            per = metrics(subset, topics, params)
            report[split][name] = {"summary": summary(per), "per_topic": per}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    cols = ["recall_at_k", "precision_at_k", "p_at_5", "ndcg_at_10", "other_field_digests"]
    for split, by in report.items():
        n = len({p["id"] for p in papers if split == "all" or p["split"] == split})
        print(f"== {split}: {n} papers, {by['new']['summary']['topics']} topics")
        print(f"{'':30}" + "".join(f"{c:>21}" for c in cols))
        for name, got in by.items():
            s = got["summary"]
            print(f"{name:30}" + "".join(f"{s[c]:>21.3f}" for c in cols))
        if args.per_topic:
            for topic in by["new"]["per_topic"]:
                a, b = by["today"]["per_topic"][topic], by["new"]["per_topic"][topic]
                print(
                    f"  {topic:26} k={b['k']:>2}"
                    f"  R@k {a['recall_at_k']:.2f} -> {b['recall_at_k']:.2f}"
                    f"  P@5 {a['p_at_5']:.2f} -> {b['p_at_5']:.2f}"
                    f"  nDCG@10 {a['ndcg_at_10']:.2f} -> {b['ndcg_at_10']:.2f}"
                    f"  other field {len(a['other_field'])} -> {len(b['other_field'])}"
                )
                if b["misses"] or b["false"]:
                    print(f"      missed {b['misses']}  not wanted {b['false']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
