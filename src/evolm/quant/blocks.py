"""Linear layers that keep a quantized file's blocks and compute in fp32 with exactly its weights.

A model loaded from a GGUF file is usually dequantized: a Q4_1 weight becomes a float32 number, so
decoding reads 32 bits per weight for values the file holds in 5. ``BlockLinear`` keeps the codes,
scales and minima instead (:class:`Blocks`, from ``evolm/interop/gguf_blocks.py``) and rebuilds
every weight in registers as ``fma(code, scale, min)``, which is bit for bit the float32 value of the
dequantized model (checked for every layer when it is built, see :func:`keep_blocks`). Activations
and sums stay fp32: nothing is rounded that F.linear on the dequantized weights would not round, so
the logits equal the float model's up to the order of fp32 sums (unlike llama.cpp's CPU path,
which quantizes the activations to int8). What changes is the bytes a decoding step reads: for
SmolLM2 (Q4_1, Q8_0 embeddings) 111 MB instead of 540, for Gemma 3 270M 294 MB instead of 1070.

Up to ``KERNEL_ROWS`` rows (decoding) run ``evolm_f::blocks_linear`` (evolm/kernels/block_gemm.cpp);
up to ``GEMM_ROWS`` fp32 rows (a short prompt, a wide batch) run ``evolm_f::blocks_gemm``, a
register-blocked matmul that rebuilds the weights panel by panel in cache instead of writing the
whole float32 weight and reading it back. Longer prompts (and bf16 ones) run
``evolm_f::blocks_dense_linear``: the weight rebuilt into a buffer the thread reuses, then the float
matmul, bit for bit the dense model's product (a fresh tensor per product cost more than the
rebuilding: the OS hands back new pages to fault in). In a bfloat16 model the kernels round each
rebuilt weight to bf16 (to nearest even, as ``.to(bfloat16)`` does), so the layer equals the dense
bf16 model's too.
Inference only.
``load_gguf(path, blocks=True)``, or ``--keep-blocks`` on the CLI, builds a model with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from evolm import kernels
from evolm.quant.walk import keep_dtypes, replace_linears, untied_head

KERNEL_ROWS = 8  # products of at most this many rows run the blocks kernel
# fp32 products of at most this many rows run the blocks gemm. Measured against the rebuilt weight in
# a reused buffer + MKL's matmul (2 threads, a SmolLM2 layer's 4 fused products, 2-core Xeon with
# AVX-512): 9-32 rows the gemm 1.4-2.4x faster, 64 rows even (2.70 vs 3.00 ms), 128 rows 10% slower,
# 512 rows 24% slower (benchmarks/gemm_rows.py). On Zen 4 the gemm led up to 128 rows against a
# *fresh* rebuilt weight per product, which cost more than the reused buffer does now.
GEMM_ROWS = 64


@dataclass
class Blocks:
    """A weight (N, K) as codes and one float32 scale (and minimum) per group of ``group`` inputs:
    ``w[n, k] = fma(code[n, k], scale[n, k // group], min[n, k // group])`` (or ``code * scale``).

    ``codes``: (N, K / 2) uint8, two 4-bit codes a byte (group 32; byte j of a group holds code j
    and code j + 16, as :func:`evolm.kernels.pack_q4`), or (N, K) int8. ``source``: the file's format.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor | None
    group: int
    source: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.scale.shape[1] * self.group

    def map_rows(self, fn) -> "Blocks":
        """The blocks of ``fn(w)`` for a row permutation ``fn`` (applied to codes, scales, minima)."""
        return Blocks(fn(self.codes), fn(self.scale), None if self.min is None else fn(self.min), self.group, self.source)

    def dequantize(self, kernel: bool | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float32 weight (N, K), or ``.to(dtype)`` of it: evolm's kernel where it builds (the code
        blocks_linear multiplies with; bf16 written directly), else in float64 rounded once to
        float32 (an fma's result wherever the product and the sum are exact in float64, i.e. all
        real scales). ``kernel``: force one."""
        if kernel is None:
            kernel = self.codes.device.type == "cpu" and kernels.available()
        if kernel:
            bf16 = dtype == torch.bfloat16
            w = torch.ops.evolm_f.blocks_dequantize(self.codes, self.scale, self.min, self.group, bf16)
            return w if bf16 else w.to(dtype)
        q = kernels.unpack_q4(self.codes) if self.codes.dtype == torch.uint8 else self.codes
        w = q.double() * self.scale.double().repeat_interleave(self.group, 1)
        if self.min is not None:
            w += self.min.double().repeat_interleave(self.group, 1)
        return w.float().to(dtype)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.min) if t is not None)


def cat_blocks(parts: list[Blocks]) -> Blocks | None:
    """Blocks of several weights stacked along the outputs (a fused projection), or None when their
    layouts differ (code width, group, minima)."""
    first = parts[0]
    if any(p.codes.dtype != first.codes.dtype or p.group != first.group or (p.min is None) != (first.min is None)
           or p.shape[1] != first.shape[1] for p in parts):
        return None
    cat = lambda ts: torch.cat(ts).contiguous()  # noqa: E731
    return Blocks(cat([p.codes for p in parts]), cat([p.scale for p in parts]),
                  None if first.min is None else cat([p.min for p in parts]), first.group,
                  "+".join(sorted({p.source for p in parts})))


class BlockLinear(nn.Module):
    """y = x @ W^T + b with W kept as a file's :class:`Blocks`: the dense model's product in x's dtype
    (the float32 weights, or for bf16 inputs those weights rounded to bf16), fp32 accumulation."""

    def __init__(self, blocks: Blocks, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("codes", blocks.codes)
        self.register_buffer("scale", blocks.scale)
        self.register_buffer("min", blocks.min)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.out_features, self.in_features = blocks.shape
        self.group, self.source = blocks.group, blocks.source
        # decided here, never inside a trace: building the kernels there would break it
        self.kernel = blocks.codes.device.type == "cpu" and kernels.available()

    @property
    def blocks(self) -> Blocks:
        return Blocks(self.codes, self.scale, self.min, self.group, self.source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        kernel = self.kernel and x.device.type == "cpu" and not torch.is_grad_enabled()
        if kernel and x2.shape[0] <= KERNEL_ROWS and x.dtype in (torch.float32, torch.bfloat16):
            y = torch.ops.evolm_f.blocks_linear(x2, self.codes, self.scale, self.min, self.group)
        elif kernel and x2.shape[0] <= GEMM_ROWS and x.dtype == torch.float32:  # a short prompt
            y = torch.ops.evolm_f.blocks_gemm(x2, self.codes, self.scale, self.min, self.group)
        elif kernel and x.dtype in (torch.float32, torch.bfloat16):  # a prompt: rebuilt into a reused buffer
            y = torch.ops.evolm_f.blocks_dense_linear(x2, self.codes, self.scale, self.min, self.group)
        else:  # the dense model's product: its weights in x's dtype
            y = F.linear(x2, self.blocks.dequantize(dtype=x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        bits = 4 if self.codes.dtype == torch.uint8 else 8
        return (f"in={self.in_features}, out={self.out_features}, {self.source} blocks: {bits}-bit codes, "
                f"group {self.group}{', min' if self.min is not None else ''}")


class BlockEmbedding(nn.Module):
    """The token embedding kept as a file's :class:`Blocks`: a lookup rebuilds only the rows of the
    tokens it is given, in the model's dtype, bit for bit the rows of the dequantized table (the
    blocks are checked to rebuild it, :func:`keep_blocks`). Loading a GGUF file then never makes the
    float table: Gemma 3 270M's is 262,144 x 640 float32 (671 MB, ~0.3 s to write at every load),
    SmolLM2's 113 MB. With a tied head the blocks are the head's (:class:`BlockLinear`), shared.

    ``weight`` is the whole float table, made on each access: for the rare callers that need the
    matrix itself; ``dtype`` and ``device`` say what a lookup returns without making it."""

    fixed_dtype = ("codes", "scale", "min")  # model.to(bfloat16) changes what a lookup returns, not the blocks

    def __init__(self, blocks: Blocks, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("codes", blocks.codes)
        self.register_buffer("scale", blocks.scale)
        self.register_buffer("min", blocks.min)
        self.num_embeddings, self.embedding_dim = blocks.shape
        self.group, self.source, self.dtype = blocks.group, blocks.source, dtype

    @property
    def blocks(self) -> Blocks:
        return Blocks(self.codes, self.scale, self.min, self.group, self.source)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def weight(self) -> torch.Tensor:
        return self.blocks.dequantize(dtype=self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.blocks.map_rows(lambda t: t.index_select(0, flat)).dequantize(dtype=self.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def _apply(self, fn, recurse: bool = True):
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # a float dtype given to .to() is the lookup's
        return keep_dtypes(self, super()._apply, fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.source} blocks, lookups in {self.dtype}"


def rebuilds(blocks: Blocks, weight: torch.Tensor) -> bool:
    """Whether ``blocks`` rebuild ``weight`` (float32) bit for bit: the condition to keep them."""
    return blocks.shape == tuple(weight.shape) and torch.equal(blocks.dequantize(), weight.float())


def keep_blocks(model: nn.Module, blocks: dict[str, Blocks], dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Replace the linear layers named in ``blocks`` ({``"layers.0.mlp.up_proj.weight"``: blocks that
    :func:`rebuilds` its float32 weight}) by :class:`BlockLinear`, in place.

    ``"embed_tokens.weight"`` becomes a :class:`BlockEmbedding` whose lookups are in ``dtype`` (the
    model's) and, for a model whose head is tied to the embedding, also a separate ``lm_head`` with
    the same blocks. Returns {parameter name: what was done} ("kept Q4_1", or "float: " and why not).
    """
    done = {}

    def make(name: str, lin: nn.Linear) -> BlockLinear | None:
        b = blocks.get(f"{name}.weight")
        if b is None or tuple(lin.weight.shape) != b.shape:
            return None
        done[f"{name}.weight"] = f"kept {b.source}"
        return BlockLinear(b, lin.bias)

    replace_linears(model, make)
    embed = blocks.get("embed_tokens.weight")
    if embed is not None and tuple(model.embed_tokens.weight.shape) == embed.shape:
        tied = untied_head(model, lambda w: BlockLinear(embed))
        model.embed_tokens = BlockEmbedding(embed, dtype)
        done["embed_tokens.weight"] = f"kept {embed.source}" + (" (and as the tied head)" if tied else "")
    return {name: done.get(name, f"float: not a linear layer of shape {b.shape}") for name, b in blocks.items()
            if name in done or name != "embed_tokens.weight"}
