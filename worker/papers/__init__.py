"""Papers: parse sources (Hugging Face daily papers, arXiv Atom, JSON Lines) and upsert them,
one row per paper whatever its sources. The scheduled fetch is worker.papers.fetch.

Typical use::

    with session_scope() as session:
        result = ingest_source(session, "https://huggingface.co/api/daily_papers")
        print(result.new, result.updated)
"""

from worker.papers.ingest import (
    IngestResult,
    count_papers,
    ingest_source,
    list_papers,
    load_sample_papers,
    sample_path,
    sample_records,
    upsert_papers,
)
from worker.papers.sources import (
    FORMATS,
    PaperRecord,
    PaperSourceError,
    ParsedSource,
    default_urls,
    detect_format,
    dump_jsonl,
    load_source,
    looks_like_arxiv_id,
    parse,
    parse_arxiv,
    parse_hf,
    parse_jsonl,
    read_source,
)

__all__ = [
    "FORMATS",
    "IngestResult",
    "PaperRecord",
    "PaperSourceError",
    "ParsedSource",
    "count_papers",
    "default_urls",
    "detect_format",
    "dump_jsonl",
    "ingest_source",
    "list_papers",
    "load_sample_papers",
    "load_source",
    "looks_like_arxiv_id",
    "parse",
    "parse_arxiv",
    "parse_hf",
    "parse_jsonl",
    "read_source",
    "sample_path",
    "sample_records",
    "upsert_papers",
]
