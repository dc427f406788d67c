"""Calibration sets: a few hundred windows of real text that calibrated quantizers (GPTQ) look at.

A calibrated method fits each layer to the inputs it sees, so it needs text of the kind the model
reads, but only a little: GPTQ's paper uses 128 windows of 2048 tokens of C4, and we default to
128 x 512 tokens from the built-in corpora (``evolm data install``; ``python_docs`` -- English
technical prose with code, the closest to wikitext among them). Documents are read in an order
shuffled by ``seed``, tokenized, joined with the end-of-text token and cut into windows.

Every ``HELD_OUT_EVERY``-th document (index % 10 == 9) is never used for calibration: that is the
held-out split a quantized model's perplexity is measured on (:func:`held_out`), so the report
does not score text the quantizer was fitted to.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

HELD_OUT_EVERY = 10
DEFAULT_CORPUS = "python_docs.jsonl"


class CalibrationError(ValueError):
    """A calibration set that cannot serve: missing, or too small for what was asked."""


@dataclass(frozen=True)
class CalibrationConfig:
    """``sources``: text files, JSONL (``"text"`` field) or folders; empty: the built-in
    ``python_docs`` corpus. ``samples`` windows of ``seq_len`` tokens, documents shuffled by ``seed``."""

    sources: tuple[str, ...] = field(default_factory=tuple)
    samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.samples < 1 or self.seq_len < 2:
            raise CalibrationError(f"calibration: need samples >= 1 and seq_len >= 2, got {self.samples} x "
                                   f"{self.seq_len}")


def default_sources() -> tuple[str, ...]:
    from evolm.data.corpora import default_data_dir

    path = default_data_dir() / DEFAULT_CORPUS
    if not path.is_file():
        raise CalibrationError(f"calibration: {path} not found; install the built-in corpora (`evolm data "
                               f"install`) or name a text with --calib-data")
    return (str(path),)


def documents(path: str | Path) -> list[str]:
    """The documents of a text file, JSONL file or folder (as ``evolm eval --ppl`` reads them)."""
    from evolm.eval.perplexity import load_corpus

    try:
        texts, token_docs, _ = load_corpus(path)
    except FileNotFoundError as e:
        raise CalibrationError(f"calibration: {e}") from None
    if texts is None:
        raise CalibrationError(f"calibration: {path} holds token shards; give text (a file, JSONL or folder)")
    return texts


def held_out(texts: list[str]) -> list[str]:
    """The documents calibration never reads (index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1)."""
    return texts[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]


def calibration_ids(tokenizer, config: CalibrationConfig = CalibrationConfig()) -> torch.Tensor:
    """(samples, seq_len) token ids from the calibration documents (held-out ones excluded).
    Raises :class:`CalibrationError` naming the numbers when the sources hold too few tokens."""
    sources = config.sources or default_sources()
    docs = [t for s in sources for i, t in enumerate(documents(s)) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    random.Random(config.seed).shuffle(docs)
    need = config.samples * config.seq_len
    eos = getattr(tokenizer, "eos_id", None)
    ids: list[int] = []
    for text in docs:
        if len(ids) >= need:
            break
        ids += tokenizer.encode(text) + ([eos] if eos is not None else [])
    if len(ids) < need:
        raise CalibrationError(f"calibration set too small: {config.samples} samples x {config.seq_len} tokens = "
                               f"{need} tokens needed, {', '.join(map(str, sources))} hold {len(ids)} (held-out "
                               f"documents excluded); lower --calib-samples / --calib-len or add --calib-data")
    return torch.tensor(ids[:need], dtype=torch.long).view(config.samples, config.seq_len)


__all__ = ["CalibrationConfig", "CalibrationError", "calibration_ids", "held_out", "documents", "HELD_OUT_EVERY"]
