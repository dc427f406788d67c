"""Normalization layers: LayerNorm and RMSNorm (with Gemma's (1 + w) variant).

- LayerNorm (Ba et al. 2016, arXiv:1607.06450) centres and scales each vector; GPT-2 keeps an
  additive bias, OLMo-1 drops it.
- RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) skips the centring: cheaper and, in
  practice, as good. Llama, Mistral, Qwen, OLMo 2, DeepSeek use it.
- Gemma stores the scale as an offset from one, ``x * (1 + w)`` with ``w`` initialised at 0,
  which keeps weight decay from pulling the scale towards zero.

The statistics are computed in float32 whatever the input dtype, as the references do, so bf16
models match them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma scales in float32, then casts
            return (xf * (1.0 + self.weight.float())).to(dtype)
        return self.weight * xf.to(dtype)  # Llama casts, then scales

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, unit_offset={self.unit_offset}"


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def make_norm(config, dim: int | None = None) -> nn.Module:
    """The norm a config asks for, over ``dim`` features (default: d_model)."""
    dim = config.d_model if dim is None else dim
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps, config.norm_unit_offset)
    return LayerNorm(dim, config.norm_eps, config.norm_bias)
