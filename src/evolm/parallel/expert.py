"""Expert parallelism: a MoE layer's experts split across ranks, each token sent to its experts and back.

GShard (Lepikhin et al. 2020, arXiv:2006.16668) and Switch (Fedus et al. 2021, arXiv:2101.03961)
place different experts on different devices and move tokens with two all-to-alls; DeepSeek-V3
(arXiv:2412.19437 sec. 3.2) trains with 64-way expert parallelism. Applied from outside the model,
as torchtitan does (``ExpertParallel``): the MoE module and its checkpoint keys stay the plain ones.

Layout
  ``ep`` ranks split the ``n_experts`` experts in contiguous blocks (rank r holds experts
  ``r*E/ep .. (r+1)*E/ep - 1``; E must divide by ep). The router and the shared experts are
  replicated. The ep ranks are *data-parallel* ranks: each routes its own tokens (torchtitan's ep
  borrows from the data-parallel mesh dims). With more data-parallel ranks than ep
  (``replica_mesh``: fsdp x ep), the ranks at the same ep coordinate hold the same experts.

One layer's forward (:func:`_forward`, replacing ``Experts.forward``)
  1. route locally (the replicated router: top-k, sigmoid + bias, groups, capacity - unchanged);
  2. sort the (token, expert) pairs by expert, as one process does; the blocks bound for each rank
     are then contiguous;
  3. exchange the per-expert row counts (an all-to-all of E integers), then the rows themselves
     (``all_to_all_single`` with those split sizes; differentiable, its backward is the reverse
     all-to-all: ``torch.distributed._functional_collectives``, which gloo runs on CPU);
  4. regroup the received rows by local expert, run each expert's MLP (``Experts.mlps``), undo the
     grouping and send the rows back (the combine all-to-all);
  5. weight by the routing scores and sum into the token's output on the rank that owns the token,
     the same operations in the same order as :class:`evolm.nn.moe.Experts`.

Equal to one process seeing the union of the ranks' tokens
  - *capacity* (Switch's ``expert_capacity``) is counted per sequence, in token order, before
    dispatch; data parallelism keeps sequences whole on one rank, so the same tokens are dropped.
    (Context parallelism, which splits a sequence, would have to count across its ranks.)
  - the *balance loss* (Switch) multiplies each expert's share of tokens by its mean router
    probability. The counts are summed over all data-parallel ranks (``MoE.reduce_load``); the
    probability stays the rank's own, so the data-parallel mean of the ranks' losses (and of their
    gradients) is the one-process loss over the union. The z-loss is a per-token mean: unchanged.
  - DeepSeek-V3's *router bias* update reads ``MoE.step_counts``, which stay this rank's own; the
    trainer's ``update_moe_bias`` sums them over the ranks (tests/test_router_bias.py).
  - *gradients*: an expert's weights get contributions from every rank's tokens through the
    backward all-to-all. Data-parallel wrappers must leave these weights alone
    (:func:`data_parallel` tells DDP / FSDP2 to ignore them); a gradient hook sums them over the
    replicas (fsdp x ep) and divides by the data-parallel degree - the mean DDP would take.
  - *gradient clipping* needs the norm over all experts: :func:`clip_grad_norm_`.

Checkpoints
  ``state_dict()`` gives each expert weight under its plain key as a ``DTensor`` sharded on dim 0
  over the ep mesh (global shape ``(E, ...)``), so ``torch.distributed.checkpoint`` saves and
  reshards it like any sharded parameter; :func:`full_state_dict` gathers a dict that a
  one-process model loads; ``load_state_dict`` accepts full tensors or DTensors and keeps this
  rank's slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from evolm.nn.moe import MoE

_WEIGHTS = ("gate_up_proj", "down_proj")


@dataclass
class ExpertShard:
    """One MoE layer's expert-parallel state: the ep mesh, this rank's experts, traffic counters."""

    mesh: DeviceMesh
    n_experts: int
    replica_group: dist.ProcessGroup | None = None
    # bytes this rank sent to *other* ranks in forward passes (the backward sends the same again)
    sent: dict[str, int] = field(default_factory=lambda: {"dispatch": 0, "combine": 0, "counts": 0})

    @property
    def group(self) -> dist.ProcessGroup:
        return self.mesh.get_group()

    @property
    def size(self) -> int:
        return self.mesh.size()

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank()

    @property
    def experts(self) -> range:
        return expert_range(self.n_experts, self.size, self.rank)


def expert_range(n_experts: int, ep: int, rank: int) -> range:
    """The experts rank ``rank`` of ``ep`` holds; every rank must hold the same number."""
    if ep < 1 or n_experts % ep:
        fits = [d for d in range(1, n_experts + 1) if n_experts % d == 0]
        raise ValueError(f"expert parallelism: n_experts={n_experts} does not divide by ep={ep}; each rank "
                         f"holds n_experts / ep experts, so ep must be one of {fits}")
    k = n_experts // ep
    return range(rank * k, (rank + 1) * k)


def moe_layers(model) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def parallelize_experts(model, ep_mesh: DeviceMesh, replica_mesh: DeviceMesh | None = None,
                        grad_divide: float | None = None):
    """Shard every MoE layer's experts over ``ep_mesh`` (1-D) and route tokens with all-to-alls.

    ``replica_mesh``: the data-parallel ranks outside ep that hold the same experts (fsdp x ep), or
    None when ep spans the whole data-parallel group. ``grad_divide``: what the expert gradients
    are divided by, by default the data-parallel degree (ep x replicas), matching the mean that
    DDP / FSDP2 take of every other gradient; 1 keeps plain sums. Returns the model, in place.
    """
    if ep_mesh.ndim != 1:
        raise ValueError(f"expert parallelism: ep_mesh must be 1-D, got dims {ep_mesh.mesh_dim_names}")
    layers = moe_layers(model)
    if not layers:
        raise ValueError("expert parallelism: the model has no MoE layer (n_experts is 0)")
    replicas = replica_mesh.size() if replica_mesh is not None else 1
    divide = float(ep_mesh.size() * replicas) if grad_divide is None else float(grad_divide)
    for moe in layers:
        shard = ExpertShard(ep_mesh, moe.gate.n_experts, replica_mesh.get_group() if replicas > 1 else None)
        _shard_weights(moe.experts, shard, divide)
        moe.experts.forward = partial(_forward, moe.experts, shard)
        moe.experts.ep = shard
        moe.reduce_load = partial(_reduce_load, [shard.group] + ([shard.replica_group] if shard.replica_group else []))
        moe.experts.register_state_dict_post_hook(partial(_state_dict_hook, shard))
        moe.experts.register_load_state_dict_pre_hook(partial(_load_hook, shard))
    return model


def _shard_weights(experts, shard: ExpertShard, divide: float) -> None:
    """Keep this rank's rows of the stacked expert weights (same names, so the same keys)."""
    rows = shard.experts
    for name in _WEIGHTS:
        full = getattr(experts, name)
        local = torch.nn.Parameter(full.detach()[rows.start:rows.stop].clone(), requires_grad=full.requires_grad)
        local.ep_group = shard.group  # read by clip_grad_norm_
        local.ep_shard = shard  # read by the optimizer-state helpers
        if local.requires_grad:
            local.register_hook(partial(_grad_hook, shard.replica_group, divide))
        setattr(experts, name, local)


def _grad_hook(replica_group, divide: float, g: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks holding the same experts, then the data-parallel mean."""
    if replica_group is not None:
        g = g.clone()
        dist.all_reduce(g, group=replica_group)
    return g / divide if divide != 1 else g


def _reduce_load(groups, counts: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Tokens per expert and tokens routed, summed over the data-parallel ranks (no gradient)."""
    t = torch.cat([counts.detach().float(), counts.new_tensor([float(n)])])
    for g in groups:
        dist.all_reduce(t, group=g)
    return t[:-1], float(t[-1])


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable ``all_to_all_single``: the backward sends the gradients back the same way."""
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


def _forward(experts, shard: ExpertShard, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``Experts.forward`` with the experts spread over the ep ranks: dispatch, compute, combine."""
    N, k = idx.shape
    ep, local = shard.size, len(shard.experts)
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // k
    counts = torch.bincount(flat, minlength=shard.n_experts)
    xs = x[token]
    ws = weights.reshape(-1)[order].unsqueeze(-1)
    if experts.scale_input:  # Llama 4: expert(w * x)
        xs = xs * ws.to(x.dtype)
    got = torch.empty_like(counts)  # got[s * local + e]: rows rank s sends to my expert e
    dist.all_to_all_single(got, counts, group=shard.group)
    send = counts.view(ep, local).sum(1).tolist()
    recv = got.view(ep, local).sum(1).tolist()
    xr = _all_to_all(xs, recv, send, shard.group)
    by_expert = torch.repeat_interleave(torch.arange(local).repeat(ep), got).argsort(stable=True)
    yr = experts.mlps(xr[by_expert], got.view(ep, local).sum(0).tolist())
    ys = _all_to_all(torch.empty_like(yr).index_copy(0, by_expert, yr), send, recv, shard.group)
    row = x.shape[-1] * x.element_size()
    shard.sent["dispatch"] += (sum(send) - send[shard.rank]) * row
    shard.sent["combine"] += (sum(recv) - recv[shard.rank]) * row
    shard.sent["counts"] += (ep - 1) * local * counts.element_size()
    if not experts.scale_input:
        ys = ys * ws.to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, ys)


# --- checkpoints ---------------------------------------------------------------------------------
def _state_dict_hook(shard: ExpertShard, module, state_dict, prefix, local_metadata) -> None:
    """Local rows -> a DTensor of the full (E, ...) shape, Shard(0) over the ep mesh."""
    for name in _WEIGHTS:
        key = prefix + name
        t = state_dict.get(key)
        if t is None or isinstance(t, DTensor):
            continue
        state_dict[key] = _as_dtensor(t, shard)


def _load_hook(shard: ExpertShard, module, state_dict, prefix, local_metadata, strict, missing, unexpected,
               errors) -> None:
    """Accept the full (E, ...) weights (a one-process checkpoint) or a DTensor; keep this rank's rows."""
    rows = shard.experts
    for name in _WEIGHTS:
        key = prefix + name
        t = state_dict.get(key)
        if t is None:
            continue
        if isinstance(t, DTensor):
            same = t.device_mesh == shard.mesh and tuple(t.placements) == (Shard(0),)
            t = t.to_local() if same else t.full_tensor()
            if same:
                state_dict[key] = t
                continue
        if t.shape[0] == shard.n_experts:
            state_dict[key] = t[rows.start:rows.stop]
        elif t.shape[0] != len(rows):
            errors.append(f"{key}: expected {shard.n_experts} experts (or this rank's {len(rows)}), got {t.shape[0]}")


def _as_dtensor(t: torch.Tensor, shard: ExpertShard) -> DTensor:
    shape = torch.Size((shard.n_experts, *t.shape[1:]))
    return DTensor.from_local(t, shard.mesh, [Shard(0)], run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def _expert_names(model) -> dict[str, torch.nn.Parameter]:
    """Plain parameter names (no DDP ``module.`` prefix) of the split expert weights."""
    inner = getattr(model, "module", model)
    return {n: p for n, p in inner.named_parameters() if hasattr(p, "ep_shard")}


def _is_rows(v, shard: ExpertShard) -> bool:
    return isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.dim() > 0 \
        and v.shape[0] == len(shard.experts)


def shard_optimizer_state(model, flat: dict) -> dict:
    """A flattened optimizer state (``state.<param>.exp_avg`` ..., as DCP's ``get_state_dict``
    gives it) with the split experts' moments as DTensors ``Shard(0)`` over ep - the placement of
    the weights themselves - sharing this rank's storage, so DCP saves every rank's rows and a
    load into them fills the optimizer's own tensors. Other entries unchanged."""
    for name, p in _expert_names(model).items():
        for key in [k for k in flat if k.startswith(f"state.{name}.")]:
            if _is_rows(flat[key], p.ep_shard):
                flat[key] = _as_dtensor(flat[key], p.ep_shard)
    return flat


def local_optimizer_state(model, state: dict) -> dict:
    """The inverse for loading: expert moments given as DTensors or full ``(E, ...)`` tensors ->
    this rank's rows. Takes the flattened form or torch's nested ``{"state": {param: {...}}}``."""
    names = _expert_names(model)
    nested = isinstance(state.get("state"), dict)
    for name, p in names.items():
        rows = p.ep_shard.experts
        entries = state["state"].get(name, {}) if nested else \
            {k: state[k] for k in state if k.startswith(f"state.{name}.")}
        for k, v in list(entries.items()):
            if isinstance(v, DTensor):
                v = v.to_local() if v.device_mesh == p.ep_shard.mesh and tuple(v.placements) == (Shard(0),) \
                    else v.full_tensor()[rows.start:rows.stop]
            elif isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == p.ep_shard.n_experts:
                v = v[rows.start:rows.stop]
            if nested:
                state["state"][name][k] = v
            else:
                state[k] = v
    return state


def gather_optimizer_state(model, optimizer, state: dict) -> dict:
    """Put the split experts' full moments (gathered from every ep rank: a collective) into a
    full optimizer state dict (torch's nested form, keyed by parameter name, as
    ``get_optimizer_state_dict(full_state_dict=True)`` gives; possibly empty off rank 0)."""
    for name, p in _expert_names(model).items():
        full = {k: _as_dtensor(v, p.ep_shard).full_tensor() for k, v in optimizer.state.get(p, {}).items()
                if _is_rows(v, p.ep_shard)}
        if name in state.get("state", {}):
            state["state"][name].update({k: v.to(state["state"][name][k].device) for k, v in full.items()})
    return state


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every sharded tensor gathered (a collective: every rank calls it)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items()}


def apply_expert_parallel(model, layout, mesh) -> None:
    """The ``parallelize`` step for ``layout.ep > 1`` (evolm.parallel.layout's mesh): experts split
    over the ``ep`` sub-mesh (dp_shard_in_ep x cp), replicated over dp_replicate x dp_shard_mod_ep;
    the dense rest is left to FSDP2 over dp_shard_cp (which ignores the experts)."""
    if layout.tp > 1:
        raise ValueError(f"expert parallelism: ep={layout.ep} with tp={layout.tp} is not supported yet "
                         "(tensor parallel also splits the experts' weights); use one of them")
    dims = [d for d in ("dp_replicate", "dp_shard_mod_ep") if mesh[d].size() > 1]
    replicas = None
    if len(dims) == 1:
        replicas = mesh[dims[0]]
    elif dims:
        replicas = mesh[tuple(dims)]._flatten("ep_replicas")
    parallelize_experts(model, mesh["ep"], replica_mesh=replicas)


# --- what data parallelism must know -------------------------------------------------------------
def expert_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if hasattr(p, "ep_group")]


def data_parallel(model, mode: str, mesh: DeviceMesh | None = None):
    """Wrap the replicated rest of an expert-parallel model for data parallelism, leaving the
    experts (already reduced by their gradient hook) alone. ``mode``: ``ddp`` (returns the DDP
    wrapper) or ``fsdp`` (FSDP2 per block and at the root over ``mesh``; returns the model)."""
    ignored = expert_parameters(model)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = {id(p) for p in ignored}
        names = [n for n, p in model.named_parameters() if id(p) in ids]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        return DistributedDataParallel(model, process_group=mesh.get_group() if mesh is not None else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block, mesh=mesh, ignored_params=set(ignored))
        fully_shard(model, mesh=mesh, ignored_params=set(ignored))
        return model
    raise ValueError(f"expert parallelism: data-parallel mode {mode!r}; expected ddp or fsdp")


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model whose experts are split over ep ranks: the
    squared norms of expert shards are summed over their ep group, those of FSDP's DTensors over
    their mesh, replicated ones counted once; every rank gets the same global norm and scale.
    Without expert shards among ``params`` it is torch's own."""
    params = list(params)
    if not any(hasattr(p, "ep_group") for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [(p, p.grad) for p in params if p.grad is not None]
    total = torch.zeros((), dtype=torch.float64)
    by_group: dict[dist.ProcessGroup, torch.Tensor] = {}
    for p, g in grads:
        if isinstance(g, DTensor):
            sq = g.float().pow(2).sum().full_tensor().double()
        else:
            sq = g.detach().double().pow(2).sum()
        group = getattr(p, "ep_group", None)
        if group is None:
            total += sq.cpu()
        else:
            by_group[group] = by_group.get(group, torch.zeros((), dtype=torch.float64)) + sq.cpu()
    for group, sq in by_group.items():
        dist.all_reduce(sq, group=group)
        total += sq
    norm = total.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for _, g in grads:
        g.mul_(scale.to(g.dtype).item())
    return norm.float()
