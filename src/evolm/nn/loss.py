"""Next-token cross-entropy fused with the LM head, computed in chunks.

With a 50k-256k vocabulary the logits of a training batch dominate memory and memory traffic:
8 x 256 tokens x 50,304 entries are 412 MB in fp32, written by the head, read by the softmax,
written again as their gradient and read twice by the backward matmuls. Computing the head, the
loss and the loss's gradient chunk by chunk (as Liger-Kernel's fused linear cross-entropy and
Apple's "Cut Your Losses", arXiv:2411.09009, do) keeps only ``chunk x vocab`` logits alive and
turns the backward into two matmuls per chunk. The result equals
``F.cross_entropy(h @ W.T, targets)`` (with Gemma 2's final soft-capping when set).
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


def _cast(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """(compute dtype, h, w, b in it): what autocast would give the head's matmul."""
    dtype = _compute_dtype(h)
    return dtype, h.to(dtype), w.to(dtype), (b.to(dtype) if b is not None else None)


def _default_chunk(dtype: torch.dtype) -> int:
    """Rows of logits per chunk: the same bytes in every dtype (1024 fp32 rows, 2048 bf16)."""
    return 4096 // torch.finfo(dtype).bits * 8


class _Scratch:
    """Large buffers of the fused loss, kept from one training step to the next.

    On CPU every tensor over glibc's mmap threshold (32 MB at most) is fresh memory from the
    kernel, and touching it costs a page fault per 4 KB: a fresh 412 MB tensor took 302 ms to
    fill with ``exp`` against 79 ms for the same pass into an existing one (this host, 2 threads).
    The loss allocates a chunk of logits (206 MB at 2,048 x 50,304 bf16), the head weight in the
    compute dtype and its gradient's product at every step, so they are taken from here and given
    back when no longer needed. A buffer handed out is never handed out twice (two forwards before
    one backward get two); ``release_scratch()`` frees what is kept.
    """

    def __init__(self):
        self.free: dict[tuple, torch.Tensor] = {}

    def take(self, tag: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = self.free.pop((tag, tuple(shape), dtype, device), None)
        return t if t is not None else torch.empty(shape, dtype=dtype, device=device)

    def give(self, tag: str, t: torch.Tensor) -> None:
        self.free[tag, tuple(t.shape), t.dtype, t.device] = t


_scratch = _Scratch()


def release_scratch() -> None:
    """Free the buffers the fused loss keeps between training steps (see ``_Scratch``)."""
    _scratch.free.clear()


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, softcap: float | None):
    logits = F.linear(h, w, b).float()
    if softcap is None:
        return logits, None
    z = torch.tanh(logits / softcap)
    return softcap * z, z


def _xent_rows_(x: torch.Tensor, tc: torch.Tensor, valid: torch.Tensor, n_valid: torch.Tensor,
                softcap: float | None) -> torch.Tensor:
    """Summed loss of fp32 logit rows ``x``; d(mean loss)/d(x) is left in ``x`` (in-place passes)."""
    g, z = x, None
    if softcap is not None:
        z = torch.tanh(x / softcap)
        g = softcap * z
    safe_t = tc.clamp(min=0)
    target_logit = g.gather(1, safe_t[:, None])[:, 0]
    # one pass of exp, in place: the softmax is both the loss's normaliser and its gradient
    top = g.amax(dim=-1, keepdim=True)
    g = g.sub_(top).exp_()
    denom = g.sum(dim=-1, keepdim=True)
    lse = (top + denom.log())[:, 0]
    total = ((lse - target_logit) * valid).sum()
    g.div_(denom)  # softmax
    g.scatter_add_(1, safe_t[:, None], -valid[:, None].float())
    g *= (valid.float() / n_valid)[:, None]
    if z is not None:
        g *= 1 - z * z  # d(cap * tanh(x / cap)) / dx
    if g is not x:
        x.copy_(g)
    return total


_FP32_ROWS_BYTES = 64 << 20  # the fp32 upcast of low-precision logits, a block of rows at a time


def _xent_grad_eager(logits: torch.Tensor, tc: torch.Tensor, valid: torch.Tensor, n_valid: torch.Tensor,
                     softcap: float | None) -> torch.Tensor:
    """Summed loss of a chunk, computed in fp32; d(mean loss)/d(logits) is written over ``logits``.

    Low-precision logits are upcast a block of rows at a time into one reused fp32 buffer (a
    fresh fp32 copy of a whole 2,048 x 50,304 chunk is 412 MB of new pages at every step)."""
    if logits.dtype == torch.float32:
        return _xent_rows_(logits, tc, valid, n_valid, softcap)
    n, vocab = logits.shape
    rows = max(1, min(n, _FP32_ROWS_BYTES // (4 * vocab)))
    tmp = _scratch.take("logits_fp32", (rows, vocab), torch.float32, logits.device)
    total = logits.new_zeros((), dtype=torch.float32)
    for r in range(0, n, rows):
        part = logits[r:r + rows]
        x = tmp[:part.shape[0]].copy_(part)
        total += _xent_rows_(x, tc[r:r + rows], valid[r:r + rows], n_valid, softcap)
        part.copy_(x)
    _scratch.give("logits_fp32", tmp)
    return total


def _xent_stats(logits: torch.Tensor, tc: torch.Tensor, valid: torch.Tensor, softcap: float | None):
    """Each row's log-sum-exp and the chunk's summed loss: reductions only, fused by inductor into
    loops over the chunk that never materialise the fp32 upcast."""
    x = logits.float()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    target_logit = x.gather(1, tc.clamp(min=0)[:, None])[:, 0]
    lse = torch.logsumexp(x, dim=-1)
    return lse, ((lse - target_logit) * valid.float()).sum()


def _xent_grad_inplace(logits: torch.Tensor, lse: torch.Tensor, tc: torch.Tensor, valid: torch.Tensor,
                       n_valid: torch.Tensor, softcap: float | None) -> None:
    """d(mean loss)/d(logits) written over ``logits`` (one pointwise pass): no second chunk x vocab
    tensor is allocated, and a fresh one costs its page faults at every step (see ``_Scratch``).
    Kept apart from the reductions: in one graph, inductor's CPU outer-loop fusion fails on the
    in-place store (KeyError in ``try_outer_loop_fusion_with_local_buf``, torch 2.13)."""
    x = logits.float()
    z = None
    if softcap is not None:
        z = torch.tanh(x / softcap)
        x = softcap * z
    w = valid.float()
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == tc.clamp(min=0)[:, None]
    g = (torch.exp(x - lse[:, None]) - onehot.float() * w[:, None]) * (w / n_valid)[:, None]
    if z is not None:
        g = g * (1 - z * z)
    logits.copy_(g.to(logits.dtype))


@functools.cache
def _compiled_kernels():
    """The per-chunk softmax/gradient through ``torch.compile`` (inductor), built once per process
    on first use (~10 s): what ``compiled=True`` of the loss runs. The trainer asks for it together
    with ``train.compile``; results equal the eager path to float rounding (tests/test_loss.py)."""
    return torch.compile(_xent_stats, dynamic=False), torch.compile(_xent_grad_inplace, dynamic=False)


def _xent_grad_(logits, tc, valid, n_valid, softcap, compiled: bool = False) -> torch.Tensor:
    """Summed loss of a chunk; d(mean loss)/d(logits) is written over ``logits``."""
    if compiled:
        stats, grad = _compiled_kernels()
        lse, total = stats(logits, tc, valid, softcap)
        grad(logits, lse, tc, valid, n_valid, softcap)
        return total
    return _xent_grad_eager(logits, tc, valid, n_valid, softcap)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, targets, chunk, softcap, ignore_index, compiled):
        dtype = _compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            hc_all, bc = h.to(dtype), (b.to(dtype) if b is not None else None)
            wc = w
            if w.dtype != dtype:  # the head in the compute dtype, what autocast would cast it to
                wc = _scratch.take("w", w.shape, dtype, w.device).copy_(w)
            valid_all = targets != ignore_index
            n_valid = valid_all.sum().clamp(min=1).float()
            # a frozen head (LoRA / QLoRA on a tied embedding) needs no V x D gradient: skip it
            need_w = ctx.needs_input_grad[1]
            need_b = b is not None and ctx.needs_input_grad[2]
            grad_h = torch.empty_like(h)
            chunk = chunk or _default_chunk(dtype)
            one_chunk = h.shape[0] <= chunk
            low = dtype != torch.float32
            # the V x D gradient: accumulated in fp32 over chunks; with a single low-precision chunk
            # it is the one product itself, kept in its dtype until the backward casts it (each
            # pass over a V x D tensor costs ~20 ms on 2 cores at V = 50k, D = 384)
            grad_w = None
            if need_w and not (one_chunk and low):
                grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            # one logits buffer for every chunk, and the same one from step to step (_Scratch)
            rows = min(chunk, h.shape[0])
            buf = _scratch.take("logits", (rows, w.shape[0]), dtype, h.device)
            # the products of a low-precision step (bf16 under autocast) land in reused buffers and
            # are added into the fp32 gradients
            gh_buf = torch.empty(rows, h.shape[1], dtype=dtype, device=h.device) if low else None
            gw_buf = _scratch.take("grad_w", w.shape, dtype, w.device) if low and need_w else None
            for s in range(0, h.shape[0], chunk):
                hc, tc, valid = hc_all[s:s + chunk], targets[s:s + chunk], valid_all[s:s + chunk]
                n = hc.shape[0]
                g = buf[:n]  # the chunk's logits, then their gradient in the same memory
                if bc is None:
                    torch.mm(hc, wc.t(), out=g)
                else:
                    torch.addmm(bc, hc, wc.t(), out=g)
                total += _xent_grad_(g, tc, valid, n_valid, softcap, compiled)
                if not low:
                    torch.mm(g, wc, out=grad_h[s:s + chunk])
                    if grad_w is not None:
                        grad_w.addmm_(g.t(), hc)
                else:
                    grad_h[s:s + chunk] = torch.mm(g, wc, out=gh_buf[:n])
                    if need_w and one_chunk:
                        grad_w = torch.mm(g.t(), hc, out=gw_buf)
                    elif need_w:
                        grad_w += torch.mm(g.t(), hc, out=gw_buf)
                if grad_b is not None:
                    grad_b += g.float().sum(0)
            _scratch.give("logits", buf)
            if wc is not w:
                _scratch.give("w", wc)
            if gw_buf is not None and grad_w is not gw_buf:
                _scratch.give("grad_w", gw_buf)
        empty = torch.empty(0)
        ctx.save_for_backward(grad_h, grad_w if need_w else empty, grad_b if need_b else empty)
        ctx.need_w, ctx.need_b = need_w, need_b
        ctx.w_dtype = w.dtype
        # the single chunk's bf16 product is a scratch buffer: handed back once the backward has read it
        ctx.scratch_grad_w = need_w and grad_w is gw_buf
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gw = None
        if ctx.need_w:  # one pass when the cast already makes a fresh tensor
            gw = grad_w.to(ctx.w_dtype).mul_(grad_out) if grad_w.dtype != ctx.w_dtype else grad_w * grad_out
            if ctx.scratch_grad_w:
                _scratch.give("grad_w", grad_w)
        gb = (grad_b * grad_out).to(ctx.w_dtype) if ctx.need_b else None
        return grad_h * grad_out.to(grad_h.dtype), gw, gb, None, None, None, None, None


def _fused_apply(*args) -> torch.Tensor:
    """The fused loss as one call that ``torch.compile`` leaves out of its graph: its buffer pool
    and the gradient it writes in place are side effects dynamo cannot trace (compiling a whole
    model that computes its loss failed with "an intermediate tensor ... aliases an input"). A
    whole-model compile breaks its graph here; the loss runs its own compiled kernels
    (:func:`_compiled_kernels`, with ``compiled=True``)."""
    if torch.compiler.is_compiling():
        return (_DISABLED.get("apply") or _compile_disabled_apply())(*args)
    if "apply" not in _DISABLED and "torch._dynamo" in sys.modules:
        _compile_disabled_apply()  # made outside any trace when it can be: tracing the decorator
    return _FusedLinearCrossEntropy.apply(*args)  # itself costs another graph break and a warning


_DISABLED: dict = {}  # "apply": the loss under torch.compiler.disable, made on first need


def _compile_disabled_apply():
    """``torch.compiler.disable`` of the loss, made when it is first needed: the decorator imports
    ``torch._dynamo``, ~1.3 s that every ``evolm`` command would otherwise pay at start-up
    (``python -X importtime``), compiled or not."""
    fn = torch.compiler.disable(lambda *args: _FusedLinearCrossEntropy.apply(*args))
    _DISABLED["apply"] = fn
    return fn


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               bias: torch.Tensor | None = None, softcap: float | None = None,
                               ignore_index: int = -100, chunk: int | None = None,
                               compiled: bool = False) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T (+ bias)`` against ``targets``; h (N, D), targets (N,).

    ``chunk`` rows of logits at a time; by default 1024 in fp32 and 2048 in bf16 (the same bytes).
    ``compiled``: the training pass's per-chunk softmax/gradient through inductor (``KernelPolicy
    .compiled_loss``; the trainer's ``train.compile``)."""
    h = h.reshape(-1, h.shape[-1])
    targets = targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _fused_apply(h, weight, bias, targets, chunk, softcap, ignore_index, compiled)
    total, n = h.new_zeros((), dtype=torch.float32), (targets != ignore_index).sum().clamp(min=1)
    chunk = chunk or _default_chunk(_compute_dtype(h))
    for s in range(0, h.shape[0], chunk):
        logits, _ = _chunk_logits(h[s:s + chunk], weight, bias, softcap)
        total += F.cross_entropy(logits, targets[s:s + chunk], ignore_index=ignore_index, reduction="sum")
    return total / n


# ------------------------------------------------------------------------------------------
# per-token log-probabilities of given tokens, fused with the head (DPO, GRPO, scoring)
# ------------------------------------------------------------------------------------------
def _scaled_logits(h, w, b, softcap: float | None, temperature: float):
    """fp32 logits of a chunk as the sampler sees them: soft-capped, then divided by the temperature."""
    x, z = _chunk_logits(h, w, b, softcap)
    if temperature != 1.0:
        x = x / temperature
    return x, z


class _FusedLinearLogprobs(torch.autograd.Function):
    """log softmax(h @ W.T (+ b))[target] per row, chunk by chunk, with any upstream gradient.

    Unlike the mean loss above, the gradient of each token's log-probability is scaled by its own
    upstream gradient (DPO's sigmoid weights, GRPO's advantages), which is only known in the
    backward. So the forward keeps only each row's log-sum-exp (N floats) and the backward
    recomputes a chunk's logits (one extra matmul) instead of keeping N x vocab of them.
    """

    @staticmethod
    def forward(ctx, h, w, b, targets, chunk, softcap, temperature):
        dtype, hc_all, wc, bc = _cast(h, w, b)
        with torch.autocast(h.device.type, enabled=False):
            out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            lse_all = torch.empty_like(out)
            for s in range(0, h.shape[0], chunk):
                x, _ = _scaled_logits(hc_all[s:s + chunk], wc, bc, softcap, temperature)
                lse = torch.logsumexp(x, dim=-1)
                out[s:s + chunk] = x.gather(1, targets[s:s + chunk, None])[:, 0] - lse
                lse_all[s:s + chunk] = lse
        ctx.save_for_backward(h, w, b if b is not None else torch.empty(0), targets, lse_all)
        ctx.has_b, ctx.chunk, ctx.softcap, ctx.temperature, ctx.dtype = b is not None, chunk, softcap, temperature, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, w, b, targets, lse_all = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_b and ctx.needs_input_grad[2]
        chunk = ctx.chunk
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
        dtype = ctx.dtype
        hc_all, wc, bc = h.to(dtype), w.to(dtype), (b.to(dtype) if ctx.has_b else None)
        with torch.autocast(h.device.type, enabled=False):
            g_all = grad_out.float()
            for s in range(0, h.shape[0], chunk):
                hc, g = hc_all[s:s + chunk], g_all[s:s + chunk]
                x, z = _scaled_logits(hc, wc, bc, ctx.softcap, ctx.temperature)
                # d(x_t - lse)/dx = onehot(t) - softmax(x), times this row's upstream gradient
                G = x.sub_(lse_all[s:s + chunk, None]).exp_().mul_(-g[:, None])
                G.scatter_add_(1, targets[s:s + chunk, None], g[:, None])
                if ctx.temperature != 1.0:
                    G /= ctx.temperature
                if z is not None:
                    G *= 1 - z * z
                G = G.to(dtype)
                if grad_h is not None:
                    grad_h[s:s + chunk] = (G @ wc).to(h.dtype)
                if grad_w is not None:
                    grad_w += (G.t() @ hc).float()
                if grad_b is not None:
                    grad_b += G.float().sum(0)
        gw = grad_w.to(w.dtype) if need_w else None
        gb = grad_b.to(w.dtype) if need_b else None
        return grad_h, gw, gb, None, None, None, None


def fused_linear_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          bias: torch.Tensor | None = None, softcap: float | None = None,
                          temperature: float = 1.0, chunk: int = 512) -> torch.Tensor:
    """``log_softmax(softcap(h @ weight.T + bias) / temperature)[targets]``, fp32, shape of ``targets``.

    h (..., D), targets (...) of valid token ids. Never holds more than ``chunk x vocab`` logits,
    in the forward or the backward (a plain ``log_softmax`` keeps all of them for the backward:
    17 GB for a DPO batch of eight 768-token rows over SmolLM2's 49k vocabulary).
    """
    shape = targets.shape
    h2, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1).long()
    if torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad):
        return _FusedLinearLogprobs.apply(h2, weight, bias, t, chunk, softcap, temperature).view(shape)
    out = torch.empty(t.shape[0], dtype=torch.float32, device=h.device)
    _, hc, wc, bc = _cast(h2, weight, bias)
    for s in range(0, t.shape[0], chunk):
        x, _ = _scaled_logits(hc[s:s + chunk], wc, bc, softcap, temperature)
        out[s:s + chunk] = x.gather(1, t[s:s + chunk, None])[:, 0] - torch.logsumexp(x, dim=-1)
    return out.view(shape)
