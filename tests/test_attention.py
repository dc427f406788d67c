"""Causal self-attention (evolm/nn/attention.py) against a naive reference written here.

The reference follows the papers literally: explicit projections, per-head (or full) RMSNorm on
q/k, RoPE with its own cos/sin (pairs rotated in place when interleaved), key/value head
``h // (H / H_kv)`` shared by query head ``h`` (GQA, Ainslie et al. 2023), scores
``q.k * scale``, Gemma 2's ``cap * tanh(s / cap)``, an explicit boolean mask (causal, window,
padding), a float64 softmax, then the output projection. It shares no code with evolm.
"""

import pytest
import torch

from evolm import KVCache, ModelConfig, Transformer
from evolm.nn.attention import Attention, attend
from evolm.nn.masks import attention_mask
from evolm.nn.rope import RotaryEmbedding

B, T = 2, 8


def _cfg(**kw):
    base = dict(vocab_size=97, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, pos_emb="rope",
                norm="rmsnorm", max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.25
            if p.ndim == 1 and "norm" in name:  # norm scales around their identity value
                p.copy_(noise if getattr(module.get_submodule(name.rsplit(".", 1)[0]), "unit_offset", False)
                        else 1.0 + noise)
            else:
                p.copy_(noise)
    return module


def _rms(x, w, eps, unit_offset):
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * ((1.0 + w) if unit_offset else w)


def _rope_ref(x, pos, cfg):
    """Rotate the first rotary_dim dims of x (B, H, T, D) at positions pos (B, T), RoFormer style."""
    rot = cfg.rotary_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    ang = pos[:, None, :, None].double() * inv  # (B, 1, T, rot/2)
    cos, sin = ang.cos(), ang.sin()
    xr, tail = x[..., :rot], x[..., rot:]
    if cfg.rope_interleave:  # pairs (x0, x1), (x2, x3), ... rotated in place
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:  # halves (x_i, x_{i + rot/2})
        a, b = xr[..., : rot // 2], xr[..., rot // 2:]
        out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return torch.cat((out, tail), dim=-1)


def naive_attention(attn, cfg, x, pos, key_valid=None, window=None):
    """Reference forward of one attention layer in float64 (see module docstring)."""
    W = {n: p.detach().double() for n, p in attn.named_parameters()}
    x = x.double()
    Bx, Tx, _ = x.shape
    H, Hk, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def lin(name):
        y = x @ W[f"{name}.weight"].T
        return y + W[f"{name}.bias"] if f"{name}.bias" in W else y

    q, k, v = lin("q_proj"), lin("k_proj"), lin("v_proj")
    uo = cfg.norm_unit_offset
    if cfg.qk_norm == "full":  # OLMo 2: over the whole projection
        q, k = _rms(q, W["q_norm.weight"], cfg.norm_eps, uo), _rms(k, W["k_norm.weight"], cfg.norm_eps, uo)
    q = q.view(Bx, Tx, H, Dh).transpose(1, 2)
    k = k.view(Bx, Tx, Hk, Dh).transpose(1, 2)
    v = v.view(Bx, Tx, Hk, Dh).transpose(1, 2)
    if cfg.qk_norm == "head":  # Qwen3 / Gemma 3: per head
        q, k = _rms(q, W["q_norm.weight"], cfg.norm_eps, uo), _rms(k, W["k_norm.weight"], cfg.norm_eps, uo)
    if cfg.pos_emb == "rope":
        q, k = _rope_ref(q, pos, cfg), _rope_ref(k, pos, cfg)
    group = torch.arange(H) // (H // Hk)  # kv head of each query head
    k, v = k[:, group], v[:, group]
    scale = (cfg.query_pre_attn_scalar or Dh) ** -0.5
    s = q @ k.transpose(-1, -2) * scale
    if cfg.attn_softcap:
        s = cfg.attn_softcap * torch.tanh(s / cfg.attn_softcap)
    i, j = torch.arange(Tx)[:, None], torch.arange(Tx)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    allowed = allowed[None, None].expand(Bx, 1, Tx, Tx)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :].bool()
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    y = (p @ v).transpose(1, 2).reshape(Bx, Tx, H * Dh)
    y = y @ W["o_proj.weight"].T
    return y + W["o_proj.bias"] if "o_proj.bias" in W else y


def _mask(Tx, key_valid=None, window=None):
    """Boolean (B|1, 1, T, T) mask from the definition: causal, within the window, real keys."""
    i, j = torch.arange(Tx)[:, None], torch.arange(Tx)[None, :]
    m = (j <= i) & ((i - j < window) if window else True)
    m = m[None, None]
    if key_valid is not None:
        m = (m & key_valid[:, None, None, :]) | (i == j)  # a padding query sees itself only
    return m


def _run_ours(attn, cfg, x, pos, key_valid=None, window=None):
    rope = None
    if cfg.pos_emb == "rope":
        rope = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, None, cfg.rope_interleave)(pos, x.dtype)
    if key_valid is None and window is None:
        return attn(x, rope, None, True)  # the fused causal kernel, no mask tensor
    return attn(x, rope, _mask(x.shape[1], key_valid, window), False)


CASES = {
    "mha": {},
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "qkv_bias": dict(n_kv_heads=2, qkv_bias=True),
    "qkv_o_bias": dict(qkv_bias=True, o_bias=True),
    "head_dim": dict(head_dim=16, n_kv_heads=2),
    "qk_norm_head": dict(n_kv_heads=2, qk_norm="head"),
    "qk_norm_head_gemma": dict(n_kv_heads=2, qk_norm="head", norm_unit_offset=True),
    "qk_norm_full": dict(n_kv_heads=2, qk_norm="full"),
    "softcap": dict(n_kv_heads=2, attn_softcap=2.0),
    "query_pre_attn_scalar": dict(query_pre_attn_scalar=24.0),
    "partial_rotary": dict(head_dim=16, rotary_pct=0.25),
    "interleave": dict(rope_interleave=True, n_kv_heads=2),
    "no_position": dict(pos_emb="none"),
    "gemma2_like": dict(n_kv_heads=2, attn_softcap=5.0, query_pre_attn_scalar=16.0, head_dim=16),
}


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 32, generator=g)
    pos = torch.arange(T).expand(B, T)
    return x, pos


@pytest.mark.parametrize("name", list(CASES))
def test_attention_matches_naive_reference(name):
    cfg = _cfg(**CASES[name])
    attn = _randomize(Attention(cfg, 0)).eval()
    x, pos = _inputs()
    torch.testing.assert_close(_run_ours(attn, cfg, x, pos).double(), naive_attention(attn, cfg, x, pos),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mha", "gqa", "softcap", "qk_norm_full", "interleave"])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_with_padding_and_window(name, window):
    cfg = _cfg(**CASES[name], sliding_window=window)
    attn = _randomize(Attention(cfg, 0)).eval()
    assert attn.window == window
    x, pos = _inputs()
    key_valid = torch.ones(B, T, dtype=torch.bool)
    key_valid[1, :3] = False  # left padding in the second sequence
    ours = _run_ours(attn, cfg, x, pos, key_valid, window).double()
    ref = naive_attention(attn, cfg, x, pos, key_valid, window)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1, 3:], ref[1, 3:], rtol=1e-4, atol=1e-5)  # real tokens only


@pytest.mark.parametrize("window", [1, 2, 5])
def test_sliding_window_matches_reference_and_differs_from_global(window):
    cfg = _cfg(n_kv_heads=2, sliding_window=window)
    attn = _randomize(Attention(cfg, 0)).eval()
    x, pos = _inputs()
    ours = _run_ours(attn, cfg, x, pos, None, window).double()
    torch.testing.assert_close(ours, naive_attention(attn, cfg, x, pos, None, window), rtol=1e-4, atol=1e-5)
    full = naive_attention(attn, cfg, x, pos)
    torch.testing.assert_close(ours[:, :window], full[:, :window], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours[:, window:], full[:, window:], atol=1e-4)


def test_attention_mask_formula():
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    q_slots = torch.arange(2, 6)  # 4 new queries after 2 cached tokens
    m = attention_mask(q_slots, torch.arange(6), valid, 2)
    i, j = q_slots[:, None], torch.arange(6)[None]
    expect = (j <= i) & (i - j < 2)
    assert m.shape == (2, 1, 4, 6)
    assert torch.equal(m[0, 0], expect)
    assert torch.equal(m[1, 0], (expect & valid[1]) | (i == j))
    # a ring buffer: keys in arbitrary order, -1 marks an empty entry
    ring = torch.tensor([4, -1, 2, 3])
    m = attention_mask(torch.tensor([4]), ring, None, 3)
    assert m[0, 0, 0].tolist() == [True, False, True, True]
    m = attention_mask(torch.tensor([5]), ring, None, 3)
    assert m[0, 0, 0].tolist() == [True, False, False, True]


def test_padding_query_row_is_never_empty():
    valid = torch.tensor([[False, False, True, True]])
    m = attention_mask(torch.arange(4), torch.arange(4), valid, None)
    assert m.any(-1).all(), "an all-masked row would give NaN in the softmax"


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_sdpa_path_equals_manual_path(kv):
    """The fused SDPA path and the explicit-softmax path (used for soft-capping) agree."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=g)
    k, v = torch.randn(2, kv, 7, 8, generator=g), torch.randn(2, kv, 7, 8, generator=g)
    huge = 1e5  # cap * tanh(s / cap) == s to fp32 precision
    torch.testing.assert_close(attend(q, k, v, None, True, 0.3), attend(q, k, v, None, True, 0.3, huge),
                               rtol=1e-5, atol=1e-6)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[0, :2] = False
    mask = _mask(7, valid, 3)
    torch.testing.assert_close(attend(q, k, v, mask, False, 0.3), attend(q, k, v, mask, False, 0.3, huge),
                               rtol=1e-5, atol=1e-6)
    # decode shape: 2 new queries over 7 keys with an explicit mask
    mask = _mask(7, None, 4)[..., 5:, :]
    torch.testing.assert_close(attend(q[:, :, 5:], k, v, mask, False, 0.3),
                               attend(q[:, :, 5:], k, v, mask, False, 0.3, huge), rtol=1e-5, atol=1e-6)


def test_softcap_bounds_scores():
    cfg = _cfg(attn_softcap=1.0)
    attn = _randomize(Attention(cfg, 0)).eval()
    x, pos = _inputs()
    with torch.no_grad():
        attn.q_proj.weight.mul_(20)  # scores of ~100: the cap must be what keeps them finite and soft
    ref = naive_attention(attn, cfg, x, pos)
    torch.testing.assert_close(_run_ours(attn, cfg, x, pos).double(), ref, rtol=1e-4, atol=1e-5)
    uncapped = naive_attention(attn, _cfg(), x, pos)
    assert not torch.allclose(ref, uncapped, atol=1e-3)


# --- in the model: masks and the KV cache ----------------------------------------------------------
def _model(**kw):
    cfg = _cfg(n_layers=4, n_kv_heads=2, mlp="glu", activation="silu", mlp_bias=False, **kw)
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def test_model_uses_fused_causal_kernel_without_mask():
    """No padding and no reachable window: layers get is_causal=True and no mask tensor."""
    model = _model(sliding_window=16, sliding_window_pattern=2)
    seen = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda m, a: seen.append((a[2], a[3])))
    model(torch.randint(0, 97, (2, 10)))
    assert all(mask is None and causal for mask, causal in seen)
    seen.clear()
    model(torch.randint(0, 97, (2, 20)))  # now the window (16) is shorter than the sequence
    local = [seen[i] for i in range(4) if model.config.layer_is_local(i)]
    glob = [seen[i] for i in range(4) if not model.config.layer_is_local(i)]
    assert all(m is not None and not c for m, c in local) and all(m is None and c for m, c in glob)


@pytest.mark.parametrize("kw", [dict(sliding_window=3, sliding_window_pattern=2),
                                dict(sliding_window=3),  # every layer local (Mistral)
                                dict(sliding_window=4, sliding_window_pattern=2, rope_local_theta=100.0,
                                     attn_softcap=3.0, qk_norm="head")])
@pytest.mark.parametrize("ring", [False, True])
def test_kv_cache_incremental_equals_full_with_sliding_window(kw, ring):
    """Prefill, a chunk, then single tokens == one full pass; with full buffers or window rings."""
    model = _model(**kw)
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch=2, max_len=14) if ring else KVCache(batch=2, max_len=14)
        steps = [model(ids[:, :5], cache=cache)]  # prefill
        steps.append(model(ids[:, 5:8], cache=cache))  # a chunk of 3 (explicit mask path)
        for t in range(8, 14):  # one token at a time
            steps.append(model(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    assert cache.length == 14


@pytest.mark.parametrize("ring", [False, True])
def test_kv_cache_with_left_padding_equals_full(ring):
    model = _model(sliding_window=3, sliding_window_pattern=2)
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(6))
    am = torch.ones(2, 10, dtype=torch.long)
    am[1, :4] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=am)
        cache = KVCache.for_model(model, batch=2, max_len=10) if ring else KVCache(batch=2, max_len=10)
        steps = [model(ids[:, :6], attention_mask=am[:, :6], cache=cache)]
        for t in range(6, 10):
            steps.append(model(ids[:, t:t + 1], cache=cache))
    inc = torch.cat(steps, dim=1)
    torch.testing.assert_close(inc[0], full[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inc[1, 4:], full[1, 4:], rtol=1e-4, atol=1e-5)


def test_kv_cache_bytes_scale_with_kv_heads():
    """GQA's point: the cache holds n_kv_heads, not n_heads, keys and values per token."""
    sizes = {}
    for kv in (4, 2, 1):
        model = Transformer(_cfg(n_layers=2, n_kv_heads=kv)).eval()
        cache = KVCache(batch=1, max_len=16)
        with torch.no_grad():
            model(torch.randint(0, 97, (1, 4)), cache=cache)
        sizes[kv] = cache.nbytes()
        assert sizes[kv] == 2 * 2 * kv * 8 * 16 * 4  # layers * (k, v) * kv heads * head_dim * slots * fp32
    assert sizes[4] == 2 * sizes[2] == 4 * sizes[1]


def test_ring_cache_bytes_cap_at_window():
    """Sliding-window layers keep only their window: cache memory stops growing with length."""
    model = Transformer(_cfg(n_layers=2, n_kv_heads=2, sliding_window=4, sliding_window_pattern=2)).eval()
    cache = KVCache.for_model(model, batch=1, max_len=32)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 6)), cache=cache)
    per_slot = 2 * 2 * 8 * 4  # (k, v) * kv heads * head_dim * fp32 bytes
    assert cache.nbytes() == per_slot * (4 + 32)  # layer 0 local (ring of 4), layer 1 global


def test_kv_cache_full_raises():
    model = Transformer(_cfg()).eval()
    cache = KVCache(batch=1, max_len=4)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 4)), cache=cache)
        with pytest.raises(ValueError, match="max_len"):
            model(torch.randint(0, 97, (1, 1)), cache=cache)
