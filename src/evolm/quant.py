"""Weight-only int8 and int4 quantization for fast decoding.

Decoding one token reads every weight once and does two FLOPs per weight: it is bound by memory
bandwidth, not arithmetic. Storing linear weights as int8 with one scale per output row
(symmetric, per-channel; as in LLM.int8 without outliers, Dettmers et al. 2022,
arXiv:2208.07339, and gpt-fast's int8 path) reads a quarter of the bytes of fp32, so decoding
runs up to ~4x faster, at a typical cost of ~1e-3 relative error on the logits.

``quantize_int8(model)`` swaps every ``nn.Linear`` (and a tied LM head) for ``Int8Linear``, in
place, for inference. One decoding row (the bandwidth-bound case) runs, on AVX-512 CPUs, a
``torch.compile``-d multiply-reduce that streams the int8 weights once (measured ~10 G weights/s
on one core, 5x an fp32 GEMV); several rows, and one row on AVX2-only CPUs (``ROW_KERNEL``), use
PyTorch's ``_weight_int8pack_mm`` kernel with bf16 activations; elsewhere a dequantize-then-matmul
fallback.

``quantize_int4(model, group_size=32)`` goes to 4 bits: asymmetric, one (scale, minimum) pair per
group of ``group_size`` input weights, ``w = q * scale + min`` with q in 0..15 -- the scheme of
llama.cpp's Q4_1 and of the group-wise 4-bit GPTQ/AWQ layouts (Frantar et al. 2022,
arXiv:2210.17323; Lin et al. 2023, arXiv:2306.00978), here quantized by round-to-nearest. It reads
an eighth of fp32's bytes. The matmul is PyTorch's ``_weight_int4pack_mm_for_cpu``, which unpacks
and dequantizes in registers. A model loaded from a Q4_1 GGUF file is requantized *exactly* with
``group_size=32`` (every block of the file is already of that form), so on such a model the int4
path changes the weights only by the bf16 rounding of the scales and minima.

Where evolm's own CPU kernels build (``evolm/kernels``, x86-64 with a C++ compiler), products of
up to ``KERNEL_ROWS`` rows (decoding) quantize the activations to int8 in blocks of 32 and take
integer dot products with the int4 / int8 weights (llama.cpp's Q4_1 x Q8 scheme, AVX512-VNNI or
AVX2); int4 weights are then stored in that kernel's layout with float16 scales and minima, as
in a Q4_1 file (whose blocks are kept exactly), and more rows (prefill) dequantize them and use
the float matmul.
``USE_KERNELS`` (set before quantizing; by default on wherever evolm's kernels build, see
``_default_use_kernels``) chooses.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from evolm import kernels

_HAS_KERNEL = hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _default_row_kernel() -> str:
    """The faster one-row int8 product on this CPU, as measured (docs/performance.md).

    The compiled multiply-reduce streams ~10 G weights/s per core where inductor vectorises the
    int8 -> float conversion (AVX-512 hosts), but only 0.6 on an AVX2-only host, where
    ``_weight_int8pack_mm`` with bf16 activations streams 3.2 (fp32 weights: 1.9). There, bf16 is
    emulated, so 32 rows and more (prefill) dequantize and use the fp32 matmul instead (1536 x 576,
    one thread: 64 rows 29.6 ms vs 54.7 for int8pack, 256 rows 162 vs 235).
    """
    return "reduce" if kernels.cpu_has_avx512() or not _HAS_KERNEL else "int8pack"


# "reduce" or "int8pack": set it to compare the two on a new machine. With "int8pack" (AVX2-only
# CPUs, bf16 emulated) products of DEQUANT_ROWS rows or more dequantize and use the fp32 matmul.
ROW_KERNEL = _default_row_kernel()
DEQUANT_ROWS = 32
# Many rows (a prompt) of a bf16 / fp16 model: dequantize the int8 weights and use the model
# dtype's matmul rather than _weight_int8pack_mm, whose many-row path runs at about the fp32 rate.
DEQUANT_LOW_PRECISION = True

def _default_use_kernels() -> bool:
    """evolm's int8-activation kernels by default wherever they build. Measured end to end
    (SmolLM2 fused, compiled, 2 threads, `benchmarks/decode.py --kernels-ab`): on AVX2-only hosts
    PyTorch's int8 / int4 CPU paths are slow (int8 compiled 28 tok/s against llama.cpp's 65); on
    the AVX-512 host, two runs of the current kernels: int8 128.0 / 119.9 tok/s against PyTorch's
    96.5 / 91.7, int4 111.7 / 123.8 against 117.0 / 117.1 (an earlier version of the kernels was
    level with PyTorch's there). ``EVOLM_KERNELS=1`` / ``0`` forces the choice."""
    return kernels.env_choice() is not False


# evolm's int8-activation kernels (evolm/kernels): used for products of at most KERNEL_ROWS rows
USE_KERNELS = _default_use_kernels()
KERNEL_ROWS = 8


def _kernels_for(in_features: int, device: torch.device) -> bool:
    return USE_KERNELS and device.type == "cpu" and in_features % 32 == 0 and kernels.available()


def _gemv_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x[:, None, :] * q.to(x.dtype)[None]).sum(-1) * scale


_compiled_gemv = None


def _gemv(x, q, scale):
    global _compiled_gemv
    if _compiled_gemv is None:
        try:
            _compiled_gemv = torch.compile(_gemv_int8, dynamic=False)
        except Exception:  # pragma: no cover - no compiler available
            _compiled_gemv = _gemv_int8
    return _compiled_gemv(x, q, scale)


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + b with q int8 (out, in) and scale (out,)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(weight.dtype))
        # the kernel's scale, kept as a buffer: inductor's lowering of _weight_int8pack_mm needs a
        # stored tensor there, not one computed in the graph
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.kernel = _kernels_for(self.in_features, weight.device)
        if self.kernel:
            self.register_buffer("scale_f32", scale.float())
        # a few rows (decoding) stream the int8 weights through evolm's skinny kernel, exact
        # weight-only arithmetic (decided here: never build the kernels inside a trace)
        self.skinny = weight.device.type == "cpu" and kernels.skinny_enabled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        rows, cpu = x2.shape[0], x.device.type == "cpu"
        if self.kernel and cpu and rows <= KERNEL_ROWS and not torch.is_grad_enabled():
            y = torch.ops.evolm_q.q8a8_linear(x2, self.weight, self.scale_f32).to(x.dtype)
        elif self.skinny and cpu and rows <= kernels.SKINNY_ROWS and not torch.is_grad_enabled():
            y = torch.ops.evolm_f.skinny_linear(x2, self.weight, self.scale.float())
        elif cpu and rows == 1 and not torch.is_grad_enabled() and ROW_KERNEL == "reduce":
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

    @staticmethod
    def _dequantizes(rows: int, dtype: torch.dtype) -> bool:
        """Whether many rows (a prompt) skip int8pack for the dequantized weights' matmul: with
        ``ROW_KERNEL == "int8pack"`` always, else in a bf16 / fp16 model (DEQUANT_LOW_PRECISION)."""
        low = DEQUANT_LOW_PRECISION and dtype != torch.float32
        return rows >= DEQUANT_ROWS and (ROW_KERNEL != "reduce" or low)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


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
    lo, hi = w.amin(-1), w.amax(-1)
    lo = lo.to(stored).float()
    scale = ((hi - lo) / 15).to(stored).float()
    # a group whose scale rounds to 0 spans less than 1e-6: divided by 1 its offsets round to code 0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((w - lo[..., None]) / safe[..., None]).clamp(0, 15).to(torch.int32).reshape(N, K)
    return q, scale, lo


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

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = 32):
        super().__init__()
        N, K = weight.shape
        if not int4_supported(N, K, group_size):
            raise ValueError(f"Int4Linear: weight {N}x{K} needs out_features % 16 == 0 and in_features % "
                             f"group_size ({group_size}) == 0 for torch's int4 CPU kernel")
        fits_half = bool(weight.detach().abs().amax() < 6e4)  # (d, m) in float16
        self.layout = "q4" if group_size == 32 and fits_half and _kernels_for(K, weight.device) else "int4pack"
        q, scale, lo = quantize_groups(weight, group_size, torch.float16 if self.layout == "q4" else torch.float32)
        if self.layout == "q4":
            self.register_buffer("weight", kernels.pack_q4(q))
            self.register_buffer("dm", kernels.pack_q4_scales(scale, lo))
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.cpu(), 8).to(weight.device)
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

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 group={self.group_size}, {self.layout}"


@torch.no_grad()
def quantize_int4(model: nn.Module, group_size: int = 32, head: str = "int8",
                  skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace linear layers by 4-bit group-wise weight-only ones (in place, CPU); returns the model.

    ``head`` chooses the tied/untied LM head's format: ``"int8"`` (default: per-row int8, about
    llama.cpp's choice of Q8_0 for SmolLM2's tied embedding), ``"int4"``, or ``"float"``. Layers
    whose shape the kernel does not take (see :func:`int4_supported`) become int8 instead; MoE
    experts stored as 3-D tensors and routers stay in float.
    """
    if head not in ("int8", "int4", "float"):
        raise ValueError(f"quantize_int4: head must be 'int8', 'int4' or 'float', got {head!r}")
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("quantize_int4: torch's int4 kernel used here runs on CPU; move the model to CPU first")

    def convert(lin_weight, bias, fmt):
        if fmt == "float":
            return None
        if fmt == "int4" and int4_supported(lin_weight.shape[0], lin_weight.shape[1], group_size):
            return Int4Linear(lin_weight, bias, group_size)
        return Int8Linear(lin_weight, bias)

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not any(s in full for s in skip):
                new = convert(child.weight, child.bias, head if full == "lm_head" else "int4")
                if new is not None:
                    setattr(module, child_name, new)
    if getattr(model, "lm_head", "absent") is None and hasattr(model, "embed_tokens") and head != "float":
        model.lm_head = convert(model.embed_tokens.weight, None, head)  # a quantized copy of the tied head
    return model


@torch.no_grad()
def quantize_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace linear layers by int8 weight-only ones (in place); returns the model.

    MoE experts stored as 3-D tensors and the routers stay in float: routing decisions are
    sensitive, and the experts are read sparsely anyway.
    """
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not any(s in full for s in skip):
                setattr(module, child_name, Int8Linear(child.weight, child.bias))
    if getattr(model, "lm_head", "absent") is None and hasattr(model, "embed_tokens"):
        model.lm_head = Int8Linear(model.embed_tokens.weight, None)  # a quantized copy of the tied head
    return model
