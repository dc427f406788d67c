"""The GPU paths equal their CPU references (skipped where no CUDA device is present; CI has none).

Run on a GPU machine: ``python -m pytest tests/test_cuda.py``. What only exists on a GPU:

- the compiled decode step replayed as a CUDA graph (``infer.compiled._cuda_graphed``): greedy tokens
  must equal the eager decoding loop's, for ragged prompts, a sliding-window family and a second
  call with other lengths, and the graph must really be replayed;
- the model's forward on the GPU equals the CPU forward (fp32);
- the fused LM-head loss (eager and the inductor kernels) equals ``F.cross_entropy`` in value
  and gradients on the GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import evolm.infer.compiled as compiled
from evolm.infer import SamplingParams, generate
from evolm.nn.loss import fused_linear_cross_entropy

from test_generate import PROMPTS, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cuda_graph_decode_equals_eager(family, monkeypatch):
    steps = []
    wrap = compiled._cuda_graphed

    def recording(direct):
        steps.append(wrap(direct))
        return steps[-1]

    monkeypatch.setattr(compiled, "_cuda_graphed", recording)
    model = tiny(family).cuda()
    params = SamplingParams(max_new_tokens=20, temperature=0)
    want = generate(model, PROMPTS, params)
    assert generate(model, PROMPTS, params, compile=True) == want
    assert steps and all("graph" in s.state for s in steps), "the compiled step was not run as a CUDA graph"
    prompts = [p[::-1] + [7] for p in PROMPTS]  # other prompt and cache lengths, same batch
    assert generate(model, prompts, params, compile=True) == generate(model, prompts, params)
    assert generate(model, [PROMPTS[0]], params, compile=True) == generate(model, [PROMPTS[0]], params)
    assert len(steps) == 3 and all("graph" in s.state and not s.state.get("failed") for s in steps)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_forward_on_cuda_equals_cpu(family):
    model = tiny(family)
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        want = model(ids)
        got = model.cuda()(ids.cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_loss_on_cuda_equals_cross_entropy(compiled):
    torch.manual_seed(0)
    h = torch.randn(300, 64, device="cuda", requires_grad=True)
    w = torch.randn(1000, 64, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (300,), device="cuda")
    t[[3, 200]] = -100
    got = fused_linear_cross_entropy(h, w, t, chunk=128, compiled=compiled)
    grads = torch.autograd.grad(got, [h, w])
    want = F.cross_entropy(F.linear(h, w), t)
    ref = torch.autograd.grad(want, [h, w])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
