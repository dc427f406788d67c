"""Llama 2, Llama 3, 3.1 and 3.2: the pre-norm RMSNorm + RoPE + SwiGLU recipe everyone copied.

- Llama 2 (Touvron et al. 2023, arXiv:2307.09288): RMSNorm pre-norm, RoPE (base 10k), SwiGLU
  MLP, no biases, untied head, 32k SentencePiece vocabulary, 4k context; the 70B uses
  grouped-query attention (8 KV heads).
- Llama 3 (Meta 2024, "The Llama 3 Herd of Models", arXiv:2407.21783): GQA at every size, a
  128k tiktoken vocabulary, RoPE base 500k, 8k context. Llama 3.1 stretches to 128k tokens with
  the "llama3" RoPE frequency scaling (factor 8); Llama 3.2 1B/3B (pruned and distilled from
  3.1 8B) tie their embeddings and use factor 32.

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
}
