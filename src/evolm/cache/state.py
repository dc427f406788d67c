"""Recurrent states: what a state-space layer keeps of the past, per layer, under the cache's bookkeeping.

An attention layer keeps every past key and value, so its cache grows with the sequence. A
recurrent layer -- Mamba's selective scan (Gu & Dao 2023, arXiv:2312.00752) and its successors --
folds the past into a state of fixed size: Mamba keeps the last ``d_conv - 1`` inputs of its
causal convolution and a ``(d_inner, d_state)`` SSM state per sequence, whatever the length. That
is why a state-space model decodes in O(1) time and memory per token.

The state is *per-layer storage* under the same sequence bookkeeping as keys and values
(``cache/protocol.py``): ``reserve`` records padding, the layers run, ``advance`` moves the
length on. A layer reads its state with ``state(layer)`` (None before its first call) and stores
the new one with ``set_state(layer, state)``. A state is a tensor or a tuple of tensors, batch
first, so rows can be reordered (``select_rows``) and bytes counted (``nbytes``) without knowing
which layer kind made it.
"""

from __future__ import annotations

import torch

State = torch.Tensor | tuple[torch.Tensor, ...]


class RecurrentStates:
    """Per-layer recurrent states, mixed into the caches that hold them (``KVCache`` and kin)."""

    _states: dict[int, State]

    def _init_states(self) -> None:
        self._states = {}

    def state(self, layer: int) -> State | None:
        """Layer ``layer``'s state after the tokens cached so far; None before its first call."""
        return self._states.get(layer)

    def set_state(self, layer: int, state: State) -> None:
        """Store layer ``layer``'s state after this call's new tokens (the cache's ``advance``
        follows once every layer has run)."""
        self._states[layer] = state

    def _select_state_rows(self, index: torch.Tensor) -> None:
        for layer, s in self._states.items():
            self._states[layer] = _map(s, lambda t: t.index_select(0, index.to(t.device)))

    def state_nbytes(self) -> int:
        """Bytes of every recurrent state held: the same at any sequence length."""
        return sum(t.numel() * t.element_size() for s in self._states.values() for t in _tensors(s))


def _tensors(state: State) -> tuple[torch.Tensor, ...]:
    return (state,) if isinstance(state, torch.Tensor) else tuple(state)


def _map(state: State, fn) -> State:
    return fn(state) if isinstance(state, torch.Tensor) else tuple(fn(t) for t in state)


def copy_state_(dst: State, src: State) -> None:
    """Write ``src`` into ``dst``'s tensors in place (a compiled decode step keeps its buffers)."""
    for d, s in zip(_tensors(dst), _tensors(src)):
        d.copy_(s)
