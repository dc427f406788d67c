"""KV caches: keys and values of past tokens, preallocated, passed into the forward pass.

The model's forward is one code path for training, prefill and decode: with a cache, each
attention layer writes its new keys/values into the cache and attends over everything stored.
Multi-head latent attention stores its compressed latent and shared rotary key instead of
per-head keys and values (that is the point of MLA), through the same ``update`` call.
"""

from __future__ import annotations

import torch


class KVCache:
    """A preallocated cache for ``batch`` sequences of up to ``max_len`` tokens.

    Per-layer buffers are allocated on first use with the shapes the layer hands in, so the same
    class serves MHA/GQA (k, v) and MLA (latent, rotary key).
    """

    def __init__(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        self.batch, self.max_len = batch, max_len
        self.dtype, self.device = dtype, device
        self.length = 0  # slots filled by earlier forward calls
        self.key_valid: torch.Tensor | None = None  # (B, max_len) False on padding slots
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}

    def reserve(self, n_new: int, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Called by the model before its layers: checks room, records padding; returns key validity."""
        if self.length + n_new > self.max_len:
            raise ValueError(f"KVCache is full: {self.length} cached + {n_new} new tokens "
                             f"exceed max_len={self.max_len}")
        if attention_mask is not None and self.key_valid is None:
            self.key_valid = torch.ones(self.batch, self.max_len, dtype=torch.bool, device=attention_mask.device)
        if self.key_valid is None:
            return None
        if attention_mask is not None:
            self.key_valid[:, self.length:self.length + n_new] = attention_mask.bool()
        return self.key_valid[:, :self.length + n_new]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) at the next slots; return all stored keys and values."""
        if layer not in self._k:
            B, H, _, _ = k.shape
            dtype = self.dtype or k.dtype
            self._k[layer] = k.new_zeros(B, H, self.max_len, k.shape[-1], dtype=dtype)
            self._v[layer] = v.new_zeros(B, v.shape[1], self.max_len, v.shape[-1], dtype=dtype)
        end = self.length + k.shape[2]
        self._k[layer][:, :, self.length:end] = k
        self._v[layer][:, :, self.length:end] = v
        return self._k[layer][:, :, :end], self._v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._k.values(), *self._v.values()))
