"""The lab's equal-compute budgets (lab/budget.py) and its seed statistics (lab/stats.py).

References: the cost card's FLOPs per token (itself checked against the built model in
tests/test_cost.py) for the budgets; scipy's ``ttest_ind(equal_var=False)`` and its confidence
interval for Welch's test; the parameter counts of the cost card for the matching rules.
"""

import math
from dataclasses import replace

import pytest

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


# --- the runner --------------------------------------------------------------------------------
def _tiny_recipe(tmp) -> dict:
    import collections
    import inspect
    import json
    import textwrap

    corpus = tmp / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for mod in (collections, json.decoder, json.encoder, textwrap, inspect):  # real code, a few documents
        (corpus / f"{mod.__name__.replace('.', '_')}.py").write_text(inspect.getsource(mod))
    return {
        "name": "lab", "seed": 0,
        "model": {"preset": "tiny-llama", "overrides": {"vocab_size": "tokenizer", "rope_scaling": None,
                                                         "max_seq_len": 64, "d_model": 64, "head_dim": 16,
                                                         "n_layers": 2, "d_ff": 192}},
        "tokenizer": {"train": {"vocab_size": 300}},
        "data": {"sources": [{"name": "code", "path": str(corpus)}], "val_fraction": 0.1, "near_dedup": False},
        "optim": {"lr": 3e-3},
        "train": {"micro_batch": 4, "tokens_per_step": 128, "log_every": 10, "eval_every": 0, "eval_batches": 1,
                  "ckpt_every": 0, "sample_prompts": ["def "], "sample_tokens": 2},
        "stages": [{"name": "pretrain", "tokens": 128, "seq_len": 32, "warmup_steps": 1}],
    }


def test_vary_expands_to_every_combination_and_routes_each_key():
    from evolm.lab.ablate import apply_variant, parse_vary

    vs = parse_vary(["norm=layernorm,rmsnorm", "optim.lr=1e-3,3e-3"])
    assert [v.changes for v in vs] == [{"norm": "layernorm", "optim.lr": 1e-3}, {"norm": "layernorm", "optim.lr": 3e-3},
                                       {"norm": "rmsnorm", "optim.lr": 1e-3}, {"norm": "rmsnorm", "optim.lr": 3e-3}]
    d = apply_variant({"model": {"preset": "tiny-llama"}, "optim": {"lr": 1.0}}, vs[1])
    assert d["model"]["overrides"] == {"norm": "layernorm"} and d["optim"]["lr"] == 3e-3
    with pytest.raises(ValueError, match="not a ModelConfig field"):
        apply_variant({}, parse_vary(["lr=1e-3"])[0])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_vary(["norm"])


@pytest.mark.slow
def test_ablation_runs_equal_budgets_reproducibly_and_resumes(tmp_path):
    """Two variants x two seeds at one FLOPs budget: budgets equal within 1%, every run folder
    ordinary, a run repeated with its seed gives the same loss bit for bit, finished runs skipped."""
    import json
    import shutil

    from evolm.lab.ablate import parse_vary, run_ablation

    base = _tiny_recipe(tmp_path)
    variants = parse_vary(["mlp=mlp,glu"])
    budget = Budget("flops", 7.8e9)  # ~100 steps of 128 tokens: whole steps land within 1%
    logs = []
    res = run_ablation(base, variants, [0, 1], budget, tmp_path / "lab", log=logs.append)
    rows = {r["variant"]: r for r in res["variants"]}
    assert set(rows) == {"mlp-mlp", "mlp-glu"}
    flops = [r["flops"] for r in rows.values()]
    assert all(abs(f - 7.8e9) / 7.8e9 <= TOLERANCE for f in flops)
    assert any("2/3" in line for line in logs)  # the matching rule is printed
    glu = rows["mlp-glu"]
    assert len(glu["val_loss"]) == 2 and "verdict" in glu and "p_value" in glu
    for loss, bpb in zip(glu["val_loss"], glu["val_bits_per_byte"]):  # a 300-token BPE: 1.5-4 bytes a token
        assert loss / math.log(2) / 4 < bpb < loss / math.log(2) / 1.5
    assert (tmp_path / "lab" / "report.md").read_text().count("|") > 10
    assert (tmp_path / "lab" / "loss_curves.png").stat().st_size > 1000 and (tmp_path / "lab" / "delta.png").is_file()
    for folder in ("mlp-mlp/seed-0", "mlp-glu/seed-1"):
        assert (tmp_path / "lab" / folder / "report.md").is_file()
    # reproducible: run one seed again from scratch -> the same final loss, bit for bit
    first = json.loads((tmp_path / "lab" / "mlp-glu" / "seed-1" / "summary.json").read_text())["val_loss"]
    shutil.rmtree(tmp_path / "lab" / "mlp-glu" / "seed-1")
    logs.clear()
    again = run_ablation(base, variants, [0, 1], budget, tmp_path / "lab", log=logs.append)
    assert {r["variant"]: r for r in again["variants"]}["mlp-glu"]["val_loss"][1] == first
    assert sum("skipped" in line for line in logs) == 3


def test_every_rung_of_the_ladder_builds_and_meets_the_budget():
    """recipes/lab-base.yaml climbed rung by rung (matching included): each config is valid, builds,
    and its whole steps land within 1% of one FLOPs budget; SwiGLU keeps the MLP size, MoE the
    active size."""
    from pathlib import Path

    import yaml

    from evolm.lab.ablate import _budgeted, _config, apply_variant
    from evolm.lab.ladder import LADDER, rungs
    from evolm.model import build

    class Vocab:
        vocab_size = 4096

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "lab-base.yaml").read_text())
    budget = Budget("flops", 3e12)
    d, configs, main = base, [], [v for v in LADDER if not v.side]
    for rung in main:
        before = _config(d, Vocab) if configs else _config(apply_variant(base, rung), Vocab)
        d, _ = _budgeted(apply_variant(d, rung), before, Vocab, budget)
        configs.append(_config(d, Vocab))
        build(configs[-1], device="meta")
        assert sum(s["tokens"] for s in d["stages"]) * cost_card(configs[-1], context_len=128)["flops_per_token"] \
            == pytest.approx(3e12, rel=TOLERANCE)
    names = [v.name for v in main]
    card = lambda i: cost_card(configs[i])  # noqa: E731
    sw = names.index("swiglu")
    assert abs(card(sw)["params_by_part"]["mlp"] / card(sw - 1)["params_by_part"]["mlp"] - 1) < 0.01
    moe = names.index("moe-shared")
    assert abs(card(moe)["params_active"] / card(moe - 1)["params_active"] - 1) < 0.02
    assert configs[-1].attention == "mla" and configs[-1].n_experts == 8 and configs[-1].norm == "rmsnorm"
    assert [v.name for v in rungs(["rope", "rmsnorm"])] == ["gpt2", "rmsnorm", "rope"]
    assert rungs(["rope", "moe-equal-total"])[-1].on == "rope"  # its olmo2-norm left out: the nearest kept rung
    assert d["data"]["quality_filter"] and d["data"]["near_dedup"] and d["stages"][1]["mixture"] == "high"
    with pytest.raises(ValueError, match="unknown rung"):
        rungs(["alibi"])


def test_moe_matched_at_equal_total_parameters():
    dense = replace(BASE, name="dense", mlp="glu", activation="silu", d_ff=672)
    moe = replace(dense, name="moe", n_experts=8, n_experts_per_tok=2, n_shared_experts=1)
    total, notes = match_parameters(dense, moe, moe_match="total")
    active, _ = match_parameters(dense, moe)
    assert "equal total" in notes[0] and total.moe_d_ff < active.moe_d_ff
    mlp = lambda c: cost_card(c)["params_total"]  # noqa: E731
    assert abs(mlp(total) / mlp(dense) - 1) < 0.02
    with pytest.raises(ValueError, match="active or total"):
        match_parameters(dense, moe, moe_match="all")


def test_budget_steps_are_shared_over_the_stages_as_written():
    from evolm.lab.ablate import _share, apply_variant
    from evolm.lab.ablate import Variant

    assert _share(225, [800, 200]) == [180, 45] and sum(_share(7, [1, 1, 1])) == 7
    with pytest.raises(ValueError, match="fewer than"):
        _share(1, [1, 1])
    d = apply_variant({"stages": [{"name": "stable"}, {"name": "decay"}]}, Variant("a", {"stages.decay.mixture": "high"}))
    assert d["stages"][1] == {"name": "decay", "mixture": "high"}
    with pytest.raises(ValueError, match="no item named 'anneal'"):
        apply_variant({"stages": [{"name": "stable"}]}, Variant("a", {"stages.anneal.mixture": "high"}))


@pytest.mark.slow
def test_sweep_and_data_variants_share_set_up_and_one_held_out_set(tmp_path):
    """Two data settings x two learning rates x two seeds: one tokenizer, one shard folder per data
    setting, every run evaluated on the base recipe's held-out split; each variant judged at its
    best learning rate."""
    import yaml

    from evolm.lab.ablate import parse_vary, run_ablation

    base = _tiny_recipe(tmp_path)
    out = tmp_path / "lab"
    res = run_ablation(base, parse_vary(["data.quality_filter=true,false"]), [0, 1], Budget("tokens", 2560), out,
                       log=lambda s: None, sweep=parse_vary(["optim.lr=1e-3,1e-2"]))
    assert sorted(p.name for p in (out / "shared").glob("data-*")) and len(list((out / "shared").glob("data-*"))) == 2
    runs = sorted(out.glob("*/*/seed-*"))
    assert len(runs) == 8 and not any((r / "data").exists() for r in runs)  # shards shared, not copied
    heldout = {yaml.safe_load((r / "recipe.yaml").read_text())["train"]["eval_data"] for r in runs}
    assert heldout == {res["heldout"]}
    for row in res["variants"]:
        assert set(row["sweep"]) == {"lr-0.001", "lr-0.01"} and row["mean"] == min(row["sweep"].values())
        assert row["best"] == min(row["sweep"], key=row["sweep"].get)
    assert "Sweep" in (out / "report.md").read_text()


@pytest.mark.slow
def test_parallel_runs_equal_serial_runs(tmp_path):
    """``workers=2`` trains the same runs in two processes: the same losses, bit for bit (one thread each)."""
    from evolm.lab.ablate import parse_vary, run_ablation

    base = _tiny_recipe(tmp_path)
    base["train"]["threads"] = 1
    variants = parse_vary(["norm=rmsnorm,layernorm"])
    serial = run_ablation(base, variants, [0, 1], Budget("tokens", 1280), tmp_path / "a", log=lambda s: None)
    parallel = run_ablation(base, variants, [0, 1], Budget("tokens", 1280), tmp_path / "b", log=lambda s: None,
                            workers=2)
    assert [r["val_loss"] for r in serial["variants"]] == [r["val_loss"] for r in parallel["variants"]]
    assert parallel["workers"] == 2


@pytest.mark.slow
def test_ladder_compares_each_rung_with_the_one_before(tmp_path):
    from evolm.lab.ablate import run_ablation
    from evolm.lab.ladder import rungs

    res = run_ablation(_tiny_recipe(tmp_path), rungs(["rmsnorm", "swiglu"]), [0, 1], Budget("flops", 7.8e9),
                       tmp_path / "ladder", log=lambda s: None, ladder=True)
    rows = res["variants"]
    assert [r["variant"] for r in rows] == ["gpt2", "rmsnorm", "swiglu"]
    assert rows[1]["against"] == "gpt2" and rows[2]["against"] == "rmsnorm"
    assert rows[2]["delta"] == pytest.approx(rows[2]["mean"] - sum(rows[1]["val_loss"]) / 2)
    report = (tmp_path / "ladder" / "report.md").read_text()
    assert "| swiglu | rmsnorm |" in report and "set-up" in report
    assert all(r["setup_s"][0] < r["wall_s"][0] and r["train_s"][0] > 0 for r in rows)


def test_the_ladder_scales_to_gpt2_small_and_every_rung_meets_its_budget():
    """``--size 124m``: GPT-2 small's shape; the rungs' widths follow it (GQA at 6 of 12 heads, a
    256-token window, a 192-wide MLA latent) and every rung lands within 1% of 2e17 FLOPs."""
    from pathlib import Path

    import yaml

    from evolm.lab.ablate import _budgeted, _config, apply_variant
    from evolm.lab.ladder import SIZES, rungs, sized
    from evolm.model import build

    class Vocab:
        vocab_size = 32768

    base = sized(yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "lab-base.yaml").read_text()),
                 "124m")
    ladder = [v for v in rungs(None, base) if not v.side]
    assert {k: v for v in ladder for k, v in v.changes.items() if k in ("n_kv_heads", "sliding_window",
                                                                     "kv_lora_rank")} == \
        {"n_kv_heads": 6, "sliding_window": 256, "kv_lora_rank": 192}
    budget = Budget.parse(SIZES["124m"]["budget"])
    d, first = base, None
    for rung in ladder:
        before = _config(d, Vocab) if first else _config(apply_variant(base, rung), Vocab)
        d, _ = _budgeted(apply_variant(d, rung), before, Vocab, budget)
        config = first = _config(d, Vocab)
        build(config, device="meta")
        spent = sum(s["tokens"] for s in d["stages"]) * cost_card(config, context_len=1024)["flops_per_token"]
        assert abs(spent - budget.value) / budget.value <= TOLERANCE
    assert 100e6 < cost_card(_config(apply_variant(base, ladder[0]), Vocab))["params_total"] < 140e6
    with pytest.raises(ValueError, match="expected one of cpu, 124m"):
        sized(base, "7b")


def test_objective_budgets_count_what_a_step_computes():
    """Non-clm objectives: an MLM encoder's head runs at the masked share of the positions only
    (sparse prediction); a seq2seq window of L tokens is S source + U target tokens, the lengths the
    objective really makes; variants of either still meet one FLOPs budget."""
    import numpy as np

    from evolm.data.objectives import ObjectiveConfig, seq2seq_lengths, span_corrupt_row
    from evolm.lab.budget import training_flops_per_token

    L = 128
    enc = replace(BASE, name="enc", mask="bidirectional", tie_embeddings=True, head_transform=True)
    mlm = ObjectiveConfig("mlm")
    head = enc.vocab_size * enc.d_model + enc.d_model ** 2
    card = cost_card(enc, context_len=L)["flops_per_token"]
    assert training_flops_per_token(enc, L, mlm) == round(card - 6 * (1 - mlm.rate) * head)

    span = ObjectiveConfig("span_corruption")
    src, tgt = span_corrupt_row(np.arange(L), np.random.default_rng(0), rate=span.rate, mean_span=span.mean_span,
                                sentinel_ids=np.arange(1000, 1100))
    assert seq2seq_lengths(span, L) == (len(src), len(tgt))
    t5 = replace(BASE, name="t5", encoder_layers=6, tie_embeddings=True)
    fpt = training_flops_per_token(t5, L, span)
    # bounds: all L tokens through both stacks at full context (the card) vs the encoder alone (its
    # card counts a tied head the encoder does not run)
    encoder_only = cost_card(t5.encoder_config(), context_len=len(src))["flops_per_token"] - 6 * t5.vocab_size * t5.d_model
    assert encoder_only * len(src) / L < fpt \
        < cost_card(t5, context_len=L)["flops_per_token"]
    for base, obj in ((enc, mlm), (t5, span)):
        variants = [base, replace(base, name="layernorm", norm="layernorm"), replace(base, name="mha", n_kv_heads=8)]
        plans = [plan_tokens(c, Budget("flops", 2e13), seq_len=L, tokens_per_step=4096, objective=obj) for c in variants]
        assert max(p.error for p in plans) <= TOLERANCE
    with pytest.raises(ValueError, match="needs an encoder-decoder"):
        training_flops_per_token(enc, L, span)


@pytest.mark.slow
@pytest.mark.parametrize("objective,overrides,vocab", [
    ("mlm", {"mask": "bidirectional", "tie_embeddings": True}, 301),  # + [MASK]
    ("span_corruption", {"encoder_layers": 2, "tie_embeddings": True}, 400),  # + 100 sentinels
])
def test_ablation_of_an_encoder_and_a_seq2seq_objective(tmp_path, objective, overrides, vocab):
    """`lab ablate` on an MLM encoder and a span-corruption encoder-decoder: both variants train at
    one FLOPs budget counted under the objective (lab/budget.py), and no bits per byte is claimed
    for a loss over the masked / target tokens."""
    from evolm.config import ModelConfig
    from evolm.data.objectives import ObjectiveConfig
    from evolm.lab.ablate import parse_vary, run_ablation
    from evolm.lab.budget import training_flops_per_token
    from evolm.presets import get_preset

    base = _tiny_recipe(tmp_path)
    base["objective"] = objective
    base["model"]["overrides"].update(overrides)
    config = get_preset("tiny-llama", **{**base["model"]["overrides"], "vocab_size": vocab})
    assert isinstance(config, ModelConfig)
    flops = 12 * 128 * training_flops_per_token(config, 32, ObjectiveConfig(objective))  # 12 steps
    res = run_ablation(base, parse_vary(["norm=rmsnorm,layernorm"]), [0, 1], Budget("flops", flops), tmp_path / "lab")
    rows = res["variants"]
    assert len(rows) == 2 and all(abs(r["flops"] - flops) / flops <= TOLERANCE for r in rows)
    assert rows[0]["tokens"] == 12 * 128  # counted as a dense decoder's card, the budget buys fewer steps
    assert all(math.isfinite(r["val_loss"][0]) and r["val_bits_per_byte"] == [None, None] for r in rows)


@pytest.mark.parametrize("name,mixers", [("mamba", ["mamba"] * 4), ("mamba2", ["mamba2"] * 4),
                                         ("jamba", ["mamba", "mamba", "mamba", "mha"])])
def test_state_space_side_rungs_spend_the_dense_rungs_flops(name, mixers):
    """The ladder's side rungs 'attention -> Mamba / Mamba-2' and the Jamba-style hybrid (3 Mamba layers
    per attention layer) on olmo2-norm: each builds, and the budget spends the same FLOPs as the dense
    rung's (the cheaper mixer gets more tokens)."""
    from pathlib import Path

    import yaml

    import evolm
    from evolm.analysis.cost import cost_card
    from evolm.lab.ablate import _budgeted, _config, apply_variant
    from evolm.lab.budget import TOLERANCE, Budget
    from evolm.lab.ladder import LADDER, rungs

    class Vocab:
        vocab_size = 4096

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "lab-base.yaml").read_text())
    rung = next(v for v in LADDER if v.name == name)
    assert rung.side and rung.on == "olmo2-norm"
    assert [v.name for v in rungs([name])] == ["gpt2", name]
    dense = apply_variant(base, LADDER[0])
    d, _ = _budgeted(apply_variant(dense, rung), _config(dense, Vocab), Vocab, Budget("flops", 3e12))
    c = _config(d, Vocab)
    assert [c.layer_mixer(i) for i in range(c.n_layers)] == mixers
    evolm.build(c, device="meta")
    spent = sum(s["tokens"] for s in d["stages"]) * cost_card(c, context_len=128)["flops_per_token"]
    assert spent == pytest.approx(3e12, rel=TOLERANCE)
