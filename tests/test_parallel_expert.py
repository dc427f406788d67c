"""Expert parallelism (evolm.parallel.expert) equals one process given the union of the ranks' tokens.

Each rank routes its own tokens (ep ranks are data-parallel ranks); the experts are split across
ranks and reached by all-to-alls. The reference is the plain single-process layer / model over the
concatenated batch: outputs, input and parameter gradients (float64 layer), capacity drops, the
balance loss, and the loss sequence of 5 AdamW steps for DeepSeek- (MLA + sigmoid router + bias),
Qwen3-MoE- and Mixtral-style tiny models (float32, within 1e-5 relative).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from evolm import ModelConfig, build
from evolm.nn.moe import MoE, within_capacity
from evolm.parallel import ParallelLayout, parallelize
from evolm.parallel.expert import (clip_grad_norm_, data_parallel, expert_range, full_state_dict,
                                   parallelize_experts)
from evolm.presets import get_preset
from evolm.train.loop import update_moe_bias
from ranks import run_ranks

D, F, T, B_RANK = 16, 12, 10, 2  # one layer: width, expert width, tokens per sequence, sequences per rank

# one MoE layer per routing family (ModelConfig overrides)
LAYERS = {
    "deepseek": dict(router="sigmoid", router_bias=True, n_expert_groups=4, topk_groups=2, norm_topk_prob=True,
                     routed_scaling_factor=2.5, n_shared_experts=1),
    "qwen3_moe": dict(router="softmax", norm_topk_prob=True, moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001),
    "mixtral": dict(router="softmax", norm_topk_prob=True, n_experts_per_tok=2),
    "llama4": dict(router="sigmoid", router_scales_input=True, n_experts_per_tok=1, n_shared_experts=1),
    "switch_capacity": dict(router="softmax", n_experts_per_tok=1, expert_capacity=2, mlp="mlp",
                            activation="relu", moe_aux_loss_coef=0.01),
}


def _portable(x):
    """Tensors -> numpy arrays, recursively: a result crosses the process boundary by value (a
    tensor would travel as a shared-memory handle that dies with its process)."""
    if isinstance(x, torch.Tensor):
        return x.detach().numpy().copy()
    if isinstance(x, dict):
        return {k: _portable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_portable(v) for v in x]
    return x


def _tensors(x):
    if isinstance(x, dict):
        return {k: _tensors(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_tensors(v) for v in x]
    return torch.from_numpy(x) if hasattr(x, "dtype") and hasattr(x, "shape") else x


def _ranks(world: int, fn, *args) -> list:
    return _tensors(run_ranks(world, fn, *args))


def _layer_cfg(name: str) -> ModelConfig:
    base = dict(d_model=D, n_heads=2, mlp="glu", activation="silu", mlp_bias=False, n_experts=8,
                n_experts_per_tok=2, moe_d_ff=F)
    return ModelConfig(**{**base, **LAYERS[name]})


def _layer(name: str) -> MoE:
    cfg = _layer_cfg(name)
    m = MoE(cfg).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.4)
        if m.gate.e_score_correction_bias is not None:
            m.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_experts, generator=g) * 0.3)
    return m.train()


def _layer_data(world: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world * B_RANK, T, D, generator=g, dtype=torch.float64)
    return x, torch.randn(x.shape, generator=g, dtype=torch.float64)


def _layer_worker(rank: int, world: int, names: list[str]) -> dict:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    out = {}
    try:  # 8 experts do not split over 3 ranks
        parallelize_experts(build(ModelConfig(**{**_tiny_model("mixtral"), "n_experts": 6})), mesh)
        if world == 4:
            out["error"] = None
    except ValueError as e:
        out["error"] = str(e)
    for name in names:
        layer = _layer(name)
        parallelize_experts(layer, mesh, grad_divide=1)  # plain sums: compared with one process's sum
        x, r = _layer_data(world)
        rows = slice(rank * B_RANK, (rank + 1) * B_RANK)
        x = x[rows].clone().requires_grad_()
        y = layer(x)
        loss = (y * r[rows]).sum()
        if layer.aux_loss is not None:  # the data-parallel mean of the ranks' losses is the global one
            loss = loss + layer.aux_loss / world
        loss.backward()
        shared = {n: p.grad.clone() for n, p in layer.named_parameters() if not hasattr(p, "ep_group")}
        for g in shared.values():
            dist.all_reduce(g)
        experts = {n: p.grad.clone() for n, p in layer.named_parameters() if hasattr(p, "ep_group")}
        aux = None if layer.aux_loss is None else layer.aux_loss.detach().clone()
        if aux is not None:
            dist.all_reduce(aux)
            aux /= world
        out[name] = dict(y=y.detach(), x_grad=x.grad, shared=shared, experts=experts, aux=aux,
                         counts=layer.expert_counts, sent=dict(layer.experts.ep.sent))
    return _portable(out)


def _single_layer(name: str, world: int) -> dict:
    layer = _layer(name)
    x, r = _layer_data(world)
    x.requires_grad_()
    y = layer(x)
    loss = (y * r).sum() + (layer.aux_loss if layer.aux_loss is not None else 0)
    loss.backward()
    return dict(y=y.detach(), x_grad=x.grad, grads={n: p.grad for n, p in layer.named_parameters()},
                aux=layer.aux_loss, layer=layer, x=x.detach())


def test_layer_forward_and_gradients_equal_one_process():
    _check_layers(_ranks(2, _layer_worker, list(LAYERS)), 2)


def _check_layers(ranks, world: int) -> None:
    names = list(LAYERS)
    if world == 4:
        assert "n_experts=6 does not divide by ep=4" in ranks[0]["error"]
    for name in names:
        ref = _single_layer(name, world)
        got = [r[name] for r in ranks]
        tol = dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(torch.cat([g["y"] for g in got]), ref["y"], **tol)
        torch.testing.assert_close(torch.cat([g["x_grad"] for g in got]), ref["x_grad"], **tol)
        for n, g in got[0]["shared"].items():  # router and shared experts: summed over the ranks
            # the router computes in float32 (nn/moe.py), so its gradient sums are float32's
            fp32 = dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g, ref["grads"][n], **(fp32 if n.startswith("gate.") else tol), msg=f"{name}: {n}")
        for n in got[0]["experts"]:  # each rank's slice of the stacked expert weights
            torch.testing.assert_close(torch.cat([g["experts"][n] for g in got]), ref["grads"][n], **tol,
                                       msg=f"{name}: {n}")
        if ref["aux"] is not None:
            torch.testing.assert_close(got[0]["aux"], ref["aux"].detach(), rtol=1e-6, atol=0)  # float32 logits
        # the bias update's counts stay per rank: their sum is one process's
        torch.testing.assert_close(sum(g["counts"] for g in got), ref["layer"].expert_counts)
    # capacity: some tokens were dropped (else the case would prove nothing), the same ones as above
    ref = _single_layer("switch_capacity", world)
    with torch.no_grad():
        idx = ref["layer"].gate(ref["x"].reshape(-1, D))[2].view(world * B_RANK, T)
    assert not within_capacity(idx, 8, 2).all()
    _check_traffic(ranks, world)


def _check_traffic(ranks, world: int) -> None:
    """Bytes sent to other ranks: the rows bound for other ranks' experts, D float64 values each,
    there (dispatch) and back (combine), plus each expert's row count (int64)."""
    local = 8 // world
    for rank, r in enumerate(ranks):
        mine = expert_range(8, world, rank)
        for name in LAYERS:
            counts, sent = r[name]["counts"], r[name]["sent"]
            away = int(counts.sum() - counts[mine.start:mine.stop].sum())
            if LAYERS[name].get("expert_capacity"):  # counts include the dropped tokens, which stay home
                assert sent["dispatch"] <= away * D * 8
            else:
                assert sent["dispatch"] == away * D * 8, name
            assert sent["counts"] == (world - 1) * local * 8
    assert sum(r[n]["sent"]["combine"] for r in ranks for n in LAYERS) == \
        sum(r[n]["sent"]["dispatch"] for r in ranks for n in LAYERS)


# --- whole models: 5 AdamW steps --------------------------------------------------------------------
STEPS, GLOBAL_B, SEQ = 5, 4, 12


def _tiny_model(family: str) -> dict:
    """A tiny DeepSeek- (MLA, sigmoid router + bias, groups, shared expert), Qwen3-MoE- or
    Mixtral-style config (a preset's architecture, shrunk)."""
    small = dict(vocab_size=97, d_model=32, n_layers=2, max_seq_len=64)
    if family == "deepseek":
        c = get_preset("tiny-deepseek", **small, n_heads=2, q_lora_rank=24, kv_lora_rank=16, moe_d_ff=16,
                       first_k_dense=1, d_ff=64)
    elif family == "qwen3_moe":
        c = get_preset("tiny-qwen3-moe", **small, n_heads=2, n_kv_heads=1, head_dim=16, moe_d_ff=16, d_ff=64,
                       moe_aux_loss_coef=0.01)
    else:
        c = get_preset("tiny-mixtral", **small, n_heads=2, n_kv_heads=1, moe_d_ff=32, n_experts=4)
    return {k: getattr(c, k) for k in c.__dataclass_fields__}


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 97, (GLOBAL_B, SEQ + 1), generator=torch.Generator().manual_seed(100 + step))


def _model(family: str):
    torch.manual_seed(0)
    return build(ModelConfig(**_tiny_model(family)))


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _train(model, net, rows: slice, clip, world: int) -> tuple[list[float], dict, object]:
    opt = _optimizer(model)
    losses, first = [], None
    for step in range(STEPS):
        b = _batch(step)[rows]
        loss = net(b[:, :-1], targets=b[:, 1:])
        loss.backward()
        if first is None:
            first = {n: p.grad.clone() for n, p in model.named_parameters()}
        clip(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad()
        update_moe_bias(model, world)
        t = loss.detach().double().reshape(1)
        if world > 1:
            dist.all_reduce(t)
        losses.append(float(t) / world)
    return losses, first, opt


def _model_worker(rank: int, world: int, runs: list[tuple[str, str]], ckpt: str | None = None) -> dict:
    """``runs``: (family, mode) pairs; mode ``ep`` (ep = world, DDP for the rest) or ``fsdp`` (fsdp x ep).
    ``ckpt``: a folder where the first run also writes a sharded (DCP) checkpoint."""
    from evolm.parallel import checkpoint
    from evolm.train.parallel import full_state_dicts

    out = {}
    for family, mode in runs:
        model = _model(family)
        if mode == "ep":
            mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
            parallelize_experts(model, mesh)
            net = data_parallel(model, "ddp")
        else:  # fsdp x ep through the layout's mesh and the one parallelize step: the dense rest
            # sharded by FSDP2 over all ranks, experts split over ep=2, replicated over the other 2
            layout = ParallelLayout(dp_shard=world, ep=2).resolve(world)
            mesh = layout.build_mesh("cpu")
            net = parallelize(model, layout, mesh)
        per = GLOBAL_B // world
        losses, first, opt = _train(model, net, slice(rank * per, (rank + 1) * per), clip_grad_norm_, world)
        if ckpt is not None and not out:  # DCP: every rank writes its experts' rows (weights and moments)
            checkpoint.save(net, opt, f"{ckpt}/dcp", progress={}, rank_state={}, rank=rank, world=world)
            _, osd = full_state_dicts(net, opt, True)  # the trainer's gathered checkpoint
            if rank == 0:
                out["full_optim"] = {n: v["exp_avg"] for n, v in osd["state"].items() if ".mlp.experts." in n}
        grads = {}
        for n, g in first.items():
            if hasattr(g, "full_tensor"):
                g = g.full_tensor()
            elif n.endswith(("experts.gate_up_proj", "experts.down_proj")):
                parts = [torch.empty_like(g) for _ in range(2 if mode != "ep" else world)]
                dist.all_gather(parts, g, group=(mesh if mode == "ep" else mesh["ep"]).get_group())
                g = torch.cat(parts)
            grads[n] = g
        out[f"{family}/{mode}"] = dict(losses=losses, grads=grads, state=full_state_dict(model))
    return _portable(out)


def _single_run(family: str) -> tuple[list[float], dict, object]:
    model = _model(family)
    losses, first, opt = _train(model, model, slice(None), torch.nn.utils.clip_grad_norm_, 1)
    return losses, first, model


def _check_model_runs(ranks, runs):
    for family, mode in runs:
        key = f"{family}/{mode}"
        losses, grads, single = _single_run(family)
        got = ranks[0][key]
        rel = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], losses))
        assert rel < 1e-5, (key, got["losses"], losses)
        assert all(r[key]["losses"] == got["losses"] for r in ranks)
        for n, g in grads.items():
            torch.testing.assert_close(got["grads"][n], g, rtol=1e-5, atol=1e-7, msg=f"{key}: {n}")
        # the gathered state dict has the plain model's keys and loads into one process, which then
        # scores a held-out batch as the one-process run's model does (weights differ by Adam's
        # amplified rounding on near-zero gradients, not by more)
        fresh = build(single.config)
        fresh.load_state_dict(got["state"])
        assert set(fresh.state_dict()) == set(got["state"]) == set(single.state_dict())
        b = _batch(99)
        with torch.no_grad():
            torch.testing.assert_close(fresh(b[:, :-1], targets=b[:, 1:]), single(b[:, :-1], targets=b[:, 1:]),
                                       rtol=1e-5, atol=0)
        if family == "deepseek":  # the router bias moved
            bias = [m.gate.e_score_correction_bias for m in single.modules() if isinstance(m, MoE)]
            assert all(b.abs().max() > 0 for b in bias)


def test_ep2_training_equals_one_process(tmp_path):
    runs = [(f, "ep") for f in ("deepseek", "qwen3_moe", "mixtral")]
    ranks = _ranks(2, _model_worker, runs, str(tmp_path))
    _check_model_runs(ranks, runs)
    # the sharded checkpoint written under ep=2 loads into one process: weights and AdamW moments
    # whole, equal to the gathered ones; the trainer's full checkpoint gathers the moments too
    from evolm.parallel import checkpoint

    model = build(ModelConfig(**_tiny_model("deepseek")))
    opt = _optimizer(model)
    checkpoint.load(model, opt, tmp_path / "dcp")
    for k, v in ranks[0]["deepseek/ep"]["state"].items():
        assert torch.equal(model.state_dict()[k], v), k
    full = ranks[0]["full_optim"]
    assert full and all(v.shape[0] == 8 for v in full.values())
    named = dict(model.named_parameters())
    for n, v in full.items():
        assert torch.equal(opt.state[named[n]]["exp_avg"], v), n


def _four_worker(rank: int, world: int, runs) -> dict:
    return {"layers": _layer_worker(rank, world, list(LAYERS)), "models": _model_worker(rank, world, runs)}


@pytest.mark.slow
def test_four_ranks_equal_one_process():
    """One launch of 4 processes: every layer at ep=4; training at ep=4 (DDP for the rest) and
    fsdp 4 x ep 2 through ParallelLayout + parallelize."""
    runs = [("deepseek", "ep"), ("deepseek", "fsdp"), ("qwen3_moe", "fsdp")]
    ranks = _ranks(4, _four_worker, runs)
    _check_layers([r["layers"] for r in ranks], 4)
    _check_model_runs([r["models"] for r in ranks], runs)


def test_experts_must_divide_by_ep():
    with pytest.raises(ValueError, match=r"n_experts=6 does not divide by ep=4.*\[1, 2, 3, 6\]"):
        expert_range(6, 4, 0)
    assert expert_range(8, 4, 3) == range(6, 8)


# --- end to end: torchrun -m evolm.cli pretrain --ep 2 equals the single-process run -------------
from test_train import _losses, _recipe_dict, _torchrun, corpus  # noqa: E402,F401  (fixture)


@pytest.mark.slow
def test_torchrun_pretrain_ep2_equals_single_process(corpus, tmp_path):  # noqa: F811
    """tests/test_train.py's recipe (two stages, accumulation, clipping, eval, checkpoints) on a tiny
    DeepSeek-style model (MLA, sigmoid router + bias, a shared expert): two ranks of one sequence
    per micro-batch under ``--ep 2`` (FSDP2 for the dense rest) against one process reading both
    ranks' sequences as one micro-batch of two; the final model file holds all experts; a resume
    from the last-but-one checkpoint ends bit for bit where the uninterrupted run did."""
    import yaml
    from safetensors.torch import load_file

    from evolm.train.pretrain import pretrain
    from evolm.train.recipe import recipe_from_dict

    data = corpus
    model = {"preset": "tiny-deepseek", "overrides": {"vocab_size": "tokenizer", "rope_scaling": None,
             "max_seq_len": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "q_lora_rank": 24, "kv_lora_rank": 16,
             "moe_d_ff": 16, "d_ff": 64}}
    single = _recipe_dict(data, micro_batch=2, sample_prompts=[])
    pretrain(recipe_from_dict({**single, "model": model}), out_dir=str(tmp_path / "single"), log=lambda s: None)
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump({**_recipe_dict(data, micro_batch=1, sample_prompts=[]), "model": model}))
    _torchrun(recipe_path, tmp_path / "ep", "--ep", "2")
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "ep")
    assert len(a) == len(b) == 10
    rel = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    print(f"torchrun pretrain --ep 2 vs one process: max rel loss diff {rel:.2e}")
    assert rel < 1e-5
    got, want = load_file(tmp_path / "ep" / "model.safetensors"), load_file(tmp_path / "single" / "model.safetensors")
    assert set(got) == set(want) and got["layers.1.mlp.experts.gate_up_proj"].shape[0] == 8
    # resume under ep from the last-but-one checkpoint (the experts' weights and AdamW moments
    # gathered, then split again): the last step and the final model come out bit for bit
    import shutil

    shutil.copytree(tmp_path / "ep", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_0000010")
    _torchrun(recipe_path, tmp_path / "resumed", "--ep", "2", "--resume")
    assert _losses(tmp_path / "resumed")[-1] == b[-1]
    again = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(again[k], got[k]) for k in got)

