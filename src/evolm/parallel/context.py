"""Context parallelism: a batch's sequence split over the ranks of a group, attention run as a ring.

Long sequences outgrow one device's activation memory before they outgrow its weights: every
activation but attention's scores is per token, so splitting the sequence over N ranks divides
them by N. Everything in a decoder block is per token except attention, which
``evolm.parallel.ring`` computes exactly across the ranks (Liu et al. 2023, arXiv:2310.01889); this
module does the rest, from outside the model, as torchtitan's ``context_parallel`` does for CUDA:

- :meth:`ContextParallel.shard` / :meth:`shard_batch` cut a batch's sequence (input ids, targets,
  RoPE positions, document ids) in the load-balanced zigzag layout (rank r: chunks r and 2N-1-r of
  2N; Llama 3, arXiv:2407.21783), :meth:`gather` puts a sharded tensor back in sequence order;
- :meth:`attached` sets the ring on every attention layer (``Attention.ring`` / the MLA layer's, the
  one narrow hook in the model) for the forward passes it wraps, and removes it after: the model
  stays parallel-agnostic and the per-batch state (layout, document ids) is passed in, not global.
  The positions each rank feeds the model are its tokens' own (RoPE and learned positions are per
  token), so the masks the model plans for its local tokens are unused: the ring masks each block
  from the tokens' sequence slots;
- :meth:`loss` gives this rank's share of the batch's mean loss, weighted by its count of targets,
  so the shares sum over the group to exactly the one-process loss, and :meth:`reduce_gradients`
  sums the parameter gradients over the group (each rank's gradients are the whole loss's through
  its tokens). Combined with data parallelism, fold the cp ranks into the data-parallel reduction
  (torchtitan's ``dp_shard_cp`` mesh dimension): a mean over D x N ranks then needs the loss
  multiplied by N (``scale_for_mean``).

Not sharded, with a clear error: state-space mixers (they scan the sequence), Llama 4's chunked
layers and query temperatures, T5's relative biases, multi-token prediction (it shifts the
sequence), encoder-decoders and vision models, attention dropout in training. MoE layers route
per token, but their auxiliary balance losses are computed over each rank's tokens.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from evolm.parallel.ring import LayoutKind, RingSpec, SequenceLayout, ring_attention


class ContextParallel:
    """Context parallelism over one process group (state passed in: the group and the layout kind)."""

    def __init__(self, group=None, layout: LayoutKind = "zigzag"):
        self.group = group
        self.kind = layout
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.stats: dict | None = None  # set to {} to count the ring's computed blocks (load balance)

    def layout(self, length: int) -> SequenceLayout:
        return SequenceLayout(self.world, length, self.kind)

    # --- the data ------------------------------------------------------------------------
    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's part of ``x`` along the sequence dimension ``dim``, in layout order."""
        idx = self.layout(x.shape[dim]).slots(self.rank, x.device)
        return x.index_select(dim, idx)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole sequence from every rank's part ``x`` (sharded along ``dim``), in sequence order."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        layout = self.layout(x.shape[dim] * self.world)
        slots = torch.cat([layout.slots(r, x.device) for r in range(self.world)])
        out = torch.empty_like(torch.cat(parts, dim))
        return out.index_copy_(dim, slots, torch.cat(parts, dim))

    def shard_batch(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None) -> dict:
        """A full batch (B, T) -> this rank's (B, T/N) input ids, targets, positions (default: the slots)
        and document ids."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        out = {"input_ids": self.shard(input_ids), "position_ids": self.shard(position_ids)}
        for name, t in (("targets", targets), ("doc_ids", doc_ids)):
            if t is not None:
                if tuple(t.shape) != (B, T):
                    raise ValueError(f"context parallel: {name} {tuple(t.shape)} must match input_ids {(B, T)}")
                out[name] = self.shard(t)
        return out

    # --- the model -----------------------------------------------------------------------
    @contextmanager
    def attached(self, model, length: int, doc_ids: torch.Tensor | None = None):
        """Within the block, ``model``'s attention layers run ring attention over this group for a
        sequence of ``length`` tokens held in this layout; ``doc_ids`` (B, length / N): the local tokens'."""
        check_model(model.config, model.training)
        layout = self.layout(length)
        call = _RingCall(self, layout, doc_ids, model.config.mask == "causal")
        layers = [m for m in model.modules() if hasattr(type(m), "ring")]
        for m in layers:
            m.ring = call
        try:
            yield
        finally:
            for m in layers:
                del m.ring  # back to the class's None

    def loss(self, model, input_ids: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's share of the mean next-token loss of the full batch given (every rank of the
        group holds the same batch): its local mean times its count of targets over the group's
        count, so the shares sum to the one-process loss. Backpropagate it, then
        :meth:`reduce_gradients`; :meth:`total` gives the loss value."""
        b = self.shard_batch(input_ids, targets, position_ids, doc_ids)
        with self.attached(model, input_ids.shape[1], b.get("doc_ids")):
            mean = model(b["input_ids"], position_ids=b["position_ids"], targets=b["targets"])
        n = (b["targets"] != -100).sum()
        total = n.clone()
        dist.all_reduce(total, group=self.group)
        return mean * (n / total.clamp(min=1)).to(mean.dtype)

    def total(self, share: torch.Tensor) -> float:
        """The full batch's loss from every rank's :meth:`loss` share."""
        t = share.detach().clone()
        dist.all_reduce(t, group=self.group)
        return float(t)

    def reduce_gradients(self, model) -> None:
        """Sum the parameter gradients over the group (one flat all-reduce)."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads or self.world == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    @property
    def scale_for_mean(self) -> int:
        """The factor for :meth:`loss` when the gradient reduction averages over these ranks
        (FSDP / DDP over a mesh dimension that folds cp in) instead of summing."""
        return self.world


def apply_context_parallel(model, group, layout: LayoutKind = "zigzag", grad_scale: int | None = None):
    """Make ``model`` context-parallel over ``group`` in place, for the training loop as it is: the
    dispatcher's one call (``evolm.parallel.parallelize`` with ``layout.cp > 1``, group ``mesh["cp"]``).

    Every call with ``targets`` (the trainer's and the evaluation's loss) is sharded by forward
    hooks: the pre-hook cuts input ids, targets, positions and document ids in the layout and sets
    the ring on the attention layers (it stays set until the next call, so activation checkpointing
    recomputes the blocks with it); the post-hook turns the local mean into the batch's loss, whose
    *value* is the full batch's (reduced over the group, what the logs show) and whose *gradient* is
    this rank's share times ``grad_scale`` (default: the group's size, because FSDP averages the
    gradients over ``dp_shard_cp``, which holds the cp ranks). A call without targets (sampling,
    generation) runs the whole sequence on every rank, as one process would, with the ring off.
    Returns the :class:`ContextParallel` that holds the state."""
    check_model(model.config, training=True)
    cp = ContextParallel(group, layout)
    scale = cp.world if grad_scale is None else grad_scale
    layers = [m for m in model.modules() if hasattr(type(m), "ring")]
    counts = {}

    def pre(module, args, kwargs):
        for m in layers:  # the previous call's ring (kept for recomputation) goes
            m.__dict__.pop("ring", None)
        if kwargs.get("targets") is None:
            return None
        if len(args) != 1 or kwargs.get("attention_mask") is not None or kwargs.get("cache") is not None:
            raise ValueError("context parallelism shards model(input_ids, targets=..., doc_ids=..., position_ids=...): "
                             "pass the other arguments by name, and no attention_mask (padding) or cache")
        ids = args[0]
        b = cp.shard_batch(ids, kwargs["targets"], kwargs.get("position_ids"), kwargs.get("doc_ids"))
        call = _RingCall(cp, cp.layout(ids.shape[1]), b.get("doc_ids"), model.config.mask == "causal")
        for m in layers:
            m.ring = call
        n = (b["targets"] != -100).sum()
        total = n.clone()
        dist.all_reduce(total, group=cp.group)
        counts["share"] = n / total.clamp(min=1)
        kwargs = {**kwargs, "targets": b["targets"], "position_ids": b["position_ids"], "doc_ids": None}
        return (b["input_ids"],), kwargs

    def post(module, args, kwargs, out):
        if "share" not in counts:
            return None
        share = out * counts.pop("share").to(out.dtype)
        value = share.detach().clone()
        dist.all_reduce(value, group=cp.group)
        return share * scale + (value - share * scale).detach()

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)
    return cp


class _RingCall:
    """What an attention layer calls in place of ``attend`` while :meth:`ContextParallel.attached` is active."""

    def __init__(self, cp: ContextParallel, layout: SequenceLayout, doc_ids, causal: bool):
        self.cp, self.layout, self.doc_ids, self.causal = cp, layout, doc_ids, causal

    def __call__(self, layer, q, k, v):
        spec = RingSpec(self.cp.group, self.layout, layer.scale, layer.softcap, layer.window, self.causal,
                        self.cp.stats)
        return ring_attention(q, k, v, spec, self.doc_ids)


def check_model(config, training: bool = True) -> None:
    """Refuse, naming the field, what context parallelism cannot shard exactly."""
    def no(field, why):
        raise ValueError(f"context parallelism: {field} — {why}")

    for i in range(config.n_layers):
        if config.layer_mixer(i) not in ("mha", "mla"):
            no(f"layer {i}'s mixer {config.layer_mixer(i)!r}", "only attention layers (mha, mla) can run as a ring; "
               "a state-space or convolution layer reads the whole sequence in order")
    if config.attention_chunk_size is not None:
        no("attention_chunk_size", "chunked local attention (Llama 4) is not planned by the ring")
    if config.attn_temperature_tuning:
        no("attn_temperature_tuning", "the query temperature counts local slots, not the sequence's")
    if config.pos_emb == "relative":
        no("pos_emb='relative'", "T5's relative biases are a mask the ring does not build")
    if config.mtp_depth:
        no("mtp_depth", "multi-token prediction shifts the sequence across shards")
    if config.encoder_layers or config.vision is not None:
        no("encoder_layers / vision", "encoder-decoders and vision models are not sharded")
    if config.mask not in ("causal", "bidirectional"):
        no(f"mask={config.mask!r}", "the ring masks causal or bidirectional attention")
    if training and config.attn_dropout:
        no("attn_dropout", "dropout on attention probabilities is not applied by the ring")
