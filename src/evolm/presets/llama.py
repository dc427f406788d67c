"""Llama 2, Llama 3, 3.1 and 3.2: the pre-norm RMSNorm + RoPE + SwiGLU recipe everyone copied.

- Llama 2 (Touvron et al. 2023, arXiv:2307.09288): RMSNorm pre-norm, RoPE (base 10k), SwiGLU
  MLP, no biases, untied head, 32k SentencePiece vocabulary, 4k context; the 70B uses
  grouped-query attention (8 KV heads).
- Llama 3 (Meta 2024, "The Llama 3 Herd of Models", arXiv:2407.21783): GQA at every size, a
  128k tiktoken vocabulary, RoPE base 500k, 8k context. Llama 3.1 stretches to 128k tokens with
  the "llama3" RoPE frequency scaling (factor 8); Llama 3.2 1B/3B (pruned and distilled from
  3.1 8B) tie their embeddings and use factor 32.

- Llama 4 (Meta 2025, "The Llama 4 herd", blog of 2025-04-05; no paper): mixture-of-experts
  Llama with a shared expert and top-1 sigmoid routing that scales the expert's input, 3 of 4
  layers RoPE with attention in chunks of 8192 tokens, every 4th layer NoPE, global and
  temperature-tuned (iRoPE), a 202k vocabulary. Scout (17B active / 109B total): 16 experts in
  every layer, L2 QK-norm on the RoPE layers, llama3 RoPE scaling. Maverick (17B active / 400B
  total): 128 experts in every other layer, dense layers between, no QK-norm or RoPE scaling.
  The text model only; the published totals include the vision encoder
  (``params_vision``, counted from the checkpoints' ``vision_config``).

- Llama 3.2 Vision (Meta 2024, blog of 2024-09-25; the Llama 3 herd paper's sec. 7): Llama 3.1 8B's
  text model with 8 gated cross-attention layers inserted (40 layers, every 5th from layer 3 reads
  the image), a ViT-H/14 image encoder of 32 local + 8 gated global layers over up to 4 tiles of
  560 px, and a projector of its 5 x 1280 features to the text width (``vision``, nn/vision.py).

``meta['params']`` are the published sizes of the released checkpoints (Hugging Face model
cards and hub totals, 3 significant digits): Llama 2 6.74B / 13.0B / 69.0B; Llama 3 8.03B /
70.6B / 405B; Llama 3.2 1.24B / 3.21B.
"""

_LLAMA2_PAPER = "Touvron et al. 2023, Llama 2: Open Foundation and Fine-Tuned Chat Models, arXiv:2307.09288"
_LLAMA3_PAPER = "Llama Team, Meta 2024, The Llama 3 Herd of Models, arXiv:2407.21783"

_BASE = dict(
    norm="rmsnorm", norm_eps=1e-5, norm_placement="pre", pos_emb="rope", mlp="glu",
    activation="silu", qkv_bias=False, o_bias=False, mlp_bias=False, tie_embeddings=False,
)
_LLAMA2 = dict(_BASE, vocab_size=32000, max_seq_len=4096, rope_theta=10000.0)
_LLAMA3 = dict(_BASE, vocab_size=128256, max_seq_len=8192, rope_theta=500000.0, n_kv_heads=8)


def _llama31_scaling(factor: float) -> dict:
    return {"type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_seq_len": 8192}


def _meta(hf_id: str, paper: str, params: float, published: str) -> dict:
    return {"hf_id": hf_id, "paper": paper, "params": params, "model_type": "llama",
            "params_note": f"{params / 1e9:.3g}B: total of the HF checkpoint; marketed as {published}"}


PRESETS = {
    "llama-2-7b": dict(_LLAMA2, d_model=4096, n_layers=32, n_heads=32, d_ff=11008,
                       meta=_meta("meta-llama/Llama-2-7b-hf", _LLAMA2_PAPER, 6.74e9, "7B")),
    "llama-2-13b": dict(_LLAMA2, d_model=5120, n_layers=40, n_heads=40, d_ff=13824,
                        meta=_meta("meta-llama/Llama-2-13b-hf", _LLAMA2_PAPER, 13.0e9, "13B")),
    "llama-2-70b": dict(_LLAMA2, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672,
                        meta=_meta("meta-llama/Llama-2-70b-hf", _LLAMA2_PAPER, 69.0e9, "70B")),
    "llama-3-8b": dict(_LLAMA3, d_model=4096, n_layers=32, n_heads=32, d_ff=14336,
                       meta=_meta("meta-llama/Meta-Llama-3-8B", _LLAMA3_PAPER, 8.03e9, "8B")),
    "llama-3-70b": dict(_LLAMA3, d_model=8192, n_layers=80, n_heads=64, d_ff=28672,
                        meta=_meta("meta-llama/Meta-Llama-3-70B", _LLAMA3_PAPER, 70.6e9, "70B")),
    "llama-3.1-8b": dict(_LLAMA3, d_model=4096, n_layers=32, n_heads=32, d_ff=14336, max_seq_len=131072,
                         rope_scaling=_llama31_scaling(8.0),
                         meta=_meta("meta-llama/Llama-3.1-8B", _LLAMA3_PAPER, 8.03e9, "8B")),
    "llama-3.1-70b": dict(_LLAMA3, d_model=8192, n_layers=80, n_heads=64, d_ff=28672, max_seq_len=131072,
                          rope_scaling=_llama31_scaling(8.0),
                          meta=_meta("meta-llama/Llama-3.1-70B", _LLAMA3_PAPER, 70.6e9, "70B")),
    "llama-3.1-405b": dict(_LLAMA3, d_model=16384, n_layers=126, n_heads=128, d_ff=53248, max_seq_len=131072,
                           rope_scaling=_llama31_scaling(8.0),
                           meta=_meta("meta-llama/Llama-3.1-405B", _LLAMA3_PAPER, 405e9, "405B")),
    "llama-3.2-1b": dict(_LLAMA3, d_model=2048, n_layers=16, n_heads=32, head_dim=64, d_ff=8192,
                         max_seq_len=131072, tie_embeddings=True, rope_scaling=_llama31_scaling(32.0),
                         meta=_meta("meta-llama/Llama-3.2-1B", _LLAMA3_PAPER, 1.24e9, "1B")),
    "llama-3.2-3b": dict(_LLAMA3, d_model=3072, n_layers=28, n_heads=24, head_dim=128, d_ff=8192,
                         max_seq_len=131072, tie_embeddings=True, rope_scaling=_llama31_scaling(32.0),
                         meta=_meta("meta-llama/Llama-3.2-3B", _LLAMA3_PAPER, 3.21e9, "3B")),
    "llama-3.2-11b-vision": dict(
        _LLAMA3, d_model=4096, n_layers=40, n_heads=32, d_ff=14336, max_seq_len=131072,
        rope_scaling=_llama31_scaling(8.0),
        vision=dict(d_model=1280, n_layers=32, n_global_layers=8, n_heads=16, d_ff=5120, image_size=560, patch_size=14,
                    max_num_tiles=4, intermediate_layers=[3, 7, 15, 23, 30],
                    cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], extra_token_rows=8, image_token_id=128256),
        meta=dict(_meta("meta-llama/Llama-3.2-11B-Vision", _LLAMA3_PAPER, 10.67e9, "11B"), model_type="mllama",
                  params_note="10.67B: total of the HF checkpoint (863.6M in the image encoder); marketed as 11B")),
}


_LLAMA4_BLOG = ("Meta AI 2025, The Llama 4 herd: The beginning of a new era of natively multimodal AI innovation "
                "(ai.meta.com/blog/llama-4-multimodal-intelligence, 2025-04-05); sizes from the checkpoints' "
                "config.json text_config")
# the vision encoder both checkpoints carry (vision_config: 34 layers of width 1408, MLP 5632, patch 14 at
# 336 px, adapter 4096, projector to 5120): 34 layers * 23,807,872 + embeddings and outer norms 1,647,360
# + adapter 39,845,888 + projector 20,971,520
_LLAMA4_VISION = 871_932_416
_LLAMA4 = dict(
    _BASE, vocab_size=202048, d_model=5120, n_layers=48, n_heads=40, n_kv_heads=8, head_dim=128, d_ff=16384,
    rope_theta=500000.0, rope_interleave=True, nope_layers=tuple(range(3, 48, 4)), attention_chunk_size=8192,
    sliding_window_pattern=4, attn_temperature_tuning=True, attn_floor_scale=8192.0, attn_scale=0.1,
    n_experts_per_tok=1, moe_d_ff=8192, n_shared_experts=1, router="sigmoid", norm_topk_prob=False,
    router_scales_input=True,
)


def _llama4_meta(hf_id: str, params: float, active: float) -> dict:
    return {"hf_id": hf_id, "paper": _LLAMA4_BLOG, "params": params, "active": active, "active_rounding": "floor",
            "params_vision": _LLAMA4_VISION, "model_type": "llama4_text",
            "params_note": f"{params / 1e9:.0f}B total as published, vision encoder included (params_vision)",
            "active_note": f"{active / 1e9:.0f}B active as published: truncated (the text model's exact count is "
                           "17.2B: one routed expert + the shared one + attention + embeddings + head)"}


PRESETS.update({
    # meta-llama/Llama-4-Scout-17B-16E: use_qk_norm true, every layer MoE (interleave_moe_layer_step 1),
    # rope_scaling llama3 (factor 8, low 1, high 4, original 8192), max_position_embeddings 262144
    "llama-4-scout": dict(_LLAMA4, n_experts=16, qk_norm="l2", max_seq_len=262144,
                          rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_seq_len": 8192},
                          meta=_llama4_meta("meta-llama/Llama-4-Scout-17B-16E", 109e9, 17e9)),
    # meta-llama/Llama-4-Maverick-17B-128E: use_qk_norm false, interleave_moe_layer_step 2 (layers 1, 3, ...),
    # rope_scaling null, max_position_embeddings 1048576
    "llama-4-maverick": dict(_LLAMA4, n_experts=128, moe_layer_step=2, max_seq_len=1048576,
                             meta=_llama4_meta("meta-llama/Llama-4-Maverick-17B-128E", 400e9, 17e9)),
})
