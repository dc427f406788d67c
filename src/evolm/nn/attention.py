"""Causal self-attention: MHA, GQA and MQA, with the lineage's options.

- Multi-head attention (Vaswani et al. 2017, arXiv:1706.03762) as in GPT-2.
- Grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245): ``n_kv_heads`` < ``n_heads``
  key/value heads shared by groups of query heads; MQA (Shazeer 2019, arXiv:1911.02150) is
  ``n_kv_heads = 1``. The KV cache shrinks by ``n_heads / n_kv_heads``.
- QK-norm (Dehghani et al. 2023, arXiv:2302.05442): RMSNorm on queries and keys, per head
  (Qwen3, Gemma 3) or over the whole projection (OLMo 2), for training stability.
- Attention logit soft-capping (Gemma 2): ``cap * tanh(scores / cap)``.
- Sliding-window attention (Beltagy et al. 2020, arXiv:2004.05150; Mistral, Gemma 2/3): a
  local layer sees only the last ``sliding_window`` tokens; ``sliding_window_pattern`` interleaves
  local and global layers (Gemma 3: 5 local to 1 global). Llama 4's local layers see their own
  chunk of ``attention_chunk_size`` tokens instead (the mask is planned in ``nn/masks.py``).
- Llama 4's attention temperature tuning (Nakanishi 2025, "Scalable-Softmax Is Superior for
  Attention", arXiv:2501.19399): on its NoPE layers, queries at slot p are multiplied by
  ``log(floor((p + 1) / floor_scale) + 1) * attn_scale + 1``, so attention stays sharp over
  long contexts; and its RoPE layers L2-normalise queries and keys per head (``qk_norm="l2"``).

The score computation is ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels,
``is_causal`` so no mask is built) unless soft-capping needs the scores themselves. Which keys a
query may see (causal, bidirectional, window, padding, documents) is planned outside, in
``nn/masks.py``; the mask arrives as an argument.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from evolm.nn.fuse import fuse_linears
from evolm.nn.norm import make_norm
from evolm.nn.rope import apply_rope


# up to this many queries attention is two small matmuls (or the decode kernel), not a fused kernel
FEW_QUERIES = 4


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           is_causal: bool, scale: float, softcap: float | None = None, dropout: float = 0.0,
           decode_kernel: bool = False, loops: bool = True) -> torch.Tensor:
    """Scaled dot-product attention over (B, H, T, D) tensors; k/v may have fewer heads (GQA).
    ``mask``: bool (True: may attend) or an additive float mask (biases, -inf where masked).
    ``decode_kernel`` / ``loops``: the decode-time choices of :func:`_attend_few_queries`."""
    additive = mask is not None and mask.dtype != torch.bool  # T5's relative biases (nn/relative_position.py)
    if q.shape[2] <= FEW_QUERIES and not dropout and not additive:
        return _attend_few_queries(q, k, v, mask, is_causal, scale, softcap, decode_kernel, loops)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=is_causal, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if is_causal:
        tq, tk = scores.shape[-2:]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        probs = F.dropout(probs, dropout, training=True)
    return torch.matmul(probs, v)


def _attend_few_queries(q, k, v, mask, is_causal, scale, softcap, decode_kernel=False, loops=True):
    """Decode-time attention (a handful of queries): two small matmuls beat the fused kernels.

    Query heads that share a KV head are stacked as rows of one matmul, so GQA needs no copy of
    the keys and values. Inside a compiled CPU graph the two products are written as
    multiply-reduce loops instead (``_as_loops``): inductor fuses them with the scaling and the
    softmax into a few vectorized loops, where each small BLAS call costs tens of microseconds
    (``loops=False``: never); with evolm's kernels built (``decode_kernel``), one query per sequence goes to
    ``evolm_f::decode_attention`` instead (one pass over the keys, one over the values for all
    heads of a KV head, masked slots skipped; profiled per SmolLM2 layer in the int4 step: 45 us
    against inductor's 72 us for the loops with RoPE and cache writes fused in).
    """
    B, H, Tq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    loops = _as_loops(q, loops)
    if loops and decode_kernel and Tq == 1 and q.dtype == k.dtype == v.dtype and (mask is None or mask.shape[2] == 1):
        return torch.ops.evolm_f.decode_attention(q, k, v, mask, scale, softcap)
    qg = q.reshape(B, Hkv, G * Tq, D)
    if loops:
        scores = (qg[..., None, :].float() * k[:, :, None].float()).sum(-1) * scale
    else:
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if is_causal and Tq > 1:
        mask = torch.ones(Tq, S, dtype=torch.bool, device=q.device).tril(S - Tq)[None, None]
    if mask is not None:
        m = mask.expand(mask.shape[0], 1, Tq, S) if mask.shape[1] == 1 else mask
        m = m[:, :, None].expand(m.shape[0], 1, G, Tq, S).reshape(m.shape[0], 1, G * Tq, S)
        scores = scores.masked_fill(~m, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if loops:
        out = (probs[..., None] * v[:, :, None].float()).sum(-2).to(v.dtype)
    else:
        out = torch.matmul(probs.to(v.dtype), v)
    return out.view(B, H, Tq, v.shape[-1])


def temperature_scales(slots: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Llama 4's per-query temperature (float32) for absolute cache ``slots``: 1 up to slot
    ``floor_scale - 2``, then growing with the log of the slot."""
    return torch.log1p(torch.floor((slots.float() + 1.0) / floor_scale)) * attn_scale + 1.0


def query_slots(cache, T: int, device) -> torch.Tensor:
    """The absolute cache slots of the ``T`` new tokens (0.. without a cache): the positions
    Llama 4's temperature counts in (padding included, as transformers counts them)."""
    if cache is None:
        start = 0
    elif cache.static:
        start = cache.pos  # a tensor: the compiled decode step reads no Python int
    else:
        start = cache.length
    return start + torch.arange(T, device=device)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama 4's weightless QK-norm: RMS normalisation over the head dim, in float32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _as_loops(q: torch.Tensor, allowed: bool = True) -> bool:
    """Whether decode attention is written as multiply-reduce loops: inside a compiled CPU graph
    (``allowed=False``: never)."""
    return allowed and q.device.type == "cpu" and torch.compiler.is_compiling()


class Attention(nn.Module):
    """Causal self-attention with MHA/GQA/MQA, QK-norm, soft-capping, sliding windows and chunks,
    and Llama 4's query temperature."""

    # decode-time kernel choices (:func:`_attend_few_queries`), set on the layer by the compiled
    # decode step from its KernelPolicy (evolm.infer.compiled.use_attention_policy), never while tracing:
    # evolm_f::decode_attention (kernels/decode_attention.cpp) for one query per sequence, and
    # multiply-reduce loops inside a compiled CPU graph
    decode_kernel = False
    attn_loops = True
    # context parallelism (evolm/parallel/context.py) sets ``ring`` on the layer, from outside and only
    # for the forward passes it wraps: then this rank holds a shard of the sequence and the scores are
    # computed by ring attention across the group (``ring(layer, q, k, v)``), not by ``attend``
    ring = None

    def __init__(self, config, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=c.o_bias)
        self.qk_norm = c.layer_qk_norm(layer_idx)
        self.norm_eps = c.norm_eps
        self.temperature = (c.attn_floor_scale, c.attn_scale) if c.layer_temperature_tuned(layer_idx) else None
        if self.qk_norm == "head":
            self.q_norm, self.k_norm = make_norm(c, c.head_dim), make_norm(c, c.head_dim)
        elif self.qk_norm == "full":
            self.q_norm = make_norm(c, c.n_heads * c.head_dim)
            self.k_norm = make_norm(c, c.n_kv_heads * c.head_dim)
        self.scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
        self.softcap = c.attn_softcap
        self.window = c.layer_window(layer_idx)
        self.interleave = c.rope_interleave
        self.dropout = c.attn_dropout

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Inference only: one ``qkv_proj`` matmul instead of three (fewer, larger kernels per step).

        Replaces q_proj/k_proj/v_proj (so the state_dict changes); see ``Transformer.fuse_for_inference``.
        """
        if hasattr(self, "qkv_proj"):
            return
        projs = (self.q_proj, self.k_proj, self.v_proj)
        fused = fuse_linears(list(projs))
        if fused is None:  # layers that cannot be stacked (e.g. different quantized layouts) stay apart
            return
        self.qkv_proj = fused
        self.qkv_sizes = [p.out_features for p in projs]
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor | None, is_causal: bool,
                cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin, self.interleave), apply_rope(k, cos, sin, self.interleave)
        if self.qk_norm == "l2":  # after RoPE, as Llama 4 does it
            q, k = l2_norm(q, self.norm_eps), l2_norm(k, self.norm_eps)
        if self.temperature is not None:
            scales = temperature_scales(query_slots(cache, T, x.device), *self.temperature)
            q = (q * scales[:, None]).to(q.dtype)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if self.ring is not None:
            y = self.ring(self, q, k, v)
        else:
            y = attend(q, k, v, mask, is_causal, self.scale, self.softcap,
                       self.dropout if self.training else 0.0, self.decode_kernel, self.attn_loops)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
