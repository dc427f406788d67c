"""The residual block and where its norms sit: the norm-placement lineage.

- ``post`` (original Transformer, GPT-1, BERT): ``x = norm(x + f(x))``. Needs careful warm-up;
  gradients near the output are large at initialisation (Xiong et al. 2020, arXiv:2002.04745).
- ``pre`` (GPT-2, Llama, Mistral, Qwen, DeepSeek): ``x = x + f(norm(x))``. Stable gradients,
  trains without delicate warm-up; needs a final norm before the head.
- ``sandwich`` (Gemma 2/3): ``x = x + norm_out(f(norm_in(x)))``: norms before and after each
  sub-layer bound the size of what enters the residual stream.
- ``olmo2`` (OLMo 2, arXiv:2501.00656): ``x = x + norm(f(x))``, a post-norm variant inside the
  residual branch, which OLMo 2 found more stable than pre-norm.
- ``parallel`` (GPT-J; PaLM, Chowdhery et al. 2022; Falcon-7B): ``x = x + attn(norm(x)) + mlp(norm(x))``:
  one shared norm, both sub-layers read the same input, so they can run concurrently.
- ``parallel2`` (Falcon-40B/180B, Almazrouei et al. 2023, transformers' ``new_decoder_architecture``):
  ``x = x + attn(norm_a(x)) + mlp(norm_m(x))``: still parallel, but each sub-layer has its own norm.

A block is two parts in that wiring: a *mixer*, which moves information between positions
(self-attention, multi-head latent attention; next cross-attention and state-space layers), and a
*channel* part, which works on each position alone (an MLP, or a mixture of experts). Both are
chosen from the registries below by config fields (``attention``; ``moe_layers`` /
``layer_is_moe``), so a new kind of mixer is one module and one registry entry; neither the block
nor ``Transformer.forward`` changes. Every mixer is called as ``mixer(x, rope, mask, is_causal,
cache)`` and returns a tensor of x's shape.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from evolm.nn.attention import Attention
from evolm.nn.mla import MultiHeadLatentAttention
from evolm.nn.mlp import MLP
from evolm.nn.moe import MoE
from evolm.nn.norm import make_norm


# config.attention -> the mixer class (each takes (config, layer_idx))
MIXERS: dict[str, type[nn.Module]] = {"mha": Attention, "mla": MultiHeadLatentAttention}


def make_mixer(config, layer_idx: int) -> nn.Module:
    """Layer ``layer_idx``'s mixer, as ``config.attention`` names it."""
    return MIXERS[config.attention](config, layer_idx)


def make_channel(config, layer_idx: int) -> nn.Module:
    """Layer ``layer_idx``'s channel part: a mixture of experts on MoE layers, else an MLP."""
    return MoE(config) if config.layer_is_moe(layer_idx) else MLP(config)


class Block(nn.Module):
    """A mixer and a channel part in residual wiring; the module names (``self_attn``, ``mlp``) are
    the ones Hugging Face checkpoints and PEFT target lists use."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        c = config
        self.placement = c.norm_placement
        self.self_attn = make_mixer(c, layer_idx)
        self.mlp = make_channel(c, layer_idx)
        p = self.placement
        if p in ("pre", "post", "sandwich", "parallel", "parallel2"):
            # ModernBERT's first layer reads its normed embeddings directly
            self.attn_norm = make_norm(c) if layer_idx or c.first_attn_norm else nn.Identity()
        if p in ("pre", "post", "sandwich", "parallel2"):
            self.mlp_norm = make_norm(c)
        if p in ("sandwich", "olmo2"):
            self.attn_out_norm = make_norm(c)
            self.mlp_out_norm = make_norm(c)
        self.resid_dropout = c.resid_dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.resid_dropout, self.training) if self.resid_dropout else x

    # the fused one-token CPU step (evolm.infer.block_step), given by inference preparation
    decode_step = None

    def forward(self, x: torch.Tensor, rope, mask, is_causal: bool, cache=None) -> torch.Tensor:
        if self.decode_step is not None and cache is not None and x.shape[1] == 1 and not torch.is_grad_enabled():
            y = self.decode_step(x, rope, mask, cache)
            if y is not None:
                return y
        attn = lambda h: self._drop(self.self_attn(h, rope, mask, is_causal, cache))  # noqa: E731
        mlp = lambda h: self._drop(self.mlp(h))  # noqa: E731
        p = self.placement
        if p == "pre":
            x = x + attn(self.attn_norm(x))
            return x + mlp(self.mlp_norm(x))
        if p == "post":
            x = self.attn_norm(x + attn(x))
            return self.mlp_norm(x + mlp(x))
        if p == "sandwich":
            x = x + self.attn_out_norm(attn(self.attn_norm(x)))
            return x + self.mlp_out_norm(mlp(self.mlp_norm(x)))
        if p == "olmo2":
            x = x + self.attn_out_norm(attn(x))
            return x + self.mlp_out_norm(mlp(x))
        if p == "parallel2":
            return x + attn(self.attn_norm(x)) + mlp(self.mlp_norm(x))
        h = self.attn_norm(x)  # parallel
        return x + attn(h) + mlp(h)
