"""Cross-attention: the decoder's queries read the encoder's output (Vaswani et al. 2017,
arXiv:1706.03762, sec. 3.2.3; T5, arXiv:1910.10683; BART, arXiv:1910.13461).

An encoder-decoder's decoder block has a third sub-layer between self-attention and the MLP:
queries come from the decoder's stream, keys and values from the encoder's final states, and a
query may see every real (non-padding) encoder token. The keys and values depend only on the
encoder output, so they are computed once per request and kept (``evolm.cache.CrossCache``):
decoding a token then costs one query projection and one attention read per layer.

It is ``Attention`` with another source for k and v: the same projections (``q_proj`` ..
``o_proj``), the same scaling (T5: none) and the same score kernel; no positions, no window.
A vision model's cross-attention layers (Llama 3.2 Vision) read the projected image states the
same way, with an RMSNorm on each head of the queries and keys (``qk_norm="head"``), and a mask
per text token (which images it may see) that the ``CrossCache`` view of the call carries.
"""

from __future__ import annotations

import torch

from evolm.nn.attention import Attention, attend
from evolm.nn.norm import make_norm


class CrossAttention(Attention):
    """Attention from the decoder's tokens to the encoder's output held by a ``CrossCache``."""

    def __init__(self, config, layer_idx: int, qk_norm: str | None = None):
        """``qk_norm="head"``: RMSNorm over each head's queries and keys (Mllama), whatever the
        config's self-attention uses."""
        super().__init__(config, layer_idx)
        self.window = self.temperature = None  # every encoder token is visible; no positions
        if qk_norm is not None:
            if qk_norm != "head":
                raise ValueError(f"cross-attention qk_norm {qk_norm!r}: only 'head' is supported")
            self.qk_norm = qk_norm
            self.q_norm, self.k_norm = make_norm(config, config.head_dim), make_norm(config, config.head_dim)

    def fuse_qkv(self) -> None:
        """Nothing to fuse: the query reads the decoder's stream, the keys and values the encoder's."""

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder output (B, S, D) -> keys and values (B, H, S, head_dim)."""
        B, S, _ = memory.shape
        k = self.k_proj(memory).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(memory).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            k = self.k_norm(k)
        return k, v

    def forward(self, x: torch.Tensor, cross) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q = self.q_norm(q)
        k, v = cross.kv(self.layer_idx, self.project_memory)
        y = attend(q, k, v, cross.mask, False, self.scale, None, self.dropout if self.training else 0.0,
                   self.decode_kernel, self.attn_loops)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
