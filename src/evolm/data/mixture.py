"""Mixtures and the training-window loader.

A *mixture* is a list of sources with weights, e.g. ``{"web": 0.6, "books": 0.15, "code":
0.1, ...}``: each training sequence comes from source ``s`` with probability ``w_s``,
whatever the sources' sizes (Gopher's MassiveText and Llama's pretraining data are mixed
this way; a small high-quality source is seen for several epochs, a big one for less than
one). Stages of a recipe change the mixture, e.g. annealing on the highest-quality source.

``MixtureLoader`` samples fixed-length windows ``(x, y)`` from the token shards written by
``prepare``:

- Each source's token stream (its documents back to back, with EOS between them) is cut
  into non-overlapping windows of ``seq_len + 1`` tokens. Windows of a source are visited in
  a random order that is a fresh permutation each epoch of that source: no window repeats
  before all have been seen.
- The source of each sequence of step ``t`` is drawn from a generator seeded by
  ``(seed, t)`` alone. The batch of a step is therefore a function of ``(seed, step, the
  per-source cursors)``; ``state_dict()`` saves exactly that, so a restarted run draws
  bit-identical batches.
- Distributed runs draw the *global* batch on every rank and each rank keeps its slice, so
  the data seen does not depend on the number of ranks (DDP with 2 ranks x 4 equals one
  process with 8).
"""

from __future__ import annotations

import difflib
import json
import os
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from evolm.data.shards import TokenShard
from evolm.data.sources import DataError

MANIFEST = "manifest.json"


def load_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no prepared data at {data_dir}: {path} is missing; run `evolm data prepare`")
    return json.loads(path.read_text())


def normalize_weights(weights: dict[str, float], known: list[str], what: str = "mixture") -> dict[str, float]:
    """Check names against ``known`` (suggesting the closest on a typo) and scale to sum 1."""
    if not weights:
        raise DataError(f"{what}: no sources given")
    for name, w in weights.items():
        if name not in known:
            hint = difflib.get_close_matches(name, known, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise DataError(f"{what}: unknown source {name!r}{extra} (prepared sources: {known})")
        if not isinstance(w, (int, float)) or w < 0:
            raise DataError(f"{what}: weight of {name!r} must be a number >= 0, got {w!r}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise DataError(f"{what}: weights sum to 0")
    return {k: float(v) / total for k, v in weights.items() if v > 0}


def tier_mixture(manifest: dict, tier: str = "high") -> dict[str, float]:
    """The prepared sources of one quality tier, weighted as in the manifest's mixture
    (for an annealing stage on the highest-quality data)."""
    names = [n for n, info in manifest["sources"].items() if info.get("tier") == tier]
    if not names:
        tiers = sorted({info.get("tier") for info in manifest["sources"].values()})
        raise DataError(f"no prepared source has tier {tier!r} (tiers present: {tiers})")
    mix = manifest.get("mixture", {})
    return normalize_weights({n: mix.get(n, 1.0) or 1.0 for n in names}, names, f"tier {tier!r}")


def check_tokenizer(manifest: dict, tokenizer: Any = None, vocab_size: int | None = None) -> None:
    """Fail clearly when data were tokenized by another tokenizer, or hold ids the model's
    embedding table (``vocab_size``) cannot look up."""
    info = manifest["tokenizer"]
    if tokenizer is not None:
        from evolm.data.shards import tokenizer_fingerprint

        h = tokenizer_fingerprint(tokenizer)
        if h != info["hash"]:
            raise DataError(f"tokenizer mismatch: the data were prepared with tokenizer {info['hash'][:12]} "
                            f"(vocab {info['vocab_size']}), this one is {h[:12]}; re-run `evolm data prepare`")
    if vocab_size is not None and info["max_token_id"] >= vocab_size:
        raise DataError(f"vocab size mismatch: the data hold token id {info['max_token_id']} "
                        f"(tokenizer vocab {info['vocab_size']}), the model's vocab_size is {vocab_size}")


class SourceTokens:
    """The concatenated token stream of one source and split, across its shards."""

    def __init__(self, data_dir: Path, name: str, split: str, info: dict, dtype: str):
        self.name = name
        self.shards = [TokenShard(data_dir / split / s["file"], dtype) for s in info["shards"]]
        sizes = [s.num_tokens for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_tokens = int(self.starts[-1])
        # global document start offsets (for document-masked packing)
        self.doc_starts = np.concatenate(
            [s.offsets[:-1] + self.starts[i] for i, s in enumerate(self.shards)] + [[self.num_tokens]]
        ).astype(np.int64)

    def read(self, start: int, length: int) -> np.ndarray:
        """``length`` tokens from ``start`` of the stream, as int64."""
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        k = int(np.searchsorted(self.starts, pos, side="right")) - 1
        while filled < length:
            shard = self.shards[k]
            lo = pos - int(self.starts[k])
            take = min(length - filled, shard.num_tokens - lo)
            out[filled: filled + take] = shard.tokens[lo: lo + take]
            filled += take
            pos += take
            k += 1
        return out

    def segments(self, start: int, length: int) -> np.ndarray:
        """Per-token document index within the window (0 for the first document)."""
        pos = np.arange(start, start + length)
        seg = np.searchsorted(self.doc_starts, pos, side="right") - 1
        return (seg - seg[0]).astype(np.int64)


def open_split(data_dir: str | os.PathLike, split: str = "train", manifest: dict | None = None) -> dict[str, SourceTokens]:
    """Every source's token stream for ``split`` (sources with no tokens there are left out)."""
    data_dir = Path(data_dir)
    manifest = manifest or load_manifest(data_dir)
    dtype = manifest["tokenizer"]["dtype"]
    out = {}
    for name, info in manifest["sources"].items():
        s = info["splits"].get(split)
        if s and s["tokens"] > 0:
            out[name] = SourceTokens(data_dir, name, split, s, dtype)
    return out


def _source_key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


class MixtureLoader:
    """Deterministic, resumable sampler of ``(x, y)`` training windows from a mixture.

    ``next_batch()`` returns int64 torch tensors ``x, y`` of shape ``(batch_size, seq_len)``
    (``y`` is ``x`` shifted by one), plus ``segments`` of the same shape when
    ``return_segments`` is set (per-token document index, for document-masked attention).
    ``batch_size`` is per rank; the global batch is ``batch_size * world_size``.
    """

    def __init__(self, data_dir: str | os.PathLike, seq_len: int, batch_size: int,
                 weights: dict[str, float] | None = None, split: str = "train", seed: int = 0,
                 rank: int = 0, world_size: int = 1, return_segments: bool = False):
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} out of range for world_size {world_size}")
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(self.data_dir)
        streams = open_split(self.data_dir, split, self.manifest)
        weights = weights if weights is not None else self.manifest.get("mixture") or {n: 1.0 for n in streams}
        self.weights = normalize_weights(dict(weights), list(self.manifest["sources"]), "mixture")
        for name in self.weights:
            if name not in streams:
                raise DataError(f"mixture: source {name!r} has no {split!r} tokens in {self.data_dir}")
            if (streams[name].num_tokens - 1) // seq_len < 1:
                raise DataError(f"mixture: source {name!r} has {streams[name].num_tokens} {split} tokens, "
                                f"fewer than one window of seq_len + 1 = {seq_len + 1}")
        self.names = sorted(self.weights)
        self.streams = {n: streams[n] for n in self.names}
        self.probs = np.array([self.weights[n] for n in self.names], dtype=np.float64)
        self.probs /= self.probs.sum()
        self.n_windows = {n: (self.streams[n].num_tokens - 1) // seq_len for n in self.names}
        self.seq_len, self.batch_size, self.split, self.seed = seq_len, batch_size, split, seed
        self.rank, self.world_size, self.return_segments = rank, world_size, return_segments
        self.step = 0
        self.cursors = {n: 0 for n in self.names}
        self._perm_cache: dict[str, tuple[int, np.ndarray]] = {}

    # -- sampling --------------------------------------------------------------------------

    def _window(self, name: str, cursor: int) -> int:
        n = self.n_windows[name]
        epoch, i = divmod(cursor, n)
        cached = self._perm_cache.get(name)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, _source_key(name), epoch])
            cached = (epoch, rng.permutation(n))
            self._perm_cache[name] = cached
        return int(cached[1][i])

    def plan(self) -> list[tuple[str, int]]:
        """``(source, window start)`` of every sequence of the next *global* batch; advances
        the cursors and the step."""
        gb = self.batch_size * self.world_size
        rng = np.random.default_rng([self.seed, self.step])
        picks = rng.choice(len(self.names), size=gb, p=self.probs)
        out = []
        for j in picks:
            name = self.names[int(j)]
            out.append((name, self._window(name, self.cursors[name]) * self.seq_len))
            self.cursors[name] += 1
        self.step += 1
        return out

    def next_batch(self):
        import torch

        plan = self.plan()[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]
        L = self.seq_len
        buf = np.stack([self.streams[name].read(start, L + 1) for name, start in plan])
        x, y = torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())
        if self.return_segments:
            seg = np.stack([self.streams[name].segments(start, L) for name, start in plan])
            return x, y, torch.from_numpy(seg)
        return x, y

    def __iter__(self) -> Iterator:
        while True:
            yield self.next_batch()

    # -- resume ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-exactly (JSON-serializable)."""
        return {"step": self.step, "cursors": dict(self.cursors), "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.batch_size * self.world_size, "weights": dict(self.weights),
                "split": self.split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "global_batch", "split"):
            if state.get(key) != mine[key]:
                raise DataError(f"loader state: {key} was {state.get(key)!r} when saved, is {mine[key]!r} now; "
                                "resume with the same data settings (a new stage needs a new loader)")
        if set(state["weights"]) != set(self.weights) or any(
                abs(state["weights"][k] - self.weights[k]) > 1e-12 for k in self.weights):
            raise DataError(f"loader state: mixture was {state['weights']} when saved, is {self.weights} now")
        self.step = int(state["step"])
        self.cursors = {n: int(state["cursors"].get(n, 0)) for n in self.names}


def iter_eval_batches(data_dir: str | os.PathLike, seq_len: int, batch_size: int, split: str = "val",
                      max_windows_per_source: int | None = None,
                      sources: list[str] | None = None) -> Iterator[tuple[str, Any, Any]]:
    """``(source, x, y)`` batches covering each source's held-out stream in order.

    Deterministic and independent of training state, so validation losses are comparable
    across steps and runs. A stream shorter than one window gives one shorter window.
    """
    import torch

    streams = open_split(data_dir, split)
    if not streams:
        raise DataError(f"no {split!r} tokens in {data_dir} (prepare with val_fraction > 0)")
    names = sources or sorted(streams)
    for name in names:
        if name not in streams:
            raise DataError(f"no {split!r} tokens for source {name!r} in {data_dir}")
        s = streams[name]
        L = min(seq_len, s.num_tokens - 1)
        if L < 1:
            continue
        n = (s.num_tokens - 1) // L
        if max_windows_per_source is not None:
            n = min(n, max_windows_per_source)
        for b in range(0, n, batch_size):
            buf = np.stack([s.read(i * L, L + 1) for i in range(b, min(n, b + batch_size))])
            yield name, torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())
