"""Normalization layers (evolm/nn/norm.py) against torch, the papers' formulas and transformers.

References: LayerNorm (Ba et al. 2016) = torch.nn.LayerNorm; RMSNorm (Zhang & Sennrich 2019)
written out here and as transformers' LlamaRMSNorm; Gemma's ``x * (1 + w)`` as transformers'
GemmaRMSNorm / Gemma2RMSNorm / Gemma3RMSNorm with the same stored weight.
"""

import pytest
import torch

from evolm import ModelConfig
from evolm.nn.norm import LayerNorm, RMSNorm, make_norm

D = 32


def _x(dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 5, D, generator=g) * scale + 0.7).to(dtype)


def _randomize(*mods):
    g = torch.Generator().manual_seed(1)
    for m in mods:
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1.0)


def _rms_formula(x, w, eps, unit_offset=False):
    """y_i = x_i / sqrt(mean_j x_j^2 + eps) * g_i  (computed in float64)."""
    xd = x.double()
    y = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    return y * ((1.0 + w.double()) if unit_offset else w.double())


# --- LayerNorm ------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch_and_formula(bias):
    ours = LayerNorm(D, eps=1e-5, bias=bias)
    ref = torch.nn.LayerNorm(D, eps=1e-5, bias=bias)
    _randomize(ours)
    with torch.no_grad():
        ref.weight.copy_(ours.weight)
        if bias:
            ref.bias.copy_(ours.bias)
    assert (ours.bias is None) == (not bias)
    assert len(list(ours.parameters())) == (2 if bias else 1)
    x = _x()
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)
    # (x - mean) / sqrt(var + eps) * w + b, biased variance as in the paper
    xd = x.double()
    mu, var = xd.mean(-1, keepdim=True), xd.var(-1, unbiased=False, keepdim=True)
    y = (xd - mu) / torch.sqrt(var + 1e-5) * ours.weight.double()
    if bias:
        y = y + ours.bias.double()
    torch.testing.assert_close(ours(x).double(), y, rtol=1e-5, atol=1e-5)


# --- RMSNorm --------------------------------------------------------------------------------
def test_rmsnorm_matches_formula_and_llama():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ours, ref = RMSNorm(D, eps=1e-6), LlamaRMSNorm(D, eps=1e-6)
    _randomize(ours)
    ref.weight.data.copy_(ours.weight.data)
    x = _x()
    assert torch.equal(ours(x), ref(x))
    torch.testing.assert_close(ours(x).double(), _rms_formula(x, ours.weight, 1e-6), rtol=1e-5, atol=1e-6)
    # no centring: RMSNorm is not shift invariant, LayerNorm is
    assert not torch.allclose(ours(x + 5.0), ours(x), atol=1e-3)


@pytest.mark.parametrize("hf_cls", ["gemma.modeling_gemma.GemmaRMSNorm",
                                    "gemma2.modeling_gemma2.Gemma2RMSNorm",
                                    "gemma3.modeling_gemma3.Gemma3RMSNorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_unit_offset_matches_hf(hf_cls, dtype):
    import importlib

    mod, cls = hf_cls.rsplit(".", 1)
    ref = getattr(importlib.import_module(f"transformers.models.{mod}"), cls)(D, eps=1e-6)
    ours = RMSNorm(D, eps=1e-6, unit_offset=True)
    assert torch.equal(ours.weight, torch.zeros(D)), "Gemma stores w = 0 for a unit scale"
    _randomize(ours)
    ours.weight.data -= 1.0  # around 0, as trained Gemma weights are
    ref.weight.data.copy_(ours.weight.data)
    ours, ref = ours.to(dtype), ref.to(dtype)
    x = _x(dtype)
    assert torch.equal(ours(x), ref(x))
    torch.testing.assert_close(ours(x).double(), _rms_formula(x.float(), ours.weight.float(), 1e-6, True),
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_rmsnorm_bf16_matches_llama_bitwise():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ours, ref = RMSNorm(D, eps=1e-5), LlamaRMSNorm(D, eps=1e-5)
    _randomize(ours)
    ref.weight.data.copy_(ours.weight.data)
    ours, ref = ours.bfloat16(), ref.bfloat16()
    x = _x(torch.bfloat16)
    y = ours(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, ref(x))


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rmsnorm_statistics_in_float32(unit_offset):
    """fp16 activations of ~1000: x^2 overflows fp16 (max 65504); stats in fp32 do not."""
    n = RMSNorm(D, eps=1e-6, unit_offset=unit_offset).half()
    x = torch.full((1, D), 1000.0).half()
    x[0, ::2] = -1000.0
    assert torch.isinf(x.pow(2).mean()), "the naive fp16 computation overflows"
    y = n(x)
    assert y.dtype == torch.float16
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float().abs(), torch.ones(1, D), rtol=1e-3, atol=1e-3)


def test_layernorm_bf16_keeps_dtype_and_is_close():
    ln = LayerNorm(D)
    _randomize(ln)
    x = _x()
    y16 = ln.bfloat16()(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), ln.float()(x), rtol=2e-2, atol=2e-2)


# --- selection by config ----------------------------------------------------------------------
def test_make_norm_follows_config():
    n = make_norm(ModelConfig(d_model=D, n_heads=4, norm="layernorm", norm_bias=False, norm_eps=1e-3))
    assert isinstance(n, LayerNorm) and n.bias is None and n.eps == 1e-3
    n = make_norm(ModelConfig(d_model=D, n_heads=4, norm="rmsnorm", norm_unit_offset=True), dim=8)
    assert isinstance(n, RMSNorm) and n.unit_offset and n.weight.shape == (8,)
    x = _x()[..., :8]
    # a fresh Gemma norm (w = 0) scales by exactly 1
    torch.testing.assert_close(n(x).double(), _rms_formula(x, torch.ones(8), n.eps), rtol=1e-5, atol=1e-6)
