"""Mamba-2 (evolm/nn/mamba2.py) against the SSD paper's minimal listing and transformers.

Two references, neither of them ours:

- ``ssd_minimal_discrete`` below is written from the paper (Dao & Gu 2024, arXiv:2405.21060,
  Section 6 and Listing 1): a naive ``segsum`` (difference of cumulative sums), the four steps
  (diagonal blocks, chunk states, inter-chunk recurrence as a (chunks+1)^2 decay matrix, state to
  output), heads in full (B and C repeated per head). Ours splits heads into groups, passes states
  chunk by chunk in a loop and takes the stable segsum: a different path to the same numbers.
- transformers' ``Mamba2ForCausalLM`` (its PyTorch path, CPU) built from the same tiny config
  with the same random weights: logits, cached greedy decoding, padded batches.
"""

import pytest
import torch
import torch.nn.functional as F

from evolm import ModelConfig, Transformer
from evolm.cache import KVCache
from evolm.config import ConfigError
from evolm.infer.decode import generate
from evolm.infer.sampling import SamplingParams
from evolm.nn.mamba2 import ssd_chunked

transformers = pytest.importorskip("transformers")

V = 97


# ---------------------------------------------------------------------------------------------
# the paper's minimal SSD listing, from its equations
# ---------------------------------------------------------------------------------------------
def paper_segsum(x):
    """segsum(x)[..., i, j] = x[j+1] + ... + x[i] = cumsum[i] - cumsum[j] for j <= i, -inf above."""
    T = x.size(-1)
    cs = torch.cumsum(x, dim=-1)
    out = cs[..., :, None] - cs[..., None, :]
    return out.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -torch.inf)


def ssd_minimal_discrete(X, A, B, C, block_len, initial_states=None):
    """X (b, t, h, p), A (b, t, h), B and C (b, t, h, n); t a multiple of block_len."""
    b, t, h, p = X.shape
    c = t // block_len
    X, A, B, C = (v.reshape(b, c, block_len, *v.shape[2:]) for v in (X, A, B, C))
    A = A.permute(0, 3, 1, 2)  # b h c l
    A_cumsum = torch.cumsum(A, dim=-1)
    # 1. intra-chunk outputs (diagonal blocks)
    L = torch.exp(paper_segsum(A))
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)
    # 2. each chunk's final state (B terms of the off-diagonal blocks)
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    # 3. inter-chunk recurrence (A terms)
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(paper_segsum(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    # 4. state -> output (C terms)
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(A_cumsum))
    return (Y_diag + Y_off).reshape(b, t, h, p), final_state


@pytest.mark.parametrize("t,chunk,groups", [(32, 8, 1), (24, 8, 2), (16, 16, 4)])
def test_ssd_scan_matches_paper_listing(t, chunk, groups):
    g = torch.Generator().manual_seed(t + chunk)
    b, h, p, n = 2, 4, 3, 5
    r = h // groups
    X = torch.randn(b, t, h, p, generator=g, dtype=torch.float64)
    dt = F.softplus(torch.randn(b, t, h, generator=g, dtype=torch.float64))
    A = -torch.exp(torch.randn(h, generator=g, dtype=torch.float64))
    Bg = torch.randn(b, t, groups, n, generator=g, dtype=torch.float64)
    Cg = torch.randn(b, t, groups, n, generator=g, dtype=torch.float64)
    h0 = torch.randn(b, h, p, n, generator=g, dtype=torch.float64)
    ref, ref_final = ssd_minimal_discrete(X * dt[..., None], A * dt, Bg.repeat_interleave(r, 2),
                                          Cg.repeat_interleave(r, 2), chunk, h0[:, None])
    y, final = ssd_chunked((X * dt[..., None]).view(b, t, groups, r, p), (A * dt).view(b, t, groups, r),
                           Bg, Cg, chunk, h0.view(b, groups, r, p, n))
    err = (y.reshape(b, t, h, p) - ref).abs().max().item()
    print(f"SSD chunked vs paper listing (t={t}, chunk={chunk}, groups={groups}): max |diff| {err:.2e}")
    assert err < 1e-10
    assert (final.reshape(b, h, p, n) - ref_final).abs().max().item() < 1e-10


def test_ssd_scan_any_length():
    """A length that is no multiple of the chunk equals the same scan on the zero-padded sequence."""
    g = torch.Generator().manual_seed(1)
    x, a = torch.randn(1, 13, 1, 2, 3, generator=g), -torch.rand(1, 13, 1, 2, generator=g)
    B, C = torch.randn(1, 13, 1, 4, generator=g), torch.randn(1, 13, 1, 4, generator=g)
    y, h = ssd_chunked(x, a, B, C, 4)
    ref, ref_h = ssd_minimal_discrete(F.pad(x.flatten(2, 3), (0, 0, 0, 0, 0, 3)), F.pad(a.flatten(2), (0, 0, 0, 3)),
                                      F.pad(B.expand(1, 13, 2, 4), (0, 0, 0, 0, 0, 3)),
                                      F.pad(C.expand(1, 13, 2, 4), (0, 0, 0, 0, 0, 3)), 4)
    assert (y.flatten(2, 3) - ref[:, :13]).abs().max() < 1e-5
    assert (h.flatten(1, 2) - ref_h).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# the model against transformers' Mamba2ForCausalLM
# ---------------------------------------------------------------------------------------------
def _hf_config(**kw):
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, state_size=16,
                n_groups=2, expand=2, conv_kernel=4, chunk_size=8, tie_word_embeddings=False,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return transformers.Mamba2Config(**base)


def _pair(seed=0, **kw):
    """transformers' model with random weights (A, dt, D and the norms moved off their init) and
    ours holding the same weights."""
    from evolm.interop.hf import config_from_hf, state_dict_from_hf

    torch.manual_seed(seed)
    hf = transformers.Mamba2ForCausalLM(_hf_config(**kw)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("A_log", "D", "norm.weight", "norm_f.weight", "bias")):
                p.add_(torch.randn_like(p) * 0.3)
    cfg = config_from_hf(hf.config.to_dict())
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg, "mamba2"), strict=True)
    return hf, ours


def test_logits_match_transformers():
    hf, ours = _pair()
    ids = torch.randint(0, V, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (hf(ids).logits - ours(ids)).abs().max().item()
    print(f"Mamba-2 logits vs transformers Mamba2ForCausalLM: max |diff| {err:.2e}")
    assert err <= 1e-4


def test_config_errors_name_the_field():
    base = dict(vocab_size=V, d_model=32, n_layers=1, n_heads=1, attention="mamba2", mlp="none", pos_emb="none",
                mamba_d_head=8, mamba_d_state=4)
    ModelConfig(**base)
    with pytest.raises(ConfigError, match="mamba_d_head"):
        ModelConfig(**{**base, "mamba_d_head": 7})
    with pytest.raises(ConfigError, match="mamba_n_groups"):
        ModelConfig(**{**base, "mamba_n_groups": 3})
    with pytest.raises(ConfigError, match="mamba_dt_limit"):
        ModelConfig(**{**base, "mamba_dt_limit": (0.5, 0.1)})
    with pytest.raises(ConfigError, match="mamba_chunk_size"):
        ModelConfig(**{**base, "mamba_chunk_size": 0})
    with pytest.raises(ConfigError, match="pos_emb"):
        ModelConfig(**{**base, "pos_emb": "rope"})


def test_recurrent_step_equals_chunked_scan():
    """The recurrence, one token at a time from a given state, gives the chunked scan's outputs and state."""
    from evolm.nn.mamba2 import ssd_step

    g = torch.Generator().manual_seed(3)
    b, t, G, r, p, n = 2, 21, 2, 3, 4, 5
    x, a = torch.randn(b, t, G, r, p, generator=g), -torch.rand(b, t, G, r, generator=g)
    B, C = torch.randn(b, t, G, n, generator=g), torch.randn(b, t, G, n, generator=g)
    h0 = torch.randn(b, G, r, p, n, generator=g)
    y, final = ssd_chunked(x, a, B, C, 8, h0)
    h, ys = h0, []
    for i in range(t):
        yi, h = ssd_step(x[:, i], a[:, i], B[:, i], C[:, i], h)
        ys.append(yi)
    err = (torch.stack(ys, 1) - y).abs().max().item()
    print(f"SSD recurrent steps vs chunked scan: max |diff| {err:.2e}")
    assert err < 1e-5 and (h - final).abs().max() < 1e-5


def test_trains_gradients_flow():
    """A training step: finite loss, a gradient on every parameter (A_log, dt_bias, D included)."""
    _, model = _pair()
    model.train()
    ids = torch.randint(0, V, (2, 20))
    loss = model(ids, targets=ids)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_hf_folder_round_trip(tmp_path):
    """evolm -> a Hugging Face folder that transformers loads with the same logits -> evolm again."""
    from evolm.interop.hf import config_to_hf, load_hf_folder, save_hf_folder

    _, model = _pair(use_bias=True, time_step_limit=(0.0, 3.0))
    assert config_to_hf(model.config)["model_type"] == "mamba2"
    folder = save_hf_folder(model, tmp_path / "m")
    back_hf = transformers.Mamba2ForCausalLM.from_pretrained(folder).eval()
    back = load_hf_folder(folder).eval()
    ids = torch.randint(3, V, (1, 19))
    with torch.no_grad():
        ref = model(ids)
        torch.testing.assert_close(back_hf(ids).logits, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(back(ids), ref)
    assert back.config.diff(model.config) == {}


# ---------------------------------------------------------------------------------------------
# decoding: the recurrent step with the conv and SSM states in the cache (cache/state.py)
# ---------------------------------------------------------------------------------------------
def test_cached_greedy_generation_equals_transformers():
    hf, model = _pair()
    ids = torch.randint(3, V, (1, 11), generator=torch.Generator().manual_seed(5))
    hf.generation_config.eos_token_id = None  # 24 greedy tokens each, whatever they are (eos included)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, 11:].tolist()
    ours = generate(model, ids, SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True))[0]
    assert len(ref) == 24 and ours == ref


def test_recurrent_steps_equal_the_full_scan():
    """A prefill (several chunks, from a zero state), a second chunked call continuing from the
    cached state, then single recurrent steps: the full sequence's logits."""
    _, model = _pair()
    ids = torch.randint(3, V, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 2, 64)
        first = model(ids[:, :13], cache=cache)
        second = model(ids[:, 13:22], cache=cache)  # T > 1 from a cached state: conv window + initial SSM state
        steps = [model(ids[:, t:t + 1], cache=cache) for t in range(22, 40)]
    err = (torch.cat([first, second, *steps], 1) - full).abs().max().item()
    print(f"Mamba-2 cached prefill + recurrent steps vs full scan: max |diff| {err:.2e}")
    assert err <= 1e-5


def test_left_padded_batch_equals_rows_alone():
    """transformers zeroes padded positions (Mamba2Mixer's attention_mask): a left-padded row gives
    the logits of the row alone, and the padded batch generates each row's greedy tokens."""
    hf, model = _pair(use_bias=False)
    g = torch.Generator().manual_seed(7)
    a, b = torch.randint(3, V, (1, 20), generator=g), torch.randint(3, V, (1, 13), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        ref = hf(ids, attention_mask=mask).logits
        err = (out - ref)[mask.bool()].abs().max().item()
        torch.testing.assert_close(out[0], model(a)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, 7:], model(b)[0], atol=1e-5, rtol=1e-5)
    print(f"Mamba-2 left-padded batch vs transformers (real tokens): max |diff| {err:.2e}")
    assert err <= 1e-4
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    both = generate(model, [a[0].tolist(), b[0].tolist()], params)
    assert both == [generate(model, a, params)[0], generate(model, b, params)[0]]
    # with projection biases too (where zeroing the block input alone would leave the bias in the conv)
    _, biased = _pair(use_bias=True)
    with torch.no_grad():
        torch.testing.assert_close(biased(ids, attention_mask=mask)[1, 7:], biased(b)[0], atol=1e-5, rtol=1e-5)


def test_cache_memory_per_sequence_is_flat_in_length():
    """The cache holds (kernel - 1) conv inputs and an H x P x N state per layer, whatever the length."""
    _, model = _pair()
    sizes = []
    for n in (16, 300):
        cache = KVCache.for_model(model, 1, 512)
        with torch.no_grad():
            model(torch.randint(3, V, (1, n)), cache=cache)
            model(torch.randint(3, V, (1, 1)), cache=cache)
        sizes.append(cache.nbytes())
    m = model.layers[0].self_attn
    per_layer = (m.conv_dim * (m.kernel - 1) + m.n_heads * m.head_dim * m.state_size) * 4
    print(f"Mamba-2 cache bytes per sequence at 17 and 301 tokens: {sizes}")
    assert sizes == [model.config.n_layers * per_layer] * 2


def test_select_rows_reorders_states():
    _, model = _pair()
    ids = torch.randint(3, V, (2, 9))
    with torch.no_grad():
        cache = KVCache.for_model(model, 2, 32)
        model(ids, cache=cache)
        cache.select_rows(torch.tensor([1, 1, 0]))
        nxt = torch.randint(3, V, (3, 1))
        out = model(nxt, cache=cache)
        ref = model(torch.cat([ids[[1, 1, 0]], nxt], 1))[:, -1:]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_server_engine_decodes_as_generate(serving_tools):
    """The server's slot cache holds each request's Mamba-2 states: requests of different lengths
    sharing decode steps, one joining later, give generate()'s tokens."""
    _, model = _pair()
    with torch.no_grad():  # sharpen the random model's logits so argmax is far from ties
        model.embed_tokens.weight.mul_(4)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (3, 11, 20, 7)]
    max_new = [12, 5, 9, 10]
    ref = [generate(model, p, SamplingParams(max_new_tokens=m, temperature=0))[0] for p, m in zip(prompts, max_new)]
    assert serving_tools.served_greedy(model, prompts, max_new) == ref  # 3 at once, the 4th joins later


def test_cost_card_counts_params_state_bytes_and_flops():
    """The card's Mamba-2 figures against the model: numel by part, the cache's bytes, and torch's
    FLOP counter (which sees the matmuls, the convolution and the SSD einsums: C B^T, the weighted
    sum, the chunk states and their read-out)."""
    from torch.utils.flop_counter import FlopCounterMode

    from evolm.analysis.cost import cost_card, mamba2_dims

    _, model = _pair(use_bias=True)
    c = model.config
    T = 16  # two chunks of 8
    card = cost_card(c, context_len=T, bytes_per_value=4)
    named = dict(model.named_parameters())
    assert card["params_total"] == sum(p.numel() for p in named.values())
    assert card["params_by_part"]["attention"] == sum(p.numel() for n, p in named.items() if ".self_attn." in n)
    assert card["kv_cache_bytes_at_context"] == 0
    cache = KVCache.for_model(model, 1, 512)
    with torch.no_grad():
        model(torch.randint(3, V, (1, 300)), cache=cache)
    assert card["state_bytes_per_sequence"] == cache.nbytes()
    # FLOPs: the counted products match; flat in the context beyond one chunk
    assert cost_card(c, context_len=4096)["forward_flops_per_token"] == \
        cost_card(c, context_len=c.mamba_chunk_size)["forward_flops_per_token"]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(3, V, (1, T)))
    di, H, P, N, G = mamba2_dims(c)
    # the counter leaves out what is not a product of matrices: biases, norm scales, dt_bias, and the
    # scan's elementwise work (decay mask, dt scaling, D skip, gate)
    elementwise = sum(p.numel() for p in named.values() if p.ndim == 1) - c.n_layers * 2 * H
    scan_elementwise = c.n_layers * (2 * c.mamba_chunk_size * H + 6 * di)
    assert counter.get_total_flops() / T == card["forward_flops_per_token"] - 2 * elementwise - scan_elementwise
    print(f"Mamba-2 tiny forward FLOPs/token: {card['forward_flops_per_token']:,}; state bytes/sequence: "
          f"{card['state_bytes_per_sequence']:,}")


def test_preset_cost_card_counts_the_model():
    from evolm.analysis.cost import cost_card

    import evolm

    model = evolm.build("mamba2-130m", device="meta")
    card = cost_card("mamba2-130m", context_len=2048)
    assert card["params_total"] == sum(p.numel() for p in model.parameters())
    assert card["kv_cache_bytes_at_context"] == 0
    # 24 layers x ((4 - 1) * (1536 + 256) conv inputs in bf16 + 24 heads x 64 x 128 float32)
    assert card["state_bytes_per_sequence"] == 24 * (3 * 1792 * 2 + 24 * 64 * 128 * 4)


def test_compiled_decoding_caches_hold_the_states(serving_tools):
    """What generate(compile=True) does, run eagerly: a compiled prefill's collector (PrefillKV) hands
    the Mamba-2 states to a StaticKVCache, whose static mode updates them in place; the logits are
    the full forward's."""
    _, model = _pair()
    serving_tools.static_steps_equal_full(model, torch.randint(3, V, (2, 14)), 9)
