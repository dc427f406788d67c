"""Int8 weight-only quantization: close to the float model, same greedy text on a real model."""

import pytest
import torch

from evolm import build
from evolm.presets import get_preset
from evolm.quant import Int8Linear, KernelPolicy, quantize_int8


@pytest.mark.parametrize("kernel", ["reduce", "int8pack", "evolm"])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int8_linear_is_close_to_the_float_layer(rows, kernel):
    """Every few-row kernel (the compiled multiply-reduce and int8pack with bf16 activations, which
    one runs depends on the CPU, ``KernelPolicy.int8_row``; evolm's int8-activation kernel where it
    builds) computes the dequantized layer."""
    policy = KernelPolicy(int8_row="reduce" if kernel == "evolm" else kernel, quant_kernels=kernel == "evolm")
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear(lin.weight, lin.bias, policy)
    x = torch.randn(rows, 64)
    with torch.no_grad():
        want, got = lin(x), q(x)
    rel = (got - want).norm() / want.norm()
    assert rel < 1e-2, rel
    assert q.weight.dtype == torch.int8 and q.weight.numel() == lin.weight.numel()


@pytest.mark.parametrize("dequant", [False, True])
def test_int8_linear_many_bf16_rows_equal_the_bf16_product_of_its_weights(dequant):
    """A prompt (many rows) in a bf16 model: by default the int8 weights are dequantized with the
    scale folded in (q * scale rounded once to bf16) and multiplied in bf16, which is then exactly
    the bf16 layer of those weights; int8pack (``int8_dequant_low_precision=False``) is close to it."""
    import torch.nn.functional as F

    import evolm.quant.int8

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    q = Int8Linear(lin.weight, None, KernelPolicy(int8_row="reduce", int8_dequant_low_precision=dequant))
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    w = (q.weight.float() * q.scale.float()[:, None]).to(torch.bfloat16)  # exact product, one rounding
    with torch.no_grad():
        got, want = q(x), F.linear(x, w)
    if dequant or not evolm.quant.int8._HAS_KERNEL:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        assert ((got.float() - want.float()).norm() / want.float().norm()) < 1e-2


def test_quantized_model_keeps_its_predictions():
    torch.manual_seed(0)
    model = build(get_preset("tiny-llama")).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        want = model(x)
        quantize_int8(model)
        got = model(x)
    assert isinstance(model.layers[0].self_attn.q_proj, Int8Linear)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    assert ((got - want).norm() / want.norm()) < 2e-2


# ------------------------------------------------------------------------------------------
# int4 (group-wise, asymmetric): reference = the dequantization formula w = q * scale + min
# ------------------------------------------------------------------------------------------
from evolm.quant.int4 import Int4Linear, int4_supported, quantize_int4  # noqa: E402


def _q4_1_weight(n: int, k: int, group: int = 32, seed: int = 0) -> torch.Tensor:
    """A weight already of llama.cpp's Q4_1 form: per block of 32, w = q * d + m, q in 0..15 (both ends
    used), d and m float16 values as the file stores them."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // group, group), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    d = 0.01 + 0.02 * torch.rand(n, k // group, 1, generator=g)
    m = -8 * d + 0.01 * torch.randn(n, k // group, 1, generator=g)
    return (q * d.half().float() + m.half().float()).reshape(n, k)


@pytest.mark.parametrize("use_kernels", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_int4_linear_computes_its_dequantized_weight(dtype, rows, use_kernels):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48).to(dtype)
    q = Int4Linear(lin.weight, lin.bias, group_size=32, policy=KernelPolicy(quant_kernels=use_kernels))
    w = q.dequantize().float()
    # formula check: every group of 32 inputs of a row holds at most 16 distinct values on an even grid
    grp = w.reshape(48, 4, 32)
    lo, hi = grp.amin(-1, keepdim=True), grp.amax(-1, keepdim=True)
    steps = (grp - lo) / ((hi - lo) / 15)
    assert (steps - steps.round()).abs().max() < 0.1  # bf16 scales and minima round the grid a little
    assert (w - lin.weight.float()).abs().max() <= ((hi - lo) / 15).max() / 2 + 1e-2
    x = torch.randn(rows, 128).to(dtype)
    with torch.no_grad():
        got = q(x).float()
    want = x.float() @ w.t() + lin.bias.float()
    assert ((got - want).norm() / want.norm()) < 1e-2  # the kernel runs on bf16 activations
    assert q.weight.dtype == torch.uint8 and q.weight.numel() == 48 * 128 // 2


@pytest.mark.parametrize("use_kernels", [False, True])
def test_int4_requantizes_a_q4_1_weight_exactly(use_kernels):
    """On weights of Q4_1 form (what load_gguf gives for a Q4_1 file) group-32 int4 keeps every code;
    int4pack adds only the bf16 rounding of scale and minimum (|error| <= 2^-8 of the block's
    magnitude), evolm's layout (float16 scale and minimum, as the file) only float32 rounding."""
    w = _q4_1_weight(32, 96)
    q = Int4Linear(w, None, group_size=32, policy=KernelPolicy(quant_kernels=use_kernels))
    err = (q.dequantize().float() - w).abs().reshape(32, 3, 32)
    step = (w.reshape(32, 3, 32).amax(-1) - w.reshape(32, 3, 32).amin(-1)) / 15
    assert (err.amax(-1) < 0.1 * step).all()  # far below half a quantization step: no code changed
    if q.layout == "q4":
        assert err.max() < 1e-6


def test_int4_shape_rules_and_fallback():
    assert int4_supported(48, 64, 32) and not int4_supported(40, 64, 32) and not int4_supported(48, 48, 32)
    with pytest.raises(ValueError, match="out_features % 16"):
        Int4Linear(torch.randn(40, 64), None)
    torch.manual_seed(0)
    model = build(get_preset("tiny-llama")).eval()
    quantize_int4(model, group_size=32, head="int8")
    assert isinstance(model.layers[0].mlp.up_proj, Int4Linear)
    assert isinstance(model.lm_head, Int8Linear)
    with pytest.raises(ValueError, match="head must be"):
        quantize_int4(model, head="int3")


def test_int4_model_keeps_its_predictions():
    torch.manual_seed(0)
    model = build(get_preset("tiny-llama")).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        want = model(x)
        quantize_int4(model, group_size=32, head="int4")
        got = model(x)
    assert isinstance(model.lm_head, Int4Linear)
    # random N(0, 0.02) weights are the hard case for 4 bits (no outliers, no structure): ~7% error
    assert ((got - want).norm() / want.norm()) < 0.12
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.7


def test_replace_linears_visits_each_linear_once_by_its_full_name():
    """The one walker every format uses: each nn.Linear offered once under its full name, None keeps
    it, and the layers it puts in are not walked again."""
    from evolm.quant import replace_linears

    model = build(get_preset("tiny-llama"))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    offered = []

    def make(name, lin):
        offered.append(name)
        return None if name.endswith("o_proj") else torch.nn.Sequential(torch.nn.Linear(2, 2))

    assert replace_linears(model, make) == len(names) - sum(n.endswith("o_proj") for n in names)
    assert sorted(offered) == sorted(names)
    assert isinstance(model.layers[0].self_attn.o_proj, torch.nn.Linear)
    assert isinstance(model.layers[0].self_attn.q_proj, torch.nn.Sequential)


def test_quantized_layers_keep_the_policy_choices():
    """A layer takes its kernel choices from the policy it is built with (never from a global)."""
    lin = torch.nn.Linear(64, 48)
    off = Int8Linear(lin.weight, lin.bias, KernelPolicy(quant_kernels=False, skinny=False, int8_row="int8pack",
                                                        int8_dequant_rows=7))
    assert not off.kernel and not off.skinny and off.row_kernel == "int8pack" and off.dequant_rows == 7
    model = quantize_int8(build(get_preset("tiny-llama")), policy=KernelPolicy(quant_kernels=False))
    assert not any(m.kernel for m in model.modules() if isinstance(m, Int8Linear))
