"""GPT-1 (Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training").

transformers' ``openai-gpt``: the GPT-2 weight layout (Conv1D modules stored (in, out), q|k|v
fused in ``c_attn``) under other top-level names (``tokens_embed``, ``positions_embed``), but the
original Transformer's post-norm block (``x = ln(x + f(x))``) and no final norm. Its ``afn="gelu"``
is the tanh approximation (transformers maps it to ``gelu_new``, as the released TensorFlow code
computed it), not the exact erf GELU.
"""

from __future__ import annotations

from evolm.config import ModelConfig
from evolm.interop.families.base import Family, Needs
from evolm.interop.families.decoder import err
from evolm.interop.families.gpt2 import layer_from_hf, weights_to_hf

TOP = {"tokens_embed.weight": "embed_tokens.weight", "positions_embed.weight": "pos_embed.weight"}
AFN = {"gelu": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}  # transformers' ACT_FNS


def config_from_hf(fam: Family, h: dict, meta: dict) -> ModelConfig:
    if h["afn"] not in AFN:
        raise err(f"afn {h['afn']!r} is not one of {sorted(AFN)}")
    d = h["n_embd"]
    return ModelConfig(
        name="hf-openai-gpt", vocab_size=h["vocab_size"], d_model=d, n_layers=h["n_layer"], n_heads=h["n_head"],
        d_ff=4 * d, max_seq_len=h["n_positions"], norm="layernorm", norm_eps=float(h["layer_norm_epsilon"]),
        norm_bias=True, norm_placement="post", final_norm=False, pos_emb="learned", qkv_bias=True, o_bias=True,
        mlp="mlp", mlp_bias=True, activation=AFN[h["afn"]], tie_embeddings=bool(h["tie_word_embeddings"]),
        attn_dropout=float(h["attn_pdrop"]), resid_dropout=float(h["resid_pdrop"]),
        embd_dropout=float(h["embd_pdrop"]), init_std=float(h["initializer_range"]), meta=meta)


def config_to_hf(fam: Family, c: ModelConfig, out: dict) -> None:
    out.update(vocab_size=c.vocab_size, n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads,
               n_positions=c.max_seq_len, layer_norm_epsilon=c.norm_eps,
               afn={"gelu_tanh": "gelu", "relu": "relu", "silu": "silu"}[c.activation],
               resid_pdrop=c.resid_dropout, embd_pdrop=c.embd_dropout, attn_pdrop=c.attn_dropout)


def blockers(fam: Family, c: ModelConfig, need: Needs) -> None:
    need(c.attention == "mha" and c.n_kv_heads == c.n_heads, "n_kv_heads", "n_heads (multi-head attention)")
    need(c.head_dim * c.n_heads == c.d_model, "head_dim", "d_model // n_heads")
    need(c.d_ff == 4 * c.d_model, "d_ff", "4 * d_model (openai-gpt has no n_inner)")
    need(c.norm == "layernorm" and c.norm_bias, "norm", "'layernorm' with norm_bias=True")
    need(c.norm_placement == "post", "norm_placement", "'post'")
    need(c.pos_emb == "learned", "pos_emb", "'learned'")
    need(c.mlp == "mlp", "mlp", "'mlp'")
    need(c.activation in ("gelu_tanh", "relu", "silu"), "activation", "'gelu_tanh', 'relu' or 'silu'")
    need(c.qkv_bias and c.o_bias and c.mlp_bias, "qkv_bias", "qkv_bias, o_bias and mlp_bias all True")
    need(c.query_pre_attn_scalar in (None, c.head_dim), "query_pre_attn_scalar", "None")
    need(c.tie_embeddings, "tie_embeddings", "True (the head is the token embedding)")
    need(c.qk_norm is None, "qk_norm", "None")
    need(c.sliding_window is None, "sliding_window", "None")
    need(c.attn_softcap is None and c.final_softcap is None, "attn_softcap", "no soft-capping")
    need(not c.embed_scale, "embed_scale", "False")
    need(c.n_experts == 0, "n_experts", "0")


OPENAI_GPT = Family(
    model_type="openai-gpt", architecture="OpenAIGPTLMHeadModel",
    defaults=dict(vocab_size=40478, n_positions=512, n_embd=768, n_layer=12, n_head=12, afn="gelu",
                  resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5,
                  initializer_range=0.02, tie_word_embeddings=True),
    aliases={"hidden_size": "n_embd", "max_position_embeddings": "n_positions", "num_attention_heads": "n_head",
             "num_hidden_layers": "n_layer"},
    norm_placement="post", final_norm=False,
    read_config=config_from_hf, write_config=config_to_hf, check=blockers,
    weight_anchor="tokens_embed.weight", top_weights=TOP, layer_tag="h.", layer_from_hf=layer_from_hf,
    weights_to_hf=weights_to_hf,
)
