"""Mixture of experts (evolm/nn/moe.py) against a per-token loop and transformers' MoE blocks.

The naive reference routes one token at a time exactly as the papers describe: router logits,
softmax (Mixtral, Qwen3-MoE) or sigmoid (DeepSeek-V3) scores, an optional per-expert selection
bias that changes *which* experts are picked but not their weights, group-limited routing, top-k,
optional renormalisation, routed scaling, then the weighted sum of the chosen experts plus the
always-on shared experts. The same weights are also loaded into transformers'
MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock and DeepseekV3MoE.
"""

import pytest
import torch

from evolm import ModelConfig
from evolm.nn.moe import MoE

D, F, N_TOK = 16, 12, 40


def _cfg(**kw):
    base = dict(d_model=D, n_heads=2, mlp="glu", activation="silu", mlp_bias=False, n_experts=8,
                n_experts_per_tok=2, moe_d_ff=F)
    base.update(kw)
    return ModelConfig(**base)


def _moe(cfg, seed=0, bias_scale=0.0):
    torch.manual_seed(seed)
    m = MoE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        if m.gate.e_score_correction_bias is not None:
            m.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_experts, generator=g) * bias_scale)
    return m


def _x(n=N_TOK, seed=1):
    return torch.randn(2, n // 2, D, generator=torch.Generator().manual_seed(seed))


def _route_one(cfg, logits, bias):
    """Expert indices and weights for one token's router logits (E,)."""
    E, k = cfg.n_experts, cfg.n_experts_per_tok
    scores = torch.sigmoid(logits) if cfg.router == "sigmoid" else torch.softmax(logits, -1)
    choice = scores + bias if bias is not None else scores.clone()
    if cfg.n_expert_groups > 1:
        per = E // cfg.n_expert_groups
        groups = choice.view(cfg.n_expert_groups, per)
        # DeepSeek-V3: a group's score is the sum of its 2 best experts; V2: its best expert
        gscore = groups.sort(descending=True).values[:, :2].sum(-1) if cfg.router == "sigmoid" \
            else groups.max(-1).values
        kept = gscore.argsort(descending=True)[:cfg.topk_groups]
        allowed = torch.zeros(E, dtype=torch.bool)
        for gi in kept.tolist():
            allowed[gi * per:(gi + 1) * per] = True
        choice = choice.masked_fill(~allowed, float("-inf"))
    idx = choice.argsort(descending=True)[:k]
    w = scores[idx]  # the bias picks experts; the weights come from the unbiased scores
    if cfg.norm_topk_prob:
        w = w / w.sum()
    return idx, w * cfg.routed_scaling_factor


def _expert(cfg, m, e, x):
    h = m.experts.gate_up_proj[e].double() @ x
    act = {"silu": torch.nn.functional.silu, "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
           "gelu": torch.nn.functional.gelu, "relu": torch.relu}[cfg.activation]
    h = act(h[:cfg.moe_d_ff]) * h[cfg.moe_d_ff:] if cfg.mlp == "glu" else act(h)
    return m.experts.down_proj[e].double() @ h


def naive_moe(m, cfg, x):
    xs = x.reshape(-1, D).double()
    W = m.gate.weight.double()
    bias = m.gate.e_score_correction_bias
    out = torch.zeros_like(xs)
    for t in range(xs.shape[0]):  # one token at a time
        idx, w = _route_one(cfg, W @ xs[t], None if bias is None else bias.double())
        for e, we in zip(idx.tolist(), w):
            out[t] += we * _expert(cfg, m, e, xs[t])
        if m.shared_experts is not None:
            s = m.shared_experts
            out[t] += s.down_proj.weight.double() @ (torch.nn.functional.silu(s.gate_proj.weight.double() @ xs[t])
                                                     * (s.up_proj.weight.double() @ xs[t]))
    return out.view(x.shape)


CASES = {
    "softmax_top2_renorm": dict(),
    "softmax_top2_no_renorm": dict(norm_topk_prob=False),
    "softmax_top1": dict(n_experts_per_tok=1),
    "softmax_top3_scaled": dict(n_experts_per_tok=3, routed_scaling_factor=1.7),
    "softmax_groups_v2": dict(n_expert_groups=4, topk_groups=2, norm_topk_prob=False),
    "sigmoid_bias_groups_shared": dict(router="sigmoid", router_bias=True, n_expert_groups=4, topk_groups=2,
                                       routed_scaling_factor=2.5, n_shared_experts=1),
    "sigmoid_no_renorm": dict(router="sigmoid", norm_topk_prob=False),
    "shared_two": dict(n_shared_experts=2),
    "plain_mlp_experts": dict(mlp="mlp", activation="gelu_tanh"),
    "geglu_experts": dict(activation="gelu_tanh"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_moe_matches_per_token_loop(name):
    cfg = _cfg(**CASES[name])
    m = _moe(cfg, bias_scale=0.3).eval()
    x = _x()
    with torch.no_grad():
        y = m(x)
    torch.testing.assert_close(y.double(), naive_moe(m, cfg, x), rtol=1e-4, atol=1e-5)
    assert int(m.expert_counts.sum()) == N_TOK * cfg.n_experts_per_tok


def test_selection_bias_changes_choice_not_weights():
    cfg = _cfg(router="sigmoid", router_bias=True, norm_topk_prob=False)
    m = _moe(cfg)
    xf = _x().reshape(-1, D)
    _, w0, idx0 = m.gate(xf)
    with torch.no_grad():
        m.gate.e_score_correction_bias[3] = 10.0  # force expert 3 into every top-k
    logits, w1, idx1 = m.gate(xf)
    assert (idx1 == 3).any(-1).all()
    torch.testing.assert_close(w1, torch.sigmoid(logits).gather(1, idx1))  # weight = unbiased score
    assert not torch.equal(idx0, idx1)


# --- against transformers -------------------------------------------------------------------------
def _hf_check(ours, ref, x):
    ref.load_state_dict(ours.state_dict(), strict=True)  # same names and layouts as transformers
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def test_matches_mixtral_sparse_moe_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=8, num_experts_per_tok=2,
                       num_attention_heads=2, hidden_act="silu")
    hf._experts_implementation = "eager"
    _hf_check(_moe(_cfg()).eval(), MixtralSparseMoeBlock(hf).eval(), _x())


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_matches_qwen3_moe_sparse_block(norm_topk_prob):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=8, num_experts_per_tok=3,
                        num_attention_heads=2, norm_topk_prob=norm_topk_prob, hidden_act="silu")
    hf._experts_implementation = "eager"
    ours = _moe(_cfg(n_experts_per_tok=3, norm_topk_prob=norm_topk_prob)).eval()
    _hf_check(ours, Qwen3MoeSparseMoeBlock(hf).eval(), _x())


@pytest.mark.parametrize("groups,topk_groups", [(4, 2), (1, 1), (2, 1)])
def test_matches_deepseek_v3_moe(groups, topk_groups):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf = DeepseekV3Config(hidden_size=D, moe_intermediate_size=F, n_routed_experts=8, num_experts_per_tok=3,
                          n_group=groups, topk_group=topk_groups, n_shared_experts=1, routed_scaling_factor=2.5,
                          norm_topk_prob=True, num_attention_heads=2, hidden_act="silu")
    hf._experts_implementation = "eager"
    cfg = _cfg(n_experts_per_tok=3, router="sigmoid", router_bias=True, n_expert_groups=groups,
               topk_groups=topk_groups, n_shared_experts=1, routed_scaling_factor=2.5)
    _hf_check(_moe(cfg, bias_scale=0.2).eval(), DeepseekV3MoE(hf).eval(), _x())


# --- auxiliary losses ---------------------------------------------------------------------------------
def test_aux_and_z_loss_values():
    cfg = _cfg(moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001)
    m = _moe(cfg).train()
    x = _x()
    m(x)
    logits = x.reshape(-1, D) @ m.gate.weight.T
    probs = torch.softmax(logits, -1)
    top = probs.topk(2, -1).indices
    f = torch.stack([(top == e).sum() for e in range(8)]).float() / top.shape[0]  # tokens sent to i / tokens
    P = probs.mean(0)  # mean router probability
    switch = 8 * (f * P).sum()  # Switch Transformer eq. 4 (E * sum_i f_i P_i); k when balanced
    z = torch.logsumexp(logits, -1).pow(2).mean()  # ST-MoE eq. 5
    torch.testing.assert_close(m.aux_loss, 0.01 * switch + 0.001 * z, rtol=1e-5, atol=1e-7)


def test_aux_loss_relates_to_transformers_load_balancing_loss():
    """Like transformers, f_i counts tokens per expert (sum_i f_i = k), so the coefficients transfer."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cfg = _cfg(n_experts_per_tok=2, moe_aux_loss_coef=1.0)
    m = _moe(cfg).train()
    x = _x()
    m(x)
    logits = x.reshape(-1, D) @ m.gate.weight.T
    ref = load_balancing_loss_func((logits,), 8, 2)
    torch.testing.assert_close(m.aux_loss, ref, rtol=1e-5, atol=1e-6)


def test_no_aux_loss_in_eval_or_without_coefficients():
    m = _moe(_cfg(moe_aux_loss_coef=0.01)).eval()
    m(_x())
    assert m.aux_loss is None
    m = _moe(_cfg()).train()
    m(_x())
    assert m.aux_loss is None


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_gradients_reach_router_experts_and_shared(router):
    cfg = _cfg(router=router, router_bias=router == "sigmoid", n_shared_experts=1,
               moe_aux_loss_coef=0.01 if router == "softmax" else 0.0)
    m = _moe(cfg).train()
    x = _x().requires_grad_(True)
    y = m(x)
    loss = (y ** 2).sum() + (m.aux_loss if m.aux_loss is not None else 0)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0
    if router == "sigmoid":
        assert m.gate.e_score_correction_bias.grad is None  # moved by update_bias, not by gradients
    # the aux loss alone also trains the router
    if router == "softmax":
        m.zero_grad()
        m(x.detach())
        m.aux_loss.backward()
        assert m.gate.weight.grad.abs().sum() > 0


def test_update_bias_moves_towards_balance():
    cfg = _cfg(router="sigmoid", router_bias=True)
    m = _moe(cfg).eval()
    with torch.no_grad():
        m.gate.weight[0] += 1.5  # a router that loves expert 0 ...
        m.gate.weight[1] += 1.0
    x = _x(n=400, seed=2) + 0.5  # ... for inputs with a positive mean
    with torch.no_grad():
        m(x)
    counts0 = m.expert_counts.clone()
    m.gate.update_bias(counts0, rate=0.01)
    bias = m.gate.e_score_correction_bias
    over, under = counts0 > counts0.float().mean(), counts0 < counts0.float().mean()
    assert (bias[over] < 0).all() and (bias[under] > 0).all()

    def load():  # routing only: the bias acts on the choice of experts
        return torch.bincount(m.gate(x.reshape(-1, D))[2].reshape(-1), minlength=8).float()

    for _ in range(150):
        m.gate.update_bias(load(), rate=0.01)
    counts = load()
    imbalance0 = counts0.float().max() / counts0.float().mean()
    assert counts.max() / counts.mean() < 0.5 * imbalance0, (counts0, counts)
    assert counts.std() < 0.3 * counts0.float().std()


def test_update_bias_is_a_noop_without_router_bias():
    m = _moe(_cfg())
    assert m.gate.e_score_correction_bias is None
    m.gate.update_bias(torch.arange(8))  # must not fail


def test_idle_experts_and_single_token():
    cfg = _cfg(n_experts_per_tok=1)
    m = _moe(cfg).eval()
    x = _x(n=2)[:, :1]  # one token: seven experts idle
    with torch.no_grad():
        torch.testing.assert_close(m(x).double(), naive_moe(m, cfg, x), rtol=1e-4, atol=1e-5)


def test_moe_bf16_forward():
    cfg = _cfg(router="sigmoid", router_bias=True, n_shared_experts=1)
    m = _moe(cfg).eval()
    x = _x()
    with torch.no_grad():
        y32 = m(x)
        y16 = m.bfloat16()(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.1, atol=0.1)


def test_selection_bias_survives_bf16_cast():
    """DeepSeek-V3 keeps e_score_correction_bias in fp32: updates of 1e-3 vanish in bf16 near 0.5."""
    m = _moe(_cfg(router="sigmoid", router_bias=True))
    with torch.no_grad():
        m.gate.e_score_correction_bias.fill_(0.5)
    m = m.to(torch.bfloat16)
    before = m.gate.e_score_correction_bias.clone().float()
    m.gate.update_bias(torch.tensor([9, 1, 1, 1, 1, 1, 1, 1]), rate=1e-3)
    after = m.gate.e_score_correction_bias.float()
    assert m.gate.e_score_correction_bias.dtype == torch.float32
    assert (after != before).all(), "the aux-loss-free balancing update was rounded away"
