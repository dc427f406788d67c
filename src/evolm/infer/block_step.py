"""Fused CPU steps: each block's step over new tokens into a KV cache as one C++ call
(``kernels/decode_block.cpp``): a decode step's one token per row, and a prompt's tokens.

Eager decoding of a small model on a CPU is dominated by the interpreter: a SmolLM2-135M token is
~900 module calls and ATen dispatches around 121 matrix-vector products, and at one thread the
products are less than half of the time. ``torch.compile`` removes that overhead but compiles for
tens of seconds at every start; llama.cpp never pays it because its graph is C. This module gathers
each block's tensors and settings once into a ``BlockPlan`` (C++), and the block then hands its
decode step (one new token per row, a KV cache, no gradient) to it: norms, projections, rotary
embedding, the cache write, attention and the MLP in one call, with the eager model's ops.

A prompt (more than ``FEW_QUERIES`` tokens written into an empty or plain cache) takes the same call:
the same products as the Python layers (the same kernels for the same number of rows), the same
``scaled_dot_product_attention`` call over the same cache view, and in float32 the norms, rotary
embedding and cache writes as loops over the rows. At 256 tokens that is ~1.3 ms of a SmolLM2
block's ~10.6 ms that the Python path spends in ~45 small ATen ops (profiled), which decided whether
a prompt read from the file's blocks beats transformers' on its dense weights.

Only what the plan expresses gets one: an attention mixer (MHA/GQA/MQA, QK-norm, soft-cap,
windows and chunks -- both are the mask it is handed --, RoPE or none), a dense MLP (gated or not), RMSNorm/LayerNorm in any placement, and
linears that are float ``nn.Linear`` or a GGUF file's kept blocks (``BlockLinear``). Anything
else (MoE, MLA, LoRA, re-quantized int8/int4 layers, Llama 4's L2 QK-norm and query temperature)
keeps the Python path, as do prompts into a sliding window's ring, 2-4 new tokens, attention
soft-capping over a prompt, a forward without a cache, training and a compiled step's static cache.
The plan holds the module's tensors (not copies): attach it after the model is prepared (fused, on its device and dtype), as
:func:`evolm.infer.prepare.prepare` does, and :func:`detach` it before changing the model.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from evolm import kernels
from evolm.nn.attention import FEW_QUERIES  # up to this many new tokens attend() takes a path not expressed here

PLACEMENTS = {"pre": 0, "post": 1, "sandwich": 2, "olmo2": 3, "parallel": 4, "parallel2": 5}
QK_NORMS = {None: 0, "head": 1, "full": 2}
ACTIVATIONS = {"gelu": 0, "gelu_tanh": 1, "silu": 2, "relu": 3}
NORM_SLOTS = ("attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm", "q_norm", "k_norm")
LINEAR_SLOTS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                "down_proj")


class Unsupported(Exception):
    """A block the fused step does not express (it keeps the Python path)."""


class BlockStep:
    """A block's fused step: ``step(x, rope, mask, is_causal, cache)`` -> the block's output, or None
    where the Python path must run (another dtype or device, a cache without a plain slot for the
    tokens, a mask the kernel does not take)."""

    __slots__ = ("plan", "layer", "dtype", "kv_heads", "head_dim", "softcap")

    def __init__(self, plan, layer: int, dtype: torch.dtype, attn):
        self.plan, self.layer, self.dtype = plan, layer, dtype
        self.kv_heads, self.head_dim, self.softcap = attn.n_kv_heads, attn.head_dim, attn.softcap

    def __call__(self, x: torch.Tensor, rope, mask: torch.Tensor | None, is_causal: bool,
                 cache) -> torch.Tensor | None:
        if x.dtype != self.dtype or x.device.type != "cpu":
            return None
        if x.shape[1] > 1:
            return self._prompt(x, rope, mask, is_causal, cache)
        slot = getattr(cache, "decode_slot", None)
        where = slot(self.layer) if slot is not None else None
        if where is None:
            return None
        K, V, write, attend, *rows = where
        rows = rows[0] if rows else None
        if K.dtype != x.dtype:
            return None
        if mask is not None and (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1
                                 or mask.shape[3] != (K.shape[2] if attend < 0 else attend)):
            return None
        cos, sin = rope if rope is not None else (None, None)
        if isinstance(write, int):
            return self.plan.step(x, cos, sin, mask, K, V, write, None, attend, None, False)
        return self.plan.step(x, cos, sin, mask, K, V, -1, write, attend, rows, False)

    def _prompt(self, x: torch.Tensor, rope, mask: torch.Tensor | None, is_causal: bool, cache):
        """T > 1 new tokens, where the Python layer would call scaled_dot_product_attention over
        the cache's plain slots (``cache.prefill_slot``)."""
        B, T = x.shape[:2]
        if T <= FEW_QUERIES or self.softcap is not None or (mask is not None and mask.dtype != torch.bool):
            return None
        slot = getattr(cache, "prefill_slot", None)
        where = slot(self.layer, B, T, self.kv_heads, self.head_dim, x.dtype) if slot is not None else None
        if where is None:
            return None
        K, V, start = where
        cos, sin = rope if rope is not None else (None, None)
        return self.plan.step(x, cos, sin, mask, K, V, start, None, start + T, None, is_causal)


def _norm(module: nn.Module | None) -> tuple[list[int], float, list]:
    from evolm.nn.norm import LayerNorm, RMSNorm

    if module is None:
        return [-1, 0], 0.0, [None, None]
    if type(module) is RMSNorm:
        # Gemma scales by (1 + w) in float32: the same float32 sum, computed once here
        w = (1.0 + module.weight.float()) if module.unit_offset else module.weight
        return [0, int(module.unit_offset)], module.eps, [w, None]
    if type(module) is LayerNorm:
        return [1, 0], module.eps, [module.weight, module.bias]
    raise Unsupported(f"norm {type(module).__name__}")


def _linear(module: nn.Module | None) -> tuple[list[int], list]:
    from evolm.quant.blocks import GEMM_ROWS, KERNEL_ROWS, BlockLinear

    if module is None:
        return [-1, 0, 0, 0], [None] * 4
    if type(module) is nn.Linear:
        return [0, 0, 0, 0], [module.weight, None, None, module.bias]
    if type(module) is BlockLinear and module.kernel:  # BlockLinear.forward's choice of kernel by rows
        return [1, module.group, KERNEL_ROWS, GEMM_ROWS], [module.codes, module.scale, module.min, module.bias]
    raise Unsupported(f"linear {type(module).__name__}")


def plan_for(block: nn.Module, config):
    """The ``BlockPlan`` of one block; raises :class:`Unsupported` for what it cannot express."""
    from evolm.nn.attention import Attention
    from evolm.nn.mlp import MLP

    attn, mlp = block.self_attn, block.mlp
    if getattr(block, "cross_attn", None) is not None:
        raise Unsupported("cross-attention (an encoder-decoder's decoder block)")
    if type(attn) is not Attention or type(mlp) is not MLP:
        raise Unsupported(f"{type(attn).__name__} / {type(mlp).__name__}")
    if config.activation not in ACTIVATIONS:
        raise Unsupported(f"activation {config.activation}")
    if attn.qk_norm not in QK_NORMS or attn.temperature is not None:
        raise Unsupported(f"qk_norm {attn.qk_norm!r} / query temperature {attn.temperature}")
    ints = [PLACEMENTS[block.placement], QK_NORMS[attn.qk_norm], ACTIVATIONS[config.activation], int(mlp.gated),
            attn.n_heads, attn.n_kv_heads, attn.head_dim, int(attn.interleave), int(attn.softcap is not None)]
    floats = [float(attn.scale), float(attn.softcap or 0.0)]
    tensors = []
    owners = {"q_norm": attn, "k_norm": attn}
    for name in NORM_SLOTS:
        i, eps, t = _norm(getattr(owners.get(name, block), name, None))
        ints += i
        floats.append(float(eps))
        tensors += t
    for name in LINEAR_SLOTS:
        i, t = _linear(getattr(attn if name in LINEAR_SLOTS[:5] else mlp, name, None))
        ints += i
        tensors += t
    return kernels.block_plan_class()(ints, floats, tensors)


def attach(model) -> int:
    """Give every block the fused step it can take; returns how many got one (0 where the kernels
    cannot be built here)."""
    if all(getattr(block, "cross_attn", None) is not None for block in model.layers):
        return 0  # an encoder-decoder's decoder blocks: none can take it (no kernels to build)
    if not kernels.available() or next(model.parameters()).device.type != "cpu":
        return 0
    dtype = next(model.parameters()).dtype
    n = 0
    for i, block in enumerate(model.layers):
        try:
            block.fused_step = BlockStep(plan_for(block, model.config), i, dtype, block.self_attn)
            n += 1
        except Unsupported:
            block.fused_step = None
    return n


def independent_rows(model) -> int:
    """How many rows a decode step may hold while each row's numbers stay those it has alone, bit
    for bit: ``KERNEL_ROWS`` where every block takes the fused step and every product (the head
    included) is a GGUF blocks kernel -- each row summed on its own, in the same order at any batch
    up to that size (``kernels/block_gemm.cpp``; attention splits each row's keys as it would alone,
    ``decode_attention.cpp``) -- else 0: a dense product goes through BLAS, whose kernel (and
    summation order) changes with the number of rows. The server (``evolm.serve.scheduler``) pads a
    lone request to several rows only where this is 0."""
    from evolm.quant.blocks import KERNEL_ROWS, BlockLinear

    if not model.layers or any(getattr(block, "fused_step", None) is None for block in model.layers):
        return 0
    if getattr(model, "lm_head", None) is None:  # tied head: F.linear with the embedding matrix
        return 0
    for m in model.modules():
        if isinstance(m, nn.Linear) or (isinstance(m, BlockLinear) and not m.kernel):
            return 0
    if not isinstance(model.lm_head, BlockLinear):
        return 0
    return KERNEL_ROWS


def detach(model) -> None:
    """Back to the Python path for every block (before changing the model's weights or modules)."""
    for block in model.layers:
        block.fused_step = None


__all__ = ["attach", "detach", "independent_rows", "plan_for", "BlockStep", "Unsupported"]
