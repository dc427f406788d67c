"""evolm's C++ quantized GEMV kernels against a float64 reference of the same arithmetic.

Reference: the activations quantized to int8 per block of 32 (scale = max|x| / 127, round half to
even), the weights dequantized (q4: q * d + m per block; q8: q * s per row), the product summed in
float64. The kernels must match it to float32 rounding: any layout, nibble-order or sign mistake
is an O(1) error.
"""

import platform
import shutil

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
def test_kernel_layers_compile_and_match_eager(monkeypatch):
    """The ops trace into torch.compile (fake shapes registered) and give the eager result."""
    import evolm.quant
    from evolm.quant import Int4Linear, quantize_int4

    monkeypatch.setattr(evolm.quant, "USE_KERNELS", True)
    torch.manual_seed(0)
    model = build(get_preset("tiny-llama")).eval()
    quantize_int4(model, group_size=32, head="int8")
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
def test_int8_linear_runs_the_skinny_kernel_at_few_rows(monkeypatch):
    """quant.Int8Linear takes the kernel for <= SKINNY_ROWS rows (inference) and matches its
    dequantized float product; more rows and autograd keep PyTorch's paths. (The int8-activation
    kernel, the default on AVX2-only CPUs, is switched off here: it is tested on its own.)"""
    import evolm.quant as quant
    from evolm.quant import Int8Linear

    monkeypatch.setattr(quant, "USE_KERNELS", False)
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 200)
    q = Int8Linear(lin.weight, lin.bias)
    assert not q.kernel
    assert q.skinny == kernels.skinny_enabled()
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
