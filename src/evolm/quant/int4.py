"""Weight-only int4 quantization: 4-bit codes with one (scale, minimum) per group of inputs.

``quantize_int4(model, group_size=32)`` goes to 4 bits: asymmetric, one (scale, minimum) pair per
group of ``group_size`` input weights, ``w = q * scale + min`` with q in 0..15 -- the scheme of
llama.cpp's Q4_1 and of the group-wise 4-bit GPTQ/AWQ layouts (Frantar et al. 2022,
arXiv:2210.17323; Lin et al. 2023, arXiv:2306.00978), here quantized by round-to-nearest. It reads
an eighth of fp32's bytes. The matmul is PyTorch's ``_weight_int4pack_mm_for_cpu``, which unpacks
and dequantizes in registers. A model loaded from a Q4_1 GGUF file is requantized *exactly* with
``group_size=32`` (every block of the file is already of that form), so on such a model the int4
path changes the weights only by the bf16 rounding of the scales and minima.

Where evolm's own CPU kernels build and the policy allows them (``KernelPolicy.quant_kernels``),
products of up to ``KERNEL_ROWS`` rows (decoding) quantize the activations to int8 in blocks of 32
and take integer dot products with the int4 weights (llama.cpp's Q4_1 x Q8 scheme, AVX512-VNNI or
AVX2); the weights are then stored in that kernel's layout with float16 scales and minima, as in
a Q4_1 file (whose blocks are kept exactly), and more rows (prefill) dequantize them and use the
float matmul. Measured end to end (SmolLM2 fused, compiled, 2 threads, AVX-512 host, two runs):
111.7 / 123.8 tok/s against PyTorch's 117.0 / 117.1; on AVX2-only hosts PyTorch's path is slow.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from evolm import kernels
from evolm.quant.int8 import KERNEL_ROWS, Int8Linear
from evolm.quant.policy import DEFAULT_POLICY, KernelPolicy
from evolm.quant.walk import keep_dtypes, replace_linears, skipped, untied_head

_HAS_INT4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int4_supported(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether PyTorch's CPU int4 kernel takes this shape (N a multiple of 16, K of the group)."""
    return _HAS_INT4 and out_features % 16 == 0 and in_features % group_size == 0


def quantize_groups(weight: torch.Tensor, group_size: int, stored: torch.dtype = torch.float32,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit codes of (N, K) ``weight``, one (scale, min) per ``group_size`` inputs:
    q (N, K) int32 in 0..15, scale and min (N, K / group_size) float32, ``w ~ q * scale + min``.

    ``stored``: the dtype scale and min are kept in. They are rounded to it first and the codes
    chosen for the rounded values, so the rounding costs no more than one code step."""
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // group_size, group_size)
    scale, lo = group_params(w, stored)
    return round_to_grid(w, scale[..., None], lo[..., None]).reshape(N, K), scale, lo


def group_params(w: torch.Tensor, stored: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, min) of the 4-bit grid over the last dimension of ``w`` (a group of weights): the
    group's range in 15 steps, each rounded to ``stored`` (the dtype the layer keeps them in).
    GPTQ (``evolm/quant/gptq.py``) puts its grid here too, so both methods write the same format."""
    lo, hi = w.amin(-1), w.amax(-1)
    lo = lo.to(stored).to(w.dtype)
    return ((hi - lo) / 15).to(stored).to(w.dtype), lo


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The nearest of the 16 codes ``q * scale + lo`` to each weight (int32 in 0..15); ``scale`` and
    ``lo`` broadcast against ``w``."""
    # a group whose scale rounds to 0 spans less than 1e-6: divided by 1 its offsets round to code 0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round((w - lo) / safe).clamp(0, 15).to(torch.int32)


class Int4Linear(nn.Module):
    """y = x @ W^T + b with W stored as 4-bit codes, one (scale, min) per ``group_size`` inputs.

    Two storage layouts, chosen when the layer is built:

    - ``"q4"`` (evolm's kernels available, ``group_size == 32``): ``weight`` (N, K/2) uint8 in the
      kernel's nibble order (:func:`evolm.kernels.pack_q4`) and ``dm`` (N, K/32, 2) float16, the
      scale and min of each group side by side, ``w = q * d + m``: llama.cpp's Q4_1, 5 bits per
      weight (float32 scales were 6: decoding streams every weight, so bytes are time). Up to
      ``KERNEL_ROWS`` rows run the int8-activation kernel; more rows dequantize (in C++) and use
      the float matmul.
    - ``"int4pack"``: ``weight`` packed by ``_convert_weight_to_int4pack_for_cpu`` (N, K/2) uint8 and
      ``scales_and_zeros`` (K/group, N, 2) bfloat16 for PyTorch's ``_weight_int4pack_mm_for_cpu``,
      which computes ``(q - 8) * scale + zero`` (so ``zero = min + 8 * scale``). It always runs with
      bf16 activations (fp32 activations take a scalar reference path, measured ~25x slower).

    The output is cast back to the input's dtype.
    """

    # buffers a kernel reads in one dtype: ``model.to(dtype)`` moves them but keeps their dtype
    fixed_dtype = ("dm", "scales_and_zeros")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = 32,
                 policy: KernelPolicy = DEFAULT_POLICY):
        super().__init__()
        N, K = weight.shape
        layout = self._layout(N, K, group_size, bool(weight.detach().abs().amax() < 6e4), policy, weight.device)
        q, scale, lo = quantize_groups(weight, group_size, torch.float16 if layout == "q4" else torch.float32)
        self._store(q, scale, lo, bias, group_size, layout)

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bias: torch.Tensor | None = None,
                   policy: KernelPolicy = DEFAULT_POLICY) -> "Int4Linear":
        """The layer of given codes (N, K) in 0..15 and (scale, min) (N, K / group): a saved quantized
        model's layer, or GPTQ's, whose grid is not the one round-to-nearest would choose."""
        N, K = q.shape
        group = K // scale.shape[1]
        fits_half = bool(max(scale.abs().max(), lo.abs().max()) < 6e4)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._store(q.to(torch.int32), scale.float(), lo.float(), bias, group,
                     cls._layout(N, K, group, fits_half, policy, q.device))
        return layer

    @staticmethod
    def _layout(N: int, K: int, group_size: int, fits_half: bool, policy: KernelPolicy, device) -> str:
        if not int4_supported(N, K, group_size):
            raise ValueError(f"Int4Linear: weight {N}x{K} needs out_features % 16 == 0 and in_features % "
                             f"group_size ({group_size}) == 0 for torch's int4 CPU kernel")
        kernel = group_size == 32 and fits_half and policy.uses_quant_kernels(K, device)  # (d, m) in float16
        return "q4" if kernel else "int4pack"

    def _store(self, q, scale, lo, bias, group_size: int, layout: str) -> None:
        N, K = q.shape
        self.layout = layout
        if self.layout == "q4":
            self.register_buffer("weight", kernels.pack_q4(q))
            self.register_buffer("dm", kernels.pack_q4_scales(scale, lo))
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.cpu(), 8).to(q.device)
            self.register_buffer("weight", packed)
            sz = torch.stack((scale, lo + 8 * scale), -1).transpose(0, 1).contiguous()  # (K/group, N, 2)
            self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features, self.group_size = K, N, group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.layout == "q4":
            if x2.shape[0] <= KERNEL_ROWS and not torch.is_grad_enabled():
                y = torch.ops.evolm_q.q4a8_linear(x2, self.weight, self.dm).to(x.dtype)
            else:
                y = F.linear(x2, self.dequantize().to(x.dtype))
        else:
            sz = self.scales_and_zeros
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(sz.dtype), self.weight, self.group_size, sz).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The float weight (N, K) this layer multiplies by (for tests, error reports and prefill)."""
        if self.layout == "q4":
            return torch.ops.evolm_q.q4_dequantize(self.weight, self.dm)  # the layout implies the kernels
        eye = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype, device=self.weight.device)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size,
                                                          self.scales_and_zeros).t()

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes (N, K) uint8 in 0..15, scale, min (N, K / group)) with ``w = q * scale + min``: the
        layer's numbers in a form that does not depend on its layout (for saving)."""
        if self.layout == "q4":
            dm = self.dm
            return kernels.unpack_q4(self.weight), dm[..., 0], dm[..., 1]
        sz = self.scales_and_zeros.transpose(0, 1)  # (N, K/group, 2): scale, zero = min + 8 * scale
        scale = sz[..., 0]
        # torch's packing is opaque: the kernel itself reads the codes back, with scale 1 and zero 8
        unit = torch.stack((torch.ones_like(self.scales_and_zeros[..., 0]),
                            torch.full_like(self.scales_and_zeros[..., 0], 8)), -1)
        eye = torch.eye(self.in_features, dtype=unit.dtype, device=self.weight.device)
        q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size, unit).t()
        return q.round().to(torch.uint8), scale, sz[..., 1].float() - 8 * scale.float()

    def _apply(self, fn, recurse=True):
        return keep_dtypes(self, super()._apply, fn, recurse)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 group={self.group_size}, {self.layout}"


@torch.no_grad()
def quantize_int4(model: nn.Module, group_size: int = 32, head: str = "int8",
                  skip: tuple[str, ...] = (), policy: KernelPolicy = DEFAULT_POLICY) -> nn.Module:
    """Replace linear layers by 4-bit group-wise weight-only ones (in place, CPU); returns the model.

    ``head`` chooses the tied/untied LM head's format: ``"int8"`` (default: per-row int8, about
    llama.cpp's choice of Q8_0 for SmolLM2's tied embedding), ``"int4"``, or ``"float"``. Layers
    whose shape the kernel does not take (see :func:`int4_supported`) become int8 instead; MoE
    experts stored as 3-D tensors and routers stay in float; layers whose name contains one of
    ``skip`` too.
    """
    if head not in ("int8", "int4", "float"):
        raise ValueError(f"quantize_int4: head must be 'int8', 'int4' or 'float', got {head!r}")
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("quantize_int4: torch's int4 kernel used here runs on CPU; move the model to CPU first")

    def convert(weight, bias, fmt):
        if fmt == "float":
            return None
        if fmt == "int4" and int4_supported(weight.shape[0], weight.shape[1], group_size):
            return Int4Linear(weight, bias, group_size, policy)
        return Int8Linear(weight, bias, policy)

    replace_linears(model, lambda name, lin: None if skipped(name, skip) else
                    convert(lin.weight, lin.bias, head if name == "lm_head" else "int4"))
    untied_head(model, lambda w: convert(w, None, head))
    return model
