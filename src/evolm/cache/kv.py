"""KV caches: keys and values of past tokens, preallocated, passed into the forward pass.

Each class here implements ``evolm.cache.protocol.Cache``.

The model's forward is one code path for training, prefill and decode: with a cache, each
attention layer writes its new keys/values into the cache and attends over what is stored.

- Global layers keep every token: a preallocated (B, H, max_len, D) buffer per layer.
- Sliding-window layers (Mistral, Gemma 2/3) never look further back than their window, so they
  keep a ring buffer of ``window`` slots: memory stays flat however long the generation runs.
  Each ring entry remembers the absolute slot it holds, and the attention mask is built from
  those slots, so order inside the ring does not matter (attention is permutation-invariant
  over keys).
- Multi-head latent attention stores its compressed latent and shared rotary key instead of
  per-head keys and values (the point of MLA), through the same ``update`` call.
- State-space layers (Mamba) store a recurrent state of fixed size instead (``state`` /
  ``set_state``, ``cache/state.py``): memory per sequence independent of its length.
"""

from __future__ import annotations

import torch

from evolm.cache.state import RecurrentStates, State, copy_state_


class KVCache(RecurrentStates):
    """A cache for ``batch`` sequences of up to ``max_len`` tokens.

    ``windows[i]`` is layer i's sliding window or attention chunk (None for global layers; a chunked
    layer never looks back further than its chunk); pass it (or use ``KVCache.for_model``) to get
    ring buffers for local layers. Per-layer buffers are allocated
    on first use with the shapes the layer hands in, so one class serves MHA/GQA (k, v) and MLA
    (latent, rotary key).
    """

    static = False  # see StaticKVCache

    def __init__(self, batch: int, max_len: int, windows: list[int | None] | None = None,
                 device: torch.device | str | None = None):
        self.batch, self.max_len = batch, max_len
        self.windows = list(windows) if windows is not None else None
        self.device = device
        self.length = 0  # slots filled by earlier forward calls
        self.key_valid: torch.Tensor | None = None  # (B, max_len) False on padding slots
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self._ring_slots: dict[int, torch.Tensor] = {}  # window -> (window,) absolute slot held, -1 empty
        self._init_states()  # recurrent layers' states (cache/state.py)

    @classmethod
    def for_model(cls, model, batch: int, max_len: int | None = None) -> "KVCache":
        c = model.config
        max_len = max_len or c.max_seq_len
        dev = next(model.parameters()).device
        return cls(batch, max_len, [c.layer_kv_span(i) for i in range(c.n_layers)], device=dev)

    # --- bookkeeping shared by all layers of one forward call ------------------------------
    def key_layout(self, layer: int) -> int | None:
        """The ring size of a layer, or None if it keeps every token (the plain slot layout)."""
        if self.windows is None:
            return None
        w = self.windows[layer]
        return w if w is not None and w < self.max_len else None

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

    def key_slots(self, window: int | None, n_new: int, device) -> torch.Tensor | None:
        """Absolute slots of the keys a layer with this ring ``window`` (its ``key_layout``) will
        attend over (-1: empty).

        None means the plain layout: slots 0 .. length + n_new - 1.
        """
        if window is None or self.length == 0:
            return None
        ring = self._ring(window, device)
        new = torch.arange(self.length, self.length + n_new, device=device)
        if n_new == 1:
            ring = ring.clone()
            ring[self.length % window] = self.length
            return ring
        return torch.cat((ring, new))

    def _ring(self, window: int, device) -> torch.Tensor:
        if window not in self._ring_slots:
            self._ring_slots[window] = torch.full((window,), -1, dtype=torch.long, device=device)
        return self._ring_slots[window]

    def advance(self, n: int) -> None:
        """Called by the model after its layers: the new tokens now occupy their slots."""
        for window, ring in self._ring_slots.items():
            keep = min(n, window)
            slots = torch.arange(self.length + n - keep, self.length + n, device=ring.device)
            ring[slots % window] = slots
        self.length += n

    # --- per layer ---------------------------------------------------------------------------
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) of the new tokens; return the keys/values to attend over."""
        window = self.key_layout(layer)
        if layer not in self._k:
            size = window if window is not None else self.max_len
            self._k[layer] = k.new_zeros(k.shape[0], k.shape[1], size, k.shape[-1])
            self._v[layer] = v.new_zeros(v.shape[0], v.shape[1], size, v.shape[-1])
            if window is not None:
                self._ring(window, k.device)
        K, V = self._k[layer], self._v[layer]
        T, start = k.shape[2], self.length
        if window is None:
            K[:, :, start:start + T] = k
            V[:, :, start:start + T] = v
            return K[:, :, :start + T], V[:, :, :start + T]
        if T == 1 and start > 0:  # decode: overwrite the oldest entry, attend over the ring
            K[:, :, start % window] = k[:, :, 0]
            V[:, :, start % window] = v[:, :, 0]
            return K, V
        # prefill / chunk: attend over (ring before, new tokens), then keep the newest in the ring
        keys = k if start == 0 else torch.cat((K, k), dim=2)
        vals = v if start == 0 else torch.cat((V, v), dim=2)
        keep = min(T, window)
        slots = torch.arange(start + T - keep, start + T, device=k.device) % window
        K[:, :, slots] = k[:, :, T - keep:]
        V[:, :, slots] = v[:, :, T - keep:]
        return keys, vals

    def decode_slot(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
        """Where one new token per row goes, as :meth:`update` would place it: ``(K, V, slot, attend)``,
        the layer's buffers, the slot written (an int, or a tensor of one slot per row) and how many
        leading slots it attends (-1: the whole ring of a sliding-window layer). None where :meth:`update` must do it (no buffers yet, static
        mode, nothing cached). For the fused decode step (``evolm.infer.block_step``)."""
        if self.static or self.length == 0 or layer not in self._k:
            return None
        K, V = self._k[layer], self._v[layer]
        window = self.key_layout(layer)
        if window is None:
            return K, V, self.length, self.length + 1
        return K, V, self.length % window, -1

    def prefill_slot(self, layer: int, batch: int, n_new: int, heads: int, head_dim: int,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """Where ``n_new`` > 1 tokens of ``batch`` rows go, as :meth:`update` would place them in the
        plain layout: ``(K, V, start)``, the layer's buffers (made here on first use, as update makes
        them) and the first slot written; the tokens then attend slots ``0 .. start + n_new - 1``.
        None where :meth:`update` must do it (a sliding window's ring, static mode, other shapes).
        For the fused prompt step (``evolm.infer.block_step``)."""
        if self.static or self.key_layout(layer) is not None:
            return None
        if layer not in self._k:
            shape = (batch, heads, self.max_len, head_dim)
            self._k[layer] = torch.zeros(shape, dtype=dtype, device=self.device)
            self._v[layer] = torch.zeros(shape, dtype=dtype, device=self.device)
        K, V = self._k[layer], self._v[layer]
        if K.shape != (batch, heads, self.max_len, head_dim) or K.dtype != dtype or V.shape != K.shape:
            return None
        return K, V, self.length

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep, reorder or repeat batch rows: row ``r`` becomes old row ``index[r]``.

        One cached context can so be continued by several rows (scoring the choices of a
        multiple-choice question after reading the question once; beams in beam search). Ring
        bookkeeping is shared by all rows and stays as it is.
        """
        index = index.to(torch.long)
        for store in (self._k, self._v):
            for layer, t in store.items():
                store[layer] = t.index_select(0, index.to(t.device))
        self._select_state_rows(index)
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, index.to(self.key_valid.device))
        self.batch = int(index.numel())

    def nbytes(self) -> int:
        """Bytes of the keys/values and recurrent states held."""
        return sum(t.numel() * t.element_size() for t in (*self._k.values(), *self._v.values())) \
            + self.state_nbytes()


class StaticKVCache(KVCache):
    """A cache with fixed shapes, for a ``torch.compile``-d decode step (gpt-fast's static cache).

    A compiled graph is specialised on every shape and Python number it sees; the plain cache's
    growing ``length`` and ``K[:, :, :length]`` slices would recompile it at every token. Here:

    - every layer keeps a full ``(B, H, max_len, D)`` buffer (sliding-window layers too: their
      window becomes part of the mask rather than a ring buffer, so memory is not flat, but
      shapes are);
    - the prompt is prefilled through the ordinary path (``KVCache``'s Python-int bookkeeping,
      exact and fast for long inputs); then :meth:`start_static` switches to *static mode*, where
      the write position is a tensor ``pos``, new keys go in with ``index_copy_`` at ``pos`` and
      attention runs over all ``max_len`` slots with a mask ``slot <= pos`` (and the window and
      padding). Nothing is recompiled as the sequence grows;
    - the slot dimension of the buffers is marked dynamic for ``torch.compile``, so one graph
      also serves every ``max_len``: prompts of any length, without padding the cache to buckets.

    The price is attention over ``max_len`` slots instead of the filled ones (on average half the
    new tokens too many), which is small next to reading the weights at short contexts. In static
    mode ``length`` stops counting (``pos`` holds the position) and writes past ``max_len`` are not
    checked (that would read the tensor back every step): size the cache for prompt + new tokens,
    as ``generate(..., compile=True)`` does.
    """

    def __init__(self, batch: int, max_len: int, device: torch.device | str | None = None):
        super().__init__(batch, max_len, None, device)
        self.static = False  # True once start_static() was called
        self.pos: torch.Tensor | None = None  # (1,) slot the next token is written to

    @classmethod
    def for_model(cls, model, batch: int, max_len: int | None = None) -> "StaticKVCache":
        dev = next(model.parameters()).device
        return cls(batch, max_len or model.config.max_seq_len, device=dev)

    def start_static(self) -> None:
        """Switch from prefill bookkeeping (Python ints) to static mode (tensor position)."""
        if self.static:
            return
        dev = next(iter(self._k.values())).device if self._k else self.device
        self.pos = torch.tensor([self.length], dtype=torch.long, device=dev)
        if self.key_valid is None:
            self.key_valid = torch.ones(self.batch, self.max_len, dtype=torch.bool, device=dev)
        self._slots = torch.arange(self.max_len, device=dev)
        for t in (*self._k.values(), *self._v.values()):
            torch._dynamo.maybe_mark_dynamic(t, 2)
        torch._dynamo.maybe_mark_dynamic(self.key_valid, 1)
        torch._dynamo.maybe_mark_dynamic(self._slots, 0)
        self.static = True

    # --- static mode: called by the model instead of key_slots/attention_mask ----------------
    def mask(self, window: int | None, n_new: int, chunk: int | None = None) -> torch.Tensor:
        """(B, 1, T, max_len) bool: query ``pos + t`` may see a slot that is filled, causal, in window
        (or in its chunk: ``nn.masks.same_chunk``)."""
        from evolm.nn.masks import same_chunk

        q = self.pos + torch.arange(n_new, device=self.pos.device)
        diff = q[:, None] - self._slots[None, :]
        m = diff >= 0
        if window is not None:
            m = m & (diff < window)
        m = m[None, None] & self.key_valid[:, None, None, :]
        return m & same_chunk(q, self._slots, chunk, self.key_valid) if chunk is not None else m

    def store_prefill(self, collected: "PrefillKV", n: int, attention_mask: torch.Tensor | None) -> None:
        """Store a prompt's keys/values collected by :class:`PrefillKV` (a compiled prefill), as the
        ordinary prefill through this cache would have."""
        self.reserve(n, attention_mask)
        for layer in sorted(collected.kv):
            self.update(layer, *collected.kv[layer])
        for layer, state in collected.states.items():
            self.set_state(layer, state)
        self.advance(n)

    def reserve(self, n_new: int, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        if not self.static:
            return super().reserve(n_new, attention_mask)
        return None  # padding was recorded at prefill; generated tokens are all real

    def advance(self, n: int) -> None:
        if not self.static:
            return super().advance(n)
        self.pos.add_(n)  # in place, no attribute store: the compiled step has no Python side effect

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.static:
            return super().update(layer, k, v)
        K, V = self._k[layer], self._v[layer]
        slots = self.pos + torch.arange(k.shape[2], device=k.device) if k.shape[2] > 1 else self.pos
        K.index_copy_(2, slots, k)
        V.index_copy_(2, slots, v)
        return K, V

    def set_state(self, layer: int, state: State) -> None:
        """In static mode the new state is written into the held tensors (no Python-side store in
        the compiled step)."""
        if self.static and layer in self._states:
            copy_state_(self._states[layer], state)
        else:
            super().set_state(layer, state)


class PrefillKV:
    """Stands in for an empty cache during a compiled prefill: each layer's new keys/values are
    collected, not stored.

    Storing them in a :class:`KVCache` allocates each layer's buffer on first use and keeps Python
    ints up to date, which breaks a ``torch.compile`` graph at every layer (and recompiles each
    block). This object only records what each layer hands in and returns it unchanged (an empty
    cache attends over the new tokens alone), so the whole prompt is one graph whose outputs
    include the keys/values; :meth:`StaticKVCache.store_prefill` then stores them with the
    ordinary code. Sliding windows are left to the mask, as in a ``StaticKVCache``.
    """

    static = False
    length = 0

    def __init__(self):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.states: dict[int, State] = {}  # recurrent layers' states after the prompt

    def state(self, layer: int) -> None:
        return None  # an empty cache: every recurrent layer starts from zeros

    def set_state(self, layer: int, state: State) -> None:
        self.states[layer] = state

    def reserve(self, n_new: int, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        return attention_mask.bool() if attention_mask is not None else None

    def key_layout(self, layer: int) -> None:
        return None

    def key_slots(self, layout, n_new: int, device) -> None:
        return None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.kv[layer] = (k, v)
        return k, v

    def advance(self, n: int) -> None:
        pass
