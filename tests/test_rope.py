"""Rotary embeddings and their scalings (evolm/nn/rope.py) against transformers and RoPE's algebra.

- inverse frequencies and the cos/sin scale ("attention factor") of default, linear, Llama 3.1
  and YaRN RoPE equal transformers' ``ROPE_INIT_FUNCTIONS`` (and the default/partial
  ``compute_default_rope_parameters``) for the same parameters;
- ``apply_rope`` equals transformers' ``apply_rotary_pos_emb`` (halves, Llama/GPT-NeoX) and
  ``apply_rotary_pos_emb_interleave`` (pairs, DeepSeek); the interleaved layout also gives the
  same attention scores as rotating the pairs in place (RoFormer eq. 34);
- scores depend only on the distance between positions (RoFormer's defining property);
- in the model, local layers use ``rope_local_theta`` and ``nope_layers`` get no rotation.
"""

import math

import pytest
import torch

from evolm import ModelConfig, Transformer
from evolm.nn.rope import RotaryEmbedding, apply_rope, rope_frequencies, yarn_softmax_scale

HEAD_DIM = 16


def _hf_llama_config(rope_parameters, head_dim=HEAD_DIM, max_pos=None):
    from transformers import LlamaConfig

    orig = rope_parameters.get("original_max_position_embeddings")
    factor = rope_parameters.get("factor", 1.0)
    max_pos = max_pos or (int(orig * factor) if orig else 2048)
    return LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                       max_position_embeddings=max_pos, rope_parameters=dict(rope_parameters))


def _ours_from_hf(params):
    """Our rope_scaling dict for an HF rope_parameters dict (the key names differ slightly)."""
    d = {k: v for k, v in params.items() if k not in ("rope_type", "rope_theta", "partial_rotary_factor")}
    d["type"] = params["rope_type"]
    if "original_max_position_embeddings" in d:
        d["original_max_seq_len"] = d.pop("original_max_position_embeddings")
    return d


# --- frequencies ------------------------------------------------------------------------------
def test_default_inv_freq_matches_hf_and_formula():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = _hf_llama_config({"rope_type": "default", "rope_theta": 500000.0})
    ref, ref_af = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    inv, af = rope_frequencies(HEAD_DIM, 500000.0)
    assert af == ref_af == 1.0
    torch.testing.assert_close(inv, ref, rtol=0, atol=0)
    # theta_i = base^(-2i/d), i = 0 .. d/2-1
    formula = torch.tensor([500000.0 ** (-2 * i / HEAD_DIM) for i in range(HEAD_DIM // 2)])
    torch.testing.assert_close(inv, formula, rtol=1e-6, atol=0)


def test_partial_rotary_inv_freq_matches_gpt_neox():
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

    hf = GPTNeoXConfig(hidden_size=64, num_attention_heads=4, rotary_pct=0.25, rope_theta=10000.0)
    ref, _ = GPTNeoXRotaryEmbedding.compute_default_rope_parameters(hf)
    cfg = ModelConfig(d_model=64, n_heads=4, pos_emb="rope", rotary_pct=0.25)
    assert cfg.rotary_dim == 4
    inv, _ = rope_frequencies(cfg.rotary_dim, cfg.rope_theta)
    torch.testing.assert_close(inv, ref, rtol=0, atol=0)


SCALINGS = {
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "llama3-wide": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 32.0, "low_freq_factor": 2.0,
                    "high_freq_factor": 8.0, "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 64},
    "yarn-no-truncate": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                         "original_max_position_embeddings": 128, "truncate": False},
    "yarn-betas": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0, "beta_fast": 16,
                   "beta_slow": 2, "original_max_position_embeddings": 64},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
                    "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
                    "original_max_position_embeddings": 64},
    "yarn-deepseek": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 64},
    "yarn-attn-factor": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                         "attention_factor": 1.3, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("name", list(SCALINGS))
def test_scaled_inv_freq_matches_rope_init_functions(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = SCALINGS[name]
    hf = _hf_llama_config(params)
    ref, ref_af = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, "cpu")
    inv, af = rope_frequencies(HEAD_DIM, params["rope_theta"], _ours_from_hf(params))
    torch.testing.assert_close(inv, ref, rtol=1e-6, atol=0)
    assert af == pytest.approx(ref_af, rel=1e-12)
    # our own RotaryEmbedding carries the same factor into cos/sin
    assert RotaryEmbedding(HEAD_DIM, params["rope_theta"], _ours_from_hf(params)).attention_factor == \
        pytest.approx(ref_af, rel=1e-12)


@pytest.mark.parametrize("name", ["linear", "llama3", "yarn-no-truncate"])
def test_scaled_partial_rotary_matches_hf(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(SCALINGS[name], partial_rotary_factor=0.5)
    ref, ref_af = ROPE_INIT_FUNCTIONS[params["rope_type"]](_hf_llama_config(params), "cpu")
    cfg = ModelConfig(d_model=64, n_heads=4, pos_emb="rope", rotary_pct=0.5,
                      rope_theta=params["rope_theta"], rope_scaling=_ours_from_hf(params))
    inv, af = rope_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
    torch.testing.assert_close(inv, ref, rtol=1e-6, atol=0)
    assert af == pytest.approx(ref_af)


def test_yarn_deepseek_config_and_softmax_scale():
    """DeepSeek-V3's rotary head (qk_rope_head_dim) and its extra mscale^2 on the softmax scale."""
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    params = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
              "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 64}
    hf = DeepseekV3Config(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=8, qk_nope_head_dim=16,
                          v_head_dim=16, max_position_embeddings=64 * 40, rope_parameters=dict(params))
    ref, ref_af = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    ours = _ours_from_hf(params)
    inv, af = rope_frequencies(8, 10000.0, ours)
    torch.testing.assert_close(inv, ref, rtol=1e-6, atol=0)
    assert af == pytest.approx(ref_af) == 1.0  # mscale == mscale_all_dim: cos/sin unscaled
    assert yarn_softmax_scale(ours) == pytest.approx(yarn_apply_mscale(hf.rope_parameters, 1.0))
    assert yarn_softmax_scale(ours) == pytest.approx((0.1 * math.log(40.0) + 1.0) ** 2)
    assert yarn_softmax_scale(None) == 1.0
    assert yarn_softmax_scale({"type": "llama3", "factor": 8.0, "original_max_seq_len": 64}) == 1.0


def test_rotary_embedding_cos_sin_match_hf():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = SCALINGS["yarn"]
    hf = LlamaRotaryEmbedding(_hf_llama_config(params))
    ours = RotaryEmbedding(HEAD_DIM, params["rope_theta"], _ours_from_hf(params))
    pos = torch.tensor([[0, 1, 2, 7, 100, 255], [3, 4, 5, 6, 7, 8]])
    cos_ref, sin_ref = hf(torch.zeros(1, dtype=torch.float32), pos)  # (B, T, D) = cat(freqs, freqs)
    cos, sin = ours(pos, torch.float32)  # (B, 1, T, D/2)
    h = HEAD_DIM // 2
    for a, b in ((cos, cos_ref), (sin, sin_ref)):
        torch.testing.assert_close(a[:, 0], b[..., :h], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a[:, 0], b[..., h:], rtol=1e-6, atol=1e-6)


# --- rotation -------------------------------------------------------------------------------------
def _qk_cos_sin(dim=HEAD_DIM, rot=HEAD_DIM, T=6, theta=10000.0, scaling=None):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, T, dim, generator=g)
    k = torch.randn(2, 3, T, dim, generator=g)
    pos = torch.arange(T).expand(2, T) + torch.tensor([[0], [5]])
    cos, sin = RotaryEmbedding(rot, theta, scaling)(pos, torch.float32)
    return q, k, pos, cos, sin


def _hf_format(cos):
    """(B, 1, T, d/2) -> transformers' (B, T, d) = cat(freqs, freqs)."""
    return torch.cat((cos[:, 0], cos[:, 0]), dim=-1)


def test_apply_rope_halves_matches_hf_llama():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, _, cos, sin = _qk_cos_sin(scaling={"type": "llama3", "factor": 8.0, "original_max_seq_len": 4})
    q_ref, k_ref = apply_rotary_pos_emb(q, k, _hf_format(cos), _hf_format(sin))
    torch.testing.assert_close(apply_rope(q, cos, sin), q_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_ref, rtol=0, atol=1e-6)


def test_partial_rotary_matches_gpt_neox_and_keeps_tail():
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    q, k, _, cos, sin = _qk_cos_sin(dim=HEAD_DIM, rot=4)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, _hf_format(cos), _hf_format(sin))
    out = apply_rope(q, cos, sin)
    torch.testing.assert_close(out, q_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_ref, rtol=0, atol=1e-6)
    assert torch.equal(out[..., 4:], q[..., 4:]), "the un-rotated tail must pass through bit for bit"
    assert not torch.allclose(out[..., :4], q[..., :4])


def _rotate_pairs_in_place(x, cos, sin):
    """RoFormer eq. 34: (x_2i, x_2i+1) rotated by angle m * theta_i, kept in place."""
    out = x.clone()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x1 * cos + x0 * sin
    return out


def test_apply_rope_interleaved_matches_deepseek_and_pair_rotation():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    q, k, _, cos, sin = _qk_cos_sin()
    q_ref, k_ref = apply_rotary_pos_emb_interleave(q, k, _hf_format(cos), _hf_format(sin))
    qi, ki = apply_rope(q, cos, sin, interleave=True), apply_rope(k, cos, sin, interleave=True)
    torch.testing.assert_close(qi, q_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ki, k_ref, rtol=0, atol=1e-6)
    # in-place pair rotation, then the same de-interleaving permutation on q and k: equal scores
    qp, kp = _rotate_pairs_in_place(q, cos, sin), _rotate_pairs_in_place(k, cos, sin)
    perm = torch.cat((torch.arange(0, HEAD_DIM, 2), torch.arange(1, HEAD_DIM, 2)))
    torch.testing.assert_close(qi, qp[..., perm], rtol=0, atol=1e-6)
    torch.testing.assert_close(qi @ ki.transpose(-1, -2), qp @ kp.transpose(-1, -2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("scaling", [None, {"type": "yarn", "factor": 4.0, "original_max_seq_len": 16}])
def test_scores_depend_only_on_relative_position(interleave, scaling):
    emb = RotaryEmbedding(HEAD_DIM, 10000.0, scaling, interleave)
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 1, 1, HEAD_DIM, generator=g), torch.randn(1, 1, 1, HEAD_DIM, generator=g)

    def score(m, n):
        cm, sm = emb(torch.tensor([[m]]), torch.float32)
        cn, sn = emb(torch.tensor([[n]]), torch.float32)
        return (apply_rope(q, cm, sm, interleave) * apply_rope(k, cn, sn, interleave)).sum()

    for dist in (0, 1, 3, 11):
        base = score(dist, 0)
        for shift in (1, 7, 40):
            torch.testing.assert_close(score(shift + dist, shift), base, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(3, 0), score(0, 0), atol=1e-3)
    # a rotation: norms are kept up to the YaRN cos/sin scale
    c, s = emb(torch.tensor([[9]]), torch.float32)
    torch.testing.assert_close(apply_rope(q, c, s, interleave).norm(), q.norm() * emb.attention_factor)


# --- in the model: local base, scaling per layer kind, NoPE ------------------------------------
def _capture_rope(model, ids):
    seen = {}
    for i, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[1]))
    model(ids)
    return seen


def test_model_local_theta_and_nope_layers():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=6, n_heads=2, pos_emb="rope", rope_theta=1e6,
                      rope_local_theta=1e4, sliding_window=4, sliding_window_pattern=3, nope_layers=(5,),
                      rope_scaling={"type": "linear", "factor": 2.0}, norm="rmsnorm", max_seq_len=32)
    model = Transformer(cfg).eval()
    torch.testing.assert_close(model.rotary.inv_freq, rope_frequencies(16, 1e6)[0] / 2.0)
    torch.testing.assert_close(model.rotary_local.inv_freq, rope_frequencies(16, 1e4)[0])  # unscaled
    T = 8
    seen = _capture_rope(model, torch.randint(0, 64, (1, T)))
    pos = torch.arange(T)[None].float()
    for i in range(6):
        if i == 5:
            assert seen[i] is None, "NoPE layer got a rotation"
            continue
        theta, factor = (1e4, 1.0) if cfg.layer_is_local(i) else (1e6, 2.0)
        inv = 1.0 / theta ** (torch.arange(0, 16, 2).float() / 16) / factor
        cos, sin = seen[i]
        torch.testing.assert_close(cos[:, 0], (pos[..., None] * inv).cos(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sin[:, 0], (pos[..., None] * inv).sin(), rtol=1e-5, atol=1e-5)
    assert [cfg.layer_is_local(i) for i in range(6)] == [True, True, False, True, True, False]


def test_model_without_local_theta_shares_one_table():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, pos_emb="rope",
                      sliding_window=4, sliding_window_pattern=2, max_seq_len=32)
    model = Transformer(cfg).eval()
    assert model.rotary_local is None
    seen = _capture_rope(model, torch.randint(0, 64, (1, 5)))
    assert torch.equal(seen[0][0], seen[1][0])


def test_frequencies_stay_float32_in_a_bf16_model():
    """bf16 inv_freq (8-bit mantissa) would put position 4000 hundreds of radians off."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, pos_emb="rope", rope_theta=5e5,
                      rope_local_theta=1e4, sliding_window=8, max_seq_len=8192)
    model = Transformer(cfg).to(torch.bfloat16)
    for emb, theta in ((model.rotary, 5e5), (model.rotary_local, 1e4)):
        assert emb.inv_freq.dtype == torch.float32
        torch.testing.assert_close(emb.inv_freq, rope_frequencies(16, theta)[0], rtol=0, atol=0)
    cos, _ = model.rotary(torch.tensor([[4000]]), torch.bfloat16)
    ref = (4000 * rope_frequencies(16, 5e5)[0].double()).cos()
    torch.testing.assert_close(cos[0, 0, 0].double(), ref, rtol=0, atol=8e-3)  # bf16 output rounding only
