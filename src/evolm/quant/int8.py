"""Weight-only int8 quantization for fast decoding.

Decoding one token reads every weight once and does two FLOPs per weight: it is bound by memory
bandwidth, not arithmetic. Storing linear weights as int8 with one scale per output row
(symmetric, per-channel; as in LLM.int8 without outliers, Dettmers et al. 2022,
arXiv:2208.07339, and gpt-fast's int8 path) reads a quarter of the bytes of fp32, so decoding
runs up to ~4x faster, at a typical cost of ~1e-3 relative error on the logits.

``quantize_int8(model)`` swaps every ``nn.Linear`` (and a tied LM head) for ``Int8Linear``, in
place, for inference. One decoding row (the bandwidth-bound case) runs, on AVX-512 CPUs, a
``torch.compile``-d multiply-reduce that streams the int8 weights once (measured ~10 G weights/s
on one core, 5x an fp32 GEMV); several rows, and one row on AVX2-only CPUs
(:meth:`KernelPolicy.int8_row_kernel`), use PyTorch's ``_weight_int8pack_mm`` kernel with bf16
activations; elsewhere a dequantize-then-matmul fallback.

Where evolm's own CPU kernels build (``evolm/kernels``, x86-64 with a C++ compiler), products of
up to ``KERNEL_ROWS`` rows (decoding) quantize the activations to int8 in blocks of 32 and take
integer dot products with the int8 weights (llama.cpp's Q8 scheme, AVX512-VNNI or AVX2). Each
layer takes its kernel choices from the :class:`~evolm.quant.policy.KernelPolicy` it is built
with (``quant_kernels``: by default on wherever evolm's kernels build; measured end to end,
SmolLM2 fused, compiled, 2 threads, ``benchmarks/decode.py --kernels-ab``: on AVX2-only hosts
PyTorch's int8 CPU path is slow (28 tok/s compiled against llama.cpp's 65); on the AVX-512 host,
two runs of the current kernels: 128.0 / 119.9 tok/s against PyTorch's 96.5 / 91.7).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from evolm import kernels
from evolm.quant.policy import DEFAULT_POLICY, KernelPolicy
from evolm.quant.walk import keep_dtypes, replace_linears, skipped, untied_head

_HAS_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")

# evolm's int8-activation kernels (evolm/kernels): used for products of at most KERNEL_ROWS rows
KERNEL_ROWS = 8


def _gemv_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x[:, None, :] * q.to(x.dtype)[None]).sum(-1) * scale


@functools.cache
def _compiled_gemv():
    try:
        return torch.compile(_gemv_int8, dynamic=False)
    except Exception:  # pragma: no cover - no compiler available
        return _gemv_int8


def _gemv(x, q, scale):
    return _compiled_gemv()(x, q, scale)


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + b with q int8 (out, in) and scale (out,)."""

    # buffers a kernel reads in one dtype: ``model.to(dtype)`` moves them but keeps their dtype
    fixed_dtype = ("scale_bf16", "scale_f32")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, policy: KernelPolicy = DEFAULT_POLICY):
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        self._store(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.to(weight.dtype), bias,
                    policy)

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                   policy: KernelPolicy = DEFAULT_POLICY) -> "Int8Linear":
        """The layer of given codes (N, K) int8 and row scales (N,): a saved quantized model's layer,
        rebuilt with exactly its numbers (``__init__`` would quantize a float weight again). The codes
        are copied: a tensor read from a file may sit at an offset torch's int8pack kernel cannot
        take (it crashed on one)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._store(q.to(torch.int8, copy=True), scale.clone(), bias, policy)
        return layer

    def _store(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, policy: KernelPolicy) -> None:
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        # the kernel's scale, kept as a buffer: inductor's lowering of _weight_int8pack_mm needs a
        # stored tensor there, not one computed in the graph
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        # every kernel choice is decided here, from the policy: never build the kernels inside a trace
        self.kernel = policy.uses_quant_kernels(self.in_features, q.device)
        if self.kernel:
            self.register_buffer("scale_f32", scale.float())
        # a few rows (decoding) stream the int8 weights through evolm's skinny kernel, exact
        # weight-only arithmetic
        self.skinny = policy.uses_skinny(q.device.type)
        self.row_kernel = policy.int8_row_kernel()
        self.dequant_rows, self.dequant_low_precision = policy.int8_dequant_rows, policy.int8_dequant_low_precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        rows, cpu = x2.shape[0], x.device.type == "cpu"
        if self.kernel and cpu and rows <= KERNEL_ROWS and not torch.is_grad_enabled():
            y = torch.ops.evolm_q.q8a8_linear(x2, self.weight, self.scale_f32).to(x.dtype)
        elif self.skinny and cpu and rows <= kernels.SKINNY_ROWS and not torch.is_grad_enabled():
            y = torch.ops.evolm_f.skinny_linear(x2, self.weight, self.scale.float())
        elif cpu and rows == 1 and not torch.is_grad_enabled() and self.row_kernel == "reduce":
            y = _gemv(x2.float(), self.weight, self.scale.float()).to(x.dtype)
        elif _HAS_KERNEL and cpu and not self._dequantizes(rows, x.dtype):
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scale_bf16).to(x.dtype)
        elif x.dtype != torch.float32:
            # scale folded into the weights: one rounding of q * scale (exact before it), as the
            # float model's weights have, instead of a second one of the output
            y = F.linear(x2, self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The float weight (N, K) this layer multiplies by (for the fused loss, tests, error reports)."""
        return self.weight.float() * self.scale.float()[:, None]

    def _apply(self, fn, recurse=True):
        return keep_dtypes(self, super()._apply, fn, recurse)

    def _dequantizes(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether many rows (a prompt) skip int8pack for the dequantized weights' matmul: with the
        ``"int8pack"`` row kernel (AVX2-only CPUs, bf16 emulated) always, else in a bf16 / fp16
        model (``int8_dequant_low_precision``: int8pack's many-row path runs at about the fp32 rate)."""
        low = self.dequant_low_precision and dtype != torch.float32
        return rows >= self.dequant_rows and (self.row_kernel != "reduce" or low)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


@torch.no_grad()
def quantize_int8(model: nn.Module, skip: tuple[str, ...] = (), policy: KernelPolicy = DEFAULT_POLICY) -> nn.Module:
    """Replace linear layers (those whose name contains none of ``skip``) by int8 weight-only ones,
    in place, and a tied LM head by a quantized copy; returns the model.

    MoE experts stored as 3-D tensors and the routers stay in float: routing decisions are
    sensitive, and the experts are read sparsely anyway.
    """
    replace_linears(model, lambda name, lin: None if skipped(name, skip) else Int8Linear(lin.weight, lin.bias, policy))
    untied_head(model, lambda w: Int8Linear(w, None, policy))
    return model
