"""GPTQ: 4-bit weights chosen to keep each layer's outputs on real inputs, not its weights.

Round-to-nearest (``int4.py``) minimises ``||W - Q||``; what matters is ``||W X - Q X||`` on the
inputs ``X`` the layer sees. GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", arXiv:2210.17323) quantizes one input column at a time
and moves the rounding error onto the columns not yet quantized, weighted by the inverse of the
layer's Hessian ``H = 2 X X^T / n`` (the Optimal Brain Surgeon update, with the same column order
for every row). Its Algorithm 1, as here:

- dampen: ``H += damp * mean(diag H) * I`` (``damp = 0.01``), so a few calibration tokens still
  give an invertible H;
- ``U = Cholesky(H^-1)^T`` (upper): row ``j`` of ``U`` holds, from the diagonal on, exactly the
  OBS update of the columns after ``j`` once columns ``< j`` are fixed -- no inverse is updated;
- for each column j: ``q_j = quant(w_j)``, ``e = (w_j - q_j) / U_jj``, ``w_k -= e * U_jk`` for k > j;
- lazy batches: the update is applied at once to the ``block_size`` columns in hand and to the
  rest only when a block is done (one matmul), which is the same arithmetic in another order.

The grid is the one of ``int4.py`` (asymmetric, a scale and minimum per ``group_size`` inputs,
float16), computed when a group's first column comes up from the weights as updated so far, so a
GPTQ layer is an ordinary :class:`~evolm.quant.int4.Int4Linear` and runs the same kernels. With
``act_order`` columns go in order of decreasing ``diag H`` (the paper's "act-order", from its
reference code); the groups stay the contiguous ones the kernel reads, with grids from the original
weights ("static groups"). Inputs never seen in calibration (``H_jj = 0``) get ``H_jj = 1``: their
column is rounded to nearest and passes no error on (the reference code also zeroes such weights;
we keep them, since those inputs may be non-zero later).

:func:`gptq_model` runs the model block by block (as the reference code does): a block's linears
are quantized from the Hessians of their inputs, then the block is run again with its quantized
weights to give the next block its inputs, so later layers correct for earlier layers' errors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from evolm.quant.calibration import CalibrationError
from evolm.quant.int4 import Int4Linear, group_params, int4_supported, round_to_grid
from evolm.quant.policy import DEFAULT_POLICY, KernelPolicy
from evolm.quant.walk import replace_linears


@dataclass(frozen=True)
class GPTQConfig:
    """``group_size``: inputs sharing one (scale, min); ``damp``: the Hessian's dampening as a
    fraction of its mean diagonal; ``block_size``: columns per lazy batch (rounded up to whole
    groups); ``act_order``: columns by decreasing Hessian diagonal."""

    group_size: int = 32
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False

    def __post_init__(self):
        if self.group_size <= 0 or self.block_size <= 0:
            raise ValueError(f"GPTQ: group_size and block_size must be positive, got {self.group_size}, "
                             f"{self.block_size}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"GPTQ: damp must be in [0, 1), got {self.damp}")


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``U`` with ``U^T U = (H + damp * mean(diag H) * I)^-1``, upper triangular (Algorithm 1's line 2)."""
    H = hessian.clone()
    diag = H.diagonal()
    diag[diag == 0] = 1  # an input never seen: rounded to nearest, passes no error on
    diag += damp * diag.mean()
    try:
        L = torch.linalg.cholesky(H)
    except RuntimeError:
        raise CalibrationError(f"GPTQ: the layer's Hessian ({H.shape[0]} inputs) is not positive definite even "
                               f"with damp={damp}; use more calibration tokens or a larger --damp") from None
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: GPTQConfig = GPTQConfig(),
                  stored: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit GPTQ of ``weight`` (N, K) for inputs with Hessian ``hessian`` (K, K): codes (N, K) int32
    in 0..15 and (scale, min) (N, K / group_size), ``w ~ q * scale + min`` (scale and min rounded to
    ``stored``). Computes in the Hessian's dtype (float32, or float64 for tests)."""
    N, K = weight.shape
    g = config.group_size
    if K % g:
        raise ValueError(f"GPTQ: {K} inputs are not a whole number of groups of {g}")
    dtype = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    W, H = weight.detach().to(dtype).clone(), hessian.to(dtype)
    perm = torch.argsort(H.diagonal(), descending=True) if config.act_order else torch.arange(K)
    scale = torch.zeros(N, K // g, dtype=dtype)
    lo = torch.zeros_like(scale)
    if config.act_order:  # static groups: the grid of each contiguous group, from the original weights
        scale, lo = group_params(W.reshape(N, K // g, g), stored)
        W, H = W[:, perm], H[perm][:, perm]
    U = inverse_hessian_factor(H, config.damp)
    codes = torch.zeros(N, K, dtype=torch.int32)
    block = -(-config.block_size // g) * g  # whole groups, so a group's columns are all in hand at its start
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err = torch.zeros(N, i2 - i1, dtype=dtype)
        for i in range(i2 - i1):
            col = i1 + i
            if not config.act_order and col % g == 0:
                scale[:, col // g], lo[:, col // g] = group_params(W1[:, i:i + g], stored)
            grp = int(perm[col]) // g
            q = round_to_grid(W1[:, i], scale[:, grp], lo[:, grp])
            codes[:, col] = q
            err[:, i] = (W1[:, i] - (q * scale[:, grp] + lo[:, grp])) / U1[i, i]
            W1[:, i:] -= err[:, i:i + 1] * U1[i:i + 1, i:]
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return codes[:, torch.argsort(perm)], scale.float(), lo.float()


class HessianSum:
    """``2 X X^T / n`` over every input row a layer sees, summed batch by batch in float64."""

    def __init__(self, features: int):
        self.sum = torch.zeros(features, features, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum += (x.t() @ x).double()
        self.rows += x.shape[0]

    def value(self) -> torch.Tensor:
        return (2 * self.sum / max(self.rows, 1)).float()


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


def _block_inputs(model: nn.Module, calibration: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple]]:
    """Each calibration row's input to the first block, and the other arguments each block is called
    with (RoPE tables, mask, ...; the same for every row of this length). Taken by hooks on a real
    forward pass, so the model's own embedding, scaling and mask planning are used as they are."""
    xs, extra = [], {}

    def hook(i):
        def grab(_module, args, kwargs):
            extra.setdefault(i, (args[1:], kwargs))
            if i == 0:
                xs.append(args[0])
                if len(xs) > 1:  # the first row went all the way, for every block's arguments
                    raise _Stop
        return grab

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(model.layers)]
    try:
        for row in calibration:
            try:
                model(row[None])
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return xs, [extra[i] for i in range(len(model.layers))]


def _block_hessians(block: nn.Module, xs: list[torch.Tensor], args: tuple) -> dict[str, HessianSum]:
    """The Hessian of each linear layer's inputs in ``block`` over the calibration rows. Layers fed
    the same tensor (q/k/v, gate/up) share one sum, so each is computed once."""
    sums: dict[str, HessianSum] = {}
    seen: list[tuple[torch.Tensor, HessianSum]] = []  # this row's inputs, held so no address is reused
    added: set[int] = set()

    def hook(name):
        def add(_module, inputs):
            x = inputs[0]
            acc = sums.get(name) or next((a for t, a in seen if t is x), None) or HessianSum(x.shape[-1])
            sums[name] = acc
            seen.append((x, acc))
            if id(acc) not in added:
                acc.add(x)
                added.add(id(acc))
        return add

    linears = [(n, m) for n, m in block.named_modules() if type(m) is nn.Linear]
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears]
    try:
        for x in xs:
            seen.clear()
            added.clear()
            block(x, *args[0], **args[1])
    finally:
        for h in handles:
            h.remove()
    return sums


def _quantize_block(block: nn.Module, hessians: dict[str, HessianSum], config: GPTQConfig,
                    stored: torch.dtype = torch.float16) -> dict[str, tuple]:
    """GPTQ codes of each linear of ``block`` the int4 kernel takes, by name. Layers that share a
    Hessian (q/k/v, gate/up) are quantized as one matrix, their rows stacked: GPTQ treats rows
    independently given H and the column order, so the result is the same, in fewer, larger steps."""
    shared: dict[int, list[str]] = {}
    for name, acc in hessians.items():
        linear = block.get_submodule(name)
        if int4_supported(*linear.weight.shape, config.group_size):
            shared.setdefault(id(acc), []).append(name)
    out = {}
    for names in shared.values():
        weights = [block.get_submodule(n).weight for n in names]
        q, scale, lo = gptq_quantize(torch.cat(weights), hessians[names[0]].value(), config, stored)
        rows = [w.shape[0] for w in weights]
        for n, *parts in zip(names, q.split(rows), scale.split(rows), lo.split(rows)):
            out[n] = tuple(parts)
    return out


def check_calibration(model: nn.Module, tokens: int, method: str = "GPTQ") -> None:
    """A Hessian from fewer tokens than the layer has inputs is singular: GPTQ (or SparseGPT, named
    by ``method``) would only be fitting the damping. Refuse such a calibration set, naming the numbers."""
    widest = max(((m.in_features, n) for n, m in model.named_modules() if type(m) is nn.Linear
                  and n.startswith("layers.")), default=(0, ""))
    if tokens < widest[0]:
        raise CalibrationError(f"calibration set too small for {method}: {tokens} tokens, but {widest[1]} has "
                               f"{widest[0]} inputs (its Hessian X X^T needs at least that many tokens to be "
                               f"invertible); raise --calib-samples or --calib-len")


@torch.no_grad()
def gptq_model(model: nn.Module, calibration: torch.Tensor, config: GPTQConfig = GPTQConfig(),
               policy: KernelPolicy = DEFAULT_POLICY, log: Callable[[str], None] | None = None) -> nn.Module:
    """Quantize every block's linear layers of ``model`` with GPTQ on ``calibration`` (rows of token
    ids, (n, T)), block by block, in place; returns the model. Layers the int4 kernel cannot take
    (:func:`~evolm.quant.int4.int4_supported`), the LM head and the embedding stay float (the caller
    quantizes them as it quantizes round-to-nearest models)."""
    check_calibration(model, calibration.numel())
    was_training = model.training
    model.eval()
    xs, args = _block_inputs(model, calibration)
    # the grid in the dtype the layer will keep it in: evolm's q4 kernel float16, torch's int4pack bfloat16
    q4 = config.group_size == 32 and policy.uses_quant_kernels(config.group_size, torch.device("cpu"))
    stored = torch.float16 if q4 else torch.bfloat16
    for i, block in enumerate(model.layers):
        start = time.perf_counter()
        codes = _quantize_block(block, _block_hessians(block, xs, args[i]), config, stored)
        replace_linears(block, lambda name, linear: None if name not in codes else
                        Int4Linear.from_codes(*codes[name], linear.bias, policy))
        xs = [block(x, *args[i][0], **args[i][1]) for x in xs]
        if log:
            log(f"gptq: block {i + 1}/{len(model.layers)} in {time.perf_counter() - start:.1f} s")
    model.train(was_training)
    return model


__all__ = ["GPTQConfig", "gptq_quantize", "gptq_model", "HessianSum", "inverse_hessian_factor", "check_calibration"]
