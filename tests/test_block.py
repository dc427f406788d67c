"""Residual wiring and norm placement (evolm/nn/block.py): each placement against its equation.

With A = attention, M = MLP, N* = norms (all with random, non-identity weights):
  post      (GPT-1/BERT)          h = N1(x + A(x));        y = N2(h + M(h))
  pre       (GPT-2/Llama)         h = x + A(N1(x));        y = h + M(N2(h))
  sandwich  (Gemma 2/3)           h = x + No1(A(N1(x)));   y = h + No2(M(N2(h)))
  olmo2     (OLMo 2)              h = x + No1(A(x));       y = h + No2(M(h))
  parallel  (GPT-J/PaLM/Falcon-7B) y = x + A(N1(x)) + M(N1(x))
  parallel2 (Falcon-40B/180B)     y = x + A(N1(x)) + M(N2(x))
A and M are the block's own sub-modules (tested against references in their own files); the
equations check the wiring. Three placements are also checked against transformers' decoder
layers (Llama, OLMo 2, Gemma 2) with the same weights.
"""

import pytest
import torch

from evolm import ModelConfig
from evolm.nn.block import Block
from evolm.nn.rope import RotaryEmbedding

D, T = 32, 6

EQUATIONS = {
    "post": lambda b, x, A, M: (lambda h: b.mlp_norm(h + M(h)))(b.attn_norm(x + A(x))),
    "pre": lambda b, x, A, M: (lambda h: h + M(b.mlp_norm(h)))(x + A(b.attn_norm(x))),
    "sandwich": lambda b, x, A, M: (lambda h: h + b.mlp_out_norm(M(b.mlp_norm(h))))(
        x + b.attn_out_norm(A(b.attn_norm(x)))),
    "olmo2": lambda b, x, A, M: (lambda h: h + b.mlp_out_norm(M(h)))(x + b.attn_out_norm(A(x))),
    "parallel": lambda b, x, A, M: x + A(b.attn_norm(x)) + M(b.attn_norm(x)),
    "parallel2": lambda b, x, A, M: x + A(b.attn_norm(x)) + M(b.mlp_norm(x)),
}
NORMS = {
    "post": {"attn_norm", "mlp_norm"},
    "pre": {"attn_norm", "mlp_norm"},
    "sandwich": {"attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm"},
    "olmo2": {"attn_out_norm", "mlp_out_norm"},
    "parallel": {"attn_norm"},
    "parallel2": {"attn_norm", "mlp_norm"},
}


def _cfg(**kw):
    base = dict(vocab_size=50, d_model=D, n_layers=1, n_heads=4, n_kv_heads=2, pos_emb="rope", norm="rmsnorm",
                mlp="glu", activation="silu", mlp_bias=False, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def _randomize(block, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and "norm" in name and not name.endswith("bias"):
                unit = getattr(block.get_submodule(name.rsplit(".", 1)[0]), "unit_offset", False)
                p.copy_(noise * 0.3 + (0.0 if unit else 1.0))
            else:
                p.copy_(noise * 0.2)
    return block


def _inputs(cfg):
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(T).expand(2, T)
    rope = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta)(pos, x.dtype)
    return x, pos, rope


@pytest.mark.parametrize("placement", list(EQUATIONS))
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_block_matches_its_equation(placement, norm):
    cfg = _cfg(norm_placement=placement, norm=norm)
    block = _randomize(Block(cfg, 0)).eval()
    have = {n for n in ("attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm") if hasattr(block, n)}
    assert have == NORMS[placement]
    x, _, rope = _inputs(cfg)

    def A(h):
        return block.self_attn(h, rope, None, True)

    with torch.no_grad():
        torch.testing.assert_close(block(x, rope, None, True), EQUATIONS[placement](block, x, A, block.mlp),
                                   rtol=1e-6, atol=1e-6)


def test_placements_differ():
    x, _, rope = _inputs(_cfg())
    outs = []
    for p in EQUATIONS:
        block = _randomize(Block(_cfg(norm_placement=p), 0)).eval()
        with torch.no_grad():
            outs.append(block(x, rope, None, True))
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.allclose(outs[i], outs[j], atol=1e-3)


def test_post_norm_output_is_normalized():
    """Post-norm: the residual stream itself is normalized after every sub-layer."""
    cfg = _cfg(norm_placement="post", norm="layernorm")
    block = Block(cfg, 0).eval()  # fresh LayerNorm: weight 1, bias 0
    x, _, rope = _inputs(cfg)
    with torch.no_grad():
        y = block(x * 50, rope, None, True)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, T), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2, T), atol=1e-3, rtol=0)


def test_residual_dropout_only_in_training():
    cfg = _cfg(resid_dropout=0.5)
    block = _randomize(Block(cfg, 0))
    x, _, rope = _inputs(cfg)
    with torch.no_grad():
        ref = EQUATIONS["pre"](block, x, lambda h: block.self_attn(h, rope, None, True), block.mlp)
        torch.testing.assert_close(block.eval()(x, rope, None, True), ref)
        assert not torch.allclose(block.train()(x, rope, None, True), ref)


# --- against transformers' decoder layers ---------------------------------------------------------
def _causal(T):
    return torch.full((T, T), float("-inf")).triu(1)[None, None]


def _hf_cos_sin(rope):
    cos, sin = rope
    return torch.cat((cos[:, 0], cos[:, 0]), -1), torch.cat((sin[:, 0], sin[:, 0]), -1)


def _compare(block, hf_layer, rename, cfg):
    sd = {}
    for k, v in block.state_dict().items():
        for a, b in rename.items():
            k = k.replace(a, b)
        sd[k] = v
    hf_layer.load_state_dict(sd, strict=True)
    x, pos, rope = _inputs(cfg)
    with torch.no_grad():
        ref = hf_layer(x, attention_mask=_causal(T), position_ids=pos, position_embeddings=_hf_cos_sin(rope))
        ref = ref[0] if isinstance(ref, tuple) else ref
        torch.testing.assert_close(block(x, rope, None, True), ref, rtol=1e-5, atol=1e-5)


def test_pre_norm_matches_llama_decoder_layer():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = _cfg(norm_placement="pre", norm_eps=1e-6)
    hf = LlamaConfig(hidden_size=D, intermediate_size=cfg.d_ff, num_attention_heads=4, num_key_value_heads=2,
                     rms_norm_eps=1e-6, hidden_act="silu")
    hf._attn_implementation = "eager"
    block = _randomize(Block(cfg, 0)).eval()
    _compare(block, LlamaDecoderLayer(hf, 0).eval(),
             {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}, cfg)


def test_olmo2_placement_matches_olmo2_decoder_layer():
    from transformers import Olmo2Config
    from transformers.models.olmo2.modeling_olmo2 import Olmo2DecoderLayer

    cfg = _cfg(norm_placement="olmo2", qk_norm="full", norm_eps=1e-6)
    hf = Olmo2Config(hidden_size=D, intermediate_size=cfg.d_ff, num_attention_heads=4, num_key_value_heads=2,
                     rms_norm_eps=1e-6, hidden_act="silu")
    hf._attn_implementation = "eager"
    block = _randomize(Block(cfg, 0)).eval()
    _compare(block, Olmo2DecoderLayer(hf, 0).eval(),
             {"attn_out_norm": "post_attention_layernorm", "mlp_out_norm": "post_feedforward_layernorm"}, cfg)


def test_sandwich_matches_gemma2_decoder_layer():
    from transformers import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer

    cfg = _cfg(norm_placement="sandwich", norm_unit_offset=True, norm_eps=1e-6, activation="gelu_tanh",
               head_dim=16, attn_softcap=20.0, query_pre_attn_scalar=24.0)
    hf = Gemma2Config(hidden_size=D, intermediate_size=cfg.d_ff, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                      attn_logit_softcapping=20.0, query_pre_attn_scalar=24, layer_types=["full_attention"],
                      num_hidden_layers=1)
    hf._attn_implementation = "eager"
    block = _randomize(Block(cfg, 0)).eval()
    _compare(block, Gemma2DecoderLayer(hf, 0).eval(),
             {"attn_norm": "input_layernorm", "attn_out_norm": "post_attention_layernorm",
              "mlp_norm": "pre_feedforward_layernorm", "mlp_out_norm": "post_feedforward_layernorm"}, cfg)


def test_every_attention_choice_has_a_mixer_and_every_layer_gets_its_parts():
    """config.attention picks the mixer from one registry; layer_is_moe picks the channel part."""
    from evolm.config import ATTENTIONS
    from evolm.nn.block import MIXERS, make_channel, make_mixer
    from evolm.nn.mla import MultiHeadLatentAttention
    from evolm.nn.moe import MoE

    assert set(MIXERS) == set(ATTENTIONS)
    c = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, attention="mla", kv_lora_rank=16,
                    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, pos_emb="rope", n_experts=4,
                    n_experts_per_tok=2, first_k_dense=1)
    assert isinstance(make_mixer(c, 0), MultiHeadLatentAttention)
    assert not isinstance(make_channel(c, 0), MoE) and isinstance(make_channel(c, 1), MoE)
