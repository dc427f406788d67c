"""PaLM (Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", arXiv:2204.02311).

The architecture of section 2 of the paper, every choice one field of ``ModelConfig``:
- parallel layers: ``y = x + MLP(LayerNorm(x)) + Attention(LayerNorm(x))``, one norm feeding both
  (``norm_placement="parallel"``), ~15% faster training at large scale;
- multi-query attention: one key/value head shared by every query head (``n_kv_heads=1``), head
  size 256 at every size (``head_dim=256``; at 540B 48 heads of 256 are narrower than d_model);
- SwiGLU MLP with d_ff = 4 d_model (three matrices, so the MLP holds 12 d_model^2 weights);
- RoPE; no biases in the dense kernels or the layer norms (``norm_bias=False``);
- shared input-output embeddings over a 256k SentencePiece vocabulary; 2048-token sequences.

Sizes are Table 1 of the paper (layers, heads, d_model, parameters). PaLM's weights were never
released, so there is no Hugging Face id; ``meta['params']`` is Table 1's count. The paper states
no LayerNorm epsilon: these presets keep evolm's default (1e-5).
"""

_PAPER = "Chowdhery et al. 2022, PaLM: Scaling Language Modeling with Pathways, arXiv:2204.02311"

_PALM = dict(
    vocab_size=256000, max_seq_len=2048, head_dim=256, n_kv_heads=1, norm="layernorm", norm_bias=False,
    norm_placement="parallel", pos_emb="rope", mlp="glu", activation="silu", qkv_bias=False, o_bias=False,
    mlp_bias=False, tie_embeddings=True,
)


def _palm(layers: int, heads: int, d: int, params: float) -> dict:
    return dict(_PALM, n_layers=layers, n_heads=heads, d_model=d, d_ff=4 * d, meta={
        "paper": _PAPER, "params": params,
        "params_note": f"{params / 1e9:.2f}B: Table 1 of the paper (shared embeddings counted once)"})


PRESETS = {
    "palm-8b": _palm(32, 16, 4096, 8.63e9),
    "palm-62b": _palm(64, 32, 8192, 62.50e9),
    "palm-540b": _palm(118, 48, 18432, 540.35e9),
}
