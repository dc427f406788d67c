"""Mamba-2: a selective state space mixer computed by state space duality (SSD).

Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality" (arXiv:2405.21060). Mamba (Gu & Dao 2023) gives each channel a
diagonal state matrix A, which only a sequential scan computes well. Mamba-2 restricts A to a
*scalar times the identity* per head: the state of head h evolves as

    h_t = exp(dt_t * A_h) * h_{t-1} + dt_t * x_t B_t^T      (P x N: head_dim x state_size)
    y_t = h_t C_t + D_h * x_t

With a scalar decay the whole map x -> y is a lower-triangular matrix
``M[t, s] = C_t . B_s * exp(sum_{s<k<=t} dt_k A)`` (a 1-semiseparable mask times ``C B^T``): the
same as causal linear attention with a decaying mask. SSD computes it in chunks of ``chunk_size``
tokens: inside a chunk as that masked "attention" (matrix multiplies), across chunks by passing a
state from chunk to chunk (the paper's Listing 1, steps 1-4). Training and prefill use the chunks;
decoding uses the recurrence above, one token at a time, with a state whose size does not depend
on the sequence length.

The layer (the paper's Figure 6, transformers' ``Mamba2Mixer``): one input projection gives the
gate ``z``, the SSM input ``x``, ``B`` and ``C`` (``mamba_n_groups`` groups shared by the heads, like
GQA's K/V groups) and one ``dt`` per head; a causal depthwise convolution and SiLU run over
``x, B, C`` together; the SSM runs per head; then a gated RMSNorm (``norm(y * silu(z))``, per
group, the order transformers and the released checkpoints use) and the output projection.

Switched on by ``attention: mamba2``; sizes come from the ``mamba_*`` fields of ``ModelConfig``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class GatedRMSNorm(nn.Module):
    """RMSNorm of ``y * silu(z)`` over groups of ``group_size`` channels (Mamba-2's output norm:
    normalising after the gate keeps the scale of the gated output in check; one group per B/C
    group, so a tensor-parallel split by groups needs no communication)."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        h = y.float() * F.silu(z.float())
        g = h.view(*h.shape[:-1], -1, self.group_size)  # view, not unflatten: no graph break under torch.compile
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.flatten(-2).to(dtype)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T): ``out[..., t, s] = a[s+1] + ... + a[t]`` for s <= t, -inf above.

    ``exp`` of it is the decay from position s to t. Summing the masked increments (rather than
    subtracting two cumulative sums, as the paper's listing does) keeps small differences exact in
    float32, and the -inf entries give zero weights and zero gradients."""
    T = a.shape[-1]
    keep = torch.ones(T, T, dtype=torch.bool, device=a.device)
    x = a[..., :, None].expand(*a.shape, T).masked_fill(~keep.tril(-1), 0)  # x[k, s] = a[k] for k > s
    out = x.cumsum(-2)  # out[t, s] = sum of a[k] over s < k <= t
    return out.masked_fill(~keep.tril(0), -torch.inf)


def ssd_chunked(x: torch.Tensor, a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk: int,
                state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan in chunks (the paper's Section 6 and Listing 1), in the dtype of ``x``.

    ``x`` (b, t, g, r, p): inputs already scaled by dt, heads split as (groups g, heads per group r);
    ``a`` (b, t, g, r): log decays ``dt * A`` (<= 0); ``B``, ``C`` (b, t, g, n): one per group, so
    ``C B^T`` is computed once per group and not once per head; ``state`` (b, g, r, p, n): the state
    before the first token (None: zeros). Returns y (b, t, g, r, p) and the state after the last token.

    1. inside each chunk, ``y = (C B^T * decay mask) x``: a masked attention of ``chunk`` tokens;
    2. each chunk's own contribution to the state at its end;
    3. the states passed from chunk to chunk (a short loop over ``t / chunk`` chunks: the paper's
       state passing, which its kernel also runs sequentially);
    4. each position reads the state its chunk started from, decayed up to it.
    """
    b, t, g, r, p = x.shape
    pad = -t % chunk
    if pad:  # zero inputs with zero log decay leave every state as it is
        x, a, B, C = (F.pad(v, (0, 0) * (v.ndim - 2) + (0, pad)) for v in (x, a, B, C))
    c = x.shape[1] // chunk
    x, a, B, C = (v.reshape(b, c, chunk, *v.shape[2:]) for v in (x, a, B, C))  # (b, c, l, ...)
    a_cum = a.cumsum(2)  # (b, c, l, g, r)
    # 1. intra-chunk: decay from s to l, (b, c, g, r, l, s)
    decay = torch.exp(segsum(a.permute(0, 1, 3, 4, 2)))
    scores = torch.einsum("bclgn,bcsgn->bcgls", C, B)[:, :, :, None] * decay
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", scores, x)
    # 2. each chunk's state at its end: inputs decayed from their position to the chunk's end
    to_end = torch.exp(a_cum[:, :, -1:] - a_cum)  # (b, c, l, g, r)
    chunk_states = torch.einsum("bclgn,bclgrp->bcgrpn", B, x * to_end[..., None])
    # 3. state passing: the state each chunk starts from
    chunk_decay = torch.exp(a_cum[:, :, -1])[..., None, None]  # (b, c, g, r, 1, 1)
    h = x.new_zeros(b, g, r, p, B.shape[-1]) if state is None else state.to(x.dtype)
    starts = []
    for k in range(c):
        starts.append(h)
        h = h * chunk_decay[:, k] + chunk_states[:, k]
    starts = torch.stack(starts, 1)  # (b, c, g, r, p, n)
    # 4. the start state read by C, decayed from the chunk's start to each position
    y = y + torch.einsum("bclgn,bcgrpn->bclgrp", C, starts) * torch.exp(a_cum)[..., None]
    return y.flatten(1, 2)[:, :t], h


def ssd_step(x: torch.Tensor, a: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence: x (b, g, r, p) scaled by dt, a (b, g, r), B and C (b, g, n),
    ``state`` (b, g, r, p, n). Returns y (b, g, r, p) and the new state."""
    state = state * torch.exp(a)[..., None, None] + x[..., None] * B[:, :, None, None, :]
    return torch.einsum("bgrpn,bgn->bgrp", state, C), state


class Mamba2(nn.Module):
    """The Mamba-2 mixer; parameter names are transformers' (``in_proj``, ``conv1d``, ``dt_bias``,
    ``A_log``, ``D``, ``norm``, ``out_proj``), so checkpoints load by renaming only the block."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.d_inner = c.mamba_expand * c.d_model
        self.head_dim = c.mamba_d_head
        self.n_heads = self.d_inner // self.head_dim
        self.n_groups, self.state_size = c.mamba_n_groups, c.mamba_d_state
        self.chunk_size, self.kernel = c.mamba_chunk_size, c.mamba_d_conv
        self.dt_limit = tuple(c.mamba_dt_limit) if c.mamba_dt_limit is not None else None
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.state_size
        self.in_proj = nn.Linear(c.d_model, self.d_inner + self.conv_dim + self.n_heads, bias=c.mamba_proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim,
                                padding=self.kernel - 1, bias=c.mamba_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.n_groups, c.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, c.d_model, bias=c.mamba_proj_bias)
        self._dt_init = (c.mamba_dt_min, c.mamba_dt_max, c.mamba_dt_floor)
        if not self.A_log.is_meta:
            self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """The paper's initialisation: A_h = -h (h = 1..H, decays spread over the heads), D = 1, and
        dt drawn log-uniformly in [dt_min, dt_max] (at least dt_floor), stored through softplus's inverse."""
        H = self.n_heads
        self.A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        lo, hi, floor = self._dt_init
        dt = torch.exp(torch.rand(H) * (math.log(hi) - math.log(lo)) + math.log(lo)).clamp(min=floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    # ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, rope=None, mask: torch.Tensor | None = None, is_causal: bool = True,
                cache=None) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). ``mask``: a recurrent mixer's plan (``nn/masks.py``),
        which new tokens are real, (B, T) bool, or None when all are. Padding tokens are zeroed before
        the projection (as transformers does), before the convolution (so projection biases do not
        leak into it either) and after it, so they add nothing to the state: a left-padded row
        gives the outputs of the unpadded one. ``rope`` and ``is_causal``
        are the attention mixers' arguments; an SSM reads no positions and is causal by construction.
        ``cache``: the layer's (conv, SSM) states are read with ``cache.state`` and stored with
        ``cache.set_state`` (``cache/state.py``); one new token takes the recurrent step."""
        valid = None if mask is None else mask[..., None]
        if valid is not None:  # transformers zeroes the block input; with in_proj biases the conv input too
            x = x * valid.to(x.dtype)
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        if valid is not None:
            xBC = xBC * valid.to(xBC.dtype)
        conv_state, ssm_state = (None, None) if cache is None else (cache.state(self.layer_idx) or (None, None))
        step = cache is not None and x.shape[1] == 1
        xBC, conv_state = self._conv(xBC, conv_state, step)
        if valid is not None:
            xBC = xBC * valid.to(xBC.dtype)
        GN = self.n_groups * self.state_size
        xs, Bm, Cm = xBC.split([self.d_inner, GN, GN], dim=-1)
        y, ssm_state = self._ssm(xs, Bm, Cm, dt, ssm_state, step)
        if cache is not None:
            cache.set_state(self.layer_idx, (conv_state, ssm_state))
        return self.out_proj(self.norm(y.to(x.dtype), z))

    def _conv(self, xBC: torch.Tensor, conv_state: torch.Tensor | None,
              step: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise convolution + SiLU over (B, T, conv_dim); the state is the last
        ``kernel - 1`` inputs (B, conv_dim, kernel - 1), zeros before the first token (the padding
        the convolution assumes). One decoding token is one dot product with the window."""
        u = xBC.transpose(1, 2)  # (B, conv_dim, T)
        T, K = u.shape[-1], self.kernel
        if conv_state is None:
            conv_state = u.new_zeros(u.shape[0], self.conv_dim, K - 1)
        full = torch.cat((conv_state.to(u.dtype), u), dim=-1)  # (B, conv_dim, K - 1 + T)
        if step:
            out = (full * self.conv1d.weight[:, 0]).sum(-1, keepdim=True)
            if self.conv1d.bias is not None:
                out = out + self.conv1d.bias[:, None]
        else:
            out = F.conv1d(full, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)
        return F.silu(out).transpose(1, 2), full[..., full.shape[-1] - (K - 1):]

    def _ssm(self, xs, Bm, Cm, dt, state, step: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The selective SSM of every head: dt = softplus(dt + dt_bias) (clamped to the time step
        limit), A = -exp(A_log), the D skip; in float32. The chunked scan, or one recurrent step
        when decoding. Returns y (B, T, d_inner) and the state after the last token."""
        Bsz, T, _ = xs.shape
        g, n, p = self.n_groups, self.state_size, self.head_dim
        r = self.n_heads // g
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if self.dt_limit is not None:
            dt = dt.clamp(*self.dt_limit)
        A = -torch.exp(self.A_log.float())
        x = xs.float().view(Bsz, T, g, r, p)
        Bg, Cg = Bm.float().view(Bsz, T, g, n), Cm.float().view(Bsz, T, g, n)
        a = (dt * A).view(Bsz, T, g, r)
        xdt = x * dt.view(Bsz, T, g, r, 1)
        if step:
            if state is None:
                state = x.new_zeros(Bsz, g, r, p, n)
            y, state = ssd_step(xdt[:, 0], a[:, 0], Bg[:, 0], Cg[:, 0], state)
            y = y[:, None]
        else:
            y, state = ssd_chunked(xdt, a, Bg, Cg, self.chunk_size, state)
        y = y + x * self.D.float().view(g, r, 1)
        return y.reshape(Bsz, T, self.d_inner), state
