"""Magnitude and Wanda masks: which weights of a layer to zero, no weight update.

- **Magnitude** (Han et al. 2015, "Learning both Weights and Connections"): the smallest ``|W_ij|``
  of the whole layer. Wanda's paper (Table 2) shows it collapsing on LLMs at 50%: a few input
  features of a transformer carry activations 100x the others, and a small weight on such a
  feature matters more than a large one on a quiet feature.
- **Wanda** (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models",
  arXiv:2306.11695): score ``S_ij = |W_ij| * ||X_j||_2``, the weight times the l2 norm of its input
  feature over the calibration tokens (Eq. 1), compared *per output row* (Sec. 3: each output is a
  sum over its own inputs, so rows are pruned to equal sparsity), or in n:m groups of a row. No
  weight is updated, so it needs no Hessian inverse: only the diagonal ``sum_t x_tj^2``, which the
  Hessian sum GPTQ collects already holds.
"""

from __future__ import annotations

import torch

from evolm.prune.masks import Sparsity, group_mask, row_mask


def magnitude_mask(weight: torch.Tensor, target: Sparsity) -> torch.Tensor:
    """True where magnitude pruning zeroes ``weight`` (N, K): the smallest |W| of the layer (or of each n:m group)."""
    return group_mask(weight.detach().abs(), target)


def input_norms(hessian_sum: torch.Tensor) -> torch.Tensor:
    """``||X_j||_2`` for each input j from ``sum_t x_t x_t^T`` (:class:`evolm.quant.gptq.HessianSum`'s ``sum``)."""
    return hessian_sum.diagonal().clamp_min(0).sqrt()


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Eq. 1 of the paper: ``|W_ij| * ||X_j||_2``."""
    return weight.detach().abs() * norms.to(weight.dtype)[None, :]


def wanda_mask(weight: torch.Tensor, norms: torch.Tensor, target: Sparsity) -> torch.Tensor:
    """True where Wanda zeroes ``weight`` (N, K) given its inputs' norms (K,): lowest scores per row."""
    return row_mask(wanda_scores(weight, norms), target)


__all__ = ["magnitude_mask", "input_norms", "wanda_scores", "wanda_mask"]
