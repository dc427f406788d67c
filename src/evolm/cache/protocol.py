"""The cache protocol: what ``Transformer.forward`` asks of whatever holds past tokens.

Every cache kind implements it: the full KV cache, the sliding-window ring buffer and the MLA
latent cache (one class, ``KVCache``: a layer hands in whatever it stores), the static cache of a
compiled decode step (``StaticKVCache``), the prefill collector of a compiled prefill
(``PrefillKV``) and the serving engine's per-request views (``serve/scheduler.py``). Nothing in the
model asks a cache what class it is.

A forward call with a cache goes:

1. ``reserve(n_new, attention_mask)``: check room, record which new slots are padding; returns the
   key validity by slot (B, n_slots) or None when every slot is a real token.
2. mask planning (``nn/masks.plan_masks``) asks each layer's ``key_layout(layer)``:
   ``None`` -- plain slots ``0 .. length + n_new - 1``; an ``int`` -- a ring of that many slots,
   whose absolute slots ``key_slots(layout, n_new, device)`` names; ``"rows"`` -- the cache names
   the slots itself (``key_slots``), e.g. rows of different lengths decoded together. A cache in
   *static* mode (``static = True``, compiled decoding) builds each window's mask itself with
   ``mask(window, n_new)``, from a position held in a tensor.
3. each attention layer calls ``update(layer, k, v)`` and attends over what it returns; each
   recurrent (state-space) layer reads ``state(layer)`` (None before its first call), runs its scan
   from there and stores the result with ``set_state(layer, state)``;
4. ``advance(n_new)``: the new tokens now occupy their slots.

The split -- sequence bookkeeping (1, 2, 4) shared by all layers, storage (3) per layer -- is what
lets the cache kinds fit: a state-space layer's recurrent state (Mamba's conv and SSM states,
``cache/state.py``) is per-layer storage of a fixed size under the same bookkeeping, so a
sequence's memory in those layers does not grow with its length. Padding reaches a recurrent
layer as the validity of its new tokens (``nn/masks.plan_masks``), not as key slots. An encoder-decoder's
cross-attention keys/values are per-layer storage written once per request whose keys have their
own (bidirectional) layout and no slots to advance: ``cache/cross.py``'s ``CrossCache``, passed to
the decoder's forward next to this cache (``cross=``), not through it.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch

KeyLayout = int | Literal["rows"] | None  # see the module docstring, step 2


@runtime_checkable
class Cache(Protocol):
    """What ``Transformer.forward`` calls on the ``cache`` it is given."""

    length: int   # slots filled by earlier forward calls (a static-mode cache keeps its own tensor position)
    static: bool  # True: a compiled decode step; masks come from ``mask`` and positions must be passed in

    def reserve(self, n_new: int, attention_mask: torch.Tensor | None) -> torch.Tensor | None: ...

    def key_layout(self, layer: int) -> KeyLayout: ...

    def key_slots(self, layout: KeyLayout, n_new: int, device) -> torch.Tensor | None: ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(self, n: int) -> None: ...

    def state(self, layer: int) -> object | None: ...

    def set_state(self, layer: int, state: object) -> None: ...
