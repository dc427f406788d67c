"""Cached decoding equals the uncached forward pass for every family's tiny preset."""

import pytest
import torch

from evolm import KVCache, build
from evolm.infer import SamplingParams, generate
from evolm.presets import get_preset, list_presets

# the decoders: an encoder (tiny-bert ...) has no next token to cache
TINY = [n for n in list_presets() if n.startswith("tiny-") and get_preset(n).mask == "causal"]


@pytest.mark.parametrize("name", TINY)
def test_cached_greedy_equals_uncached(name):
    # an untied head: with tied random weights greedy decoding tends to repeat the last token
    cfg = get_preset(name).replace(tie_embeddings=False)
    torch.manual_seed(0)
    model = build(cfg).eval()
    with torch.no_grad():  # larger weights so that greedy continuations vary
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(8.0)
    prompt = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    n_new = 3 * (cfg.sliding_window or 8) if (cfg.sliding_window or 0) <= 16 else 24
    cached = generate(model, prompt, SamplingParams(max_new_tokens=n_new, temperature=0, ignore_eos=True))[0]
    ids = prompt
    with torch.no_grad():
        for _ in range(n_new):  # uncached: the whole sequence every step
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert cached == ids[0, 9:].tolist()
    assert len(set(cached)) > 2, "degenerate continuation: the test would not see a cache bug"


@pytest.mark.parametrize("name", TINY)
def test_step_logits_match_full_forward(name):
    model = build(get_preset(name)).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        cache = KVCache.for_model(model, 2, 32)
        steps = [model(x[:, :5], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(5, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
