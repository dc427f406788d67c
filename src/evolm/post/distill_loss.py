"""Logit distillation losses: forward KL, reverse KL and the generalized Jensen-Shannon divergence,
fused with the LM heads and computed chunk by chunk.

The generalized JSD of GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models",
arXiv:2306.13649, eq. 1) between the student's next-token distribution p_S and the teacher's p_T,
both softened by a temperature tau (logits / tau), with the mixture m = beta p_T + (1 - beta) p_S:

    JSD_beta = beta KL(p_T || m) + (1 - beta) KL(p_S || m)          (0 < beta < 1)
    beta = 0:  KL(p_T || p_S)   forward KL, the classic distillation loss (Hinton et al. 2015)
    beta = 1:  KL(p_S || p_T)   reverse KL, mode seeking

exactly as TRL's ``GKDTrainer.generalized_jsd_loss`` computes it (the two ends are special cases
there, not limits of the mixture formula), summed over the vocabulary, masked where the labels are
-100, and averaged over the valid tokens ("batchmean"; 0 when none is valid). tests/test_distill.py
checks values and gradients against TRL's function.

Why fused: a batch's logits are ``tokens x vocab`` per model; distillation needs both models' at
once, plus a handful of softmax intermediates, and their gradient. Here a chunk of rows of both
hidden states goes through both heads, the loss of those rows and its gradient with respect to the
student's logits are computed in closed form, the gradient is pushed through the student's head
(two matmuls) and the chunk is freed, as the fused cross-entropy of ``evolm.nn.loss`` does. Peak
memory is a few ``chunk x vocab`` buffers whatever the batch, and the result equals the unchunked
loss (tested). The gradient with respect to the student's logits x (u = x / tau, s = log p_S,
t = log p_T, l = log m; the softmax Jacobian turns dL/ds = g into dL/du = g - p_S sum(g)):

    beta = 0:  dL/du = p_S - p_T
    beta = 1:  dL/du = p_S (s - t - KL(p_S || p_T))
    else:      dL/du = p_S ((1 - beta)(s - l) - K),  K = (1 - beta) KL(p_S || m)

(the last because d l / d s = (1 - beta) p_S / m, and beta p_T + (1 - beta) p_S = m).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from evolm.nn.loss import _cast

IGNORE = -100
DEFAULT_CHUNK = 256  # rows of logits per chunk: ~8 fp32 buffers of 256 x 49,152 = 400 MB for SmolLM2


def check_beta_temperature(beta: float, temperature: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL, between: generalized JSD), "
                         f"got {beta}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def _softcapped(x: torch.Tensor, cap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if cap is None:
        return x, None
    z = torch.tanh(x / cap)
    return cap * z, z


def jsd_rows(student: torch.Tensor, teacher: torch.Tensor, beta: float, temperature: float,
             need_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row divergence of two (n, V) logit blocks, and its gradient w.r.t. ``student`` (or None).

    Computed in float32 (float64 stays float64). The gradient is of each row's own loss, unscaled.
    """
    dtype = torch.promote_types(student.dtype, torch.float32)
    u = student.to(dtype) / temperature
    v = teacher.to(dtype) / temperature
    s = torch.log_softmax(u, dim=-1)
    t = torch.log_softmax(v, dim=-1)
    del u, v
    p = s.exp()
    if beta == 0:
        q = t.exp()
        rows = (q * (t - s)).sum(-1)
        return rows, (p - q) / temperature if need_grad else None
    if beta == 1:
        d = s - t
        rows = (p * d).sum(-1)
        return rows, p * (d - rows[:, None]) / temperature if need_grad else None
    mix = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))  # log m
    ks = p * (s - mix)  # (1 - beta) KL(p_S || m), per entry
    kt = t.exp() * (t - mix)
    rows = beta * kt.sum(-1) + (1 - beta) * ks.sum(-1)
    if not need_grad:
        return rows, None
    k = (1 - beta) * ks.sum(-1, keepdim=True)
    return rows, ((1 - beta) * ks - p * k) / temperature


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         labels: torch.Tensor | None = None, beta: float = 0.5,
                         temperature: float = 1.0) -> torch.Tensor:
    """TRL's ``generalized_jsd_loss`` (batchmean) on given logits (..., V): the reference form, which
    holds all logits. Training uses :func:`fused_distill_loss`, which never does. Without labels
    every position counts (TRL then divides by the batch size instead of the token count)."""
    check_beta_temperature(beta, temperature)
    V = student_logits.shape[-1]
    x, y = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V)
    valid = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if labels is None \
        else labels.reshape(-1) != IGNORE
    return _JSDLogits.apply(x, y, valid, beta, temperature, torch.is_grad_enabled())


class _JSDLogits(torch.autograd.Function):
    """The divergence of logits with the closed-form gradient above (no autograd graph of the softmaxes)."""

    @staticmethod
    def forward(ctx, x, y, valid, beta, temperature, grad):
        rows, g = jsd_rows(x, y, beta, temperature, need_grad=grad and ctx.needs_input_grad[0])
        n = valid.sum().clamp(min=1)
        w = valid.to(rows.dtype)
        if g is not None:
            ctx.save_for_backward(g * (w / n)[:, None])
        return (rows * w).sum() / n

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return (g * grad_out).to(g.dtype), None, None, None, None, None


class _FusedDistill(torch.autograd.Function):
    """mean over valid rows of JSD(h_s W_s^T + b_s, h_t W_t^T + b_t), a chunk of rows at a time.

    Like ``nn.loss``'s fused cross-entropy, the forward already computes the gradients with
    respect to h_s, W_s and b_s (the loss is a scalar: the backward only scales them), so no chunk
    of logits is kept or recomputed. The teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, valid, beta, temperature, caps, chunk, grad):
        # needs_input_grad is set under no_grad too: ``grad`` (is_grad_enabled at the call) says
        # whether a backward can follow, so evaluation computes the loss alone
        need_h, need_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        need_b = grad and b_s is not None and ctx.needs_input_grad[2]
        dtype, hs_all, ws, bs = _cast(h_s, w_s, b_s)
        _, ht_all, wt, bt = _cast(h_t, w_t, b_t)
        n_valid = valid.sum().clamp(min=1)
        acc = torch.promote_types(dtype, torch.float32)
        with torch.autocast(h_s.device.type, enabled=False):
            total = torch.zeros((), dtype=acc, device=h_s.device)
            grad_h = torch.zeros_like(h_s) if need_h else None
            grad_w = torch.zeros(w_s.shape, dtype=acc, device=w_s.device) if need_w else None
            grad_b = torch.zeros(w_s.shape[0], dtype=acc, device=w_s.device) if need_b else None
            for a in range(0, h_s.shape[0], chunk):
                ok = valid[a:a + chunk]
                if not bool(ok.any()):
                    continue
                hs = hs_all[a:a + chunk]
                x, z = _softcapped(F.linear(hs, ws, bs), caps[0])
                with torch.no_grad():
                    y, _ = _softcapped(F.linear(ht_all[a:a + chunk], wt, bt), caps[1])
                rows, g = jsd_rows(x, y, beta, temperature, need_grad=need_h or need_w or need_b)
                del y
                w = ok.to(rows.dtype)
                total += (rows * w).sum()
                if g is None:
                    continue
                g *= (w / n_valid)[:, None]
                if z is not None:
                    g *= 1 - z.to(g.dtype) ** 2  # d(cap tanh(x / cap)) / dx
                g = g.to(dtype)
                if grad_h is not None:
                    grad_h[a:a + chunk] = (g @ ws).to(h_s.dtype)
                if grad_w is not None:
                    grad_w += (g.t() @ hs).to(acc)
                if grad_b is not None:
                    grad_b += g.to(acc).sum(0)
        empty = torch.empty(0)
        ctx.save_for_backward(*(t if t is not None else empty for t in (grad_h, grad_w, grad_b)))
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.w_dtype = w_s.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = ctx.saved_tensors
        has_h, has_w, has_b = ctx.has
        return (gh * grad_out.to(gh.dtype) if has_h else None,
                (gw * grad_out).to(ctx.w_dtype) if has_w else None,
                (gb * grad_out).to(ctx.w_dtype) if has_b else None,
                None, None, None, None, None, None, None, None, None)


def fused_distill_loss(h_student: torch.Tensor, w_student: torch.Tensor, h_teacher: torch.Tensor,
                       w_teacher: torch.Tensor, labels: torch.Tensor | None = None, *,
                       b_student: torch.Tensor | None = None, b_teacher: torch.Tensor | None = None,
                       beta: float = 0.5, temperature: float = 1.0, student_softcap: float | None = None,
                       teacher_softcap: float | None = None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The generalized JSD (batchmean over tokens whose label is not -100) of the student's logits
    ``h_student @ w_student.T (+ b)`` from the teacher's, never holding more than ``chunk`` rows of
    logits. Hidden states (..., D_s) and (..., D_t) may differ in width; the vocabularies must match.
    ``*_softcap``: Gemma-2-style final logit soft-capping of each model."""
    check_beta_temperature(beta, temperature)
    if w_student.shape[0] != w_teacher.shape[0]:
        raise ValueError(f"student head has {w_student.shape[0]} outputs, teacher head {w_teacher.shape[0]}: "
                         f"distillation needs one vocabulary")
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    hs = h_student.reshape(-1, h_student.shape[-1])
    ht = h_teacher.reshape(-1, h_teacher.shape[-1])
    if hs.shape[0] != ht.shape[0]:
        raise ValueError(f"student has {hs.shape[0]} positions, teacher {ht.shape[0]}")
    valid = torch.ones(hs.shape[0], dtype=torch.bool, device=hs.device) if labels is None \
        else labels.reshape(-1).to(hs.device) != IGNORE
    return _FusedDistill.apply(hs, w_student, b_student, ht.detach(), w_teacher.detach(),
                               b_teacher.detach() if b_teacher is not None else None, valid, beta, temperature,
                               (student_softcap, teacher_softcap), chunk, torch.is_grad_enabled())


__all__ = ["IGNORE", "DEFAULT_CHUNK", "check_beta_temperature", "jsd_rows", "generalized_jsd_loss",
           "fused_distill_loss"]
