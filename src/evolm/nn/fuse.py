"""One layer for several linear layers that read the same input (q/k/v, gate/up), for decoding.

At batch 1 the projections of a step are matrix-vector products: three small ones cost three
kernel calls and three passes over the input; one stacked one is a single call. Used by
``Attention.fuse_qkv`` and ``MLP.fuse_gate_up`` (``Transformer.fuse_for_inference``).
"""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def fuse_linears(mods: list[nn.Module]) -> nn.Module | None:
    """A layer whose outputs are those of ``mods`` side by side, or None when they cannot be
    stacked (different kinds, or block layouts, or some with a bias and some without).

    Float ``nn.Linear`` layers stack their weights; :class:`evolm.quant.blocks.BlockLinear` layers (a
    file's quantized blocks) stack their codes, scales and minima, which keeps them exact.
    """
    from evolm.quant.blocks import BlockLinear, cat_blocks

    biases = [m.bias for m in mods]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return None
    bias = None if biases[0] is None else torch.cat(biases)
    if all(isinstance(m, BlockLinear) for m in mods):
        blocks = cat_blocks([m.blocks for m in mods])
        return None if blocks is None else BlockLinear(blocks, bias)
    if not all(type(m) is nn.Linear for m in mods):
        return None
    w = mods[0].weight
    fused = nn.Linear(w.shape[1], sum(m.out_features for m in mods), bias=bias is not None, device=w.device,
                      dtype=w.dtype)
    fused.weight.copy_(torch.cat([m.weight for m in mods]))
    if bias is not None:
        fused.bias.copy_(bias)
    return fused.requires_grad_(False)
