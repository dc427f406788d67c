"""``evolm quantize``: any model in, an ordinary evolm folder with weight-only quantized linears out.

Methods (the formats are those of the layers decoding already runs, see ``evolm/quant/``):

- ``int8``: per-output-row symmetric int8, round-to-nearest (:class:`~evolm.quant.int8.Int8Linear`);
- ``int4``: 4-bit, one (scale, min) per ``group_size`` inputs, round-to-nearest (llama.cpp's Q4_1
  form; :class:`~evolm.quant.int4.Int4Linear`);
- ``nf4``: QLoRA's NormalFloat-4, blocks of 64 (:class:`~evolm.quant.nf4.NF4Linear`; dequantized
  per call: no fast kernel, it is here to compare against);
- ``gptq``: the int4 format with codes chosen by GPTQ on a calibration set (``gptq.py``).

Every method keeps the embedding in float (a lookup reads one row per token) and stores the LM
head as per-row int8, as ``quantize_int4`` has always done (llama.cpp keeps SmolLM2's tied head in
Q8_0 too): the methods then differ only in the block linears they are compared on. The result is
saved with :func:`evolm.save` (``evolm/quant/saved.py`` says how the codes are stored), so
``generate``, ``chat``, ``serve``, ``eval`` and ``convert`` load it like any other folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from evolm.quant.calibration import CalibrationConfig, calibration_ids
from evolm.quant.gptq import GPTQConfig, gptq_model
from evolm.quant.int4 import quantize_int4
from evolm.quant.int8 import Int8Linear, quantize_int8
from evolm.quant.nf4 import quantize_base_nf4
from evolm.quant.policy import DEFAULT_POLICY, KernelPolicy
from evolm.quant.saved import layer_tensors, portable_state
from evolm.quant.walk import replace_linears, untied_head

METHODS = ("int8", "int4", "nf4", "gptq")


@dataclass(frozen=True)
class QuantizeConfig:
    """``method``: one of :data:`METHODS`; ``group_size``: inputs per (scale, min) of int4 / gptq
    (32: evolm's q4 kernel; other sizes run torch's int4pack kernel); ``calibration`` and ``gptq``:
    GPTQ's calibration set and settings (its ``group_size`` is this one)."""

    method: str
    group_size: int = 32
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"quantize: --method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.group_size <= 0 or self.group_size % 2:
            raise ValueError(f"quantize: --group-size must be a positive even number, got {self.group_size}")

    def record(self) -> dict:
        """What config.json says of how the model was quantized."""
        out = {"method": self.method}
        if self.method in ("int4", "gptq"):
            out["group_size"] = self.group_size
        if self.method == "gptq":
            c, g = self.calibration, self.gptq
            out["gptq"] = {"damp": g.damp, "block_size": g.block_size, "act_order": g.act_order}
            out["calibration"] = {"sources": list(c.sources) or ["python_docs (built-in)"], "samples": c.samples,
                                  "seq_len": c.seq_len, "seed": c.seed}
        return out


def _int8_head(model: nn.Module, policy: KernelPolicy) -> None:
    """The LM head (tied or not) as per-row int8."""
    replace_linears(model, lambda name, lin: Int8Linear(lin.weight, lin.bias, policy) if name == "lm_head" else None)
    untied_head(model, lambda w: Int8Linear(w, None, policy))


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantizeConfig, tokenizer=None, policy: KernelPolicy = DEFAULT_POLICY,
                   log: Callable[[str], None] | None = None) -> nn.Module:
    """Quantize a float CPU model in place as ``config`` says; returns the model (``model.quantization``
    records the settings, which :func:`evolm.save` writes to config.json). GPTQ needs the tokenizer
    to build its calibration set."""
    if any(type(m) is not nn.Linear and hasattr(m, "dequantize") for m in model.modules()):
        raise ValueError("quantize: the model is already quantized; start from its float weights")
    m = config.method
    if m == "int8":
        quantize_int8(model, policy=policy)
    elif m == "int4":
        quantize_int4(model, group_size=config.group_size, head="int8", policy=policy)
    elif m == "nf4":
        quantize_base_nf4(model, compute_dtype=model.embed_tokens.weight.dtype, skip=("lm_head",))
        _int8_head(model, policy)
    else:
        if tokenizer is None:
            raise ValueError("quantize: gptq needs a tokenizer for its calibration text; the model has none")
        calib = calibration_ids(tokenizer, config.calibration)
        gcfg = GPTQConfig(config.group_size, config.gptq.damp, config.gptq.block_size, config.gptq.act_order)
        gptq_model(model, calib, gcfg, policy, log)
        quantize_int4(model, group_size=config.group_size, head="int8", policy=policy)  # the head, odd shapes
    if m in ("int4", "gptq") and log:
        odd = [n for n, x in model.named_modules() if isinstance(x, Int8Linear) and n != "lm_head"]
        if odd:
            log(f"quantize: {len(odd)} layers (e.g. {odd[0]}) have a shape the int4 kernel does not take (inputs "
                f"a multiple of --group-size {config.group_size}, outputs of 16): stored as int8")
    model.quantization = config.record()
    return model


def bits_per_weight(model: nn.Module) -> float:
    """Bits stored per weight of the quantized linear layers (codes + scales + minima, not biases)."""
    _, layers = portable_state(model)
    bits = weights = 0
    for name in layers:
        layer = model.get_submodule(name)
        bits += sum(t.numel() * t.element_size() * 8 for k, t in layer_tensors(layer).items() if k != "bias")
        weights += layer.in_features * layer.out_features
    return bits / max(weights, 1)


def run_quantize(source: str, out: str, config: QuantizeConfig, policy: KernelPolicy = DEFAULT_POLICY,
                 log: Callable[[str], None] = print) -> dict:
    """Load ``source`` (any model :func:`evolm.load` reads) in float32 on the CPU, quantize it, save
    it to ``out``; returns a summary (method, bits per weight, file size, seconds)."""
    from evolm.loading import load, save

    start = time.perf_counter()
    model, tok = load(source, dtype=torch.float32, device="cpu")
    quantize_model(model, config, tok, policy, log)
    save(model, out, tokenizer=tok)
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.suffix == ".safetensors")
    return {"method": config.method, "bits_per_weight": round(bits_per_weight(model), 3), "file_bytes": size,
            "seconds": round(time.perf_counter() - start, 1), "out": str(out)}


__all__ = ["METHODS", "QuantizeConfig", "quantize_model", "run_quantize", "bits_per_weight"]
