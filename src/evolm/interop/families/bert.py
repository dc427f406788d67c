"""BERT (Devlin et al. 2018, arXiv:1810.04805) and RoBERTa (Liu et al. 2019, arXiv:1907.11692).

BERT is the original Transformer's encoder: post-norm blocks (``x = LN(x + f(x))``) attending both
ways, an exact-erf GELU MLP, learned absolute positions plus token-type (segment) embeddings summed
and LayerNorm-ed, every linear layer with a bias. Its masked-LM head transforms each hidden state
(dense -> GELU -> LayerNorm) and projects with the tied embedding plus a bias of its own; its
classifiers read a pooler (dense + tanh over [CLS]).

RoBERTa keeps the architecture and changes the training (more data, dynamic masking, no
next-sentence task, byte-level BPE). Two traces remain in the weights: positions are counted from
``padding_idx + 1`` over real tokens only (``pos_offset = pad_token_id + 1``,
``positions_from_mask``), so ``max_position_embeddings`` (514) holds two rows no token uses; and
its heads have their own names (``lm_head``; ``classifier.dense`` / ``out_proj``, the pooler's
computation under another name).

Which head a folder holds is its ``architectures`` entry (``BertForMaskedLM`` -> ``head="lm"``,
``...ForSequenceClassification`` -> ``"classify"``, ``...ForTokenClassification`` ->
``"token_classify"``, ``BertModel`` -> ``"embed"``: mean-pooled sentence embeddings, the
Sentence-BERT reading of a bare encoder).
"""

from __future__ import annotations

from functools import partial

from evolm.config import ModelConfig
from evolm.interop.families import encoder
from evolm.interop.families.base import Family, Needs, need_classic_block
from evolm.interop.families.decoder import ACT_TO_HF, err

ENCODER_PARTS = frozenset({"embed_norm", "type_vocab_size", "pos_offset", "positions_from_mask", "lm_head_bias",
                           "head", "head_transform", "pooler"})

TOP = {"embeddings.word_embeddings": "embed_tokens", "embeddings.position_embeddings": "pos_embed",
       "embeddings.token_type_embeddings": "type_embed", "embeddings.LayerNorm": "embed_norm"}
LAYER = {"attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
         "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.o_proj",
         "attention.output.LayerNorm": "attn_norm", "intermediate.dense": "mlp.up_proj",
         "output.dense": "mlp.down_proj", "output.LayerNorm": "mlp_norm"}


def _layout(base: str, head: dict, unused: tuple[str, ...], prefix: str, classify_head=None) -> encoder.Layout:
    return encoder.Layout(
        base=base, top=TOP, layer=LAYER, head=head, unused=unused, classify_head=classify_head or {},
        architectures={"lm": f"{prefix}ForMaskedLM", "classify": f"{prefix}ForSequenceClassification",
                       "token_classify": f"{prefix}ForTokenClassification", "embed": f"{prefix}Model"})


BERT_LAYOUT = _layout("bert", {"cls.predictions.transform.dense": "head.dense",
                               "cls.predictions.transform.LayerNorm": "head.norm", "cls.predictions": "head",
                               "bert.pooler.dense": "head.pooler", "classifier": "head.classifier"},
                      ("cls.predictions.decoder", "cls.seq_relationship", "pooler."), "Bert")
ROBERTA_LAYOUT = _layout("roberta", {"lm_head.dense": "head.dense", "lm_head.layer_norm": "head.norm",
                                     "lm_head": "head", "classifier": "head.classifier"},
                         ("lm_head.decoder", "pooler."), "Roberta",
                         {"classifier.dense": "head.pooler", "classifier.out_proj": "head.classifier"})


def config_from_hf(fam: Family, h: dict, meta: dict, lay: encoder.Layout, roberta: bool) -> ModelConfig:
    if h.get("is_decoder") or h.get("add_cross_attention"):
        raise err("is_decoder / add_cross_attention (BERT as a decoder) is not supported; evolm reads it as an encoder")
    if h.get("position_embedding_type", "absolute") != "absolute":
        raise err(f"position_embedding_type {h['position_embedding_type']!r} is not supported; expected 'absolute'")
    if not h["tie_word_embeddings"]:
        raise err("tie_word_embeddings=false is not supported (the masked-LM decoder is the word embedding)")
    head = lay.head_of(h)
    offset = h["pad_token_id"] + 1 if roberta else 0
    if h["max_position_embeddings"] <= offset:
        raise err(f"max_position_embeddings {h['max_position_embeddings']} leaves no position after the "
                  f"padding offset {offset}")
    act = fam.activation(h["hidden_act"])
    if isinstance(h.get("id2label"), dict):
        meta["hf"]["id2label"] = h["id2label"]
    drop = float(h["hidden_dropout_prob"])
    return ModelConfig(
        name=f"hf-{fam.model_type}", vocab_size=h["vocab_size"], d_model=h["hidden_size"],
        n_layers=h["num_hidden_layers"], n_heads=h["num_attention_heads"], d_ff=h["intermediate_size"],
        max_seq_len=h["max_position_embeddings"] - offset, norm="layernorm", norm_eps=float(h["layer_norm_eps"]),
        norm_bias=True, norm_placement="post", final_norm=False, pos_emb="learned", qkv_bias=True, o_bias=True,
        mlp="mlp", mlp_bias=True, activation=act, mask="bidirectional", embed_norm=True,
        type_vocab_size=h["type_vocab_size"], pos_offset=offset, positions_from_mask=roberta, tie_embeddings=True,
        head=head, head_transform=head == "lm", lm_head_bias=head == "lm", pooler=head == "classify",
        head_activation="gelu" if roberta and head == "lm" and act != "gelu" else None,
        pooling="mean" if head == "embed" else "cls", num_labels=encoder.num_labels(h),
        head_dropout=float(h["classifier_dropout"] if h.get("classifier_dropout") is not None else drop),
        attn_dropout=float(h["attention_probs_dropout_prob"]), resid_dropout=drop, embd_dropout=drop,
        init_std=float(h["initializer_range"]), meta=meta)


def config_to_hf(fam: Family, c: ModelConfig, out: dict, lay: encoder.Layout) -> None:
    out["architectures"] = [lay.architectures[c.head]]
    out.update(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
               num_attention_heads=c.n_heads, intermediate_size=c.d_ff, hidden_act=ACT_TO_HF[c.activation],
               max_position_embeddings=c.max_seq_len + c.pos_offset, type_vocab_size=c.type_vocab_size,
               layer_norm_eps=c.norm_eps, hidden_dropout_prob=c.resid_dropout,
               attention_probs_dropout_prob=c.attn_dropout, classifier_dropout=c.head_dropout)
    if c.pos_offset:
        out["pad_token_id"] = c.pos_offset - 1
    encoder.labels_to_hf(c, out)


def blockers(fam: Family, c: ModelConfig, need: Needs, roberta: bool) -> None:
    need_classic_block(c, need, "post")
    need(c.activation in ACT_TO_HF, "activation", f"one of {sorted(ACT_TO_HF)}")
    need(c.qkv_bias and c.o_bias and c.mlp_bias, "qkv_bias", "qkv_bias, o_bias and mlp_bias all True")
    need(c.embed_norm, "embed_norm", "True")
    need(c.type_vocab_size > 0, "type_vocab_size", "> 0 (token-type embeddings)")
    need(c.tie_embeddings, "tie_embeddings", "True (the masked-LM decoder is the word embedding)")
    need(c.query_pre_attn_scalar in (None, c.head_dim), "query_pre_attn_scalar", "None")
    need(c.qk_norm is None, "qk_norm", "None")
    need(c.sliding_window is None and c.attention_chunk_size is None, "sliding_window", "None")
    need(c.attn_softcap is None and c.final_softcap is None, "attn_softcap", "no soft-capping")
    need(not c.embed_scale, "embed_scale", "False")
    need(c.n_experts == 0, "n_experts", "0")
    if roberta:
        need(c.pos_offset >= 1, "pos_offset", ">= 1 (padding_idx + 1)")
        need(c.positions_from_mask, "positions_from_mask", "True (RoBERTa counts real tokens)")
    else:
        need(c.pos_offset == 0, "pos_offset", "0")
        need(not c.positions_from_mask, "positions_from_mask", "False")
    lm = c.head == "lm"
    need(c.head_transform == lm and c.lm_head_bias == lm, "head_transform",
         f"{lm} with lm_head_bias {lm} (the masked-LM head's transform and bias, only on head='lm')")
    need(c.head_dense_bias, "head_dense_bias", "True")
    act = c.head_activation or c.activation
    need(not lm or act == ("gelu" if roberta else c.activation), "head_activation",
         "'gelu'" if roberta else "None (BERT's transform uses hidden_act)")
    need(c.pooler == (c.head == "classify"), "pooler", f"{c.head == 'classify'} (only the classifier reads it)")
    need(c.pooling == ("mean" if c.head == "embed" else "cls") or c.head in ("lm", "token_classify"), "pooling",
         "'mean' for head='embed' (sentence embeddings), 'cls' for head='classify'")


def _family(model_type: str, lay: encoder.Layout, roberta: bool, defaults: dict) -> Family:
    return Family(
        model_type=model_type, architecture=lay.architectures["lm"], defaults=defaults,
        norm_placement="post", final_norm=False, mask="bidirectional", parts=ENCODER_PARTS,
        read_config=partial(config_from_hf, lay=lay, roberta=roberta),
        write_config=partial(config_to_hf, lay=lay), check=partial(blockers, roberta=roberta),
        weight_anchor="embeddings.word_embeddings.weight", top_weights={}, layer_tag="encoder.layer.",
        layer_from_hf=partial(encoder.layer_from_hf, lay), weights_to_hf=partial(encoder.weights_to_hf, lay),
        outer_from_hf=partial(encoder.outer_from_hf, lay),
    )


# transformers 5.23's BertConfig / RobertaConfig defaults
BERT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                     initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, classifier_dropout=None,
                     is_decoder=False, add_cross_attention=False, tie_word_embeddings=True)
BERT = _family("bert", BERT_LAYOUT, False, BERT_DEFAULTS)
ROBERTA = _family("roberta", ROBERTA_LAYOUT, True, dict(BERT_DEFAULTS, vocab_size=50265, pad_token_id=1))
