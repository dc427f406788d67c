"""Pipeline parallelism (evolm/parallel/pipeline.py): N gloo processes equal one process.

Each case trains a tiny model (float64) for 5 AdamW steps with gradient clipping: once in this
process, accumulating the step's micro-batches (``(loss / m).backward()`` each, DeepSeek's router
bias updated after the step), and once pipelined over 2 or 4 ranks (same seed, init and data).
The loss sequences must agree within 1e-5 relative and the first step's gradients (each stage's,
under the full model's keys) within 1e-10. Families: Llama (GQA, packed documents), Gemma 3
(sliding windows shorter than the sequence, sandwich norms, tied embeddings), DeepSeek (MLA,
dense-then-MoE layers, router bias, aux + z losses on both stages), Qwen3-MoE (aux loss).
The ranks of one world run all their cases in one spawn (process start-up dominates).
"""

from __future__ import annotations

import pytest
import torch

import evolm
from evolm.parallel import pipeline as pp
from evolm.presets import get_preset
from evolm.train.loop import update_moe_bias
from evolm.train.optim import make_optimizer
from evolm.train.pretrain import positions_from_segments
from ranks import run_ranks

FAMILIES = {
    "llama": ("tiny-llama", {"n_layers": 4}),
    "gemma3": ("tiny-gemma3", {"sliding_window": 8}),
    "deepseek": ("tiny-deepseek", {"n_layers": 4, "moe_aux_loss_coef": 0.01, "moe_z_loss_coef": 1e-3}),
    "qwen3moe": ("tiny-qwen3-moe", {"n_layers": 4, "moe_aux_loss_coef": 0.01}),
}
STEPS, T, LR, CLIP = 5, 16, 1e-2, 1.0


def config(family: str):
    name, overrides = FAMILIES[family]
    return get_preset(name).replace(**overrides)


def batches(cfg, rows: int, docs: bool):
    """STEPS global batches (input_ids, targets, doc_ids | None, position_ids | None)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randint(0, cfg.vocab_size, (rows, T), generator=g)
        y = torch.randint(0, cfg.vocab_size, (rows, T), generator=g)
        y[:, :2] = -100
        seg = pos = None
        if docs:  # two packed documents per row, cut at a row-dependent point
            cut = torch.randint(3, T - 3, (rows, 1), generator=g)
            seg = (torch.arange(T).expand(rows, T) >= cut).long()
            pos = positions_from_segments(seg)
        out.append((x, y, seg, pos))
    return out


def _build(cfg):
    torch.manual_seed(0)
    model = evolm.build(cfg, dtype=torch.float64)
    model.train()
    return model


def single_process(case: dict):
    """Losses, first-step gradients and final weights of one process accumulating micro-batches."""
    cfg = config(case["family"])
    model = _build(cfg)
    opt = make_optimizer(model, lr=LR)
    n_micro = case["m"] * case.get("dp", 1)
    losses, grads = [], None
    for x, y, seg, pos in batches(cfg, case["rows"], case.get("docs", False)):
        total = 0.0
        chunks = [t.chunk(n_micro) if t is not None else [None] * n_micro for t in (x, y, seg, pos)]
        for xm, ym, sm, pm in zip(*chunks):
            loss = model(xm, targets=ym, doc_ids=sm, position_ids=pm)
            (loss / n_micro).backward()
            total += float(loss.detach())
        if grads is None:
            grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_moe_bias(model)
        losses.append(total / n_micro)
    if case.get("eval"):  # the forward-only loss of the last batch, in eval mode (no aux, no dropout)
        model.eval()
        with torch.no_grad():
            losses.append(sum(float(model(xm, targets=ym)) for xm, ym in zip(x.chunk(n_micro), y.chunk(n_micro)))
                          / n_micro)
    return losses, grads, model.state_dict()


def _pipelined(rank: int, world: int, cases: list[dict]) -> list:
    """Every case on this rank: (losses, first-step grads by key, gathered state dict or None)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    out = []
    for case in cases:
        cfg = config(case["family"])
        dp = case.get("dp", 1)
        mesh = init_device_mesh("cpu", (world // dp, dp), mesh_dim_names=("pp", "dp_shard"))
        model = _build(cfg)
        if case.get("ac"):  # activation checkpointing, applied before the split as parallelize() does
            from evolm.train.parallel import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        pipe = pp.pipeline(model, mesh["pp"], case["schedule"], case["m"], stages_per_rank=case.get("spr", 1),
                           balance=case.get("balance", "params"))
        if dp > 1:
            pp.fully_shard_stages(pipe, mesh["dp_shard"])
        opt = make_optimizer(pipe.module, lr=LR)
        dp_rank = mesh["dp_shard"].get_local_rank()
        losses, grads = [], None
        for x, y, seg, pos in batches(cfg, case["rows"], case.get("docs", False)):
            mine = [t.chunk(dp)[dp_rank] if t is not None else None for t in (x, y, seg, pos)]
            if case.get("examples"):  # the trainer's path: its micro-batches as Examples
                from evolm.data.objectives import Example

                exs = [Example(a, b, c) for a, b, c in zip(mine[0].chunk(case["m"]), mine[1].chunk(case["m"]),
                                                            mine[2].chunk(case["m"]))]
                loss = pp.step_examples(pipe, exs)
            else:
                loss = pipe.step(mine[0], mine[1], doc_ids=mine[2], position_ids=mine[3])
            if dp > 1:
                t = torch.tensor([loss], dtype=torch.float64)
                dist.all_reduce(t, group=mesh["dp_shard"].get_group())
                loss = float(t) / dp
            losses.append(loss)
            if grads is None:
                grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).numpy().copy()
                         for mod in pipe.modules for k, p in mod.named_parameters() if p.grad is not None}
            pp.clip_grad_norm_(pipe, CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            pp.update_router_bias(pipe, mesh["dp_shard"].get_group() if dp > 1 else None)
        if case.get("eval"):
            pipe.module.eval()
            losses.append(pipe.loss(mine[0], mine[1]))
            pipe.module.train()
        state = None
        if case.get("gather"):
            full = pp.gather_state_dict(pipe)  # a collective: every rank calls it
            state = {k: v.numpy().copy() for k, v in full.items()} if rank == 0 else None
        out.append((losses, grads, state))
        dist.barrier()
    return out


def _check(case: dict, ranks: list) -> None:
    ref_losses, ref_grads, ref_state = single_process(case)
    losses = ranks[0][0]
    assert all(r[0] == pytest.approx(losses, rel=1e-12) for r in ranks), "ranks disagree on the logged loss"
    rel = max(abs(a - b) / abs(a) for a, b in zip(ref_losses, losses))
    assert rel < 1e-5, (case, ref_losses, losses)
    grads = {}
    for r in ranks:
        for k, g in r[1].items():
            if k in grads:  # a tied replica: both copies carry the summed gradient
                assert abs(grads[k] - g).max() < 1e-12, k
            grads[k] = g
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    worst = max(float((torch.from_numpy(grads[k]) - ref_grads[k]).abs().max()) for k in grads)
    assert worst < 1e-10, (case, worst)
    if ranks[0][2] is not None:  # the gathered checkpoint is the single process's, key for key
        state = ranks[0][2]
        keys = {k for k in ref_state if not k.endswith("inv_freq")}
        assert set(state) >= keys and all(k in ref_state for k in state)
        assert max(float((torch.from_numpy(state[k]) - ref_state[k]).abs().max()) for k in keys) < 1e-9


# pp = 2: every family under GPipe and 1F1B, and interleaved / looped stages (2 ranks x 2 stages);
# a quick set (one spawn, ~10 s of CPU) and the rest marked slow (still run in CI)
CASES_2 = [dict(family=f, schedule=s, m=4, rows=8, docs=(f == "llama"), gather=(s == "1f1b"),
                examples=(f == "llama" and s == "1f1b"), eval=(s == "gpipe")) for f in FAMILIES
           for s in ("gpipe", "1f1b")] + \
          [dict(family="llama", schedule="interleaved1f1b", spr=2, m=4, rows=8, balance="layers"),
           dict(family="deepseek", schedule="interleaved1f1b", spr=2, m=2, rows=4),
           dict(family="gemma3", schedule="loopedbfs", spr=2, m=4, rows=8),
           dict(family="deepseek", schedule="zbv", spr=2, m=4, rows=8),
           dict(family="gemma3", schedule="zbv", spr=2, m=4, rows=8)]  # V: the tied head sits on rank 0
QUICK = {("llama", "1f1b"), ("gemma3", "gpipe"), ("deepseek", "1f1b"), ("llama", "interleaved1f1b")}
for c in CASES_2:  # DeepSeek under 1F1B also recomputes its blocks (MoE aux read in the first forward)
    c["ac"] = (c["family"], c["schedule"]) == ("deepseek", "1f1b")
CASES_2Q = [c for c in CASES_2 if (c["family"], c["schedule"]) in QUICK]
CASES_2S = [c for c in CASES_2 if (c["family"], c["schedule"]) not in QUICK]
# 4 processes: pp = 4 (1F1B) and fsdp x pp (dp_shard 2 x pp 2)
CASES_4 = [dict(family="llama", schedule="1f1b", m=4, rows=8),
           dict(family="llama", schedule="1f1b", m=2, rows=8, dp=2, docs=True),
           dict(family="gemma3", schedule="gpipe", m=2, rows=8, dp=2),
           dict(family="deepseek", schedule="1f1b", m=2, rows=8, dp=2, gather=True)]


def _name(case: dict) -> str:
    tags = [case["family"], case["schedule"]] + ([f"dp{case['dp']}"] if case.get("dp") else [])
    return "-".join(tags)


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(2, _pipelined, CASES_2Q)


@pytest.fixture(scope="module")
def two_ranks_more():
    return run_ranks(2, _pipelined, CASES_2S)


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(4, _pipelined, CASES_4)


@pytest.mark.parametrize("i", range(len(CASES_2Q)), ids=[_name(c) for c in CASES_2Q])
def test_two_stages_equal_one_process(two_ranks, i):
    _check(CASES_2Q[i], [r[i] for r in two_ranks])


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(CASES_2S)), ids=[_name(c) for c in CASES_2S])
def test_two_stages_equal_one_process_more(two_ranks_more, i):
    _check(CASES_2S[i], [r[i] for r in two_ranks_more])


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(CASES_4)), ids=[_name(c) for c in CASES_4])
def test_four_processes_equal_one_process(four_ranks, i):
    _check(CASES_4[i], [r[i] for r in four_ranks])


# --- splitting ---------------------------------------------------------------------------------
def test_stage_keys_are_the_full_models_and_cover_it():
    model = evolm.build(config("gemma3"))
    stages = pp.stage_modules(model, 3, n_microbatches=3, balance="layers")
    full = model.state_dict()
    seen: dict[str, int] = {}
    for s in stages:
        for k, v in s.state_dict().items():
            assert v.data_ptr() == full[k].data_ptr(), k  # the model's own tensors, not copies
            seen[k] = seen.get(k, 0) + 1
    assert set(seen) == set(full)
    # a tied embedding is held by the first stage and replicated on the last; every other key once
    assert {k for k, n in seen.items() if n > 1} == {"embed_tokens.weight"}
    assert [list(s.layer_ids) for s in stages] == [[0, 1], [2, 3], [4, 5]]
    assert "layers.2.self_attn.q_proj.weight" in stages[1].state_dict()


def test_balance_by_layers_and_by_parameters():
    cfg = config("llama").replace(n_layers=5)
    assert [list(r) for r in pp.split_layers(cfg, 2, "layers")] == [[0, 1, 2], [3, 4]]
    # the LM head's matmul counts on the last stage: a large vocabulary moves blocks off it
    big_vocab = cfg.replace(vocab_size=4096)
    assert [len(r) for r in pp.split_layers(big_vocab, 2, "params")] == [4, 1]
    # DeepSeek: a dense first block outweighs a MoE block whose experts count at their active share
    costs = pp.layer_costs(config("deepseek"))
    assert costs[0] > costs[1] == costs[2] == costs[3]
    assert [list(r) for r in pp._min_max_partition([5, 1, 1, 1, 1, 1], 2)] == [[0], [1, 2, 3, 4, 5]]


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="4 pipeline stages need at least 4 layers; the model has n_layers=3"):
        pp.split_layers(get_preset("tiny-llama"), 4)
    with pytest.raises(ValueError, match="balance="):
        pp.split_layers(get_preset("tiny-llama"), 2, "flops")
    with pytest.raises(ValueError, match="encoder-decoder"):
        pp.check_pipelinable(get_preset("tiny-t5"))
    with pytest.raises(ValueError, match="moe_loss_groups"):
        pp.check_pipelinable(get_preset("tiny-qwen3-moe").replace(moe_loss_groups="sequence"))
    with pytest.raises(ValueError, match="mask='prefix'"):
        pp.check_pipelinable(get_preset("tiny-llama").replace(mask="prefix"))
    with pytest.raises(ValueError, match="cannot be shared evenly"):
        pp.stage_ranks(3, 2)


def test_release_moves_other_stages_to_meta():
    model = evolm.build(config("llama"))
    stages = pp.stage_modules(model, 2, n_microbatches=2, balance="layers")
    pp.release_unowned(model, [stages[1]])
    assert model.embed_tokens.weight.is_meta and model.layers[0].mlp.up_proj.weight.is_meta
    assert not model.layers[2].mlp.up_proj.weight.is_meta and not model.lm_head.weight.is_meta


# --- end to end: torchrun -m evolm.cli pretrain --pp 2 equals the single-process run ------------
from test_train import _losses, _max_rel_diff, _torchrun, _write_recipe, corpus, full_run  # noqa: E402,F401


@pytest.mark.slow
def test_torchrun_pretrain_pp2_equals_single_process_and_resumes(corpus, full_run, tmp_path):  # noqa: F811
    """The recipe of tests/test_train.py (two stages: 2 micro-batches per step, then 1 — 1F1B, then
    GPipe; clipping, eval through the pipeline, gathered checkpoints) under ``--pp 2``: both ranks
    read the same micro-batches, so the losses must equal the single run's; a run stopped at step 4
    and resumed from its gathered checkpoint (weights + AdamW state) continues identically."""
    recipe_path = _write_recipe(tmp_path, corpus, sample_prompts=[])
    _torchrun(recipe_path, tmp_path / "run", "--pp", "2")
    single, piped = _losses(full_run[0]), _losses(tmp_path / "run")
    assert len(single) == len(piped) == 10
    rel = _max_rel_diff(single, piped)
    print(f"torchrun pretrain --pp 2 vs one process: max rel loss diff {rel:.2e}")
    assert rel < 1e-5
    import json

    val = [(json.loads(r)["step"], json.loads(r).get("val_loss")) for r in (full_run[0] / "metrics.jsonl").open()]
    val_pp = [(json.loads(r)["step"], json.loads(r).get("val_loss")) for r in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [s for s, v in val if v] == [s for s, v in val_pp if v]
    assert max(abs(a[1] - b[1]) / a[1] for a, b in zip(val, val_pp) if a[1]) < 1e-5
    from evolm.checkpoint import read_weights

    final, ref = read_weights(str(tmp_path / "run" / "model.safetensors")), read_weights(str(full_run[0] / "model.safetensors"))
    assert set(final) == set(ref)  # the gathered model has the plain model's keys
    _torchrun(recipe_path, tmp_path / "resumed", "--pp", "2", "--stop-after", "4")
    _torchrun(recipe_path, tmp_path / "resumed", "--pp", "2", "--resume")
    resumed = _losses(tmp_path / "resumed")
    assert len(resumed) == 10 and max(abs(a - b) for a, b in zip(resumed, piped)) < 1e-6


@pytest.mark.slow
def test_torchrun_pretrain_fsdp2_x_pp2_equals_single_process(corpus, full_run, tmp_path):  # noqa: F811
    """Four processes, ``--pp 2 --dp-shard 2`` with ``micro_batch: 1`` (as tests/test_train.py's
    two-process runs): each data-parallel pair reads its half of the single run's global batch,
    the stages are FSDP2-sharded over the pair."""
    import os
    recipe_path = _write_recipe(tmp_path, corpus, micro_batch=1, sample_prompts=[])
    _torchrun(recipe_path, tmp_path / "run", "--pp", "2", "--dp-shard", "2", nproc=4)
    single, piped = _losses(full_run[0]), _losses(tmp_path / "run")
    assert len(single) == len(piped) == 10
    rel = _max_rel_diff(single, piped)
    print(f"torchrun pretrain --pp 2 --dp-shard 2 vs one process: max rel loss diff {rel:.2e}")
    assert rel < 1e-5


@pytest.mark.slow
def test_torchrun_pretrain_pp2_resumes_from_sharded_checkpoints(corpus, full_run, tmp_path):  # noqa: F811
    """``train.ckpt_format: dcp`` under ``--pp 2``: every rank writes its stage's shards under the
    whole model's names (parallel/checkpoint.py); stopped at step 4 and resumed, the run still
    logs the single process's losses."""
    recipe_path = _write_recipe(tmp_path, corpus, sample_prompts=[], ckpt_format="dcp")
    _torchrun(recipe_path, tmp_path / "resumed", "--pp", "2", "--stop-after", "4")
    _torchrun(recipe_path, tmp_path / "resumed", "--pp", "2", "--resume")
    single, resumed = _losses(full_run[0]), _losses(tmp_path / "resumed")
    assert len(resumed) == 10
    rel = _max_rel_diff(single, resumed)
    print(f"torchrun pretrain --pp 2, dcp checkpoints, stopped at 4 and resumed vs one process: {rel:.2e}")
    assert rel < 1e-5
