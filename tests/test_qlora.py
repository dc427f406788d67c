"""NF4 quantization and QLoRA.

References: the NF4 table published with the QLoRA paper (Dettmers et al. 2023, appendix E);
``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` (packed bytes, block constants and
dequantized values bit for bit) when bitsandbytes is installed; and, always, a straightforward
re-implementation from the paper's description written here (nearest code by brute force).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from evolm.config import ModelConfig
from evolm.model import Transformer
from evolm.post.lora import LoRAConfig, LoRALinear, apply_lora, lora_modules, merge_lora, trainable_parameters
from evolm.quant.nf4 import (NF4Linear, dequantize_absmax, dequantize_nf4, dynamic_code, nf4_bytes, nf4_code,
                            quantize_absmax, quantize_base_nf4, quantize_nf4)

pytestmark = pytest.mark.usefixtures("one_thread")

# QLoRA paper, appendix E (also bitsandbytes' get_4bit_type("nf4")): the exact float32 values
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]
SHAPES = [(128, 64), (96, 200), (37, 50), (3, 7), (1, 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

V = 128
TINY = dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64,
            norm="rmsnorm", pos_emb="rope", mlp="glu", activation="silu", mlp_bias=False, tie_embeddings=False,
            init_std=0.05)


def weights(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def reference_nf4(w: torch.Tensor, block: int = 64):
    """The paper, literally: per block of 64, divide by absmax, pick the nearest of the 16 values."""
    code = torch.tensor(PUBLISHED_NF4, dtype=torch.float64)
    x = w.reshape(-1).double()
    idx, scales = [], []
    for s in range(0, x.numel(), block):
        b = x[s:s + block]
        m = b.abs().max()
        scales.append(m)
        idx.append((b / m if m > 0 else b)[:, None].sub(code).abs().argmin(dim=1))
    idx = torch.cat(idx)
    deq = torch.cat([code[idx[s:s + block]] * scales[i] for i, s in enumerate(range(0, x.numel(), block))])
    return idx, torch.stack(scales), deq.reshape(w.shape)


# =========================================================================================
# the format
# =========================================================================================
def test_nf4_code_is_the_published_table():
    code = nf4_code()
    assert code.dtype == torch.float32
    assert code.tolist() == PUBLISHED_NF4  # exact, derived from N(0,1) quantiles as in the paper
    # properties the paper states: symmetric-ish, exact zero, 8 positive / 7 negative, ends at +-1
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7 and code[7] == 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_the_paper_reference(shape, dtype):
    w = weights(shape, dtype)
    packed, absmax = quantize_nf4(w)
    idx, scales, deq = reference_nf4(w.float())
    n = w.numel()
    ours = torch.stack((packed >> 4, packed & 15), dim=1).reshape(-1)[:n].long()
    agree = (ours == idx).float().mean().item()
    assert agree >= 0.999  # float32 vs float64 scaling may flip a value sitting exactly between two codes
    torch.testing.assert_close(absmax.double(), scales, rtol=0, atol=0)
    torch.testing.assert_close(dequantize_nf4(packed, absmax, w.shape, torch.float64), deq, rtol=1e-6, atol=1e-7)
    # 4-bit packing: two codes per byte, 4.5 bits per weight with the constants
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2 and absmax.numel() == -(-n // 64)


def test_quantization_error_is_what_nf4_promises():
    """Normal weights: NF4's mean absolute error is ~1/10 of the weights' scale (paper, fig. 2 regime)."""
    w = weights((512, 512))
    p, a = quantize_nf4(w)
    err = (dequantize_nf4(p, a, w.shape) - w).abs().mean() / w.abs().mean()
    assert 0.05 < err < 0.12, err


def test_double_quantization_round_trip():
    w = weights((256, 512))
    p, a = quantize_nf4(w)
    codes, scale, offset = quantize_absmax(a)
    assert codes.dtype == torch.uint8 and scale.numel() == -(-a.numel() // 256)
    back = dequantize_absmax(codes, scale, offset)
    assert (back - a).abs().max() <= 0.01 * a.max()  # 8-bit dynamic code on the constants
    assert dynamic_code().numel() == 256 and dynamic_code()[-1] == 1.0


bnb = None
try:  # bitsandbytes runs on CPU since 0.45; skip its comparisons where it does not import
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as bnb  # noqa: F811
except Exception:  # pragma: no cover - optional reference
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed (pip install bitsandbytes)")


@needs_bnb
@pytest.mark.parametrize("shape", SHAPES + [(512, 1024)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_exact_with_bitsandbytes(shape, dtype):
    w = weights(shape, dtype, seed=shape[0])
    packed, absmax = quantize_nf4(w)
    ref_packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, ref_packed.view(-1))
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(dequantize_nf4(packed, absmax, w.shape, dtype), bnb.dequantize_4bit(ref_packed, state))
    assert torch.equal(nf4_code(), bnb.get_4bit_type("nf4", device="cpu"))


@needs_bnb
def test_double_quantization_against_bitsandbytes():
    """Same code table and scheme; bitsandbytes' CPU kernel rounds a few near-midpoint constants the
    other way (its search is not exactly nearest): decoding its codes gives its constants bit for bit,
    ours agree on >= 99% of codes and are never further from the true value."""
    assert torch.equal(dynamic_code(), bnb.create_dynamic_map(signed=True))
    w = weights((1024, 1024), seed=3)
    _, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    _, plain = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    absmax = plain.absmax
    ref = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(dequantize_absmax(state.absmax, state.state2.absmax, state.offset), ref)
    codes, scale, offset = quantize_absmax(absmax)
    assert torch.equal(scale, state.state2.absmax) and torch.equal(offset, state.offset)
    assert (codes == state.absmax).float().mean() >= 0.99
    x = (absmax - offset) / scale.repeat_interleave(256)[: absmax.numel()]
    code = dynamic_code()
    assert ((code[codes.long()] - x).abs() <= (code[state.absmax.long()] - x).abs() + 1e-7).all()


# =========================================================================================
# the layer
# =========================================================================================
def test_nf4_linear_forward_and_backward():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = NF4Linear.from_linear(lin)
    w = q.dequantize(torch.bfloat16)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = q(x)
    assert y.dtype == torch.float32
    ref = (F.linear(x.detach().bfloat16(), w) + lin.bias.bfloat16()).float()
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    ((F.linear(x2.bfloat16(), w) + lin.bias.bfloat16()).float().square().sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert not list(q.parameters(recurse=True)) or all(not p.requires_grad for p in q.parameters())
    # model.to(bf16) keeps the block constants in float32
    assert q.to(torch.bfloat16).absmax.dtype == torch.float32
    dq = NF4Linear.from_linear(lin, double_quant=True)
    assert (dq.dequantize(torch.float32) - q.dequantize(torch.float32)).abs().max() < 0.02 * lin.weight.abs().max()


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(name="tiny", **TINY)).eval()


def set_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def test_quantize_skips_head_and_counts_parameters():
    model = tiny_model()
    total = sum(p.numel() for p in model.parameters())
    quantize_base_nf4(model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))}
    assert kinds.pop("lm_head") == "Linear" and set(kinds.values()) == {"NF4Linear"} and len(kinds) == 14
    assert trainable_parameters(model)[1] == total
    n = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    assert nf4_bytes(model) == n // 2 + 4 * (n // 64)  # 4.5 bits per weight


@pytest.mark.parametrize("order", ["lora_first", "nf4_first"])
def test_qlora_is_lora_on_the_dequantized_base(order):
    """QLoRA logits == LoRA on a float model holding the dequantized NF4 weights, up to bf16 compute;
    and applying LoRA before or after quantizing gives the same model."""
    base = tiny_model()
    cfg = LoRAConfig(r=4, alpha=8, targets="all-linear")
    qlora = copy.deepcopy(base)
    if order == "lora_first":
        apply_lora(qlora, cfg)
        quantize_base_nf4(qlora)
    else:
        quantize_base_nf4(qlora)
        apply_lora(qlora, cfg)
    set_adapters(qlora)
    assert {m.lora_A.weight.dtype for m in lora_modules(qlora).values()} == {torch.bfloat16}
    assert all(isinstance(m.base, NF4Linear) for m in lora_modules(qlora).values())
    # the reference: plain float32 LoRA on the dequantized weights, same adapter values
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, m in qlora.named_modules():
            if isinstance(m, NF4Linear):
                ref.get_submodule(name.removesuffix(".base")).weight.copy_(m.dequantize(torch.float32))
    apply_lora(ref, cfg)
    with torch.no_grad():
        for name, m in lora_modules(qlora).items():
            r = ref.get_submodule(name)
            r.lora_A.weight.copy_(m.lora_A.weight.float())
            r.lora_B.weight.copy_(m.lora_B.weight.float())
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, plain = qlora(ids), ref(ids), base(ids)
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 2e-2, rel  # bf16 activations in the linears
    assert (b - plain).norm() / plain.norm() > 5 * rel  # the adapters and the 4-bit base matter more than that


def test_qlora_training_step_changes_only_adapters():
    model = tiny_model().train()
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets="q_proj,v_proj,down_proj"))
    quantize_base_nf4(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in params} == {torch.bfloat16}
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if ".lora_" in k}


def test_merge_nf4_base():
    model = tiny_model()
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    quantize_base_nf4(model, double_quant=True)
    set_adapters(model)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
        merge_lora(model, dtype=torch.float32)
        got = model(ids)
    assert not any(isinstance(m, (NF4Linear, LoRALinear)) for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert ((got - want).norm() / want.norm()).item() < 2e-2  # want ran its linears in bf16
    assert set(model.state_dict()) == set(tiny_model().state_dict())
