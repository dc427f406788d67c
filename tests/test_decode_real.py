"""Fast-decoding paths on a real model (SmolLM2-135M-Instruct from its Q4_1 GGUF).

References: the plain decoding loop in fp32 (itself equal to transformers in
test_real_models.py) and, for int4, the bound that llama.cpp's own Q4_1 engine sets (it diverges
from the fp32 model after 5-20 greedy tokens on these prompts, measured with llama-cpp-python).
"""

from __future__ import annotations

import pytest
import torch

from evolm.infer import SamplingParams, generate
from evolm.interop.gguf import find_asset, load_gguf
from evolm.quant.int4 import Int4Linear, quantize_int4

from test_decode_static import static_greedy

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def quicksort(arr):", "Once upon a time, in a small village,"]
TEXT = ("The history of the Roman Empire spans more than a thousand years. It began when Augustus became the "
        "first emperor in 27 BC and, in the west, ended in 476 AD.")


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = find_asset("smollm2")
    except FileNotFoundError as e:
        pytest.skip(f"real GGUF 'smollm2' not installed ({e})")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = load_gguf(path, dtype=torch.float32)
    yield path, model.eval(), tok
    torch.set_num_threads(n)


def test_static_cache_and_fused_projections_keep_greedy_tokens(smollm2):
    path, model, tok = smollm2
    prompts = [tok.encode(p) for p in PROMPTS]
    want = generate(model, prompts, SamplingParams(max_new_tokens=24, temperature=0))
    assert static_greedy(model, prompts, 24) == want
    fused = load_gguf(path, dtype=torch.float32)[0].eval().fuse_for_inference()
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids), model(ids), rtol=1e-4, atol=1e-4)
    assert generate(fused, prompts, SamplingParams(max_new_tokens=24, temperature=0)) == want


def test_int4_is_as_close_to_fp32_as_llama_cpp(smollm2):
    path, ref, tok = smollm2
    model = quantize_int4(load_gguf(path, dtype=torch.float32)[0].eval(), group_size=32, head="int8")
    assert isinstance(model.layers[0].mlp.down_proj, Int4Linear)
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.inference_mode():
        want, got = ref(ids), model(ids)
    rel = ((got - want).norm() / want.norm()).item()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"int4 vs fp32: logits rel. error {rel:.2e}, argmax agreement {agree:.1%}")
    assert rel < 3e-2 and agree > 0.85  # measured 1.3e-2 and 94% (int8 per-row: 3.4e-2, 95%)
    prompts = [tok.encode(p) for p in PROMPTS]
    p = SamplingParams(max_new_tokens=16, temperature=0)
    a, b = generate(ref, prompts, p), generate(model, prompts, p)
    same = [next((i for i, (x, y) in enumerate(zip(r, q)) if x != y), len(r)) for r, q in zip(a, b)]
    print("greedy identical up to", same)
    assert min(same) >= 4 and sum(same) >= 20
