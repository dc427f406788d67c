"""Supervised fine-tuning of an encoder-decoder (T5, BART, Switch) on the SFT path.

A decoder-only model reads prompt and answer as one sequence and masks the prompt out of the loss
(:mod:`evolm.post.sft`). An encoder-decoder splits them instead, as T5 (Raffel et al. 2020,
arXiv:1910.10683 sec. 2.4, "text-to-text") and BART (Lewis et al. 2020, arXiv:1910.13461 sec. 3)
fine-tune: the **source** (everything before the last assistant turn, as plain text, with the
tokenizer's own special tokens, e.g. T5's trailing ``</s>``) goes to the encoder; the **target**
(the last assistant turn + EOS) is what the decoder must produce, every token of it trained. The
decoder reads the target shifted right by one, starting from ``decoder_start_token_id`` (T5: pad;
BART: ``</s>``), which is what transformers' ``_shift_right`` / ``shift_tokens_right`` build from
``labels``; so a batch's loss is transformers' ``model(input_ids, attention_mask, labels=...)``
(tested). Both sides are right-padded: the source's pads are masked out of every attention, the
target's pads have label -100 and sit after every real token, so causal attention never sees them.

Only the batching differs: :class:`Seq2SeqSftTask` is :class:`~evolm.post.sft.SftTask` with its
own examples and collate; the loop, LoRA (the default ``q_proj,v_proj`` targets reach self- and
cross-attention in both stacks, as PEFT's ``["q", "v"]`` on transformers' T5), saving and
evaluation are SFT's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evolm.post.data import IGNORE, DataError, Example, RenderedList
from evolm.post.sft import Batch, SftTask


@dataclass
class Pair:
    """One tokenized example: the encoder's source ids and the decoder's target ids (ending in EOS)."""

    source: list[int]
    target: list[int]
    text: str = ""

    @property
    def n_trained(self) -> int:
        return len(self.target)


def source_and_target(messages: list[dict]) -> tuple[str, str]:
    """(source text, target text): the turns before the last assistant turn, joined by blank lines, and that turn."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return "\n\n".join(m["content"] for m in messages[:last]), messages[last]["content"]


def encode_pairs(tokenizer, examples: list[Example], max_len: int) -> RenderedList:
    """Tokenize every example; a source or target longer than ``max_len`` is cut (the target keeps its EOS)."""
    eos = tokenizer.eos_id
    if eos is None:
        raise DataError(f"the tokenizer ({getattr(tokenizer, 'name', 'tokenizer')}) has no EOS token: a seq2seq "
                        "target must end in one, or generation never learns to stop")
    out = RenderedList()
    for ex in examples:
        src, tgt = source_and_target(ex.messages)
        if not src.strip():
            raise DataError(f"{ex.where}: no turn before the assistant's, so the encoder would read nothing")
        s = tokenizer.encode(src, add_special_tokens=True)
        t = tokenizer.encode(tgt, add_special_tokens=False) + [eos]
        if len(s) > max_len or len(t) > max_len:
            s, t = s[:max_len], t[:max_len - 1] + [eos]
            out.truncated += 1
        out.append(Pair(s, t, src))
    return out


def shift_right(targets: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs from targets: ``start_id`` then ``targets[:, :-1]``, ignored labels read as ``pad_id``
    (the rule of transformers' T5 ``_shift_right`` and BART's ``shift_tokens_right``)."""
    out = torch.full_like(targets, start_id)
    out[:, 1:] = targets[:, :-1]
    return out.masked_fill(out == IGNORE, pad_id)


def collate_pairs(pairs: list[Pair], pad_id: int, start_id: int) -> Batch:
    """Right-padded sources (with their mask), targets (-100 after the end) and shifted decoder inputs."""
    B, S, T = len(pairs), max(len(p.source) for p in pairs), max(len(p.target) for p in pairs)
    x = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    y = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, p in enumerate(pairs):
        x[b, :len(p.source)] = torch.tensor(p.source)
        mask[b, :len(p.source)] = 1
        y[b, :len(p.target)] = torch.tensor(p.target)
    n = sum(len(p.source) + len(p.target) for p in pairs)
    return Batch(x, y, n_tokens=n, attention_mask=mask, decoder_input_ids=shift_right(y, start_id, pad_id))


class Seq2SeqSftTask(SftTask):
    """SFT's task over (source, target) pairs: the loss is the decoder's mean cross-entropy over the targets."""

    def __init__(self, train: list[Pair], val: list[Pair], *, start_id: int, **kw):
        if kw.get("packing"):
            raise DataError("--packing: an encoder-decoder reads one source per row (pairs are not packed)")
        self.start_id = start_id
        super().__init__(train, val, **kw)

    @staticmethod
    def length(example: Pair) -> int:
        return len(example.source) + len(example.target)

    def collate(self, rows: list[list[Pair]], packed: bool) -> Batch:
        return collate_pairs([p for row in rows for p in row], self.pad_id, self.start_id)

    def sample_prompt(self, msgs: list[dict]) -> tuple[str, list[int]]:
        """A held-out sample's source: the encoder reads it, the decoder writes the answer."""
        src = source_and_target(msgs + [{"role": "assistant", "content": ""}])[0]
        return src, self.tokenizer.encode(src, add_special_tokens=True)


def is_seq2seq(model) -> bool:
    return getattr(model.config, "encoder_layers", 0) > 0
