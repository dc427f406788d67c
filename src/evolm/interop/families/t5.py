"""T5 and T5 v1.1 (Raffel et al. 2019, arXiv:1910.10683) and the Switch Transformer (Fedus et al.
2021, arXiv:2101.03961): transformers' ``t5`` and ``switch_transformers``.

Both are an encoder-decoder of pre-norm blocks with RMSNorm without mean or bias (``T5LayerNorm``),
no biases anywhere, relative position buckets (``pos_emb="relative"``, one table per stack, in
layer 0), unscaled attention scores and a head that is scaled by ``d_model ** -0.5`` when tied
(``scale_decoder_outputs``, which transformers 5 derives from ``tie_word_embeddings``). T5 v1.1
is the same model_type with a gated-GELU MLP (``feed_forward_proj="gated-gelu"``: tanh GELU) and
an untied, unscaled head. Switch replaces the MLP of every ``sparse_step``-th layer (from layer 1)
with top-1 routed experts, a per-sequence ``expert_capacity`` and pooled router losses.
"""

from __future__ import annotations

from typing import Any

from evolm.config import ModelConfig
from evolm.interop.families import seq2seq
from evolm.interop.families.base import Family, Needs
from evolm.interop.families.decoder import ACT_TO_HF, err

COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


def _common(fam: Family, h: dict, meta: dict, activation: str, mlp: str) -> dict[str, Any]:
    # the head is scaled exactly when it is tied in the released checkpoints (T5; not v1.1);
    # transformers 5 writes v1.1 as tie_word_embeddings=true, scale_decoder_outputs=false with its
    # own lm_head.weight, so an unscaled head is read as untied
    scale = bool(h.get("scale_decoder_outputs", h["tie_word_embeddings"] is not False))
    tie = h["tie_word_embeddings"] is not False and scale
    return dict(
        name=f"hf-{fam.model_type}", vocab_size=h["vocab_size"], d_model=h["d_model"], n_heads=h["num_heads"],
        head_dim=h["d_kv"], d_ff=h["d_ff"], encoder_layers=h["num_layers"],
        n_layers=h.get("num_decoder_layers") or h["num_layers"], max_seq_len=int(h.get("n_positions") or 512),
        norm="rmsnorm", norm_eps=float(h["layer_norm_epsilon"]), norm_placement="pre", pos_emb="relative",
        relative_attention_num_buckets=h["relative_attention_num_buckets"],
        relative_attention_max_distance=h["relative_attention_max_distance"], query_pre_attn_scalar=1.0,
        qkv_bias=False, o_bias=False, mlp=mlp, mlp_bias=False, activation=activation, tie_embeddings=tie,
        head_input_scale=scale,
        decoder_start_token_id=int(h.get("decoder_start_token_id") or h.get("pad_token_id") or 0),
        init_std=float(h.get("initializer_factor", 1.0)) * h["d_model"] ** -0.5, meta=meta)


def t5_config_from_hf(fam: Family, h: dict, meta: dict) -> ModelConfig:
    proj = h["feed_forward_proj"]
    gated, act = proj.startswith("gated-"), proj.split("-")[-1]
    activation = "gelu_tanh" if proj == "gated-gelu" else fam.activation(act)
    return ModelConfig(**_common(fam, h, meta, activation, "glu" if gated else "mlp"))


def sparse_step(n_layers: int, n_sparse: int) -> int:
    """transformers' ``encoder_sparse_step``: every step-th layer from layer 1 is sparse."""
    return n_layers // n_sparse if n_sparse > 0 else n_layers


def switch_config_from_hf(fam: Family, h: dict, meta: dict) -> ModelConfig:
    if h.get("router_bias"):
        raise err("router_bias=true (a bias on Switch's router) is not supported")
    kw = _common(fam, h, meta, fam.activation(h["dense_act_fn"]), "mlp")
    enc = sparse_step(kw["encoder_layers"], h["num_sparse_encoder_layers"])
    dec = sparse_step(kw["n_layers"], h["num_sparse_decoder_layers"])
    if enc != dec:
        raise err(f"the encoder's sparse step ({enc}) differs from the decoder's ({dec}); evolm's moe_layer_step "
                  "is one for both stacks")
    kw.update(n_experts=h["num_experts"], n_experts_per_tok=1, norm_topk_prob=False, router="softmax",
              moe_layer_step=dec, moe_first_layer=1 if dec > 1 else 0, expert_capacity=h["expert_capacity"],
              moe_loss_groups="sequence", moe_aux_loss_coef=float(h["router_aux_loss_coef"]),
              moe_z_loss_coef=float(h["router_z_loss_coef"]))
    return ModelConfig(**kw)


def _write_common(c: ModelConfig, out: dict) -> None:
    out.update(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.head_dim, d_ff=c.d_ff, num_heads=c.n_heads,
               num_layers=c.encoder_layers, num_decoder_layers=c.n_layers, layer_norm_epsilon=c.norm_eps,
               relative_attention_num_buckets=c.relative_attention_num_buckets,
               relative_attention_max_distance=c.relative_attention_max_distance, dropout_rate=0.0,
               scale_decoder_outputs=c.head_input_scale, decoder_start_token_id=c.decoder_start_token_id,
               is_encoder_decoder=True, n_positions=c.max_seq_len)
    out["initializer_factor"] = out.pop("initializer_range") / c.d_model ** -0.5


def t5_config_to_hf(fam: Family, c: ModelConfig, out: dict) -> None:
    _write_common(c, out)
    act = ACT_TO_HF[c.activation]
    if c.mlp == "glu":  # transformers reads "gated-gelu" as the tanh GELU (gelu_new)
        act = "gated-gelu" if c.activation == "gelu_tanh" else f"gated-{act}"
    out["feed_forward_proj"] = act


def switch_config_to_hf(fam: Family, c: ModelConfig, out: dict) -> None:
    _write_common(c, out)
    n_sparse = lambda n: sum(c.layer_is_moe(i) for i in range(n))  # noqa: E731
    out.update(dense_act_fn=ACT_TO_HF[c.activation], num_experts=c.n_experts, expert_capacity=c.expert_capacity,
               num_sparse_encoder_layers=n_sparse(c.encoder_layers), num_sparse_decoder_layers=n_sparse(c.n_layers),
               router_aux_loss_coef=c.moe_aux_loss_coef, router_z_loss_coef=c.moe_z_loss_coef,
               router_jitter_noise=0.0, router_bias=False)


def blockers(fam: Family, c: ModelConfig, need: Needs) -> None:
    switch = fam.model_type == "switch_transformers"
    need(c.encoder_layers > 0, "encoder_layers", "> 0 (an encoder-decoder)")
    need(c.norm == "rmsnorm" and not c.norm_unit_offset, "norm", "'rmsnorm' (T5LayerNorm)")
    need(c.norm_placement == "pre", "norm_placement", "'pre'")
    need(c.pos_emb == "relative", "pos_emb", "'relative'")
    need(c.query_pre_attn_scalar == 1.0, "query_pre_attn_scalar", "1.0 (unscaled scores)")
    need(c.n_kv_heads == c.n_heads, "n_kv_heads", "n_heads")
    need(not (c.qkv_bias or c.o_bias or c.mlp_bias), "qkv_bias", "no biases (qkv_bias, o_bias, mlp_bias False)")
    need(not c.embed_scale and c.final_softcap is None and c.attn_softcap is None, "embed_scale",
         "False (and no soft-capping)")
    need(c.sliding_window is None, "sliding_window", "None")
    need(not (c.activation == "gelu" and c.mlp == "glu"), "activation", "'gelu_tanh' for a gated MLP (gated-gelu)")
    if switch:
        need(c.n_experts > 0 and c.n_experts_per_tok == 1 and not c.norm_topk_prob and c.router == "softmax"
             and not c.router_bias and not c.n_shared_experts and c.first_k_dense == 0, "n_experts",
             "top-1 softmax routing (n_experts_per_tok=1, norm_topk_prob=False) without shared experts")
        need(c.mlp == "mlp" and c.moe_d_ff == c.d_ff, "moe_d_ff", "d_ff and mlp='mlp'")
        need(c.expert_capacity is not None, "expert_capacity", "an int")
        need(c.moe_first_layer == (1 if c.moe_layer_step > 1 else 0), "moe_first_layer",
             "1 (0 when every layer is sparse)")
        need(c.moe_loss_groups == "sequence", "moe_loss_groups", "'sequence'")
        need(c.encoder_layers % c.moe_layer_step == 0 and c.n_layers % c.moe_layer_step == 0, "moe_layer_step",
             "to divide encoder_layers and n_layers")
    else:
        need(c.n_experts == 0, "n_experts", "0 (use switch_transformers for experts)")


def _ff_names(c: ModelConfig, switch: bool, moe: bool, H: str, L: str) -> list[tuple[str, Any]]:
    if moe:
        out = [(f"{H}mlp.router.classifier.weight", f"{L}mlp.gate.weight")]
        for e in range(c.n_experts):
            out += [(f"{H}mlp.experts.expert_{e}.wi.weight", (f"{L}mlp.experts.gate_up_proj", e)),
                    (f"{H}mlp.experts.expert_{e}.wo.weight", (f"{L}mlp.experts.down_proj", e))]
        return out
    H += "mlp." if switch else "DenseReluDense."
    ins = [("wi_0", "gate_proj"), ("wi_1", "up_proj")] if c.mlp == "glu" else [("wi", "up_proj")]
    return [(f"{H}{a}.weight", f"{L}mlp.{b}.weight") for a, b in ins + [("wo", "down_proj")]]


def names(c: ModelConfig, switch: bool = False) -> list[tuple[str, Any]]:
    """Every (transformers name, our name) of a T5 / Switch model of config ``c``."""
    out = [("shared.weight", "embed_tokens.weight")]
    if not c.tie_embeddings:
        out.append(("lm_head.weight", "lm_head.weight"))
    for stack, ours, sc in seq2seq.stacks(c):
        out += [(f"{stack}.final_layer_norm.weight", f"{ours}norm.weight"),
                (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                 f"{ours}rel_pos.relative_attention_bias.weight")]
        for i in range(sc.n_layers):
            H, L = f"{stack}.block.{i}.layer.", f"{ours}layers.{i}."
            out += [(f"{H}0.SelfAttention.{x}.weight", f"{L}self_attn.{x}_proj.weight") for x in "qkvo"]
            out.append((f"{H}0.layer_norm.weight", f"{L}attn_norm.weight"))
            ff = 1
            if stack == "decoder":
                out += [(f"{H}1.EncDecAttention.{x}.weight", f"{L}cross_attn.{x}_proj.weight") for x in "qkvo"]
                out.append((f"{H}1.layer_norm.weight", f"{L}cross_norm.weight"))
                ff = 2
            out.append((f"{H}{ff}.layer_norm.weight", f"{L}mlp_norm.weight"))
            out += _ff_names(c, switch, sc.layer_is_moe(i), f"{H}{ff}.", L)
    return out


def _switch_names(c: ModelConfig):
    return names(c, switch=True)


def _weights_from_hf(table):
    def read(fam: Family, sd: dict, c: ModelConfig) -> dict:
        if not c.tie_embeddings and "lm_head.weight" not in sd and "shared.weight" in sd:
            sd = {**sd, "lm_head.weight": sd["shared.weight"]}  # an unscaled head saved as tied
        return seq2seq.weights_from_hf(table, COPIES, sd, c)
    return read


PARTS = frozenset({"encoder_layers", "head_input_scale"})
T5_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                   num_heads=8, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   layer_norm_epsilon=1e-6, initializer_factor=1.0, feed_forward_proj="relu",
                   tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)

T5 = Family(
    model_type="t5", architecture="T5ForConditionalGeneration", defaults=T5_DEFAULTS,
    aliases={"hidden_size": "d_model", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers",
             "head_dim": "d_kv"},
    parts=PARTS, read_config=t5_config_from_hf, write_config=t5_config_to_hf, check=blockers,
    weights_from_hf=_weights_from_hf(names),
    weights_to_hf=lambda fam, sd, c, fused: seq2seq.weights_to_hf(names, sd, c),
)

SWITCH = Family(
    model_type="switch_transformers", architecture="SwitchTransformersForConditionalGeneration",
    defaults=dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, expert_capacity=64, num_layers=12,
                  num_sparse_encoder_layers=3, num_decoder_layers=12, num_sparse_decoder_layers=3, num_heads=12,
                  num_experts=8, router_bias=False, relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, layer_norm_epsilon=1e-6, router_z_loss_coef=0.001,
                  router_aux_loss_coef=0.001, initializer_factor=1.0, dense_act_fn="relu", tie_word_embeddings=True,
                  pad_token_id=0, eos_token_id=1),
    aliases={"hidden_size": "d_model", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers"},
    parts=PARTS | {"moe_layer_step", "moe_first_layer", "expert_capacity", "moe_loss_groups"},
    experts=True, read_config=switch_config_from_hf, write_config=switch_config_to_hf, check=blockers,
    weights_from_hf=_weights_from_hf(_switch_names),
    weights_to_hf=lambda fam, sd, c, fused: seq2seq.weights_to_hf(_switch_names, sd, c),
)
