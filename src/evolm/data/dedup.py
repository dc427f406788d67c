"""Exact and near-duplicate removal.

Duplicated training text wastes compute and raises memorization (Lee et al. 2022,
"Deduplicating Training Data Makes Language Models Better"). Two passes, in this order:

1. **Exact**: hash of the text after normalization (NFKC, lower case, whitespace collapsed),
   so copies differing only in spacing or case count as the same document.
2. **Near**: MinHash signatures of word 5-gram shingles (Broder 1997, "On the resemblance
   and containment of documents") indexed with locality-sensitive hashing (``datasketch``'s
   ``MinHashLSH``). A document whose estimated Jaccard similarity with an already-kept
   document reaches ``threshold`` (0.8, as in GPT-3 / The Pile / RefinedWeb-style pipelines)
   is dropped. The first occurrence wins, so the result is deterministic.

Both passes run across all sources of a prepare call, in source order.
"""

from __future__ import annotations

import collections
import hashlib
import re
import unicodedata
from typing import Iterable, Iterator

from evolm.data.parallel import batched, ordered_map, worker_state
from evolm.data.sources import DataError, Document

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """The form two documents must share to be exact duplicates."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


class ExactDedup:
    """Drop documents whose normalized text was seen before; counts per source."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self.removed: dict[str, dict[str, int]] = {}

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        for d in docs:
            h = text_hash(d.text)
            if h in self.seen:
                e = self.removed.setdefault(d.source, {"docs": 0, "chars": 0})
                e["docs"] += 1
                e["chars"] += len(d.text)
                continue
            self.seen.add(h)
            yield d


def shingles(text: str, n: int = 5) -> list[bytes]:
    """Word n-grams of the normalized text (the whole text if it has fewer than n words)."""
    words = normalize(text).split(" ")
    if len(words) <= n:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i: i + n]).encode("utf-8") for i in range(len(words) - n + 1)]


def _minhash_init(num_perm: int, ngram: int, seed: int) -> None:
    worker_state().update(num_perm=num_perm, ngram=ngram, seed=seed)


def _minhash_batch(texts: list[str]) -> list:
    from datasketch import LeanMinHash, MinHash

    st = worker_state()
    out = []
    for t in texts:
        m = MinHash(num_perm=st["num_perm"], seed=st["seed"])
        m.update_batch(shingles(t, st["ngram"]))
        out.append(LeanMinHash(m))  # compact and picklable
    return out


class NearDedup:
    """MinHash-LSH near-duplicate removal (keeps the first of each near-duplicate cluster).

    ``removed[source]`` counts dropped documents and characters; ``pairs`` lists up to 100
    ``(dropped doc_id, kept doc_id)`` pairs so one can check what was judged a duplicate.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1,
                 workers: int = 1):
        try:
            from datasketch import MinHashLSH
        except ImportError as e:
            raise DataError("near-dedup needs the `datasketch` package (pip install datasketch), "
                            "or turn it off with near_dedup=False") from e
        if not 0 < threshold <= 1:
            raise DataError(f"near-dedup threshold must be in (0, 1], got {threshold}")
        self.threshold, self.num_perm, self.ngram, self.seed, self.workers = threshold, num_perm, ngram, seed, workers
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.signatures: dict[str, object] = {}  # key -> LeanMinHash
        self.removed: dict[str, dict[str, int]] = {}
        self.pairs: list[tuple[str, str]] = []

    def _key(self, d: Document) -> str:
        return f"{d.source}/{d.doc_id}/{len(self.signatures)}"

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        pending: collections.deque[list[Document]] = collections.deque()

        def texts() -> Iterator[list[str]]:
            for batch in batched(docs, max_items=64, max_chars=1 << 20, size=lambda d: len(d.text)):
                pending.append(batch)
                yield [d.text for d in batch]

        args = (self.num_perm, self.ngram, self.seed)
        for sigs in ordered_map(_minhash_batch, texts(), self.workers, _minhash_init, args):
            for d, m in zip(pending.popleft(), sigs):
                dup_of = None
                for key in sorted(self.lsh.query(m)):
                    if m.jaccard(self.signatures[key]) >= self.threshold:
                        dup_of = key
                        break
                if dup_of is not None:
                    e = self.removed.setdefault(d.source, {"docs": 0, "chars": 0})
                    e["docs"] += 1
                    e["chars"] += len(d.text)
                    if len(self.pairs) < 100:
                        self.pairs.append((f"{d.source}/{d.doc_id}", dup_of.rsplit("/", 1)[0]))
                    continue
                key = self._key(d)
                self.signatures[key] = m
                self.lsh.insert(key, m)
                yield d


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (to check the MinHash estimate)."""
    sa, sb = set(shingles(a, ngram)), set(shingles(b, ngram))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0
