"""The cross-attention cache of an encoder-decoder: the encoder's output and, per decoder layer,
the keys and values projected from it.

The encoder runs once per request (``Transformer.encode``); each decoder layer projects the
encoder output to its keys/values the first time it needs them and reads them back at every later
step, as transformers' ``EncoderDecoderCache`` does. Unlike the self-attention cache, nothing is
appended as decoding goes on: the keys have their own, fixed (bidirectional) layout, every real
encoder token visible to every decoder token, so the mask is made once here from the encoder's
padding. A training forward pass builds one too and drops it; generation keeps it next to the
decoder's ``KVCache`` (see ``cache/protocol.py``).

A vision model (Llama 3.2 Vision) keeps the projected image states here the same way; which image
tokens a text token may see changes from token to token (a token sees the images before it), so
each forward call takes a view (:meth:`CrossCache.restrict`) carrying that call's mask over the
same stored keys/values.
"""

from __future__ import annotations

from typing import Callable

import torch


class CrossCache:
    """Encoder output ``memory`` (B, S, D) and its padding ``attention_mask`` (B, S; 1 = token)."""

    def __init__(self, memory: torch.Tensor, attention_mask: torch.Tensor | None = None):
        self.memory = memory
        # (B, 1, 1, S): a decoder query may see the real encoder tokens; None: all are real
        self.mask = None if attention_mask is None or bool(attention_mask.all()) else \
            attention_mask.bool()[:, None, None, :]
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows: torch.Tensor | None = None  # (B, T, 1): 0 for text rows that see no memory token

    def restrict(self, mask: torch.Tensor | None, rows: torch.Tensor | None) -> "CrossCache":
        """A view for one forward call: the same memory and projected keys/values, with a mask per
        query ``mask`` (B, 1, T, S; True: may attend) and ``rows`` (B, T, 1; 0 where a query row had
        nothing to see: the vision layers skip their MLP there)."""
        view = object.__new__(CrossCache)
        view.memory, view._kv, view.mask, view.rows = self.memory, self._kv, mask, rows
        return view

    def kv(self, layer: int, project: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        """Layer ``layer``'s keys/values, projected from the encoder output on first use."""
        if layer not in self._kv:
            self._kv[layer] = project(self.memory)
        return self._kv[layer]

    def nbytes(self) -> int:
        """Bytes of the projected keys/values held (the cost card's cross-attention KV bytes)."""
        return sum(t.numel() * t.element_size() for kv in self._kv.values() for t in kv)
