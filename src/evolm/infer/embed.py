"""Sentence embeddings from an encoder: pooled, normalized last hidden states (``evolm embed``).

Sentence-BERT (Reimers & Gurevych 2019, arXiv:1908.10084) turns a BERT into a sentence encoder by
averaging its last layer over the real tokens (padding excluded) and fine-tuning that vector with
a contrastive objective; all-MiniLM-L6-v2 is such a model, whose folder says so in
sentence-transformers' files: ``1_Pooling/config.json`` (``pooling_mode_mean_tokens``),
``modules.json`` (a ``Normalize`` module: unit length, so a dot product is the cosine) and
``sentence_bert_config.json`` (``max_seq_length``: texts are cut there). :func:`embedding_options`
reads them; a folder without them gets mean pooling, unit length and the model's position count.

Texts are encoded with the model's tokenizer (``[CLS] text [SEP]`` for BERT), sorted by length so
each batch pads little, run in batches with the padding masked out of attention and of the mean,
and returned in input order. A text longer than ``max_length`` keeps its first tokens and its
closing special token, as transformers' ``truncation=True`` keeps them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from evolm.nn.heads import pool

POOLINGS = ("mean", "cls", "max")


@dataclass(frozen=True)
class EmbeddingOptions:
    """How token states become one vector: ``pooling`` (mean | cls | max over real tokens),
    ``normalize`` (unit L2 length) and ``max_length`` (tokens per text, special tokens included)."""

    pooling: str = "mean"
    normalize: bool = True
    max_length: int = 512

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {self.max_length}")


def embedding_options(model, folder: str | os.PathLike | None = None) -> EmbeddingOptions:
    """The options a model folder declares (sentence-transformers' files), else mean + unit length,
    at most the model's positions."""
    limit = model.config.max_seq_len
    d = Path(folder) if folder is not None and Path(folder).is_dir() else None
    if d is None:
        return EmbeddingOptions(max_length=limit)
    pooling, normalize = "mean", True
    pool_file = d / "1_Pooling" / "config.json"
    if pool_file.is_file():
        cfg = _read(pool_file)
        modes = [m for m, key in (("mean", "pooling_mode_mean_tokens"), ("cls", "pooling_mode_cls_token"),
                                  ("max", "pooling_mode_max_tokens")) if cfg.get(key)]
        if len(modes) != 1:
            raise ValueError(f"{pool_file}: exactly one of mean / cls / max pooling is supported, found {modes}")
        pooling = modes[0]
    if (d / "modules.json").is_file():
        modules = _read(d / "modules.json", list)
        normalize = any(isinstance(m, dict) and str(m.get("type", "")).endswith("Normalize") for m in modules)
    if (d / "sentence_bert_config.json").is_file():
        cut = _read(d / "sentence_bert_config.json").get("max_seq_length")
        if isinstance(cut, int) and not isinstance(cut, bool) and cut >= 2:
            limit = min(limit, cut)
    return EmbeddingOptions(pooling, normalize, limit)


def _read(path: Path, expect: type = dict):
    from evolm.inputs import read_json

    return read_json(path, ValueError, expect)


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids with the model's special tokens, cut to ``max_length`` keeping the closing one."""
    out = []
    for ids in tokenizer.encode_batch(list(texts)):
        if len(ids) > max_length:
            ids = ids[:max_length - 1] + ids[-1:] if tokenizer.add_eos else ids[:max_length]
        out.append(ids)
    return out


@torch.no_grad()
def embed_texts(model, tokenizer, texts: Sequence[str], options: EmbeddingOptions | None = None,
                batch_size: int = 32) -> torch.Tensor:
    """(N, d) float32 embeddings of ``texts``, in their order."""
    options = options or EmbeddingOptions(max_length=model.config.max_seq_len)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not texts:
        return torch.zeros(0, model.config.d_model)
    ids = encode_texts(tokenizer, texts, options.max_length)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = next(model.parameters()).device
    out = torch.empty(len(ids), model.config.d_model)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(ids[i]) for i in rows)
        batch = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            batch[r, :len(ids[i])] = torch.tensor(ids[i])
            mask[r, :len(ids[i])] = 1
        batch, mask = batch.to(device), mask.to(device)
        states = model(batch, attention_mask=mask, return_hidden=True)
        vec = pool(states.float(), mask, options.pooling)
        out[rows] = (F.normalize(vec, dim=-1) if options.normalize else vec).cpu()
    return out


def read_texts(path: str | os.PathLike) -> list[str]:
    """One text per line of a UTF-8 file (a trailing newline ends the last one); an empty line is an
    error naming it, since the output has one line per input line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such input file")
    lines = p.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{p}:{n}: empty line; write one text per line")
    if not lines:
        raise ValueError(f"{p}: no texts")
    return [line.rstrip("\r") for line in lines]


def write_embeddings(vectors: torch.Tensor, path: str | os.PathLike) -> Path:
    """``.npy``: one float32 (N, d) array; anything else: JSON Lines, line i the embedding of input
    line i as a JSON array of floats. Written atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    if p.suffix == ".npy":
        import numpy as np

        with open(tmp, "wb") as f:
            np.save(f, vectors.numpy().astype("float32"))
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            for v in vectors.tolist():
                f.write(json.dumps([float(f"{x:.7g}") for x in v]) + "\n")
    os.replace(tmp, p)
    return p


__all__ = ["EmbeddingOptions", "embedding_options", "pool", "encode_texts", "embed_texts", "read_texts",
           "write_embeddings", "POOLINGS"]
