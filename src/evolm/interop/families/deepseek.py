"""DeepSeek-V2 (arXiv:2405.04434) and DeepSeek-V3 (arXiv:2412.19437).

Both use multi-head latent attention (queries and keys/values through low-rank latents, a
decoupled rotary part) and DeepSeekMoE (shared experts beside routed ones, the first k layers
dense). V2 routes by softmax and never renormalises the top-k weights; V3 routes by sigmoid with
a per-expert selection bias and group-limited top-k. llama.cpp writes both as ``deepseek2``.
"""

from __future__ import annotations

from typing import Any

import torch

from evolm.config import ModelConfig
from evolm.interop.families.base import Family, Needs
from evolm.interop.families.decoder import err, has_moe
from evolm.interop.families.llama import LLAMA_LIKE


def _mla_from_hf(h: dict, kw: dict, interleave: bool) -> bool:
    """The attention fields and the shared MoE fields; False when every layer is dense."""
    n_layers, d, nh = h["num_hidden_layers"], h["hidden_size"], h["num_attention_heads"]
    kw.update(attention="mla", q_lora_rank=h.get("q_lora_rank"), kv_lora_rank=h["kv_lora_rank"],
              qk_nope_head_dim=h["qk_nope_head_dim"], qk_rope_head_dim=h["qk_rope_head_dim"],
              v_head_dim=h["v_head_dim"], n_kv_heads=h["num_attention_heads"],
              # head_dim is unused by MLA: keep the d_model // n_heads default the presets have
              head_dim=d // nh if d % nh == 0 else h["qk_nope_head_dim"] + h["qk_rope_head_dim"],
              rope_interleave=interleave)
    k_dense = min(int(h.get("first_k_dense_replace") or 0), n_layers)
    E = h.get("n_routed_experts") or 0
    if k_dense >= n_layers or E == 0:
        return False
    kw.update(n_experts=E, n_experts_per_tok=h["num_experts_per_tok"], moe_d_ff=h["moe_intermediate_size"],
              n_shared_experts=h.get("n_shared_experts") or 0, first_k_dense=k_dense,
              routed_scaling_factor=float(h["routed_scaling_factor"]))
    return True


def v2_from_hf(h: dict, kw: dict) -> None:
    # V2 rotates interleaved pairs as complex numbers
    if not _mla_from_hf(h, kw, interleave=True):
        return
    method = h.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise err(f"deepseek_v2 topk_method {method!r} is not supported; expected greedy or group_limited_greedy")
    groups = method == "group_limited_greedy"
    # transformers' DeepSeek-V2 router never renormalises the top-k weights
    kw.update(router="softmax", norm_topk_prob=False, n_expert_groups=h["n_group"] if groups else 1,
              topk_groups=h["topk_group"] if groups else 1)


def v3_from_hf(h: dict, kw: dict) -> None:
    kw["mtp_depth"] = int(h.get("num_nextn_predict_layers") or 0)  # stored as layers n_layers.. (hf.mtp_from_hf)
    if _mla_from_hf(h, kw, interleave=bool(h.get("rope_interleave", True))):
        kw.update(router="sigmoid", router_bias=True, norm_topk_prob=bool(h["norm_topk_prob"]),
                  n_expert_groups=h.get("n_group") or 1, topk_groups=h.get("topk_group") or 1)


def _mla_to_hf(c: ModelConfig, out: dict) -> None:
    moe = has_moe(c)
    out.update(q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
               qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, num_key_value_heads=c.n_heads,
               first_k_dense_replace=c.first_k_dense if moe else c.n_layers,
               n_routed_experts=c.n_experts if moe else 1, num_experts_per_tok=c.n_experts_per_tok if moe else 1,
               moe_intermediate_size=c.moe_d_ff, n_shared_experts=c.n_shared_experts if moe else 1,
               routed_scaling_factor=c.routed_scaling_factor, n_group=c.n_expert_groups if moe else 1,
               topk_group=c.topk_groups if moe else 1, norm_topk_prob=c.norm_topk_prob)
    out.pop("head_dim")  # transformers derives it (= qk_rope_head_dim)


def v2_to_hf(c: ModelConfig, out: dict) -> None:
    _mla_to_hf(c, out)
    out["topk_method"] = "group_limited_greedy" if c.n_expert_groups > 1 else "greedy"


def v3_to_hf(c: ModelConfig, out: dict) -> None:
    _mla_to_hf(c, out)
    if c.mtp_depth:
        out["num_nextn_predict_layers"] = c.mtp_depth
    out["rope_interleave"] = c.rope_interleave


def _mla_blockers(c: ModelConfig, need: Needs) -> bool:
    need(c.norm_eps == 1e-6, "norm_eps", "1e-6 (transformers' latent norms use a fixed eps)")
    if has_moe(c):
        need(c.n_shared_experts > 0, "n_shared_experts", ">= 1")
    return has_moe(c)


def v2_blockers(c: ModelConfig, need: Needs) -> None:
    if _mla_blockers(c, need):
        need(c.router == "softmax", "router", "'softmax'")
        need(not c.router_bias, "router_bias", "False")
        need(not c.norm_topk_prob, "norm_topk_prob", "False")
        need(c.rope_interleave, "rope_interleave", "True")


def v3_blockers(c: ModelConfig, need: Needs) -> None:
    if _mla_blockers(c, need):
        need(c.router == "sigmoid", "router", "'sigmoid'")
        need(c.n_expert_groups == 1 or c.n_experts // c.n_expert_groups >= 2, "n_expert_groups",
             "groups of at least 2 experts")


def v3_finish_weights(out: dict, config: ModelConfig) -> None:
    """transformers always has the selection bias (zeros = no bias)."""
    for i in range(config.n_layers):
        key = f"model.layers.{i}.mlp.gate.weight"
        bias = f"model.layers.{i}.mlp.gate.e_score_correction_bias"
        if key in out and bias not in out:
            out[bias] = torch.zeros(out[key].shape[0], dtype=torch.float32)


def gguf_from_metadata(get, meta: dict, names: set, c: dict[str, Any]) -> None:
    rope_dim = get("rope.dimension_count")
    key_len = get("attention.key_length_mla", None) or get("attention.key_length")
    v_len = get("attention.value_length_mla", None) or get("attention.value_length")
    q_rank = get("attention.q_lora_rank", 0) or None
    gating = get("expert_gating_func", 1)  # llama.cpp: 1 softmax, 2 sigmoid
    c.update(attention="mla", n_kv_heads=c["n_heads"], q_lora_rank=q_rank,
             kv_lora_rank=get("attention.kv_lora_rank"), qk_rope_head_dim=rope_dim,
             qk_nope_head_dim=key_len - rope_dim, v_head_dim=v_len, rope_interleave=True)
    n = get("expert_count", 0)
    if n:
        first = get("leading_dense_block_count", 0)
        c.update(n_experts=n, n_experts_per_tok=get("expert_used_count"),
                 moe_d_ff=get("expert_feed_forward_length"), n_shared_experts=get("expert_shared_count", 0),
                 first_k_dense=first, routed_scaling_factor=float(get("expert_weights_scale", 1.0)),
                 norm_topk_prob=bool(get("expert_weights_norm", False)),
                 router="sigmoid" if gating == 2 else "softmax", router_bias=f"blk.{first}.exp_probs_b.bias" in names,
                 n_expert_groups=get("expert_group_count", 1) or 1, topk_groups=get("expert_group_used_count", 1) or 1)


_MLA = dict(attention="mla", experts=True)

DEEPSEEK_V2 = Family(
    model_type="deepseek_v2", architecture="DeepseekV2ForCausalLM",
    defaults=dict(LLAMA_LIKE, hidden_act="silu", attention_bias=False, vocab_size=102400, hidden_size=4096,
                  intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  max_position_embeddings=2048, mlp_bias=False, first_k_dense_replace=0, kv_lora_rank=512,
                  q_lora_rank=1536, n_group=None, n_routed_experts=64, n_shared_experts=2,
                  qk_nope_head_dim=128, qk_rope_head_dim=64, routed_scaling_factor=1.0, topk_group=None,
                  topk_method="greedy", norm_topk_prob=False, v_head_dim=128, num_experts_per_tok=None,
                  moe_intermediate_size=1407),
    aliases={"num_experts": "n_routed_experts"},
    mlp_bias_key=True, **_MLA, from_hf=v2_from_hf, to_hf=v2_to_hf, blockers=v2_blockers,
)

DEEPSEEK_V3 = Family(
    model_type="deepseek_v3", architecture="DeepseekV3ForCausalLM",
    defaults=dict(LLAMA_LIKE, hidden_act="silu", attention_bias=False, vocab_size=129280, hidden_size=7168,
                  intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
                  num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
                  routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                  v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
                  first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=4096,
                  rope_interleave=True),
    aliases={"num_local_experts": "n_routed_experts"},
    **_MLA, mtp=True, from_hf=v3_from_hf, to_hf=v3_to_hf, blockers=v3_blockers, finish_weights_to_hf=v3_finish_weights,
    gguf_archs=("deepseek2",), gguf_from_metadata=gguf_from_metadata,
)
