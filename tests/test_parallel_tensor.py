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


def batches(n: int, vocab: int = 96):
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g))
            for _ in range(n)]


def train(model, steps: int, after_step=None):
    """Losses of ``steps`` AdamW steps and the gradients after the first backward (full tensors)."""
    from evolm.train.loop import update_moe_bias

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, grads = [], None
    for i, (x, y) in enumerate(batches(steps)):
        loss = model(x, targets=y)
        loss.backward()
        if grads is None:
            grads = {n: _full(p.grad) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_moe_bias(model, torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
        losses.append(loss.item())
    return losses, grads


def _full(t):
    """A gradient as a numpy array (whole, gathered from its shards): tensors do not survive the
    trip back from a finished process."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().numpy().copy()


def reference(family: str):
    torch.manual_seed(0)
    return train(build(tiny(family)), STEPS)


def tp_rank(rank, world, family):
    from torch.distributed.device_mesh import init_device_mesh

    from evolm.parallel.tensor import apply_tensor_parallel

    torch.manual_seed(0)
    model = build(tiny(family))
    apply_tensor_parallel(model, init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)))
    return train(model, STEPS)


def assert_same(ref, got, what: str):
    (ref_losses, ref_grads), (losses, grads) = ref, got
    rel = max(abs(a - b) / abs(a) for a, b in zip(ref_losses, losses))
    assert rel < 1e-5, f"{what}: losses {losses} vs one process {ref_losses} (max rel {rel:.2e})"
    assert set(grads) == set(ref_grads)
    for n, g in ref_grads.items():
        err = float(abs(grads[n] - g).max() / max(abs(g).max(), 1e-12))
        assert err < 1e-4, f"{what}: gradient of {n} differs by {err:.2e} (relative to its max)"
    return rel


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp2_equals_one_process(family):
    ref = reference(family)
    outs = run_ranks(2, tp_rank, family)
    for r, got in enumerate(outs):
        rel = assert_same(ref, got, f"{family} tp=2 rank {r}")
        print(f"{family} tp=2 rank {r}: max rel loss diff {rel:.2e}")
