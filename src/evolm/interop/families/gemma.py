"""Gemma (Gemma Team 2024, arXiv:2403.08295), Gemma 2 (arXiv:2408.00118), Gemma 3 (arXiv:2503.19786).

All three scale RMSNorm by ``1 + w`` and the embeddings by sqrt(d_model). Gemma 2 adds sandwich
norms (a norm before *and* after attention and MLP), a query scale of its own, tanh soft-capping
of attention and output logits, and local/global layers alternating 1:1. Gemma 3 drops the
attention soft-cap, adds per-head Q/K norms, makes the pattern 5 local : 1 global and gives local
layers their own RoPE base (per layer type). Its multimodal config (``gemma3``) nests the text
model's config under ``text_config``.
"""

from __future__ import annotations

from typing import Any

from evolm.config import ModelConfig
from evolm.interop.families.base import Family
from evolm.interop.families.decoder import err, layer_types, text_config
from evolm.interop.families.llama import LLAMA_LIKE

_GEMMA2_LIKE = dict(LLAMA_LIKE, hidden_activation="gelu_pytorch_tanh", attention_bias=False, hidden_size=2304,
                    intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                    head_dim=256, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                    layer_types=None)


def sandwich_from_hf(h: dict, kw: dict) -> None:
    kw.update(query_pre_attn_scalar=h["query_pre_attn_scalar"], final_softcap=h["final_logit_softcapping"])


def gemma2_from_hf(h: dict, kw: dict) -> None:
    sandwich_from_hf(h, kw)
    kw["attn_softcap"] = h["attn_logit_softcapping"]  # Gemma 3 keeps the key but transformers never applies it


def gemma3_from_hf(h: dict, kw: dict) -> None:
    if h.get("use_bidirectional_attention"):
        raise err("use_bidirectional_attention=true (an encoder) is not a causal LM")
    sandwich_from_hf(h, kw)


def gemma2_to_hf(c: ModelConfig, out: dict) -> None:
    # no window: every layer global (sliding_window must still be an integer there)
    out.update(query_pre_attn_scalar=c.query_pre_attn_scalar or c.head_dim, final_logit_softcapping=c.final_softcap,
               attn_logit_softcapping=c.attn_softcap, sliding_window=c.sliding_window or c.max_seq_len,
               layer_types=layer_types(c))


def gemma3_to_hf(c: ModelConfig, out: dict) -> None:
    gemma2_to_hf(c, out)
    if c.sliding_window is not None:
        out["sliding_window_pattern"] = c.sliding_window_pattern


def unwrap_multimodal(h: dict) -> dict:
    """Gemma 3's multimodal config.json -> its language model's config (the nested text_config)."""
    return text_config(h, "gemma3_text", tie_default=True)


def _gguf_sandwich(get, c: dict[str, Any], big_layers: int) -> None:
    n_layers, n_heads = c["n_layers"], c["n_heads"]
    head_dim = c.get("head_dim") or c["d_model"] // n_heads
    # llama.cpp scales queries by 1/sqrt(head_dim), except the 27B models: 1/sqrt(d_model / n_heads)
    big = n_layers == big_layers
    c.update(activation="gelu_tanh", norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
             query_pre_attn_scalar=float(c["d_model"] // n_heads if big else head_dim))


def gemma2_gguf(get, meta: dict, names: set, c: dict[str, Any]) -> None:
    _gguf_sandwich(get, c, big_layers=46)
    c.update(attn_softcap=get("attn_logit_softcapping", 50.0) or None,
             final_softcap=get("final_logit_softcapping", 30.0) or None,
             sliding_window=get("attention.sliding_window", None) or 4096, sliding_window_pattern=2)


def gemma3_gguf(get, meta: dict, names: set, c: dict[str, Any]) -> None:
    _gguf_sandwich(get, c, big_layers=62)
    pattern = meta.get("gemma3.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # per-layer flags (True = local): the first global layer sets the period
        pattern = pattern.index(False) + 1 if False in pattern else 1
    c.update(sliding_window=get("attention.sliding_window", None) or 512, sliding_window_pattern=int(pattern),
             rope_local_theta=10000.0)  # llama.cpp hard-codes Gemma 3's local base


GEMMA = Family(
    model_type="gemma", architecture="GemmaForCausalLM",
    defaults=dict(LLAMA_LIKE, hidden_act="gelu_pytorch_tanh", attention_bias=False, vocab_size=256000,
                  hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=16, head_dim=256, max_position_embeddings=8192, tie_word_embeddings=True),
    unit_offset_norms=True,
    activation_aliases={"gelu": "gelu_pytorch_tanh"},  # Gemma 1 configs say "gelu" but mean the tanh approximation
)

GEMMA2 = Family(
    model_type="gemma2", architecture="Gemma2ForCausalLM",
    defaults=dict(_GEMMA2_LIKE, vocab_size=256000, max_position_embeddings=8192,
                  final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    unit_offset_norms=True, norm_placement="sandwich", activation_key="hidden_activation",
    query_scalar=True, attn_softcap=True,
    window="per_layer", local_layers=lambda h, n: [(i + 1) % 2 != 0 for i in range(n)],
    from_hf=gemma2_from_hf, to_hf=gemma2_to_hf,
    gguf_archs=("gemma2",), gguf_from_metadata=gemma2_gguf,
)

GEMMA3_TEXT = Family(
    model_type="gemma3_text", architecture="Gemma3ForCausalLM",
    defaults=dict(_GEMMA2_LIKE, vocab_size=262208, max_position_embeddings=131072,
                  final_logit_softcapping=None, attn_logit_softcapping=None, rope_theta=1e6,
                  rope_local_base_freq=10000.0, sliding_window_pattern=6),
    wrappers=("gemma3",), unwrap=unwrap_multimodal,
    unit_offset_norms=True, norm_placement="sandwich", qk_norm="head", activation_key="hidden_activation",
    query_scalar=True, local_rope_theta=10000.0,
    window="per_layer",
    local_layers=lambda h, n: [(i + 1) % int(h.get("sliding_window_pattern") or 6) != 0 for i in range(n)],
    from_hf=gemma3_from_hf, to_hf=gemma3_to_hf,
    gguf_archs=("gemma3",), gguf_from_metadata=gemma3_gguf,
)
