"""Multi-head latent attention (evolm/nn/mla.py) against the DeepSeek-V2 equations and transformers.

The naive reference below is written from DeepSeek-V2 (arXiv:2405.04434, section 2.1) in its
*absorbed* inference form: the key up-projection W_UK is folded into the query and W_UV applied
after attending over the latents, so scores are ``(W_UK^T q_C) . c_KV + q_R . k_R``. That is a
different computation path from ours (which re-expands per-head keys), yet must give the same
output. A second test copies the weights into transformers' DeepseekV3Attention.
"""

import math

import pytest
import torch

from evolm import KVCache, ModelConfig, Transformer
from evolm.nn.mla import MultiHeadLatentAttention
from evolm.nn.rope import RotaryEmbedding

B, T, D = 2, 7, 48


def _cfg(**kw):
    base = dict(vocab_size=97, d_model=D, n_layers=1, n_heads=3, attention="mla", pos_emb="rope",
                norm="rmsnorm", norm_eps=1e-6, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                v_head_dim=6, q_lora_rank=10, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.3
            p.copy_(1.0 + noise if "layernorm" in name else noise)
    return module


def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, inv, factor, interleave):
    ang = pos[:, None, :, None].double() * inv.double()
    cos, sin = ang.cos() * factor, ang.sin() * factor
    if interleave:  # pairs rotated in place (DeepSeek's checkpoint layout)
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def naive_mla(m, cfg, x, pos, inv_freq=None, cos_factor=1.0, softmax_scale=None):
    """DeepSeek-V2 MLA, absorbed form, float64."""
    W = {n: p.detach().double() for n, p in m.named_parameters()}
    h = x.double()
    H, dn, dr, dv, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    Bx, Tx, _ = h.shape
    if inv_freq is None:
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, dr, 2, dtype=torch.float64) / dr)
    # queries: c_Q = RMSNorm(W_DQ h), q = W_UQ c_Q  (or q = W_Q h without the q bottleneck)
    if cfg.q_lora_rank is None:
        q = h @ W["q_proj.weight"].T
    else:
        q = _rms(h @ W["q_a_proj.weight"].T, W["q_a_layernorm.weight"], cfg.norm_eps) @ W["q_b_proj.weight"].T
    q = q.view(Bx, Tx, H, dn + dr).transpose(1, 2)
    q_c, q_r = q[..., :dn], _rope(q[..., dn:], pos, inv_freq, cos_factor, cfg.rope_interleave)
    # keys/values: c_KV = RMSNorm(W_DKV h) (the cached latent), k_R = RoPE(W_KR h) shared by all heads
    a = h @ W["kv_a_proj_with_mqa.weight"].T
    c_kv = _rms(a[..., :r], W["kv_a_layernorm.weight"], cfg.norm_eps)  # (B, T, r)
    k_r = _rope(a[..., r:][:, None], pos, inv_freq, cos_factor, cfg.rope_interleave)  # (B, 1, T, dr)
    w_b = W["kv_b_proj.weight"].view(H, dn + dv, r)
    w_uk, w_uv = w_b[:, :dn], w_b[:, dn:]  # (H, dn, r), (H, dv, r)
    q_absorbed = torch.einsum("bhtd,hdr->bhtr", q_c, w_uk)  # W_UK folded into the query
    scores = torch.einsum("bhtr,bsr->bhts", q_absorbed, c_kv) + q_r @ k_r.transpose(-1, -2)
    scale = softmax_scale if softmax_scale is not None else (dn + dr) ** -0.5
    scores = scores * scale
    causal = torch.ones(Tx, Tx, dtype=torch.bool).tril()
    p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    latent_out = torch.einsum("bhts,bsr->bhtr", p, c_kv)  # attend over latents, then W_UV
    o = torch.einsum("bhtr,hvr->bthv", latent_out, w_uv).reshape(Bx, Tx, H * dv)
    return o @ W["o_proj.weight"].T


def _ours(m, cfg, x, pos):
    rope = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_interleave)
    return m(x, rope(pos, x.dtype), None, True)


@pytest.mark.parametrize("q_lora_rank", [None, 10])
@pytest.mark.parametrize("interleave", [False, True])
def test_mla_matches_deepseek_v2_equations(q_lora_rank, interleave):
    cfg = _cfg(q_lora_rank=q_lora_rank, rope_interleave=interleave)
    m = _randomize(MultiHeadLatentAttention(cfg, 0)).eval()
    assert hasattr(m, "q_proj") == (q_lora_rank is None)
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(T).expand(B, T) + torch.tensor([[0], [3]])
    torch.testing.assert_close(_ours(m, cfg, x, pos).double(), naive_mla(m, cfg, x, pos), rtol=1e-4, atol=1e-5)


def test_mla_yarn_scales_match_deepseek():
    """YaRN: cos/sin scaled by mscale/mscale_all_dim, softmax scale by mscale(all_dim)^2."""
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    sc = {"type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.8, "original_max_seq_len": 16,
          "beta_fast": 32, "beta_slow": 1}
    cfg = _cfg(rope_scaling=sc, rope_interleave=True)
    hf = DeepseekV3Config(hidden_size=D, num_attention_heads=3, qk_rope_head_dim=4, max_position_embeddings=640,
                          rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                           "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1,
                                           "original_max_position_embeddings": 16})
    inv, attn_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    mscale_all = 0.1 * 0.8 * math.log(40.0) + 1.0
    m = _randomize(MultiHeadLatentAttention(cfg, 0)).eval()
    assert m.scale == pytest.approx(12 ** -0.5 * mscale_all ** 2)
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(T).expand(B, T) * 5
    ref = naive_mla(m, cfg, x, pos, inv, attn_factor, 12 ** -0.5 * mscale_all ** 2)
    torch.testing.assert_close(_ours(m, cfg, x, pos).double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("q_lora_rank", [None, 10])
@pytest.mark.parametrize("interleave", [False, True])
def test_mla_matches_transformers_deepseek_v3_attention(q_lora_rank, interleave):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3Attention,
                                                                      DeepseekV3RotaryEmbedding)

    cfg = _cfg(q_lora_rank=q_lora_rank, rope_interleave=interleave)
    hf_cfg = DeepseekV3Config(hidden_size=D, num_attention_heads=3, num_key_value_heads=3,
                              q_lora_rank=q_lora_rank, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                              v_head_dim=6, rope_interleave=interleave, attention_bias=False,
                              max_position_embeddings=64, rope_parameters={"rope_type": "default",
                                                                           "rope_theta": 10000.0})
    hf_cfg._attn_implementation = "eager"
    ref = DeepseekV3Attention(hf_cfg, 0).eval()
    ours = _randomize(MultiHeadLatentAttention(cfg, 0)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # same parameter names as transformers
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(T).expand(B, T)
    cos, sin = DeepseekV3RotaryEmbedding(hf_cfg)(x, pos)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        y_ref, _ = ref(x, (cos, sin), causal)
        y = _ours(ours, cfg, x, pos)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


# --- the point of MLA: a small cache ------------------------------------------------------------
def _mla_model(n_layers=2, **kw):
    torch.manual_seed(0)
    return Transformer(_cfg(n_layers=n_layers, mlp="glu", activation="silu", mlp_bias=False, **kw)).eval()


def test_mla_cache_stores_only_latent_and_rope_key():
    model = _mla_model()
    cache = KVCache(batch=B, max_len=16)
    with torch.no_grad():
        model(torch.randint(0, 97, (B, 5)), cache=cache)
    cfg = model.config
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # 12 + 4 numbers per token per layer
    assert cache.nbytes() == cfg.n_layers * B * 16 * per_token * 4
    # what per-head keys and values would have cost
    mha_per_token = cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    assert per_token < mha_per_token  # 16 vs 54 here; 576 vs 40960 for DeepSeek-V3


@pytest.mark.parametrize("q_lora_rank", [None, 10])
def test_mla_cached_decode_equals_full_forward(q_lora_rank):
    model = _mla_model(n_layers=3, q_lora_rank=q_lora_rank, rope_interleave=True)
    ids = torch.randint(0, 97, (B, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(batch=B, max_len=11)
        steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 11)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_mla_with_sliding_window_ring_cache():
    model = _mla_model(n_layers=2, sliding_window=3, sliding_window_pattern=2)
    ids = torch.randint(0, 97, (B, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch=B, max_len=10)
        steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.nbytes() == B * (3 + 10) * (12 + 4) * 4  # local layer: ring of 3; global: 10 slots
