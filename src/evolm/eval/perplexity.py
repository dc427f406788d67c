"""Perplexity and bits-per-byte of any text: a file, a folder of files, JSONL, or token shards.

A document's log-likelihood is the sum over its tokens of ``log p(token | preceding tokens)``,
computed window by window when it is longer than the model's context (``loglik.rolling_windows``):

- ``stride=None``: lm-eval's ``loglikelihood_rolling`` (disjoint windows; the wikitext task's
  ``word_perplexity`` / ``byte_perplexity`` / ``bits_per_byte``);
- ``stride < max_length``: the strided sliding window of Hugging Face's perplexity guide
  (Press et al. 2021 discuss why overlap lowers perplexity: tokens at a window start see no
  context); every token is still scored once.

Metrics over a corpus weigh documents by size, as lm-eval's ``weighted_perplexity`` does:
``perplexity = exp(-sum ll / sum tokens)`` (tokens scored), ``word_perplexity`` per whitespace
word, ``byte_perplexity`` per UTF-8 byte, and ``bits_per_byte = -sum ll / (bytes * ln 2)``
(Gao et al. 2020, The Pile: tokenizer-independent, so models with different vocabularies compare).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".tex", ".py", ".html", ".csv"}


def count_words(text: str) -> int:
    """lm-eval's word count (``len(re.split(r"\\s+", doc))``)."""
    return len(re.split(r"\s+", text))


def _shard_docs(path: Path) -> list[np.ndarray]:
    """Documents of one token shard ``NAME.bin`` (+ ``NAME.idx.npy``), dtype from the file size."""
    idx = path.with_name(path.name[: -len(".bin")] + ".idx.npy")
    if not idx.is_file():
        raise FileNotFoundError(f"{path}: token shard without its index {idx.name}")
    offsets = np.load(idx)
    n = int(offsets[-1])
    size = path.stat().st_size
    if n == 0 or size % n or size // n not in (2, 4):
        raise ValueError(f"{path}: {size} bytes for {n} tokens is neither uint16 nor uint32 shard data")
    toks = np.memmap(path, dtype=np.uint16 if size // n == 2 else np.uint32, mode="r")
    return [np.asarray(toks[offsets[i]:offsets[i + 1]], dtype=np.int64) for i in range(len(offsets) - 1)]


def load_corpus(path: str | Path, split: str = "val") -> tuple[list[str] | None, list[np.ndarray] | None, str]:
    """``path`` -> (texts, None, kind) or (None, token docs, kind).

    - a text file: one document; ``.jsonl``: one document per line (its ``"text"`` field);
    - a folder of text files (``*.txt``, ``*.md``, ...; recursively, sorted): one document each;
    - token shards: a ``.bin`` shard, or a prepared data folder (``manifest.json``; the ``split``
      shards, default ``val``), or any folder holding ``*.bin`` + ``*.idx.npy``.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"ppl: {p} does not exist (expected a text file, a folder or token shards)")
    if p.is_file() and p.suffix == ".bin":
        return None, _shard_docs(p), "shards"
    if p.is_file() and p.suffix == ".jsonl":
        with open(p, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if rows and "text" not in rows[0]:
            raise ValueError(f"{p}: JSONL rows need a 'text' field, got {sorted(rows[0])}")
        return [r["text"] for r in rows], None, "jsonl"
    if p.is_file():
        return [p.read_text(encoding="utf-8")], None, "text"
    shards = sorted((p / split).glob("**/*.bin")) if (p / "manifest.json").is_file() else []
    shards = shards or sorted(p.glob("**/*.bin"))
    if shards:
        return None, [d for s in shards for d in _shard_docs(s)], "shards"
    files = sorted(f for f in p.glob("**/*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"ppl: {p} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))}) and no token shards")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files], None, "folder"


def perplexity_metrics(lls: list[float], n_tokens: list[int], texts: list[str]) -> dict:
    """Corpus metrics from per-document log-likelihoods, token counts and texts."""
    ll = float(sum(lls))
    toks = int(sum(n_tokens))
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(count_words(t) for t in texts)
    return {"perplexity": math.exp(-ll / max(1, toks)), "word_perplexity": math.exp(-ll / max(1, words)),
            "byte_perplexity": math.exp(-ll / max(1, nbytes)), "bits_per_byte": -ll / (max(1, nbytes) * math.log(2)),
            "loglikelihood": ll, "n_tokens": toks, "n_words": words, "n_bytes": nbytes, "n_docs": len(lls)}


def evaluate_perplexity(scorer, path: str | Path, stride: int | None = None, prefix: bool = True,
                        limit: int | None = None, split: str = "val") -> dict:
    """Perplexity metrics of the corpus at ``path`` with a ``LoglikScorer`` (its model, tokenizer,
    ``max_length`` and request cache)."""
    texts, token_docs, kind = load_corpus(path, split)
    tok = scorer.tokenizer
    if texts is not None:
        texts = texts[:limit] if limit else texts
        texts = [t for t in texts if t]
        lls = scorer.loglikelihood_rolling(texts, stride=stride, prefix=prefix)
        n = [len(tok.encode(t)) - (0 if prefix else 1) for t in texts]
    else:
        token_docs = [d for d in (token_docs[:limit] if limit else token_docs) if len(d)]
        lls = scorer.loglikelihood_rolling_tokens(token_docs, stride=stride, prefix=prefix)
        n = [len(d) - (0 if prefix else 1) for d in token_docs]
        texts = [tok.decode([int(t) for t in d], skip_special_tokens=True) for d in token_docs]
    out = perplexity_metrics(lls, n, texts)
    out["source"] = kind
    return out
