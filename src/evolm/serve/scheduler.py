"""Continuous batching: one decode step serves every running request, and requests come and go
between steps.

A server that decodes one request at a time leaves the hardware idle: a decode step reads every
weight to produce one token, so on a memory-bound device 8 rows cost barely more than 1.
*Iteration-level scheduling* (Orca, Yu et al. 2022, OSDI) batches at the granularity of single
steps: a request that arrives is prefilled and joins the running batch at the next step; one that
finishes leaves it at once, instead of waiting for the slowest member of a static batch. vLLM
(Kwon et al. 2023, arXiv:2309.06180) adds paged KV memory on top; we keep a plain preallocated
cache, which is enough at the scales evolm serves.

The design, in the terms of the cache protocol (``evolm.cache.Cache``):

- ``max_batch`` *slots*, one row each of a :class:`SlotCache`. Running requests occupy rows
  ``0..n-1``; a finished request's row is filled by moving the last row into it, so the running
  batch is always a prefix (a view, no copy, in the decode step).
- Rows are *left-aligned*: a request's token i sits in cache slot i, whatever else is running.
  A decode step writes each row's new token at its own slot ``len_r`` and attends over slots
  ``0..max_r len_r``; the attention mask (``key_valid``, the same mechanism ``generate`` uses for
  left padding) hides each row's unused tail, and positions are passed per row.
- A new request is prefilled alone (batch 1, its whole prompt in one forward pass) straight into
  its row, then samples its first token -- time to first token does not wait for a batch.
- Sampling reuses ``evolm.infer.sampling``: ``process_logits``/``sample`` per row with the row's own
  ``SamplingParams`` and ``torch.Generator``; text comes out through ``IncrementalDecoder`` and
  ``StopStrings``, so a stream never splits a UTF-8 character nor shows part of a stop string.

Greedy output does not depend on the company a request keeps -- bit for bit, not just nearly:
its prefill is always alone, and its decode row sees the same keys, only followed by masked slots
of other rows' lengths. Where the model decodes through row kernels -- a GGUF file's blocks with the
fused CPU block step, the default for ``evolm serve`` on a GGUF file -- every row is summed on its
own in the same order at any batch up to ``KERNEL_ROWS`` rows
(:func:`evolm.infer.block_step.independent_rows`), so a lone request decodes as one row, as
``generate`` does, and a larger batch is decoded in chunks of that many rows. Dense products go
through BLAS, and two details of its kernels need care. BLAS uses another kernel (another
summation order) for 1-3 row products than for larger ones, so there a decode step is padded to at
least ``min_decode_rows`` rows (copies of a running row, output dropped): a request alone runs the
very kernels it would run in a crowd. And a matmul computes its last, partial block of columns
with another kernel, so the keys handed to attention are rounded up to a multiple of 16 (see
``_DecodeView``). ``tests/test_serve.py`` and ``tests/test_block_step.py`` check the equality.

Sliding-window layers (Mistral, Gemma) need one more thing: mask planning (``nn/masks.py``) builds window
masks from one query slot shared by the batch, which is right only for rows of the same length.
For such models a decode step runs one forward per group of equal-length rows (still batched when
requests arrive together). See docs/serving.md for the model.py change that would lift this.

A failure stays with its request: prefill and sampling run per request under ``try``, and an
error is delivered to that request alone; if a batched forward itself fails, the rows of that
step get the error and the loop carries on with the next requests.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from evolm.infer.block_step import independent_rows
from evolm.infer.sampling import SamplingParams, process_logits, sample
from evolm.infer.text import IncrementalDecoder, StopStrings

log = logging.getLogger("evolm.serve")
MIN_DECODE_ROWS = 4  # BLAS runs 1-3 row products with other kernels than larger ones (see above)


# ------------------------------------------------------------------------------------------
# the KV cache of the running batch
# ------------------------------------------------------------------------------------------
class SlotCache:
    """KV storage for up to ``rows`` slots of up to ``max_len`` tokens each, grown on demand.

    Every attention layer gets a ``(rows, heads, capacity, dim)`` buffer for its keys and one for
    its values (for MLA: the latent and the rotary key), allocated on first use with the shapes
    the layer hands in, like ``KVCache``. Both the rows and the capacity start small and double
    when needed (up to ``rows`` and ``max_len``), so memory follows the running requests -- one
    long conversation does not reserve its length for every slot -- and ``reset`` gives it back.
    """

    def __init__(self, rows: int, max_len: int, initial: int = 256):
        self.rows, self.max_len = rows, max_len
        self.initial = (min(4, rows), min(initial, max_len))
        self.n_rows, self.capacity = self.initial
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        self._states: dict[int, tuple[torch.Tensor, ...]] = {}  # recurrent layers: (rows, ...) per state tensor

    def ensure(self, n_slots: int, n_rows: int = 1) -> None:
        """Make room for ``n_rows`` rows of ``n_slots`` tokens (doubling, within the limits)."""
        if n_slots > self.max_len or n_rows > self.rows:
            raise ValueError(f"SlotCache: {n_rows} rows x {n_slots} tokens exceed {self.rows} x {self.max_len}")
        if n_slots <= self.capacity and n_rows <= self.n_rows:
            return
        cap, rows = self.capacity, self.n_rows
        while cap < n_slots:
            cap = min(2 * cap, self.max_len)
        while rows < n_rows:
            rows = min(2 * rows, self.rows)
        for store in (self._k, self._v):
            for layer, old in store.items():
                new = old.new_zeros(rows, old.shape[1], cap, old.shape[-1])
                new[:old.shape[0], :, :old.shape[2]] = old
                store[layer] = new
        for layer, state in self._states.items():
            grown = tuple(t.new_zeros(rows, *t.shape[1:]) for t in state)
            for g, t in zip(grown, state):
                g[:t.shape[0]] = t
            self._states[layer] = grown
        self.n_rows, self.capacity = rows, cap

    def reset(self) -> None:
        """Give the memory back (called when no request is running)."""
        self._k.clear()
        self._v.clear()
        self._states.clear()
        self.n_rows, self.capacity = self.initial

    def buffers(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self._k:
            self._k[layer] = k.new_zeros(self.n_rows, k.shape[1], self.capacity, k.shape[-1])
            self._v[layer] = v.new_zeros(self.n_rows, v.shape[1], self.capacity, v.shape[-1])
        return self._k[layer], self._v[layer]

    def move(self, src: int, dst: int, n_slots: int) -> None:
        """Copy row ``src``'s first ``n_slots`` entries into row ``dst`` (compaction)."""
        for store in (self._k, self._v):
            for buf in store.values():
                buf[dst, :, :n_slots] = buf[src, :, :n_slots]
        for state in self._states.values():
            for t in state:
                t[dst] = t[src]

    def row_states(self, layer: int, rows) -> tuple[torch.Tensor, ...] | None:
        """A recurrent layer's states (``cache/state.py``) of ``rows``; None before its first call."""
        state = self._states.get(layer)
        return None if state is None else tuple(t[rows] for t in state)

    def put_states(self, layer: int, rows, state) -> None:
        """Store a recurrent layer's new states of ``rows`` (a tensor or a tuple of tensors, batch first)."""
        state = (state,) if isinstance(state, torch.Tensor) else tuple(state)
        if layer not in self._states:
            self._states[layer] = tuple(t.new_zeros(self.n_rows, *t.shape[1:]) for t in state)
        for buf, t in zip(self._states[layer], state):
            buf[rows] = t

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._k.values(), *self._v.values())) + \
            sum(t.numel() * t.element_size() for state in self._states.values() for t in state)


class _PrefillView:
    """The cache protocol (``evolm.cache.Cache``) for prefilling one row from slot 0.

    The forward pass sees an empty cache (plain causal attention, the fast path), and each
    layer's keys/values are also written into the row.
    """

    length = 0
    static = False
    key_valid = None

    def __init__(self, cache: SlotCache, row: int):
        self.cache, self.row = cache, row

    def key_layout(self, layer: int) -> None:
        return None

    def key_slots(self, layout, n_new: int, device) -> None:
        return None

    def reserve(self, n_new: int, attention_mask) -> None:
        self.cache.ensure(n_new, self.row + 1)
        return None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        K, V = self.cache.buffers(layer, k, v)
        T = k.shape[2]
        K[self.row, :, :T] = k[0]
        V[self.row, :, :T] = v[0]
        return k, v

    def prefill_slot(self, layer: int, batch: int, n_new: int, heads: int, head_dim: int, dtype: torch.dtype):
        """``KVCache.prefill_slot`` for the fused prompt step: the row's buffers, written from slot 0
        and attended over the prompt's slots, the keys :meth:`update` hands to attention."""
        if batch != 1:
            return None
        like = torch.empty(0, heads, 0, head_dim, dtype=dtype)
        K, V = self.cache.buffers(layer, like, like)
        if K.shape[1] != heads or K.shape[3] != head_dim or K.dtype != dtype or K.shape[2] < n_new:
            return None
        return K[self.row:self.row + 1], V[self.row:self.row + 1], 0

    def state(self, layer: int) -> None:
        return None  # a prefill from slot 0: every recurrent layer starts from zeros

    def set_state(self, layer: int, state) -> None:
        self.cache.put_states(layer, self.row, state)

    def advance(self, n: int) -> None:
        pass


class _DecodeView:
    """The cache protocol (``evolm.cache.Cache``) for one decode step over ``rows`` whose lengths are ``lens``.

    Row r's new token goes to slot ``lens[r]`` and the row attends over slots ``0..lens[r]``.
    The keys handed to attention span ``n_keys`` slots -- ``max(lens) + 1`` rounded up to a
    multiple of ``align`` -- and ``key_valid`` hides each row's unused tail. The rounding is for
    exactness: a CPU matmul computes its last, partial block of columns with another kernel, so a
    key's score would depend on how many keys follow it; with whole blocks it does not.

    We name the key slots ourselves (key layout ``"rows"``: mask planning takes our ``key_slots``)
    and place the query *past* them (``length = n_keys``): no key then
    shares the query's slot -- ``attention_mask`` (nn/masks.py) always lets a query see that
    slot, which would expose a shorter row to a stale key -- causality admits every key, and
    ``key_valid`` alone decides. A sliding-window mask counts slots back from the query, so for
    such models the engine groups rows by length and passes ``same_length``: the query then sits
    in the rows' own slot, as in ``KVCache``.
    """

    def __init__(self, cache: SlotCache, rows: list[int], lens: list[int], device,
                 same_length: bool = False, max_keys: int | None = None, align: int = 16):
        self.cache = cache
        last = max(lens)
        if same_length and min(lens) != last:
            raise ValueError("_DecodeView(same_length=True) needs rows of one length")
        limit = min(cache.max_len, max_keys or cache.max_len)
        self.n_keys = max(last + 1, min(-(-(last + 1) // align) * align, limit))
        self.length = last if same_length else self.n_keys
        cache.ensure(self.n_keys, max(rows) + 1)
        # rows r0..r0+n-1 (all running rows, or a chunk of them) are a view of the buffers, no copy
        self.first = rows[0] if rows == list(range(rows[0], rows[0] + len(rows))) else None
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.lens = torch.tensor(lens, dtype=torch.long, device=device)
        self._slots = torch.arange(self.n_keys, device=device)
        self.key_valid = self._slots[None, :] <= self.lens[:, None]

    static = False

    def key_layout(self, layer: int) -> str:
        return "rows"

    def key_slots(self, layout, n_new: int, device) -> torch.Tensor:
        return self._slots

    def reserve(self, n_new: int, attention_mask) -> torch.Tensor:
        if n_new != 1:
            raise ValueError(f"decode step feeds one token per row, got {n_new}")
        return self.key_valid

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        K, V = self.cache.buffers(layer, k, v)
        K[self.rows, :, self.lens] = k[:, :, 0]
        V[self.rows, :, self.lens] = v[:, :, 0]
        if self.first is not None:
            r, n = self.first, len(self.lens)
            return K[r:r + n, :, :self.n_keys], V[r:r + n, :, :self.n_keys]
        return K[self.rows, :, :self.n_keys], V[self.rows, :, :self.n_keys]

    def decode_slot(self, layer: int):
        """``KVCache.decode_slot`` for the fused step: the rows' buffers, each row's own write slot,
        ``n_keys`` slots attended, and (rows that are not consecutive, e.g. a lone request padded
        with copies of itself) which buffer row each batch row is, gathered as :meth:`update` does."""
        if layer not in self.cache._k:
            return None
        K, V = self.cache._k[layer], self.cache._v[layer]
        if self.first is not None:
            r, n = self.first, len(self.lens)
            return K[r:r + n], V[r:r + n], self.lens, self.n_keys
        return K, V, self.lens, self.n_keys, self.rows

    def state(self, layer: int):
        """The rows' recurrent states (``cache/state.py``)."""
        return self.cache.row_states(layer, self.rows)

    def set_state(self, layer: int, state) -> None:
        self.cache.put_states(layer, self.rows, state)

    def advance(self, n: int) -> None:
        pass


# ------------------------------------------------------------------------------------------
# requests and what they hear back
# ------------------------------------------------------------------------------------------
@dataclass
class TokenEvent:
    """One generated token: its id, the text it completes (may be empty: held back), logprobs."""

    index: int
    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class DoneEvent:
    """A sequence ended: ``finish_reason`` is 'stop' (EOS / stop string) or 'length'."""

    index: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # text released by the end itself (held-back bytes or stop-string prefixes)


@dataclass
class ErrorEvent:
    index: int
    message: str


Event = TokenEvent | DoneEvent | ErrorEvent


@dataclass
class GenRequest:
    """One sequence to generate (a request with ``n`` choices submits ``n`` of these).

    ``deliver`` is called from the scheduler thread with each event; it must be thread-safe and
    quick (the web layer hands the event to its asyncio loop). ``logprobs``: None for none, else
    how many top alternatives to report with each token's own log-probability.
    ``presence_penalty``/``frequency_penalty``/``logit_bias`` follow OpenAI's definitions.
    """

    prompt_ids: list[int]
    params: SamplingParams
    deliver: Callable[[Event], None]
    index: int = 0
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    image: dict | None = None  # a vision model's image (evolm.infer.vision.load_images), placeholders in the prompt
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating (client gone): the slot is freed before the next decode step."""
        self.cancelled = True


class _Seq:
    """Scheduler-side state of a running request (its row is its position in ``active``)."""

    def __init__(self, req: GenRequest, tokenizer, stop_ids: set[int], vocab: int, device):
        self.req, self.params = req, req.params
        self.len = len(req.prompt_ids)  # tokens in the cache
        self.last = -1  # the token sampled last, fed by the next decode step
        self.n_out = 0
        self.stop_ids = stop_ids
        self.decoder, self.stopper = IncrementalDecoder(tokenizer), StopStrings(req.params.stop)
        self.generator = None
        if req.params.seed is not None and not req.params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(req.params.seed)
        self.seen = None  # repetition penalty: tokens of prompt and output
        if req.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(req.prompt_ids, device=device)] = True
        self.counts = None  # presence / frequency penalties: counts of generated tokens
        if req.presence_penalty or req.frequency_penalty:
            self.counts = torch.zeros(1, vocab, device=device)
        self.image_step: dict | None = None  # a cross-attending image: what each decode step passes (its states)
        self.bias = None
        if req.logit_bias:
            self.bias = torch.zeros(1, vocab, device=device)
            for t, b in req.logit_bias.items():
                self.bias[0, t] = b
        self.done = False

    @property
    def plain_greedy(self) -> bool:
        p = self.params
        return p.greedy and p.repetition_penalty == 1.0 and self.counts is None and self.bias is None


# ------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------
class Engine:
    """Runs ``model`` for many concurrent requests on one background thread.

    ``submit`` a :class:`GenRequest`; events arrive through its ``deliver`` callback. At most
    ``max_batch`` requests run at once, the others wait in arrival order. ``max_len`` bounds
    prompt + generated tokens per request (the model's context length by default).
    ``prefill_budget`` bounds the prompt tokens prefilled between two decode steps, so a burst
    of long prompts does not stall the running streams for long. ``min_decode_rows``: pad decode
    steps to this many rows (None: 1 where the model decodes through row kernels, else
    ``MIN_DECODE_ROWS``; see the top of this module).
    """

    def __init__(self, model, tokenizer, max_batch: int = 8, max_len: int | None = None,
                 prefill_budget: int = 2048, min_decode_rows: int | None = None, max_waiting: int = 1024):
        if max_batch < 1:
            raise ValueError(f"Engine: max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer = model.eval(), tokenizer
        c = model.config
        self.max_len = min(max_len or c.max_seq_len, c.max_seq_len)
        self.max_batch, self.prefill_budget, self.max_waiting = max_batch, prefill_budget, max_waiting
        # rows a decode step computes each as alone (0: BLAS products, whose kernel depends on the rows)
        self.exact_rows = independent_rows(self.model)
        if min_decode_rows is None:  # pad only where the products need it (see the top of this file)
            min_decode_rows = 1 if self.exact_rows else MIN_DECODE_ROWS
        # padding buys batch-independence; a server of one slot has no batch to be independent of
        self.min_decode_rows = 1 if max_batch == 1 else max(1, min_decode_rows)
        # more rows than that at once would leave the row kernels: decode them in chunks instead
        self.step_rows = self.exact_rows or max_batch
        self.device = next(model.parameters()).device
        self.vocab = c.vocab_size
        # masks counted back from the query's own slot (windows, Llama 4's chunks) and Llama 4's
        # query temperature need the query in the rows' real slot: rows are grouped by length
        self.windowed = any(c.layer_kv_span(i) is not None for i in range(c.n_layers)) or c.attn_temperature_tuning
        # learned positions: the model checks query slot + 1 <= max_seq_len (see _DecodeView)
        self.max_keys = c.max_seq_len - 1 if c.pos_emb == "learned" else None
        self.cache = SlotCache(max_batch, self.max_len)
        self.active: list[_Seq] = []
        self.waiting: deque[GenRequest] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        # where the engine's time goes (``GET /health``): seconds in prompts (each alone) and in decode
        # steps, and the tokens each produced; benchmarks/serve_load.py reads them to tell the decode
        # rate (the same as ``generate``'s) apart from the prompts' share of a busy server's time
        self.stats = {"requests": 0, "finished": 0, "errors": 0, "cancelled": 0, "steps": 0,
                      "tokens": 0, "peak_active": 0, "prefill_seconds": 0.0, "prefill_tokens": 0,
                      "decode_seconds": 0.0, "decode_tokens": 0}
        self.error: str | None = None  # set if the loop itself died

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None or not self._thread.is_alive():
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="evolm-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._running = False
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def snapshot(self) -> dict:
        with self._cv:
            return {**self.stats, "active": len(self.active), "waiting": len(self.waiting),
                    "max_batch": self.max_batch, "max_len": self.max_len,
                    "kv_cache_bytes": self.cache.nbytes()}

    # --- requests ----------------------------------------------------------------------------
    def check(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        """Raise ValueError if a request cannot run (empty, bad ids, beyond the context)."""
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not prompt_ids:
            raise ValueError("the prompt is empty (it must hold at least one token)")
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < self.vocab)]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab}), got {bad[:5]}")
        if len(prompt_ids) + max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens + max_tokens={max_new_tokens} exceeds "
                             f"the context length of {self.max_len} tokens")

    def submit(self, req: GenRequest) -> GenRequest:
        self.check(req.prompt_ids, req.params.max_new_tokens)
        with self._cv:
            if not self.alive:
                raise RuntimeError(f"the scheduler is not running ({self.error or 'stopped'})")
            if len(self.waiting) >= self.max_waiting:
                raise OverflowError(f"too many waiting requests ({self.max_waiting}); retry later")
            self.waiting.append(req)
            self.stats["requests"] += 1
            self._cv.notify()
        return req

    # --- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while self._running and not self.waiting and not self.active:
                        self._cv.wait()
                    if not self._running:
                        break
                try:
                    with torch.inference_mode():
                        self._step()
                except Exception as e:  # never let one bad step end the server
                    log.error("scheduler step failed:\n%s", traceback.format_exc())
                    for s in self.active:
                        self._fail(s.req, e)
                        s.done = True
                    self._drop_finished()
        except BaseException as e:  # a bug in the loop itself: tell everyone, keep the message
            self.error = f"{type(e).__name__}: {e}"
            log.error("scheduler loop died:\n%s", traceback.format_exc())
        finally:
            with self._cv:
                seqs = [s.req for s in self.active] + list(self.waiting)
                self.active, self.waiting = [], deque()
            for r in seqs:
                self._send(r, ErrorEvent(r.index, self.error or "server shutting down"))

    def _step(self) -> None:
        self._drop_finished()
        self._admit()
        self._drop_finished()
        if not self.active:
            self.cache.reset()
            return
        self._decode()
        self._drop_finished()
        if not self.active:
            self.cache.reset()

    def _send(self, req: GenRequest, ev: Event) -> None:
        try:
            req.deliver(ev)
        except Exception:  # a consumer that is gone must not hurt the loop
            req.cancelled = True

    def _drop_finished(self) -> None:
        """Free the rows of finished or cancelled requests, keeping the running rows a prefix."""
        i = 0
        while i < len(self.active):
            s = self.active[i]
            if s.done or s.req.cancelled:
                if not s.done:
                    self.stats["cancelled"] += 1
                last = len(self.active) - 1
                if i != last:
                    self.cache.move(last, i, self.active[last].len)
                    self.active[i] = self.active[last]
                with self._cv:
                    self.active.pop()
            else:
                i += 1

    def _admit(self) -> None:
        budget = self.prefill_budget
        while len(self.active) < self.max_batch:
            with self._cv:
                if not self.waiting:
                    return
                req = self.waiting[0]
                if req.cancelled:
                    self.waiting.popleft()
                    self.stats["cancelled"] += 1
                    continue
                if budget <= 0:
                    return
                self.waiting.popleft()
            budget -= len(req.prompt_ids)
            self._prefill(req)

    def _prefill(self, req: GenRequest) -> None:
        row = len(self.active)
        t0 = time.perf_counter()
        try:
            stop_ids = set(req.params.stop_token_ids)
            if not req.params.ignore_eos:
                stop_ids |= set(self.tokenizer.eos_ids)
            seq = _Seq(req, self.tokenizer, stop_ids, self.vocab, self.device)
            ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)
            pos = torch.arange(ids.shape[1], device=self.device)[None]
            first = {}
            if req.image is not None:  # evolm.infer.vision: the image enters here (and the steps, if cross)
                from evolm.infer.vision import decode_inputs

                first, step = decode_inputs(self.model, req.image, ids)
                seq.image_step = step or None
            logits = self.model(ids, position_ids=pos, cache=_PrefillView(self.cache, row), last_only=True,
                                **first)[:, -1]
        except Exception as e:
            self._fail(req, e)
            return
        with self._cv:
            self.active.append(seq)
            self.stats["peak_active"] = max(self.stats["peak_active"], len(self.active))
        self._emit([seq], logits)
        self.stats["prefill_seconds"] += time.perf_counter() - t0  # the prompt's forward and its first token
        self.stats["prefill_tokens"] += len(req.prompt_ids)

    def _decode(self) -> None:
        seqs = list(self.active)
        groups = [list(range(len(seqs)))]
        if self.windowed:  # rows of equal length share the window mask's query slot
            by_len: dict[int, list[int]] = {}
            for r, s in enumerate(seqs):
                by_len.setdefault(s.len, []).append(r)
            groups = list(by_len.values())
        n = self.step_rows
        groups = [g[i:i + n] for g in groups for i in range(0, len(g), n)]
        # a row that cross-attends its own image decodes alone (its image states are its own), always,
        # so its output does not depend on the company it keeps either
        groups = [[r] for g in groups for r in g if seqs[r].image_step is not None] + \
            [h for h in ([r for r in g if seqs[r].image_step is None] for g in groups) if h]
        outs, order = [], []
        t0 = time.perf_counter()
        try:
            for g in groups:
                image = seqs[g[0]].image_step or {}
                rows = g if image else g + [g[0]] * (self.min_decode_rows - len(g))  # pad (see top)
                ids = torch.tensor([[seqs[r].last] for r in rows], dtype=torch.long, device=self.device)
                pos = torch.tensor([[seqs[r].len] for r in rows], dtype=torch.long, device=self.device)
                view = _DecodeView(self.cache, rows, [seqs[r].len for r in rows], self.device, self.windowed,
                                   self.max_keys)
                out = self.model(ids, position_ids=pos, attention_mask=torch.ones_like(ids), cache=view,
                                 last_only=True, **image)[:, -1]
                outs.append(out[:len(g)])  # padding rows' output dropped
                order += g
        except Exception as e:
            for s in seqs:
                self._fail(s.req, e)
                s.done = True
            return
        self.stats["steps"] += 1
        for s in seqs:
            s.len += 1
        logits = outs[0] if len(outs) == 1 else torch.cat(outs)  # the common case: no copy
        if order != list(range(len(seqs))):  # groups (equal lengths, image rows): rows back in order
            logits = logits[torch.tensor(order, device=logits.device).argsort()]
        self._emit(seqs, logits)
        self.stats["decode_seconds"] += time.perf_counter() - t0  # the forward, sampling and streaming
        self.stats["decode_tokens"] += len(seqs)

    # --- choosing tokens ---------------------------------------------------------------------
    def _emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Pick each row's next token from its logits (n, V), and tell its request."""
        logits = logits.float()
        greedy = [i for i, s in enumerate(seqs) if s.plain_greedy]
        picks: dict[int, int] = {}
        if len(greedy) == len(seqs):  # every row greedy (the common case): no gathered copy
            picks = dict(enumerate(logits.argmax(-1).tolist()))
        elif greedy:
            for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
                picks[i] = t
        want_lp = [i for i, s in enumerate(seqs) if s.req.logprobs is not None]
        logp = torch.log_softmax(logits[want_lp], dim=-1) if want_lp else None
        for i, s in enumerate(seqs):
            try:
                tok = picks[i] if i in picks else self._choose(s, logits[i:i + 1])
                lp = top = None
                if logp is not None and i in want_lp:
                    row = logp[want_lp.index(i)]
                    lp = float(row[tok])
                    if s.req.logprobs:
                        v, ix = row.topk(s.req.logprobs)
                        top = list(zip(ix.tolist(), v.tolist()))
                self._advance(s, tok, lp, top)
            except Exception as e:
                self._fail(s.req, e)
                s.done = True

    def _choose(self, s: _Seq, logits: torch.Tensor) -> int:
        if s.bias is not None:
            logits = logits + s.bias
        if s.counts is not None:  # OpenAI: mu - c * alpha_frequency - (c > 0) * alpha_presence
            logits = logits - s.counts * s.req.frequency_penalty - (s.counts > 0).float() * s.req.presence_penalty
        scores = process_logits(logits, s.params, s.seen)
        return int(sample(scores, s.params, s.generator)[0])

    def _advance(self, s: _Seq, tok: int, lp, top) -> None:
        """Record a sampled token: stream its text, end the sequence on a stop condition."""
        s.n_out += 1
        s.last = tok
        self.stats["tokens"] += 1
        if s.seen is not None:
            s.seen[0, tok] = True
        if s.counts is not None:
            s.counts[0, tok] += 1
        req = s.req
        if tok in s.stop_ids:
            self._finish(s, "stop", s.stopper.push(s.decoder.flush()) + s.stopper.flush())
            return
        piece = s.stopper.push(s.decoder.push(tok))
        self._send(req, TokenEvent(req.index, tok, piece, lp, top))
        if s.stopper.stopped:
            self._finish(s, "stop", "")
        elif s.n_out >= s.params.max_new_tokens:
            self._finish(s, "length", s.stopper.push(s.decoder.flush()) + s.stopper.flush())

    def _finish(self, s: _Seq, reason: str, text: str) -> None:
        s.done = True
        self.stats["finished"] += 1
        self._send(s.req, DoneEvent(s.req.index, reason, len(s.req.prompt_ids), s.n_out, text))

    def _fail(self, req: GenRequest, e: BaseException) -> None:
        self.stats["errors"] += 1
        log.error("request failed: %s\n%s", e, traceback.format_exc())
        self._send(req, ErrorEvent(req.index, f"{type(e).__name__}: {e}"))


__all__ = ["Engine", "GenRequest", "SlotCache", "TokenEvent", "DoneEvent", "ErrorEvent"]
