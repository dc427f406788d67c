"""BERT and RoBERTa: the post-norm Transformer encoder, pretrained by masked language modelling.

BERT (Devlin et al. 2018, arXiv:1810.04805) reads text both ways and is pretrained to fill in 15%
masked tokens; the encoder is the original Transformer's (post-norm blocks, a GELU MLP 4x wide,
learned positions, biases everywhere) plus segment (token-type) embeddings, a LayerNorm over the
embedding sum and a masked-LM head with its own transform and bias. RoBERTa (Liu et al. 2019,
arXiv:1907.11692) keeps the architecture and trains it longer on more data with dynamic masking and
no next-sentence task; its byte-level BPE vocabulary has 50265 tokens and its positions start after
the padding index (a 514-row table for 512 tokens).

The presets are the masked-LM models (``head='lm'``); ``head`` / ``num_labels`` overrides make the
classifiers. ``params`` is the hub checkpoint's count as its model card rounds it.
"""

_BERT_PAPER = "Devlin et al. 2018, BERT, arXiv:1810.04805"
_ROBERTA_PAPER = "Liu et al. 2019, RoBERTa, arXiv:1907.11692"

_ENCODER = dict(
    norm="layernorm", norm_placement="post", final_norm=False, pos_emb="learned", mlp="mlp", activation="gelu",
    qkv_bias=True, o_bias=True, mlp_bias=True, mask="bidirectional", embed_norm=True, tie_embeddings=True,
    head="lm", head_transform=True, lm_head_bias=True, attn_dropout=0.1, resid_dropout=0.1, embd_dropout=0.1,
    head_dropout=0.1,
)
_BERT = dict(_ENCODER, vocab_size=30522, max_seq_len=512, norm_eps=1e-12, type_vocab_size=2)
_ROBERTA = dict(_ENCODER, vocab_size=50265, max_seq_len=512, norm_eps=1e-5, type_vocab_size=1, pos_offset=2,
                positions_from_mask=True)
_BASE = dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072)
_LARGE = dict(d_model=1024, n_layers=24, n_heads=16, d_ff=4096)


def _meta(hf_id: str, paper: str, model_type: str, params: float, note: str) -> dict:
    return {"hf_id": hf_id, "paper": paper, "params": params, "model_type": model_type, "params_note": note}


PRESETS = {
    "bert-base": dict(_BERT, **_BASE, meta=_meta(
        "google-bert/bert-base-uncased", _BERT_PAPER, "bert", 110e6,
        "110M: the paper's and the model card's figure (the masked-LM model counts 109.5M)")),
    "bert-large": dict(_BERT, **_LARGE, meta=_meta(
        "google-bert/bert-large-uncased", _BERT_PAPER, "bert", 336e6,
        "336M: the hub checkpoint (the paper rounds to 340M)")),
    "roberta-base": dict(_ROBERTA, **_BASE, meta=_meta(
        "FacebookAI/roberta-base", _ROBERTA_PAPER, "roberta", 125e6, "125M: the model card's figure")),
    "roberta-large": dict(_ROBERTA, **_LARGE, meta=_meta(
        "FacebookAI/roberta-large", _ROBERTA_PAPER, "roberta", 355e6, "355M: the model card's figure")),
}
