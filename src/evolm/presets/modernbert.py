"""ModernBERT: an encoder built from the decoder lineage's parts.

ModernBERT (Warner et al. 2024, arXiv:2412.13663) rebuilds BERT with what a decade of decoders
learned: pre-norm LayerNorms without biases, no biases at all, GeGLU MLPs, RoPE, and attention that
alternates one global layer with two local ones (a bidirectional window of 128 tokens: 64 each way),
whose RoPE bases differ (160k global, 10k local). Trained on 2T tokens of text and code at 8192
tokens; its vocabulary is a 50368-entry BPE (OLMo's, padded to a multiple of 64).

The presets are the masked-LM models (``head='lm'``); ``params`` is the paper's Table count.
"""

_PAPER = "Warner et al. 2024, ModernBERT, arXiv:2412.13663"

_MODERNBERT = dict(
    vocab_size=50368, max_seq_len=8192, norm="layernorm", norm_eps=1e-5, norm_bias=False, norm_placement="pre",
    first_attn_norm=False, pos_emb="rope", rope_theta=160000.0, rope_local_theta=10000.0, sliding_window=128,
    sliding_window_pattern=3, global_layer_first=True, mlp="glu", activation="gelu", qkv_bias=False, o_bias=False,
    mlp_bias=False, mask="bidirectional", embed_norm=True, tie_embeddings=True, head="lm", head_transform=True,
    head_dense_bias=False, lm_head_bias=True,
)


def _meta(hf_id: str, params: float) -> dict:
    return {"hf_id": hf_id, "paper": _PAPER, "params": params, "model_type": "modernbert",
            "params_note": f"{params / 1e6:.0f}M: the paper's and the model card's figure"}


PRESETS = {
    "modernbert-base": dict(_MODERNBERT, d_model=768, n_layers=22, n_heads=12, d_ff=1152,
                            meta=_meta("answerdotai/ModernBERT-base", 149e6)),
    "modernbert-large": dict(_MODERNBERT, d_model=1024, n_layers=28, n_heads=16, d_ff=2624,
                             meta=_meta("answerdotai/ModernBERT-large", 395e6)),
}
