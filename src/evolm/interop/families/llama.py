"""Llama (Touvron et al. 2023) and the families that are Llama with one thing added.

- Mistral (Jiang et al. 2023, arXiv:2310.06825): Llama with one sliding window on every layer and
  no attention-bias key.
- Mixtral (Jiang et al. 2024, arXiv:2401.04088): Mistral whose MLPs are softmax-routed experts,
  stored per expert as ``block_sparse_moe.experts.{e}.w1/w3/w2``.

GGUF: llama.cpp writes all three as architecture ``llama`` (or ``mistral``), experts included,
with Q/K rows permuted for its interleaved RoPE.
"""

from __future__ import annotations

from typing import Any

from evolm.config import ModelConfig
from evolm.interop.families.base import Family, Needs
from evolm.interop.families.decoder import gguf_moe_fields, has_moe

# transformers 5.23's LlamaConfig defaults most decoder families start from
LLAMA_LIKE = dict(num_key_value_heads=None, head_dim=None, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attention_dropout=0.0, rope_theta=10000.0)


def gguf_from_metadata(get, meta: dict, names: set, c: dict[str, Any]) -> None:
    window = get("attention.sliding_window", None)
    if window:
        c.update(sliding_window=window, sliding_window_pattern=1)
    c.update(gguf_moe_fields(get))


def mixtral_from_hf(h: dict, kw: dict) -> None:
    kw.update(n_experts=h["num_local_experts"], n_experts_per_tok=h["num_experts_per_tok"], router="softmax",
              moe_d_ff=h["intermediate_size"], norm_topk_prob=True)
    if h.get("output_router_logits"):
        kw["moe_aux_loss_coef"] = float(h.get("router_aux_loss_coef") or 0.0)


def mixtral_to_hf(c: ModelConfig, out: dict) -> None:
    out.update(sliding_window=c.sliding_window, num_local_experts=c.n_experts,
               num_experts_per_tok=c.n_experts_per_tok, intermediate_size=c.moe_d_ff,
               output_router_logits=c.moe_aux_loss_coef > 0, router_aux_loss_coef=c.moe_aux_loss_coef)


def routed_experts_blockers(c: ModelConfig, need: Needs) -> None:
    """Plain softmax-routed experts (Mixtral, Qwen3-MoE): no shared experts, groups or bias."""
    need(has_moe(c), "n_experts", "> 0")
    need(c.router == "softmax", "router", "'softmax'")
    need(c.n_shared_experts == 0, "n_shared_experts", "0")
    need(not c.router_bias, "router_bias", "False")
    need(c.n_expert_groups == 1, "n_expert_groups", "1")
    need(c.routed_scaling_factor == 1.0, "routed_scaling_factor", "1.0")


def mixtral_blockers(c: ModelConfig, need: Needs) -> None:
    routed_experts_blockers(c, need)
    need(c.norm_topk_prob, "norm_topk_prob", "True")
    need(c.first_k_dense == 0, "first_k_dense", "0")


LLAMA = Family(
    model_type="llama", architecture="LlamaForCausalLM",
    defaults=dict(LLAMA_LIKE, hidden_act="silu", attention_bias=False, mlp_bias=False, vocab_size=32000,
                  hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  max_position_embeddings=2048),
    mlp_bias_key=True,
    gguf_archs=("llama",), gguf_from_metadata=gguf_from_metadata, gguf_permute_qk=True,
)

MISTRAL = Family(
    model_type="mistral", architecture="MistralForCausalLM",
    defaults=dict(LLAMA_LIKE, hidden_act="silu", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  max_position_embeddings=131072, sliding_window=4096),
    attention_bias="none", window="every_layer",
    to_hf=lambda c, out: out.update(sliding_window=c.sliding_window),
    gguf_archs=("mistral",), gguf_from_metadata=gguf_from_metadata, gguf_permute_qk=True,
)

MIXTRAL = Family(
    model_type="mixtral", architecture="MixtralForCausalLM",
    defaults=dict(LLAMA_LIKE, hidden_act="silu", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  max_position_embeddings=131072, rms_norm_eps=1e-5, sliding_window=None,
                  num_experts_per_tok=2, num_local_experts=8, rope_theta=1e6),
    aliases={"num_experts": "num_local_experts"},
    attention_bias="none", window="every_layer", experts=True,
    expert_names=("block_sparse_moe", "w1", "w3", "w2"),
    from_hf=mixtral_from_hf, to_hf=mixtral_to_hf, blockers=mixtral_blockers,
)
