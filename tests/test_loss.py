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


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_chunk_kernel_equals_eager_and_reference(dtype):
    """The inductor-fused softmax/gradient kernel (used with train.compile) gives the reference
    loss and gradients, with soft-capping and ignored targets, in fp32 and under bf16 autocast."""
    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (40,))
    t[[3, 20]] = -100
    results = []
    for compiled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = fused_linear_cross_entropy(h, w, t, None, 30.0, chunk=16, compiled=compiled)
        results.append((loss, torch.autograd.grad(loss, [h, w])))
    logits = 30.0 * torch.tanh(F.linear(h, w) / 30.0)
    want = F.cross_entropy(logits, t)
    ref = torch.autograd.grad(want, [h, w])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for loss, grads in results:
        torch.testing.assert_close(loss, want, **tol)
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r, **tol)
    (l0, g0), (l1, g1) = results  # compiled equals eager closely (same math, fused rounding)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_frozen_head_gets_no_gradient_and_the_same_input_gradient():
    """With the head frozen (LoRA on a tied embedding) no V x D gradient is built; dL/dh is unchanged."""
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16)
    b = torch.randn(50)
    t = torch.randint(0, 50, (37,))
    got = fused_linear_cross_entropy(h, w, t, b, chunk=8)
    (gh,) = torch.autograd.grad(got, [h])
    want = F.cross_entropy(F.linear(h, w, b), t)
    (rh,) = torch.autograd.grad(want, [h])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# fused per-token log-probabilities (DPO / GRPO): reference = log_softmax(...).gather(...)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("softcap,temperature,bias", [(None, 1.0, False), (None, 0.7, True), (5.0, 1.3, False)])
def test_fused_logprobs_equal_log_softmax_values_and_gradients(softcap, temperature, bias):
    from evolm.nn.loss import fused_linear_logprobs

    torch.manual_seed(0)
    N, D, V = 37, 16, 101
    h = torch.randn(2, N, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, V, (2, N))
    up = torch.randn(2, N, dtype=torch.float64)  # per-token upstream weights (advantages, DPO sigmoid terms)

    def ref():
        x = F.linear(h, w, b)
        if softcap is not None:
            x = softcap * torch.tanh(x / softcap)
        return torch.log_softmax(x / temperature, -1).gather(-1, t[..., None])[..., 0]

    want = ref()
    (want * up).sum().backward()
    grads_want = [p.grad.clone() for p in (h, w, b) if p is not None]
    for p in (h, w, b):
        if p is not None:
            p.grad = None
    got = fused_linear_logprobs(h, w, t, b, softcap, temperature, chunk=16)  # chunks of 16 rows: 5 of them
    assert got.shape == t.shape
    (got * up).sum().backward()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)  # fp32 outputs
    for g, gw in zip([p.grad for p in (h, w, b) if p is not None], grads_want):
        torch.testing.assert_close(g, gw, rtol=1e-4, atol=1e-5)  # the saved log-sum-exp is fp32
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_logprobs(h, w, t, b, softcap, temperature).double(), want,
                                   rtol=0, atol=1e-5)


def test_fused_logprobs_frozen_head_gets_no_gradient():
    from evolm.nn.loss import fused_linear_logprobs

    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(30, 8)  # frozen (a LoRA run's tied embedding)
    fused_linear_logprobs(h, w, torch.randint(0, 30, (5,))).sum().backward()
    assert h.grad is not None and w.grad is None


# ------------------------------------------------------------------------------------------
# buffers kept between steps (nn/loss.py::_Scratch) never change a result
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_bf16_loss_in_row_blocks_and_reused_buffers_equals_the_reference(monkeypatch, compiled):
    """Under bf16 autocast the eager path upcasts a few rows at a time into one fp32 buffer (forced
    here to 3 rows), and every step reuses the logits, head and gradient buffers of the last one;
    loss and gradients stay those of F.cross_entropy on the bf16 logits, step after step."""
    import evolm.nn.loss as L

    monkeypatch.setattr(L, "_FP32_ROWS_BYTES", 3 * 4 * 50)
    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    for step in range(3):  # step 2 and 3 run on the buffers step 1 left behind
        t = torch.randint(0, 50, (40,))
        t[step] = -100
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fused_linear_cross_entropy(h, w, t, None, 30.0 if step == 1 else None, chunk=64, compiled=compiled)
        grads = torch.autograd.grad(got, [h, w])
        logits = F.linear(h.bfloat16(), w.bfloat16()).float()
        if step == 1:
            logits = 30.0 * torch.tanh(logits / 30.0)
        want = F.cross_entropy(logits, t)
        ref = torch.autograd.grad(want, [h, w])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-3)
    assert L._scratch.free  # kept for the next step ...
    L.release_scratch()
    assert not L._scratch.free  # ... until released


def test_two_forwards_before_one_backward_keep_their_own_gradients():
    """A buffer the forward saves for its backward (the bf16 head gradient) is handed out once:
    a second loss computed before the first one's backward (DPO's chosen/rejected, accumulation)
    gets its own, and both backward passes give their reference gradients."""
    torch.manual_seed(0)
    w = torch.randn(50, 16, requires_grad=True)
    hs = [torch.randn(24, 16) for _ in range(2)]
    ts = [torch.randint(0, 50, (24,)) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a whole step first: its buffers wait in the pool
        fused_linear_cross_entropy(hs[0], w, ts[0]).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [fused_linear_cross_entropy(h, w, t) for h, t in zip(hs, ts)]
    for h, t, loss in zip(hs, ts, losses):
        (g,) = torch.autograd.grad(loss, [w])
        (r,) = torch.autograd.grad(F.cross_entropy(F.linear(h.bfloat16(), w.bfloat16()).float(), t), [w])
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-3)


def test_a_reused_buffer_is_never_read_stale_by_a_retained_graph():
    """backward(retain_graph=True) hands its bf16 head gradient back; if another forward takes and
    overwrites it, a second backward of the first graph fails loudly instead of reading it."""
    torch.manual_seed(0)
    w = torch.randn(50, 16, requires_grad=True)
    h, t = torch.randn(24, 16), torch.randint(0, 50, (24,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = fused_linear_cross_entropy(h, w, t)
    first.backward(retain_graph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_linear_cross_entropy(torch.randn(24, 16), w, t).backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()


@pytest.mark.parametrize("kernel", [False, True])
def test_whole_model_torch_compile_with_targets_equals_eager(kernel):
    """``torch.compile(model)`` of a model that computes its own loss, under bf16 autocast: the
    fused loss is left out of the graph (it keeps buffers between calls and writes gradients in
    place; traced, dynamo failed on it); loss and gradients equal the eager model's."""
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, norm="rmsnorm", pos_emb="rope",
                      max_seq_len=32)
    torch.manual_seed(0)
    model = build(cfg)
    ids = torch.randint(0, 97, (2, 17))
    model.compiled_loss = kernel  # the trainer's train.compile sets it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(ids[:, :-1], targets=ids[:, 1:])
    ref = torch.autograd.grad(want, list(model.parameters()))
    compiled = torch.compile(model)
    for _ in range(2):  # the second call reuses the loss's buffers
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = compiled(ids[:, :-1], targets=ids[:, 1:])
        grads = torch.autograd.grad(got, list(model.parameters()))
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-3)
