"""A GGUF tensor's quantized blocks as codes, scales and minima whose ``fma(code, scale, min)`` is,
bit for bit, the float32 weight the ``gguf`` package's dequantization gives.

llama.cpp's block formats (``ggml-quants.c``) all store a weight as an affine function of a small
integer code: ``d * q`` (Q8_0), ``d * (q - 8)`` (Q4_0), ``d * q + m`` (Q4_1), and in the K-quants
super-blocks of 256 with a 6-bit scale (and minimum) per sub-block, ``(d * sc) * q - dmin * m``.
Each is rewritten here as one float32 scale and minimum per group of 32 inputs (16 for Q6_K) and
a code of 4 bits (Q4_0, Q4_1, Q4_K: kept two to a byte, in Q4_0's nibble order) or 8 bits (Q5_0,
Q5_1, Q5_K, Q6_K, Q8_0). The rewriting is exact because in every format the product of scale and
code needs at most 25 significant bits and the reference rounds once, as a fused multiply-add does
(``(d * sc)`` and ``dmin * m`` are exact in float32); :func:`evolm.quant.blocks.keep_blocks` checks it
for every tensor it keeps. ``evolm/kernels/block_gemm.cpp`` then multiplies with these weights,
reading 5-10 bits per weight instead of 32 (``load_gguf(..., blocks=True)``, docs/performance.md).
"""

from __future__ import annotations

import numpy as np
import torch

from evolm.quant.blocks import Blocks

# ggml type ids (gguf.GGMLQuantizationType) -> name, block length, bytes per block
_TYPES = {2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
          8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}
KEPT_TYPES = tuple(name for name, _, _ in _TYPES.values())


def _half(b: np.ndarray) -> np.ndarray:
    """Little-endian float16 fields (..., 2) bytes -> float32 (...)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes of one group of 32 -> its 32 codes: low nibbles first, then high ones."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1: (n, 4) bytes, a little-endian uint32 -> bit j of it as (n, 32) uint8."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _q4k_packed(qs: np.ndarray) -> np.ndarray:
    """Q4_K's (n, 128) code bytes -> the kernels' 4-bit layout (as :func:`evolm.kernels.pack_q4`
    packs), byte for byte: in each chunk of 32 bytes the low nibbles are sub-block 2c and the high
    nibbles sub-block 2c + 1, weight j of both in byte j; the kernels want, per sub-block, byte j
    holding its weights j and j + 16. Rearranged as bytes, never unpacked to one code per byte."""
    q = qs.reshape(-1, 4, 2, 16)  # chunk, weights 0..15 or 16..31, j
    lo, hi = q[:, :, 0], q[:, :, 1]
    even = (lo & 0x0F) | ((hi & 0x0F) << 4)
    odd = (lo >> 4) | (hi & 0xF0)
    return np.stack((even, odd), axis=2).reshape(-1, 128)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> the 8 six-bit sub-block scales and minima (``get_scale_min_k4``)."""
    s = s.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4], mn[..., :4] = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def _decode(b: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Blocks (n, bytes) -> codes (n, block) int, or for the 4-bit formats (n, block / 2) bytes
    already in the kernels' layout; scale and min (n, block / group) float32; group."""
    n = b.shape[0]
    if name == "Q8_0":
        return b[:, 2:].view(np.int8), _half(b[:, 0:2])[:, None], None, 32
    if name == "Q4_0":  # d * (q - 8) == fma(q, d, -8 d): -8 d and the result are exact
        d = _half(b[:, 0:2])[:, None]  # the file's code bytes are the kernels' layout (llama.cpp's)
        return b[:, 2:18], d, -8 * d, 32
    if name == "Q4_1":
        return b[:, 4:20], _half(b[:, 0:2])[:, None], _half(b[:, 2:4])[:, None], 32
    if name == "Q5_0":  # d * (q - 16): the centred 5-bit code, no minimum
        q = _nibbles(b[:, 6:22]) | (_high_bits(b[:, 2:6]) << 4)
        return q.astype(np.int8) - 16, _half(b[:, 0:2])[:, None], None, 32
    if name == "Q5_1":
        q = _nibbles(b[:, 8:24]) | (_high_bits(b[:, 4:8]) << 4)
        return q, _half(b[:, 0:2])[:, None], _half(b[:, 2:4])[:, None], 32
    if name in ("Q4_K", "Q5_K"):  # (d * sc) * q - dmin * m per sub-block of 32
        d, dmin = _half(b[:, 0:2])[:, None], _half(b[:, 2:4])[:, None]
        sc, mn = _k_scales(b[:, 4:16])
        scale, minimum = d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))
        if name == "Q4_K":
            return _q4k_packed(b[:, 16:144]), scale, minimum, 32
        qs = b[:, 48:176].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)  # chunk of 64
        q = (qs & 0x0F).reshape(n, 8, 32)
        # bit (2 c + h) of byte l of qh is the fifth bit of weight l of sub-block 2 c + h
        qh = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        q = q | ((qh & 1) << 4)
        return q.reshape(n, 256), scale, minimum, 32
    if name == "Q6_K":  # (d * sc) * (q - 32) per sub-block of 16
        ql, qh = b[:, 0:128].reshape(n, 2, 1, 64), b[:, 128:192].reshape(n, 2, 1, 32)
        low = (ql >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F  # (n, 2, 2, 64)
        high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3  # (n, 2, 4, 32)
        q = low.reshape(n, 2, 4, 32) | (high << 4)
        sc = b[:, 192:208].view(np.int8).astype(np.float32)
        return q.astype(np.int8).reshape(n, 256) - 32, _half(b[:, 208:210])[:, None] * sc, None, 16
    raise AssertionError(name)


def type_name(ggml_type: int) -> str | None:
    """The block format's name if evolm keeps it as blocks (else None: dequantized to float)."""
    t = _TYPES.get(int(ggml_type))
    return t[0] if t else None


def block_size(ggml_type: int) -> tuple[int, int] | None:
    """``(values per block, bytes per block)`` of a kept block type (None for the others)."""
    t = _TYPES.get(int(ggml_type))
    return t[1:] if t else None


def blocks_from_raw(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> Blocks | None:
    """One 2-D GGUF tensor's bytes (rows, bytes per row) -> :class:`evolm.quant.blocks.Blocks`, or None
    for a type that is not kept (float types, and those not in ``KEPT_TYPES``)."""
    t = _TYPES.get(int(ggml_type))
    if t is None or len(shape) != 2:
        return None
    name, block, size = t
    N, K = shape
    codes, scale, mn, group = _decode(np.ascontiguousarray(raw).reshape(-1, size), name)
    packed = name in ("Q4_0", "Q4_1", "Q4_K")  # two codes a byte, as the kernels read them
    codes = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8 if packed else np.int8))
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).reshape(N, K // group)  # noqa: E731
    return Blocks(codes.reshape(N, K // 2 if packed else K), as_t(scale), None if mn is None else as_t(mn), group, name)
