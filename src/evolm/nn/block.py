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
(self-attention, multi-head latent attention, a selective state space: Mamba, Mamba-2; Hyena's long convolutions), and a
*channel* part, which works on each position alone (an MLP, or a mixture of experts). Both are
chosen from the registries below by config fields (``attention``, or per layer ``mixer_pattern``
for a hybrid such as Jamba: ``layer_mixer``; ``moe_layer_step`` / ``layer_is_moe``), so a new kind of mixer is one module and one registry entry; neither the block
nor ``Transformer.forward`` changes. Every mixer is called as ``mixer(x, rope, mask, is_causal,
cache)`` and returns a tensor of x's shape (a recurrent mixer's ``mask`` is the validity of the new
tokens, see ``nn/masks.py``). A Mamba block has no channel part (``mlp="none"``): ``x = x + mixer(norm(x))``.

An encoder-decoder's decoder blocks (``encoder_layers > 0``) hold a third part between the two,
cross-attention to the encoder output (``nn/cross_attention.py``), placed like the others: ``pre``
(T5: ``x = x + cross(norm(x))``) or ``post`` (BART: ``x = norm(x + cross(x))``).

Gated residual branches (Flamingo, Alayrac et al. 2022, arXiv:2204.14198; Llama 3.2 Vision):
``x = x + tanh(a) * f(norm(x))`` with a learned scalar ``a`` per branch (``gate_init``). A vision
model's cross-attention layers (``config.vision.cross_attention_layers``) are such blocks whose
mixer is cross-attention to the image (``cross_attn``) instead of self-attention; with gates at 0
the pretrained text model is unchanged at the start of training, and without an image the layer
is skipped. The tiled image encoder's global layers are gated self-attention blocks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from evolm.nn.attention import Attention
from evolm.nn.cross_attention import CrossAttention
from evolm.nn.hyena import Hyena
from evolm.nn.mamba import Mamba
from evolm.nn.mamba2 import Mamba2
from evolm.nn.mla import MultiHeadLatentAttention
from evolm.nn.mlp import MLP
from evolm.nn.moe import MoE
from evolm.nn.norm import make_norm


# config.attention -> the mixer class (each takes (config, layer_idx))
MIXERS: dict[str, type[nn.Module]] = {"mha": Attention, "mla": MultiHeadLatentAttention, "mamba": Mamba,
                                      "hyena": Hyena, "mamba2": Mamba2}


def make_mixer(config, layer_idx: int) -> nn.Module:
    """Layer ``layer_idx``'s mixer, as ``config.layer_mixer`` names it."""
    return MIXERS[config.layer_mixer(layer_idx)](config, layer_idx)


def make_channel(config, layer_idx: int) -> nn.Module | None:
    """Layer ``layer_idx``'s channel part: a mixture of experts on MoE layers, else an MLP; None
    for a mixer-only block (``mlp="none"``)."""
    if config.layer_is_moe(layer_idx):
        return MoE(config)
    return None if config.mlp == "none" else MLP(config)


class Block(nn.Module):
    """A mixer and a channel part in residual wiring; the module names (``self_attn``, ``mlp``) are
    the ones Hugging Face checkpoints and PEFT target lists use."""

    def __init__(self, config, layer_idx: int, gate_init: float | None = None):
        """``gate_init``: the initial value of tanh-gates on both residual branches (None: no gates;
        a vision model's cross-attention layers always have them, at 0)."""
        super().__init__()
        c = config
        self.placement = c.norm_placement
        self.image_layer = c.layer_is_cross(layer_idx)  # cross-attends the image (Mllama), no self-attention
        self.self_attn = None if self.image_layer else make_mixer(c, layer_idx)
        self.mlp = make_channel(c, layer_idx)
        p = self.placement
        if p in ("pre", "post", "sandwich", "parallel", "parallel2"):
            # ModernBERT's first layer reads its normed embeddings directly
            self.attn_norm = make_norm(c) if layer_idx or c.first_attn_norm else nn.Identity()
        if self.mlp is not None and p in ("pre", "post", "sandwich", "parallel2"):
            self.mlp_norm = make_norm(c)
        if p in ("sandwich", "olmo2"):
            self.attn_out_norm = make_norm(c)
            if self.mlp is not None:
                self.mlp_out_norm = make_norm(c)
        self.resid_dropout = c.resid_dropout
        self.cross_attn = None
        if c.encoder_layers:
            if p not in ("pre", "post"):
                raise ValueError(f"cross-attention (encoder_layers > 0) needs norm_placement 'pre' or 'post', "
                                 f"not {p!r}")
            self.cross_attn = CrossAttention(c, layer_idx)
            self.cross_norm = make_norm(c)
        if self.image_layer:
            self.cross_attn = CrossAttention(c, layer_idx, qk_norm="head")
            gate_init = 0.0 if gate_init is None else gate_init
        if gate_init is not None:
            if p != "pre":
                raise ValueError(f"gated residual branches need norm_placement 'pre', not {p!r}")
            self.attn_gate = nn.Parameter(torch.full((1,), float(gate_init)))
            self.mlp_gate = nn.Parameter(torch.full((1,), float(gate_init)))
        self.gated = gate_init is not None

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.resid_dropout, self.training) if self.resid_dropout else x

    # the fused CPU step over new tokens into a KV cache (evolm.infer.block_step), given by inference preparation
    fused_step = None

    def forward(self, x: torch.Tensor, rope, mask, is_causal: bool, cache=None, cross=None) -> torch.Tensor:
        """``cross``: the ``CrossCache`` of the encoder output (decoder blocks of an encoder-decoder),
        or of the image (a vision model's cross-attention layers)."""
        if self.image_layer:
            return self._forward_image(x, cross)
        if self.gated:
            x = x + self.attn_gate.tanh() * self._drop(self.self_attn(self.attn_norm(x), rope, mask, is_causal, cache))
            return x + self.mlp_gate.tanh() * self._drop(self.mlp(self.mlp_norm(x)))
        if self.cross_attn is not None:
            return self._forward_cross(x, rope, mask, is_causal, cache, cross)
        if self.fused_step is not None and cache is not None and not torch.is_grad_enabled():
            y = self.fused_step(x, rope, mask, is_causal, cache)
            if y is not None:
                return y
        attn = lambda h: self._drop(self.self_attn(h, rope, mask, is_causal, cache))  # noqa: E731
        mlp = lambda h: self._drop(self.mlp(h))  # noqa: E731
        p = self.placement
        if self.mlp is None:
            return self._mixer_only(x, attn)
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

    def _forward_image(self, x: torch.Tensor, cross) -> torch.Tensor:
        """Gated cross-attention to the image, then a gated MLP (Mllama's cross-attention layer).
        Without an image the layer is skipped, as in transformers; text rows that may see no image
        token (``cross.rows``, before the first image) get no MLP update."""
        if cross is None:
            return x
        x = x + self.attn_gate.tanh() * self._drop(self.cross_attn(self.attn_norm(x), cross))
        h = self._drop(self.mlp(self.mlp_norm(x)))
        if cross.rows is not None:
            h = h * cross.rows.to(h.dtype)
        return x + self.mlp_gate.tanh() * h

    def _mixer_only(self, x: torch.Tensor, attn) -> torch.Tensor:
        """A block without a channel part (``mlp="none"``: Mamba's ``x + mixer(norm(x))``), in the
        same norm placement as the full block's first half."""
        p = self.placement
        if p == "post":
            return self.attn_norm(x + attn(x))
        if p == "sandwich":
            return x + self.attn_out_norm(attn(self.attn_norm(x)))
        if p == "olmo2":
            return x + self.attn_out_norm(attn(x))
        return x + attn(self.attn_norm(x))  # pre, parallel, parallel2

    def _forward_cross(self, x, rope, mask, is_causal, cache, cross) -> torch.Tensor:
        """Self-attention, cross-attention to the encoder, MLP: T5's pre-norm or BART's post-norm."""
        if cross is None:
            raise ValueError("a decoder block with cross-attention needs the encoder output (cross=CrossCache)")
        attn = lambda h: self._drop(self.self_attn(h, rope, mask, is_causal, cache))  # noqa: E731
        xattn = lambda h: self._drop(self.cross_attn(h, cross))  # noqa: E731
        mlp = lambda h: self._drop(self.mlp(h))  # noqa: E731
        if self.placement == "pre":
            x = x + attn(self.attn_norm(x))
            x = x + xattn(self.cross_norm(x))
            return x + mlp(self.mlp_norm(x))
        x = self.attn_norm(x + attn(x))
        x = self.cross_norm(x + xattn(x))
        return self.mlp_norm(x + mlp(x))
