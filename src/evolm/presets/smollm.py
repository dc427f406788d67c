"""SmolLM2: small Llama-architecture models trained on heavily curated data.

SmolLM2 (Allal et al. 2025, "SmolLM2: When Smol Goes Big", arXiv:2502.02737) keeps the Llama
recipe unchanged (RMSNorm pre-norm, RoPE, SwiGLU, GQA for the two small sizes) with tied
embeddings, a 49,152-token vocabulary and an 8k context; the innovation is the data, not the
architecture.
"""

_PAPER = "Allal et al. 2025, SmolLM2: When Smol Goes Big, arXiv:2502.02737"

_SMOL = dict(
    vocab_size=49152, max_seq_len=8192, norm="rmsnorm", norm_eps=1e-5, norm_placement="pre",
    pos_emb="rope", mlp="glu", activation="silu", qkv_bias=False, o_bias=False, mlp_bias=False,
    tie_embeddings=True,
)


def _meta(hf_id: str, params: float) -> dict:
    return {"hf_id": hf_id, "paper": _PAPER, "params": params, "model_type": "llama",
            "params_note": f"{params / 1e6:.4g}M: total of the HF checkpoint"}


PRESETS = {
    "smollm2-135m": dict(_SMOL, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                         rope_theta=100000.0,
                         meta=_meta("HuggingFaceTB/SmolLM2-135M", 135e6)),
    "smollm2-360m": dict(_SMOL, d_model=960, n_layers=32, n_heads=15, n_kv_heads=5, d_ff=2560,
                         rope_theta=100000.0,
                         meta=_meta("HuggingFaceTB/SmolLM2-360M", 362e6)),
    "smollm2-1.7b": dict(_SMOL, d_model=2048, n_layers=24, n_heads=32, n_kv_heads=32, d_ff=8192,
                         rope_theta=130000.0,
                         meta=_meta("HuggingFaceTB/SmolLM2-1.7B", 1.71e9)),
}
