"""evolm's C++ quantized GEMV kernels against a float64 reference of the same arithmetic.

Reference: the activations quantized to int8 per block of 32 (scale = max|x| / 127, round half to
even), the weights dequantized (q4: q * d + m per block; q8: q * s per row), the product summed in
float64. The kernels must match it to float32 rounding: any layout, nibble-order or sign mistake
is an O(1) error.
"""

import os
import platform
import shutil
import time

import pytest
import torch

from evolm import kernels
from evolm import build
from evolm.presets import get_preset

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="evolm's C++ kernels are not built on this host")


def test_kernels_build_where_a_compiler_exists():
    if platform.machine() != "x86_64" or shutil.which("c++") is None:
        pytest.skip("the kernels are built for x86-64 with a C++ compiler")
    assert kernels.available(), "evolm/kernels/qgemv.cpp failed to build (see the warning)"
    assert kernels.isa() in ("avx512vnni", "avx2", "scalar")


def _quant_act(x: torch.Tensor):
    """Codes computed as the kernel does, in float32 (x times the reciprocal scale, round half to
    even), so that ties land the same way; the sums are then taken in float64."""
    g = x.float().reshape(x.shape[0], -1, 32)
    d = g.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / torch.where(d > 0, d, 1), 0)
    q = torch.round(g * inv).clamp(-127, 127)
    return q.double(), d.double()


def _dm(d, m):
    """The kernel's (N, G, 2) float16 (scale, min) pairs, and the float values they hold."""
    dm = torch.stack((d, m), -1).half().contiguous()
    return dm, dm[..., 0].float(), dm[..., 1].float()


def _ref_q4(x, codes, d, m):
    qx, dx = _quant_act(x)  # (M, G, 32), (M, G, 1)
    N, K = codes.shape
    w = codes.double().reshape(N, K // 32, 32)
    dot = torch.einsum("mgi,ngi->mng", qx, w)  # integer sums per block
    sx = qx.sum(-1)  # (M, G)
    return (dot * d.double()[None] * dx[..., 0][:, None] + m.double()[None] * (dx[..., 0] * sx)[:, None]).sum(-1)


def _ref_q8(x, qw, s):
    qx, dx = _quant_act(x)
    N, K = qw.shape
    dot = torch.einsum("mgi,ngi->mng", qx, qw.double().reshape(N, K // 32, 32))
    return (dot * dx[..., 0][:, None]).sum(-1) * s.double()


@needs_kernels
@pytest.mark.parametrize("M,N,K", [(1, 16, 32), (3, 49, 576), (8, 192, 576), (11, 64, 1536)])
def test_q4a8_equals_reference(M, N, K):
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g) * (1 + 10 * (torch.rand(K, generator=g) > 0.97))  # a few outlier features
    codes = torch.randint(0, 16, (N, K), generator=g)
    d = 0.01 + 0.02 * torch.rand(N, K // 32, generator=g)
    m = -8 * d + 0.01 * torch.randn(N, K // 32, generator=g)
    dm, d, m = _dm(d, m)
    got = torch.ops.evolm_q.q4a8_linear(x, kernels.pack_q4(codes), dm)
    want = _ref_q4(x, codes, d, m)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    # and bf16 activations are read as their float values
    xb = x.bfloat16()
    torch.testing.assert_close(torch.ops.evolm_q.q4a8_linear(xb, kernels.pack_q4(codes), dm).double(),
                               _ref_q4(xb.float(), codes, d, m), rtol=1e-5, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("M,N,K", [(1, 16, 32), (5, 33, 576), (9, 160, 1536)])
def test_q8a8_equals_reference(M, N, K):
    g = torch.Generator().manual_seed(M + N + K)
    x = torch.randn(M, K, generator=g)
    qw = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    s = 0.001 + 0.01 * torch.rand(N, generator=g)
    got = torch.ops.evolm_q.q8a8_linear(x, qw, s)
    torch.testing.assert_close(got.double(), _ref_q8(x, qw, s), rtol=1e-5, atol=1e-4)


@needs_kernels
def test_zero_and_extreme_blocks():
    """An all-zero activation block (scale 0) contributes nothing; +-127 codes do not saturate."""
    K, N = 64, 16
    x = torch.zeros(1, K)
    x[0, 32:] = torch.linspace(-5, 5, 32)
    qw = torch.full((N, K), -127, dtype=torch.int8)
    s = torch.ones(N)
    torch.testing.assert_close(torch.ops.evolm_q.q8a8_linear(x, qw, s).double(), _ref_q8(x, qw, s))
    codes = torch.full((N, K), 15)
    dm, d, m = _dm(torch.ones(N, 2), torch.full((N, 2), -3.0))
    torch.testing.assert_close(torch.ops.evolm_q.q4a8_linear(x, kernels.pack_q4(codes), dm).double(),
                               _ref_q4(x, codes, d, m))


def test_pack_unpack_roundtrip():
    codes = torch.randint(0, 16, (5, 96))
    packed = kernels.pack_q4(codes)
    assert packed.shape == (5, 48) and packed.dtype == torch.uint8
    assert torch.equal(kernels.unpack_q4(packed).long(), codes)
    # llama.cpp's order: byte j of a block = code j (low nibble) | code j + 16 (high nibble)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 16]) << 4)


@needs_kernels
def test_kernel_layers_compile_and_match_eager():
    """The ops trace into torch.compile (fake shapes registered) and give the eager result."""
    from evolm.quant import KernelPolicy
    from evolm.quant.int4 import Int4Linear, quantize_int4

    torch.manual_seed(0)
    model = build(get_preset("tiny-llama")).eval()
    quantize_int4(model, group_size=32, head="int8", policy=KernelPolicy(quant_kernels=True))
    layer = model.layers[0].mlp.up_proj
    assert isinstance(layer, Int4Linear) and layer.layout == "q4"
    x = torch.randint(0, model.config.vocab_size, (1, 1))
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- float skinny products (skinny_gemm.cpp) ---------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 7, 16), (1, 49, 576), (3, 50, 37), (5, 64, 576), (8, 193, 1536),
                                   (11, 64, 100), (16, 96, 576)])
def test_skinny_linear_equals_float64(wdtype, M, N, K):
    """Every tile shape (4- and 2-row weight tiles, 1..8-row passes, the one-row tail of N, a K that
    is not a multiple of the SIMD width) against the float64 product of the same values."""
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g).to(wdtype)
    got = torch.ops.evolm_f.skinny_linear(x, w)
    want = x.double() @ w.double().T
    assert got.shape == (M, N) and got.dtype == torch.float32
    # fp32 accumulation over K terms of size ~1: error ~ sqrt(K) * 2^-24 * |terms|
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5 * K ** 0.5)


@needs_kernels
def test_skinny_linear_bf16_activations_and_batch_invariance():
    """A row's result does not depend on how many other rows share the call (the kernel's tiles
    never mix rows), so batched greedy decoding equals one sequence at a time bit for bit; bf16
    activations come back in bf16."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 576, generator=g)
    w = torch.randn(300, 576, generator=g)
    full = torch.ops.evolm_f.skinny_linear(x, w)
    for m in (1, 2, 3, 5, 8, 13):
        assert torch.equal(torch.ops.evolm_f.skinny_linear(x[:m], w), full[:m])
    xb, wb = x.bfloat16(), w.bfloat16()
    yb = torch.ops.evolm_f.skinny_linear(xb, wb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), (xb.double() @ wb.double().T).float(), rtol=1e-2, atol=1e-1)


@needs_kernels
@pytest.mark.parametrize("M,N,K", [(1, 7, 16), (1, 49, 576), (2, 9, 1536), (3, 50, 37), (4, 64, 100),
                                   (5, 64, 576), (8, 193, 1536), (16, 96, 608)])
def test_skinny_linear_bf16_pairs_equal_float64(M, N, K):
    """bf16 activations times bf16 weights (the AVX512-BF16 ``vdpbf16ps`` path where the CPU has
    it, ``kernels.skinny_isa() == 'avx512bf16'``; else widened to fp32): every product of two bf16
    values is exact in fp32, so the only errors are fp32 accumulation and the final bf16 rounding.
    Covers the in-order one-weight-row tiles (1-4 rows), the 2-row tiles, K tails that are not a
    multiple of the 32-pair width, and batch invariance (each row alone gives the same bits)."""
    g = torch.Generator().manual_seed(7 * M + N + K)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    got = torch.ops.evolm_f.skinny_linear(x, w)
    assert got.shape == (M, N) and got.dtype == torch.bfloat16
    want = x.double() @ w.double().T
    torch.testing.assert_close(got.double(), want, rtol=2 ** -8, atol=2e-5 * K ** 0.5)
    for m in range(M):
        assert torch.equal(torch.ops.evolm_f.skinny_linear(x[m:m + 1], w), got[m:m + 1])


@needs_kernels
@pytest.mark.parametrize("M,N,K", [(1, 7, 16), (1, 49, 576), (3, 50, 37), (8, 193, 1536), (16, 96, 576)])
def test_skinny_linear_int8_weights_equal_float64(M, N, K):
    """Weight-only int8: y = (x . q) * scale per output row, against float64 on the same codes."""
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g)
    q = torch.randint(-127, 128, (N, K), generator=g).to(torch.int8)
    scale = torch.rand(N, generator=g) / 100 + 1e-3
    got = torch.ops.evolm_f.skinny_linear(x, q, scale)
    want = (x.double() @ q.double().T) * scale.double()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5 * K ** 0.5 * 127 * float(scale.max()))


@needs_kernels
def test_int8_linear_runs_the_skinny_kernel_at_few_rows():
    """Int8Linear takes the kernel for <= SKINNY_ROWS rows (inference) and matches its
    dequantized float product; more rows and autograd keep PyTorch's paths. (The int8-activation
    kernel, the default on AVX2-only CPUs, is switched off here: it is tested on its own.)"""
    from evolm.quant import Int8Linear, KernelPolicy

    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 200)
    q = Int8Linear(lin.weight, lin.bias, KernelPolicy(quant_kernels=False))
    assert not q.kernel
    assert q.skinny == kernels.available()
    w = q.weight.double() * q.scale.double()[:, None]
    for rows in (1, 5, kernels.SKINNY_ROWS, 40):
        x = torch.randn(rows, 576)
        with torch.no_grad():
            got = q(x)
        want = x.double() @ w.T + lin.bias.double()
        # the kernel is exact to fp32 rounding; 40 rows take PyTorch's int8 kernel (bf16 activations)
        tol = 1e-4 if rows <= kernels.SKINNY_ROWS else 3e-2
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@needs_kernels
def test_skinny_linear_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="x must be \\(M, K\\) and w \\(N, K\\)"):
        torch.ops.evolm_f.skinny_linear(torch.randn(2, 8), torch.randn(3, 9))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or int8"):
        torch.ops.evolm_f.skinny_linear(torch.randn(2, 8), torch.randn(3, 8).half())
    with pytest.raises(RuntimeError, match="int8 weights need a float32 scale per row"):
        torch.ops.evolm_f.skinny_linear(torch.randn(2, 8), torch.ones(3, 8, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="scale must be \\(N,\\)"):
        torch.ops.evolm_f.skinny_linear(torch.randn(2, 8), torch.ones(3, 8, dtype=torch.int8), torch.ones(4))


@needs_kernels
def test_q4a8_names_a_wrong_scale_layout():
    """float32 (d, m) (the layout before float16 pairs) is refused with the layout it expects."""
    codes = torch.randint(0, 16, (16, 64))
    with pytest.raises(RuntimeError, match=r"dm must be contiguous float16 \(N, K/32, 2\)"):
        torch.ops.evolm_q.q4a8_linear(torch.randn(1, 64), kernels.pack_q4(codes), torch.ones(16, 2, 2))


@needs_kernels
def test_q4_dequantize_equals_the_formula():
    """The C++ dequantization (prefill) is q * d + m with the float16 pair's values, code by code."""
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 16, (48, 96), generator=g)
    dm, d, m = _dm(0.01 + 0.02 * torch.rand(48, 3, generator=g), 0.1 * torch.randn(48, 3, generator=g))
    want = (codes.float().reshape(48, 3, 32) * d[..., None] + m[..., None]).reshape(48, 96)
    torch.testing.assert_close(torch.ops.evolm_q.q4_dequantize(kernels.pack_q4(codes), dm), want, rtol=1e-6, atol=1e-7)


def _attention_float64(q, k, v, mask, scale, softcap):
    """softmax(mask(cap(scale q.k))) v in float64, KV heads shared by H / Hkv query heads."""
    G = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


@needs_kernels
@pytest.mark.parametrize("B,H,Hkv,S,D,softcap", [
    (1, 9, 3, 300, 64, None),   # SmolLM2: GQA 3, a static cache's masked tail
    (2, 4, 4, 33, 128, None),   # MHA, two sequences with their own masks
    (3, 8, 1, 70, 256, 50.0),   # Gemma-style: MQA in blocks of 4 heads, head_dim 256, soft-cap
    (1, 12, 2, 17, 40, None),   # G = 6 (two blocks), head_dim not a multiple of 8 (scalar tails)
    (1, 2, 1, 1, 64, None),     # one slot
    (1, 6, 2, 90, 80, None),    # head_dim 80: 64 outputs per AVX-512 pass, then a 16-wide tail
    (2, 4, 2, 50, 48, 30.0),    # head_dim 48: AVX-512 keys, values on the 16-wide loop only
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_float64(B, H, Hkv, S, D, softcap, dtype):
    """evolm_f.decode_attention against float64 attention: GQA blocks, key splits between
    threads, masked slots skipped, strided cache buffers; and against the eager decode path."""
    from evolm.nn.attention import _attend_few_queries

    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S + 7, D, generator=g).to(dtype)[:, :, :S]  # a view of a longer buffer
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    mask[..., 0] = True
    want = _attention_float64(q, k, v, mask, D ** -0.5, softcap)
    tol = dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = torch.ops.evolm_f.decode_attention(q, k, v, mask, D ** -0.5, softcap)
            assert got.dtype == dtype and got.shape == (B, H, 1, D)
            torch.testing.assert_close(got.double(), want, **tol)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, _attend_few_queries(q, k, v, mask, False, D ** -0.5, softcap), **tol)
    with_mask_none = torch.ops.evolm_f.decode_attention(q, k, v, None, D ** -0.5, softcap)
    torch.testing.assert_close(with_mask_none.double(), _attention_float64(q, k, v, torch.ones_like(mask), D ** -0.5,
                                                                          softcap), **tol)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_decode_attention_row_does_not_depend_on_its_batch(threads):
    """A sequence's output is bit for bit the same alone and in a batch of sequences of other
    lengths (the server's continuous batch): its keys are split between tasks as they would be
    alone, whatever the batch and its longest row."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S, D = 6, 9, 3, 400, 64
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    lens = torch.tensor([400, 5, 130, 64, 260, 1])
    mask = (torch.arange(S)[None, :] < lens[:, None])[:, None, None, :]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        batch = torch.ops.evolm_f.decode_attention(q, k, v, mask, D ** -0.5)
        for b in range(B):
            n = int(lens[b])
            alone = torch.ops.evolm_f.decode_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], None,
                                                       D ** -0.5)
            assert torch.equal(batch[b:b + 1], alone), f"row {b} ({n} keys) changed in the batch"
    finally:
        torch.set_num_threads(before)


@needs_kernels
def test_decode_attention_rejects_bad_input():
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match=r"q must be \(B, H, 1, D\)"):
        torch.ops.evolm_f.decode_attention(torch.randn(1, 4, 2, 8), k, k, None, 1.0)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        torch.ops.evolm_f.decode_attention(torch.randn(1, 3, 1, 8), k, k, None, 1.0)
    with pytest.raises(RuntimeError, match="must all be float32 or all bfloat16"):
        torch.ops.evolm_f.decode_attention(q, k.half(), k.half(), None, 1.0)
    with pytest.raises(RuntimeError, match=r"mask must be bool \(B or 1, 1, 1, 5\)"):
        torch.ops.evolm_f.decode_attention(q, k, k, torch.ones(1, 1, 1, 4, dtype=torch.bool), 1.0)


def test_a_killed_builders_lock_is_taken_over_and_a_live_ones_waited_for(tmp_path, caplog):
    """torch's build lock outlives a builder killed mid-build; evolm must not wait for it forever."""
    import subprocess
    import threading

    from evolm.kernels import _wait_for_builder

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "lock").touch()
    (tmp_path / "builder.pid").write_text(str(dead.pid))
    with caplog.at_level("WARNING", logger="evolm.kernels"):
        _wait_for_builder(tmp_path, poll_s=0.01)
    assert not (tmp_path / "lock").exists() and "did not finish" in caplog.text

    (tmp_path / "lock").touch()  # a live builder (this process): wait until its lock goes
    (tmp_path / "builder.pid").write_text(str(os.getpid()))
    waiter = threading.Thread(target=_wait_for_builder, args=(tmp_path, 0.01))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and (tmp_path / "lock").exists()
    (tmp_path / "lock").unlink()
    waiter.join(5)
    assert not waiter.is_alive()

    (tmp_path / "lock").touch()  # no owner recorded, and older than any build
    (tmp_path / "builder.pid").unlink()
    old = time.time() - 2 * 3600
    os.utime(tmp_path / "lock", (old, old))
    _wait_for_builder(tmp_path, poll_s=0.01)
    assert not (tmp_path / "lock").exists()
