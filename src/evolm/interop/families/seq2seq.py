"""Weight names of the encoder-decoder families (T5, Switch, BART), as one table both ways.

A decoder family renames tensors by pattern (``decoder.py``); an encoder-decoder has two stacks
whose layers sit under different names and a third sub-layer in the decoder's, so each family
lists instead, for a given config, every (transformers name, our name) pair. Reading a checkpoint
looks names up in that table, writing one walks it backwards; a stacked expert tensor of ours
appears as ``(name, expert)``, one row per expert. Names in the file that are copies of the shared
embedding (``encoder.embed_tokens`` ...) are checked and dropped: evolm holds the table once.
"""

from __future__ import annotations

from typing import Callable

import torch

from evolm.config import ModelConfig
from evolm.interop.empty import WeightsError

Ours = str | tuple[str, int]  # a tensor of ours, or one expert's row of a stacked one
NameTable = Callable[[ModelConfig], list[tuple[str, Ours]]]


def stacks(c: ModelConfig):
    """(transformers' stack name, our prefix, the stack's config) for the encoder, then the decoder."""
    return (("encoder", "encoder.", c.encoder_config()), ("decoder", "", c))


def weights_from_hf(names: NameTable, copies: tuple[str, ...], sd: dict[str, torch.Tensor],
                    config: ModelConfig) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors -> ours; raises WeightsError naming what has no place."""
    table = dict(names(config))
    prefix = "model." if any(k.startswith("model.") for k in sd) and not any(k in table for k in sd) else ""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    unknown, copied = [], []
    for k, t in sd.items():
        name = k[len(prefix):] if k.startswith(prefix) else k
        ours = table.get(name, table.get(k))
        if ours is None:
            if name in copies or k in copies:
                copied.append((k, t))  # tied copies of the shared embedding (checked below)
            else:
                unknown.append(k)
        elif isinstance(ours, tuple):
            experts.setdefault(ours[0], {})[ours[1]] = t
        else:
            out[ours] = t
    if unknown:
        raise WeightsError(f"{len(unknown)} weights of the checkpoint have no place in evolm's model, "
                           f"e.g. {unknown[:5]}")
    shared = out.get("embed_tokens.weight")
    for k, t in copied:
        if shared is None or t.shape != shared.shape or not torch.equal(t, shared):
            raise WeightsError(f"{k} differs from the shared token embedding, which evolm ties it to "
                               f"(config.json's tie_word_embeddings)")
    for name, rows in experts.items():
        out[name] = torch.stack([rows[e] for e in sorted(rows)])
    return out


def weights_to_hf(names: NameTable, sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Ours -> the checkpoint's names (experts unstacked, one tensor each)."""
    out = {}
    for hf_name, ours in names(config):
        t = sd[ours[0]][ours[1]] if isinstance(ours, tuple) else sd[ours]
        out[hf_name] = t.contiguous()
    return out
