"""Mamba: a selective state space as the mixer of a block (Gu & Dao 2023, arXiv:2312.00752).

Attention compares every token with every earlier one, so its cost and cache grow with the
context. A state-space layer instead carries the past in a fixed-size state, updated once per
token: per channel ``d`` and state index ``n``,

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t        y_t = C_t . h_t + D * u_t

(the zero-order-hold discretisation of ``h' = A h + B u``; B uses the simpler Euler step, as the
reference does). S4 kept ``dt, B, C`` fixed; Mamba's *selection* makes them functions of the input
(Sec. 3.2), so the layer can choose per token what to remember or forget -- the content-aware
reasoning that fixed (linear time-invariant) filters could not do. Around the scan (Fig. 3): an
input projection to two branches of width ``expand * d_model``, a causal depthwise convolution and
SiLU on one branch, the scan, then gating by SiLU of the other branch and an output projection.

Two computations give the same numbers:

- :func:`selective_scan`, over a whole sequence (training, prefill): the elementwise terms
  ``exp(dt A)`` and ``dt B u`` are computed for a chunk of tokens at once; only the recurrence
  itself steps through time, one fused multiply-add per token over a (B, d_inner, N) state, and
  the read-out ``C . h`` is one contraction per chunk. Chunks bound the memory of the expanded
  (T, d_inner, N) terms;
- :func:`selective_step`, one token from the cached state (decoding): O(1) time and memory per
  token, whatever the context.

The cache holds per layer the last ``d_conv - 1`` convolution inputs and the SSM state
``(B, d_inner, N)`` (``cache/state.py``). Padding: the conv input and the scan input of padded
tokens are zeroed (transformers' Mamba does the same at the block input), so a left-padded row's
state and outputs equal those of the row alone. Module names (``in_proj``, ``conv1d``, ``x_proj``,
``dt_proj``, ``A_log``, ``D``, ``out_proj``) are those of the reference checkpoints.

Jamba (Lieber et al. 2024, arXiv:2403.19887) adds RMSNorms on the low-rank step-size input and on
``B`` and ``C`` (``mamba_dt_b_c_norm``; ``dt_layernorm``, ``b_layernorm``, ``c_layernorm`` as in its
checkpoints): at scale its authors saw large activations and loss spikes inside the mixer, and
normalising these three internal activations removed them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from evolm.nn.norm import RMSNorm

SCAN_CHUNK = 64  # tokens whose expanded (d_inner, N) terms are held at once in the full-sequence scan
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4  # initial step sizes (the paper's Sec. 3.6 / reference init)


def selective_scan(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   h: torch.Tensor, chunk: int = SCAN_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over a sequence, in float32.

    ``u``, ``dt`` (batch, T, d_inner); ``A`` (d_inner, N); ``B``, ``C`` (batch, T, N); ``h`` the state
    before the first token (batch, d_inner, N). Returns ``y`` (batch, T, d_inner) without the skip
    term ``D * u``, and the state after the last token.
    """
    T = u.shape[1]
    ys = []
    for s in range(0, T, chunk):
        dt_c = dt[:, s:s + chunk]
        # time first, so that each step reads one contiguous (batch, d_inner, N) slice
        decay = torch.exp(dt_c.transpose(0, 1)[..., None] * A)                     # (L, b, d, N)
        drive = (dt_c * u[:, s:s + chunk]).transpose(0, 1)[..., None] * B[:, s:s + chunk].transpose(0, 1)[:, :, None]
        states = []
        for t in range(decay.shape[0]):
            h = torch.addcmul(drive[t], decay[t], h)
            states.append(h)
        ys.append(torch.einsum("lbdn,bln->bld", torch.stack(states), C[:, s:s + chunk]))
    return torch.cat(ys, dim=1), h


def selective_step(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence: ``u``, ``dt`` (batch, d_inner), ``B``, ``C`` (batch, N), ``h``
    (batch, d_inner, N) -> ``y`` (batch, d_inner) without the skip term, and the new state."""
    h = torch.addcmul((dt * u)[..., None] * B[:, None], torch.exp(dt[..., None] * A), h)
    return torch.bmm(h, C[..., None])[..., 0], h


class Mamba(nn.Module):
    """The Mamba mixer of layer ``layer_idx``, sized by the config's ``mamba_*`` fields."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.d_inner = c.mamba_expand * c.d_model
        self.d_state, self.d_conv, self.dt_rank = c.mamba_d_state, c.mamba_d_conv, c.mamba_dt_rank
        self.init_std, self.n_layers = c.init_std, c.n_layers
        di = self.d_inner
        self.in_proj = nn.Linear(c.d_model, 2 * di, bias=c.mamba_proj_bias)
        # depthwise: one filter of d_conv taps per channel; the causal padding is ours (cached state)
        self.conv1d = nn.Conv1d(di, di, c.mamba_d_conv, groups=di, bias=c.mamba_conv_bias)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * self.d_state, bias=False)  # dt (low rank), B, C
        self.dt_proj = nn.Linear(self.dt_rank, di, bias=True)
        self.A_log = nn.Parameter(torch.empty(di, self.d_state))  # A = -exp(A_log): a stable, real diagonal
        self.D = nn.Parameter(torch.empty(di))
        self.out_proj = nn.Linear(di, c.d_model, bias=c.mamba_proj_bias)
        if c.mamba_dt_b_c_norm:
            self.dt_layernorm = RMSNorm(self.dt_rank, c.norm_eps)
            self.b_layernorm = RMSNorm(self.d_state, c.norm_eps)
            self.c_layernorm = RMSNorm(self.d_state, c.norm_eps)
        self.dt_b_c_norm = c.mamba_dt_b_c_norm
        if not self.A_log.is_meta:
            self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """The reference initialisation of the SSM parameters (called by ``Transformer.reset_parameters``
        after the generic Linear init): S4D-real ``A = -(1..N)`` per channel (Gu et al. 2022,
        arXiv:2206.11893), ``D = 1``, step sizes log-uniform in [1e-3, 0.1] through the bias of
        ``dt_proj`` (inverse softplus), its weight uniform in +-dt_rank^-0.5; the output projection
        scaled by 1/sqrt(2 * n_layers) like every residual output."""
        N = self.d_state
        self.A_log.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(self.d_inner, N))
        self.D.fill_(1.0)
        bound = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
        dt = dt.clamp(min=DT_FLOOR)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        nn.init.normal_(self.out_proj.weight, 0.0, self.init_std / math.sqrt(2 * self.n_layers))

    def forward(self, x: torch.Tensor, rope=None, mask: torch.Tensor | None = None, is_causal: bool = True,
                cache=None) -> torch.Tensor:
        """``x`` (B, T, d_model) -> (B, T, d_model). ``mask``: (B, T) bool, False on padding tokens (or
        None); ``rope`` and ``is_causal`` are not used (order comes from the scan itself). With a
        ``cache``, the scan starts from the layer's cached state and stores the new one."""
        B, T, _ = x.shape
        prev = cache.state(self.layer_idx) if cache is not None else None
        keep = mask[..., None].to(x.dtype) if mask is not None else None
        u, z = self.in_proj(x).chunk(2, dim=-1)
        if keep is not None:  # padding never enters the convolution window or the state
            u = u * keep
        conv_prev = prev[0] if prev is not None else u.new_zeros(B, self.d_inner, self.d_conv - 1)
        u, conv_state = self._conv(u, conv_prev)
        u = F.silu(u)
        if keep is not None:
            u = u * keep
        dt, Bm, Cm = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.dt_b_c_norm:
            dt, Bm, Cm = self.dt_layernorm(dt), self.b_layernorm(Bm), self.c_layernorm(Cm)
        dt = F.softplus(self.dt_proj(dt).float())
        A = -torch.exp(self.A_log.float())
        uf = u.float()
        h = prev[1] if prev is not None else uf.new_zeros(B, self.d_inner, self.d_state)
        if T == 1 and prev is not None:
            y, h = selective_step(uf[:, 0], dt[:, 0], A, Bm[:, 0].float(), Cm[:, 0].float(), h)
            y = y[:, None]
        else:
            y, h = selective_scan(uf, dt, A, Bm.float(), Cm.float(), h)
        if cache is not None:
            cache.set_state(self.layer_idx, (conv_state, h))
        y = (y + uf * self.D.float()) * F.silu(z.float())
        return self.out_proj(y.to(x.dtype))

    def _conv(self, u: torch.Tensor, prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal depthwise convolution of ``u`` (B, T, d_inner), continuing from the ``prev`` inputs
        (B, d_inner, d_conv - 1; zeros at the start): returns the outputs (B, T, d_inner) and the last
        ``d_conv - 1`` inputs, the next call's ``prev``."""
        seq = torch.cat((prev.to(u.dtype), u.transpose(1, 2)), dim=-1)    # (B, d_inner, d_conv - 1 + T)
        if u.shape[1] == 1:  # decoding: one dot product of d_conv taps per channel
            out = (seq * self.conv1d.weight[:, 0]).sum(-1, keepdim=True)
            out = out + self.conv1d.bias[:, None] if self.conv1d.bias is not None else out
        else:
            out = F.conv1d(seq, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)
        return out.transpose(1, 2), seq[:, :, seq.shape[-1] - (self.d_conv - 1):].clone()  # not a view of seq
