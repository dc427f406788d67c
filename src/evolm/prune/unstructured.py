"""``evolm prune --method magnitude|wanda|sparsegpt``: zeros in the block linears, the model's shape kept.

Each method prunes every ``nn.Linear`` inside the transformer blocks (attention and MLP
projections) to the same target -- a fraction of each layer, or n:m -- and leaves the embedding
and the LM head dense, as both papers do (SparseGPT Sec. 4, Wanda Sec. 4). The result is an
ordinary evolm folder of dense float weights with zeros in them, which every verb loads; its
``config.json`` records how it was pruned under ``"pruning"``.

The calibrated methods run the model block by block, like GPTQ (:mod:`evolm.quant.gptq`, whose
block walk and Hessian sums this reuses): a block's linear layers are pruned from the inputs the
block receives from the blocks *already pruned* before it, and the block is then run again,
pruned, to give the next one its inputs -- the sequential scheme of both papers' reference code,
so later layers see (and SparseGPT corrects for) the earlier layers' damage. Within a block every
layer's inputs come from the block as it was (the papers' hooks run the dense block once). The
calibration set is the one ``evolm quantize`` uses (:mod:`evolm.quant.calibration`: built-in
``python_docs`` windows, held-out documents excluded).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from evolm.prune.masks import PruneError, Sparsity
from evolm.prune.sparsegpt import SparseGPTConfig, sparsegpt_prune
from evolm.prune.wanda import input_norms, magnitude_mask, wanda_mask
from evolm.quant.calibration import CalibrationConfig, calibration_ids
from evolm.quant.gptq import _block_hessians, _block_inputs, check_calibration, inverse_hessian_factor

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class PruneConfig:
    """``method``: one of :data:`METHODS`; ``target``: the sparsity; ``calibration`` (wanda,
    sparsegpt) and ``sparsegpt`` settings."""

    method: str
    target: Sparsity = field(default_factory=Sparsity)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    sparsegpt: SparseGPTConfig = field(default_factory=SparseGPTConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise PruneError(f"prune: --method {self.method!r}: expected one of {', '.join(METHODS)} (or minitron)")

    @property
    def calibrated(self) -> bool:
        return self.method != "magnitude"

    def record(self) -> dict:
        """What config.json says of how the model was pruned."""
        out = {"method": self.method, **self.target.record()}
        if self.calibrated:
            c = self.calibration
            out["calibration"] = {"sources": list(c.sources) or ["python_docs (built-in)"], "samples": c.samples,
                                  "seq_len": c.seq_len, "seed": c.seed}
        if self.method == "sparsegpt":
            out["sparsegpt"] = {"damp": self.sparsegpt.damp, "block_size": self.sparsegpt.block_size}
        return out


def prune_config_from_args(args) -> PruneConfig:
    """The CLI's options as a :class:`PruneConfig`."""
    return PruneConfig(args.method, Sparsity.parse(args.sparsity, args.pattern),
                       CalibrationConfig(tuple(args.calib_data), args.calib_samples, args.calib_len, args.seed),
                       SparseGPTConfig(args.damp, args.blocksize))


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linear layers inside the transformer blocks, by full name; refuses a model it cannot prune."""
    if not isinstance(getattr(model, "layers", None), nn.ModuleList):
        raise PruneError(f"prune: a {type(model).__name__} has no transformer blocks (model.layers) to prune")
    if any(type(m) is not nn.Linear and hasattr(m, "dequantize") for m in model.modules()):
        raise PruneError("prune: the model is weight-only quantized; prune its float weights (then quantize)")
    if getattr(model.config, "n_experts", 0):
        raise PruneError(f"prune: {model.config.n_experts}-expert MoE models are not supported: their experts are "
                         f"batched tensors, not linear layers (prune a dense model)")
    linears = [(f"layers.{i}.{n}", m) for i, block in enumerate(model.layers)
               for n, m in block.named_modules() if type(m) is nn.Linear]
    if not linears:
        raise PruneError("prune: the model's blocks hold no float linear layers")
    return linears


def _prune_block(block: nn.Module, config: PruneConfig, hessians: dict | None) -> None:
    """Prune every linear layer of one block in place (``hessians``: name -> HessianSum, calibrated methods)."""
    factors: dict[int, torch.Tensor] = {}  # q/k/v and gate/up share their inputs: one factor each
    for name, linear in block.named_modules():
        if type(linear) is not nn.Linear:
            continue
        W = linear.weight
        if config.method == "magnitude":
            W[magnitude_mask(W, config.target)] = 0
        elif config.method == "wanda":
            W[wanda_mask(W, input_norms(hessians[name].sum), config.target)] = 0
        else:
            acc = hessians[name]
            if id(acc) not in factors:
                factors[id(acc)] = inverse_hessian_factor(acc.value(), config.sparsegpt.damp)
            new, _ = sparsegpt_prune(W, acc.value(), config.target, config.sparsegpt, factor=factors[id(acc)])
            W.copy_(new)


@torch.no_grad()
def prune_model(model: nn.Module, config: PruneConfig, calibration: torch.Tensor | None = None,
                log: Callable[[str], None] | None = None) -> nn.Module:
    """Prune ``model``'s block linears in place as ``config`` says; returns the model, with
    ``model.pruning`` recording the settings (:func:`evolm.save` writes it to config.json).
    ``calibration``: (n, T) token ids, needed by wanda and sparsegpt."""
    linears = block_linears(model)
    for name, linear in linears:
        config.target.check_columns(linear.in_features, name)
    was_training = model.training
    model.eval()
    if config.calibrated:
        if calibration is None:
            raise PruneError(f"prune: {config.method} needs a calibration set (token ids)")
        if config.method == "sparsegpt":
            check_calibration(model, calibration.numel(), "SparseGPT")
        xs, args = _block_inputs(model, calibration)
    for i, block in enumerate(model.layers):
        start = time.perf_counter()
        _prune_block(block, config, _block_hessians(block, xs, args[i]) if config.calibrated else None)
        if config.calibrated and i + 1 < len(model.layers):  # the next block's inputs, through this pruned one
            xs = [block(x, *args[i][0], **args[i][1]) for x in xs]
        if log and config.calibrated:
            log(f"{config.method}: block {i + 1}/{len(model.layers)} in {time.perf_counter() - start:.1f} s")
    model.train(was_training)
    model.pruning = {**config.record(), "zero_fraction": round(zero_fraction(model)[0], 6)}
    return model


def zero_fraction(model: nn.Module) -> tuple[float, int]:
    """The share of the block linears' weights that are zero, and how many weights they hold."""
    linears = block_linears(model)
    zeros = sum(int((m.weight == 0).sum()) for _, m in linears)
    total = sum(m.weight.numel() for _, m in linears)
    return zeros / total, total


def run_prune(source: str, out: str, config: PruneConfig, log: Callable[[str], None] = print) -> dict:
    """Load ``source`` (any model :func:`evolm.load` reads) in float32 on the CPU, prune it, save it
    to ``out``; returns a summary (method, target, zero fraction, seconds)."""
    from evolm.loading import load, save

    start = time.perf_counter()
    model, tok = load(source, dtype=torch.float32, device="cpu")
    block_linears(model)  # refuse a model it cannot prune before reading any calibration text
    calib = None
    if config.calibrated:
        if tok is None:
            raise PruneError(f"prune: {config.method} needs a tokenizer for its calibration text; {source} has none")
        calib = calibration_ids(tok, config.calibration)
    pruning = time.perf_counter()
    prune_model(model, config, calib, log)
    pruning = time.perf_counter() - pruning
    save(model, out, tokenizer=tok)
    zeros, total = zero_fraction(model)
    return {"method": config.method, "sparsity": str(config.target), "zero_fraction": zeros, "weights": total,
            "prune_seconds": round(pruning, 1), "seconds": round(time.perf_counter() - start, 1),
            "out": str(Path(out))}


__all__ = ["METHODS", "PruneConfig", "prune_model", "run_prune", "zero_fraction", "block_linears",
           "prune_config_from_args"]
