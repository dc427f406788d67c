"""How the next token is chosen: sampling parameters, logits processors, the draw.

Sampling follows the definitions that Hugging Face ``generate()`` applies, in its order:
repetition penalty (Keskar et al. 2019, CTRL, arXiv:1909.05858), then -- only when sampling --
temperature, top-k (Fan et al. 2018, arXiv:1805.04833), top-p / nucleus (Holtzman et al. 2019,
arXiv:1904.09751) and min-p (Nguyen et al. 2024, arXiv:2407.01082). ``temperature=0`` is greedy.
The serving scheduler applies the same functions per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch


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
        scaled = logits / params.temperature
        if bool((scaled.isposinf() | scaled.isnan()).any()):
            scaled = _scale_shifted(logits, params.temperature)
        logits = scaled
    if params.top_k:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p < 1.0:
        logits = apply_top_p(logits, params.top_p)
    if params.min_p:
        logits = apply_min_p(logits, params.min_p)
    return logits


def _scale_shifted(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` for a temperature so small that float32 overflows (or rounds it
    to 0): the same softmax, computed as (logits - row max) / T in float64, so the top tokens
    score 0 and the rest -inf instead of +inf and NaN."""
    shifted = logits.double() - logits.double().amax(dim=-1, keepdim=True)
    return (shifted / temperature).float()


def sample(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from processed scores (B, V): argmax, or a draw from softmax."""
    if params.greedy:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    if bool(probs.isnan().any()):  # +inf or NaN scores: one check on the usual path
        probs = _finite(scores).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _finite(scores: torch.Tensor) -> torch.Tensor:
    """Scores a softmax can take: logits at +inf (softmax then gives NaN and multinomial fails)
    become the largest float, so the draw picks among them; NaN is dropped; a row with no
    finite score left means the model itself produced none, which is an error, not a draw."""
    scores = torch.nan_to_num(scores, nan=float("-inf"), posinf=torch.finfo(scores.dtype).max)
    dead = torch.isneginf(scores).all(dim=-1)
    if bool(dead.any()):
        raise ValueError(f"sampling: row(s) {dead.nonzero().flatten().tolist()} have no finite score "
                         "(the model's logits are NaN or -inf everywhere)")
    return scores

