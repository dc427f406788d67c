"""llama.cpp's k-quants Q4_K, Q5_K and Q6_K, written from the semantics of its reference quantizers.

The ``gguf`` package (0.19) reads k-quant blocks but cannot write them, and llama.cpp's
``llama-quantize`` quantizes with its reference functions when no importance matrix is given, so
matching those functions makes an exported ``q4_k_m`` file the one ``llama-quantize`` would write.
A super-block holds 256 weights (``QK_K``):

* **Q4_K / Q5_K** (4.5 / 5.5 bits a weight): eight sub-blocks of 32 weights, each ``x ~ d_j * q - m_j``
  with ``q`` in 0..15 (0..31). Per sub-block, a weighted least-squares fit of scale and offset is
  searched over a few candidate grids (``make_qkx2_quants``: weights ``rms(x) + |x|``, error
  ``sum w (scale q + min - x)^2``, minimum kept at or below 0); the eight scales and eight mins are
  then stored as 6-bit multiples of two fp16 super-block values (``d = max scale / 63``,
  ``dmin = max min / 63``), and every ``q`` is recomputed against the stored, rounded ones.
* **Q6_K** (6.5625 bits): sixteen sub-blocks of 16 weights, symmetric ``x ~ d * s_j * q`` with ``q`` in
  -32..31; each sub-block's scale is the best of 19 grids under the error weighted by ``x^2``
  (``make_qx_quants``), stored as int8 multiples of one fp16 ``d = -max scale / 128``.

Everything is float32 and in the reference's order: sums over a sub-block are accumulated one
element after another (numpy's pairwise sums round differently and would move a few scales by an
ulp, then a stored 6-bit value or an fp16 ``d``); rounding to the nearest integer is ties-to-even,
as the reference's magic-number ``nearest_int``. Vectorized across sub-blocks: each loop below
runs over the 16 or 32 positions of a sub-block, or over the candidate grids, never over blocks.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
_EPS = np.float32(1e-15)  # GROUP_MAX_EPS: a group smaller than this is all zeros
f32 = np.float32


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 (the positions of a sub-block) one term after another, in float32."""
    acc = a[0].copy()
    for row in a[1:]:
        acc += row
    return acc


def _rint(a: np.ndarray) -> np.ndarray:
    return np.rint(a).astype(np.int32)


def _fit_scale_min(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                   nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric fit ``x ~ scale * L - mn`` per sub-block (``make_qkx2_quants`` semantics).

    ``x``, ``w``: (n, S) float32, positions first. Returns (scale (S,), mn = -min >= 0 (S,), L (n, S)).
    """
    lo = np.minimum(x.min(axis=0), f32(0))
    hi = x.max(axis=0)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    flat = hi == lo
    span = np.where(flat, f32(1), hi - lo)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = f32(nmax) / span
        scale = f32(1) / iscale
        L = np.clip(_rint(iscale * (x - lo)), 0, nmax)
        diff = scale * L.astype(f32) + lo - x
        best = _seq_sum(w * (diff * diff))
        mn = lo.copy()
        for step in range(nstep + 1):  # each grid is laid from the best offset found so far
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / np.where(flat, f32(1), hi - mn)
            la = np.clip(_rint(iscale * (x - mn)), 0, nmax)
            lf = la.astype(f32)
            wl = w * lf
            sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * lf), _seq_sum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            this_min = np.where(pos, f32(0), this_min)
            diff = this_scale * lf + this_min - x
            err = _seq_sum(w * (diff * diff))
            take = (D > 0) & (err < best) & ~flat
            L = np.where(take, la, L)
            best = np.where(take, err, best)
            scale = np.where(take, this_scale, scale)
            mn = np.where(take, this_min, mn)
    scale = np.where(flat, f32(0), scale)
    L = np.where(flat, 0, L)
    return scale.astype(f32), (-mn).astype(f32), L


def _fit_symmetric(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale per sub-block, error weighted by ``x^2`` (``make_qx_quants``, rmse_type 1).

    ``x``: (n, S) float32. Returns (scale (S,), levels (n, S) in 0..2 nmax - 1 of the grid chosen;
    all zeros for a group of zeros). The scale's sign is that of the largest-magnitude weight's
    negation, so that weight reaches level 0 (-nmax)."""
    S = x.shape[1]
    big = np.abs(x).argmax(axis=0)  # the first of the largest magnitude, as a strict '>' scan keeps
    mx = x[big, np.arange(S)]
    zero = np.abs(mx) < _EPS
    mx = np.where(zero, f32(1), mx)
    w = x * x

    def levels(iscale):
        return np.clip(_rint(iscale * x), -nmax, nmax - 1)

    def sums(lv):
        lf = lv.astype(f32)
        return _seq_sum(w * x * lf), _seq_sum(w * lf * lf)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lv = levels(f32(-nmax) / mx)
        sumlx, suml2 = sums(lv)
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            la = levels(-(f32(nmax) + f32(0.1) * f32(step)) / mx)
            sumlx, suml2 = sums(la)
            take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            lv = np.where(take, la, lv)
            scale = np.where(take, sumlx / suml2, scale)
            best = np.where(take, scale * sumlx, best)
    return np.where(zero, f32(0), scale).astype(f32), np.where(zero, 0, lv + nmax)


def _f16(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 bytes as uint16, their value back in float32)."""
    h = a.astype(np.float16)
    return h.view(np.uint16), h.astype(f32)


def _pack_scales_mins(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins (B, 8) -> the 12 bytes of a Q4_K / Q5_K block: the low six bits
    of sub-blocks 0-3 in bytes 0-7, the low nibbles of 4-7 in bytes 8-11, their top two bits in the
    top two bits of bytes 0-7."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _asymmetric_k(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """The shared part of Q4_K and Q5_K for blocks ``x`` (B, 256): (d, dmin, 12 scale bytes, L (B, 256))."""
    B = x.shape[0]
    sub = x.reshape(B * 8, 32).T  # (32, S): positions first
    av = np.sqrt(_seq_sum(sub * sub) / f32(32))
    w = av + np.abs(sub)
    scales, mins, L = _fit_scale_min(sub, w, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(B, 8), mins.reshape(B, 8)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore"):
        inv_s = np.where(max_scale > 0, f32(63) / max_scale, f32(0)).astype(f32)
        inv_m = np.where(max_min > 0, f32(63) / max_min, f32(0)).astype(f32)
    ls = np.minimum(_rint(inv_s[:, None] * scales).astype(np.uint8), 63)  # stored as uint8, then capped
    lm = np.minimum(_rint(inv_m[:, None] * mins).astype(np.uint8), 63)
    d_bits, d = _f16(max_scale / f32(63))
    m_bits, dm_ = _f16(max_min / f32(63))
    d_j = d[:, None] * ls.astype(f32)  # (B, 8)
    m_j = dm_[:, None] * lm.astype(f32)
    L = L.T.reshape(B, 8, 32)
    xs = x.reshape(B, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(_rint((xs + m_j[..., None]) / d_j[..., None]), 0, nmax)
    L = np.where((d_j != 0)[..., None], q, L).reshape(B, QK_K).astype(np.uint8)
    return d_bits, m_bits, _pack_scales_mins(ls, lm), L


def _nibbles(L: np.ndarray) -> np.ndarray:
    """(B, 256) values < 16 -> 128 bytes: per 64 weights, byte l = w[l] | w[l + 32] << 4."""
    g = L.reshape(-1, 4, 2, 32)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(-1, 128)


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=f32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"k-quant rows must be a multiple of {QK_K} weights, got {x.shape[-1]}")
    return x.reshape(-1, QK_K)


def _chunked(fn, x: np.ndarray, bytes_per_block: int, chunk: int = 8192) -> np.ndarray:
    """``fn`` over blocks of ``x`` (..., n), a chunk at a time; returns (..., n // 256 * bytes) uint8."""
    blocks = _blocks(x)
    out = np.empty((blocks.shape[0], bytes_per_block), np.uint8)
    for i in range(0, blocks.shape[0], chunk):
        out[i:i + chunk] = fn(blocks[i:i + chunk])
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * bytes_per_block)


def _q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, L = _asymmetric_k(x, 15, -1.0, 20)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), sc, _nibbles(L)],
                          axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, L = _asymmetric_k(x, 31, -0.5, 15)
    hi = (L >> 4).reshape(-1, 4, 2, 32)  # bit 2k: weight 64k + j above 15, bit 2k + 1: weight 64k + 32 + j
    qh = np.zeros((L.shape[0], 32), np.uint8)
    for k in range(4):
        qh |= (hi[:, k, 0] << (2 * k)) | (hi[:, k, 1] << (2 * k + 1))
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), sc, qh,
                           _nibbles(L & 0xF)], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    B = x.shape[0]
    sub = x.reshape(B * 16, 16).T
    scales, own = _fit_symmetric(sub, 32)
    scales = scales.reshape(B, 16)
    pick = np.abs(scales).argmax(axis=1)  # the first of the largest magnitude, as a strict '>' scan keeps
    max_scale = scales[np.arange(B), pick]
    empty = np.abs(max_scale) < _EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(empty, f32(0), f32(-128) / np.where(empty, f32(1), max_scale)).astype(f32)
        d_bits, d = _f16(np.where(empty, f32(0), f32(1) / iscale))
    s = np.minimum(_rint(iscale[:, None] * scales), 127).astype(np.int8)
    d_j = d[:, None] * s.astype(f32)
    xs = x.reshape(B, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(_rint(xs / d_j[..., None]), -32, 31) + 32
    # a sub-block whose stored scale rounds to 0 keeps the levels of its own fit (dequantized: 0 either way)
    L = np.where((d_j != 0)[..., None], q, own.T.reshape(B, 16, 16)).reshape(B, QK_K).astype(np.uint8)
    ql = np.empty((B, 128), np.uint8)
    qh = np.empty((B, 64), np.uint8)
    for h in range(2):  # two halves of 128 weights
        g = L[:, 128 * h:128 * (h + 1)].reshape(B, 4, 32)
        ql[:, 64 * h:64 * h + 32] = (g[:, 0] & 0xF) | ((g[:, 2] & 0xF) << 4)
        ql[:, 64 * h + 32:64 * h + 64] = (g[:, 1] & 0xF) | ((g[:, 3] & 0xF) << 4)
        qh[:, 32 * h:32 * (h + 1)] = ((g[:, 0] >> 4) | ((g[:, 1] >> 4) << 2) | ((g[:, 2] >> 4) << 4)
                                      | ((g[:, 3] >> 4) << 6))
    out = np.concatenate([ql, qh, s.view(np.uint8), d_bits.view(np.uint8).reshape(-1, 2)], axis=1)
    return np.where(empty[:, None], np.uint8(0), out)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 rows (..., n), n a multiple of 256 -> Q4_K bytes (..., n / 256 * 144)."""
    return _chunked(_q4_k, x, 144)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """float32 rows (..., n), n a multiple of 256 -> Q5_K bytes (..., n / 256 * 176)."""
    return _chunked(_q5_k, x, 176)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 rows (..., n), n a multiple of 256 -> Q6_K bytes (..., n / 256 * 210)."""
    return _chunked(_q6_k, x, 210)


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}

__all__ = ["quantize_q4_k", "quantize_q5_k", "quantize_q6_k", "QUANTIZERS", "QK_K"]
