"""The fused, chunked LM-head cross-entropy equals F.cross_entropy on the full logits."""

import pytest
import torch
import torch.nn.functional as F

from evolm import ModelConfig, build
from evolm.nn.loss import fused_linear_cross_entropy


@pytest.mark.parametrize("softcap,bias,chunk", [(None, False, 7), (30.0, True, 16), (None, True, 1024)])
def test_loss_and_gradients_equal_the_unfused_reference(softcap, bias, chunk):
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True) if bias else None
    t = torch.randint(0, 50, (37,))
    t[[3, 20]] = -100
    got = fused_linear_cross_entropy(h, w, t, b, softcap, chunk=chunk)
    grads = torch.autograd.grad(got * 2.5, [h, w] + ([b] if bias else []))
    logits = F.linear(h, w, b)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    want = F.cross_entropy(logits, t)
    ref = torch.autograd.grad(want * 2.5, [h, w] + ([b] if bias else []))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation path: no gradients computed
        torch.testing.assert_close(fused_linear_cross_entropy(h, w, t, b, softcap, chunk=chunk), want)


def test_model_loss_equals_cross_entropy_of_its_logits_tied_and_bf16():
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, norm="rmsnorm", pos_emb="rope",
                      final_softcap=20.0, max_seq_len=32)
    torch.manual_seed(0)
    model = build(cfg)
    x = torch.randint(0, 97, (3, 12))
    y = torch.randint(0, 97, (3, 12))
    loss = model(x, targets=y)
    loss.backward()
    g_fused = model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_fused, model.embed_tokens.weight.grad, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lb = model(x, targets=y)
        rb = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
    assert abs(lb.item() - rb.item()) < 2e-2
