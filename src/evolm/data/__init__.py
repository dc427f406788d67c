"""Data: built-in corpora, user sources, quality filters, dedup, token shards and mixtures.

    sources.py   Document, SourceSpec; readers for text files/folders, JSONL, Parquet
    corpora.py   the built-in corpora (Shakespeare, King James Bible, Python code and docs)
    filters.py   cleaning + Gopher quality/repetition rules, StarCoder-style code rules
    dedup.py     exact (normalized hash) and near (MinHash LSH) deduplication
    shards.py    parallel tokenization into memory-mapped uint16/uint32 token shards
    prepare.py   the whole pipeline -> out_dir/{train,val}/*.bin + manifest.json
    mixture.py   weighted, deterministic, resumable training-window loader; eval batches
"""

from evolm.data.mixture import MixtureLoader, check_tokenizer, iter_eval_batches, load_manifest, tier_mixture
from evolm.data.prepare import EmptyCorpusError, prepare
from evolm.data.sources import DataError, Document, SourceSpec

__all__ = ["prepare", "MixtureLoader", "iter_eval_batches", "load_manifest", "check_tokenizer", "tier_mixture",
           "DataError", "EmptyCorpusError", "Document", "SourceSpec"]
