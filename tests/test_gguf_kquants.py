"""k-quants (Q4_K, Q5_K, Q6_K) and the q4_k_m-style mixes, as llama.cpp writes them.

- every block equals llama.cpp's own quantizer's bytes (``ggml_quantize_chunk`` from the
  libggml that llama-cpp-python ships, called through ctypes), on weights of many shapes;
- without llama.cpp: equal to a one-weight-at-a-time transcription of the reference algorithm
  written here (float32 scalars), and the ``gguf`` package's dequantizer reads the blocks back
  within the format's error;
- a whole exported file equals ``llama_model_quantize``'s output from the f32 file, tensor types
  and bytes, for the q4_k_m / q5_k_m / q4_k_s / q6_k mixes on Llama, an 8-expert Mixtral, GPT-2 and DeepSeek;
- evolm reads the exported file back as those blocks dequantize.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os

import numpy as np
import pytest
import torch

from evolm.interop import gguf_kquants as K
from evolm.interop.gguf import GGUFFile, load_gguf
from evolm.interop.gguf_export import TYPES, export_gguf, gguf_plan, tensor_types, write_gguf
from evolm.model import Transformer
from evolm.presets import get_preset

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
F = np.float32
QUANT = {"Q4_K": K.quantize_q4_k, "Q5_K": K.quantize_q5_k, "Q6_K": K.quantize_q6_k}


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "normal": rng.standard_normal((8, 512)).astype(F),
        "heavy-tailed": (rng.standard_t(2, (8, 512)) * 0.02).astype(F),
        "positive": np.abs(rng.standard_normal((4, 512))).astype(F),
        "negative": -np.abs(rng.standard_normal((4, 512))).astype(F),
        "sparse": (rng.standard_normal((4, 512)) * (rng.random((4, 512)) < 0.05)).astype(F),
        "outliers": np.where(rng.random((4, 512)) < 0.01, 50.0, rng.standard_normal((4, 512)) * 0.01).astype(F),
        "integers": rng.integers(-3, 4, (4, 512)).astype(F),
        "tiny": (rng.standard_normal((2, 512)) * 1e-12).astype(F),
        "constant": np.full((2, 512), 0.3, F),
        "half zeros": np.concatenate([np.zeros((2, 256)), rng.standard_normal((2, 256))], 1).astype(F),
        "3-D experts": rng.standard_normal((2, 3, 256)).astype(F),
    }


# ----------------------------------------------------------------------------------------------
# llama.cpp's quantizer, block for block
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ggml():
    try:
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"llama.cpp not installed (`make bench-deps` builds llama-cpp-python): {e}")
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    except OSError as e:
        pytest.skip(f"llama-cpp-python without its libggml-base.so: {e}")
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def quantize(x: np.ndarray, kind) -> np.ndarray:
        x = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), F)
        block, size = gguf.GGML_QUANT_SIZES[kind]
        out = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
        lib.ggml_quantize_chunk(int(kind), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        return out

    return quantize


@pytest.mark.parametrize("kind", list(QUANT))
def test_blocks_equal_llama_cpp_s(kind, ggml):
    size = gguf.GGML_QUANT_SIZES[Q[kind]][1]
    for name, x in weights().items():
        got = QUANT[kind](x)
        assert got.shape == (*x.shape[:-1], x.shape[-1] // 256 * size), name
        want = ggml(x, Q[kind]).reshape(got.shape)
        same = (got.reshape(-1, size) == want.reshape(-1, size)).all(axis=1)
        assert same.all(), f"{name}: {int((~same).sum())} of {same.size} blocks differ"


# ----------------------------------------------------------------------------------------------
# without llama.cpp: the reference algorithm one weight at a time, and the gguf dequantizer
# ----------------------------------------------------------------------------------------------
def _nearest(v) -> int:
    return int(np.rint(F(v)))


def _fit_scale_min(x, w, nmax, rmin, rdelta, nstep):
    """make_qkx2_quants: weighted least-squares (scale, -min) over candidate grids, float32 scalars."""
    lo, hi = min(min(x), F(0)), max(x)
    sum_w, sum_x = F(0), F(0)
    for xi, wi in zip(x, w):
        sum_w, sum_x = F(sum_w + wi), F(sum_x + wi * xi)
    if hi == lo:
        return F(0), F(-lo), [0] * len(x)
    iscale = F(F(nmax) / F(hi - lo))
    scale = F(F(1) / iscale)
    L = [min(max(_nearest(iscale * F(xi - lo)), 0), nmax) for xi in x]
    best = F(0)
    for xi, wi, li in zip(x, w, L):
        d = F(F(F(scale * F(li)) + lo) - xi)
        best = F(best + F(wi * F(d * d)))
    for step in range(nstep + 1):
        iscale = F(F(F(F(rmin) + F(F(rdelta) * F(step))) + F(nmax)) / F(hi - lo))
        la = [min(max(_nearest(iscale * F(xi - lo)), 0), nmax) for xi in x]
        sl = sl2 = sxl = F(0)
        for xi, wi, li in zip(x, w, la):
            wl = F(wi * F(li))
            sl, sl2, sxl = F(sl + wl), F(sl2 + F(wl * F(li))), F(sxl + F(wl * xi))
        D = F(F(sum_w * sl2) - F(sl * sl))
        if D > 0:
            s_, m_ = F(F(F(sum_w * sxl) - F(sum_x * sl)) / D), F(F(F(sl2 * sum_x) - F(sl * sxl)) / D)
            if m_ > 0:
                s_, m_ = F(sxl / sl2), F(0)
            err = F(0)
            for xi, wi, li in zip(x, w, la):
                d = F(F(F(s_ * F(li)) + m_) - xi)
                err = F(err + F(wi * F(d * d)))
            if err < best:
                L, best, scale, lo = la, err, s_, m_
    return scale, F(-lo), L


def _asymmetric_block(x, nmax, rmin, nstep):
    """One Q4_K / Q5_K super-block: (d, dmin, 6-bit scales, 6-bit mins, levels)."""
    scales, mins, L = [], [], []
    for j in range(8):
        sub = [F(v) for v in x[32 * j:32 * j + 32]]
        sq = F(0)
        for v in sub:
            sq = F(sq + F(v * v))
        av = F(np.sqrt(F(sq / F(32))))
        s, m, lv = _fit_scale_min(sub, [F(av + abs(v)) for v in sub], nmax, rmin, F(0.1), nstep)
        scales.append(s)
        mins.append(m)
        L.append(lv)
    ms, mm = max(max(scales), F(0)), max(max(mins), F(0))
    inv_s, inv_m = (F(F(63) / ms) if ms > 0 else F(0)), (F(F(63) / mm) if mm > 0 else F(0))
    ls = [min(_nearest(F(inv_s * s)) & 0xFF, 63) for s in scales]
    lm = [min(_nearest(F(inv_m * m)) & 0xFF, 63) for m in mins]
    d, dmin = np.float16(F(ms / F(63))), np.float16(F(mm / F(63)))
    for j in range(8):
        dj, mj = F(F(d) * F(ls[j])), F(F(dmin) * F(lm[j]))
        if dj:
            L[j] = [min(max(_nearest(F(F(F(v) + mj) / dj)), 0), nmax) for v in x[32 * j:32 * j + 32]]
    return d, dmin, ls, lm, [v for lv in L for v in lv]


def _decode_scales(sc: np.ndarray) -> tuple[list[int], list[int]]:
    ls = [sc[j] & 63 if j < 4 else (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4) for j in range(8)]
    lm = [sc[j + 4] & 63 if j < 4 else (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4) for j in range(8)]
    return [int(v) for v in ls], [int(v) for v in lm]


@pytest.mark.parametrize("kind,nmax,rmin,nstep", [("Q4_K", 15, -1.0, 20), ("Q5_K", 31, -0.5, 15)])
def test_asymmetric_blocks_equal_the_reference_written_out(kind, nmax, rmin, nstep):
    rng = np.random.default_rng(1)
    for x in (rng.standard_normal(256).astype(F), (rng.standard_t(2, 256) * 0.02).astype(F)):
        block = QUANT[kind](x[None])[0]
        d, dmin, ls, lm, L = _asymmetric_block(x, nmax, rmin, nstep)
        assert block[0:2].view(np.float16)[0] == d and block[2:4].view(np.float16)[0] == dmin
        assert _decode_scales(block[4:16]) == (ls, lm)
        nib = block[-128:]
        low = np.concatenate([np.stack([nib[32 * g:32 * g + 32] & 0xF, nib[32 * g:32 * g + 32] >> 4]).reshape(-1)
                              for g in range(4)])
        if kind == "Q5_K":
            qh = block[16:48]
            high = np.concatenate([np.stack([(qh >> (2 * g)) & 1, (qh >> (2 * g + 1)) & 1]).reshape(-1)
                                   for g in range(4)])
            low = low | (high << 4)
        assert low.tolist() == L


def test_q6_k_scales_equal_the_reference_written_out():
    """make_qx_quants (x^2-weighted symmetric fit over 19 grids) per 16 weights, then int8 scales of one fp16 d."""
    x = np.random.default_rng(2).standard_normal(256).astype(F)
    scales = []
    for j in range(16):
        sub = [F(v) for v in x[16 * j:16 * j + 16]]
        mx = max(sub, key=abs)

        def fit(iscale):
            sx = s2 = F(0)
            for v in sub:
                lv = F(min(max(_nearest(F(iscale * v)), -32), 31))
                sx, s2 = F(sx + F(F(F(v * v) * v) * lv)), F(s2 + F(F(F(v * v) * lv) * lv))
            return sx, s2

        sx, s2 = fit(F(F(-32) / mx))
        scale = F(sx / s2)
        best = F(scale * sx)
        for step in [s for s in range(-9, 10) if s]:
            sx, s2 = fit(F(-F(F(32) + F(F(0.1) * F(step))) / mx))
            if s2 > 0 and F(sx * sx) > F(best * s2):
                scale = F(sx / s2)
                best = F(scale * sx)
        scales.append(scale)
    top = max(scales, key=abs)
    iscale = F(F(-128) / top)
    block = K.quantize_q6_k(x[None])[0]
    assert block[208:210].view(np.float16)[0] == np.float16(F(F(1) / iscale))
    assert block[192:208].view(np.int8).tolist() == [min(_nearest(F(iscale * s)), 127) for s in scales]


@pytest.mark.parametrize("kind,bound", [("Q4_K", 0.10), ("Q5_K", 0.05), ("Q6_K", 0.025)])
def test_gguf_dequantizer_reads_the_blocks_back(kind, bound):
    """The gguf package's own reader: every weight within its sub-block's step (the format's
    error: half a level of d * scale, plus the rounding of the 6-bit scale and min) and, on
    Gaussian weights, a relative RMS error below ``bound`` (4-bit ~7%, 5-bit ~3.5%, 6-bit ~1.7%)."""
    x = np.random.default_rng(3).standard_normal((64, 512)).astype(F)
    back = gguf.quants.dequantize(QUANT[kind](x), Q[kind])
    assert back.shape == x.shape and np.isfinite(back).all()
    rel = np.sqrt(np.mean((back - x) ** 2) / np.mean(x ** 2))
    assert rel < bound, rel
    span = {"Q4_K": 32, "Q5_K": 32, "Q6_K": 16}[kind]
    sub = x.reshape(-1, span)
    levels = {"Q4_K": 15, "Q5_K": 31, "Q6_K": 63}[kind]
    step = (sub.max(1) - np.minimum(sub.min(1), 0)) / levels  # one level of the sub-block's own range
    assert (np.abs(back.reshape(-1, span) - sub) <= 1.5 * step[:, None] + 1e-6).all()


def test_rows_must_tile_super_blocks():
    with pytest.raises(ValueError, match="multiple of 256 weights, got 96"):
        K.quantize_q4_k(np.zeros((2, 96), F))


# ----------------------------------------------------------------------------------------------
# the file: llama.cpp's mix of types, and its bytes
# ----------------------------------------------------------------------------------------------
def _model(name: str) -> Transformer:
    base = dataclasses.replace(get_preset("tiny-llama"), rope_scaling=None, tie_embeddings=True, d_model=256,
                               n_heads=4, n_kv_heads=2, head_dim=64, d_ff=512, n_layers=8, vocab_size=320)
    config = {
        "llama8": base,  # 8 layers: use_more_bits picks 0, 3, 6, 7
        "llama8-untied": dataclasses.replace(base, tie_embeddings=False, n_layers=2),
        "mixtral8": dataclasses.replace(get_preset("tiny-mixtral"), d_model=256, n_heads=4, n_kv_heads=2,
                                        head_dim=64, d_ff=256, moe_d_ff=256, n_experts=8, n_layers=2,
                                        vocab_size=320),
        "gpt2": dataclasses.replace(get_preset("tiny-gpt2"), d_model=256, n_heads=4, n_kv_heads=4, head_dim=64,
                                    d_ff=512, n_layers=4, vocab_size=320),
        "deepseek": dataclasses.replace(get_preset("tiny-deepseek"), d_model=256, d_ff=512, moe_d_ff=256,
                                        kv_lora_rank=256, q_lora_rank=256, n_layers=2, vocab_size=320),
    }[name]
    torch.manual_seed(0)
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def bpe():
    from test_gguf_export import make_bpe

    return make_bpe()


def test_mix_follows_llama_quantize_s_rules():
    """q4_k_m on 8 layers: attn_v and ffn_down get Q6_K on layers 0, 3, 6, 7 (i < n/8, i >= 7n/8,
    (i - n/8) % 3 == 2), the tied head Q6_K, norms F32, rows of 96 fall back (Q4_K -> Q5_0)."""
    shapes = {"token_embd.weight": (320, 256), "output_norm.weight": (256,)}
    for i in range(8):
        shapes |= {f"blk.{i}.attn_q.weight": (256, 256), f"blk.{i}.attn_v.weight": (128, 256),
                   f"blk.{i}.ffn_down.weight": (256, 512), f"blk.{i}.ffn_up.weight": (512, 96),
                   f"blk.{i}.attn_norm.weight": (256,)}
    kinds = tensor_types(shapes, "q4_k_m", 8)
    more = {0, 3, 6, 7}
    for i in range(8):
        want = Q.Q6_K if i in more else Q.Q4_K
        assert kinds[f"blk.{i}.attn_v.weight"] == kinds[f"blk.{i}.ffn_down.weight"] == want, i
        assert kinds[f"blk.{i}.attn_q.weight"] == Q.Q4_K and kinds[f"blk.{i}.ffn_up.weight"] == Q.Q5_0
        assert kinds[f"blk.{i}.attn_norm.weight"] == Q.F32
    assert kinds["token_embd.weight"] == Q.Q6_K and kinds["output_norm.weight"] == Q.F32
    moe = tensor_types({"blk.0.attn_v.weight": (128, 256), "blk.0.attn_k.weight": (128, 256),
                        "blk.0.attn_output.weight": (256, 256), "blk.0.ffn_gate_inp.weight": (8, 256)},
                       "q4_k_m", 1, n_experts=8)  # Mixtral's 8 experts: attention kept at 8 / 5 bits
    assert moe == {"blk.0.attn_v.weight": Q.Q8_0, "blk.0.attn_k.weight": Q.Q8_0,
                   "blk.0.attn_output.weight": Q.Q5_K, "blk.0.ffn_gate_inp.weight": Q.F32}


@pytest.mark.parametrize("name,qtype", [("llama8", "q4_k_m"), ("llama8", "q5_k_m"), ("llama8", "q4_k_s"),
                                        ("llama8-untied", "q6_k"), ("llama8-untied", "q4_0"),
                                        ("mixtral8", "q4_k_m"), ("gpt2", "q4_k_m"), ("deepseek", "q5_k_m")])
def test_file_equals_llama_model_quantize_s(name, qtype, bpe, tmp_path, one_thread):
    """evolm's q-type file == llama.cpp's ``llama_model_quantize`` of evolm's f32 file: same type
    and same bytes for every tensor, same file type."""
    try:
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"llama.cpp not installed: {e}")
    model = _model(name)
    src = export_gguf(model, tmp_path / "f32.gguf", bpe, "f32")
    ours = export_gguf(model, tmp_path / "ours.gguf", bpe, qtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(gguf.LlamaFileType[TYPES[qtype][1]]), 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(tmp_path / "cpp.gguf").encode(),
                                          ctypes.byref(params)) == 0
    a, b = GGUFFile(ours), GGUFFile(tmp_path / "cpp.gguf")
    assert a.metadata["general.file_type"] == b.metadata["general.file_type"]
    assert sorted(a.tensors) == sorted(b.tensors)
    for n in a.tensors:
        assert Q(a.tensors[n].ggml_type) == Q(b.tensors[n].ggml_type), n
        assert np.array_equal(np.asarray(a.raw(n)), np.asarray(b.raw(n))), n


def test_evolm_reads_the_k_quant_file_as_its_blocks_dequantize(bpe, tmp_path, one_thread):
    """Loading the q4_k_m file gives the model whose tensors are the gguf package's dequantization of
    the file's blocks (written as f32 and loaded the same way): equal weights and logits."""
    model = _model("llama8-untied")
    path = export_gguf(model, tmp_path / "q.gguf", bpe, "q4_k_m")
    f = GGUFFile(path)
    assert {Q(t.ggml_type).name for t in f.tensors.values()} == {"F32", "Q4_K", "Q6_K"}
    meta, _ = gguf_plan(model, bpe)
    rebuilt = {n: torch.from_numpy(np.array(
        gguf.quants.dequantize(np.asarray(f.raw(n)), Q(t.ggml_type)).reshape(t.shape), dtype=F))
        for n, t in f.tensors.items()}
    ref, _ = load_gguf(write_gguf(tmp_path / "ref.gguf", meta, rebuilt, "f32"))
    got, _ = load_gguf(path)
    want = ref.state_dict()
    for k, v in got.state_dict().items():
        assert torch.equal(v, want[k]), k
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got(ids), ref(ids))
