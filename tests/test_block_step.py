"""The fused CPU block step (evolm/infer/block_step.py, kernels/decode_block.cpp) against the eager
model: every norm placement, QK-norm, soft-cap, window, activation and linear kind it covers gives
the eager prompt's and decode's logits (to float rounding: norms and attention sum in another order)
and its greedy tokens; what it does not cover keeps the Python path."""

import pytest
import torch

from evolm import KVCache, build, kernels
from evolm.infer import SamplingParams, block_step, generate
from evolm.presets import get_preset
from evolm.quant.blocks import BlockLinear, Blocks
from evolm.quant.walk import replace_linears

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="evolm's C++ kernels cannot be built here")
pytestmark = needs_kernels

VARIANTS = {
    "llama": ("tiny-llama", {}),
    "gpt2": ("tiny-gpt2", {}),  # LayerNorm with bias, learned positions, GELU MLP, biases
    "gemma3": ("tiny-gemma3", {}),  # sandwich, (1 + w) norms, per-head QK-norm, 5:1 sliding windows
    "olmo2": ("tiny-olmo2", {}),  # OLMo 2 placement, QK-norm over the whole projection
    "qwen3": ("tiny-qwen3", {}),
    "post": ("tiny-llama", {"norm_placement": "post"}),
    "parallel": ("tiny-llama", {"norm_placement": "parallel"}),
    "parallel2": ("tiny-llama", {"norm_placement": "parallel2", "n_kv_heads": 1}),  # Falcon-40B's two norms
    "softcap": ("tiny-gemma3", {"attn_softcap": 50.0}),
    "gelu-tanh-plain-mlp": ("tiny-llama", {"mlp": "mlp", "activation": "gelu_tanh"}),
    "qkv-bias-interleaved-rope": ("tiny-llama", {"qkv_bias": True, "rope_interleave": True}),
}


def _model(preset: str, changes: dict, seed: int = 0):
    cfg = get_preset(preset).replace(tie_embeddings=False, **changes)
    torch.manual_seed(seed)
    model = build(cfg).eval()
    with torch.no_grad():  # larger weights: varied greedy continuations
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(8.0)
    return model


def _spy(model) -> list:
    """The fused steps that really ran, as the number of new tokens each had (a step may hand back
    None and let Python run)."""
    calls = []
    for block in model.layers:
        if block.fused_step is None:
            continue
        plan = block.fused_step.plan

        class Spy:
            def step(self, *a, plan=plan):
                calls.append(a[0].shape[1])
                return plan.step(*a)

        block.fused_step.plan = Spy()
    return calls


def _decode_logits(model, prompt: torch.Tensor, mask: torch.Tensor | None, n: int) -> torch.Tensor:
    """Logits of ``n`` greedy steps after ``prompt`` through a KVCache (the path generate takes)."""
    cache = KVCache.for_model(model, prompt.shape[0], prompt.shape[1] + n + 1)
    out = []
    with torch.inference_mode():
        logits = model(prompt, attention_mask=mask, cache=cache)[:, -1]
        pos = (mask.sum(1) if mask is not None else torch.full((prompt.shape[0],), prompt.shape[1]))
        for _ in range(n):
            out.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            logits = model(nxt, position_ids=pos[:, None].clone(), attention_mask=mask[:, -1:] if mask is not None else None,
                           cache=cache)[:, -1]
            pos = pos + 1
    return torch.stack(out, 1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("fuse", [False, True])
def test_fused_step_equals_the_eager_decode(variant, fuse):
    preset, changes = VARIANTS[variant]
    model = _model(preset, changes)
    if fuse:
        model.fuse_for_inference()
    window = model.config.sliding_window or 0
    n = max(12, 2 * window) if window <= 16 else 12  # past the window: the ring's mask is used
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    want = _decode_logits(model, prompt, None, n)
    assert block_step.attach(model) == model.config.n_layers
    calls = _spy(model)
    got = _decode_logits(model, prompt, None, n)
    L = model.config.n_layers
    assert calls.count(1) == L * n  # every decode step of every block was fused
    plain = KVCache.for_model(model, 1, 7 + n + 1)
    fused_prompt = model.config.attn_softcap is None  # a ring, and soft-capping over a prompt, keep Python
    assert calls.count(7) == fused_prompt * sum(plain.key_layout(i) is None for i in range(L))
    block_step.detach(model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("variant", ["llama", "gemma3", "gpt2"])
def test_padded_batch_equals_the_eager_decode(variant):
    """Left-padded rows of different lengths: the padding mask reaches the kernel per row."""
    preset, changes = VARIANTS[variant]
    model = _model(preset, changes)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, model.config.vocab_size, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :2] = 0
    want = _decode_logits(model, prompt, mask, 10)
    block_step.attach(model)
    calls = _spy(model)
    got = _decode_logits(model, prompt, mask, 10)
    assert calls.count(1) == model.config.n_layers * 10
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_llama4_chunks_reach_the_kernel_and_its_own_parts_keep_the_python_path():
    """Llama 4's chunked RoPE layers decode through the kernel (the chunk is in the mask, counted from
    each left-padded row's first token, over a ring of one chunk); its NoPE layer's query temperature
    and the L2 QK-norm are not in the plan, so those layers keep the Python path, exactly."""
    changes = dict(n_layers=4, rope_interleave=True, nope_layers=(3,), attention_chunk_size=4,
                   sliding_window_pattern=4, attn_temperature_tuning=True, attn_floor_scale=3.0)
    model = _model("tiny-llama", changes)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, model.config.vocab_size, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :3] = 0
    want = _decode_logits(model, prompt, mask, 10)
    assert block_step.attach(model) == 3 and model.layers[3].fused_step is None
    calls = _spy(model)
    got = _decode_logits(model, prompt, mask, 10)
    assert calls.count(1) == 3 * 10
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert block_step.attach(_model("tiny-llama", dict(changes, qk_norm="l2"))) == 0


def _to_blocks(model) -> None:
    """Replace every block linear by 4-bit GGUF-style blocks of its own (rounded) weights."""

    def make(name, lin):
        w = lin.weight.detach()
        N, K = w.shape
        g = w.reshape(N, K // 32, 32)
        lo, hi = g.amin(-1), g.amax(-1)
        d = ((hi - lo) / 15).clamp_min(1e-8).half().float()
        m = lo.half().float()
        q = ((g - m[..., None]) / d[..., None]).round().clamp(0, 15).reshape(N, K)
        return BlockLinear(Blocks(kernels.pack_q4(q), d, m, 32, "Q4_1"), lin.bias)

    replace_linears(model.layers, make)


def test_kept_blocks_model_greedy_equals_eager():
    model = _model("tiny-llama", {})
    _to_blocks(model)
    assert any(isinstance(m, BlockLinear) for m in model.modules())
    model.fuse_for_inference()
    prompt = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))
    p = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    want, want_logits = generate(model, prompt, p), _decode_logits(model, prompt, None, 8)
    assert block_step.attach(model) == model.config.n_layers
    assert generate(model, prompt, p) == want
    got = _decode_logits(model, prompt, None, 8)
    torch.testing.assert_close(got, want_logits, rtol=1e-5, atol=1e-5 * want_logits.abs().max().item())


def test_what_it_cannot_express_keeps_the_python_path():
    moe = build(get_preset("tiny-mixtral")).eval()
    assert block_step.attach(moe) == 0  # every layer is a mixture of experts
    mla = build(get_preset("tiny-deepseek")).eval()
    assert block_step.attach(mla) == 0
    model = _model("tiny-llama", {})
    from evolm.quant import quantize_int8

    q = quantize_int8(model)
    assert block_step.attach(q) == 0  # re-quantized int8 linears: not a plan's linear kind


def test_what_each_forward_takes():
    """A prompt of more than FEW_QUERIES tokens into a cache and a decode step are fused; a forward
    without a cache, 2-4 new tokens, gradients and other dtypes keep the Python path."""
    model = _model("tiny-llama", {})
    L = model.config.n_layers
    block_step.attach(model)
    calls = _spy(model)
    prompt = torch.randint(0, 512, (1, 5))
    with torch.no_grad():
        model(prompt)  # no cache
        model(prompt[:, :4], cache=KVCache.for_model(model, 1, 16))  # few queries
        assert not calls
        cache = KVCache.for_model(model, 1, 16)
        model(prompt, cache=cache)  # a prompt
        assert calls == [5] * L
        model(prompt[:, :1], cache=cache)  # one token
        assert calls == [5] * L + [1] * L
        model(prompt, cache=cache)  # a second chunk, after the first: slots 6..10
        assert calls == [5] * L + [1] * L + [5] * L
    with torch.enable_grad():
        model(prompt[:, :1], cache=cache)  # gradients wanted: the Python path
    assert len(calls) == 3 * L
    with torch.no_grad():
        model.double()(prompt, cache=KVCache.for_model(model, 1, 16))  # not the plan's dtype
    assert len(calls) == 3 * L


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_prompt_equals_the_eager_prompt(variant):
    """Prompts into an empty cache, then a second chunk after them (a mask over the cached slots),
    left-padded rows: the logits and the cache's keys/values of the Python path."""
    preset, changes = VARIANTS[variant]
    model = _model(preset, changes).fuse_for_inference()
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0

    def run():
        cache = KVCache(2, 32)  # one slot per token: every layer the plain layout
        with torch.inference_mode():
            first = model(prompt[:, :7], attention_mask=mask[:, :7], cache=cache)
            second = model(prompt[:, 7:], attention_mask=mask[:, 7:], cache=cache)
        return torch.cat([first, second], 1), cache

    want, want_cache = run()
    block_step.attach(model)
    calls = _spy(model)
    got, got_cache = run()
    block_step.detach(model)
    fused = model.config.attn_softcap is None  # soft-capped scores over a prompt: the Python path
    assert calls == ([7] * model.config.n_layers + [5] * model.config.n_layers if fused else [])
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5 * want.abs().max().item())
    for layer in range(model.config.n_layers):
        for a, b in ((got_cache._k[layer], want_cache._k[layer]), (got_cache._v[layer], want_cache._v[layer])):
            torch.testing.assert_close(a[:, :, :12], b[:, :, :12], rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_default_preparation_attaches_and_no_fast_does_not():
    from evolm.infer.prepare import InferenceOptions, prepare

    model = prepare(_model("tiny-llama", {}), InferenceOptions(device="cpu", keep_blocks=False, fuse=True,
                                                              compile=False, block_step=None))
    assert all(b.fused_step is not None for b in model.layers)
    plain = prepare(_model("tiny-llama", {}), InferenceOptions(device="cpu", fast=False, keep_blocks=False,
                                                              fuse=False, compile=False, block_step=False))
    assert all(b.fused_step is None for b in plain.layers)


@pytest.mark.parametrize("min_rows", [1, 4])
def test_server_engine_rows_use_the_fused_step_and_keep_the_tokens(min_rows):
    """The serving engine's decode views: rows of different lengths (own write slots), and a lone
    request padded with copies of itself (buffer rows gathered): the tokens of plain generation."""
    import threading

    from evolm.serve.scheduler import DoneEvent, Engine, GenRequest, TokenEvent

    model = _model("tiny-llama", {})
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 9, 3)]
    p = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    want = [generate(model, [q], p)[0] for q in prompts]
    block_step.attach(model)
    calls = _spy(model)
    class IdTokenizer:  # enough for the engine: ids spelled as numbers, no end-of-sequence token
        eos_ids: list[int] = []

        def decode(self, ids):
            return "".join(f"<{i}>" for i in ids)

        def encode(self, text):
            return []

    engine = Engine(model, IdTokenizer(), max_batch=4, min_decode_rows=min_rows).start()
    got, done, cv = {}, set(), threading.Condition()

    def deliver(ev):
        with cv:
            if isinstance(ev, TokenEvent):
                got.setdefault(ev.index, []).append(ev.token_id)
            elif isinstance(ev, DoneEvent):
                done.add(ev.index)
                cv.notify_all()
            else:
                done.add(ev.index)
                got[ev.index] = ev
                cv.notify_all()

    try:
        for i, q in enumerate(prompts[:1]):  # alone first: padded to min_rows copies
            engine.submit(GenRequest(q, p, deliver, index=i))
        with cv:
            assert cv.wait_for(lambda: len(done) == 1, 60)
        for i, q in enumerate(prompts[1:], 1):  # then two together, different lengths
            engine.submit(GenRequest(q, p, deliver, index=i))
        with cv:
            assert cv.wait_for(lambda: len(done) == 3, 60)
    finally:
        engine.stop()
    assert [got[i] for i in range(3)] == want
    assert calls, "the engine's decode steps did not use the fused step"
