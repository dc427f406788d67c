"""Tensor parallelism with DTensor: each layer's matrices split over the ``tp`` ranks.

Megatron-LM (Shoeybi et al. 2019, arXiv:1909.08053) splits a transformer layer so that its two
matmuls need one collective between them: the first projection of attention (q, k, v) and of the
MLP (gate, up) is split *column-wise* (output features, i.e. whole heads / a slice of the hidden
width per rank: ``Shard(0)`` of the ``(out, in)`` weight), the second (o, down) *row-wise*
(``Shard(1)``), so each rank works on its heads / hidden slice alone and the partial outputs are
summed once. Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models", arXiv:2205.05198) also splits what lies between the layers (norms,
residual stream) along the sequence, turning that sum into a reduce-scatter and the layer's input
into an all-gather: the same bytes as an all-reduce, with 1/tp of the activations per rank.

The pieces, all applied from outside by :func:`apply_tensor_parallel` with
``torch.distributed.tensor.parallel.parallelize_module`` (the model code is unchanged):

- **embedding**: vocabulary-parallel (``RowwiseParallel`` of ``nn.Embedding``: each rank holds
  ``vocab / tp`` rows, looks up its own ids, the partial rows are reduce-scattered to sequence
  shards);
- **norms** between layers: ``SequenceParallel`` (each rank normalises its ``T / tp`` positions;
  the weight is replicated, its gradient summed over the ranks);
- **mixer and channel modules** (attention, MLA, MLP, MoE): :class:`LocalShards`: the input's
  sequence shards are all-gathered; the module then runs its own code on plain local tensors: its
  column-split weights are the rank's shard, its head counts are the local ones (``n_heads / tp``;
  MQA's single K/V head is replicated), so attention kernels, RoPE, masks and caches need no change;
  the partial output is reduce-scattered back to sequence shards. Replicated weights inside
  (QK-norm, MLA's latent down-projections and norms, the MoE router) see the same full input on
  every rank but only their rank's heads / hidden slice downstream, so their gradient is a partial
  sum, declared to DTensor as ``Partial`` and all-reduced;
  a bias after a row-wise split is added once (by tp rank 0), not once per rank;
- **MoE**: every expert's weights split inside the expert (``gate_up_proj`` (E, 2F, D) as
  ``_StridedShard`` so that each rank holds the matching gate and up rows, ``down_proj`` (E, D, F)
  row-wise), the router replicated: each rank routes all tokens the same way; shared experts split
  as an MLP;
- **loss**: vocabulary-parallel cross-entropy (:func:`vocab_parallel_loss`): the head's logits
  stay split over the vocabulary (``Shard(-1)``), the softmax's max and sum and the target's logit
  are reduced over the ranks, so no rank holds a full ``tokens x vocab`` row; exact (the same
  float32 arithmetic as one process, summed in another order).

Requirements (checked by :func:`check_tensor_parallel`, with the field to change): heads and K/V heads
(or MQA's one) divide by tp, as do the MLP / expert widths and the vocabulary; the sequence length of
each batch too (sequence parallelism). Not supported: OLMo 2's whole-projection QK-norm (a norm
across the split heads), state-space mixers, encoders, vision towers, learned positions,
multi-token prediction.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel,
                                               parallelize_module)
from torch.distributed.tensor.placement_types import _StridedShard


class TensorParallelError(ValueError):
    """A model that cannot be split this way; the message names the config field and tp."""


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------
def check_tensor_parallel(config, tp: int) -> None:
    """Refuse what tensor parallelism of degree ``tp`` cannot split, naming the field."""
    c = config

    def need(ok: bool, field: str, why: str) -> None:
        if not ok:
            raise TensorParallelError(f"tensor parallel tp={tp}: ModelConfig.{field} {why}")

    need(c.encoder_layers == 0, "encoder_layers", "> 0: encoder-decoder models are not split (decoder-only)")
    need(c.vision is None, "vision", "is set: vision models are not split")
    need(c.pos_emb != "learned" and c.pos_emb != "relative", "pos_emb",
         f"= {c.pos_emb!r}: only rotary or no positions (learned tables are not split)")
    need(not c.type_vocab_size and not c.embed_norm, "type_vocab_size / embed_norm", "must be unset (BERT-style)")
    need(c.head == "lm" and not c.head_transform, "head", "must be the plain LM head")
    need(c.mtp_depth == 0, "mtp_depth", "> 0: multi-token prediction is not split")
    need(c.vocab_size % tp == 0, "vocab_size", f"= {c.vocab_size} must divide by tp (vocabulary-parallel "
         f"embedding and loss); pad it, e.g. to {-(-c.vocab_size // tp) * tp}")
    for i in range(c.n_layers):
        mixer = c.layer_mixer(i)
        need(mixer in ("mha", "mla"), "attention", f"= {mixer!r} (layer {i}): only attention and MLA split")
        if c.layer_is_cross(i):
            need(False, "vision", "cross-attention layers are not split")
        need(c.n_heads % tp == 0, "n_heads", f"= {c.n_heads} must divide by tp (each rank keeps whole heads)")
        if mixer == "mha":
            need(c.n_kv_heads % tp == 0 or c.n_kv_heads == 1, "n_kv_heads",
                 f"= {c.n_kv_heads} must divide by tp, or be 1 (MQA: the one K/V head is replicated)")
            need(c.layer_qk_norm(i) != "full", "qk_norm",
                 "= 'full' (OLMo 2: one norm over all heads) needs the split heads' statistics: not supported")
        if c.layer_is_moe(i):
            need(c.moe_d_ff % tp == 0, "moe_d_ff", f"= {c.moe_d_ff} must divide by tp (split inside each expert)")
        elif c.mlp != "none":
            need(c.d_ff % tp == 0, "d_ff", f"= {c.d_ff} must divide by tp")


# --------------------------------------------------------------------------------------------
# the local region of a mixer / channel module
# --------------------------------------------------------------------------------------------
def _enter(x: torch.Tensor, mesh) -> torch.Tensor:
    """Sequence shards -> the whole sequence on every rank (all-gather); the gradient flowing back
    is a partial sum (each rank's heads / hidden slice), reduce-scattered to the shards."""
    whole = DTensor.from_local(x, mesh, [Shard(1)], run_check=False).redistribute(mesh, [Replicate()])
    return whole.to_local(grad_placements=[Partial()])


def _leave(y: torch.Tensor, mesh) -> torch.Tensor:
    """A partial output (the sum over ranks is the layer's) -> sequence shards (reduce-scatter)."""
    return DTensor.from_local(y, mesh, [Partial()], run_check=False).redistribute(mesh, [Shard(1)]).to_local()


def _as_replicated(t: torch.Tensor | None, mesh) -> torch.Tensor | None:
    """A value computed alike on every rank inside the region, whose gradients there are partial,
    made an ordinary replicated value (an MoE layer's auxiliary loss): the gradient it receives
    from outside is split evenly over the ranks, so their sum counts it once."""
    if t is None:
        return None
    return DTensor.from_local(t, mesh, [Replicate()], run_check=False, grad_placements=[Partial()]).to_local()


def _local_view(p: DTensor, mesh, once: bool) -> torch.Tensor:
    """The rank's part of a parameter as a plain tensor for the module's own code. A split weight
    gives its shard (gradient: that shard). A replicated one gives the whole weight; its gradient
    there is partial (the rank's heads / slice only), all-reduced on the way back to the parameter.
    ``once``: a bias added after a row-wise split: tp rank 0 adds it, the others add zeros."""
    if not p.placements[0].is_replicate():
        return p.to_local()
    whole = DTensor.from_local(p.to_local(), mesh, [Replicate()], run_check=False)
    local = whole.to_local(grad_placements=[Partial()])
    return local if not once or mesh.get_local_rank() == 0 else local * 0


@contextlib.contextmanager
def _swapped(module: nn.Module, tensors: dict[str, torch.Tensor]):
    """``module``'s parameters replaced by ``tensors`` (dotted names) for the duration, as
    ``torch.func.functional_call`` does; the registered DTensor parameters come back after."""
    saved = []
    try:
        for name, t in tensors.items():
            owner, _, leaf = name.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            saved.append((sub, leaf, sub._parameters[leaf]))
            sub._parameters[leaf] = t
        yield
    finally:
        for sub, leaf, p in reversed(saved):
            sub._parameters[leaf] = p


class LocalShards(ParallelStyle):
    """Run a mixer / channel module on local tensors between an all-gather and a reduce-scatter.

    ``placements``: parameter name (dotted, within the module) -> its placement on the tp mesh
    (``Shard(0)`` column-wise, ``Shard(1)`` row-wise, ...); the others are replicated. ``once``:
    biases added after the row-wise sum. ``local_attrs``: attributes set to their local values
    (``n_heads``: the module's code then sees its rank's heads). ``replicated_outputs``: attributes
    the forward records that count in the loss (an MoE layer's ``aux_loss``), made replicated.
    """

    def __init__(self, placements: dict[str, Any], once: tuple[str, ...] = (), local_attrs: dict[str, Any] | None = None,
                 replicated_outputs: tuple[str, ...] = ()):
        super().__init__()
        self.placements, self.once = placements, set(once)
        self.local_attrs, self.replicated_outputs = local_attrs or {}, replicated_outputs

    def _apply(self, module: nn.Module, mesh) -> nn.Module:
        for name, p in list(module.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            dt = distribute_tensor(p.detach(), mesh, [self.placements.get(name, Replicate())])
            sub.register_parameter(leaf, nn.Parameter(dt, requires_grad=p.requires_grad))
        for k, v in self.local_attrs.items():
            setattr(module, k, v)
        inner, once, outputs = module.forward, self.once, self.replicated_outputs

        def forward(x, *args, **kwargs):
            local = {n: _local_view(p, mesh, n in once) for n, p in module.named_parameters()}
            with _swapped(module, local):
                y = inner(_enter(x, mesh), *args, **kwargs)
            for attr in outputs:
                setattr(module, attr, _as_replicated(getattr(module, attr, None), mesh))
            return _leave(y, mesh)

        module.forward = forward
        return module


def _colwise(*names: str) -> dict[str, Any]:
    return {n: Shard(0) for n in names}


def attention_style(attn: nn.Module, tp: int) -> LocalShards:
    """q/k/v column-wise (whole heads), o row-wise; QK-norm replicated; MQA's K/V replicated."""
    kv_split = attn.n_kv_heads % tp == 0
    cols = ["q_proj"] + (["k_proj", "v_proj"] if kv_split else [])
    placements = {f"{m}.{w}": Shard(0) for m in cols for w in ("weight", "bias")}
    placements["o_proj.weight"] = Shard(1)
    return LocalShards(placements, once=("o_proj.bias",),
                       local_attrs={"n_heads": attn.n_heads // tp,
                                    "n_kv_heads": attn.n_kv_heads // tp if kv_split else attn.n_kv_heads})


def mla_style(attn: nn.Module, tp: int) -> LocalShards:
    """DeepSeek's MLA: the per-head up-projections (``q_proj`` or ``q_b_proj``, ``kv_b_proj``)
    column-wise, ``o_proj`` row-wise; the latent down-projections (``q_a_proj``,
    ``kv_a_proj_with_mqa``) and their norms replicated: the latent and the shared rotary key are
    small and every head reads them."""
    placements = {f"{m}.weight": Shard(0) for m in ("q_proj", "q_b_proj", "kv_b_proj")}
    placements["o_proj.weight"] = Shard(1)
    return LocalShards(placements, once=("o_proj.bias",), local_attrs={"n_heads": attn.n_heads // tp})


def mlp_placements(prefix: str = "") -> dict[str, Any]:
    cols = {f"{prefix}{m}.{w}": Shard(0) for m in ("gate_proj", "up_proj") for w in ("weight", "bias")}
    return {**cols, f"{prefix}down_proj.weight": Shard(1)}


def mlp_style() -> LocalShards:
    return LocalShards(mlp_placements(), once=("down_proj.bias",))


def moe_style(moe: nn.Module) -> LocalShards:
    """Routed experts split inside each expert; shared experts as an MLP; the router replicated
    (each rank routes every token alike, so the same experts see the same tokens on all ranks)."""
    gated = moe.experts.gated
    placements = {"experts.gate_up_proj": _StridedShard(1, split_factor=2) if gated else Shard(1),
                  "experts.down_proj": Shard(2), **mlp_placements("shared_experts.")}
    return LocalShards(placements, once=("shared_experts.down_proj.bias",),
                       replicated_outputs=("aux_loss", "router_logits"))


# --------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------
def vocab_parallel_loss(model, mesh, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the final-normed sequence shards ``h`` (B, T/tp, d) against
    ``targets`` (B, T; -100 ignored), with the head's weight split over the vocabulary: logits
    ``Shard(-1)``, their max, sum of exponentials and the target's logit reduced over the ranks
    (Megatron's vocab-parallel cross-entropy, written in DTensor operations). Gemma's final
    soft-capping is applied to the split logits. Equals ``fused_linear_cross_entropy`` of one
    process up to float summation order."""
    w = model.lm_head.weight if model.lm_head is not None else model.embed_tokens.weight
    b = model.lm_head.bias if model.lm_head is not None else None
    whole = DTensor.from_local(h, mesh, [Shard(1)], run_check=False).redistribute(mesh, [Replicate()])
    logits = torch.nn.functional.linear(whole.flatten(0, 1), w, b)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    cap = model.config.final_softcap
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    t = targets.reshape(-1)
    valid = t != -100
    V, rank = w.shape[0], mesh.get_local_rank()
    lo = rank * (V // mesh.size())
    cols = torch.arange(lo, lo + V // mesh.size(), device=t.device)
    onehot = DTensor.from_local((cols[None, :] == t[:, None]).to(torch.float32), mesh, [Shard(1)], run_check=False)
    top = logits.detach().amax(dim=-1, keepdim=True)
    lse = (logits - top).exp().sum(dim=-1).log() + top.squeeze(-1)
    target_logit = (logits * onehot).sum(dim=-1)
    n = valid.sum().clamp(min=1)
    per_token = (lse - target_logit).redistribute(mesh, [Replicate()]).to_local()  # every rank: every token's
    return (per_token * valid).sum() / n


# --------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------
def _norm_names(block: nn.Module) -> list[str]:
    return [n for n in ("attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm")
            if isinstance(getattr(block, n, None), nn.Module) and not isinstance(getattr(block, n), nn.Identity)]


def _check_sequence(mesh):
    tp = mesh.size()

    def hook(model, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is not None and ids.shape[1] % tp:
            raise TensorParallelError(f"tensor parallel tp={tp} splits the sequence (sequence parallelism): "
                                      f"the batch's length {ids.shape[1]} must divide by {tp}")
        if kwargs.get("cache") is not None:
            raise TensorParallelError("tensor parallel: training and evaluation only (no KV cache); load the "
                                      "saved checkpoint in one process to generate")
    return hook


def apply_tensor_parallel(model, mesh) -> nn.Module:
    """Split ``model`` (an ``evolm.model.Transformer``) over the 1-D ``mesh`` (the layout's ``tp``
    dims) in place; returns it. The model keeps its modules, names and state-dict keys; its
    parameters become DTensors (full tensors: ``.full_tensor()``)."""
    tp = mesh.size()
    check_tensor_parallel(model.config, tp)
    plan: dict[str, ParallelStyle] = {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
    }
    if model.norm is not None:
        plan["norm"] = SequenceParallel(use_local_output=True)
    if model.lm_head is not None:  # the logits path (no targets); the loss reads the weight itself
        plan["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    for i, block in enumerate(model.layers):
        for n in _norm_names(block):
            plan[f"layers.{i}.{n}"] = SequenceParallel(use_local_output=True)
        attn = block.self_attn
        plan[f"layers.{i}.self_attn"] = mla_style(attn, tp) if hasattr(attn, "kv_b_proj") else attention_style(attn, tp)
        if block.mlp is not None:
            plan[f"layers.{i}.mlp"] = moe_style(block.mlp) if hasattr(block.mlp, "experts") else mlp_style()
    parallelize_module(model, mesh, plan)
    model.head_loss = lambda h, targets: vocab_parallel_loss(model, mesh, h, targets)
    model.register_forward_pre_hook(_check_sequence(mesh), with_kwargs=True)
    return model
