"""Tensor parallelism (parallel/tensor.py): tp processes train exactly as one process.

Each check builds the same tiny model (same seed) in every process, splits it over a ``tp`` mesh
and runs AdamW steps on the same batches; the loss of every step must equal the single-process
run's within 1e-5 relative and the gradients after the first backward, gathered to full tensors,
must equal its gradients. Families: Llama (GQA), Gemma 3 (sliding windows, sandwich norms,
per-head QK-norm, tied embeddings, soft-capping), DeepSeek (MLA with a query LoRA, MoE with a shared expert
and the bias-balanced sigmoid router), Qwen3-MoE (softmax router with an auxiliary loss).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ranks import run_ranks

from evolm.model import build
from evolm.presets import get_preset

STEPS, B, T = 5, 2, 16

FAMILIES = {
    "llama": ("tiny-llama", dict(n_layers=2, d_model=64, head_dim=16, d_ff=128)),
    "gemma3": ("tiny-gemma3", dict(n_layers=2, sliding_window=4, sliding_window_pattern=2, final_softcap=30.0,
                                   attn_softcap=50.0)),
    "deepseek": ("tiny-deepseek", dict(n_layers=2, d_ff=96)),
    "qwen3_moe": ("tiny-qwen3-moe", dict(n_layers=2, moe_aux_loss_coef=0.01)),
    "mqa_bias": ("tiny-llama", dict(n_layers=2, d_model=64, head_dim=16, d_ff=128, n_kv_heads=1, qkv_bias=True,
                                    o_bias=True, mlp_bias=True)),
}


def tiny(family: str):
    name, over = FAMILIES[family]
    return get_preset(name, vocab_size=96, rope_scaling=None, max_seq_len=64, **over)


def batches(n: int, rows: int = B, vocab: int = 96):
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, vocab, (rows, T), generator=g), torch.randint(0, vocab, (rows, T), generator=g))
            for _ in range(n)]


def train(model, steps: int, dp: tuple[int, int] = (0, 1)):
    """Losses of ``steps`` AdamW steps and the gradients after the first backward (full tensors).
    ``dp`` = (data-parallel rank, degree): the global batch of ``B * degree`` rows is cut in
    ``degree`` parts; the loss logged is the mean over the parts."""
    import torch.distributed as dist

    from evolm.train.loop import update_moe_bias

    rank, degree = dp
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, grads = [], None
    for x, y in batches(steps, B * degree):
        x, y = x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]
        loss = model(x, targets=y)
        loss.backward()
        if grads is None:
            grads = {n: _full(p.grad) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_moe_bias(model, dist.get_world_size() if dist.is_initialized() else 1)
        logged = loss.detach().clone()
        if degree > 1:
            dist.all_reduce(logged)
            logged /= dist.get_world_size()  # tp ranks of a dp rank hold the same loss
        losses.append(logged.item())
    return losses, grads


def _full(t):
    """A gradient as a numpy array (whole, gathered from its shards): tensors do not survive the
    trip back from a finished process."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().numpy().copy()


def reference(family: str, rows: int = B):
    """One process on the global batch of ``rows`` rows."""
    torch.manual_seed(0)
    model = build(tiny(family))
    opt_rows = rows // B
    if opt_rows == 1:
        return train(model, STEPS)
    return _train_whole(model, rows)


def _train_whole(model, rows):
    import numpy as np

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, grads = [], None
    for x, y in batches(STEPS, rows):
        loss = model(x, targets=y)
        loss.backward()
        if grads is None:
            grads = {n: np.copy(p.grad.numpy()) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        from evolm.train.loop import update_moe_bias

        update_moe_bias(model)
        losses.append(loss.item())
    return losses, grads


def tp_rank(rank, world, families):
    """Every family split over ``world`` tp ranks by the dispatcher, in one process launch; a
    family named ``*+ac`` also recomputes its blocks (activation checkpointing: the collectives
    run again in the backward)."""
    from evolm.parallel import ParallelLayout, parallelize

    layout = ParallelLayout(tp=world, dp_shard=1).resolve(world)
    mesh = layout.build_mesh("cpu")
    out = {}
    for family in families:
        torch.manual_seed(0)
        model = build(tiny(family.removesuffix("+ac")))
        out[family] = train(parallelize(model, layout, mesh, activation_checkpointing=family.endswith("+ac")), STEPS)
    return out


def assert_same(ref, got, what: str):
    (ref_losses, ref_grads), (losses, grads) = ref, got
    rel = max(abs(a - b) / abs(a) for a, b in zip(ref_losses, losses))
    assert rel < 1e-5, f"{what}: losses {losses} vs one process {ref_losses} (max rel {rel:.2e})"
    assert set(grads) == set(ref_grads)
    for n, g in ref_grads.items():
        err = float(abs(grads[n] - g).max() / max(abs(g).max(), 1e-12))
        assert err < 1e-4, f"{what}: gradient of {n} differs by {err:.2e} (relative to its max)"
    return rel


@pytest.mark.slow
@pytest.mark.parametrize("families", [["llama", "gemma3", "mqa_bias", "llama+ac"], ["deepseek", "qwen3_moe"]],
                         ids=["dense", "moe"])
def test_tp2_equals_one_process(families):
    outs = run_ranks(2, tp_rank, families)
    for family in families:
        ref = reference(family.removesuffix("+ac"))
        for r, got in enumerate(outs):
            rel = assert_same(ref, got[family], f"{family} tp=2 rank {r}")
            print(f"{family} tp=2 rank {r}: max rel loss diff {rel:.2e}")


@pytest.mark.parametrize("override, says", [
    (dict(n_heads=3, n_kv_heads=3, head_dim=16), "n_heads = 3 must divide by tp"),
    (dict(n_kv_heads=2, n_heads=4, head_dim=16), None),
    (dict(vocab_size=97), r"vocab_size = 97 must divide by tp .* e.g. to 98"),
    (dict(qk_norm="full"), "qk_norm = 'full'"),
    (dict(d_ff=129), "d_ff = 129 must divide by tp"),
    (dict(pos_emb="learned"), "pos_emb = 'learned'"),
])
def test_refusals_name_the_field(override, says):
    from evolm.parallel.tensor import TensorParallelError, check_tensor_parallel

    cfg = get_preset("tiny-llama", **{"vocab_size": 96, "rope_scaling": None, **override})
    if says is None:
        check_tensor_parallel(cfg, 2)
        return
    with pytest.raises(TensorParallelError, match=says):
        check_tensor_parallel(cfg, 2)


LAYOUTS_2D = {"dp_shard 2 x tp 2": dict(dp_shard=2, tp=2), "dp_replicate 2 x tp 2": dict(dp_replicate=2, dp_shard=1, tp=2),
              "cp 2 x tp 2": dict(dp_shard=1, cp=2, tp=2)}


def fsdp_tp_rank(rank, world, cases):
    """Each (layout, family) through the dispatcher: FSDP2 (or HSDP's replicas) over the
    data-parallel ranks, tensor parallel inside."""
    from evolm.parallel import ParallelLayout, parallelize

    out = {}
    for name, family in cases:
        layout = ParallelLayout(**LAYOUTS_2D[name]).resolve(world)
        mesh = layout.build_mesh("cpu")
        torch.manual_seed(0)
        net = parallelize(build(tiny(family)), layout, mesh)
        out[name, family] = train(net, STEPS, dp=(mesh["dp"].get_local_rank(), mesh["dp"].size()))
    return out


@pytest.mark.slow
def test_2d_layouts_with_tp2_equal_one_process():
    """FSDP2 x TP, replicas x TP, context parallel (ring attention) x TP. No auxiliary loss here:
    a data-parallel split of a Switch balance loss is not the whole batch's (a product of batch
    means), whatever tensor parallelism does."""
    from evolm.parallel import ParallelLayout

    cases = [("dp_shard 2 x tp 2", "llama"), ("dp_shard 2 x tp 2", "deepseek"), ("dp_replicate 2 x tp 2", "llama"),
             ("cp 2 x tp 2", "llama")]
    outs = run_ranks(4, fsdp_tp_rank, cases)
    for name, family in cases:
        ref = reference(family, rows=B * ParallelLayout(**LAYOUTS_2D[name]).resolve(4).dp)
        for r, got in enumerate(outs):
            rel = assert_same(ref, got[name, family], f"{family} {name} rank {r}")
            print(f"{family} {name} rank {r}: max rel loss diff {rel:.2e}")


# --- end to end: torchrun -m evolm.cli pretrain --tp 2 equals the single-process run ------------
from test_train import _losses, _max_rel_diff, _torchrun, _write_recipe, corpus, full_run  # noqa: E402,F401


@pytest.mark.slow
def test_torchrun_pretrain_tp2_equals_single_process(corpus, full_run, tmp_path):  # noqa: F811
    """The recipe of tests/test_train.py (two stages, accumulation, clipping, eval, checkpoints)
    under ``--tp 2``: both ranks read the same micro-batches, so the global batch is the single
    run's; the logged losses must equal it."""
    recipe_path = _write_recipe(tmp_path, corpus, sample_prompts=[])
    _torchrun(recipe_path, tmp_path / "run", "--tp", "2")
    single, tp = _losses(full_run[0]), _losses(tmp_path / "run")
    assert len(single) == len(tp) == 10
    rel = _max_rel_diff(single, tp)
    print(f"torchrun pretrain --tp 2 vs one process: max rel loss diff {rel:.2e}")
    assert rel < 1e-5
    assert (tmp_path / "run" / "model.safetensors").is_file()  # the gathered final model
    # stopped after 4 steps (a gathered checkpoint: weights, AdamW state of DTensors), resumed
    # under the same layout: the same losses bit for bit
    _torchrun(recipe_path, tmp_path / "resumed", "--tp", "2", "--stop-after", "4")
    _torchrun(recipe_path, tmp_path / "resumed", "--tp", "2", "--resume")
    assert _losses(tmp_path / "resumed") == tp
