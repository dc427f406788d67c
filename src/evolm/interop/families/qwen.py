"""Qwen2 (Yang et al. 2024, arXiv:2407.10671), Qwen3 and Qwen3-MoE (arXiv:2505.09388).

- Qwen2: Llama with q/k/v biases (no o_proj bias); an optional sliding window, switched on by
  ``use_sliding_window``, on the layers from ``max_window_layers`` up (or as ``layer_types`` says).
- Qwen3: Qwen2 without biases and with per-head RMSNorm on queries and keys.
- Qwen3-MoE: Qwen3 whose MLPs are softmax-routed experts (optionally after some dense layers) and
  whose window, if on, covers every layer.
"""

from __future__ import annotations

from typing import Any

from evolm.config import ModelConfig
from evolm.interop.families.base import Family
from evolm.interop.families.decoder import err, gguf_moe_fields, layer_types
from evolm.interop.families.llama import LLAMA_LIKE, routed_experts_blockers

_QWEN = dict(LLAMA_LIKE, hidden_act="silu", vocab_size=151936, use_sliding_window=False, sliding_window=4096)


def windowed_from_max_window_layers(h: dict, n_layers: int) -> list[bool]:
    return [i >= h["max_window_layers"] for i in range(n_layers)]


def qwen_window_to_hf(c: ModelConfig, out: dict) -> None:
    window = c.sliding_window
    out.update(use_sliding_window=window is not None, sliding_window=window, layer_types=layer_types(c),
               max_window_layers=0 if window is not None and c.sliding_window_pattern == 1 else c.n_layers)


def moe_from_hf(h: dict, kw: dict) -> None:
    kw.update(n_experts=h["num_experts"], n_experts_per_tok=h["num_experts_per_tok"], router="softmax")
    only = sorted(h.get("mlp_only_layers") or [])
    if h["decoder_sparse_step"] != 1 or only != list(range(len(only))):
        raise err(f"qwen3_moe with decoder_sparse_step={h['decoder_sparse_step']} and "
                  f"mlp_only_layers={only}: evolm's dense layers must be the first k (first_k_dense)")
    kw.update(moe_d_ff=h["moe_intermediate_size"], norm_topk_prob=bool(h["norm_topk_prob"]), first_k_dense=len(only))
    if h.get("output_router_logits"):
        kw["moe_aux_loss_coef"] = float(h.get("router_aux_loss_coef") or 0.0)


def moe_to_hf(c: ModelConfig, out: dict) -> None:
    out.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
               num_experts=c.n_experts, num_experts_per_tok=c.n_experts_per_tok,
               moe_intermediate_size=c.moe_d_ff, norm_topk_prob=c.norm_topk_prob, decoder_sparse_step=1,
               mlp_only_layers=list(range(c.first_k_dense)), output_router_logits=c.moe_aux_loss_coef > 0,
               router_aux_loss_coef=c.moe_aux_loss_coef)


def moe_gguf_from_metadata(get, meta: dict, names: set, c: dict[str, Any]) -> None:
    c.update(gguf_moe_fields(get), norm_topk_prob=True)


_WINDOWS = dict(window="per_layer", window_switch="use_sliding_window",
                local_layers=windowed_from_max_window_layers, to_hf=qwen_window_to_hf)

QWEN2 = Family(
    model_type="qwen2", architecture="Qwen2ForCausalLM",
    defaults=dict(_QWEN, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=32768, max_window_layers=28, layer_types=None),
    attention_bias="qkv", **_WINDOWS,
    gguf_archs=("qwen2",),
)

QWEN3 = Family(
    model_type="qwen3", architecture="Qwen3ForCausalLM",
    defaults=dict(_QWEN, attention_bias=False, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=32768,
                  max_window_layers=28, layer_types=None),
    qk_norm="head", **_WINDOWS,
    gguf_archs=("qwen3",),
)

QWEN3_MOE = Family(
    model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM",
    defaults=dict(_QWEN, attention_bias=False, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=32768,
                  decoder_sparse_step=1, moe_intermediate_size=768, num_experts_per_tok=8, num_experts=128,
                  norm_topk_prob=False, mlp_only_layers=[]),
    aliases={"num_local_experts": "num_experts"},
    qk_norm="head", window="every_layer", window_switch="use_sliding_window", experts=True,
    from_hf=moe_from_hf, to_hf=moe_to_hf, blockers=routed_experts_blockers,
    gguf_archs=("qwen3moe",), gguf_from_metadata=moe_gguf_from_metadata,
)
