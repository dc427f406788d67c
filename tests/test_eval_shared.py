"""Shared-context scoring (read a question once, score every choice from its KV cache) gives the
same log-likelihoods as one row per request, lm-eval's way (itself tested against transformers
and lm-eval in test_eval.py).

Reference: ``LoglikScorer(share_context=False)``, the plain right-padded batch, and below that the
full forward of each request alone.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from evolm.eval.loglik import LoglikScorer
from evolm.model import Transformer

from test_generate import FAMILIES, randomize, tiny

V = 96  # below every tiny family's vocabulary


def _mc_items(seed: int = 0) -> list[tuple[list[int], int]]:
    """Multiple-choice-shaped requests: contexts of 1..20 tokens (past the tiny 5/6-token windows),
    2-5 continuations of 1-6 tokens each, and one request twice."""
    rng = random.Random(seed)
    out = []
    for _ in range(7):
        ctx = [rng.randrange(V) for _ in range(rng.randint(1, 20))]
        for _ in range(rng.randint(2, 5)):
            cont = [rng.randrange(V) for _ in range(rng.randint(1, 6))]
            out.append((ctx + cont, len(cont)))
    out.append(([3, 4, 5, 6], 2))
    out.append(([3, 4, 5, 6], 2))  # the same request twice
    return out


@torch.no_grad()
def _alone(model, ids: list[int], n: int) -> tuple[float, bool]:
    lp = F.log_softmax(model(torch.tensor([ids[:-1]]))[0, -n:].float(), -1)
    t = torch.tensor(ids[-n:])
    return lp.gather(-1, t[:, None]).sum().item(), bool((lp.argmax(-1) == t).all())


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_shared_context_equals_one_row_per_request(family, batch_size, one_thread):
    model = tiny(family).eval()
    if family == "llama4":  # its query temperature counts cache slots, as transformers does: a shared
        # context moves a continuation's slots, so the test holds with the temperature off (test_generate.py)
        model = randomize(Transformer(FAMILIES[family].replace(attn_temperature_tuning=False)), 0).eval()
    items = _mc_items()
    shared = LoglikScorer(model, None, batch_size=batch_size, progress=False).score_tokens(items)
    rows = LoglikScorer(model, None, batch_size=batch_size, progress=False, share_context=False).score_tokens(items)
    for (a, ga), (b, gb), (ids, n) in zip(shared, rows, items):
        want, gw = _alone(model, ids, n)
        assert a == pytest.approx(want, abs=1e-4) and b == pytest.approx(want, abs=1e-4)
        assert ga == gb == gw


def test_truncated_requests_and_long_contexts_fall_back_to_rows(one_thread):
    """A request longer than max_length + 1 keeps lm-eval's left truncation (its own context)."""
    model = tiny("llama").eval()
    rng = random.Random(1)
    ctx = [rng.randrange(V) for _ in range(30)]
    items = [(ctx + [7, 8], 2), (ctx + [9], 1), (ctx[:5] + [1, 2, 3], 3)]
    got = LoglikScorer(model, None, batch_size=4, max_length=16, progress=False).score_tokens(items)
    want = LoglikScorer(model, None, batch_size=4, max_length=16, progress=False,
                        share_context=False).score_tokens(items)
    for (a, ga), (b, gb) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_a_request_without_context_is_refused():
    model = tiny("llama").eval()
    with pytest.raises(ValueError, match="at least one context token"):
        LoglikScorer(model, None, progress=False).score_tokens([([5, 6], 2)])


def test_a_batch_never_needs_more_slots_than_the_window(one_thread):
    """A long context and a long continuation (each within max_length) never share one cache:
    GPT-2's learned positions would refuse P + N slots beyond max_seq_len."""
    model = tiny("gpt2").eval()  # max_seq_len 64
    rng = random.Random(2)
    items = [([rng.randrange(V) for _ in range(50)] + [1, 2, 3, 4, 5], 5),
             ([7, 8] + [rng.randrange(V) for _ in range(40)], 40)]
    got = LoglikScorer(model, None, batch_size=8, max_length=63, progress=False).score_tokens(items)
    for (a, _), (ids, n) in zip(got, items):
        assert a == pytest.approx(_alone(model, ids, n)[0], abs=1e-4)


def test_loglikelihood_reads_each_context_once_across_chunks(one_thread, monkeypatch):
    """``loglikelihood`` works in chunks of 16 batches (persisted one by one); the choices of one
    question must land in one chunk, whatever their lengths, or sharing is lost on a full task.
    (A full HellaSwag run once sorted requests by length alone: 2.5 req/s instead of ~10.)"""

    class Bytes:
        bos_token_id = None
        eos_token_id = 0

        def encode(self, text, add_special_tokens=True):
            return [min(b, V - 1) for b in text.encode()]

    model = tiny("llama").eval()
    rng = random.Random(3)
    requests = []
    for q in range(40):  # 40 questions x 4 endings of very different lengths: 160 > one chunk (2 x 16)
        ctx = "q%d " % q + "x" * rng.randint(1, 12)
        requests += [(ctx, " " + "y" * rng.randint(1, 15)) for _ in range(4)]
    seen: list[tuple[int, ...]] = []
    orig = LoglikScorer._shared_batch

    def spy(self, items, batch, out):
        seen.extend(ctx for ctx, _ in batch)
        return orig(self, items, batch, out)

    monkeypatch.setattr(LoglikScorer, "_shared_batch", spy)
    scorer = LoglikScorer(model, Bytes(), batch_size=2, progress=False)
    got = scorer.loglikelihood(requests)
    # a batch of 2 rows holds half a question: a context is prefilled once per 2 distinct endings
    from collections import Counter

    distinct = Counter(c for c, _ in set(requests))
    assert len(set(seen)) == 40
    assert sorted(Counter(seen).values()) == sorted(-(-k // 2) for k in distinct.values())
    rows = LoglikScorer(model, Bytes(), batch_size=2, progress=False, share_context=False).loglikelihood(requests)
    for (a, ga), (b, gb) in zip(got, rows):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
