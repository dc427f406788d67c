"""BART (Lewis et al. 2019, "BART: Denoising Sequence-to-Sequence Pre-training for Natural
Language Generation, Translation, and Comprehension", arXiv:1910.13461): transformers ``bart``.

A standard post-norm Transformer encoder-decoder (LayerNorm with biases after each residual sum),
learned positions over 1024 tokens stored with an offset of 2, a LayerNorm on the embeddings of
each stack, exact GELU, biases everywhere, a tied head with a bias (``final_logits_bias``),
GPT-2's 50,265-token byte-level BPE; pre-trained by denoising (text infilling, sentence
permutation). The decoder starts from ``</s>`` (id 2).

Parameter counts (``meta['params']``) are transformers' ``num_parameters()`` of the released
checkpoints (the tied head counted once, the logits bias a buffer there; evolm's model holds it as a
parameter of the head, ``nn/heads.py``, so it counts ``vocab_size`` more).
"""

_PAPER = ("Lewis et al. 2019, BART: Denoising Sequence-to-Sequence Pre-training for Natural Language Generation, "
          "Translation, and Comprehension")

_BART = dict(
    vocab_size=50265, max_seq_len=1024, norm="layernorm", norm_eps=1e-5, norm_bias=True, norm_placement="post",
    final_norm=False, pos_emb="learned", pos_offset=2, embed_norm=True, qkv_bias=True, o_bias=True, mlp="mlp",
    mlp_bias=True, activation="gelu", tie_embeddings=True, lm_head_bias=True, decoder_start_token_id=2,
    resid_dropout=0.1, embd_dropout=0.1,
)


def _bart(hf_id: str, d: int, layers: int, heads: int, params: float) -> dict:
    return dict(_BART, d_model=d, n_layers=layers, encoder_layers=layers, n_heads=heads, d_ff=4 * d, meta={
        "hf_id": hf_id, "paper": _PAPER, "params": params, "model_type": "bart",
        "params_note": f"{params / 1e6:.1f}M: transformers' num_parameters() of {hf_id} (the logits bias, "
                       f"a buffer there, not counted)",
    })


PRESETS = {
    "bart-base": _bart("facebook/bart-base", 768, 6, 12, 139_420_416),
    "bart-large": _bart("facebook/bart-large", 1024, 12, 16, 406_291_456),
}
