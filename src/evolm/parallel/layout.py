"""The parallel layout of a run: how many ways each parallelism splits the world, and its DeviceMesh.

A recipe's ``parallel:`` section (or ``evolm pretrain --dp-shard/--dp-replicate/--tp/--pp/--cp/--ep``)
is a :class:`ParallelLayout`. Its degrees multiply to the number of processes torchrun starts
(``WORLD_SIZE``); one of them may be ``-1``, "the rest of the world" (``dp_shard`` by default, so
an empty section on 8 processes is FSDP over 8). :meth:`ParallelLayout.resolve` checks the
product and says which field is wrong and what product was expected.

One ``DeviceMesh`` (torch.distributed.device_mesh) holds every dimension, outermost first, as
torchtitan orders them: ``pp, dp_replicate, dp_shard, cp, tp``. Tensor parallelism is innermost
because it talks at every layer (the fastest links: the GPUs of one node); pipeline stages are
outermost because they exchange one activation per micro-batch. Flattened sub-meshes name the
groups the trainer reduces over:

- ``dp`` = dp_replicate x dp_shard: the data-parallel ranks, each reading its own part of the
  global batch; loss and token counts are averaged / summed over this group;
- ``dp_shard_cp`` = dp_shard x cp: the ranks FSDP2 shards parameters over (context-parallel
  ranks hold the same parameters, so they shard them too, as torchtitan does);
- ``dp_cp`` = dp_replicate x dp_shard x cp: the ranks whose gradients are averaged.

Ranks of one tp, cp or pp group see the same batch (cp ranks then take their own part of its
sequence).

Expert parallelism adds no ranks: it **borrows** them from data parallelism (torchtitan's rule).
``ep`` must be a multiple of ``cp`` and divide ``dp_shard x cp``; the mesh then splits ``dp_shard``
into ``dp_shard_mod_ep x dp_shard_in_ep`` (``dp_shard_in_ep = ep / cp``) and names the flattened
``ep`` = dp_shard_in_ep x cp (the ranks that exchange tokens by all-to-all, each holding
``n_experts / ep`` experts) and ``dp_shard`` = dp_shard_mod_ep x dp_shard_in_ep (unchanged for
the other parts). Dense weights are sharded by FSDP over ``dp_shard_cp`` as without ep.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from evolm.inputs import did_you_mean

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # outermost first
FIELDS = ("dp_shard", "dp_replicate", "tp", "pp", "cp", "ep")


class LayoutError(ValueError):
    """A parallel layout that cannot be built on this world; the message names the field."""


@dataclass
class ParallelLayout:
    """Degrees of each parallelism (``-1``: the rest of the world; at most one field)."""

    dp_shard: int = -1  # FSDP2: parameters, gradients and optimizer state sharded
    dp_replicate: int = 1  # replicas (DDP; with dp_shard > 1: HSDP, replicas of sharded groups)
    tp: int = 1  # tensor parallel (Megatron-style, DTensor; parallel/tensor.py)
    pp: int = 1  # pipeline stages (parallel/pipeline.py)
    cp: int = 1  # context parallel: ring attention over the sequence (parallel/ring.py)
    ep: int = 1  # expert parallel: borrows data-parallel ranks (see the module docstring)

    def __post_init__(self):
        for name in FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
                raise LayoutError(f"parallel.{name} must be a positive integer or -1 (the rest of the world), "
                                  f"got {v!r}")
        rest = [n for n in FIELDS if getattr(self, n) == -1]
        if len(rest) > 1:
            raise LayoutError(f"parallel: only one field may be -1 (the rest of the world), got {', '.join(rest)}")
        if self.ep == -1:
            raise LayoutError("parallel.ep cannot be -1: expert parallelism borrows data-parallel ranks, "
                              "give its degree")

    # --- resolution ----------------------------------------------------------------------
    def resolve(self, world: int) -> "ParallelLayout":
        """A copy with ``-1`` replaced so the degrees (all but ep) multiply to ``world``; raises
        :class:`LayoutError` naming the field when they cannot."""
        dims = {n: getattr(self, n) for n in DIMS}
        fixed = 1
        for n, v in dims.items():
            if v != -1:
                fixed *= v
        rest = [n for n, v in dims.items() if v == -1]
        what = " x ".join(f"{n} {v}" for n, v in dims.items() if v != 1 and v != -1) or "all 1"
        if rest:
            if world % fixed:
                raise LayoutError(f"parallel: {what} (product {fixed}) does not divide the world size {world}; "
                                  f"parallel.{rest[0]}=-1 takes the rest, so the others must divide it")
            dims[rest[0]] = world // fixed
        elif fixed != world:
            raise LayoutError(f"parallel: {what} multiply to {fixed}, but {world} processes were started "
                              f"(WORLD_SIZE); the degrees pp x dp_replicate x dp_shard x cp x tp must equal it "
                              f"(set one of them to -1 to take the rest)")
        out = dataclasses.replace(self, **dims)
        out._check_ep()
        return out

    def _check_ep(self) -> None:
        ep, cp, shard = self.ep, self.cp, self.dp_shard
        if ep == 1:
            return
        if ep % cp:
            raise LayoutError(f"parallel.ep={ep} must be a multiple of parallel.cp={cp} (expert-parallel ranks "
                              "are borrowed from dp_shard x cp)")
        if (shard * cp) % ep:
            raise LayoutError(f"parallel.ep={ep} must divide dp_shard x cp = {shard} x {cp} = {shard * cp} "
                              "(expert-parallel ranks are borrowed from the data-parallel shard ranks)")

    @property
    def world(self) -> int:
        """Processes this (resolved) layout needs."""
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many parts the global batch is cut into."""
        return self.dp_replicate * self.dp_shard

    @property
    def sharded(self) -> bool:
        """Whether parameters become DTensors (FSDP2 or TP): full state dicts need gathering."""
        return self.dp_shard * self.cp > 1 or self.tp > 1 or self.pp > 1 or self.ep > 1

    @property
    def ddp_only(self) -> bool:
        """Plain data parallelism with whole replicas (DDP)."""
        return self.dp_shard == self.tp == self.pp == self.cp == self.ep == 1

    def describe(self) -> str:
        parts = [f"{n} {getattr(self, n)}" for n in FIELDS if getattr(self, n) != 1]
        return " x ".join(parts) if parts else "one process"

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    # --- mesh ----------------------------------------------------------------------------
    def build_mesh(self, device_type: str = "cpu"):
        """The run's DeviceMesh (dims ``pp, dp_replicate, dp_shard, cp, tp``; size-1 dims kept, so
        ``mesh["tp"]`` always exists) with the flattened ``dp``, ``dp_shard_cp``, ``dp_cp`` and,
        with ep > 1, ``ep`` sub-meshes. Needs a started process group of ``self.world`` ranks."""
        from torch.distributed.device_mesh import init_device_mesh

        if self.ep == 1:
            names, shape = DIMS, tuple(getattr(self, n) for n in DIMS)
            mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
            shard = ("dp_shard",)
        else:
            in_ep = self.ep // self.cp
            mod_ep = self.dp_shard * self.cp // self.ep
            names = ("pp", "dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep", "cp", "tp")
            shape = (self.pp, self.dp_replicate, mod_ep, in_ep, self.cp, self.tp)
            mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
            shard = ("dp_shard_mod_ep", "dp_shard_in_ep")
            mesh[shard]._flatten("dp_shard")
            mesh["dp_shard_in_ep", "cp"]._flatten("ep")
        mesh[("dp_replicate", *shard)]._flatten("dp")
        mesh[(*shard, "cp")]._flatten("dp_shard_cp")
        mesh[("dp_replicate", *shard, "cp")]._flatten("dp_cp")
        return mesh


def layout_from_dict(d, where: str = "parallel") -> ParallelLayout:
    """A ``parallel:`` mapping -> :class:`ParallelLayout`, unknown keys named with the closest valid one."""

    if d is None:
        return ParallelLayout()
    if not isinstance(d, dict):
        raise LayoutError(f"{where}: expected a mapping of {', '.join(FIELDS)}, got {type(d).__name__}")
    for k in d:
        if k not in FIELDS:
            raise LayoutError(f"{where}: unknown key '{k}'{did_you_mean(k, FIELDS)} (valid: {', '.join(FIELDS)})")
    try:
        return ParallelLayout(**d)
    except LayoutError as e:
        raise LayoutError(f"{where}: {e}") from None


def check_distributed(distributed: str, parallel: ParallelLayout | None) -> None:
    """The contradictions between ``train.distributed`` and a ``parallel:`` section that show
    without knowing the world size (recipe validation); see :func:`effective_layout`."""
    if distributed not in ("none", "ddp", "fsdp"):
        raise LayoutError(f"train.distributed must be none, ddp or fsdp, got {distributed!r}")
    if parallel is None:
        return
    if distributed == "ddp" and parallel.dp_shard not in (1, -1):
        raise LayoutError(f"train.distributed: ddp keeps whole replicas, but parallel.dp_shard={parallel.dp_shard} "
                          "shards them: use distributed: fsdp (HSDP with dp_replicate > 1), or dp_shard: 1")
    if distributed == "fsdp" and parallel.dp_shard == 1 and parallel.dp_replicate != 1:
        raise LayoutError(f"train.distributed: fsdp, but parallel.dp_shard: 1 with dp_replicate: "
                          f"{parallel.dp_replicate}: that is ddp; set dp_shard > 1 (or -1) or distributed: ddp")


def effective_layout(distributed: str, parallel: ParallelLayout | None, world: int) -> ParallelLayout | None:
    """The resolved layout of a run, from ``train.distributed`` and the ``parallel:`` section.

    - no ``parallel:`` section: ``distributed`` decides as before: ``none`` is one process (under
      torchrun each process trains alone), ``ddp`` is ``dp_replicate = world``, ``fsdp`` is
      ``dp_shard = world``;
    - a ``parallel:`` section decides the layout; ``distributed`` may be left at ``none``, or name
      how the data-parallel ranks hold the model, and must then agree: ``ddp`` moves the rest of the
      world to ``dp_replicate`` (and refuses ``dp_shard > 1``); ``fsdp`` refuses ``dp_shard: 1``
      with ``dp_replicate > 1`` (that is ddp).

    None: a single process, no process group (also whenever the world is 1 and nothing is split).
    """
    check_distributed(distributed, parallel)
    if parallel is None:
        if distributed == "none" or world == 1:
            return None
        parallel = ParallelLayout(dp_shard=1, dp_replicate=-1) if distributed == "ddp" else ParallelLayout()
    elif distributed == "ddp":
        if parallel.dp_shard == -1:  # the rest of the world goes to the replicas
            parallel = dataclasses.replace(parallel, dp_shard=1,
                                           dp_replicate=-1 if parallel.dp_replicate == 1 else parallel.dp_replicate)
    resolved = parallel.resolve(world)
    if distributed == "fsdp" and resolved.dp_shard == 1 and resolved.dp_replicate > 1:
        raise LayoutError(f"train.distributed: fsdp, but parallel.dp_shard resolves to 1 with dp_replicate="
                          f"{resolved.dp_replicate}: that is ddp; set dp_shard > 1 (or -1) or distributed: ddp")
    if resolved.world == 1:
        return None
    return resolved
