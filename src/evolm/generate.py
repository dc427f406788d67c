"""Text generation: the decoding loop, samplers, stop conditions, streaming and batching.

The loop is the one every LM server runs: *prefill* the whole prompt in one forward pass that
fills the KV cache, then *decode* one token per step, feeding only the new token and letting
attention read the past from the cache (so a step costs O(context), not O(context^2)).

Sampling follows the definitions that Hugging Face ``generate()`` applies, in its order:
repetition penalty (Keskar et al. 2019, CTRL, arXiv:1909.05858), then -- only when sampling --
temperature, top-k (Fan et al. 2018, arXiv:1805.04833), top-p / nucleus (Holtzman et al. 2019,
arXiv:1904.09751) and min-p (Nguyen et al. 2024, arXiv:2407.01082). ``temperature=0`` is greedy.

Batches of prompts of different lengths are left-padded: every row's last prompt token sits in
the last column, so one decode step serves all rows. Padding is masked out through
``attention_mask`` (the cache remembers it) and each row's positions count only its real tokens.

Streaming turns tokens into text pieces as they arrive. A byte-level token may end in the middle
of a UTF-8 character, and some decoders treat the first token of a sequence specially (the
SentencePiece leading space), so we decode a short window of recent tokens and emit only the part
that is new and complete. Stop strings are matched on that text; text that could still become a
stop string is held back until the next token settles it.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from evolm import graph_call, kernels
from evolm.cache import KVCache, PrefillKV, StaticKVCache
from evolm.nn import attention


# ------------------------------------------------------------------------------------------
# parameters
# ------------------------------------------------------------------------------------------
@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop.

    ``temperature=0`` is greedy decoding (argmax); the other sampling knobs are then unused,
    except ``repetition_penalty``, which (as in Hugging Face) also changes greedy choices.
    ``top_k=0``, ``top_p=1`` and ``min_p=0`` switch those filters off. ``stop_token_ids`` end a
    row when generated (the token is returned by :func:`generate` but never decoded into text);
    ``stop`` strings end :func:`stream` / :func:`generate_text` and are not part of the text.
    ``seed`` makes sampling reproducible (a private ``torch.Generator``; ``None`` uses torch's
    global RNG). ``ignore_eos`` keeps going past the tokenizer's end-of-sequence tokens.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop_token_ids, int):
            self.stop_token_ids = (self.stop_token_ids,)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop_token_ids, self.stop = tuple(self.stop_token_ids), tuple(self.stop)
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"SamplingParams: field '{name}' {msg}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        need(is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "max_new_tokens",
             "must be an integer >= 0")
        need(isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
             and self.temperature >= 0, "temperature", "must be a finite number >= 0 (0 = greedy)")
        need(is_int(self.top_k) and self.top_k >= 0, "top_k", "must be an integer >= 0 (0 = off)")
        need(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p",
             "must be in (0, 1] (1 = off)")
        need(isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1, "min_p",
             "must be in [0, 1] (0 = off)")
        need(isinstance(self.repetition_penalty, (int, float)) and math.isfinite(self.repetition_penalty)
             and self.repetition_penalty > 0, "repetition_penalty", "must be a finite number > 0 (1 = off)")
        need(self.seed is None or (is_int(self.seed) and self.seed >= 0), "seed",
             "must be None or an integer >= 0")
        need(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "must be token ids (integers >= 0)")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ------------------------------------------------------------------------------------------
# logits processing: same definitions and order as transformers' LogitsProcessors
# ------------------------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on tokens already present (``seen``, (B, V) bool) in prompt or output.

    Positive logits are divided by ``penalty`` and negative ones multiplied, so a penalty > 1
    always lowers a repeated token's probability (CTRL divides only, which would raise a
    negative logit); each token is penalised once however often it occurred.
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties with the k-th are kept too)."""
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p.

    Sorted ascending, a token is dropped when the mass of it and everything less likely is at
    most ``1 - p``; the most likely token always survives.
    """
    ascending, order = torch.sort(logits, dim=-1)
    tail_mass = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = tail_mass <= 1 - p
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than ``min_p`` times the most likely token's probability."""
    probs = logits.softmax(dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits (B, V) -> the scores to sample from, as HF ``generate()`` orders them."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p < 1.0:
        logits = apply_top_p(logits, params.top_p)
    if params.min_p:
        logits = apply_min_p(logits, params.min_p)
    return logits


def sample(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from processed scores (B, V): argmax, or a draw from softmax."""
    if params.greedy:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------------
# the decoding loop
# ------------------------------------------------------------------------------------------
def _as_batch(input_ids, attention_mask, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts -> left-padded (B, T) ids and mask (None when nothing is padded)."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids.to(device=device, dtype=torch.long)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"generate: input_ids must be a non-empty (batch, seq) tensor, got shape "
                             f"{tuple(input_ids.shape)}")
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask, device=device)
            if mask.ndim == 1:
                mask = mask[None]
            if mask.shape != ids.shape:
                raise ValueError(f"generate: attention_mask shape {tuple(mask.shape)} != input_ids shape "
                                 f"{tuple(ids.shape)}")
            mask = mask.long()
        else:
            mask = torch.ones_like(ids)
    else:
        if attention_mask is not None:
            raise ValueError("generate: attention_mask is only accepted with a tensor of input_ids; "
                             "lists of prompts are padded for you")
        rows = [list(input_ids)] if input_ids and isinstance(input_ids[0], int) else [list(r) for r in input_ids]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("generate: every prompt needs at least one token (got an empty prompt "
                             "or an empty batch)")
        T = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (T - len(r)) + r for r in rows], dtype=torch.long, device=device)
        mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("generate: attention_mask must hold only 0 (padding) and 1 (token)")
    if mask.shape[1] > 1 and (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("generate: prompts must be left-padded (attention_mask 0s before the 1s in "
                         "every row), so that each row's last prompt token is in the last column")
    if (mask[:, -1] == 0).any():
        raise ValueError("generate: every prompt needs at least one token (a row of attention_mask is all 0)")
    return ids, (None if bool(mask.all()) else mask)


# ------------------------------------------------------------------------------------------
# the compiled decode step (gpt-fast style): static cache, one graph per (model, batch, dtype)
# ------------------------------------------------------------------------------------------


class _DecodeLinear(TorchFunctionMode):
    """Inside the compiled CPU step: ``F.linear`` over a few rows runs a kernel built for it.

    Decoding multiplies one row per sequence by every weight matrix, so a step is bound by how fast
    the weights stream from memory. The BLAS kernels ``F.linear`` reaches are tuned for many rows:
    at 1-16 rows they stream fp32 and bf16 weights at a third to a half of the read bandwidth. One
    fp32 row becomes, on AVX-512 CPUs, the multiply-reduce ``(x * W).sum(-1)``, which inductor
    turns into a vectorised loop reading each thread's share of W as one sequential stream (2-3x the
    BLAS GEMV; end to end level with evolm's kernel there); one bf16 row, and one fp32 row on
    AVX2-only CPUs, go to the kernel (:func:`_row_kernel`, docs/performance.md). 2-16 rows go, where evolm's kernels
    build, to ``evolm_f::skinny_linear`` (each weight vector loaded once and multiplied into every
    row; evolm/kernels/skinny_gemm.cpp; 2-3x ``F.linear`` end to end at batch 8 in fp32), else
    keep ``F.linear``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.numel() // max(x.shape[-1], 1)
            if x.device.type == "cpu" and rows <= kernels.SKINNY_ROWS:
                kernel = (_skinny and x.dtype == w.dtype and w.dtype in (torch.float32, torch.bfloat16)
                          and (rows > 1 or _skinny_row[w.dtype]))
                if kernel:
                    y = torch.ops.evolm_f.skinny_linear(x.reshape(rows, -1), w.contiguous())
                elif rows == 1:
                    y = (x.reshape(1, -1).float() * w.float()).sum(-1).to(x.dtype)
                else:
                    return func(*args, **kwargs)
                y = y.reshape(*x.shape[:-1], w.shape[0])
                return y if bias is None else y + bias
        return func(*args, **kwargs)


def _step(model, tok: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
    with _DecodeLinear():
        return model(tok, position_ids=pos, cache=cache, last_only=True)[:, -1]


def _step_cpu(model, tok, pos, cache):
    return _step(model, tok, pos, cache)


def _step_other(model, tok, pos, cache):
    return _step(model, tok, pos, cache)


_compiled_steps: dict = {}  # device type -> the compiled step
_skinny_row: dict = {}  # dtype -> whether one row goes to skinny_linear too (see _row_kernel)
_skinny = False  # whether _DecodeLinear uses skinny_linear: set by compiled_step(), outside the trace


def _cpp_wrapper(device_type: str) -> bool:
    """Whether the compiled CPU step calls its kernels from C++ (``EVOLM_CPP_WRAPPER=0``: no)."""
    return device_type == "cpu" and os.environ.get("EVOLM_CPP_WRAPPER", "1") != "0"


def _row_kernel(dtype: torch.dtype = torch.float32) -> str:
    """The one-row product of the compiled CPU step for ``dtype`` weights: ``"reduce"`` (inductor's
    multiply-reduce) or ``"skinny"`` (evolm's kernel). Measured (docs/performance.md), SmolLM2
    fused, batch 1: bf16 skinny everywhere (AVX-512 with BF16, two A/B rounds: 86.6 / 97.3 vs
    69.4 / 73.8 tok/s); fp32 skinny on AVX2-only CPUs (four rounds: 42-44 vs 38-41), reduce on
    AVX-512 ones (48 / 48 vs 52 / 56, both near the host's read bandwidth).
    ``EVOLM_ROW1=skinny|reduce`` overrides."""
    env = os.environ.get("EVOLM_ROW1")
    if env in ("skinny", "reduce"):
        return env
    return "reduce" if dtype == torch.float32 and kernels.cpu_has_avx512() else "skinny"


def compiled_step(device_type: str = "cpu"):
    """``torch.compile`` of one decode step over a ``StaticKVCache`` in static mode.

    Decoding a small model on a CPU spends much of each step in Python and in launching a
    thousand small kernels (30 layers x ~40 ops); compiling the whole step into one graph runs
    the element-wise work as fused C++ loops and calls the matmuls directly. Positions live in
    tensors, the cache length is a dynamic dimension and every other shape is fixed, so the
    graph is built once per (model structure, batch, dtype) and reused at every step and every
    later call, whatever the prompt length (check with ``torch._dynamo.utils.counters``).
    Parameters are graph inputs, so two models of the same configuration share the graph.

    On CPU the graph's driver is C++ too (inductor's ``cpp_wrapper``): the Python wrapper that
    calls the ~400 kernels of a SmolLM2 step one by one cost ~4 ms of a ~18 ms step (profiled,
    int4 weights, 2 threads); in C++ the step decodes 10-18% more tokens per second
    (docs/performance.md), for ~40 s more compilation the first time (inductor caches it).
    """
    global _skinny, _skinny_row
    # builds the CPU kernels on first use: never inside the trace, and never for a GPU step
    _skinny = device_type == "cpu" and kernels.skinny_enabled()
    _skinny_row = {dt: _skinny and _row_kernel(dt) == "skinny" for dt in (torch.float32, torch.bfloat16)}
    attention.DECODE_KERNEL = _skinny and os.environ.get("EVOLM_DECODE_ATTN", "1") != "0"
    if device_type not in _compiled_steps:
        # each (structure, batch, dtype) is one more entry on the same code object: allow many
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        opts = {"cpp_wrapper": True} if _cpp_wrapper(device_type) else None
        # distinct code objects: dynamo keeps compiled code per code object, options per compile
        step = _step_cpu if device_type == "cpu" else _step_other
        _compiled_steps[device_type] = torch.compile(step, dynamic=False, backend=graph_call.backend(opts))
    return _compiled_steps[device_type]


def _prefill(model, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, kv: PrefillKV) -> torch.Tensor:
    return model(ids, position_ids=pos, attention_mask=mask, cache=kv, last_only=True)[:, -1]


def _prefill_cpu(model, ids, pos, mask, kv):
    return _prefill(model, ids, pos, mask, kv)


def _prefill_other(model, ids, pos, mask, kv):
    return _prefill(model, ids, pos, mask, kv)


_compiled_prefills: dict = {}  # device type -> the compiled prefill
_COMPILE_PREFILL = os.environ.get("EVOLM_COMPILE_PREFILL", "1") != "0"


def compiled_prefill(device_type: str = "cpu"):
    """``torch.compile`` of a prompt's forward pass from an empty cache (see :class:`PrefillKV`).

    A prompt's time is the matrix products (80% of it on a CPU, the same oneDNN/BLAS calls as any
    engine's) plus ~15 element-wise passes per layer over (B, T, d) activations: norms, rotary,
    activation times gate, residual adds. Compiled, those become a few fused loops: a 256-token
    prompt ran 8-13% faster in bf16 and 0-6% in fp32 than the eager forward on 2 Zen 4 cores
    (docs/performance.md). The prompt length is a dynamic dimension: one graph per (model
    structure, batch, dtype) serves prompts of every length (of more than one token).
    """
    if device_type not in _compiled_prefills:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # distinct code objects per device type, as for the compiled step
        fn = _prefill_cpu if device_type == "cpu" else _prefill_other
        _compiled_prefills[device_type] = torch.compile(fn, dynamic=None)
    return _compiled_prefills[device_type]


def prefill(model, ids: torch.Tensor, cache: KVCache, position_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None, compile: bool = False) -> torch.Tensor:
    """The prompt's next-token logits (B, V), its keys/values stored in ``cache``.

    ``compile`` (with an empty ``StaticKVCache``, as ``generate(..., compile=True)`` makes): one
    compiled graph for the whole prompt (:func:`compiled_prefill`; ``EVOLM_COMPILE_PREFILL=0``
    keeps the eager forward).
    """
    if compile and _COMPILE_PREFILL and isinstance(cache, StaticKVCache) and cache.length == 0 and not cache.static:
        if position_ids is None:
            position_ids = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        for t in (ids, position_ids, attention_mask):  # one graph for every prompt length
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, 1)
        kv = PrefillKV()
        logits = compiled_prefill(ids.device.type)(model, ids, position_ids, attention_mask, kv)
        cache.store_prefill(kv, ids.shape[1], attention_mask)
        return logits
    return model(ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache, last_only=True)[:, -1]


_DIRECT = os.environ.get("EVOLM_DIRECT_STEP", "1") != "0"
_CUDA_GRAPH = os.environ.get("EVOLM_CUDA_GRAPH", "1") != "0"


def _cuda_graphed(direct: Callable) -> Callable:
    """The bound compiled step (``direct``) replayed as one CUDA graph.

    On a GPU a decode step of a small model is a few hundred short kernels, and launching them
    from the CPU (a few microseconds each) takes longer than running them: the GPU waits on
    Python and the driver. A CUDA graph records the step's launches once and replays them with a
    single call (what gpt-fast and inductor's "reduce-overhead" mode do). Every input of the step
    is a fixed tensor here: the weights, the static cache (written in place at ``cache.pos``,
    which the step itself advances), and the token and position, which are copied into two
    buffers the graph reads. The first call runs the step for real on a side stream (lazy
    initialisations must not happen during capture), the second captures and replays it, later
    ones only replay. The logits returned live in the graph's memory and are overwritten by the
    next replay, so they are used before it (as the decoding loop does). ``EVOLM_CUDA_GRAPH=0``
    turns it off.
    """
    state: dict = {}

    def call(model, tok, pos, cache):
        if "graph" in state:
            state["tok"].copy_(tok)
            state["pos"].copy_(pos)
            state["graph"].replay()
            return state["out"]
        if "tok" not in state:  # first call: a real step, on a side stream of the model's GPU
            state["tok"], state["pos"] = tok.clone(), pos.clone()
            with torch.cuda.device(tok.device):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = direct(model=model, tok=state["tok"], pos=state["pos"], cache=cache)
                torch.cuda.current_stream().wait_stream(side)
            return out
        if state.get("failed"):
            return direct(model=model, tok=tok, pos=pos, cache=cache)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(tok.device), torch.cuda.graph(graph):
                state["out"] = direct(model=model, tok=state["tok"], pos=state["pos"], cache=cache)
        except Exception as e:  # nothing ran during the capture: decode on without the graph
            warnings.warn(f"evolm: the decode step could not be captured as a CUDA graph, running it "
                          f"uncaptured ({type(e).__name__}: {e})")
            state["failed"] = True
            return call(model, tok, pos, cache)
        state["graph"] = graph
        return call(model, tok, pos, cache)

    call.state = state  # for tests: "graph" in it once captured
    return call


def _call_step(step_fn, model, tok, pos, cache) -> tuple[torch.Tensor, Callable | None]:
    """One compiled decode step through dynamo (every guard checked), and the same graph bound for
    the next steps of this call without dynamo (:mod:`evolm.graph_call`; None where it cannot be
    bound or ``EVOLM_DIRECT_STEP=0``)."""
    graph_call.reset()
    logits = step_fn(model, tok, pos, cache)
    direct = graph_call.bind(model=model, tok=tok, pos=pos, cache=cache) if _DIRECT else None
    if direct is not None and tok.device.type == "cuda" and _CUDA_GRAPH:
        direct = _cuda_graphed(direct)
    return logits, direct


def _new_cache(model, batch: int, max_len: int) -> KVCache:
    """The KV cache for one generate call: ring buffers for sliding-window layers when available."""
    if hasattr(KVCache, "for_model"):
        return KVCache.for_model(model, batch, max_len)
    return KVCache(batch, max_len)


def _stop_set(params: SamplingParams, tokenizer=None) -> list[int]:
    ids = set(params.stop_token_ids)
    if tokenizer is not None and not params.ignore_eos:
        eos = getattr(tokenizer, "eos_ids", None)
        eos = eos() if callable(eos) else eos
        ids |= {eos} if isinstance(eos, int) else set(eos or ())
    return sorted(ids)


def _decode_steps(model, ids: torch.Tensor, mask: torch.Tensor | None, params: SamplingParams,
                  stop_ids: Sequence[int], compile: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next tokens (B,), row-still-running (B,) bool) once per generated position.

    Rows that produced a stop token are finished; they keep being fed (their output is ignored)
    until every row is finished or ``max_new_tokens`` is reached. ``compile``: prefill with
    :func:`compiled_prefill` into a ``StaticKVCache``, then decode with :func:`compiled_step`.
    """
    c = model.config
    B, T = ids.shape
    device = ids.device
    n_new = params.max_new_tokens
    if n_new == 0:
        return
    real = mask if mask is not None else torch.ones_like(ids)
    longest = int(real.sum(-1).max())
    if c.pos_emb == "learned" and longest + n_new - 1 > c.max_seq_len:
        raise ValueError(f"generate: prompt of {longest} tokens + max_new_tokens={n_new} exceeds the "
                         f"model's max_seq_len={c.max_seq_len} (learned position embeddings)")
    if int(ids.max()) >= c.vocab_size or int(ids.min()) < 0:
        raise ValueError(f"generate: token ids must be in [0, {c.vocab_size}) (the model's vocab_size), "
                         f"got {int(ids.min())}..{int(ids.max())}")

    generator = None
    if params.seed is not None and not params.greedy:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    seen = None
    if params.repetition_penalty != 1.0:  # tokens of prompt (padding excluded) and output so far
        seen = torch.zeros(B, c.vocab_size + 1, dtype=torch.bool, device=device)
        seen = seen.scatter_(1, ids.masked_fill(real == 0, c.vocab_size), True)[:, :c.vocab_size]
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    running = torch.ones(B, dtype=torch.bool, device=device)

    # positions count real tokens only: a left-padded row starts at 0 on its first real token
    pos = (real.cumsum(-1) - 1).clamp(min=0)
    if compile:
        cache = StaticKVCache(B, T + n_new, device=device)
    else:
        cache = _new_cache(model, B, T + n_new)
    logits = prefill(model, ids, cache, pos, mask, compile=compile)
    next_pos = pos[:, -1:] + 1
    step_mask = torch.ones(B, 1, dtype=torch.long, device=device) if mask is not None else None
    step_fn = direct = None
    if compile:
        cache.start_static()
        step_fn, step_mask = compiled_step(device.type), None
    for step in range(n_new):
        tok = sample(process_logits(logits, params, seen), params, generator)
        yield tok, running
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        if len(stops):
            running = running & ~torch.isin(tok, stops)
        if step == n_new - 1 or (len(stops) and not bool(running.any())):
            return
        if direct is not None:
            logits = direct(model=model, tok=tok[:, None], pos=next_pos, cache=cache)
        elif step_fn is not None:
            logits, direct = _call_step(step_fn, model, tok[:, None], next_pos, cache)
        else:
            logits = model(tok[:, None], position_ids=next_pos, attention_mask=step_mask, cache=cache,
                           last_only=True)[:, -1]
        next_pos = next_pos + 1


class _EvalMode:
    """Run the model in eval mode (no dropout) and restore its previous mode afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


@torch.inference_mode()
def generate(model, input_ids, params: SamplingParams | None = None,
             attention_mask: torch.Tensor | None = None, compile: bool = False) -> list[list[int]]:
    """New token ids per prompt (a stop token, when hit, is the last id of its row).

    ``input_ids``: a list of prompts (lists of ids, any lengths: we left-pad), one list of ids,
    or a (B, T) tensor that is left-padded with ``attention_mask`` (1 token / 0 padding).
    Stop strings need a tokenizer: use :func:`stream` or :func:`generate_text`.
    ``compile=True`` decodes with a ``torch.compile``-d step over a static cache (the first call
    for a new batch size / dtype pays the compilation; see :func:`compiled_step`).
    """
    params = params or SamplingParams()
    if params.stop:
        raise ValueError("generate: SamplingParams.stop (stop strings) needs a tokenizer; "
                         "use evolm.generate.stream or generate_text, or stop_token_ids")
    device = next(model.parameters()).device
    ids, mask = _as_batch(input_ids, attention_mask, device)
    out: list[list[int]] = [[] for _ in range(ids.shape[0])]
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    with _EvalMode(model):
        for tok, running in _decode_steps(model, ids, mask, params, _stop_set(params), compile):
            steps.append((tok, running))
    if steps:
        toks = torch.stack([t for t, _ in steps], 1).tolist()
        live = torch.stack([r for _, r in steps], 1).tolist()
        out = [[t for t, keep in zip(trow, lrow) if keep] for trow, lrow in zip(toks, live)]
    return out


# ------------------------------------------------------------------------------------------
# streaming text
# ------------------------------------------------------------------------------------------
class TokenizerLike(Protocol):
    """What generation needs from a tokenizer (``evolm.tokenizer.Tokenizer`` provides it)."""

    eos_ids: Any

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class IncrementalDecoder:
    """Token ids in, complete text pieces out; the pieces concatenate to ``decode(all ids)``.

    We keep two offsets into the ids: text up to ``read`` has been emitted, and decoding starts
    at ``start`` (one emission behind) so the window's first token -- which some decoders treat
    specially, e.g. dropping a SentencePiece word's leading space -- is never a token whose text
    we still need. A piece is emitted only when the window's text grew and does not end in
    U+FFFD, the replacement for a UTF-8 character whose remaining bytes are in the next token.
    """

    def __init__(self, tokenizer: TokenizerLike):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (e.g. bytes that never completed a character)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.start:self.read])
        now = self.tokenizer.decode(self.ids[self.start:])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        self.start, self.read = self.read, len(self.ids)
        return now[len(before):]


class StopStrings:
    """Cuts streamed text at the first stop string; holds back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return what is safe to emit now. Sets ``stopped`` once a stop string appears."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        hold = 0  # longest tail of pending that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


@torch.inference_mode()
def stream(model, tokenizer: TokenizerLike, prompt_ids, params: SamplingParams | None = None,
           compile: bool = False) -> Iterator[str]:
    """Yield the continuation of one prompt as text pieces, as the tokens arrive.

    No piece splits a UTF-8 character; generation stops at ``params.stop_token_ids``, the
    tokenizer's ``eos_ids`` (unless ``params.ignore_eos``), ``max_new_tokens``, or the first of
    ``params.stop`` strings, which is not emitted.
    """
    params = params or SamplingParams()
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.ndim == 2 and prompt_ids.shape[0] != 1:
            raise ValueError(f"stream: takes one prompt, got a batch of {prompt_ids.shape[0]}")
        prompt_ids = prompt_ids.reshape(-1).tolist()
    prompt_ids = list(prompt_ids)
    if prompt_ids and not isinstance(prompt_ids[0], int):
        raise ValueError("stream: takes one prompt (a list of token ids), not a batch")
    device = next(model.parameters()).device
    ids, mask = _as_batch([prompt_ids], None, device)
    stop_ids = _stop_set(params, tokenizer)
    decoder, stopper = IncrementalDecoder(tokenizer), StopStrings(params.stop)
    with _EvalMode(model):
        for tok, _ in _decode_steps(model, ids, mask, params, stop_ids, compile):
            t = int(tok[0])
            if t in stop_ids:
                break
            piece = stopper.push(decoder.push(t))
            if piece:
                yield piece
            if stopper.stopped:
                return
    piece = stopper.push(decoder.flush())
    piece += stopper.flush()
    if piece:
        yield piece


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation rendered with the tokenizer's chat template, the assistant turn opened."""
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if isinstance(rendered, dict) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"]
    if isinstance(rendered, str):  # the template already holds any BOS it wants: add none
        try:
            return list(tokenizer.encode(rendered, add_special_tokens=False))
        except TypeError:
            return list(tokenizer.encode(rendered))
    return list(rendered)


def generate_text(model, tokenizer: TokenizerLike, prompt: str, params: SamplingParams | None = None,
                  chat: bool = False, compile: bool = False) -> str:
    """The continuation of ``prompt`` as a string (only the new text).

    ``chat=True`` wraps the prompt as a user message with the tokenizer's chat template (with the
    assistant turn opened) and stops at the template's end token (the tokenizer's ``eos_ids``).
    """
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}]) if chat else list(tokenizer.encode(prompt))
    return "".join(stream(model, tokenizer, ids, params, compile))


__all__ = ["SamplingParams", "generate", "stream", "compiled_step", "compiled_prefill", "prefill", "generate_text",
           "chat_prompt_ids",
           "process_logits", "sample",
           "apply_repetition_penalty", "apply_top_k", "apply_top_p", "apply_min_p",
           "IncrementalDecoder", "StopStrings"]
