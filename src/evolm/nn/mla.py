"""Multi-head latent attention (MLA), DeepSeek-V2/V3.

DeepSeek-V2 (arXiv:2405.04434) compresses keys and values into one low-rank latent per token
(``kv_lora_rank`` wide) plus one small shared rotary key (``qk_rope_head_dim``): the KV cache
stores only those, ~ (512 + 64) numbers per token per layer instead of 2 * heads * head_dim.
Per-head keys and values are re-expanded from the latent by ``kv_b_proj``. Because RoPE does not
commute with that up-projection, position goes in a separate, "decoupled" rotary part of each
query/key head. Queries may also pass through a low-rank bottleneck (``q_lora_rank``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from evolm.nn.attention import attend
from evolm.nn.norm import RMSNorm
from evolm.nn.rope import apply_rope, yarn_softmax_scale


class MultiHeadLatentAttention(nn.Module):
    decode_kernel = False  # decode-time kernel choices, as Attention's (nn/attention.py)
    attn_loops = True
    ring = None  # context parallelism (evolm/parallel/context.py), as Attention's

    def __init__(self, config, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads = c.n_heads
        self.nope, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_rank = c.kv_lora_rank
        qk_dim = self.nope + self.rope_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.d_model, c.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.d_model, c.q_lora_rank, bias=c.qkv_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, c.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.d_model, c.kv_lora_rank + self.rope_dim, bias=c.qkv_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, c.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(c.n_heads * self.v_dim, c.d_model, bias=c.o_bias)
        self.scale = (c.query_pre_attn_scalar or qk_dim) ** -0.5 * yarn_softmax_scale(c.rope_scaling)
        self.softcap = c.attn_softcap
        self.window = c.layer_window(layer_idx)
        self.interleave = c.rope_interleave
        self.dropout = c.attn_dropout

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor | None, is_causal: bool,
                cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.nope + self.rope_dim).transpose(1, 2)
        q_nope, q_rot = q.split([self.nope, self.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).view(B, 1, T, self.kv_rank)
        k_rot = k_rot.view(B, 1, T, self.rope_dim)
        if rope is not None:
            cos, sin = rope
            q_rot, k_rot = apply_rope(q_rot, cos, sin, self.interleave), apply_rope(k_rot, cos, sin, self.interleave)
        if cache is not None:  # the cache holds the compressed latent and the shared rotary key
            latent, k_rot = cache.update(self.layer_idx, latent, k_rot)
        S = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0]).view(B, S, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rot.expand(B, self.n_heads, S, self.rope_dim)), dim=-1)
        q = torch.cat((q_nope, q_rot), dim=-1)
        if self.ring is not None:  # context parallelism: see Attention.ring
            y = self.ring(self, q, k, v)
        else:
            y = attend(q, k, v, mask, is_causal, self.scale, self.softcap, self.dropout if self.training else 0.0,
                       self.decode_kernel, self.attn_loops)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))
