"""The decoding loop: validate a batch, prefill the prompt, decode one token per step, generate.

The loop is the one every LM server runs: *prefill* the whole prompt in one forward pass that
fills the KV cache, then *decode* one token per step, feeding only the new token and letting
attention read the past from the cache (so a step costs O(context), not O(context^2)).

Batches of prompts of different lengths are left-padded: every row's last prompt token sits in
the last column, so one decode step serves all rows. Padding is masked out through
``attention_mask`` (the cache remembers it) and each row's positions count only its real tokens.

An encoder-decoder (T5, BART) reads the prompt once with its encoder (:meth:`Transformer.encode`,
whose cross-attention keys/values are then cached per layer), and its decoder starts from
``decoder_start_token_id`` and generates token by token over its own KV cache.

Which token comes next is :mod:`evolm.infer.sampling`'s; text, streaming and stop strings are
:mod:`evolm.infer.text`'s; the compiled step is :mod:`evolm.infer.compiled`'s.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from evolm.cache import KVCache, PrefillKV, StaticKVCache
from evolm.infer.compiled import compiled_prefill, compiled_step, first_step, use_attention_policy
from evolm.infer.sampling import SamplingParams, process_logits, sample
from evolm.quant.policy import DEFAULT_POLICY, KernelPolicy


def as_batch(input_ids, attention_mask, device) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def prefill(model, ids: torch.Tensor, cache: KVCache, position_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None, compile: bool = False,
            policy: KernelPolicy = DEFAULT_POLICY, **image_kw) -> torch.Tensor:
    """The prompt's next-token logits (B, V), its keys/values stored in ``cache``.

    ``compile`` (with an empty ``StaticKVCache``, as ``generate(..., compile=True)`` makes): one
    compiled graph for the whole prompt (:func:`compiled_prefill`; the policy's ``compile_prefill``
    off keeps the eager forward). ``image_kw``: a vision model's image arguments (eager only).
    """
    if compile and policy.compile_prefill and isinstance(cache, StaticKVCache) and cache.length == 0 and not cache.static:
        if position_ids is None:
            position_ids = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        for t in (ids, position_ids, attention_mask):  # one graph for every prompt length
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, 1)
        use_attention_policy(model, policy, ids.device.type)
        kv = PrefillKV()
        logits = compiled_prefill(ids.device.type)(model, ids, position_ids, attention_mask, kv)
        cache.store_prefill(kv, ids.shape[1], attention_mask)
        return logits
    return model(ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache, last_only=True,
                 **image_kw)[:, -1]



def new_cache(model, batch: int, max_len: int) -> KVCache:
    """The KV cache for one generate call: ring buffers for sliding-window layers when available."""
    if hasattr(KVCache, "for_model"):
        return KVCache.for_model(model, batch, max_len)
    return KVCache(batch, max_len)


def stop_tokens(params: SamplingParams, tokenizer=None) -> list[int]:
    """The token ids that end a row: ``params.stop_token_ids`` and the tokenizer's end-of-sequence
    ids (unless ``params.ignore_eos``)."""
    ids = set(params.stop_token_ids)
    if tokenizer is not None and not params.ignore_eos:
        eos = getattr(tokenizer, "eos_ids", None)
        eos = eos() if callable(eos) else eos
        ids |= {eos} if isinstance(eos, int) else set(eos or ())
    return sorted(ids)


def check_prompt(model, ids: torch.Tensor, real: torch.Tensor, n_new: int) -> None:
    """Token ids the model has, and room for ``n_new`` more (learned positions end at max_seq_len)."""
    c = model.config
    longest = int(real.sum(-1).max())
    if c.encoder_layers and c.pos_emb == "learned" and max(ids.shape[1], n_new) > c.max_seq_len:
        raise ValueError(f"generate: prompt of {ids.shape[1]} columns or max_new_tokens={n_new} exceeds the "
                         f"model's max_seq_len={c.max_seq_len} (learned position embeddings)")
    if not c.encoder_layers and c.pos_emb == "learned" and longest + n_new - 1 > c.max_seq_len:
        raise ValueError(f"generate: prompt of {longest} tokens + max_new_tokens={n_new} exceeds the "
                         f"model's max_seq_len={c.max_seq_len} (learned position embeddings)")
    if int(ids.max()) >= c.vocab_size or int(ids.min()) < 0:
        raise ValueError(f"generate: token ids must be in [0, {c.vocab_size}) (the model's vocab_size), "
                         f"got {int(ids.min())}..{int(ids.max())}")


def seen_tokens(ids: torch.Tensor, real: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: the tokens of each prompt, padding excluded (what the repetition penalty sees)."""
    seen = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    return seen.scatter_(1, ids.masked_fill(real == 0, vocab_size), True)[:, :vocab_size]


def decode_steps(model, ids: torch.Tensor, mask: torch.Tensor | None, params: SamplingParams,
                 stop_ids: Sequence[int], compile: bool = False, policy: KernelPolicy = DEFAULT_POLICY,
                 images: dict | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next tokens (B,), row-still-running (B,) bool) once per generated position.

    Rows that produced a stop token are finished; they keep being fed (their output is ignored)
    until every row is finished or ``max_new_tokens`` is reached. ``compile``: prefill with
    :func:`compiled_prefill` into a ``StaticKVCache``, then decode with :func:`compiled_step`,
    with the ``policy``'s kernels. ``images``: one image per row (``evolm.infer.vision.load_images``),
    whose placeholder tokens the prompt holds (a vision model; :mod:`evolm.infer.vision` says how
    each call gets it).
    """
    B, T = ids.shape
    device = ids.device
    n_new = params.max_new_tokens
    if n_new == 0:
        return
    real = mask if mask is not None else torch.ones_like(ids)
    check_prompt(model, ids, real, n_new)
    generator = None
    if params.seed is not None and not params.greedy:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    # tokens of prompt and output so far, for the repetition penalty
    seq2seq = bool(model.config.encoder_layers)
    compile = compile and not seq2seq  # the compiled step is the decoders'; an encoder-decoder decodes eagerly
    first_kw = step_kw = {}
    if images is not None:  # the image enters the prefill (and, with cross-attention, every step)
        from evolm.infer.vision import decode_inputs

        first_kw, step_kw = decode_inputs(model, images, ids)
        compile = False  # the compiled graphs take tokens only
    seen = seen_tokens(ids, real, model.config.vocab_size) if params.repetition_penalty != 1.0 else None
    if seen is not None and seq2seq:  # as transformers does: the penalty sees the decoder's tokens only
        seen.zero_()
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    running = torch.ones(B, dtype=torch.bool, device=device)

    # positions count real tokens only: a left-padded row starts at 0 on its first real token
    pos = (real.cumsum(-1) - 1).clamp(min=0)
    if seq2seq:
        cache, decoder_step = seq2seq_start(model, ids, mask, n_new)
        start = torch.full((B, 1), model.config.decoder_start_token_id, dtype=torch.long, device=device)
        logits, next_pos = decoder_step(start), None
    else:
        cache = StaticKVCache(B, T + n_new, device=device) if compile else new_cache(model, B, T + n_new)
        logits = prefill(model, ids, cache, pos, mask, compile=compile, policy=policy, **first_kw)
        next_pos = pos[:, -1:] + 1
    step_mask = torch.ones(B, 1, dtype=torch.long, device=device) if mask is not None else None
    step_fn = direct = None
    if compile:
        cache.start_static()
        step_fn, step_mask = compiled_step(device.type, policy), None
    for step in range(n_new):
        tok = sample(process_logits(logits, params, seen), params, generator)
        yield tok, running
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        if len(stops):
            running = running & ~torch.isin(tok, stops)
        if step == n_new - 1 or (len(stops) and not bool(running.any())):
            return
        if seq2seq:
            logits = decoder_step(tok[:, None])
        elif direct is not None:
            logits = direct(model=model, tok=tok[:, None], pos=next_pos, cache=cache)
        elif step_fn is not None:
            logits, direct = first_step(step_fn, model, tok[:, None], next_pos, cache, policy)
        else:
            logits = model(tok[:, None], position_ids=next_pos, attention_mask=step_mask, cache=cache,
                           last_only=True, **step_kw)[:, -1]
        next_pos = next_pos + 1 if next_pos is not None else None


def seq2seq_start(model, ids: torch.Tensor, mask: torch.Tensor | None, n_new: int):
    """An encoder-decoder's request: the encoder run once, the decoder's KV cache, and the step that
    feeds the decoder one token per row and returns the next-token logits (B, V)."""
    cross = model.encode(ids, mask)  # its per-layer keys/values are cached at the first step
    cache = new_cache(model, ids.shape[0], n_new + 1)

    def step(tok: torch.Tensor) -> torch.Tensor:
        return model(None, decoder_input_ids=tok, cache=cache, cross=cross, last_only=True)[:, -1]
    return cache, step


class EvalMode:
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
             attention_mask: torch.Tensor | None = None, compile: bool = False,
             policy: KernelPolicy | None = None, images: dict | None = None) -> list[list[int]]:
    """New token ids per prompt (a stop token, when hit, is the last id of its row).

    ``input_ids``: a list of prompts (lists of ids, any lengths: we left-pad), one list of ids,
    or a (B, T) tensor that is left-padded with ``attention_mask`` (1 token / 0 padding).
    Stop strings need a tokenizer: use :func:`stream` or :func:`generate_text`.
    ``compile=True`` decodes with a ``torch.compile``-d step over a static cache (the first call
    for a new batch size / dtype pays the compilation; see :func:`compiled_step`) with the kernels
    of ``policy`` (default: ``KernelPolicy()``, the measured choices). ``images``: a vision model's
    image for each prompt (``evolm.infer.vision.load_images``), whose placeholder tokens the prompt
    holds (``evolm.infer.vision.image_prefix``).
    """
    params = params or SamplingParams()
    if params.stop:
        raise ValueError("generate: SamplingParams.stop (stop strings) needs a tokenizer; "
                         "use evolm.infer.text.stream or generate_text, or stop_token_ids")
    device = next(model.parameters()).device
    ids, mask = as_batch(input_ids, attention_mask, device)
    out: list[list[int]] = [[] for _ in range(ids.shape[0])]
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    with EvalMode(model):
        for tok, running in decode_steps(model, ids, mask, params, stop_tokens(params), compile,
                                          policy or DEFAULT_POLICY, images=images):
            steps.append((tok, running))
    if steps:
        toks = torch.stack([t for t, _ in steps], 1).tolist()
        live = torch.stack([r for _, r in steps], 1).tolist()
        out = [[t for t, keep in zip(trow, lrow) if keep] for trow, lrow in zip(toks, live)]
    return out
