"""4-bit NormalFloat (NF4) weights for QLoRA: a frozen base in a quarter of the bf16 bytes.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314)
fine-tunes LoRA adapters on top of a base model stored in 4 bits. Its data type, NormalFloat-4,
puts the 16 code values at quantiles of N(0, 1) — pretrained weights are roughly normal, so each
code is used about equally often — scaled to [-1, 1], with an exact zero:

- 8 quantiles for the positive half and 7 for the negative half, at probabilities evenly spaced
  from ``delta = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 = 0.9677083`` down to 1/2 (so the extreme
  code sits inside the distribution rather than at infinity), merged with 0 and divided by the
  largest magnitude (paper, section 3 and appendix E). ``nf4_code()`` derives the table that way;
  a test checks it against the table published with the paper, bit for bit.
- Blockwise absmax scaling: each run of ``block_size = 64`` consecutive weights (row-major) is
  divided by its largest magnitude, then rounded to the nearest code (ties to the lower one);
  two codes are packed per byte, first one in the high nibble. One float32 constant per block:
  4 + 32/64 = 4.5 bits per weight.
- Double quantization (optional, ``double_quant=True``): the per-block constants are themselves
  quantized to 8 bits — minus their mean, in blocks of 256, with the signed "dynamic" 8-bit code
  of Dettmers 2015 (arXiv:1511.04561) — for 4 + 8/64 + 32/(64*256) = 4.127 bits per weight. It
  saves ~0.37 bit per weight (~46 MB on a 1B model) at a small extra error in the scales.

The layout (packing order, rounding, float32 constants, the double-quantization scheme) is the
one ``bitsandbytes.functional.quantize_4bit(quant_type="nf4")`` uses, and tests/test_qlora.py checks
the packed bytes and the dequantized values against bitsandbytes itself when it is installed.

``NF4Linear`` is the frozen base layer: it stores packed codes and constants (buffers, no
parameters) and in forward dequantizes to its compute dtype (bf16 by default) and multiplies. Its
backward re-dequantizes instead of saving the dequantized matrix, so a training step holds at
most one layer's bf16 weight at a time — that is where the memory goes down.
``quantize_base_nf4(model)`` swaps the base linears of a model (also those inside
``LoRALinear.base``), so ``apply_lora`` and ``quantize_base_nf4`` in either order give a QLoRA model.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from evolm.quant.walk import replace_linears

BLOCK_SIZE = 64  # QLoRA's block size for the weights
DQ_BLOCK_SIZE = 256  # and for the quantized constants
NF4_OFFSET = 0.9677083  # the paper's delta: mean of 1 - 1/(2*15) and 1 - 1/(2*16)


# =========================================================================================
# code tables
# =========================================================================================
@functools.cache
def nf4_code() -> torch.Tensor:
    """The 16 NF4 values, ascending, from N(0, 1) quantiles (float32, exactly the published table).

    Probabilities are spaced in float32 (as the paper's reference code does), quantiles are taken
    in float64, and the merged table is rounded to float32 before normalising by its maximum.
    """
    pos = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float32)[:-1]  # 8 positive quantiles
    neg = torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float32)[:-1]  # 7 negative ones
    q = torch.cat([torch.special.ndtri(pos.double()), torch.zeros(1, dtype=torch.float64),
                   -torch.special.ndtri(neg.double())]).float()
    q = q.sort().values
    return q / q.abs().max()


@functools.cache
def dynamic_code() -> torch.Tensor:
    """The signed 8-bit "dynamic tree" code (Dettmers 2015) used for the double-quantized constants.

    For each decimal exponent e = -6 .. 0: 2^(e+6) values ``+-10^e * m``, ``m`` the midpoints of
    an even split of [0.1, 1] (more fraction bits as the exponent grows), plus 0 and 1: 256 values.
    """
    vals = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2 ** i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (i - 6)) * mids
        vals += [scaled, -scaled]
    return torch.cat(vals).sort().values


@functools.cache
def _midpoints(kind: str) -> torch.Tensor:
    code = nf4_code() if kind == "nf4" else dynamic_code()
    return (code[:-1] + code[1:]) / 2


@functools.cache
def _byte_table() -> torch.Tensor:
    """(256, 2): the two NF4 values a packed byte stands for (high nibble first)."""
    code = nf4_code()
    b = torch.arange(256)
    return torch.stack((code[b >> 4], code[b & 15]), dim=1)


# =========================================================================================
# blockwise quantization
# =========================================================================================
def _blockwise_scale(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (flat float32) -> (x / absmax of its block clamped to [-1, 1], absmax per block).

    Full blocks multiply by the reciprocal, a trailing partial block divides (the reference's
    arithmetic, kept so the rounding of every value matches it).
    """
    n = x.numel()
    full = n - n % block
    amax = x[:full].view(-1, block).abs().amax(dim=1)
    scaled = (x[:full].view(-1, block) * (1.0 / amax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = x[full:].abs().max()
        scaled = torch.cat([scaled, (x[full:] / tail_max.clamp(min=1e-38)).clamp(-1, 1)])
        amax = torch.cat([amax, tail_max.view(1)])
    return scaled, amax


def _expand_blocks(values: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """values (flat) * the scale of each value's block."""
    n = values.numel()
    full = n - n % block
    out = (values[:full].view(-1, block) * scale[: full // block].unsqueeze(1)).reshape(-1)
    if full < n:
        out = torch.cat([out, values[full:] * scale[-1]])
    return out


def quantize_nf4(weight: torch.Tensor, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Any float tensor -> (packed uint8 codes, ceil(n/2) bytes; float32 absmax per block).

    Values are taken row-major; a block may span rows when a row is not a multiple of the block.
    """
    if not weight.is_floating_point():
        raise TypeError(f"quantize_nf4: expected a floating-point tensor, got {weight.dtype}")
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"quantize_nf4: block_size must be a positive even number, got {block_size}")
    x = weight.detach().reshape(-1).float()
    scaled, absmax = _blockwise_scale(x, block_size)
    idx = torch.bucketize(scaled, _midpoints("nf4").to(x.device)).to(torch.uint8)  # nearest; ties -> lower
    if idx.numel() % 2:
        idx = torch.cat([idx, torch.full((1,), 7, dtype=torch.uint8, device=idx.device)])  # 7 = the zero code
    return (idx[0::2] << 4) | idx[1::2], absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...] | torch.Size,
                   dtype: torch.dtype = torch.float32, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Inverse of ``quantize_nf4``: code value * block absmax in float32, then cast to ``dtype``."""
    n = 1
    for s in shape:
        n *= s
    values = _byte_table().to(packed.device)[packed.reshape(-1).int()].reshape(-1)[:n]
    return _expand_blocks(values, absmax.float(), block_size).view(shape).to(dtype)


def quantize_absmax(absmax: torch.Tensor, block_size: int = DQ_BLOCK_SIZE):
    """Double quantization: float32 constants -> (uint8 codes, float32 scale per block, float32 mean)."""
    offset = absmax.mean()
    scaled, scale = _blockwise_scale(absmax.float() - offset, block_size)
    codes = torch.bucketize(scaled, _midpoints("dynamic").to(absmax.device)).to(torch.uint8)
    return codes, scale, offset


def dequantize_absmax(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      block_size: int = DQ_BLOCK_SIZE) -> torch.Tensor:
    values = dynamic_code().to(codes.device)[codes.int()]
    return _expand_blocks(values, scale, block_size) + offset


# =========================================================================================
# the frozen 4-bit linear layer
# =========================================================================================
class _NF4Matmul(torch.autograd.Function):
    """y = x @ W^T with W dequantized on the fly; backward dequantizes again (nothing big is saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "NF4Linear") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.layer.dequantize(grad_out.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4; computes in ``compute_dtype`` (bf16 by default).

    Buffers: ``weight_packed`` (uint8), ``absmax`` (float32 per block) or, with double
    quantization, ``absmax_codes`` (uint8) + ``absmax_scale`` + ``absmax_offset``; a frozen ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16, block_size: int = BLOCK_SIZE,
                 double_quant: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.block_size, self.double_quant = compute_dtype, block_size, double_quant
        n = in_features * out_features
        n_blocks = -(-n // block_size)
        self.register_buffer("weight_packed", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax_codes", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scale", torch.zeros(-(-n_blocks // DQ_BLOCK_SIZE), device=device))
            self.register_buffer("absmax_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16,
                    block_size: int = BLOCK_SIZE, double_quant: bool = False) -> "NF4Linear":
        w = linear.weight
        layer = cls(w.shape[1], w.shape[0], linear.bias is not None, compute_dtype, block_size, double_quant,
                    device=w.device)
        packed, absmax = quantize_nf4(w, block_size)
        layer.weight_packed.copy_(packed)
        if double_quant:
            codes, scale, offset = quantize_absmax(absmax)
            layer.absmax_codes.copy_(codes)
            layer.absmax_scale.copy_(scale)
            layer.absmax_offset.copy_(offset)
        else:
            layer.absmax.copy_(absmax)
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().to(compute_dtype).clone()
        return layer

    def _apply(self, fn, recurse=True):
        """``model.to(bf16)`` must not round the float32 block constants: keep them float32."""
        super()._apply(fn, recurse)
        for name in ("absmax", "absmax_scale", "absmax_offset"):
            b = getattr(self, name, None)
            if b is not None and b.dtype != torch.float32:
                setattr(self, name, b.float())
        return self

    def block_absmax(self) -> torch.Tensor:
        if self.double_quant:
            return dequantize_absmax(self.absmax_codes, self.absmax_scale, self.absmax_offset)
        return self.absmax

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight this layer stands for, in ``dtype`` (default: the compute dtype)."""
        return dequantize_nf4(self.weight_packed, self.block_absmax(), (self.out_features, self.in_features),
                              dtype or self.compute_dtype, self.block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def num_weights(self) -> int:
        """Parameters this layer stands for (weights + bias), for parameter counts."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={self.block_size}"
                f"{dq}, compute_dtype={self.compute_dtype}")


@torch.no_grad()
def quantize_base_nf4(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16,
                      block_size: int = BLOCK_SIZE, double_quant: bool = False,
                      skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace the frozen base linears of ``model`` by ``NF4Linear`` (in place); returns the model.

    Every ``nn.Linear`` is a base linear except LoRA's own ``lora_A``/``lora_B`` and modules whose
    last name is in ``skip`` (the output head, as QLoRA and transformers' bitsandbytes integration
    leave it: the fused loss reads its weight directly). Inside a ``LoRALinear`` the ``base`` is
    quantized and the adapters are cast to ``compute_dtype`` (QLoRA's bf16 adapters), so the result
    does not depend on whether LoRA was applied before or after. MoE experts (3-D tensors) and
    embeddings stay as they are.
    """
    # LoRA layers (evolm.post.lora.LoRALinear: a frozen ``base`` and the ``lora_A``/``lora_B``
    # adapters), recognised by their parts so that quant/ does not import post-training
    loras = [m for m in model.modules() if all(hasattr(m, a) for a in ("base", "lora_A", "lora_B"))]
    bases = {id(m.base) for m in loras}
    adapters = {id(a) for m in loras for a in (m.lora_A, m.lora_B)}
    for m in loras:
        m.lora_A.to(compute_dtype)
        m.lora_B.to(compute_dtype)

    def make(name: str, linear: nn.Linear) -> NF4Linear | None:
        keep = id(linear) in adapters or type(linear) is not nn.Linear or name.rsplit(".", 1)[-1] in skip
        if keep and id(linear) not in bases:  # a LoRA layer's base is quantized whatever its name
            return None
        return NF4Linear.from_linear(linear, compute_dtype, block_size, double_quant)

    replace_linears(model, make)
    model.nf4 = {"compute_dtype": str(compute_dtype).removeprefix("torch."), "block_size": block_size,
                 "double_quant": double_quant}
    return model


def nf4_bytes(model: nn.Module) -> int:
    """Bytes of all NF4 buffers in ``model`` (codes and constants)."""
    return sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, NF4Linear)
               for b in m.buffers(recurse=False))


__all__ = ["nf4_code", "dynamic_code", "quantize_nf4", "dequantize_nf4", "quantize_absmax", "dequantize_absmax",
           "NF4Linear", "quantize_base_nf4", "nf4_bytes", "BLOCK_SIZE"]
