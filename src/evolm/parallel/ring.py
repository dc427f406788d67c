"""Ring attention: exact attention over a sequence sharded across the ranks of a context-parallel group.

Each of the N ranks of the group holds T / N tokens' queries, keys and values. Attention is
computed block by block while the key/value blocks travel around the ring, each rank sending its
current block to the next rank and receiving one from the previous (Liu, Zaharia & Abbeel 2023,
"Ring Attention with Blockwise Transformers", arXiv:2310.01889). A rank never holds more than two
key/value blocks, so the attention's memory per rank is O(T / N). torch's own ``context_parallel``
routes only CUDA SDPA kernels; this ring is evolm's, on plain ``torch.distributed`` point-to-point
operations (``batch_isend_irecv`` of ``P2POp``, which gloo and NCCL both run), so it also runs on
CPU processes, where the tests prove it equal to full attention.

The pieces:

- **Partial attention with its log-sum-exp.** Each block gives the softmax-weighted values of the
  keys it holds and ``lse = log sum exp(scores)`` over them; two partial results merge exactly
  (the online softmax of Milakov & Gimelshein 2018, arXiv:1805.02867, as FlashAttention uses it):
  ``lse = logaddexp(lse_a, lse_b)``, ``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``.
  Every exponent is <= 0, so nothing overflows; a block whose keys a row may not see contributes
  ``lse = -inf`` and weight 0.
- **Backward** (:class:`_RingAttention`): the scores are recomputed per block from the saved q, k,
  v, output and lse (FlashAttention-2's backward, Dao 2023, arXiv:2307.08691); the key/value blocks
  travel again, and with them their gradient accumulators, which after a full turn arrive back at
  the rank that owns the block, holding every rank's contribution.
- **Load balance** (:class:`SequenceLayout`). Under a causal mask, rank r of a contiguous split
  sees r + 1 of the N blocks, so the last rank does N times the first's work. The *zigzag* split
  (Llama 3, arXiv:2407.21783, Sec. 3.3.2; torchtitan's "head-tail" load balancer) cuts the
  sequence into 2N chunks and gives rank r chunks r and 2N-1-r: every rank then computes the same
  number of chunk pairs (2N + 1) and the same number of query-key pairs. Striped Attention
  (Brandon et al. 2023, arXiv:2311.09431) balances by giving rank r every N-th token instead
  (``kind="striped"``); it never skips a block, but every block is about half masked.
- **Skipping.** A chunk pair the mask hides entirely (a key chunk after the query chunk, or one
  further back than a sliding window: Mistral, Gemma 3) is never computed; a pair it shows entirely
  needs no mask. Which pairs these are follows from the layout alone, so no data is inspected.
- **GQA** (fewer key/value heads than query heads): the query heads that share a key/value head are
  stacked as the rows of one matmul, so the travelling blocks keep the small number of heads.
- **Document masks** (packed documents): the document ids of the keys travel with them.
- Soft-capped logits (Gemma 2: ``cap * tanh(s / cap)``) and the layer's score scale are applied per
  block, and their derivatives in the backward.

Where it is used: ``evolm.parallel.context`` shards a batch in a layout and makes evolm's attention
layers call :func:`ring_attention` (see there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from evolm.nn.masks import attention_mask

LayoutKind = Literal["zigzag", "contiguous", "striped"]
LAYOUTS = ("zigzag", "contiguous", "striped")


@dataclass(frozen=True)
class Piece:
    """A run of a rank's local tokens: local rows ``[start, stop)`` hold sequence slots ``lo..hi``
    (inclusive bounds; every slot of a contiguous piece, every N-th of a striped one)."""

    start: int
    stop: int
    lo: int
    hi: int


@dataclass(frozen=True)
class SequenceLayout:
    """How a sequence of ``length`` tokens is split over the ``world`` ranks of a context-parallel group.

    ``zigzag`` (default): 2N chunks, rank r holds chunks r and 2N-1-r (causal work balanced);
    ``contiguous``: rank r holds the r-th of N chunks (unbalanced under a causal mask; kept to
    show the difference); ``striped``: rank r holds slots r, r + N, r + 2N, ... (Striped Attention).
    """

    world: int
    length: int
    kind: LayoutKind = "zigzag"

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise ValueError(f"context-parallel layout {self.kind!r}: expected one of {', '.join(LAYOUTS)}")
        parts = 2 * self.world if self.kind == "zigzag" else self.world
        if self.world < 1 or self.length % parts:
            raise ValueError(f"a sequence of {self.length} tokens cannot be split in the {self.kind} layout over "
                             f"{self.world} context-parallel ranks: the length must be a multiple of {parts}")

    @property
    def local_length(self) -> int:
        return self.length // self.world

    def pieces(self, rank: int) -> list[Piece]:
        """The runs of ``rank``'s local tokens, in local order."""
        n, N = self.local_length, self.world
        if self.kind == "contiguous":
            return [Piece(0, n, rank * n, rank * n + n - 1)]
        if self.kind == "striped":
            return [Piece(0, n, rank, rank + N * (n - 1))]
        c = n // 2
        return [Piece(0, c, rank * c, rank * c + c - 1),
                Piece(c, n, (2 * N - 1 - rank) * c, (2 * N - rank) * c - 1)]

    def slots(self, rank: int, device=None) -> torch.Tensor:
        """(T / N,) the sequence slots of ``rank``'s local tokens, in local order."""
        if self.kind == "striped":
            return torch.arange(rank, self.length, self.world, device=device)
        return torch.cat([torch.arange(p.lo, p.hi + 1, device=device) for p in self.pieces(rank)])


@dataclass(frozen=True)
class RingSpec:
    """What one ring-attention call needs besides its tensors (all plain data)."""

    group: object                 # the context-parallel ProcessGroup (None: the default group)
    layout: SequenceLayout
    scale: float
    softcap: float | None = None
    window: int | None = None     # sliding window in slots (causal: i - j < window; bidirectional: |i - j| <= window // 2)
    causal: bool = True
    stats: dict | None = None     # when given: counts of computed chunk pairs and query-key pairs (load balance)
    kernel: str = "auto"          # per-block kernel: "flash" (torch's fused CPU kernel), "math" (matmuls), "auto"


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: RingSpec,
                   doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention of this rank's queries over the whole (sharded) sequence's keys and values.

    ``q`` (B, H, T/N, D), ``k`` (B, Hkv, T/N, D), ``v`` (B, Hkv, T/N, Dv): this rank's tokens in
    ``spec.layout`` order; H must be a multiple of Hkv (GQA). ``doc_ids`` (B, T/N): the local tokens'
    packed-document ids (attention stays inside a document). Returns (B, H, T/N, Dv), differentiable
    in q, k and v. Every rank of the group must call it with the same shapes.

    Under autocast q, k and v are cast to the autocast dtype, as ``F.scaled_dot_product_attention``
    is (RoPE can leave q and k in float32 beside a bfloat16 v); otherwise to their common dtype.
    """
    B, H, n, _ = q.shape
    if n != spec.layout.local_length:
        raise ValueError(f"ring attention: {n} local tokens, the layout holds {spec.layout.local_length} per rank")
    if k.shape[2] != n or v.shape[2] != n or H % k.shape[1]:
        raise ValueError(f"ring attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: keys and "
                         f"values need the queries' local length and a head count dividing theirs")
    if doc_ids is not None and tuple(doc_ids.shape) != (B, n):
        raise ValueError(f"ring attention: doc_ids {tuple(doc_ids.shape)}, expected (batch, local tokens) = {(B, n)}")
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    with torch.autocast(device, enabled=False):  # the blocks run in the dtype chosen here
        return _RingAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype), doc_ids, spec)


# ----------------------------------------------------------------------------------------------
# the ring: who sends to whom


class _Ring:
    """This rank's neighbours in the group and the asynchronous shift of tensors one step round."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def shift(self, tensors: list[torch.Tensor], tag: int = 0) -> "_Shift":
        """Send ``tensors`` to the next rank and receive as many from the previous, without waiting
        (one ``batch_isend_irecv``: sends and receives of the batch cannot deadlock each other).
        Each tensor has its own tag from ``tag`` on, so two shifts in flight (the backward's blocks
        and gradients) never take each other's messages."""
        nxt, prv = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        bufs = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, group=self.group, tag=tag + i, group_peer=nxt) for i, t in enumerate(tensors)]
        ops += [dist.P2POp(dist.irecv, b, group=self.group, tag=tag + i, group_peer=prv) for i, b in enumerate(bufs)]
        return _Shift(dist.batch_isend_irecv(ops), bufs)


class _Shift:
    def __init__(self, works, bufs):
        self.works, self.bufs = works, bufs

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        return self.bufs


# ----------------------------------------------------------------------------------------------
# which chunk pairs to compute


def _relation(qp: Piece, kp: Piece, causal: bool, window: int | None) -> str:
    """'none' (the mask hides every pair), 'full' (it shows every pair) or 'partial', from the slot bounds."""
    dmin, dmax = qp.lo - kp.hi, qp.hi - kp.lo  # the range of query slot - key slot
    if causal:
        if dmax < 0 or (window is not None and dmin >= window):
            return "none"
        full = dmin >= 0 and (window is None or dmax < window)
    else:
        if window is not None and (dmin > window // 2 or dmax < -(window // 2)):
            return "none"
        full = window is None or max(abs(dmin), abs(dmax)) <= window // 2
    return "full" if full else "partial"  # every pair's slot difference lies in [dmin, dmax]


@dataclass(frozen=True)
class _Block:
    """One matmul's worth of work: the local query rows ``q`` against the key columns ``k`` of the
    block held, and whether a mask is needed there."""

    q: slice
    k: slice
    masked: bool
    pairs: int  # chunk pairs covered (for the load-balance count)


def _plan(spec: RingSpec, rank: int, src: int, docs: bool) -> list[_Block]:
    """The blocks ``rank``'s queries compute against the keys of ``src``: per query piece, the key
    pieces it sees (adjacent in local order, so one slice), masked where a pair is partial or documents apply."""
    layout = spec.layout
    kps = layout.pieces(src)
    blocks = []
    for qp in layout.pieces(rank):
        rel = [(kp, _relation(qp, kp, spec.causal, spec.window)) for kp in kps]
        seen = [(kp, r) for kp, r in rel if r != "none"]
        if not seen:
            continue
        first, last = kps.index(seen[0][0]), kps.index(seen[-1][0])
        if last - first + 1 != len(seen):  # a hidden piece between two seen ones: split
            blocks += [_Block(slice(qp.start, qp.stop), slice(kp.start, kp.stop), r == "partial" or docs, 1)
                       for kp, r in seen]
            continue
        masked = docs or any(r == "partial" for _, r in seen)
        blocks.append(_Block(slice(qp.start, qp.stop), slice(seen[0][0].start, seen[-1][0].stop), masked, len(seen)))
    return blocks


def _block_mask(spec: RingSpec, rank: int, src: int, b: _Block, doc_q, doc_k, device) -> torch.Tensor | None:
    """(B or 1, 1, Tq, Tk) bool: the block's visible pairs, from slots (nn/masks.py's rules) and documents."""
    if not b.masked:
        return None
    qs = spec.layout.slots(rank, device)[b.q]
    ks = spec.layout.slots(src, device)[b.k]
    mask = attention_mask(qs, ks, None, spec.window, None, "causal" if spec.causal else "bidirectional")
    if doc_q is not None:
        mask = mask & (doc_q[:, b.q, None] == doc_k[:, None, b.k])[:, None]
    return mask


# ----------------------------------------------------------------------------------------------
# one block: forward with its log-sum-exp, backward from the final lse


def _scores(q, k, scale, softcap, mask, acc):
    """Grouped scores (B, Hkv, G, Tq, Tk) in ``acc`` dtype, soft-capped and masked; and tanh(s / cap) for the backward."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    s = torch.matmul(q.to(acc).reshape(B, Hkv, G * Tq, D), k.to(acc).transpose(-1, -2)) * scale
    t = None
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s = softcap * t
    s = s.view(B, Hkv, G, Tq, Tk)
    if mask is not None:
        s = s.masked_fill(~mask[:, :, None], float("-inf"))
    return s, t


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (a row that saw no key) replaced by 0, so exp(score - lse) is 0 there, not nan."""
    return lse.masked_fill(torch.isneginf(lse), 0.0)


def _block_forward(q, k, v, mask, scale, softcap, acc):
    """(out (B, H, Tq, Dv), lse (B, H, Tq)) of the queries over this block's keys alone."""
    B, H, Tq, _ = q.shape
    s, _ = _scores(q, k, scale, softcap, mask, acc)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - _finite(lse)[..., None])
    out = torch.matmul(p.view(B, k.shape[1], -1, k.shape[2]), v.to(acc))
    return out.view(B, H, Tq, v.shape[-1]), lse.view(B, H, Tq)


def _merge(out, lse, out_b, lse_b):
    """The online-softmax merge of a block's (out_b, lse_b) into the running (out, lse), in place."""
    new = torch.logaddexp(lse, lse_b)
    safe = _finite(new)
    out.mul_(torch.exp(lse - safe)[..., None]).add_(out_b * torch.exp(lse_b - safe)[..., None])
    lse.copy_(new)


def _block_backward(q, k, v, dout, lse, delta, mask, scale, softcap, acc):
    """(dq, dk, dv) of one block, given the final lse and delta = rowsum(dout * out)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    s, t = _scores(q, k, scale, softcap, mask, acc)
    p = torch.exp(s - _finite(lse).reshape(B, Hkv, G, Tq)[..., None]).view(B, Hkv, G * Tq, Tk)
    dout_g = dout.reshape(B, Hkv, G * Tq, -1)
    dv = torch.matmul(p.transpose(-1, -2), dout_g)
    dp = torch.matmul(dout_g, v.to(acc).transpose(-1, -2))
    ds = p * (dp - delta.reshape(B, Hkv, G * Tq)[..., None])
    if t is not None:
        ds = ds * (1 - t * t)
    ds = ds * scale
    dq = torch.matmul(ds, k.to(acc)).view(B, H, Tq, D)
    dk = torch.matmul(ds.transpose(-1, -2), q.to(acc).reshape(B, Hkv, G * Tq, D))
    return dq, dk, dv


# torch's fused CPU attention (the kernel F.scaled_dot_product_attention runs on CPU), called directly
# because it also returns the log-sum-exp the merge needs, and its backward takes the final output and
# lse, so it computes a block's exact share of the gradients (as torch's own context_parallel does
# with the CUDA kernels)
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _use_flash(spec: RingSpec, q, v) -> bool:
    """The fused kernel where it applies (CPU, no soft-capping: it never sees the raw scores, equal
    q/v head sizes); the matmul path elsewhere (``kernel="math"``: always)."""
    if spec.kernel not in ("auto", "flash", "math"):
        raise ValueError(f"ring attention kernel {spec.kernel!r}: expected auto, flash or math")
    ok = _FLASH is not None and q.device.type == "cpu" and spec.softcap is None and v.shape[-1] == q.shape[-1]
    if spec.kernel == "flash" and not ok:
        raise ValueError("ring attention kernel 'flash' needs CPU tensors, no softcap and equal q/v head sizes")
    return ok and spec.kernel != "math"


def _heads(t, G):
    """Key/value heads repeated for the G query heads of each group (the fused kernel wants equal counts)."""
    return t if G == 1 else t.repeat_interleave(G, dim=1)


def _bias(mask, dtype):
    return None if mask is None else \
        torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _flash_forward(q, k, v, mask, scale, acc):
    G = q.shape[1] // k.shape[1]
    out, lse = _FLASH(q, _heads(k, G), _heads(v, G), 0.0, False, attn_mask=_bias(mask, q.dtype), scale=scale)
    lse = lse.to(acc)
    if mask is not None:  # the kernel gives a row that sees no key of this block lse 0: it must weigh nothing
        lse = lse.masked_fill(~mask.any(-1), float("-inf"))
    return out.to(acc), lse


def _flash_backward(q, k, v, dout, out, lse, mask, scale):
    B, H, _, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    dq, dk, dv = _FLASH_BWD(dout.to(q.dtype), q, _heads(k, G), _heads(v, G), out.to(q.dtype), _finite(lse), 0.0,
                            False, attn_mask=_bias(mask, q.dtype), scale=scale)
    if G > 1:  # the repeated heads' gradients summed back onto their key/value head
        dk, dv = dk.view(B, Hkv, G, Tk, D).sum(2), dv.view(B, Hkv, G, Tk, -1).sum(2)
    return dq, dk, dv


def _count(spec: RingSpec, b: _Block, mask) -> None:
    if spec.stats is None:
        return
    spec.stats["blocks"] = spec.stats.get("blocks", 0) + b.pairs
    n = (b.q.stop - b.q.start) * (b.k.stop - b.k.start)
    seen = int(mask[:1].sum()) if mask is not None else n  # pairs of the first row of the batch
    spec.stats["pairs"] = spec.stats.get("pairs", 0) + seen


# ----------------------------------------------------------------------------------------------


class _RingAttention(torch.autograd.Function):
    """Ring attention's forward and backward; only q, k, v, out and lse are saved (O(T / N) per rank)."""

    @staticmethod
    def forward(ctx, q, k, v, doc_ids, spec: RingSpec):
        ring = _Ring(spec.group)
        acc = torch.promote_types(q.dtype, torch.float32)
        B, H, n, _ = q.shape
        k, v = k.contiguous(), v.contiguous()
        out = torch.zeros(B, H, n, v.shape[-1], dtype=acc, device=q.device)
        lse = torch.full((B, H, n), float("-inf"), dtype=acc, device=q.device)
        held = [k, v] + ([doc_ids.contiguous()] if doc_ids is not None else [])
        flash = _use_flash(spec, q, v)
        for step in range(ring.world):
            src = (ring.rank - step) % ring.world
            nxt = ring.shift(held) if step < ring.world - 1 else None  # the next block travels while this one computes
            kb, vb = held[0], held[1]
            doc_k = held[2] if doc_ids is not None else None
            for b in _plan(spec, ring.rank, src, doc_ids is not None):
                mask = _block_mask(spec, ring.rank, src, b, doc_ids, doc_k, q.device)
                _count(spec, b, mask)
                if flash:
                    o_b, lse_b = _flash_forward(q[:, :, b.q], kb[:, :, b.k], vb[:, :, b.k], mask, spec.scale, acc)
                else:
                    o_b, lse_b = _block_forward(q[:, :, b.q], kb[:, :, b.k], vb[:, :, b.k], mask, spec.scale,
                                                spec.softcap, acc)
                _merge(out[:, :, b.q], lse[:, :, b.q], o_b, lse_b)
            if nxt is not None:
                held = nxt.wait()
        ctx.save_for_backward(q, k, v, doc_ids, out, lse)
        ctx.spec = spec
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, doc_ids, out, lse = ctx.saved_tensors
        spec = ctx.spec
        ring = _Ring(spec.group)
        acc = out.dtype
        dout = dout.to(acc)
        delta = (dout * out).sum(-1)  # (B, H, n): the softmax backward's row term (math path)
        flash = _use_flash(spec, q, v)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        held = [k, v] + ([doc_ids] if doc_ids is not None else [])
        grads = [torch.zeros(k.shape, dtype=acc, device=k.device), torch.zeros(v.shape, dtype=acc, device=v.device)]
        for step in range(ring.world):
            src = (ring.rank - step) % ring.world
            nxt = ring.shift(held) if step < ring.world - 1 else None
            kb, vb = held[0], held[1]
            doc_k = held[2] if doc_ids is not None else None
            dk, dv = grads
            for b in _plan(spec, ring.rank, src, doc_ids is not None):
                mask = _block_mask(spec, ring.rank, src, b, doc_ids, doc_k, q.device)
                if flash:
                    dq_b, dk_b, dv_b = _flash_backward(q[:, :, b.q], kb[:, :, b.k], vb[:, :, b.k], dout[:, :, b.q],
                                                       out[:, :, b.q], lse[:, :, b.q], mask, spec.scale)
                else:
                    dq_b, dk_b, dv_b = _block_backward(q[:, :, b.q], kb[:, :, b.k], vb[:, :, b.k], dout[:, :, b.q],
                                                       lse[:, :, b.q], delta[:, :, b.q], mask, spec.scale,
                                                       spec.softcap, acc)
                dq[:, :, b.q] += dq_b
                dk[:, :, b.k] += dk_b
                dv[:, :, b.k] += dv_b
            # the accumulators follow their block; after the N-th shift each rank holds its own
            grads = ring.shift(grads, tag=3).wait() if ring.world > 1 else grads
            if nxt is not None:
                held = nxt.wait()
        dk, dv = grads
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None
