"""Hyena: implicit long convolutions and data-controlled gates in place of attention.

Poli et al. 2023, "Hyena Hierarchy: Towards Larger Convolutional Language Models"
(arXiv:2302.10866). Attention costs O(T^2) in the context; Hyena mixes positions with long
convolutions computed by FFT in O(T log T), and recovers the data dependence attention has through
elementwise gates. A Hyena operator of order N (the paper's Definition 3.1 and Algorithms 1-3):

1. **Projection** (Alg. 1): a linear map of the input to N + 1 streams ``x^1 .. x^N, v``, each then
   passed through a short depthwise causal convolution (``hyena_short_conv`` taps), so every stream
   already mixes a few neighbouring tokens.
2. **Implicit filters** (Alg. 2): the N long filters ``h^n`` (one per channel, as long as the
   context) are not free parameters but the output of a small MLP over positional features of t --
   t itself and the real and imaginary parts of complex exponentials ``exp(-i f 2 pi t / L)`` -- with
   sine activations (an FFN that can represent high frequencies, as in SIREN), multiplied by an
   exponentially decaying window whose rate differs per channel: some channels look far back, some
   only near. The filter's parameter count is independent of the context length.
3. **Recurrence** (Alg. 3): ``z^1 = v``; ``z^{n+1}_t = x^n_t * ((h^n * z^n)_t + D^n z^n_t)``; the output
   ``z^{N+1}`` goes through an output projection. ``*`` is a causal convolution, ``D^n`` a learned
   per-channel skip (the "bias" of the paper's code), and the products with ``x^n`` are the
   data-controlled gates.

The long convolution is computed with the FFT, zero-padded to 2T so that the circular convolution
equals the linear, causal one (``fft_causal_conv``). This follows the paper's equations: order N has N
filters. (The authors' code, safari's ``HyenaOperator``, gates ``v`` with one stream before its
first convolution and so uses N - 1 filters for its ``order=N``.)

Decoding: a causal convolution's output at step t reads every earlier input of that convolution
(up to ``max_seq_len`` back: the filters' span), so the cache keeps, per layer, the last
``max_seq_len`` inputs ``z^n`` of each long convolution (N x d_model x max_seq_len numbers per
sequence, as a KV cache preallocated to the context) and the last ``hyena_short_conv - 1`` projected
inputs of the short convolution: a recurrent state of fixed size (``cache/state.py``). A new token
costs a dot product per channel with the reversed filter: O(L d) per token and order, like
attention's read of its keys. The filters themselves, the same for every sequence, are generated
once while the weights stay unchanged, not per token. Padding tokens (``attention_mask`` 0) are
zeroed where they enter the short and the long convolutions, so a left-padded row gives the outputs
its unpadded tokens would.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def fft_causal_conv(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``y_t = sum_{s <= t} h_{t-s} z_s`` along the last axis, by FFT: z (..., C, T), h (C, L); a filter
    shorter than T is zero beyond its L lags.

    Both are zero-padded to 2T, where the circular convolution of the FFT equals the linear one,
    and the first T outputs are the causal ones. Computed in float32 (torch's CPU FFT has no bf16)."""
    T = z.shape[-1]
    n = 2 * T
    zf = torch.fft.rfft(z.float(), n=n)
    hf = torch.fft.rfft(h[..., :T].float(), n=n)
    return torch.fft.irfft(zf * hf, n=n)[..., :T].to(z.dtype)


def positional_features(length: int, emb: int, l_max: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (length, emb), t (length, 1)): Hyena's positional embedding of positions 0..length-1
    of a context of ``l_max``. ``t`` is the position scaled to [0, 1] over ``l_max``; the features are
    t, then the real and imaginary parts of ``exp(-i f 2 pi p / l_max)`` for ``(emb - 1) / 2``
    frequencies f from 0 to bands - 1 (the paper's Sec. 3.3 and code). Fixed by the config, so a
    position's features never depend on the length of the call."""
    bands = (emb - 1) // 2
    p = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    t = p / max(l_max - 1, 1)
    f = torch.linspace(1e-4, bands - 1, bands, device=device)[None, :]
    w = 2 * math.pi * p / l_max
    return torch.cat((t, torch.cos(f * w), -torch.sin(f * w)), dim=-1), t


class Sine(nn.Module):
    """``sin(freq * x)`` with a learned frequency per feature: the filter MLP's activation."""

    def __init__(self, dim: int, freq: float):
        super().__init__()
        self.init_freq = freq
        self.freq = nn.Parameter(torch.full((dim,), float(freq)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class HyenaFilter(nn.Module):
    """The N implicit long filters of one layer: FFN(positional features) * exponential window.

    The model's GPT-2 initialisation (N(0, 0.02) on every Linear) would flatten the sine MLP to a
    near-zero filter, so the model calls this module's own initialisation afterwards, by the hook it
    calls on state-space mixers (``reset_ssm_parameters``)."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.order, self.d_model, self.l_max = c.hyena_order, c.d_model, c.max_seq_len
        self.emb = c.hyena_filter_emb
        w = c.hyena_filter_width
        layers: list[nn.Module] = [nn.Linear(self.emb, w), Sine(w, c.hyena_filter_freq)]
        for _ in range(c.hyena_filter_depth):
            layers += [nn.Linear(w, w), Sine(w, c.hyena_filter_freq)]
        layers.append(nn.Linear(w, self.order * self.d_model, bias=False))
        self.mlp = nn.Sequential(*layers)
        # D^n, the per-channel skip of each order (the paper code's filter "bias")
        self.skip = nn.Parameter(torch.empty(self.order, self.d_model))
        # the window's decay rates, one per channel from slow to fast: exp(-rate * t) falls to
        # `target` at t = slow (resp. fast) fractions of max_seq_len; fixed by the config, not learned
        log_target = math.log(c.hyena_decay_target)
        self.rates = (abs(log_target / c.hyena_decay_slow), abs(log_target / c.hyena_decay_fast))
        self._memo: tuple | None = None

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                m.reset_parameters()  # PyTorch's default (Kaiming-uniform), as the paper's code leaves it
            else:
                m.freq.fill_(m.init_freq)
        nn.init.normal_(self.skip)

    def forward(self, length: int) -> torch.Tensor:
        """The filters over positions 0..length-1: (N, d_model, length), float32."""
        if length > self.l_max:
            raise ValueError(f"Hyena: {length} positions exceed max_seq_len={self.l_max}, the span of "
                             f"its implicit filters")
        z, t = positional_features(length, self.emb, self.l_max, self.skip.device)
        h = self.mlp(z.to(self.mlp[0].weight.dtype)).float()  # (length, N * d)
        decay = torch.linspace(*self.rates, self.d_model, device=h.device)
        h = h * torch.exp(-t * decay.repeat(self.order))
        return h.T.reshape(self.order, self.d_model, length)

    def inference_filters(self) -> torch.Tensor:
        """The filters over all ``max_seq_len`` positions, generated once while the weights stay as
        they are (no autograd, and every parameter's version and storage unchanged): decoding then
        costs a dot product per channel, not an MLP over the context per token."""
        return self._inference()[0]

    def reversed_inference_filters(self) -> torch.Tensor:
        """:meth:`inference_filters` reversed along positions, contiguous: a decode step's
        ``sum_j h[j] z_{t-j}`` over the state's window (newest input last) is one dot product with it."""
        return self._inference()[1]

    def _inference(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in self.parameters())
        if self._memo is None or self._memo[0] != key:
            h = self(self.l_max)
            self._memo = (key, h, h.flip(-1).contiguous())
        return self._memo[1], self._memo[2]


class Hyena(nn.Module):
    """A Hyena operator of order ``hyena_order`` as a mixer: ``mixer(x, rope, mask, is_causal, cache)``.

    ``rope`` is ignored (the filters carry position); ``mask`` is what ``nn/masks.py`` plans for a
    recurrent layer, the validity of the new tokens ((B, T) bool, None: all real); ``is_causal`` is
    implied. With a cache, the layer's recurrent state (``cache.state(layer)``, ``cache/state.py``) is
    ``(conv, z^1, .., z^N)``: the short convolution's last ``taps - 1`` inputs (B, (N+1) d, taps - 1)
    and the last ``max_seq_len`` inputs of each long convolution (B, d, max_seq_len), newest last,
    zeros before the first token. The state has a fixed size and holds no position, so every cache
    kind keeps it as it keeps Mamba's (rows of different lengths decoded together included); the
    filters span ``max_seq_len`` lags, so that window is all a convolution can read."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.order, self.d_model, self.taps = c.hyena_order, c.d_model, c.hyena_short_conv
        width = (self.order + 1) * c.d_model
        self.in_proj = nn.Linear(c.d_model, width, bias=True)
        # depthwise, causal: padded on the left by hand (taps - 1), so that a cache can supply the past
        self.short_conv = nn.Conv1d(width, width, self.taps, groups=width, bias=True)
        self.filter = HyenaFilter(c)
        self.o_proj = nn.Linear(c.d_model, c.d_model, bias=True)

    def forward(self, x: torch.Tensor, rope=None, mask: torch.Tensor | None = None, is_causal: bool = True,
                cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        valid = new_token_valid(mask, x.dtype)  # (B, 1, T) or None
        u = self.in_proj(x).transpose(1, 2)  # (B, (N+1) d, T)
        if valid is not None:
            u = u * valid
        conv, past = self._read_state(cache, B, x)
        u, conv = self._short_conv(u, conv)
        if valid is not None:
            u = u * valid
        *gates, z = u.split(self.d_model, dim=1)
        h = self._filters(T, cache)
        skip = self.filter.skip.to(z.dtype)
        kept = []
        for n in range(self.order):
            if past is None or past[n] is None:  # no cache, or an empty one: the call alone
                y = fft_causal_conv(z, h[n])
                if past is not None:
                    kept.append(self._window(z))
            else:
                y, window = self._cached_conv(z, past[n], h[n], n)
                kept.append(window)
            z = gates[n] * (y + skip[n, :, None] * z)
        if cache is not None:
            cache.set_state(self.layer_idx, (conv, *kept))
        return self.o_proj(z.transpose(1, 2))

    def _filters(self, T: int, cache) -> torch.Tensor:
        """Training: the filters over this call's T positions (what the gradient needs; past
        ``max_seq_len`` lags a filter is zero); with a cache or without autograd: over all positions
        (a cache reads back further than the call)."""
        if not torch.is_grad_enabled():
            return self.filter.inference_filters()
        return self.filter(min(T, self.filter.l_max) if cache is None else self.filter.l_max)

    def _read_state(self, cache, B: int, x: torch.Tensor):
        """(conv, (z^1 .. z^N windows)) of earlier calls; an empty cache gives a zero conv state and no
        windows ([None] * N: the call convolves alone); (None, None) without a cache."""
        if cache is None:
            return None, None
        if cache.static:
            raise ValueError("attention='hyena' does not decode with a static (compiled) cache; "
                             "generate without compile")
        state = cache.state(self.layer_idx)
        if state is None:
            conv = x.new_zeros(B, (self.order + 1) * self.d_model, self.taps - 1)
            return conv, [None] * self.order
        return state[0], state[1:]

    def _short_conv(self, u: torch.Tensor, past: torch.Tensor | None):
        """The depthwise causal short convolution of u (B, C, T); its left context is ``past``, the
        last ``taps - 1`` inputs of earlier calls (zeros at the start). Returns (output, new past)."""
        k = self.taps - 1
        if past is None:
            past = u.new_zeros(*u.shape[:2], k)
        full = torch.cat((past.to(u.dtype), u), dim=-1)
        return self.short_conv(full), full[..., full.shape[-1] - k:]

    def _window(self, z: torch.Tensor) -> torch.Tensor:
        """The state's window after a first call's inputs z (B, d, T): the last ``max_seq_len``, zeros before."""
        L, T = self.filter.l_max, z.shape[-1]
        return F.pad(z, (L - T, 0)) if T < L else z[..., T - L:].contiguous()

    def _cached_conv(self, z: torch.Tensor, window: torch.Tensor, h: torch.Tensor, n: int):
        """``(h^n * z)_t`` for the T new inputs z (B, d, T) after the stored ``window`` (B, d, L) of
        earlier ones; returns it and the new window. One new token: a dot product per channel with
        the filter reversed (``sum_j h[j] z_{t-j}``, O(L d)); several: an FFT over window and call."""
        L, T = window.shape[-1], z.shape[-1]
        full = torch.cat((window.to(z.dtype), z), dim=-1)
        if T == 1:
            rev = self.filter.reversed_inference_filters()[n] if not torch.is_grad_enabled() \
                else h.flip(-1)
            y = torch.linalg.vecdot(full[..., 1:].float(), rev)[..., None].to(z.dtype)
        else:
            y = fft_causal_conv(full, h)[..., L:]
        return y, full[..., T:]


def new_token_valid(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, 1, T): 1 for real tokens, 0 for padding, from a recurrent layer's plan (``nn/masks.py``:
    the validity of the new tokens, (B, T) bool; None: all real)."""
    return None if mask is None else mask[:, None, :].to(dtype)
