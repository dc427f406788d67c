"""The trainer's distributed plumbing: process group, activation checkpointing, full state dicts,
reductions of logged figures.

As in torchtitan, the model file knows nothing about parallelism; the layouts themselves (DDP,
FSDP2, tensor parallel ... on one DeviceMesh) are applied by ``evolm.parallel.parallelize``; this
module keeps what the trainer needs around it. Checkpoint keys stay those of the plain model.

- DDP (``torch.nn.parallel.DistributedDataParallel``): every rank holds the whole model and
  gradients are all-reduced.
- FSDP2 (``torch.distributed.fsdp.fully_shard``, Zhao et al. 2023, arXiv:2304.11277): each block's
  parameters are sharded across ranks and gathered just in time for its forward/backward.
- Activation checkpointing (Chen et al. 2016, arXiv:1604.06174): blocks recompute their
  activations in the backward pass instead of storing them.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint


def init_distributed(mode: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none" or world == 1:  # one process: no process group, no wrappers
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        # A process group left alive at interpreter exit tears down gloo's worker threads in an
        # undefined order; under load one rank can abort ("terminate called without an active
        # exception") after the run already finished. Shut it down explicitly instead.
        atexit.register(shutdown_distributed)
    rank = dist.get_rank()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, dist.get_world_size(), torch.device("cuda", local)
    return rank, dist.get_world_size(), torch.device("cpu")


def shutdown_distributed() -> None:
    """Destroy the process group (idempotent); registered at exit by ``init_distributed``."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def apply_activation_checkpointing(model) -> None:
    """Recompute each block in the backward pass (keys and modules unchanged)."""
    for block in model.layers:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def parallelize(model, mode: str, world_size: int, device: torch.device, compile: bool = False,
                activation_checkpointing: bool = False):
    """The module to train for ``train.distributed`` alone (``none``/``ddp``/``fsdp`` over the whole
    world); the layouts of ``parallel:`` go through :func:`evolm.parallel.parallelize`, which this calls."""
    from evolm.parallel import parallelize as apply_layout
    from evolm.parallel.layout import effective_layout

    layout = effective_layout(mode, None, world_size)
    mesh = layout.build_mesh(device.type) if layout is not None and not layout.ddp_only else None
    return apply_layout(model, layout, mesh, device=device, compile=compile,
                        activation_checkpointing=activation_checkpointing)


def _sharded(mode) -> bool:
    """Whether parameters are DTensors (FSDP2, tensor parallel ...): ``mode`` is a bool, or a
    ``train.distributed`` name (``fsdp``)."""
    return mode == "fsdp" if isinstance(mode, str) else bool(mode)


def full_state_dicts(model, optimizer, mode) -> tuple[dict, dict]:
    """Unsharded model and optimizer state (on every rank; rank 0 writes them). ``mode``: whether the
    parameters are sharded DTensors (see ``_sharded``); gathering them is a collective."""
    if not _sharded(mode) or not dist.is_initialized():
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from evolm.parallel.expert import gather_optimizer_state

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # the model's first: its state_dict hooks reshard FSDP2's root parameters, which an evaluation
    # forward leaves unsharded (the optimizer's FQN mapping reads the sharded ones)
    msd = get_model_state_dict(model, options=opts)
    return msd, gather_optimizer_state(model, optimizer, get_optimizer_state_dict(model, optimizer, options=opts))


def load_optimizer_state(model, optimizer, optim_sd: dict, mode) -> None:
    """Load a full (unsharded) optimizer state saved by ``full_state_dicts``."""
    if not _sharded(mode) or not dist.is_initialized():
        optimizer.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from evolm.parallel.expert import local_optimizer_state

    optim_sd = local_optimizer_state(model, optim_sd)  # ep: this rank's experts' rows
    set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))


def all_reduce_mean(x: float, world_size: int, group=None) -> float:
    """The mean of ``x`` over the ``world_size`` ranks of ``group`` (default: all)."""
    if world_size == 1 or not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return float(t.item()) / world_size


def all_reduce_sum(values: list[float], world_size: int, group=None) -> list[float]:
    """Sums over the ``world_size`` ranks of ``group`` (default: all)."""
    if world_size == 1 or not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.tolist()


def all_reduce_sum_(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sum a tensor over the ranks in place (a no-op in one process)."""
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(t)
    return t


def barrier(world_size: int) -> None:
    if world_size > 1 and dist.is_initialized():
        dist.barrier()
