"""ModernBERT (Warner et al. 2024, arXiv:2412.13663): BERT rebuilt from a decade of decoder parts.

Pre-norm LayerNorms without biases, no biases anywhere, GeGLU MLPs (exact GELU), RoPE instead of a
position table, and attention that alternates: every third layer (0, 3, 6 ...) global, the others
a *bidirectional* local window of ``local_attention`` tokens (a query sees ``local_attention // 2``
each way; ``nn/masks.py``), with RoPE bases of their own (160k global, 10k local). Its embeddings
are the token table alone, LayerNorm-ed; the first layer therefore has no attention norm. A final
norm closes the stack, and every head (masked LM, classifiers) starts with the dense -> GELU ->
LayerNorm transform; the masked-LM decoder is the tied embedding with a bias.

Its config.json comes in two spellings: transformers 5's ``layer_types`` and per-layer-type
``rope_parameters``, and the published files' ``global_attn_every_n_layers``, ``global_rope_theta``
and ``local_rope_theta``; both are read, the first is written. The unpadded (varlen) execution of
the reference is a speed path with the same outputs as the padded one evolm runs.
"""

from __future__ import annotations

from functools import partial

from evolm.config import ModelConfig
from evolm.interop.families import encoder
from evolm.interop.families.base import Family, Needs
from evolm.interop.families.decoder import ACT_TO_HF, err, layer_types, scaling_from_hf, scaling_to_hf

LAYOUT = encoder.Layout(
    base="model",
    architectures={"lm": "ModernBertForMaskedLM", "classify": "ModernBertForSequenceClassification",
                   "token_classify": "ModernBertForTokenClassification", "embed": "ModernBertModel"},
    top={"embeddings.tok_embeddings": "embed_tokens", "embeddings.norm": "embed_norm", "final_norm": "norm"},
    layer={"attn.Wo": "self_attn.o_proj", "mlp.Wo": "mlp.down_proj", "attn_norm": "attn_norm", "mlp_norm": "mlp_norm"},
    # GeGLU: transformers' Wi holds (input, gate) and computes act(input) * gate; ours act(gate_proj) * up_proj
    fused={"attn.Wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "mlp.Wi": ("mlp.gate_proj", "mlp.up_proj")},
    head={"head.dense": "head.dense", "head.norm": "head.norm", "decoder": "head", "classifier": "head.classifier"},
    unused=("decoder.weight",),
)
PARTS = frozenset({"embed_norm", "lm_head_bias", "head", "head_transform", "first_attn_norm", "global_layer_first"})


def _layers(h: dict, n: int) -> list[bool]:
    """Which layers are local: ``layer_types``, else every ``global_attn_every_n_layers``-th from 0 global."""
    types = h.get("layer_types")
    if types is None:
        every = h.get("global_attn_every_n_layers", 3)
        return [i % every != 0 for i in range(n)]
    bad = sorted(set(types) - {"full_attention", "sliding_attention"})
    if bad or len(types) < n:
        raise err(f"layer_types {types} must list {n} of 'full_attention' / 'sliding_attention'")
    return [t == "sliding_attention" for t in types[:n]]


def _pattern(local: list[bool]) -> int | None:
    """Our sliding_window_pattern p for global layers at 0, p, 2p ... (global_layer_first)."""
    for p in range(2, len(local) + 1):
        if all(local[i] == (i % p != 0) for i in range(len(local))):
            return p
    return None


def config_from_hf(fam: Family, h: dict, meta: dict) -> ModelConfig:
    d, nh, n = h["hidden_size"], h["num_attention_heads"], h["num_hidden_layers"]
    head = LAYOUT.head_of(h)
    if not h["tie_word_embeddings"]:
        raise err("tie_word_embeddings=false is not supported (the masked-LM decoder is the word embedding)")
    params = h.get("rope_parameters") or {}
    glob = dict(params.get("full_attention") or {})
    loc = dict(params.get("sliding_attention") or {})
    glob.setdefault("rope_theta", h.get("global_rope_theta", 160000.0))
    loc.setdefault("rope_theta", h.get("local_rope_theta", 10000.0))
    local = _layers(h, n)
    kw: dict = {}
    if any(local):
        pattern = 1 if all(local) else _pattern(local)
        if pattern is None:
            raise err(f"layer_types {['sliding' if x else 'full' for x in local]} cannot be expressed as "
                      "'every N-th layer global, from layer 0' (sliding_window_pattern, global_layer_first)")
        kw.update(sliding_window=int(h["local_attention"]), sliding_window_pattern=pattern, global_layer_first=True,
                  rope_local_theta=float(loc["rope_theta"]), rope_local_scaling=scaling_from_hf(loc, h))
    if isinstance(h.get("id2label"), dict):
        meta["hf"]["id2label"] = h["id2label"]
    meta["hf"].update({k: h[k] for k in ("cls_token_id", "sep_token_id") if h.get(k) is not None})
    act = fam.activation(h["hidden_activation"])
    head_act = fam.activation(h["classifier_activation"])
    return ModelConfig(
        name="hf-modernbert", vocab_size=h["vocab_size"], d_model=d, n_layers=n, n_heads=nh, d_ff=h["intermediate_size"],
        max_seq_len=h["max_position_embeddings"], norm="layernorm", norm_eps=float(h["norm_eps"]),
        norm_bias=bool(h["norm_bias"]), norm_placement="pre", first_attn_norm=False, pos_emb="rope",
        rope_theta=float(glob["rope_theta"]), rope_scaling=scaling_from_hf(glob, h),
        qkv_bias=bool(h["attention_bias"]), o_bias=bool(h["attention_bias"]), mlp="glu", mlp_bias=bool(h["mlp_bias"]),
        activation=act, mask="bidirectional", embed_norm=True, tie_embeddings=True, head=head,
        head_transform=head != "embed", head_activation=None if head_act == act else head_act,
        head_dense_bias=bool(h["classifier_bias"]), lm_head_bias=head == "lm" and bool(h["decoder_bias"]),
        pooling=h["classifier_pooling"], num_labels=encoder.num_labels(h),
        head_dropout=float(h["classifier_dropout"]), attn_dropout=float(h["attention_dropout"]),
        embd_dropout=float(h["embedding_dropout"]), init_std=float(h["initializer_range"]), meta=meta, **kw)


def config_to_hf(fam: Family, c: ModelConfig, out: dict) -> None:
    out["architectures"] = [LAYOUT.architectures[c.head]]
    glob = scaling_to_hf(c.rope_theta, c.rope_scaling)
    local = scaling_to_hf(c.rope_local_theta or c.rope_theta, c.rope_local_scaling) \
        if c.sliding_window is not None else scaling_to_hf(10000.0, None)
    out.update(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
               num_attention_heads=c.n_heads, intermediate_size=c.d_ff, max_position_embeddings=c.max_seq_len,
               norm_eps=c.norm_eps, norm_bias=c.norm_bias, attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias,
               hidden_activation=ACT_TO_HF[c.activation],
               classifier_activation=ACT_TO_HF[c.head_activation or c.activation], classifier_bias=c.head_dense_bias,
               decoder_bias=c.lm_head_bias or c.head != "lm", classifier_pooling=c.pooling,
               classifier_dropout=c.head_dropout, attention_dropout=c.attn_dropout, embedding_dropout=c.embd_dropout,
               layer_types=layer_types(c), local_attention=c.sliding_window or 128,
               rope_parameters={"full_attention": glob, "sliding_attention": local})
    encoder.labels_to_hf(c, out)
    ids = (c.meta.get("hf") or {}) if isinstance(c.meta, dict) else {}
    for k in TOKEN_IDS:  # unset, transformers would fill in ModernBERT's own (50281 ..), past a small vocabulary
        out.setdefault(k, ids.get(k))


TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id")


def blockers(fam: Family, c: ModelConfig, need: Needs) -> None:
    need(c.attention == "mha" and c.n_kv_heads == c.n_heads, "n_kv_heads", "n_heads (multi-head attention)")
    need(c.head_dim * c.n_heads == c.d_model, "head_dim", "d_model // n_heads")
    need(c.norm == "layernorm", "norm", "'layernorm'")
    need(c.norm_placement == "pre" and not c.first_attn_norm, "norm_placement",
         "'pre' with first_attn_norm=False")
    need(c.pos_emb == "rope" and c.rotary_pct == 1.0 and not c.rope_interleave, "pos_emb",
         "'rope' over whole heads, rotating halves")
    need(c.mlp == "glu", "mlp", "'glu' (GeGLU)")
    need(c.activation in ACT_TO_HF and (c.head_activation or c.activation) in ACT_TO_HF, "activation",
         f"one of {sorted(ACT_TO_HF)}")
    need(c.qkv_bias == c.o_bias, "o_bias", f"to equal qkv_bias ({c.qkv_bias}): one attention_bias flag")
    need(c.embed_norm, "embed_norm", "True")
    need(c.tie_embeddings, "tie_embeddings", "True (the masked-LM decoder is the word embedding)")
    need(c.query_pre_attn_scalar in (None, c.head_dim), "query_pre_attn_scalar", "None")
    need(c.qk_norm is None, "qk_norm", "None")
    need(c.attention_chunk_size is None and not c.nope_layers, "attention_chunk_size", "None")
    if c.sliding_window is not None:
        need(c.global_layer_first or c.sliding_window_pattern == 1, "global_layer_first",
             "True (global layers at 0, N, 2N ...)")
    need(c.attn_softcap is None and c.final_softcap is None, "attn_softcap", "no soft-capping")
    need(not c.embed_scale and not c.norm_unit_offset, "embed_scale", "False")
    need(c.n_experts == 0, "n_experts", "0")
    need(c.head_transform == (c.head != "embed"), "head_transform",
         f"{c.head != 'embed'} (every ModernBERT head starts with its transform)")
    need(not c.lm_head_bias or c.head == "lm", "lm_head_bias", "False outside head='lm'")
    need(not c.pooler, "pooler", "False (ModernBERT's classifier reads its transform)")


MODERNBERT = Family(
    model_type="modernbert", architecture="ModernBertForMaskedLM",
    # transformers 5.23's ModernBertConfig defaults
    defaults=dict(vocab_size=50368, hidden_size=768, intermediate_size=1152, num_hidden_layers=22,
                  num_attention_heads=12, hidden_activation="gelu", max_position_embeddings=8192,
                  initializer_range=0.02, norm_eps=1e-5, norm_bias=False, attention_bias=False,
                  attention_dropout=0.0, local_attention=128, embedding_dropout=0.0, mlp_bias=False,
                  decoder_bias=True, classifier_pooling="cls", classifier_dropout=0.0, classifier_bias=False,
                  classifier_activation="gelu", tie_word_embeddings=True, pad_token_id=50283, bos_token_id=50281,
                  eos_token_id=50282, cls_token_id=50281, sep_token_id=50282),
    final_norm=True, mask="bidirectional", parts=PARTS, activation_key="hidden_activation",
    read_config=config_from_hf, write_config=config_to_hf, check=blockers,
    weight_anchor="embeddings.tok_embeddings.weight", top_weights={}, layer_tag="layers.",
    layer_from_hf=partial(encoder.layer_from_hf, LAYOUT), weights_to_hf=partial(encoder.weights_to_hf, LAYOUT),
    outer_from_hf=partial(encoder.outer_from_hf, LAYOUT),
)
