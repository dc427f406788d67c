"""Parallelism applied from outside the model: one ``parallelize`` step, as torchtitan does it.

The model (``evolm.model.Transformer`` and ``evolm/nn``) knows nothing of processes, meshes or
shards: it is written for one device. A run's :class:`~evolm.parallel.layout.ParallelLayout` (the
recipe's ``parallel:`` section, or ``evolm pretrain --tp 2 ...``) builds one ``DeviceMesh``, and
:func:`parallelize` rewrites the built model in place for it, each part in its own module:

- ``layout.py``   the layout (degrees of dp_shard, dp_replicate, tp, pp, cp, ep), its checks and
                  its DeviceMesh (dims ``pp, dp_replicate, dp_shard, cp, tp`` + flattened ``dp``,
                  ``dp_shard_cp``, ``dp_cp``, ``ep``)
- ``tensor.py``   tensor parallelism (Megatron-LM, Shoeybi et al. 2019, arXiv:1909.08053; sequence
                  parallelism, Korthikanti et al. 2022, arXiv:2205.05198) with DTensor
                  ``parallelize_module``: column/row-wise projections, sequence-parallel norms,
                  vocabulary-parallel embedding and loss
- ``pipeline.py`` pipeline stages with ``torch.distributed.pipelining``
- ``ring.py``     context parallelism: ring attention over the sequence (Liu et al. 2023,
                  arXiv:2310.01889), zigzag load-balanced; ``context.py`` shards the batch and
                  sets the ring on the attention layers
- ``expert.py``   expert parallelism: all-to-all token dispatch for MoE layers
- ``checkpoint.py`` distributed checkpoints (DCP): save under one layout, resume under another
- data parallelism last: DDP (whole replicas) or FSDP2 ``fully_shard`` over ``dp_shard_cp``
  (HSDP when ``dp_replicate > 1``), composed with the above on the same mesh

Order (torchtitan's): tensor parallel, activation checkpointing, compile, then data parallel,
which must see the final module structure. State-dict keys stay those of the plain model.
"""

from __future__ import annotations

import torch

from evolm.parallel.layout import LayoutError, ParallelLayout, effective_layout, layout_from_dict

__all__ = ["LayoutError", "ParallelLayout", "effective_layout", "layout_from_dict", "parallelize"]


def parallelize(model, layout: ParallelLayout | None, mesh=None, *, device: torch.device | None = None,
                compile: bool = False, activation_checkpointing: bool = False):
    """Return the module to train: ``model`` rewritten for ``layout`` on ``mesh`` (its DeviceMesh,
    ``layout.build_mesh``), possibly wrapped (DDP). ``layout`` None: one process, nothing split."""
    from evolm.train.parallel import apply_activation_checkpointing

    if layout is not None and layout.tp > 1:
        from evolm.parallel.tensor import apply_tensor_parallel

        apply_tensor_parallel(model, mesh["tp"])
    if layout is not None and layout.cp > 1:  # the sequence over mesh["cp"], attention as a ring (context.py)
        from evolm.parallel.context import apply_context_parallel

        apply_context_parallel(model, mesh["cp"].get_group())
    if layout is not None and layout.ep > 1:
        from evolm.parallel.expert import apply_expert_parallel

        apply_expert_parallel(model, layout, mesh)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        for block in model.layers:  # per-block compilation: short compile times, same keys
            block.compile()
        model.compiled_loss = True  # the LM head's softmax/gradient, fused by inductor
    if layout is None:
        return model
    if layout.pp > 1:  # stages over mesh["pp"] (+ FSDP2 per stage): a Pipeline, not a module
        from evolm.parallel.pipeline import parallelize_pipeline

        return parallelize_pipeline(model, layout, mesh)
    if layout.ddp_only:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device is not None
                                       and device.type == "cuda" else None)
    return apply_data_parallel(model, layout, mesh)


def apply_data_parallel(model, layout: ParallelLayout, mesh):
    """FSDP2 over the data-parallel ranks: each block, then the root (embeddings, head), sharded
    over ``dp_shard_cp``; with ``dp_replicate > 1`` as HSDP (replicas of sharded groups). With
    neither (a pure tp/pp layout) the model is returned as it is."""
    if layout.dp_shard * layout.cp == 1 and layout.dp_replicate == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    from evolm.parallel.expert import expert_parameters

    dp_mesh = mesh["dp_replicate", "dp_shard_cp"] if layout.dp_replicate > 1 else mesh["dp_shard_cp"]
    ignored = set(expert_parameters(model)) or None  # ep's experts: reduced by their own gradient hook
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, ignored_params=ignored)
    fully_shard(model, mesh=dp_mesh, ignored_params=ignored)
    return model
