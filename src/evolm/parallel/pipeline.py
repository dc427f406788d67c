"""Pipeline parallelism: the blocks split into stages across ranks, micro-batches streamed through.

GPipe (Huang et al. 2019, arXiv:1811.06965) cuts a model into consecutive stages, one per rank,
and feeds each global batch as ``m`` micro-batches so that the ranks work at the same time; every
rank idles for ``(p - 1)`` micro-batch slots at the start and the end of a step, the *bubble*, a
fraction ``(p - 1) / (m + p - 1)`` of the step. 1F1B (PipeDream-Flush, Narayanan et al. 2021,
arXiv:2006.09503) has the same bubble but starts each micro-batch's backward as soon as it can, so
a stage keeps at most ``p`` micro-batches' activations instead of ``m``. Interleaved 1F1B
(Megatron-LM, Narayanan et al. 2021, arXiv:2104.04473) gives each rank ``v`` smaller stages
(rank r holds stages r, r + p, ...), dividing the bubble by ``v`` for ``v`` times the messages;
Looped BFS (Lamy-Poirier 2023, arXiv:2211.05953) runs the same layout breadth first.

The engine is ``torch.distributed.pipelining`` (``PipelineStage`` and its schedules). As in
torchtitan the split is made from outside the model: :func:`stage_modules` takes a plain
``Transformer`` and gives each stage an ``nn.Module`` that *holds the model's own parts* — the
first stage the embeddings, each stage its slice of ``model.layers`` (an ``nn.ModuleDict`` keyed
by the layer's global index), the last the final norm and the LM head — so a stage's
``state_dict()`` keys are exactly the full model's keys for those parts and checkpoints gather by
merging dictionaries (:func:`gather_state_dict`).

Choices, exactly:

- **Balance** (:func:`split_layers`): ``"layers"`` gives each stage ``L / S`` consecutive blocks
  (the remainder to the first stages); ``"params"`` minimises the largest stage's cost, a block's
  cost being its parameter count with routed experts counted at their active share
  (``n_experts_per_tok / n_experts``, i.e. proportional to its matmul FLOPs per token) and the LM
  head's ``vocab x d`` added to the last stage (its matmul runs there; the embedding lookup costs
  nothing). Attention-score FLOPs are not counted. Every stage needs at least one block.
- **Per-layer structure** (Gemma 3's sliding/global layers, DeepSeek's dense-then-MoE layers,
  Mamba hybrids) needs nothing special: each stage plans the masks and RoPE tables of the whole
  config (``plan_masks``, ``rope_tables``) and runs its own layers with their global indices.
- **MoE auxiliary losses**: each MoE layer's balancing / z-loss is read right after its forward.
  On the last stage it is added to that micro-batch's loss. On any other stage it is attached to
  the stage output by :class:`_AttachAux`, an identity whose backward gives the aux loss the
  gradient ``1 / m`` — exactly what ``(loss + aux) / m`` gives it in one process. The logged loss
  adds every stage's aux values in one all-reduce over the pipeline group (the same all-reduce
  that hands the loss from the last stage to every rank). Switch's pooled losses
  (``moe_loss_groups="sequence"``) pool router logits across all layers, so they are refused.
- **Router bias updates** (DeepSeek-V3, :func:`update_router_bias`): each stage updates the
  routers of its own layers from their step counts, summed over the data-parallel group only.
- **Tied embeddings**: handled. The last stage holds its own replica of ``embed_tokens`` (same
  key, same initial value); after the backward the two replicas' gradients are summed over the
  pipeline group (:func:`sync_tied_grads`; ranks without a replica add zeros), so the AdamW
  updates keep them equal, as Megatron-LM's embedding group does.
- **Loss and gradient scale**: the last stage's loss function returns ``loss / m`` with
  ``scale_grads=False``: the arithmetic of gradient accumulation over ``m`` micro-batches
  (``(loss / accum).backward()``), so a pipeline step equals one process accumulating the same
  micro-batches. Gradient clipping uses the global norm over all stages (:func:`clip_grad_norm_`).
- **Static shapes**: the stages get their input/output shapes up front (``PipelineStage``'s static
  mode) from the first batch; a batch of another shape rebuilds them. The dynamic mode would run a
  real forward and backward for shape inference, which counts MoE tokens and would shift DeepSeek's
  router-bias update.

Not supported (refused with a message): encoder-decoders, vision models, task heads other than the
LM head, multi-token prediction in training, KV caches (pipelining is for training here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from evolm.nn.loss import fused_linear_cross_entropy
from evolm.nn.masks import MaskInputs, plan_masks
from evolm.nn.moe import MoE

SCHEDULES = ("auto", "gpipe", "1f1b", "interleaved1f1b", "loopedbfs", "zbv")
_TORCH_NAMES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved1f1b": "Interleaved1F1B", "loopedbfs": "LoopedBFS",
                "zbv": "ZBVZeroBubble"}
BALANCES = ("layers", "params")


# --------------------------------------------------------------------------------------------
# splitting
# --------------------------------------------------------------------------------------------
def check_pipelinable(config) -> None:
    """Refuse the models whose forward does not cut into a chain of stages (naming the field)."""
    c = config
    bad = [(c.encoder_layers, "encoder_layers > 0 (an encoder-decoder: the decoder reads the encoder output at "
                              "every layer)"),
           (c.vision is not None, "vision (image states feed every cross-attention layer)"),
           (c.head != "lm", f"head={c.head!r} (only the LM head's loss is pipelined)"),
           (c.mtp_depth, "mtp_depth > 0 (multi-token prediction needs the embeddings on the last stage)"),
           (c.n_experts and c.moe_loss_groups == "sequence",
            "moe_loss_groups='sequence' (Switch's pooled router losses span all stages)"),
           (c.pos_emb == "relative", "pos_emb='relative' (T5's bias table is shared by all layers)"),
           (c.positions_from_mask, "positions_from_mask (positions come from an attention mask)"),
           (c.mask == "prefix", "mask='prefix' (the prefix length is not carried between stages)")]
    for flag, why in bad:
        if flag:
            raise ValueError(f"pipeline parallelism cannot split this model: {why}")


def layer_costs(config, balance: str = "params") -> list[float]:
    """Each block's cost for balancing: 1 (``"layers"``) or its FLOP-proportional parameter count."""
    if balance not in BALANCES:
        raise ValueError(f"balance={balance!r}; expected one of {BALANCES}")
    if balance == "layers":
        return [1.0] * config.n_layers
    from evolm.nn.block import Block

    active = config.n_experts_per_tok / config.n_experts if config.n_experts else 1.0
    costs = []
    with torch.device("meta"):
        for i in range(config.n_layers):
            block = Block(config, i)
            n = 0.0
            for name, p in block.named_parameters():
                routed = ".experts." in f".{name}"
                n += p.numel() * (active if routed else 1.0)
            costs.append(n)
    return costs


def split_layers(config, n_stages: int, balance: str = "params") -> list[range]:
    """Consecutive layer ranges, one per stage, minimising the costliest stage (see module doc)."""
    L = config.n_layers
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    if n_stages > L:
        raise ValueError(f"{n_stages} pipeline stages need at least {n_stages} layers; the model has n_layers={L}")
    if balance == "layers":
        layer_costs(config, balance)  # validates the name
        q, r = divmod(L, n_stages)
        sizes = [q + (1 if s < r else 0) for s in range(n_stages)]
        bounds = [0]
        for n in sizes:
            bounds.append(bounds[-1] + n)
        return [range(bounds[s], bounds[s + 1]) for s in range(n_stages)]
    costs = layer_costs(config, balance)
    head = float(config.vocab_size * config.d_model)
    return _min_max_partition(costs, n_stages, last_extra=head)


def _min_max_partition(costs: list[float], n: int, last_extra: float = 0.0) -> list[range]:
    """Split ``costs`` into ``n`` non-empty consecutive parts minimising the largest part's sum
    (``last_extra`` added to the last part); dynamic programming over (layers, parts)."""
    L = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest max-cost of splitting the first i layers into k parts; cut[k][i]: last cut
    best = [[inf] * (L + 1) for _ in range(n + 1)]
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        for i in range(k, L + 1):
            extra = last_extra if (k == n and i == L) else 0.0
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j] + extra)
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    bounds = [L]
    for k in range(n, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    bounds.reverse()
    return [range(bounds[s], bounds[s + 1]) for s in range(n)]


def stage_ranks(n_stages: int, pp: int, style: str = "loop") -> list[int]:
    """The pipeline rank of each stage, as torch's multi-stage schedules place them: ``loop``
    (stage s on rank s % pp) or ``v`` (ZB-V: rank r holds stages r and 2p - 1 - r)."""
    from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

    if n_stages % pp:
        raise ValueError(f"{n_stages} stages cannot be shared evenly by {pp} pipeline ranks")
    mapping = generate_stage_to_rank_mapping(pp, n_stages, style=style)
    return [mapping[s] for s in range(n_stages)]


class _AttachAux(torch.autograd.Function):
    """Identity on the stage output whose backward also gives ``aux`` the gradient ``scale``:
    a non-last stage's MoE auxiliary loss enters the backward as if it had been added to the loss
    (Megatron-LM's ``MoEAuxLossAutoScaler`` does the same)."""

    @staticmethod
    def forward(ctx, x, aux, scale: float):
        ctx.scale, ctx.aux_meta = scale, (aux.shape, aux.dtype, aux.device)
        return x.clone()  # not a view of x: FSDP2's pre-backward hook on a stage output must not sit on a view

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class StageModule(nn.Module):
    """One pipeline stage of a ``Transformer``: the model's own parts for layers ``layer_ids``
    (plus the embeddings on the first stage, final norm and head on the last), under the model's
    attribute names, so ``state_dict()`` keys are the full model's."""

    def __init__(self, model, layer_ids: range, index: int, n_stages: int, n_microbatches: int):
        super().__init__()
        check_pipelinable(model.config)
        self.config = model.config
        self.index, self.n_stages, self.layer_ids = index, n_stages, layer_ids
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        self.aux_scale = 1.0 / n_microbatches
        self._model = (model,)  # not registered: embed(), rope_tables() and output() are the model's methods
        if self.is_first or (self.is_last and model.lm_head is None):  # a tied head reads the embedding
            self.embed_tokens = model.embed_tokens
        if self.is_first:
            for name in ("pos_embed", "type_embed", "embed_norm"):
                if getattr(model, name) is not None:
                    setattr(self, name, getattr(model, name))
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        if self.is_last:
            for name in ("norm", "lm_head", "head"):
                if getattr(model, name) is not None:
                    setattr(self, name, getattr(model, name))
        for name in ("rotary", "rotary_local"):  # RoPE tables (buffers, no keys): move with the stage
            if getattr(model, name, None) is not None:
                setattr(self, name, getattr(model, name))
        self.aux_values: list[torch.Tensor] = []  # this step's aux losses of a non-last stage (detached)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (first stage) or hidden states (B, T, d) -> hidden states, or on the last
        stage the micro-batch's mean loss (cross-entropy fused with the head, plus MoE aux)."""
        model, c = self._model[0], self.config
        B, T = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device).expand(B, T)
        if self.is_first:
            x = model.embed(x, position_ids)
        ropes = model.rope_tables(position_ids, x.dtype)
        masks = plan_masks(c, None, MaskInputs(0, T, None, doc_ids, c.mask), x.device)
        aux = None
        for key, layer in self.layers.items():
            i = int(key)
            x = layer(x, ropes[i], masks[i][0], masks[i][1])
            if isinstance(layer.mlp, MoE) and layer.mlp.aux_loss is not None:
                aux = layer.mlp.aux_loss if aux is None else aux + layer.mlp.aux_loss
        if not self.is_last:
            if aux is None:
                return x
            self.aux_values.append(aux.detach())
            return _AttachAux.apply(x, aux, self.aux_scale) if torch.is_grad_enabled() else x
        if targets is None:
            raise ValueError("the last pipeline stage needs targets (it returns the loss)")
        h = model.output(x, return_hidden=True)
        w, b = model.head_weight_bias()
        loss = fused_linear_cross_entropy(h, w, targets, b, c.final_softcap, compiled=model.compiled_loss)
        return loss + aux if aux is not None else loss


def stage_modules(model, n_stages: int, n_microbatches: int, balance: str = "params") -> list[StageModule]:
    """All ``n_stages`` stage modules of ``model`` (they share the model's parts)."""
    check_pipelinable(model.config)
    split = split_layers(model.config, n_stages, balance)
    return [StageModule(model, ids, s, n_stages, n_microbatches) for s, ids in enumerate(split)]


def release_unowned(model, mine: list[StageModule]) -> None:
    """Move every part of ``model`` that none of this rank's stages holds to the meta device, so
    its memory is freed and a stale copy can never be saved or trained by mistake."""
    kept = {id(p) for m in mine for p in m.parameters()}
    for module in model.children():
        if module is None or not any(True for _ in module.parameters()):
            continue
        if isinstance(module, nn.ModuleList):
            for sub in module:
                if not any(id(p) in kept for p in sub.parameters()):
                    sub.to("meta")
        elif not any(id(p) in kept for p in module.parameters()):
            module.to("meta")


# --------------------------------------------------------------------------------------------
# the pipeline of one rank
# --------------------------------------------------------------------------------------------
def _own_loss(output: torch.Tensor, target: torch.Tensor, n_microbatches: int) -> torch.Tensor:
    """The schedule's loss function: the last stage already returns its micro-batch's loss;
    divided by ``m`` as gradient accumulation divides it."""
    return output / n_microbatches


@dataclass
class Pipeline:
    """This rank's stages of a pipelined model and the schedules that run them.

    ``modules``: this rank's :class:`StageModule` s; ``module``: them in one ``nn.ModuleList``
    (for the optimizer and ``parameters()``); ``schedule``: the ``torch.distributed.pipelining``
    schedule object of the last training step (one is built per batch shape and micro-batch
    count, and kept). ``schedule_name`` ``"auto"``: 1F1B, or GPipe when a step has fewer
    micro-batches than stages (1F1B's requirement)."""

    modules: list[StageModule]
    group: dist.ProcessGroup
    schedule_name: str
    n_microbatches: int
    device: torch.device
    n_stages: int
    schedule: object = None
    module: nn.ModuleList = field(init=False)
    _schedules: dict = field(default_factory=dict)

    def __post_init__(self):
        self.module = nn.ModuleList(self.modules)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def has_first(self) -> bool:
        return any(m.is_first for m in self.modules)

    @property
    def has_last(self) -> bool:
        return any(m.is_last for m in self.modules)

    @property
    def training(self) -> bool:
        return self.module.training

    def parameters(self):
        return self.module.parameters()

    def train(self, mode: bool = True) -> "Pipeline":
        self.module.train(mode)
        return self

    def eval(self) -> "Pipeline":
        return self.train(False)

    def _schedule_for(self, batch: int, seq: int, m: int, name: str):
        """The schedule for ``m`` micro-batches of a (batch, seq) batch: ``PipelineStage`` s in
        static mode (shapes given: no shape-inference forward) and the schedule over them."""
        key = (batch, seq, m, name)
        if key in self._schedules:
            return self._schedules[key]
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.microbatch import _CustomReducer
        from torch.distributed.pipelining.schedules import get_schedule_class

        if batch % m:
            raise ValueError(f"a batch of {batch} rows cannot be cut into {m} equal micro-batches")
        if name == "1f1b" and m < self.n_stages:
            raise ValueError(f"1F1B needs at least as many micro-batches as stages ({self.n_stages}), got {m}")
        mb, d = batch // m, self.modules[0].config.d_model
        dtype = next(self.module.parameters()).dtype
        hidden = torch.empty(mb, seq, d, dtype=dtype, device="meta", requires_grad=True)  # activations carry grads
        stages = []
        for mod in self.modules:
            inp = torch.empty(mb, seq, dtype=torch.long, device="meta") if mod.is_first else hidden
            out = torch.empty((), dtype=dtype, device="meta", requires_grad=True) if mod.is_last else hidden
            stages.append(PipelineStage(mod, mod.index, self.n_stages, self.device, input_args=(inp,),
                                        output_args=(out,), group=self.group))
        cls = get_schedule_class(_TORCH_NAMES[name])
        loss_fn = lambda out, tgt: _own_loss(out, tgt, m)  # noqa: E731
        # the last stage's outputs are scalar losses: summed, not concatenated, if a schedule merges them (eval)
        summed = _CustomReducer(torch.zeros((), dtype=torch.float64), lambda a, b: a + b.detach().double().cpu())
        sched = cls(stages[0] if len(stages) == 1 else stages, n_microbatches=m, loss_fn=loss_fn,
                    output_merge_spec=summed, scale_grads=False)
        self._schedules[key] = sched
        return sched

    def _inputs(self, input_ids, targets, position_ids, doc_ids) -> tuple[tuple, dict]:
        kwargs = {k: v.to(self.device) for k, v in (("position_ids", position_ids), ("doc_ids", doc_ids))
                  if v is not None}
        if self.has_last:
            kwargs["targets"] = targets.to(self.device)
        return ((input_ids.to(self.device),) if self.has_first else ()), kwargs

    def step(self, input_ids: torch.Tensor, targets: torch.Tensor, position_ids: torch.Tensor | None = None,
             doc_ids: torch.Tensor | None = None, n_microbatches: int | None = None) -> float:
        """Forward and backward of one global batch (B, T) as ``n_microbatches`` micro-batches
        (default: the pipeline's): gradients accumulate in the stage parameters (tied replicas
        summed); returns the mean loss (with every stage's MoE aux) on every rank of the pipeline
        group. Every rank passes the same batch (only the first stage reads the tokens, only the
        last the targets)."""
        m = n_microbatches or self.n_microbatches
        name = self.schedule_name
        if name == "auto":
            name = "1f1b" if m >= self.n_stages else "gpipe"
        self.schedule = self._schedule_for(*input_ids.shape, m, name)
        for mod in self.modules:
            mod.aux_values.clear()
            mod.aux_scale = 1.0 / m
        args, kwargs = self._inputs(input_ids, targets, position_ids, doc_ids)
        losses: list[torch.Tensor] = []
        self.schedule.step(*args, target=kwargs.get("targets"), losses=losses, return_outputs=False, **kwargs)
        sync_tied_grads(self)
        return self._reduce_loss(losses, m)

    @torch.no_grad()
    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, position_ids: torch.Tensor | None = None,
             doc_ids: torch.Tensor | None = None) -> float:
        """The mean loss of a batch, forward only (evaluation: one micro-batch through GPipe, or
        Looped BFS when ranks hold several looped stages), on every rank of the pipeline group."""
        if self.schedule_name == "zbv":
            raise ValueError("Pipeline.loss (forward only) is not available for V-placed stages (zbv); "
                             "evaluate a gathered checkpoint, or train with a looped schedule")
        sched = self._schedule_for(*input_ids.shape, 1, "gpipe" if len(self.modules) == 1 else "loopedbfs")
        for mod in self.modules:
            mod.aux_values.clear()
        args, kwargs = self._inputs(input_ids, targets, position_ids, doc_ids)
        losses: list[torch.Tensor] = []
        sched.eval(*args, target=kwargs.get("targets"), losses=losses, **kwargs)
        return self._reduce_loss(losses, 1)

    def _reduce_loss(self, losses: list[torch.Tensor], m: int) -> float:
        """Sum of the last stage's micro-batch losses and every other stage's aux values over the
        pipeline group: the step's mean loss, on every rank (the log line needs it on rank 0)."""
        total = sum(float(v.detach()) for v in losses)
        total += sum(float(v) for mod in self.modules for v in mod.aux_values) / m
        t = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return float(t.item())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's parameters under the full model's keys (a tied replica appears once)."""
        out: dict[str, torch.Tensor] = {}
        for mod in self.modules:
            out.update(mod.state_dict())
        return out


def _tied(pipe: Pipeline) -> bool:
    return pipe.modules[0].config.tie_embeddings and pipe.n_stages > 1


def sync_tied_grads(pipe: Pipeline) -> None:
    """Sum the gradients of the tied embedding's replicas (first and last stage) over the pipeline
    group; ranks holding neither contribute zeros. One all-reduce of ``vocab x d`` (of this rank's
    shard when FSDP shards the stages: the replicas' peers share one data-parallel coordinate)."""
    if not _tied(pipe):
        return
    weights = {id(m.embed_tokens.weight): m.embed_tokens.weight for m in pipe.modules if hasattr(m, "embed_tokens")}
    if len(weights) > 1:
        raise AssertionError("one rank holds two different embedding replicas")
    w = next(iter(weights.values()), None)
    if w is not None:
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        buf = w.grad.to_local() if hasattr(w.grad, "to_local") else w.grad
    else:
        buf = torch.zeros(_embedding_shard_rows(pipe), pipe.modules[0].config.d_model,
                          dtype=next(pipe.parameters()).dtype, device=pipe.device)
    dist.all_reduce(buf, group=pipe.group)


def _embedding_shard_rows(pipe: Pipeline) -> int:
    """Rows of the embedding this rank's replica peers hold: all of them, or under FSDP2 (dim-0
    ``torch.chunk`` shards over the data-parallel mesh) this coordinate's chunk."""
    V = pipe.modules[0].config.vocab_size
    sharded = next((p for p in pipe.parameters() if hasattr(p, "device_mesh")), None)
    if sharded is None:
        return V
    mesh = sharded.device_mesh
    chunks = torch.arange(V).chunk(mesh.size())
    r = mesh.get_local_rank()
    return chunks[r].numel() if r < len(chunks) else 0


def _grads_counted_once(pipe: Pipeline) -> list[torch.Tensor]:
    """The gradients of this rank's parameters, leaving out the last stage's tied replica when the
    first stage lives on another rank (its gradient equals the first stage's after the sync)."""
    skip = set()
    if _tied(pipe) and pipe.has_last and not pipe.has_first:
        skip = {id(m.embed_tokens.weight) for m in pipe.modules if hasattr(m, "embed_tokens")}
    return [p.grad for p in pipe.parameters() if p.grad is not None and id(p) not in skip]


def clip_grad_norm_(pipe: Pipeline, max_norm: float) -> float:
    """Clip every stage's gradients by the global norm over the pipeline (and, for sharded
    DTensor gradients, the data-parallel shards); returns that norm, as
    ``torch.nn.utils.clip_grad_norm_`` does for one process."""
    grads = _grads_counted_once(pipe)
    sq = torch.zeros((), dtype=torch.float64, device=pipe.device)
    for g in grads:
        n = torch.linalg.vector_norm(g)
        if hasattr(n, "full_tensor"):
            n = n.full_tensor()
        sq = sq + n.double() ** 2
    dist.all_reduce(sq, group=pipe.group)
    total = float(sq.sqrt())
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for p in pipe.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    return total


def update_router_bias(pipe: Pipeline, dp_group: dist.ProcessGroup | None = None) -> None:
    """DeepSeek-V3's bias update for this rank's routers, the counts summed over the data-parallel
    group only (the other stages' routers are updated by their own ranks)."""
    moes = [layer.mlp for m in pipe.modules for layer in m.layers.values()
            if isinstance(layer.mlp, MoE) and layer.mlp.gate.e_score_correction_bias is not None]
    if not moes:
        return
    n = moes[0].gate.e_score_correction_bias.shape[0]
    counts = torch.stack([m.step_counts if m.step_counts is not None else
                          torch.zeros(n, dtype=torch.long, device=pipe.device) for m in moes])
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(counts, group=dp_group)
    for m, c in zip(moes, counts):
        m.gate.update_bias(c)
        m.step_counts = None


def gather_state_dict(pipe: Pipeline) -> dict[str, torch.Tensor]:
    """The full model's state dict, on every rank of the pipeline group (each rank's stages
    contribute their keys, FSDP-sharded ones gathered over their data-parallel group first; for
    saving from rank 0). Every rank of the world must call it."""
    mine = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()  # FSDP shards gathered
            for k, v in pipe.state_dict().items()}
    parts: list = [None] * dist.get_world_size(pipe.group)
    dist.all_gather_object(parts, mine, group=pipe.group)
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        out.update(part)
    return out


def step_examples(pipe: Pipeline, examples: list) -> float:
    """The trainer's gradient accumulation under pp: the step's ``accum`` micro-batches
    (``evolm.data.objectives.Example``, one shape) concatenated into the global batch that the
    schedule cuts back into the same micro-batches; packed documents keep their masks and
    positions. Returns the step's mean loss on every rank of the pipeline group."""
    from evolm.train.pretrain import positions_from_segments

    if any(ex.attention_mask is not None or ex.decoder_input_ids is not None for ex in examples):
        raise ValueError("pipeline parallelism takes causal-LM examples (no attention_mask / decoder_input_ids)")
    x = torch.cat([ex.input_ids for ex in examples])
    y = torch.cat([ex.targets for ex in examples])
    seg = torch.cat([ex.segments for ex in examples]) if examples[0].segments is not None else None
    pos = positions_from_segments(seg) if seg is not None else None
    return pipe.step(x, y, position_ids=pos, doc_ids=seg, n_microbatches=len(examples))


def fully_shard_stages(pipe: Pipeline, dp_mesh) -> None:
    """FSDP2 over the data-parallel mesh for each stage: every block, then the stage root
    (embeddings, norm, head). Parameters stay gathered between micro-batches
    (``reshard_after_forward=False``, torchtitan's choice under pp): resharding would gather
    them again for each of the ``m`` micro-batches' forward and backward."""
    from torch.distributed.fsdp import fully_shard

    for mod in pipe.modules:
        for block in mod.layers.values():
            fully_shard(block, mesh=dp_mesh, reshard_after_forward=False)
        fully_shard(mod, mesh=dp_mesh, reshard_after_forward=False)


class PipelineLM:
    """The pipeline as the callable a task's ``forward`` / ``evaluate`` expects: ``lm(input_ids,
    targets=..., doc_ids=..., position_ids=...)`` -> the batch's mean loss (forward only, through
    :meth:`Pipeline.loss`; the same value on every rank of the pipeline group)."""

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe

    def __call__(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                 doc_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                 **unsupported) -> torch.Tensor:
        if targets is None or any(v is not None for v in unsupported.values()):
            raise ValueError("a pipelined model computes losses only: pass targets (no attention_mask, "
                             "decoder_input_ids, logits; sample from the gathered checkpoint)")
        return torch.tensor(self.pipe.loss(input_ids, targets, position_ids, doc_ids), dtype=torch.float64)


def _local_names(pipe: Pipeline) -> dict[str, str]:
    """``pipe.module``'s parameter names ("<stage>.layers.3...") -> the full model's ("layers.3...")."""
    return {f"{i}.{n}": n for i, mod in enumerate(pipe.modules) for n, _ in mod.named_parameters()}


def full_state_dicts(pipe: Pipeline, optimizer) -> tuple[dict, dict]:
    """The full model state dict and the full AdamW state keyed by the model's parameter names
    (the format FSDP runs save, ``torch.distributed.checkpoint.state_dict``'s full state), merged
    over the pipeline group, on every rank: for the trainer's checkpoints. Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model_sd = gather_state_dict(pipe)
    osd = get_optimizer_state_dict(pipe.module, optimizer, options=StateDictOptions(full_state_dict=True))
    names = _local_names(pipe)
    mine = {"state": {names[k]: {n: (v.detach().cpu() if torch.is_tensor(v) else v) for n, v in st.items()}
                      for k, st in osd["state"].items()},
            "param_groups": [{**g, "params": [names[k] for k in g["params"]]} for g in osd["param_groups"]]}
    parts: list = [None] * dist.get_world_size(pipe.group)
    dist.all_gather_object(parts, mine, group=pipe.group)
    state: dict = {}
    groups = [dict(g, params=[]) for g in parts[0]["param_groups"]]
    for part in parts:
        state.update(part["state"])  # a tied replica's moments equal the first stage's
        for g, pg in zip(groups, part["param_groups"]):
            g["params"] += [k for k in pg["params"] if k not in g["params"]]
    return model_sd, {"state": state, "param_groups": groups}


def load_optimizer_state(pipe: Pipeline, optimizer, osd: dict) -> None:
    """Load a full optimizer state (:func:`full_state_dicts`, or an FSDP run's) into this rank's
    stages: the entries of its own parameters, under ``pipe.module``'s names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _local_names(pipe)
    missing = [full for full in names.values() if full not in osd["state"]]
    if missing:
        raise ValueError(f"the checkpoint's optimizer state has no entry for {missing[:3]} "
                         f"({len(missing)} parameters of this rank's stages)")
    local = {"state": {k: osd["state"][full] for k, full in names.items()},
             "param_groups": [{**g, "params": [k for k, full in names.items() if full in set(g["params"])]}
                              for g in osd["param_groups"]]}
    set_optimizer_state_dict(pipe.module, optimizer, local, options=StateDictOptions(full_state_dict=True))


def parallelize_pipeline(model, layout, mesh) -> Pipeline:
    """The dispatcher's pipeline step (``evolm.parallel.parallelize`` with ``pp > 1``): stages over
    ``mesh["pp"]`` (schedule ``auto``: 1F1B, GPipe for steps with fewer micro-batches than
    stages; micro-batches = the step's accumulation count), then FSDP2 per stage over the
    data-parallel ranks when there are any. tp / cp / ep with pp are not supported yet."""
    others = [f"{n}={getattr(layout, n)}" for n in ("tp", "cp", "ep") if getattr(layout, n) > 1]
    if others:
        raise ValueError(f"parallel.pp={layout.pp} with {', '.join(others)} is not supported yet "
                         "(pipeline stages compose with dp_shard / dp_replicate only)")
    pipe = pipeline(model, mesh["pp"], "auto", n_microbatches=1)
    if layout.dp_shard > 1 or layout.dp_replicate > 1:
        fully_shard_stages(pipe, mesh["dp_replicate", "dp_shard_cp"] if layout.dp_replicate > 1
                           else mesh["dp_shard_cp"])
    return pipe


# --------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------
def pipeline(model, pp_mesh, schedule: str = "1f1b", n_microbatches: int = 1, stages_per_rank: int = 1,
             balance: str = "params", release: bool = True) -> Pipeline:
    """Split ``model`` over the 1-D mesh ``pp_mesh`` (or a process group) and build ``schedule``.

    ``schedule``: ``gpipe`` or ``1f1b`` (one stage per rank; ``auto``: 1F1B, GPipe for a step with
    fewer micro-batches than stages), ``interleaved1f1b`` or ``loopedbfs`` (``stages_per_rank >= 2``,
    looped placement), ``zbv`` (ZB-V zero bubble, Qi et al. 2024, arXiv:2401.10241: two stages per
    rank in a V, rank r holding stages r and 2p - 1 - r, backward split into input and weight
    gradients that fill the bubble). ``n_microbatches``: micro-batches per step (the recipe's
    gradient-accumulation count; 1F1B needs at least as many as stages). ``release``: move the
    parts of ``model`` this rank does not run to the meta device. The caller builds the optimizer
    over ``Pipeline.module`` and calls :meth:`Pipeline.step`, :func:`clip_grad_norm_`,
    ``optimizer.step()`` and :func:`update_router_bias`."""
    name = schedule.lower().replace("_", "").replace("-", "")
    if name not in SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r}; expected one of {SCHEDULES}")
    single = name in ("auto", "gpipe", "1f1b")
    if single and stages_per_rank != 1:
        raise ValueError(f"schedule {schedule!r} runs one stage per rank; use interleaved1f1b or loopedbfs "
                         f"for stages_per_rank={stages_per_rank}")
    if not single and stages_per_rank < 2:
        raise ValueError(f"schedule {schedule!r} needs stages_per_rank >= 2")
    group = pp_mesh.get_group() if hasattr(pp_mesh, "get_group") else pp_mesh
    pp, rank = dist.get_world_size(group), dist.get_rank(group)
    n_stages = pp * stages_per_rank
    if name == "1f1b" and n_microbatches < n_stages:
        raise ValueError(f"1F1B needs n_microbatches >= stages ({n_stages}), got {n_microbatches}")
    every = stage_modules(model, n_stages, n_microbatches, balance)
    owner = stage_ranks(n_stages, pp, "v" if name == "zbv" else "loop")
    mine = [m for m, r in zip(every, owner) if r == rank]
    if release:
        release_unowned(model, mine)
    device = model.rotary.inv_freq.device if getattr(model, "rotary", None) is not None else \
        next(p for m in mine for p in m.parameters()).device
    return Pipeline(mine, group, name, n_microbatches, device, n_stages)
