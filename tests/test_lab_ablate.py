"""The lab's equal-compute budgets (lab/budget.py) and its seed statistics (lab/stats.py).

References: the cost card's FLOPs per token (itself checked against the built model in
tests/test_cost.py) for the budgets; scipy's ``ttest_ind(equal_var=False)`` and its confidence
interval for Welch's test; the parameter counts of the cost card for the matching rules.
"""

import pytest
from dataclasses import replace

from evolm.analysis.cost import cost_card
from evolm.config import ModelConfig
from evolm.lab.budget import TOLERANCE, Budget, match_parameters, plan_tokens
from evolm.lab.stats import bootstrap_interval, compare

BASE = ModelConfig(name="base", vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4,
                   max_seq_len=256, pos_emb="rope", norm="rmsnorm")


def _variants():
    glu, _ = match_parameters(BASE, replace(BASE, name="swiglu", mlp="glu", activation="silu"))
    moe, _ = match_parameters(BASE, replace(BASE, name="moe", n_experts=8, n_experts_per_tok=2, n_shared_experts=1))
    return [BASE, replace(BASE, name="layernorm", norm="layernorm"), glu, moe,
            replace(BASE, name="mha", n_kv_heads=8), replace(BASE, name="window", sliding_window=64)]


@pytest.mark.parametrize("budget", ["flops=3e13", "flops=8e12", "tokens=2e6"])
def test_every_variant_spends_the_same_budget(budget):
    b = Budget.parse(budget)
    plans = [plan_tokens(c, b, seq_len=256, tokens_per_step=4096) for c in _variants()]
    spent = [p.flops if b.kind == "flops" else p.tokens for p in plans]
    assert max(spent) / min(spent) - 1 <= 2 * TOLERANCE
    assert all(abs(s - b.value) / b.value <= TOLERANCE for s in spent)
    for c, p in zip(_variants(), plans):  # tokens x the card's FLOPs per token, nothing else
        assert p.flops == p.tokens * cost_card(c, context_len=256)["flops_per_token"]
        assert p.tokens == p.steps * 4096


def test_a_budget_whole_steps_cannot_meet_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="lower tokens_per_step"):
        plan_tokens(BASE, Budget("flops", 1e12), seq_len=256, tokens_per_step=65536)
    with pytest.raises(ValueError, match="expected flops=NUMBER"):
        Budget.parse("3e14")
    with pytest.raises(ValueError, match="budget kind 'steps'"):
        Budget.parse("steps=10")


def test_gated_mlp_and_moe_are_matched_as_the_papers_do():
    glu, notes = match_parameters(BASE, replace(BASE, mlp="glu", activation="silu"))
    mlp = lambda c: cost_card(c)["params_by_part"]["mlp"]  # noqa: E731
    assert abs(mlp(glu) / mlp(BASE) - 1) < 0.01 and "2/3" in notes[0]
    moe, notes = match_parameters(BASE, replace(BASE, n_experts=8, n_experts_per_tok=2, n_shared_experts=1))
    base_active, moe_active = cost_card(BASE)["params_active"], cost_card(moe)["params_active"]
    assert abs(moe_active / base_active - 1) < 0.01 and "equal active" in notes[0]
    assert cost_card(moe)["params_total"] > 1.5 * cost_card(BASE)["params_total"]  # MoE spends its total
    assert match_parameters(BASE, replace(BASE, norm="layernorm"))[1] == []


def test_welch_comparison_equals_scipy():
    from scipy import stats

    a = [3.412, 3.398, 3.425, 3.405]
    b = [3.451, 3.440, 3.462]
    ours = compare(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert (ours.low, ours.high) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
    assert ours.dof == pytest.approx(ref.df, rel=1e-9)
    assert ours.verdict == "lower loss" and ours.delta < 0


def test_noise_is_called_noise_and_the_bootstrap_agrees():
    a = [3.41, 3.45, 3.39]
    b = [3.42, 3.40, 3.44]
    c = compare(a, b)
    assert c.verdict == "not distinguishable from noise" and c.p_value > 0.5
    lo, hi = bootstrap_interval(a, b, resamples=4000)
    assert lo < 0 < hi
    lo, hi = bootstrap_interval([3.30, 3.31, 3.29], [3.45, 3.46, 3.44], resamples=4000)
    assert hi < 0
    with pytest.raises(ValueError, match="at least 2 seeds"):
        compare([3.4], [3.5, 3.6])
