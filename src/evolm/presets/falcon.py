"""Falcon (Almazrouei et al. 2023, "The Falcon Series of Open Language Models", arXiv:2311.16867).

- Falcon-7B: PaLM's parallel block (attention and MLP from one LayerNorm, ``norm_placement=
  "parallel"``) with multi-query attention (one K/V head), RoPE, a GELU MLP of 4 d_model, no
  biases, LayerNorms with biases, tied embeddings over a 65,024-token BPE vocabulary, 2048 tokens.
- Falcon-40B: the "new decoder architecture": attention and MLP still in parallel, but each with
  its own LayerNorm (``ln_attn``, ``ln_mlp``: ``norm_placement="parallel2"``), and 8 K/V groups
  (grouped-query attention) instead of one.

Sizes are the released config.json files (``tiiuae/falcon-7b``: hidden_size 4544, 32 layers, 71
heads, multi_query; ``tiiuae/falcon-40b``: hidden_size 8192, 60 layers, 128 heads, num_kv_heads 8,
new_decoder_architecture); what they leave out takes transformers' FalconConfig defaults (2048
positions, RoPE base 10k, exact GELU, eps 1e-5, tied head). ``meta['params']`` is the model
cards' rounded size; the exact count of each config equals transformers' FalconForCausalLM built
from the same config.json (tests/test_presets.py): 6.92B and 41.30B.
"""

_PAPER = "Almazrouei et al. 2023, The Falcon Series of Open Language Models, arXiv:2311.16867"

_FALCON = dict(
    vocab_size=65024, max_seq_len=2048, norm="layernorm", norm_eps=1e-5, norm_bias=True, pos_emb="rope",
    rope_theta=10000.0, mlp="mlp", activation="gelu", qkv_bias=False, o_bias=False, mlp_bias=False,
    tie_embeddings=True,
)


def _meta(hf_id: str, params: float, exact: str) -> dict:
    return {"hf_id": hf_id, "paper": _PAPER, "params": params, "model_type": "falcon",
            "params_note": f"{params / 1e9:.0f}B as the model card rounds it; the released config counts {exact}"}


PRESETS = {
    "falcon-7b": dict(_FALCON, d_model=4544, n_layers=32, n_heads=71, n_kv_heads=1, d_ff=4 * 4544,
                      norm_placement="parallel", meta=_meta("tiiuae/falcon-7b", 7e9, "6.92B")),
    "falcon-40b": dict(_FALCON, d_model=8192, n_layers=60, n_heads=128, n_kv_heads=8, d_ff=4 * 8192,
                       norm_placement="parallel2", meta=_meta("tiiuae/falcon-40b", 40e9, "41.30B")),
}
