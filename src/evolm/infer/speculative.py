"""Self-speculative greedy decoding with DeepSeek-V3's multi-token prediction modules.

The MTP modules (``nn/mtp.py``) that were trained to predict tokens 2..D+1 ahead draft ``k <= D``
tokens from the main model's last hidden state; the main model then checks all of them in *one*
forward pass over ``[next, draft_1 .. draft_k]`` and keeps the longest prefix of drafts that equal
its own greedy choices, plus its own next token after that prefix. Every kept token is the main
model's argmax given the tokens before it, so the output equals plain greedy decoding; the drafts
only decide how many tokens one main forward pass yields (1 to k+1). DeepSeek-V3 reports 85-90%
acceptance of the second token and 1.8x tokens per second (arXiv:2412.19437 sec. 5.4.3).

Caches: the main model and each MTP block keep plain (unringed) KV caches, so a rejected suffix
is dropped by moving the cache's length back. MTP depth j at position i needs token i+j; it is
exact (kept in its cache) only where that token is committed, and recomputed from drafts
otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from evolm.cache import KVCache
from evolm.nn.mtp import head_logits, mtp_inputs, token_embedding


@dataclass
class SpeculativeResult:
    """The new tokens and what the drafts were worth."""

    tokens: list[int]
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of them, kept
    main_forwards: int = 0  # main-model passes (prefill included)
    seconds: float = 0.0
    per_depth: list[int] = field(default_factory=list)  # accepted drafts at each depth

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / max(1, self.main_forwards)


def _main_logits(model, h: torch.Tensor) -> torch.Tensor:
    """The main head on final-normed states, as ``Transformer.output`` computes it."""
    w, b = model.head_weight_bias()
    logits = F.linear(h, w, b)
    cap = model.config.final_softcap
    return cap * torch.tanh(logits / cap) if cap is not None else logits


class _Drafter:
    """The MTP modules' caches and exact states: ``hist[j]`` holds h^j (j = 0: the main model's
    final-normed states) at every position where it depends on committed tokens only."""

    def __init__(self, model, k: int, max_len: int, device):
        self.model, self.k = model, k
        self.caches = [KVCache(1, max_len, device=device) for _ in range(k)]
        self.hist: list[torch.Tensor | None] = [None] * (k + 1)

    def commit(self, h0: torch.Tensor) -> None:
        self.hist[0] = h0 if self.hist[0] is None else torch.cat((self.hist[0], h0), dim=1)

    def draft(self, seq: list[int]) -> list[int]:
        """k draft tokens after ``seq`` (committed tokens; its last one not yet in the main cache)."""
        model, N = self.model, len(seq) - 1  # positions 0..N-1 have main states; token N is known
        dev = self.hist[0].device
        drafts: list[int] = []
        spec_prev = None  # depth j-1's states at positions past its exact ones
        for j, layer in enumerate(model.mtp_layers[:self.k], start=1):
            cache = self.caches[j - 1]
            e, exact_end = cache.length, N - j + 1  # positions e..exact_end-1 depend on committed tokens
            prev = self.hist[j - 1][:, e:]  # depth j-1's exact states reach position N-j+1
            if spec_prev is not None:
                prev = torch.cat((prev, spec_prev), dim=1)
            toks = [seq[i + j] if i + j <= N else drafts[i + j - N - 1] for i in range(e, N)]
            pos = torch.arange(e, N, device=dev).unsqueeze(0)
            out = []
            for lo, hi in ((e, exact_end), (exact_end, N)):  # the exact part stays cached, the rest not
                if hi <= lo:
                    continue
                rope, mask, causal = mtp_inputs(model, pos[:, lo - e:hi - e], None, layer, start=lo, cache=cache)
                emb = token_embedding(model, torch.tensor([toks[lo - e:hi - e]], device=dev))
                out.append(layer(prev[:, lo - e:hi - e], emb, rope, mask, causal, cache))
                cache.advance(hi - lo)
            cache.length = max(e, exact_end)
            h = torch.cat(out, dim=1)
            n_exact = max(0, exact_end - e)
            if n_exact:
                self.hist[j] = h[:, :n_exact] if self.hist[j] is None else torch.cat((self.hist[j], h[:, :n_exact]), 1)
            spec_prev = h[:, n_exact:]
            drafts.append(int(head_logits(model, layer, h[:, -1:]).argmax(-1)))
        return drafts


@torch.no_grad()
def mtp_speculative_greedy(model, prompt_ids: list[int], max_new_tokens: int, draft_tokens: int | None = None,
                           stop_token_ids=()) -> SpeculativeResult:
    """Greedy continuation of ``prompt_ids`` (one sequence), drafting ``draft_tokens`` (default and
    at most ``mtp_depth``) tokens per main forward pass with the MTP modules."""
    D = model.config.mtp_depth
    if not D or model.mtp_layers is None:
        raise ValueError("speculative decoding with multi-token prediction needs a model with mtp_depth > 0")
    k = D if draft_tokens is None else draft_tokens
    if not 1 <= k <= D:
        raise ValueError(f"draft_tokens must be between 1 and mtp_depth ({D}), got {k}")
    t0 = time.perf_counter()
    dev = model.device
    max_len = len(prompt_ids) + max_new_tokens + k + 1
    if max_len > model.config.max_seq_len:
        raise ValueError(f"prompt + new tokens ({max_len}) exceed max_seq_len={model.config.max_seq_len}")
    main = KVCache(1, max_len, device=dev)
    drafter = _Drafter(model, k, max_len, dev)
    stops = set(stop_token_ids)
    h = model(torch.tensor([prompt_ids], device=dev), cache=main, return_hidden=True)
    drafter.commit(h)
    seq = list(prompt_ids) + [int(_main_logits(model, h[:, -1:]).argmax(-1))]
    res = SpeculativeResult(tokens=[seq[-1]], main_forwards=1, per_depth=[0] * k)
    while len(res.tokens) < max_new_tokens and seq[-1] not in stops:
        drafts = drafter.draft(seq)
        N = len(seq) - 1
        h = model(torch.tensor([[seq[-1], *drafts]], device=dev), cache=main, return_hidden=True)
        greedy = _main_logits(model, h).argmax(-1)[0].tolist()
        a = 0
        while a < k and drafts[a] == greedy[a]:
            res.per_depth[a] += 1
            a += 1
        res.drafted += k
        res.accepted += a
        res.main_forwards += 1
        main.length = N + a + 1  # drop the rejected drafts' keys
        drafter.commit(h[:, :a + 1])
        for t in drafts[:a] + [greedy[a]]:
            if len(res.tokens) >= max_new_tokens or res.tokens[-1] in stops:
                break
            seq.append(t)
            res.tokens.append(t)
    res.seconds = time.perf_counter() - t0
    return res
