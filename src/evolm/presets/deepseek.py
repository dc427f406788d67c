"""DeepSeek-V2-Lite and DeepSeek-V3: multi-head latent attention and DeepSeekMoE.

- DeepSeek-V2 (DeepSeek-AI 2024, arXiv:2405.04434): multi-head latent attention (MLA) caches one
  512-wide latent plus a 64-wide decoupled rotary key per token and layer instead of per-head
  keys and values; DeepSeekMoE (arXiv:2401.06066) uses many small routed experts plus always-on
  shared experts, with the first layer(s) dense. V2-Lite: 15.7B total, no query low-rank
  projection, 64 routed experts (6 active) + 2 shared, softmax router without renormalisation.
- DeepSeek-V3 (DeepSeek-AI 2024, arXiv:2412.19437): 256 routed experts (8 active) + 1 shared,
  sigmoid router with a per-expert bias for auxiliary-loss-free load balancing, routing
  limited to 4 of 8 expert groups, routed weights renormalised and scaled by 2.5, first 3
  layers dense, YaRN RoPE scaling (factor 40) to a 128k+ context. 671B total, 37B active.
  The released checkpoint also holds a multi-token-prediction (MTP) module (14B, 685B in
  all); the preset is the main model without it, which is what the 671B figure counts.
"""

_V2_PAPER = "DeepSeek-AI 2024, DeepSeek-V2: A Strong, Economical, and Efficient MoE Language Model, arXiv:2405.04434"
_V3_PAPER = "DeepSeek-AI 2024, DeepSeek-V3 Technical Report, arXiv:2412.19437"

_DEEPSEEK = dict(
    norm="rmsnorm", norm_eps=1e-6, norm_placement="pre", pos_emb="rope", rope_theta=10000.0,
    rope_interleave=True, attention="mla", kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, mlp="glu", activation="silu", qkv_bias=False,
    o_bias=False, mlp_bias=False, tie_embeddings=False, max_seq_len=163840,
)


def _yarn(mscale: float) -> dict:
    return {"type": "yarn", "factor": 40.0, "original_max_seq_len": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale}


PRESETS = {
    "deepseek-v2-lite": dict(
        _DEEPSEEK, vocab_size=102400, d_model=2048, n_layers=27, n_heads=16, q_lora_rank=None,
        d_ff=10944, n_experts=64, n_experts_per_tok=6, moe_d_ff=1408, n_shared_experts=2,
        first_k_dense=1, router="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
        rope_scaling=_yarn(0.707),
        meta={"hf_id": "deepseek-ai/DeepSeek-V2-Lite", "paper": _V2_PAPER, "params": 15.7e9,
              "model_type": "deepseek_v2",
              "params_note": "paper: 15.7B total",
              "active_note": "paper: 2.4B activated; our per-token count including embeddings "
                             "and head is 2.66B (the paper's figure appears to leave out the "
                             "0.42B of embedding and head), so it is not tested"},
    ),
    "deepseek-v3": dict(
        _DEEPSEEK, vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, q_lora_rank=1536,
        d_ff=18432, n_experts=256, n_experts_per_tok=8, moe_d_ff=2048, n_shared_experts=1,
        first_k_dense=3, router="sigmoid", router_bias=True, norm_topk_prob=True,
        routed_scaling_factor=2.5, n_expert_groups=8, topk_groups=4, rope_scaling=_yarn(1.0),
        meta={"hf_id": "deepseek-ai/DeepSeek-V3", "paper": _V3_PAPER, "params": 671e9,
              "active": 37e9, "active_rounding": "floor", "model_type": "deepseek_v3",
              "params_note": "paper: 671B total (main model; the 14B MTP module is excluded)",
              "active_note": "paper: 37B activated per token. The exact count (8 of 256 routed "
                             "+ 1 shared expert, attention, embeddings and head) is 37.55B, so "
                             "the published figure is truncated, not rounded"},
    ),
}
