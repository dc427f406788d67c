"""OLMo 2: norms moved onto the sub-layer outputs, plus full-width QK-norm.

OLMo 2 (Team OLMo 2025, "2 OLMo 2 Furious", arXiv:2501.00656) keeps Llama's SwiGLU + RoPE but
normalises each sub-layer's *output* inside the residual branch (``x = x + norm(f(x))``) and
applies RMSNorm to the whole query and key projections before splitting heads; both changes
were chosen for training stability. RoPE base 500k, untied head, 100k (cl100k-based) vocabulary.
"""

_PAPER = "Team OLMo 2025, 2 OLMo 2 Furious, arXiv:2501.00656"

_OLMO2 = dict(
    vocab_size=100352, max_seq_len=4096, norm="rmsnorm", norm_eps=1e-6, norm_placement="olmo2",
    qk_norm="full", pos_emb="rope", rope_theta=500000.0, mlp="glu", activation="silu",
    qkv_bias=False, o_bias=False, mlp_bias=False, tie_embeddings=False,
)


def _meta(hf_id: str, params: float) -> dict:
    return {"hf_id": hf_id, "paper": _PAPER, "params": params, "model_type": "olmo2",
            "params_note": f"{params / 1e9:.3g}B: total of the HF checkpoint"}


PRESETS = {
    "olmo-2-1b": dict(_OLMO2, d_model=2048, n_layers=16, n_heads=16, d_ff=8192,
                      meta=_meta("allenai/OLMo-2-0425-1B", 1.48e9)),
    "olmo-2-7b": dict(_OLMO2, d_model=4096, n_layers=32, n_heads=32, d_ff=11008,
                      meta=_meta("allenai/OLMo-2-1124-7B", 7.30e9)),
    "olmo-2-13b": dict(_OLMO2, d_model=5120, n_layers=40, n_heads=40, d_ff=13824,
                       meta=_meta("allenai/OLMo-2-1124-13B", 13.7e9)),
}
