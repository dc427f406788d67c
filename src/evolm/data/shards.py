"""Memory-mapped token shards with document boundaries, written by parallel tokenizers.

A shard is two files:

- ``NAME.bin``: the token ids of its documents back to back, raw little-endian ``uint16``
  when the vocabulary fits in 16 bits (GPT-2's 50,257, Llama 2's 32,000) and ``uint32``
  otherwise (Llama 3's 128,256, Gemma's 262,144). Half the disk and page cache of int32,
  and read with ``np.memmap`` so a training process touches only the windows it samples.
- ``NAME.idx.npy``: ``int64`` offsets, ``len == docs + 1``: document ``i`` is
  ``tokens[off[i]:off[i+1]]`` (including the EOS token appended to it, if any). The
  boundaries let training mask attention across documents or start windows at a document.

This is the layout of nanoGPT's ``train.bin`` plus Megatron-style index files, kept to
numpy so any tool can read it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from evolm.data.parallel import batched, ordered_map, worker_state
from evolm.data.sources import DataError


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """``uint16`` if every id of a ``vocab_size`` vocabulary fits in 16 bits, else ``uint32``."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32 token shards")


# --- tokenizer protocol ---------------------------------------------------------------------


def encode_ids(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer.encode(text)`` as a list of ints (a raw HF ``tokenizers.Tokenizer`` returns
    an ``Encoding``; its ``.ids`` are used)."""
    out = tokenizer.encode(text)
    return out.ids if hasattr(out, "ids") else out


def vocab_size_of(tokenizer: Any) -> int:
    v = getattr(tokenizer, "vocab_size", None)
    if v is None and hasattr(tokenizer, "get_vocab_size"):
        v = tokenizer.get_vocab_size()
    if callable(v):
        v = v()
    if not isinstance(v, int):
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no integer vocab_size")
    return v


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A sha256 that changes when the tokenizer's mapping changes.

    Uses, in order: a ``fingerprint()``/``hash`` the wrapper offers, the serialized JSON of
    a HF ``tokenizers`` object (``to_str()``, also looked for at ``.tokenizer`` /
    ``._tokenizer``), else the ids of a fixed probe text plus the vocabulary size.
    """
    for attr in ("fingerprint", "hash"):
        v = getattr(tokenizer, attr, None)
        if callable(v):
            v = v()
        if isinstance(v, str) and v:
            return v
    inner = (getattr(tokenizer, a, None) for a in ("tokenizer", "_tokenizer", "_tok", "tk", "hf", "backend"))
    for obj in (tokenizer, *inner):
        if obj is not None and callable(getattr(obj, "to_str", None)):
            return hashlib.sha256(obj.to_str().encode("utf-8")).hexdigest()
    probe = "The quick brown fox jumps over the lazy dog. 0123456789 def f(x):\n\treturn x ** 2 # é ü 中文"
    blob = json.dumps([vocab_size_of(tokenizer), getattr(tokenizer, "eos_id", None), encode_ids(tokenizer, probe)])
    return hashlib.sha256(blob.encode()).hexdigest()


def _tok_init(tokenizer: Any, eos_id: int | None, vocab_size: int) -> None:
    worker_state().update(tokenizer=tokenizer, eos_id=eos_id, vocab_size=vocab_size)


def _tok_batch(texts: list[str]) -> list[np.ndarray]:
    st = worker_state()
    tok, eos = st["tokenizer"], st["eos_id"]
    dtype = dtype_for_vocab(st["vocab_size"])
    out = []
    for t in texts:
        ids = encode_ids(tok, t)
        if eos is not None and (len(ids) == 0 or ids[-1] != eos):  # some tokenizers append EOS themselves
            ids = list(ids) + [eos]
        arr = np.asarray(ids, dtype=np.int64)
        if len(arr) and (arr.min() < 0 or arr.max() >= st["vocab_size"]):
            bad = int(arr.max()) if arr.max() >= st["vocab_size"] else int(arr.min())
            raise DataError(f"tokenizer produced id {bad} outside its vocabulary [0, {st['vocab_size']})")
        out.append(arr.astype(dtype))
    return out


def tokenize(texts: Iterable[str], tokenizer: Any, workers: int = 1, append_eos: bool = True) -> Iterator[np.ndarray]:
    """Token arrays of ``texts`` in input order, computed by ``workers`` processes.

    The result is identical for any number of workers: batches are dispatched and collected
    in order.
    """
    eos = getattr(tokenizer, "eos_id", None) if append_eos else None
    args = (tokenizer, eos, vocab_size_of(tokenizer))
    for arrs in ordered_map(_tok_batch, batched(texts, max_items=32, max_chars=1 << 19), workers, _tok_init, args):
        yield from arrs


# --- writing --------------------------------------------------------------------------------


class ShardWriter:
    """Append documents' token arrays to ``prefix_00000.bin`` (+ ``.idx.npy``), starting a
    new shard after ``shard_tokens`` tokens; documents never straddle two shards.

    Files are written under a temporary name and renamed on ``close()``, so a killed
    prepare never leaves a half shard that looks complete.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str, dtype: np.dtype, shard_tokens: int = 1 << 28):
        self.dir, self.prefix, self.dtype, self.shard_tokens = Path(out_dir), prefix, np.dtype(dtype), shard_tokens
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._fh = None
        self._offsets: list[int] = []

    def _open(self) -> None:
        name = f"{self.prefix}_{len(self.shards):05d}"
        self._name = name
        self._fh = open(self.dir / f"{name}.bin.tmp", "wb")
        self._offsets = [0]

    def _finish(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        name = self._name
        os.replace(self.dir / f"{name}.bin.tmp", self.dir / f"{name}.bin")
        with open(self.dir / f"{name}.idx.npy.tmp", "wb") as fh:
            np.save(fh, np.asarray(self._offsets, dtype=np.int64))
        os.replace(self.dir / f"{name}.idx.npy.tmp", self.dir / f"{name}.idx.npy")
        self.shards.append({"file": f"{name}.bin", "docs": len(self._offsets) - 1, "tokens": self._offsets[-1]})
        self._fh = None

    def add(self, tokens: np.ndarray) -> None:
        if len(tokens) == 0:
            return  # an empty document carries nothing to learn and no boundary worth keeping
        if self._fh is None:
            self._open()
        self._fh.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._offsets.append(self._offsets[-1] + len(tokens))
        if self._offsets[-1] >= self.shard_tokens:
            self._finish()

    def close(self) -> list[dict]:
        self._finish()
        return self.shards

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + (self._offsets[-1] if self._fh is not None else 0)

    @property
    def docs(self) -> int:
        return sum(s["docs"] for s in self.shards) + (len(self._offsets) - 1 if self._fh is not None else 0)


# --- reading --------------------------------------------------------------------------------


class TokenShard:
    """One shard, memory-mapped read-only."""

    def __init__(self, path: str | os.PathLike, dtype: np.dtype | str):
        self.path = Path(path)
        idx = self.path.with_name(self.path.name[: -len(".bin")] + ".idx.npy")
        for p in (self.path, idx):
            if not p.exists():
                raise FileNotFoundError(f"token shard file missing: {p} (re-run `evolm data prepare`)")
        self.offsets = np.load(idx)
        self.dtype = np.dtype(dtype)
        size = self.path.stat().st_size
        if size != int(self.offsets[-1]) * self.dtype.itemsize:
            raise DataError(f"{self.path}: {size} bytes, but its index says {int(self.offsets[-1])} "
                            f"{self.dtype} tokens; the shard is corrupt or from another prepare")
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i]: self.offsets[i + 1]])

    def docs(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.doc(i)
