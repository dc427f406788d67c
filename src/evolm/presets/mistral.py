"""Mistral 7B and Mixtral 8x7B: sliding-window attention, then sparse mixture of experts.

- Mistral 7B (Jiang et al. 2023, arXiv:2310.06825): Llama-style blocks with GQA (8 KV heads)
  and sliding-window attention (4096 tokens on every layer), so the KV cache of a long
  sequence is a fixed ring buffer. Preset = v0.1, the release the paper describes.
- Mixtral 8x7B (Jiang et al. 2024, arXiv:2401.04088): every MLP becomes 8 SwiGLU experts with a
  softmax top-2 router (weights renormalised over the two): 46.7B parameters, 12.9B active per
  token. Full attention (no window), RoPE base 1e6, 32k context.
"""

_BASE = dict(
    vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
    max_seq_len=32768, norm="rmsnorm", norm_eps=1e-5, norm_placement="pre", pos_emb="rope",
    mlp="glu", activation="silu", qkv_bias=False, o_bias=False, mlp_bias=False, tie_embeddings=False,
)

PRESETS = {
    "mistral-7b": dict(
        _BASE, rope_theta=10000.0, sliding_window=4096, sliding_window_pattern=1,
        meta={"hf_id": "mistralai/Mistral-7B-v0.1", "paper": "Jiang et al. 2023, Mistral 7B, arXiv:2310.06825",
              "params": 7.24e9, "model_type": "mistral",
              "params_note": "7.24B: total of the HF checkpoint; the paper says 7.3B"},
    ),
    "mixtral-8x7b": dict(
        _BASE, rope_theta=1e6, n_experts=8, n_experts_per_tok=2, moe_d_ff=14336, router="softmax",
        norm_topk_prob=True,
        meta={"hf_id": "mistralai/Mixtral-8x7B-v0.1", "paper": "Jiang et al. 2024, Mixtral of Experts, arXiv:2401.04088",
              "params": 46.7e9, "active": 12.9e9, "model_type": "mixtral",
              "params_note": "paper: 46.7B total",
              "active_note": "paper: 12.9B active parameters per token (rounded; 2 of 8 experts + "
                             "attention + embeddings + head)"},
    ),
}
