"""Context parallelism: ring attention (evolm/parallel/ring.py) equals full attention, and a model
trained with its sequence split over two gloo processes (evolm/parallel/context.py) follows the
one-process run.

The reference is evolm's own single-device attention (``nn/attention.attend`` over the mask that
``nn/masks.attention_mask`` plans for the whole sequence), which tests/test_attention.py checks
against transformers; here it is compared in float64, where the ring must agree to 1e-10.
"""

import json

import pytest
import torch
import torch.distributed as dist

from ranks import run_ranks

from evolm.nn.attention import attend
from evolm.nn.masks import attention_mask
from evolm.parallel.ring import RingSpec, SequenceLayout, ring_attention

# ---------------------------------------------------------------------------------------------
# ring attention vs full attention


def _full_attention(q, k, v, scale, softcap, window, doc_ids, causal=True):
    T = q.shape[2]
    slots = torch.arange(T)
    mask = attention_mask(slots, slots, None, window, doc_ids, "causal" if causal else "bidirectional")
    if softcap is None:
        return attend(q, k, v, mask, False, scale)
    # attend's soft-capped path takes its softmax in float32 (as Gemma 2 does): written out in full precision here
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = softcap * torch.tanh(q @ k.transpose(-1, -2) * scale / softcap)
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v


def _inputs(T, H, Hkv, D, Dv, docs, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, T, D, generator=g, dtype=dtype)
    k = torch.randn(2, Hkv, T, D, generator=g, dtype=dtype)
    v = torch.randn(2, Hkv, T, Dv, generator=g, dtype=dtype)
    dout = torch.randn(2, H, T, Dv, generator=g, dtype=dtype)
    doc_ids = None
    if docs:  # rows of several documents of random lengths, differently in each row
        doc_ids = torch.cumsum(torch.rand(2, T, generator=g) < 0.15, dim=-1)
    return q, k, v, dout, doc_ids


def _ring_vs_full(rank, world, case):
    T, H, Hkv, D, Dv = case["T"], case["H"], case["Hkv"], case["D"], case.get("Dv", case["D"])
    dtype = case["dtype"]
    q, k, v, dout, doc_ids = _inputs(T, H, Hkv, D, Dv, case.get("docs", False), dtype)
    scale, softcap, window = case.get("scale", D ** -0.5), case.get("softcap"), case.get("window")
    causal = case.get("causal", True)
    # reference: full attention on every rank, its gradients
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref = _full_attention(*ref, scale, softcap, window, doc_ids, causal)
    out_ref.backward(dout)
    layout = SequenceLayout(world, T, case.get("layout", "zigzag"))
    idx = layout.slots(rank)
    local = [t[:, :, idx].clone().requires_grad_() for t in (q, k, v)]
    stats = {}
    spec = RingSpec(dist.group.WORLD, layout, scale, softcap, window, causal, stats, case.get("kernel", "auto"))
    if case.get("autocast"):  # bfloat16 autocast with float32 q beside bfloat16 k/v (RoPE's output under autocast)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ring_attention(local[0], local[1].bfloat16(), local[2].bfloat16(), spec,
                                 doc_ids[:, idx] if doc_ids is not None else None)
        assert out.dtype == torch.bfloat16
    else:
        out = ring_attention(*local, spec, doc_ids[:, idx] if doc_ids is not None else None)
    out.backward(dout[:, :, idx])
    diffs = {"out": (out - out_ref[:, :, idx]).abs().max().item()}
    for name, t, r in zip("qkv", local, ref):
        diffs["d" + name] = (t.grad - r.grad[:, :, idx]).abs().max().item()
    return diffs, stats


CASES = {
    "causal-mha": dict(T=32, H=4, Hkv=4, D=8),
    "causal-gqa": dict(T=32, H=4, Hkv=2, D=8),
    "causal-mqa-softcap-scale": dict(T=32, H=4, Hkv=1, D=8, softcap=5.0, scale=0.3),
    "window-gqa": dict(T=48, H=4, Hkv=2, D=8, window=7),
    "window-long": dict(T=48, H=2, Hkv=1, D=8, window=20),
    "docs-gqa": dict(T=48, H=4, Hkv=2, D=8, docs=True),
    "docs-window": dict(T=48, H=4, Hkv=2, D=8, docs=True, window=9),
    "mla-shaped-v": dict(T=32, H=4, Hkv=4, D=12, Dv=8),
    "bidirectional-window": dict(T=32, H=2, Hkv=2, D=8, causal=False, window=10),
    "contiguous-layout": dict(T=32, H=4, Hkv=2, D=8, layout="contiguous", window=9),
    "striped-layout": dict(T=32, H=4, Hkv=2, D=8, layout="striped", docs=True),
    "causal-contiguous": dict(T=32, H=2, Hkv=1, D=8, layout="contiguous"),
}


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ring_attention_equals_full_attention(world):
    """Outputs and the gradients of q, k and v, for every case, at cp = 2 and 4: float64 < 1e-10,
    float32 < 1e-5. And the load balance: under the zigzag layout every rank computes 2N + 1 chunk
    pairs and the same number of query-key pairs; the contiguous split gives rank r r + 1 pairs
    (the imbalance the zigzag layout removes)."""
    cases = {name: dict(c, dtype=torch.float64) for name, c in CASES.items()}
    # the matmul path too (auto takes torch's fused CPU kernel where there is no softcap)
    cases.update({name + "-math": dict(c, dtype=torch.float64, kernel="math") for name, c in CASES.items()
                  if "softcap" not in c and "Dv" not in c})
    cases["f32-window-docs"] = dict(T=64, H=4, Hkv=2, D=16, window=13, docs=True, dtype=torch.float32)
    cases["f32-causal"] = dict(T=64, H=4, Hkv=2, D=16, dtype=torch.float32)
    cases["f32-docs-math"] = dict(T=64, H=4, Hkv=2, D=16, window=13, docs=True, dtype=torch.float32, kernel="math")
    cases["bf16-autocast"] = dict(T=64, H=4, Hkv=2, D=16, window=13, docs=True, dtype=torch.float32, autocast=True)
    results = run_ranks(world, _ring_many, cases)
    for name, case in cases.items():
        worst = max(max(r[name][0].values()) for r in results)
        tol = 5e-2 if case.get("autocast") else 1e-10 if case["dtype"] == torch.float64 else 1e-5
        assert worst < tol, (name, [r[name][0] for r in results])
    zig, cont = [r["causal-mha"][1] for r in results], [r["causal-contiguous"][1] for r in results]
    assert [s["blocks"] for s in zig] == [2 * world + 1] * world
    assert len({s["pairs"] for s in zig}) == 1
    assert [s["blocks"] for s in cont] == list(range(1, world + 1))
    assert cont[-1]["pairs"] > zig[0]["pairs"] > cont[0]["pairs"]


def _ring_many(rank, world, cases):
    return {name: _ring_vs_full(rank, world, case) for name, case in cases.items()}


def test_layouts_hold_every_slot_once_and_refuse_bad_lengths():
    for kind in ("zigzag", "contiguous", "striped"):
        layout = SequenceLayout(4, 32, kind)
        slots = torch.cat([layout.slots(r) for r in range(4)])
        assert sorted(slots.tolist()) == list(range(32))
    assert SequenceLayout(2, 16).slots(1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert SequenceLayout(2, 16).slots(0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    with pytest.raises(ValueError, match="multiple of 8"):
        SequenceLayout(4, 36)
    with pytest.raises(ValueError, match="layout 'ring'"):
        SequenceLayout(2, 16, "ring")


# ---------------------------------------------------------------------------------------------
# training: the sequence over two processes follows the one-process run

TINY = dict(vocab_size=97, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=64)
MODELS = {
    "llama": ("tiny-llama", dict(TINY, n_layers=2)),
    # sliding windows shorter than a zigzag chunk pair on 5 of 6 layers, sandwich norms, local RoPE base
    "gemma3": ("tiny-gemma3", dict(TINY, n_layers=6, sliding_window=6, query_pre_attn_scalar=8)),
    # MLA (value heads narrower than the queries': the ring's matmul path) + routed and shared experts
    # with sigmoid routing over expert groups, in float64: in float32 the fifth step's loss differed by
    # 1.2e-5 (steps 1-4 <= 8.8e-7, first gradients 9e-7); in float64 every step <= 7.1e-7 (the fused
    # loss sums in float32). Qwen3-MoE: softmax top-2 routing, no auxiliary loss (it would be
    # computed over each rank's tokens: with moe_aux_loss_coef=0.01 the losses differ by 5.6e-3)
    "deepseek": ("tiny-deepseek", dict(vocab_size=97, n_layers=2, d_ff=96, max_seq_len=64), torch.float64),
    "qwen3_moe": ("tiny-qwen3-moe", dict(vocab_size=97, n_layers=2, max_seq_len=64)),
}


def _batch(T=32, B=2, docs=False, seed=1, ignore=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (B, T + 1), generator=g)
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    if ignore:  # ignored targets weigh the ranks' shares unevenly
        targets[0, 3] = -100
        targets[1, 20:26] = -100
    doc_ids = torch.cumsum(torch.rand(B, T, generator=g) < 0.12, dim=-1) if docs else None
    return inputs, targets, doc_ids


def _train(model_key, docs, steps, cp=None, hooks=False):
    """Loss per AdamW step, and the gradients after the first backward (gathered over the group).
    ``hooks``: through the dispatcher's path (apply_context_parallel) with activation checkpointing."""
    from evolm.presets import get_preset
    from evolm.model import build

    preset, over, *dtype = MODELS[model_key]
    torch.manual_seed(0)
    model = build(get_preset(preset, **over), dtype=dtype[0] if dtype else None)
    if hooks:
        from evolm.parallel.context import apply_context_parallel
        from evolm.train.parallel import apply_activation_checkpointing

        cp = apply_context_parallel(model, None, grad_scale=1)  # gradients summed below, not averaged by FSDP
        apply_activation_checkpointing(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, first_grads = [], None
    for step in range(steps):
        inputs, targets, doc_ids = _batch(docs=docs, seed=step % 2)  # two batches in turn: the loss falls
        opt.zero_grad()
        if cp is None or hooks:
            loss = model(inputs, doc_ids=doc_ids, targets=targets)
            loss.backward()
            value = float(loss.detach())
            if hooks:
                cp.reduce_gradients(model)
        else:
            share = cp.loss(model, inputs, targets, doc_ids)
            share.backward()
            cp.reduce_gradients(model)
            value = cp.total(share)
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(value)
    return losses, first_grads


# (model, packed documents, through apply_context_parallel's hooks with activation checkpointing)
TRAIN_CASES = [("llama", False, False), ("llama", True, False), ("gemma3", False, False), ("gemma3", True, True),
               ("deepseek", False, False), ("qwen3_moe", True, False)]


def _train_cp(rank, world, steps):
    """Every training case in one pair of processes (one spawn for the lot)."""
    from evolm.parallel.context import ContextParallel

    cp = ContextParallel()
    x = torch.arange(2 * 32 * 3).view(2, 32, 3)
    assert torch.equal(cp.gather(cp.shard(x)), x)  # shard -> gather is the identity
    out = {}
    for key, docs, hooks in TRAIN_CASES:
        losses, grads = _train(key, docs, steps, hooks=True) if hooks else _train(key, docs, steps, cp)
        out[key, docs, hooks] = losses, {n: g.numpy() for n, g in grads.items()}  # not shared-memory tensors
    return out


@pytest.mark.slow
def test_cp2_training_equals_one_process():
    """5 AdamW steps: the cp = 2 losses equal the one-process ones within 1e-5 relative, and the
    first step's gradients (summed over the group) equal the one-process gradients, for a
    Llama-style model (GQA), the same on packed documents, a Gemma 3-style one (windows shorter
    than a chunk, sandwich norms), DeepSeek-style (MLA + MoE) and Qwen3-MoE-style; one case calls the model as one process would, sharded by
    apply_context_parallel's hooks, with activation checkpointing (the blocks recompute their ring
    attention in the backward)."""
    steps = 5
    results = run_ranks(2, _train_cp, steps)
    for case in TRAIN_CASES:
        ref_losses, ref_grads = _train(case[0], case[1], steps)
        for r in results:
            losses, grads = r[case]
            rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
            assert rel < 1e-5, (case, losses, ref_losses)
            worst = max(((torch.from_numpy(grads[n]) - g).abs().max() / g.abs().max().clamp(min=1e-12)).item()
                        for n, g in ref_grads.items())
            assert worst < 1e-5, (case, worst)


LLAMA_EVEN = dict(MODELS["llama"][1], vocab_size=98)  # tensor parallelism splits the vocabulary in two


def _layout_rank(rank, world, steps, degrees):
    """A 4-process layout through the dispatcher (``ParallelLayout`` + ``parallelize``: FSDP2 over
    dp_shard_cp, the ring over cp, DTensor tensor parallelism over tp): each data-parallel rank
    reads its share of the 4 rows, its cp ranks half of each sequence."""
    from evolm.model import build
    from evolm.parallel import ParallelLayout, parallelize
    from evolm.presets import get_preset

    layout = ParallelLayout(**degrees).resolve(world)
    mesh = layout.build_mesh("cpu")
    torch.manual_seed(0)
    net = parallelize(build(get_preset(MODELS["llama"][0], **LLAMA_EVEN)), layout, mesh)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    dp, n_dp = mesh["dp"].get_local_rank(), mesh["dp"].size()
    rows = slice(dp * 4 // n_dp, (dp + 1) * 4 // n_dp)
    losses, grads = [], None
    for step in range(steps):
        inputs, targets, doc_ids = _batch(B=4, docs=True, seed=step % 2, ignore=False)
        loss = net(inputs[rows], targets=targets[rows], doc_ids=doc_ids[rows])
        loss.backward()
        if grads is None:
            grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).numpy().copy()
                     for n, p in net.named_parameters()}
        opt.step()
        opt.zero_grad()
        value = loss.detach().clone()
        if n_dp > 1:
            dist.all_reduce(value, group=mesh["dp"].get_group())
        losses.append(float(value) / n_dp)
    return dp, losses, grads


@pytest.mark.slow
@pytest.mark.parametrize("degrees", [dict(dp_shard=2, cp=2), dict(dp_shard=1, tp=2, cp=2)],
                         ids=["dp_shard2-cp2", "tp2-cp2"])
def test_4_process_layouts_with_cp_equal_one_process(degrees):
    """dp_shard 2 x cp 2 and tp 2 x cp 2: the losses and first gradients of one process on the
    global batch of 4 rows (packed documents)."""
    from evolm.model import build
    from evolm.presets import get_preset

    torch.manual_seed(0)
    model = build(get_preset(MODELS["llama"][0], **LLAMA_EVEN))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_losses, ref_grads = [], None
    for step in range(5):
        inputs, targets, doc_ids = _batch(B=4, docs=True, seed=step % 2, ignore=False)
        loss = model(inputs, targets=targets, doc_ids=doc_ids)
        loss.backward()
        if ref_grads is None:
            ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        ref_losses.append(float(loss.detach()))
    for dp, losses, grads in run_ranks(4, _layout_rank, 5, degrees):
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
        assert rel < 1e-5, (dp, losses, ref_losses)
        worst = max(((torch.from_numpy(grads[n]) - g).abs().max() / g.abs().max()).item() for n, g in ref_grads.items())
        assert worst < 1e-5, worst
        print(f"{degrees}, dp rank {dp}: max rel loss diff {rel:.2e}, max rel gradient diff {worst:.2e}")


def test_context_parallel_refuses_what_it_cannot_shard():
    from evolm.parallel.context import check_model
    from evolm.presets import get_preset

    check_model(get_preset("tiny-gemma3"))  # sliding windows, sandwich norms: fine
    with pytest.raises(ValueError, match="mixer 'mamba'"):
        check_model(get_preset("tiny-llama", attention="mamba"))
    with pytest.raises(ValueError, match="mtp_depth"):
        check_model(get_preset("tiny-deepseek", mtp_depth=1))


# --- end to end: torchrun -m evolm.cli pretrain --cp 2 equals the single-process run ------------
from test_train import _losses, _max_rel_diff, _torchrun, _write_recipe, corpus, full_run  # noqa: E402,F401


@pytest.mark.slow
def test_torchrun_pretrain_cp2_equals_single_process(corpus, full_run, tmp_path):  # noqa: F811
    """The recipe of tests/test_train.py (two stages of 32 and 64 tokens, accumulation, clipping,
    eval, checkpoints) under ``--cp 2``: both ranks read the same micro-batches and each takes half
    of every sequence (FSDP over the cp ranks); the logged losses must equal the single run's."""
    recipe_path = _write_recipe(tmp_path, corpus, sample_prompts=[])
    _torchrun(recipe_path, tmp_path / "run", "--cp", "2")
    single, cp = _losses(full_run[0]), _losses(tmp_path / "run")
    assert len(single) == len(cp) == 10
    rel = _max_rel_diff(single, cp)
    print(f"torchrun pretrain --cp 2 vs one process: max rel loss diff {rel:.2e}")
    assert rel < 1e-5
    val = [[r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
           for run in (full_run[0], tmp_path / "run")]
    assert len(val[0]) == len(val[1]) == 4 and max(abs(a - b) / a for a, b in zip(*val)) < 1e-5  # eval sharded too
    assert (tmp_path / "run" / "model.safetensors").is_file()
