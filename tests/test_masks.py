"""Mask planning (evolm/nn/masks.py) and the cache protocol (evolm/cache/protocol.py).

References: each mask kind against its definition written out element by element here; a
bidirectional post-LN model against torch's own ``nn.TransformerEncoder`` (the BERT block: post-LN,
GELU MLP, biases) built from the same weights; the plan's sharing against the config's windows;
every cache kind, serve's views included, against the protocol.
"""

import pytest
import torch

from evolm import ModelConfig, Transformer
from evolm.cache import Cache, KVCache, PrefillKV, StaticKVCache
from evolm.nn.masks import MaskInputs, attention_mask, plan_masks


def _definition(kind, Tq, start, Tk, window=None, prefix=None, valid=None):
    """(B, 1, Tq, Tk) from the words of nn/masks.py's docstring, one (query, key) at a time."""
    B = 1 if valid is None else valid.shape[0]
    out = torch.zeros(B, 1, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        n = None if prefix is None else (prefix[b] if isinstance(prefix, list) else prefix)
        for t in range(Tq):
            i = start + t
            for j in range(Tk):
                if kind == "bidirectional":
                    ok = window is None or abs(i - j) <= window // 2
                else:
                    ok = j <= i and (window is None or i - j < window)
                    if kind == "prefix" and i < n and j < n:
                        ok = True
                if valid is not None:
                    ok = ok and bool(valid[b, j])
                out[b, 0, t, j] = ok
            if not out[b, 0, t].any():  # a query that would see nothing sees itself
                out[b, 0, t, i] = i < Tk
    return out


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "prefix"])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_mask_kinds_match_their_definition(kind, window, padded):
    T = 9
    valid = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9], dtype=torch.bool) if padded else None
    prefix = [5, 3] if padded else 4
    got = attention_mask(torch.arange(T), torch.arange(T), valid, window, kind=kind,
                         prefix_len=torch.tensor(prefix) if isinstance(prefix, list) else prefix)
    want = _definition(kind, T, 0, T, window, prefix, valid)
    assert torch.equal(got.expand_as(want), want)


@pytest.mark.parametrize("start", [0, 6])
def test_chunk_mask_matches_its_definition(start):
    """Llama 4's chunks: a query sees the earlier keys of its own chunk, chunks counted from each
    row's first real token (transformers' create_chunked_causal_mask under left padding)."""
    C, T = 3, 10
    valid = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * T, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    got = attention_mask(torch.arange(start, T), torch.arange(T), valid, None, chunk=C)
    want = torch.zeros(3, 1, T - start, T, dtype=torch.bool)
    for b in range(3):
        lead = int((valid[b].cumsum(0) == 0).sum())
        for t, i in enumerate(range(start, T)):
            for j in range(T):
                ok = j <= i and (i - lead) // C == (j - lead) // C and bool(valid[b, j])
                want[b, 0, t, j] = ok or i == j
    assert torch.equal(got, want)


def test_mask_of_new_tokens_after_a_cached_prefix():
    """Queries at slots 6..8 over keys 0..8 (a chunk after six cached tokens)."""
    got = attention_mask(torch.arange(6, 9), torch.arange(9), None, 3, kind="prefix", prefix_len=7)
    assert torch.equal(got[0, 0], _definition("prefix", 3, 6, 9, 3, 7)[0, 0])


def test_bad_mask_kind_and_missing_prefix_are_clear():
    with pytest.raises(ValueError, match="mask kind 'encoder'"):
        attention_mask(torch.arange(3), torch.arange(3), None, None, kind="encoder")
    with pytest.raises(ValueError, match="needs prefix_len"):
        attention_mask(torch.arange(3), torch.arange(3), None, None, kind="prefix")


def _tiny(**kw):
    base = dict(vocab_size=61, d_model=32, n_layers=6, n_heads=4, pos_emb="rope", norm="rmsnorm",
                max_seq_len=64, sliding_window=4, sliding_window_pattern=3)
    base.update(kw)
    return ModelConfig(**base)


def test_plan_builds_one_mask_per_distinct_window():
    """Gemma-style 2 local : 1 global; a mask is built once per window and shared by its layers."""
    c = _tiny()
    T = 10
    plan = plan_masks(c, None, MaskInputs(0, T, None), "cpu")
    local, glob = plan[0], plan[2]
    assert glob == (None, True)  # global layers: the kernel's causal flag, no tensor
    assert local[0] is not None and all(plan[i][0] is local[0] for i in (0, 1, 3, 4))
    assert torch.equal(local[0][0, 0], _definition("causal", T, 0, T, 4)[0, 0])


def test_plan_drops_a_window_longer_than_the_sequence():
    plan = plan_masks(_tiny(), None, MaskInputs(0, 3, None), "cpu")
    assert all(p == (None, True) for p in plan)


def test_bidirectional_forward_equals_torch_transformer_encoder():
    """A post-LN, GELU, biased, learned-position model with mask_kind='bidirectional' is a BERT
    encoder: each layer equals torch.nn.TransformerEncoderLayer with the same weights, padding too."""
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16,
                    norm_placement="post", final_norm=False, activation="gelu", qkv_bias=True,
                    o_bias=True, mlp_bias=True, norm_eps=1e-12)
    model = Transformer(c).eval()
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu",
                                             layer_norm_eps=1e-12, batch_first=True)
    ref = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    with torch.no_grad():
        for ours, theirs in zip(model.layers, ref.layers):
            a = ours.self_attn
            theirs.self_attn.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            theirs.self_attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            theirs.self_attn.out_proj.weight.copy_(a.o_proj.weight)
            theirs.self_attn.out_proj.bias.copy_(a.o_proj.bias)
            theirs.linear1.weight.copy_(ours.mlp.up_proj.weight)
            theirs.linear1.bias.copy_(ours.mlp.up_proj.bias)
            theirs.linear2.weight.copy_(ours.mlp.down_proj.weight)
            theirs.linear2.bias.copy_(ours.mlp.down_proj.bias)
            for mine, norm in ((ours.attn_norm, theirs.norm1), (ours.mlp_norm, theirs.norm2)):
                norm.weight.copy_(mine.weight)
                norm.bias.copy_(mine.bias)
    ids = torch.randint(0, 50, (2, 7))
    keep = torch.ones(2, 7, dtype=torch.long)
    keep[1, 5:] = 0  # right padding in row 1
    with torch.no_grad():
        hidden = model(ids, attention_mask=keep, mask_kind="bidirectional", return_hidden=True)
        x = model.embed(ids, torch.arange(7).expand(2, 7))
        want = ref(x, src_key_padding_mask=~keep.bool())
    real = keep.bool()
    torch.testing.assert_close(hidden[real], want[real], atol=1e-5, rtol=1e-5)
    # and it is not causal: the first token's state depends on the last one
    other = ids.clone()
    other[0, -1] = (other[0, -1] + 1) % 50
    with torch.no_grad():
        moved = model(other, mask_kind="bidirectional", return_hidden=True)
        causal = model(other, return_hidden=True)
        base = model(ids, return_hidden=True)
    assert not torch.allclose(moved[0, 0], model(ids, mask_kind="bidirectional", return_hidden=True)[0, 0])
    torch.testing.assert_close(causal[0, 0], base[0, 0])


def test_prefix_lm_forward_sees_the_prefix_both_ways():
    """Tokens inside the prefix see later prefix tokens; tokens after it stay causal, so a
    prefix-LM's continuation logits do not depend on what follows them."""
    torch.manual_seed(0)
    model = Transformer(_tiny(n_layers=2, sliding_window=None, sliding_window_pattern=1)).eval()
    ids = torch.randint(0, 61, (1, 8))
    changed = ids.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 61  # inside the prefix (length 4)
    late = ids.clone()
    late[0, 7] = (late[0, 7] + 1) % 61  # the last token, outside the prefix
    with torch.no_grad():
        out = model(ids, mask_kind="prefix", prefix_len=4)
        assert not torch.allclose(out[0, 0], model(changed, mask_kind="prefix", prefix_len=4)[0, 0])
        torch.testing.assert_close(out[0, :7], model(late, mask_kind="prefix", prefix_len=4)[0, :7])


def test_every_cache_kind_implements_the_protocol():
    from evolm.serve.scheduler import SlotCache, _DecodeView, _PrefillView

    c = _tiny(n_layers=2)
    model = Transformer(c)
    slots = SlotCache(2, 32)
    caches = [KVCache.for_model(model, 1, 16), StaticKVCache.for_model(model, 1, 16), PrefillKV(),
              _PrefillView(slots, 0), _DecodeView(slots, [0], [3], "cpu")]
    for cache in caches:
        assert isinstance(cache, Cache), type(cache).__name__
        assert cache.static is False


def test_ring_cache_layouts_and_cached_decoding_with_prefix_kind():
    """A ring cache names each local layer's layout by its window, the global ones plain; and a
    prefix-LM decoded token by token from a cache equals the full forward."""
    torch.manual_seed(0)
    c = _tiny(n_layers=3)
    model = Transformer(c).eval()
    cache = KVCache.for_model(model, 1, 32)
    assert [cache.key_layout(i) for i in range(3)] == [4, 4, None]
    ids = torch.randint(0, 61, (1, 10))
    with torch.no_grad():
        full = model(ids, mask_kind="prefix", prefix_len=5)
        steps = [model(ids[:, :5], cache=cache, mask_kind="prefix", prefix_len=5)]
        steps += [model(ids[:, t:t + 1], cache=cache, mask_kind="prefix", prefix_len=5) for t in range(5, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_config_mask_sets_the_default_kind_and_is_validated():
    from evolm.config import ConfigError

    torch.manual_seed(0)
    encoder = Transformer(_tiny(n_layers=2, sliding_window=None, sliding_window_pattern=1, mask="bidirectional")).eval()
    ids = torch.randint(0, 61, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids), encoder(ids, mask_kind="bidirectional"))
        assert not torch.allclose(encoder(ids), encoder(ids, mask_kind="causal"))
    with pytest.raises(ConfigError, match="'mask'"):
        _tiny(mask="encoder")


def test_hf_export_refuses_a_non_causal_mask():
    """No decoder family of transformers attends bidirectionally: export says so by field name."""
    from evolm.interop.hf import config_to_hf

    c = _tiny(n_layers=2, sliding_window=None, sliding_window_pattern=1, mask="bidirectional")
    with pytest.raises(Exception, match="'mask'"):
        config_to_hf(c)
