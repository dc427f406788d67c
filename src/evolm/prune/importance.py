"""Activation importance of heads, MLP channels, embedding channels and layers (Minitron).

Muralidharan et al. 2024 ("Compact Language Models via Pruning and Knowledge Distillation",
arXiv:2407.14679, Sec. 2.2) rank every prunable structure from forward passes alone over a small
calibration set, one score per structure:

- attention head i of a layer: the size of that head's output, ``‖Attn(X W_Q,i, X W_K,i, X W_V,i)‖₂``
  (the input of ``o_proj`` cut into heads);
- MLP channel i: the magnitude of the intermediate activation ``X W_1,iᵀ`` (here the input of
  ``down_proj``: ``act(gate) · up`` for a gated MLP, ``act(up)`` otherwise);
- embedding channel i: the magnitude of the norm layers' outputs ``LN(X)_i``, summed over the
  d_model-wide norms of every block;
- layer: Block Importance (BI, Men et al. 2024 "ShortGPT", arXiv:2403.03853, which the paper uses
  next to the perplexity drop): ``1 − mean cos(X_in, X_out)`` over tokens, or (``layer_metric=
  "loss"``) the increase of the calibration loss when that one block is skipped.

A per-token score is aggregated over the sequence by the mean of its absolute value and over
the batch by the L2 norm (``sqrt(Σ_b (mean_s |a_bs|)²)``): the (batch L2, sequence mean) pair of
the paper's ablation of aggregation functions, as recalled (not re-checked against its table). Besides the scores,
every d_model-wide norm records the mean share of its input's energy in each channel
(``E[x_i² / Σ_j x_j²]``): ``structured.py`` uses it to keep the norm's output scale when channels
are cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from evolm.nn.norm import LayerNorm, RMSNorm

LAYER_METRICS = ("bi", "loss")


@dataclass
class Importance:
    """Scores by structure (higher = keep). ``heads`` (L, H), ``mlp`` (L, d_ff), ``embed`` (d_model,),
    ``layers`` (L,); ``energy``: norm module name -> (d_model,) mean energy share of each channel."""

    heads: torch.Tensor
    mlp: torch.Tensor
    embed: torch.Tensor
    layers: torch.Tensor
    layer_metric: str = "bi"
    energy: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0


class _Agg:
    """Running ``Σ_b (mean_s |a_bs|)²`` for a (B, S, N) per-token score; ``value()`` takes the root."""

    def __init__(self):
        self.sq = None

    def add(self, a: torch.Tensor) -> None:
        per_row = a.abs().double().mean(dim=1)  # (B, N): mean over the sequence
        s = per_row.pow(2).sum(0)  # L2 over the batch, squared
        self.sq = s if self.sq is None else self.sq + s

    def value(self) -> torch.Tensor:
        return self.sq.sqrt().float()


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (RMSNorm, LayerNorm))


def d_model_norms(model: nn.Module) -> dict[str, nn.Module]:
    """Every norm over the hidden size, by module name: the blocks' norms and the final one (the
    per-head / full-projection QK norms are not over d_model and are not listed)."""
    d = model.config.d_model
    return {name: m for name, m in model.named_modules()
            if _is_norm(m) and m.weight.shape[0] == d and ".self_attn." not in name}


@torch.no_grad()
def compute_importance(model: nn.Module, ids: torch.Tensor, batch_size: int = 4,
                       layer_metric: str = "bi") -> Importance:
    """Scores of every head, MLP channel, embedding channel and layer of ``model`` from forward passes
    over ``ids`` (N, T) calibration windows, ``batch_size`` rows at a time."""
    if layer_metric not in LAYER_METRICS:
        raise ValueError(f"prune: layer metric {layer_metric!r}: expected one of {', '.join(LAYER_METRICS)}")
    c = model.config
    heads = [_Agg() for _ in model.layers]
    mlp = [_Agg() for _ in model.layers]
    emb: dict[str, _Agg] = {}
    energy_sum: dict[str, torch.Tensor] = {}
    cos_sum = torch.zeros(c.n_layers, dtype=torch.float64)
    hooks = []

    def head_hook(i):
        def hook(_m, args):
            x = args[0]
            heads[i].add(x.view(*x.shape[:-1], c.n_heads, -1).float().norm(dim=-1))
        return hook

    def mlp_hook(i):
        return lambda _m, args: mlp[i].add(args[0].float())

    def norm_hook(name, in_block):
        def hook(_m, args, out):
            x = args[0].double()
            s = (x.pow(2) / x.pow(2).sum(-1, keepdim=True).clamp_min(1e-300)).sum(dim=(0, 1))
            energy_sum[name] = s if name not in energy_sum else energy_sum[name] + s
            if in_block:
                emb.setdefault(name, _Agg()).add(out.float())
        return hook

    def block_hook(i):
        def hook(_m, args, out):
            cos = torch.nn.functional.cosine_similarity(args[0].float(), out.float(), dim=-1)
            cos_sum[i] += cos.double().sum()
        return hook

    for i, block in enumerate(model.layers):
        hooks.append(block.self_attn.o_proj.register_forward_pre_hook(head_hook(i)))
        hooks.append(block.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)))
        hooks.append(block.register_forward_hook(block_hook(i)))
    for name, norm in d_model_norms(model).items():
        hooks.append(norm.register_forward_hook(norm_hook(name, name.startswith("layers."))))
    try:
        for start in range(0, ids.shape[0], batch_size):
            model(ids[start:start + batch_size])
    finally:
        for h in hooks:
            h.remove()
    tokens = ids.numel()
    layers = 1.0 - (cos_sum / tokens).float() if layer_metric == "bi" else _loss_drop(model, ids, batch_size)
    return Importance(
        heads=torch.stack([h.value() for h in heads]),
        mlp=torch.stack([m.value() for m in mlp]),
        embed=torch.stack([a.value() for a in emb.values()]).sum(0),
        layers=layers, layer_metric=layer_metric,
        energy={k: v / tokens for k, v in energy_sum.items()}, tokens=tokens)


@torch.no_grad()
def calibration_loss(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of ``model`` over the calibration windows."""
    total, n = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        x = ids[start:start + batch_size]
        targets = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
        rows = x.shape[0] * (x.shape[1] - 1)
        total += float(model(x, targets=targets)) * rows
        n += rows
    return total / n


def _loss_drop(model: nn.Module, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The paper's perplexity metric for depth: the calibration loss with one block skipped, minus
    the full model's (one forward pass over the calibration set per layer)."""
    base = calibration_loss(model, ids, batch_size)
    drops = []
    for block in model.layers:
        hook = block.register_forward_hook(lambda _m, args, _out: args[0])  # the block becomes the identity
        try:
            drops.append(calibration_loss(model, ids, batch_size) - base)
        finally:
            hook.remove()
    return torch.tensor(drops)


__all__ = ["Importance", "compute_importance", "calibration_loss", "d_model_norms", "LAYER_METRICS"]
