"""SparseGPT: zero weights and move their loss onto the weights that stay, one column at a time.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", arXiv:2301.00774. Zeroing weight ``w_c`` of a row changes the layer's output on inputs
``X`` by an amount the Optimal Brain Surgeon update best repairs by moving the row's *later*
weights: with ``H = 2 X X^T / n`` and the inverse Hessian of the columns not yet processed,
``delta = -(w_c / [H^-1]_cc) * H^-1_{c,:}``, at a loss ``w_c^2 / [H^-1]_cc``. Its Algorithm 1, as here:

- dampen ``H += damp * mean(diag H) * I`` and take ``U = Cholesky(H^-1)^T`` (upper): row c of U
  from the diagonal on is the OBS update of column c once columns < c are done
  (``U_cc^2 = [H_c^-1]_cc``, ``U_ck / U_cc = [H_c^-1]_ck / [H_c^-1]_cc``), so the inverse is never
  downdated by hand -- the same factor GPTQ uses (:func:`evolm.quant.gptq.inverse_hessian_factor`);
- *adaptive mask selection*: for each block of ``block_size`` columns, when the block comes up
  (its weights already updated by the blocks before), zero the ``fraction`` of its weights with
  the smallest OBS loss ``w^2 / U_cc^2`` over the whole block (all rows); for n:m, choose each
  group of m columns per row when its first column comes up, from the weights as updated so far;
- for each column c: ``e = (w_c - pruned(w_c)) / U_cc`` and ``w_k -= e * U_ck`` for k > c in the
  block; the columns after the block get all of the block's updates at once (lazy batches: one
  matmul, the same arithmetic in another order).

Inputs never seen in calibration (``H_cc = 0``) get ``H_cc = 1`` as in GPTQ: their loss is then
the weight's magnitude and they pass no error on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evolm.prune.masks import PruneError, Sparsity, group_mask, nm_mask
from evolm.quant.gptq import inverse_hessian_factor


@dataclass(frozen=True)
class SparseGPTConfig:
    """``damp``: the Hessian's dampening as a fraction of its mean diagonal (the paper's 1%);
    ``block_size``: columns per lazy batch and per mask choice (the paper's B_s = 128)."""

    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self):
        if self.block_size <= 0:
            raise PruneError(f"prune: --blocksize must be positive, got {self.block_size}")
        if not 0 <= self.damp < 1:
            raise PruneError(f"prune: --damp must be in [0, 1), got {self.damp}")


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, target: Sparsity,
                    config: SparseGPTConfig = SparseGPTConfig(), factor: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT of ``weight`` (N, K) for inputs with Hessian ``hessian`` (K, K): the pruned and
    updated weights (``weight``'s dtype) and the mask (True where zero). Computes in the Hessian's
    dtype (float32, or float64 for tests). ``factor``: :func:`inverse_hessian_factor` of the
    Hessian when the caller has it already (layers that share their inputs)."""
    N, K = weight.shape
    dtype = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()
    U = (factor if factor is not None else inverse_hessian_factor(hessian.to(dtype), config.damp)).to(dtype)
    mask = torch.zeros(N, K, dtype=torch.bool)
    block = -(-config.block_size // max(target.m, 1)) * max(target.m, 1)  # whole n:m groups per block
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = U1.diagonal()
        m1 = torch.zeros(N, i2 - i1, dtype=torch.bool)
        if not target.m:  # the block's mask, chosen once its earlier blocks' updates are in
            m1 = group_mask(W1 ** 2 / d[None, :] ** 2, target)
        err = torch.zeros(N, i2 - i1, dtype=dtype)
        for i in range(i2 - i1):
            if target.m and i % target.m == 0:
                m1[:, i:i + target.m] = nm_mask(W1[:, i:i + target.m] ** 2 / d[None, i:i + target.m] ** 2,
                                                target.n, target.m)
            err[:, i] = torch.where(m1[:, i], W1[:, i], 0) / d[i]
            W1[:, i:] -= err[:, i:i + 1] * U1[i:i + 1, i:]
            W1[:, i] = torch.where(m1[:, i], 0, W1[:, i])
        W[:, i1:i2] = W1
        W[:, i2:] -= err @ U[i1:i2, i2:]
        mask[:, i1:i2] = m1
    return W.to(weight.dtype), mask


__all__ = ["SparseGPTConfig", "sparsegpt_prune"]
