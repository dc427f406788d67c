"""Rotary position embeddings (RoPE) and their context-extension scalings.

RoPE (Su et al. 2021, "RoFormer", arXiv:2104.09864) rotates pairs of query/key dimensions by an
angle proportional to the token position, so attention scores depend only on relative
distance. It replaced GPT-2's learned absolute positions in Llama, Mistral, Gemma, Qwen,
OLMo and DeepSeek.

Variants, each switched by one config field:
- ``rotary_pct`` < 1: partial rotary (GPT-NeoX, Phi) rotates only the first dims of each head.
- ``rope_interleave``: rotate adjacent pairs (x0,x1),(x2,x3)... (GPT-J, DeepSeek's MLA weights)
  instead of the two halves (GPT-NeoX / Llama convention).
- ``rope_scaling`` to stretch a model's context:
  * ``linear`` position interpolation (Chen et al. 2023, arXiv:2306.15595): divide all
    frequencies by ``factor``.
  * ``llama3`` (Llama 3.1): keep high frequencies, divide low ones by ``factor``, and blend
    smoothly in between (Meta, "The Llama 3 Herd of Models", arXiv:2407.21783).
  * ``yarn`` (Peng et al. 2023, arXiv:2309.00071): NTK-by-parts interpolation plus an
    attention temperature folded into cos/sin.
- ``rope_local_theta``: Gemma 3 uses a base of 10k on sliding-window layers and 1M on global ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for ``dim`` rotary dims, and the factor to scale cos/sin by."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling is None:
        return inv_freq, 1.0
    kind = scaling["type"]
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_seq_len"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        old_len = float(scaling["original_max_seq_len"])
        beta_fast = float(scaling.get("beta_fast") or 32)
        beta_slow = float(scaling.get("beta_slow") or 1)
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attn_factor = scaling.get("attention_factor")
        if attn_factor is None:
            if mscale and mscale_all_dim:
                attn_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attn_factor = _yarn_mscale(factor)

        def correction_dim(n_rot: float) -> float:
            return dim * math.log(old_len / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1 where frequencies are kept (high frequency), 0 where interpolated
        pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
        return inv, float(attn_factor)
    raise ValueError(f"unknown rope scaling type {kind!r}")


def yarn_softmax_scale(scaling: dict | None) -> float:
    """DeepSeek's extra query scaling under YaRN: mscale(factor, mscale_all_dim) squared."""
    if scaling is None or scaling.get("type") != "yarn" or not scaling.get("mscale_all_dim"):
        return 1.0
    m = _yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
    return m * m


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) tables for given positions; applied by ``apply_rope``."""

    def __init__(self, dim: int, theta: float, scaling: dict | None = None, interleave: bool = False):
        super().__init__()
        inv_freq, self.attention_factor = rope_frequencies(dim, theta, scaling)
        self.dim = dim
        self.interleave = interleave
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would round the frequencies to 8 bits and scramble positions in
        # the thousands; like transformers, keep them float32 and let only the device follow
        inv = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != inv.dtype and not inv.is_meta:
            self.inv_freq = inv.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (B, T) integer tensor -> cos, sin of shape (B, 1, T, dim // 2)."""
        freqs = positions[..., None].float() * self.inv_freq.float().to(positions.device)
        cos = (freqs.cos() * self.attention_factor).to(dtype)
        sin = (freqs.sin() * self.attention_factor).to(dtype)
        return cos[:, None], sin[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of x (B, H, T, D); the rest pass through."""
    rot = 2 * cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    if interleave:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        # the rotated pairs come out de-interleaved (evens then odds); applied to both q and k the
        # attention scores are the same as rotating in place, and it saves a copy (as HF does)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        half = rot // 2
        x1, x2 = xr[..., :half], xr[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out
