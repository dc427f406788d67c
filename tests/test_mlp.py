"""Feed-forward layers (evolm/nn/mlp.py) against the formulas and transformers' MLPs.

GELU (Hendrycks & Gimpel 2016): exact ``x * Phi(x)`` and the tanh approximation GPT-2 uses;
GLU variants (Shazeer 2020): ``down(act(gate(x)) * up(x))`` with SiLU (SwiGLU) or GELU (GeGLU).
References: the formulas written out here, transformers' ACT2FN, GPT2MLP, LlamaMLP and GemmaMLP.
"""

import math

import pytest
import torch

from evolm import ModelConfig
from evolm.nn.mlp import MLP, activation_fn

D, F = 16, 40


def _cfg(**kw):
    return ModelConfig(d_model=D, n_heads=2, d_ff=F, **kw)


def _x():
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(0)) * 2


def _randomize(m):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


FORMULAS = {
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "silu": lambda x: x * torch.sigmoid(x),
    "relu": lambda x: x.clamp(min=0),
}
HF_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "relu": "relu"}


@pytest.mark.parametrize("name", list(FORMULAS))
def test_activation_matches_formula_and_act2fn(name):
    from transformers.activations import ACT2FN

    x = torch.linspace(-6, 6, 241, dtype=torch.float64)
    torch.testing.assert_close(activation_fn(name)(x), FORMULAS[name](x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(activation_fn(name)(x), ACT2FN[HF_NAMES[name]](x))


def test_gelu_exact_and_tanh_differ():
    x = torch.tensor([1.5], dtype=torch.float64)
    assert (activation_fn("gelu")(x) - activation_fn("gelu_tanh")(x)).abs().item() > 1e-5


def _lin(x, lin):
    y = x @ lin.weight.T
    return y + lin.bias if lin.bias is not None else y


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_plain_mlp_formula(activation, bias):
    m = _randomize(MLP(_cfg(mlp="mlp", activation=activation, mlp_bias=bias)))
    assert not hasattr(m, "gate_proj")
    assert (m.up_proj.bias is None) == (not bias)
    x = _x()
    ref = _lin(FORMULAS[activation](_lin(x, m.up_proj)), m.down_proj)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])  # SwiGLU, GeGLU (tanh), GeGLU (erf)
def test_glu_formula(activation):
    m = _randomize(MLP(_cfg(mlp="glu", activation=activation, mlp_bias=False)))
    assert m.gate_proj.weight.shape == m.up_proj.weight.shape == (F, D)
    x = _x()
    ref = _lin(FORMULAS[activation](_lin(x, m.gate_proj)) * _lin(x, m.up_proj), m.down_proj)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-6)


def test_gpt2_mlp_matches_transformers():
    """GPT-2 stores Conv1D weights as (in, out): ours are their transpose."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    ours = _randomize(MLP(_cfg(mlp="mlp", activation="gelu_tanh", mlp_bias=True)))
    ref = GPT2MLP(F, GPT2Config(n_embd=D, activation_function="gelu_new", resid_pdrop=0.0)).eval()
    with torch.no_grad():
        ref.c_fc.weight.copy_(ours.up_proj.weight.T)
        ref.c_fc.bias.copy_(ours.up_proj.bias)
        ref.c_proj.weight.copy_(ours.down_proj.weight.T)
        ref.c_proj.bias.copy_(ours.down_proj.bias)
    x = _x()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family,activation", [("llama", "silu"), ("gemma", "gelu_tanh")])
def test_glu_matches_transformers(family, activation):
    import transformers

    if family == "llama":
        hf_cfg = transformers.LlamaConfig(hidden_size=D, num_attention_heads=2, intermediate_size=F,
                                            hidden_act="silu")
        from transformers.models.llama.modeling_llama import LlamaMLP as Ref
    else:
        hf_cfg = transformers.GemmaConfig(hidden_size=D, num_attention_heads=2, head_dim=8, intermediate_size=F,
                                            hidden_activation="gelu_pytorch_tanh")
        from transformers.models.gemma.modeling_gemma import GemmaMLP as Ref
    ours = _randomize(MLP(_cfg(mlp="glu", activation=activation, mlp_bias=False)))
    ref = Ref(hf_cfg)
    ref.load_state_dict(ours.state_dict(), strict=True)  # gate_proj / up_proj / down_proj, same names
    x = _x()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def test_mlp_bf16():
    m = _randomize(MLP(_cfg(mlp="glu", activation="silu", mlp_bias=False)))
    x = _x()
    y32 = m(x)
    y16 = m.bfloat16()(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=5e-2, atol=5e-2)
