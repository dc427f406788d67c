"""Batched generation with stop strings, as lm-evaluation-harness' HFLM ``generate_until`` does it.

A request is ``(context, gen_kwargs)``; its answer is the generated text cut at the first stop
string. To give the very text lm-eval + transformers give, we follow HFLM
(``lm_eval/models/huggingface.py``) step by step:

- requests are grouped by their generation kwargs and sorted longest context first;
- the context is encoded with the tokenizer's defaults (a BOS where the model wants one) and
  left-truncated to ``max_length - max_gen_toks`` tokens;
- the decoded EOS token is appended to the stop strings (``handle_stop_sequences``);
- decoding runs (greedy unless ``do_sample``) until every row of the batch has produced an EOS
  token, contains a stop string, or reached ``max_gen_toks``;
- the row's tokens are decoded with special tokens skipped and the text is split at each stop
  string in turn (``postprocess_generated_text``), keeping what comes before.

Sampling (``do_sample: true`` with ``temperature`` / ``top_p`` / ``top_k``) is what HumanEval's
pass@k needs: each row of a batch draws independently; ``seed`` makes a run reproducible for a
given batch size. The decoding loop itself is ``evolm.infer.decode``'s (one prefill that fills the
KV cache, then one token per step for the whole left-padded batch).
"""

from __future__ import annotations

import json
from typing import Sequence

import torch

from evolm.infer.decode import EvalMode, as_batch, decode_steps
from evolm.infer.sampling import SamplingParams


def normalize_gen_kwargs(kwargs: dict | None, default_max_gen_toks: int = 256) -> dict:
    """lm-eval's ``normalize_gen_kwargs``: until as a list, max_gen_toks resolved, greedy unless sampling."""
    kw = dict(kwargs or {})
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_gen = default_max_gen_toks
    for name in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
        if kw.get(name) is not None:
            max_gen = int(kw[name])
            break
    temperature = float(kw.get("temperature", 0.0) or 0.0)
    do_sample = kw.get("do_sample")
    if do_sample is None:
        do_sample = temperature > 0
    if not do_sample:
        temperature = 0.0
    elif temperature == 0.0:
        temperature = 1.0  # transformers' default when sampling without a temperature
    return {"until": until, "max_gen_toks": max_gen, "do_sample": bool(do_sample), "temperature": temperature,
            "top_p": float(kw.get("top_p", 1.0) or 1.0), "top_k": int(kw.get("top_k", 0) or 0)}


def postprocess(text: str, until: Sequence[str]) -> str:
    """Cut ``text`` before each stop string in turn (lm-eval's ``postprocess_generated_text``)."""
    for s in until:
        if s:
            text = text.split(s)[0]
    return text


def _eos_text(tokenizer) -> str | None:
    eos = getattr(tokenizer, "eos_id", None)
    return None if eos is None else tokenizer.decode([eos], skip_special_tokens=False)


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[list[int]], params: SamplingParams,
                   until: Sequence[str]) -> list[str]:
    """Generate for a batch of token-id prompts; each row stops at EOS, a stop string or the limit.

    Returns the decoded continuations (special tokens skipped), not yet cut at the stop strings.
    """
    device = next(model.parameters()).device
    ids, mask = as_batch(prompts, None, device)
    eos = set(getattr(tokenizer, "eos_ids", None) or [])
    if not eos and getattr(tokenizer, "eos_id", None) is not None:
        eos = {tokenizer.eos_id}
    B = len(prompts)
    rows: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    with EvalMode(model):
        steps = decode_steps(model, ids, mask, params, sorted(eos))
        try:
            for tok, _ in steps:
                for b, t in enumerate(tok.tolist()):
                    if done[b]:
                        continue
                    if t in eos:
                        done[b] = True
                        continue
                    rows[b].append(t)
                    if until:
                        text = tokenizer.decode(rows[b][-64:], skip_special_tokens=True)
                        if any(s in text for s in until):
                            done[b] = True
                if all(done):
                    break
        finally:
            steps.close()
    return [tokenizer.decode(r, skip_special_tokens=True) for r in rows]


def generate_until(model, tokenizer, requests: Sequence[tuple[str, dict]], batch_size: int = 8,
                   max_length: int | None = None, seed: int = 1234, cache=None, progress: bool = False,
                   keys: Sequence[str] | None = None) -> list[str]:
    """``[(context, gen_kwargs)] -> [generated text]`` with lm-eval's HFLM semantics (module docstring).

    ``cache``: a ``LoglikScorer`` whose per-request JSONL cache also stores generations (resume);
    ``keys``: optional distinct ids per request (sampled repeats of one prompt need different keys).
    """
    max_length = int(max_length or getattr(getattr(model, "config", None), "max_seq_len", 2048))
    eos_text = _eos_text(tokenizer)
    out: list[str | None] = [None] * len(requests)
    ck = []
    for i, (ctx, kw) in enumerate(requests):
        extra = keys[i] if keys is not None else ""
        ck.append(cache._key("gen", ctx, json.dumps(kw, sort_keys=True), extra) if cache is not None else None)
        if cache is not None and ck[i] in cache.cache:
            out[i] = cache.cache[ck[i]][0]
    groups: dict[str, list[int]] = {}
    for i, (_, kw) in enumerate(requests):
        if out[i] is None:
            groups.setdefault(json.dumps(kw, sort_keys=True), []).append(i)
    bar = _bar(sum(len(v) for v in groups.values()), progress)
    for gkey, idx in groups.items():
        kw = normalize_gen_kwargs(json.loads(gkey))
        until = list(kw["until"])
        if eos_text and eos_text not in until:
            until.append(eos_text)
        max_gen = kw["max_gen_toks"]
        if max_gen >= max_length:
            raise ValueError(f"generate_until: max_gen_toks={max_gen} must be below the model's max_length="
                             f"{max_length} (the context needs room)")
        enc = {i: list(tokenizer.encode(requests[i][0]))[-(max_length - max_gen):] or
               [tokenizer.eos_id if tokenizer.eos_id is not None else 0] for i in idx}
        order = sorted(idx, key=lambda i: (-len(enc[i]), requests[i][0]))
        for b in range(0, len(order), batch_size):
            part = order[b:b + batch_size]
            params = SamplingParams(max_new_tokens=max_gen, temperature=kw["temperature"], top_p=kw["top_p"],
                                    top_k=kw["top_k"], seed=(seed + b) if kw["do_sample"] else None)
            texts = generate_batch(model, tokenizer, [enc[i] for i in part], params, until)
            done = []
            for i, text in zip(part, texts):
                out[i] = postprocess(text, until)
                if cache is not None:
                    done.append((ck[i], [out[i], False]))
            if cache is not None:
                cache._store(done)
            bar.update(len(part))
    bar.close()
    return out  # type: ignore[return-value]


def _bar(total: int, enabled: bool):
    from .loglik import _progress

    bar = _progress(total, enabled and total > 1)
    if hasattr(bar, "set_description"):
        bar.set_description("generate_until")
    return bar
