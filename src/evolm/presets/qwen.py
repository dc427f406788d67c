"""Qwen3: Llama-style blocks with per-head QK-norm, and a fine-grained MoE.

Qwen3 (Qwen Team 2025, "Qwen3 Technical Report", arXiv:2505.09388) drops Qwen2's QKV biases
for per-head RMSNorm on queries and keys (QK-norm), uses GQA with an explicit ``head_dim`` of 128
(so the attention width may differ from ``d_model``), RoPE base 1e6 and a 151,936-token
vocabulary; the small models tie their embeddings. Qwen3-30B-A3B replaces every MLP by 128
SwiGLU experts of width 768, 8 active per token (softmax router, top-k renormalised), no shared
expert.

Reference figures are the Qwen3 report's Table 1 / model cards: total and non-embedding
parameters (the latter excludes the input embedding and the LM head). One exception:
Qwen3-1.7B's rounded "1.7B" is 1.2% below its real size (1.72B), so its reference total is the
Hugging Face hub's 2.03B, which counts the tied ``lm_head.weight`` a second time because the
checkpoint stores it (``params_counts_tied_head_twice``); its 1.4B non-embedding figure is
checked as well.
"""

_PAPER = "Qwen Team 2025, Qwen3 Technical Report, arXiv:2505.09388"

_QWEN3 = dict(
    vocab_size=151936, max_seq_len=40960, norm="rmsnorm", norm_eps=1e-6, norm_placement="pre",
    qk_norm="head", head_dim=128, pos_emb="rope", rope_theta=1e6, mlp="glu", activation="silu",
    qkv_bias=False, o_bias=False, mlp_bias=False,
)


def _meta(hf_id: str, params: float, non_embedding: float, **extra) -> dict:
    return {"hf_id": hf_id, "paper": _PAPER, "params": params, "params_non_embedding": non_embedding,
            "model_type": "qwen3", "params_note": f"model card: {params / 1e9:.3g}B total, "
            f"{non_embedding / 1e9:.3g}B non-embedding", **extra}


PRESETS = {
    "qwen3-0.6b": dict(_QWEN3, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, d_ff=3072,
                       tie_embeddings=True,
                       meta=_meta("Qwen/Qwen3-0.6B", 0.6e9, 0.44e9)),
    "qwen3-1.7b": dict(_QWEN3, d_model=2048, n_layers=28, n_heads=16, n_kv_heads=8, d_ff=6144,
                       tie_embeddings=True,
                       meta=_meta("Qwen/Qwen3-1.7B", 2.03e9, 1.4e9, params_counts_tied_head_twice=True,
                                  params_note="HF hub total 2.03B (tied lm_head stored and counted "
                                              "twice); model card: 1.7B total, 1.4B non-embedding")),
    "qwen3-4b": dict(_QWEN3, d_model=2560, n_layers=36, n_heads=32, n_kv_heads=8, d_ff=9728,
                     tie_embeddings=True,
                     meta=_meta("Qwen/Qwen3-4B", 4.0e9, 3.6e9)),
    "qwen3-8b": dict(_QWEN3, d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8, d_ff=12288,
                     tie_embeddings=False,
                     meta=_meta("Qwen/Qwen3-8B", 8.2e9, 6.95e9)),
    "qwen3-14b": dict(_QWEN3, d_model=5120, n_layers=40, n_heads=40, n_kv_heads=8, d_ff=17408,
                      tie_embeddings=False,
                      meta=_meta("Qwen/Qwen3-14B", 14.8e9, 13.2e9)),
    "qwen3-32b": dict(_QWEN3, d_model=5120, n_layers=64, n_heads=64, n_kv_heads=8, d_ff=25600,
                      tie_embeddings=False,
                      meta=_meta("Qwen/Qwen3-32B", 32.8e9, 31.2e9)),
    "qwen3-30b-a3b": dict(
        _QWEN3, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4, d_ff=6144, tie_embeddings=False,
        n_experts=128, n_experts_per_tok=8, moe_d_ff=768, router="softmax", norm_topk_prob=True,
        meta=_meta("Qwen/Qwen3-30B-A3B", 30.5e9, 29.9e9,
                   model_type="qwen3_moe", active=3.3e9, active_rounding="floor",
                   active_note="model card / report: 3.3B activated. The exact count (8 of 128 "
                               "experts + attention + embeddings + head) is 3.35B, so the "
                               "published figure is truncated to one decimal, not rounded")),
}
