"""The static KV cache and the compiled decode step equal the ordinary decoding loop.

Reference: ``generate()`` with the plain ``KVCache`` (itself tested against transformers and the
uncached forward in test_generate.py). The static path must give the *same* greedy tokens:
eagerly for every tiny family (sliding windows far past the window, MLA, padding), and compiled
with ``torch.compile`` for a Llama-style and a Gemma-3-style model, with one graph reused across
steps and calls (no recompiles).
"""

from __future__ import annotations

import pytest
import torch

from evolm.cache import StaticKVCache
from evolm.infer import SamplingParams, generate

from test_generate import FAMILIES, PROMPTS, left_pad, tiny

N_NEW = 20  # > 3x the tiny sliding windows (5 and 6)


@torch.inference_mode()
def static_greedy(model, prompts, n):
    """Greedy decoding by hand over a StaticKVCache in static mode, uncompiled."""
    ids, mask = left_pad(prompts)
    B, T = ids.shape
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = StaticKVCache.for_model(model, B, T + n + 3)  # a few unused slots: the mask must hide them
    logits = model(ids, position_ids=pos, attention_mask=mask, cache=cache, last_only=True)[:, -1]
    cache.start_static()
    nxt, out = pos[:, -1:] + 1, []
    for _ in range(n):
        tok = logits.argmax(-1)
        out.append(tok)
        logits = model(tok[:, None], position_ids=nxt, cache=cache, last_only=True)[:, -1]
        nxt = nxt + 1
    return torch.stack(out, 1).tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_static_cache_equals_dynamic_cache(family, one_thread):
    model = tiny(family)
    want = generate(model, PROMPTS, SamplingParams(max_new_tokens=N_NEW, temperature=0))
    assert static_greedy(model, PROMPTS, N_NEW) == want


def test_static_mode_needs_positions():
    model = tiny("llama")
    cache = StaticKVCache.for_model(model, 1, 8)
    with torch.inference_mode():
        model(torch.tensor([[1, 2]]), cache=cache)
        cache.start_static()
        with pytest.raises(ValueError, match="position_ids"):
            model(torch.tensor([[3]]), cache=cache)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_compiled_decode_equals_eager_without_recompiles(family, one_thread):
    from torch._dynamo.utils import counters

    model = tiny(family)
    params = SamplingParams(max_new_tokens=N_NEW, temperature=0)
    breaks = sum(counters["graph_break"].values())
    assert generate(model, PROMPTS, params, compile=True) == generate(model, PROMPTS, params)
    # one graph per step, no breaks (a break, e.g. building the kernels inside the trace, costs a
    # Python frame and a guard check at every step)
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])
    frames = counters["stats"]["unique_graphs"]
    # another call with other prompt and cache lengths (same batch), and sampling
    prompts = [p[::-1] + [7] for p in PROMPTS]
    assert generate(model, prompts, params, compile=True) == generate(model, prompts, params)
    sampled = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, seed=3)
    assert generate(model, prompts, sampled, compile=True) == generate(model, prompts, sampled)
    assert counters["stats"]["unique_graphs"] == frames, "the compiled step was recompiled"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_projections_equal_separate_ones(family, one_thread):
    """fuse_for_inference(): one qkv and one gate_up matmul; same logits and greedy tokens."""
    model = tiny(family)
    ids, mask = left_pad(PROMPTS)
    params = SamplingParams(max_new_tokens=N_NEW, temperature=0)
    with torch.inference_mode():
        want, want_tokens = model(ids, attention_mask=mask), generate(model, PROMPTS, params)
        model.fuse_for_inference()
        got, got_tokens = model(ids, attention_mask=mask), generate(model, PROMPTS, params)
    names = {n for n, _ in model.named_parameters()}
    if family != "deepseek":  # MLA keeps its own projections
        assert "layers.0.self_attn.qkv_proj.weight" in names and "layers.0.self_attn.q_proj.weight" not in names
    if family != "gpt2":  # GPT-2's MLP has no gate
        assert "layers.0.mlp.gate_up_proj.weight" in names
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_tokens == want_tokens


@pytest.mark.slow
def test_compiled_decode_of_quantized_models_equals_eager(one_thread):
    """int8 and int4 linears inside the compiled step (several rows: the packed-weight kernels)."""
    from evolm.quant.int4 import quantize_int4
    from evolm.quant.int8 import quantize_int8

    params = SamplingParams(max_new_tokens=12, temperature=0)
    for quantize in (quantize_int8, lambda m: quantize_int4(m, 32, head="int4")):
        model = quantize(tiny("llama"))
        assert generate(model, PROMPTS, params, compile=True) == generate(model, PROMPTS, params)
        assert generate(model, PROMPTS[:1], params, compile=True) == generate(model, PROMPTS[:1], params)


@pytest.mark.slow
def test_direct_step_tells_models_apart(one_thread, monkeypatch):
    """After its first step through dynamo, a generate call runs the compiled graph directly
    (evolm.infer.compiled.bind_last_graph): models of other structure, other weights and another batch, called in
    turn, each still get their own graph and the eager tokens, and the direct path does run."""
    from dataclasses import replace

    from evolm.infer import compiled
    from evolm.model import Transformer
    from test_generate import FAMILIES, randomize

    bound = []
    real_bind = compiled.bind_last_graph
    monkeypatch.setattr(compiled, "bind_last_graph", lambda **kw: bound.append(real_bind(**kw)) or bound[-1])
    deeper = randomize(Transformer(replace(FAMILIES["llama"], n_layers=FAMILIES["llama"].n_layers + 1)), 5)
    models = [tiny("llama"), tiny("llama", seed=1), deeper, tiny("llama")]
    params = SamplingParams(max_new_tokens=10, temperature=0)
    want = [generate(m, PROMPTS, params) for m in models]
    for _ in range(2):
        for m, w in zip(models, want):
            assert generate(m, PROMPTS, params, compile=True) == w
            assert generate(m, PROMPTS[:1], params, compile=True) == generate(m, PROMPTS[:1], params)
    assert len(bound) == 16 and all(b is not None for b in bound)  # one dynamo step per call, then direct


def test_graph_with_side_effects_is_not_bound():
    """A compiled function whose graph has more than its result as output (Python side effects
    dynamo replays after the graph) is never called directly."""
    from evolm.infer.compiled import bind_last_graph, forget_last_graph, graph_backend

    class Box:
        pass

    def f(x, box):
        box.seen = x * 2  # an attribute store: a second graph output
        return x + 1

    g = torch.compile(f, backend=graph_backend(None))
    forget_last_graph()
    assert torch.equal(g(torch.ones(3), Box()), torch.full((3,), 2.0))
    assert bind_last_graph(x=torch.ones(3), box=Box()) is None

    h = torch.compile(lambda x, y: x * y + 1, backend=graph_backend(None))
    forget_last_graph()
    h(torch.ones(3), torch.ones(3))
    direct = bind_last_graph(x=torch.ones(3), y=torch.ones(3))
    assert direct is not None and torch.equal(direct(x=torch.full((3,), 2.0), y=torch.full((3,), 3.0)),
                                              torch.full((3,), 7.0))


def test_step_broken_into_graphs_is_not_bound():
    """A step dynamo splits into several graphs (a hybrid's step did: the last graph read the resumed
    frame's stack, ``L['___stack1']``) is never replaced by its last graph."""
    from evolm.infer.compiled import bind_last_graph, forget_last_graph, graph_backend

    def f(x, y):
        a = x * 2
        torch._dynamo.graph_break()
        return a + y

    g = torch.compile(f, backend=graph_backend(None))
    forget_last_graph()
    assert torch.equal(g(torch.ones(3), torch.ones(3)), torch.full((3,), 3.0))
    assert bind_last_graph(x=torch.ones(3), y=torch.ones(3)) is None


def test_cpp_wrapper_choice():
    """The compiled CPU step is driven from C++ unless EVOLM_CPP_WRAPPER=0; other devices never."""
    from evolm.infer.compiled import _cpp_wrapper
    from evolm.quant import KernelPolicy

    default = KernelPolicy.from_env({})
    assert _cpp_wrapper("cpu", default) and not _cpp_wrapper("cuda", default)
    assert not _cpp_wrapper("cpu", KernelPolicy.from_env({"EVOLM_CPP_WRAPPER": "0"}))


def test_row_kernel_choice():
    """One fp32 row: evolm's kernel on AVX2-only CPUs, inductor's loop on AVX-512; one bf16 row:
    evolm's kernel; EVOLM_ROW1 overrides."""
    from evolm.quant import KernelPolicy

    assert KernelPolicy.from_env({"EVOLM_ROW1": "reduce"}).row1_kernel() == "reduce"
    assert KernelPolicy.from_env({"EVOLM_ROW1": "skinny"}).row1_kernel() == "skinny"
    default = KernelPolicy.from_env({})
    avx512 = "AVX512" in torch.backends.cpu.get_cpu_capability()
    assert default.row1_kernel() == ("reduce" if avx512 else "skinny")
    assert default.row1_kernel(torch.bfloat16) == "skinny"


def test_policy_from_env_defaults_are_the_plain_defaults():
    """Without any EVOLM_* switch, the policy read from the environment is the library default."""
    from evolm.quant import KernelPolicy

    assert KernelPolicy.from_env({}) == KernelPolicy()
    off = KernelPolicy.from_env({"EVOLM_KERNELS": "0", "EVOLM_DECODE_ATTN": "0", "EVOLM_ATTN_LOOPS": "0",
                                 "EVOLM_COMPILE_PREFILL": "0", "EVOLM_DIRECT_STEP": "0", "EVOLM_CUDA_GRAPH": "0"})
    assert not (off.quant_kernels or off.skinny or off.decode_attention or off.attn_loops or off.compile_prefill
                or off.direct_step or off.cuda_graph)


def test_one_bf16_row_goes_to_the_kernel(monkeypatch):
    """Inside the compiled CPU step (``_DecodeLinear``), a one-row bf16 product runs evolm's
    skinny kernel where it builds (the AVX512-BF16 pairs on CPUs that have them) and equals the
    bf16 product to bf16 precision."""
    import torch.nn.functional as F

    from evolm import kernels
    from evolm.infer.compiled import _decode_linear

    if not kernels.available():
        pytest.skip("evolm's CPU kernels do not build here")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 576, generator=g).bfloat16()
    w = torch.randn(300, 576, generator=g).bfloat16()
    calls = []
    real = torch.ops.evolm_f.skinny_linear

    class Spy:
        def __call__(self, *a):
            calls.append(a[1].dtype)
            return real(*a)

    monkeypatch.setattr(torch.ops.evolm_f, "skinny_linear", Spy())
    with _decode_linear(skinny=True, row_f32=False, row_bf16=True)():
        y = F.linear(x, w)
    assert calls == [torch.bfloat16] and y.shape == (1, 1, 300) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), (x.double() @ w.double().T), rtol=2 ** -8, atol=1e-3)


@pytest.mark.slow
def test_compiled_bf16_step_is_as_exact_as_eager_bf16(one_thread):
    """The compiled bf16 decode step at batch 1 (one-row products on evolm's kernel, in bf16
    pairs where the CPU has AVX512-BF16) is as close to the fp32 model's step as the eager bf16
    step is: both accumulate in fp32 and round to bf16, in different orders."""
    from evolm.infer.compiled import compiled_step

    for family in ("llama", "gemma3"):
        ref_model = tiny(family)
        model = tiny(family).to(torch.bfloat16)
        ids = torch.tensor([PROMPTS[0]])
        T = ids.shape[1]
        steps, tok, pos = [], None, torch.tensor([[T]])
        with torch.inference_mode():
            for m, run in ((ref_model, None), (model, None), (model, compiled_step("cpu"))):
                cache = StaticKVCache.for_model(m, 1, T + 4)
                logits = m(ids, position_ids=torch.arange(T)[None], cache=cache, last_only=True)[:, -1]
                cache.start_static()
                if tok is None:  # every engine steps from the fp32 model's token
                    tok = logits.argmax(-1)[:, None]
                if run is None:
                    steps.append(m(tok, position_ids=pos, cache=cache, last_only=True)[:, -1].float())
                else:
                    steps.append(run(m, tok, pos, cache).float())
        ref, eager, compiled = steps
        assert compiled.dtype == torch.float32 and compiled.shape == ref.shape
        err_eager, err_compiled = (eager - ref).abs().max(), (compiled - ref).abs().max()
        assert err_compiled <= 1.5 * err_eager + 1e-2, (family, float(err_compiled), float(err_eager))
        torch.testing.assert_close(compiled, eager, rtol=0.05, atol=4 * float(err_eager) + 1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma3", "deepseek"])
def test_compiled_prefill_stores_what_the_eager_prefill_stores(family, one_thread):
    """generate(compile=True) prefills through one compiled graph (PrefillKV collects each layer's
    keys/values, StaticKVCache.store_prefill stores them): the same logits and the same cache as
    the eager prefill, with padding, sliding windows (gemma3: a prompt past the tiny window) and
    MLA's latent and MoE layers (deepseek); prompts of another length reuse the graph (not with
    MoE, whose routing has data-dependent shapes: its graph breaks there, and each piece becomes
    dynamic on the second length, once)."""
    from torch._dynamo.utils import counters

    from evolm.infer.decode import prefill

    model = tiny(family)
    graphs = None
    for prompts in (PROMPTS, [p + p[:3] for p in PROMPTS]):
        ids, mask = left_pad(prompts)
        B, T = ids.shape
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            eager, compiled = StaticKVCache(B, T + 4), StaticKVCache(B, T + 4)
            want = prefill(model, ids, eager, pos, mask)
            got = prefill(model, ids, compiled, pos, mask, compile=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert compiled.length == eager.length == T
        assert torch.equal(compiled.key_valid, eager.key_valid)
        assert sorted(compiled._k) == sorted(eager._k) == list(range(model.config.n_layers))
        for store_c, store_e in ((compiled._k, eager._k), (compiled._v, eager._v)):
            for layer in store_e:
                torch.testing.assert_close(store_c[layer], store_e[layer], rtol=1e-5, atol=1e-5)
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
    if family != "deepseek":
        assert counters["stats"]["unique_graphs"] == graphs, "a longer prompt recompiled the prefill"
