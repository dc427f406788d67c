"""The Llama decoder schema that every family but GPT-2 shares, applied from a family's fields.

transformers' decoder families all write one config.json layout (``hidden_size``,
``num_key_value_heads``, ``rope_parameters``, ...) and one weight layout (``model.layers.{i}.
self_attn.q_proj`` ...); they differ in a few switches (where the norms sit, Q/K norms, biases,
sliding windows) and in their MoE keys. This module reads and writes that layout once; a family
(``base.Family``) says which switches it flips and adds its own keys through hooks.

Our weight names are Llama's, so for most families only the norms move (their names say *where*
a norm sits, ours say *what it normalises*); MoE experts are stacked into (E, 2F, D) / (E, D, F)
tensors, read from either the per-expert layout that checkpoints on the Hub use or transformers
5's fused layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from evolm.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from evolm.interop.families.base import Family, Needs

ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "silu": "silu",
               "swish": "silu", "relu": "relu"}
ACT_TO_HF = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "silu": "silu", "relu": "relu"}


def err(msg: str) -> ConfigError:
    return ConfigError(f"config.json: {msg}")


def activation(name: str | None, model_type: str) -> str:
    if name not in ACT_FROM_HF:
        raise err(f"activation {name!r} of model_type {model_type!r} is not supported; "
                  f"expected one of {sorted(ACT_FROM_HF)}")
    return ACT_FROM_HF[name]


# =========================================================================================
# positions and windows
# =========================================================================================
def scaling_from_hf(p: dict, h: dict) -> dict | None:
    """One HF rope-parameters dict -> our ``rope_scaling`` dict (None for plain RoPE)."""
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default":
        return None
    # transformers lets a top-level original_max_position_embeddings win over the dict's own
    old = h.get("original_max_position_embeddings") or p.get("original_max_position_embeddings") \
        or h.get("max_position_embeddings")
    if kind == "linear":
        return {"type": "linear", "factor": float(p["factor"])}
    if kind == "llama3":
        return {"type": "llama3", "factor": float(p["factor"]), "original_max_seq_len": int(old),
                "low_freq_factor": float(p["low_freq_factor"]), "high_freq_factor": float(p["high_freq_factor"])}
    if kind == "yarn":
        factor = p.get("factor")
        if factor is None:
            factor = h["max_position_embeddings"] / old
        sc: dict[str, Any] = {"type": "yarn", "factor": float(factor), "original_max_seq_len": int(old)}
        for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"):
            if p.get(k) is not None:
                sc[k] = p[k]
        return sc
    raise err(f"rope type {kind!r} is not supported; expected one of default, linear, llama3, yarn")


def rope_from_hf(h: dict, default_local_theta: float | None = None) -> tuple[dict, dict | None]:
    """(global, local) rope-parameter dicts, each with ``rope_theta``; local is None unless per layer type.

    transformers 5 writes ``rope_parameters`` (flat, or per layer type for Gemma 3:
    ``{"full_attention": {...}, "sliding_attention": {...}}``); older files write ``rope_theta`` and
    ``rope_scaling`` (and Gemma 3 ``rope_local_base_freq``).
    """
    params = h.get("rope_parameters")
    if isinstance(params, dict) and ({"full_attention", "sliding_attention"} & set(params)):
        g = dict(params.get("full_attention") or {})
        loc = dict(params.get("sliding_attention") or {})
        g.setdefault("rope_theta", h["rope_theta"])
        loc.setdefault("rope_theta", h.get("rope_local_base_freq", default_local_theta or g["rope_theta"]))
        return g, loc
    g = dict(h.get("rope_scaling") or params or {})
    g.setdefault("rope_theta", h["rope_theta"])
    if "partial_rotary_factor" in h and "partial_rotary_factor" not in g:
        g["partial_rotary_factor"] = h["partial_rotary_factor"]
    loc = None
    if default_local_theta is not None:  # Gemma 3's old-style keys: the local layers are never scaled
        loc = {"rope_theta": h.get("rope_local_base_freq", default_local_theta)}
    return g, loc


def scaling_to_hf(theta: float, sc: dict | None) -> dict:
    p: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if sc is None:
        return p
    p["rope_type"] = sc["type"]
    for k, v in sc.items():
        if k == "original_max_seq_len":
            p["original_max_position_embeddings"] = v
        elif k != "type":
            p[k] = v
    return p


def local_layers(h: dict, fam: Family, n_layers: int) -> list[bool]:
    """Which layers use the sliding window, from ``layer_types`` or the family's own rule."""
    types = h.get("layer_types")
    if types is None:
        return fam.local_layers(h, n_layers) if fam.local_layers else [True] * n_layers
    types = [{"attention": "full_attention"}.get(t, t) for t in types]
    bad = sorted(set(types) - {"full_attention", "sliding_attention"})
    if bad:
        raise err(f"layer_types has {bad}; only 'full_attention' and 'sliding_attention' are supported")
    if len(types) < n_layers:
        raise err(f"layer_types lists {len(types)} layers but num_hidden_layers is {n_layers}")
    return [t == "sliding_attention" for t in types[:n_layers]]


def window_pattern(local: list[bool]) -> int | None:
    """Our ``sliding_window_pattern`` (every N-th layer global; 1: all local) for a layer list."""
    n = len(local)
    for p in range(1, n + 1):
        if all(local[i] == (p == 1 or (i + 1) % p != 0) for i in range(n)):
            return p
    return None


def layer_types(c: ModelConfig) -> list[str]:
    return ["sliding_attention" if c.layer_is_local(i) else "full_attention" for i in range(c.n_layers)]


def differs_locally(c: ModelConfig) -> bool:
    """True if sliding-window layers use a different RoPE from global ones (Gemma 3)."""
    if c.rope_local_theta is None and c.rope_local_scaling is None:
        return False
    return (c.rope_local_theta or c.rope_theta) != c.rope_theta or c.rope_local_scaling != c.rope_scaling


def has_moe(c: ModelConfig) -> bool:
    return c.n_experts > 0 and c.first_k_dense < c.n_layers


# =========================================================================================
# config.json <-> ModelConfig
# =========================================================================================
def config_from_hf(fam: Family, h: dict, meta: dict) -> ModelConfig:
    """A decoder family's config.json (defaults filled in) -> ``ModelConfig``."""
    mt = fam.model_type
    d, nh, n_layers = h["hidden_size"], h["num_attention_heads"], h["num_hidden_layers"]
    ab = bool(h.get("attention_bias"))
    kw: dict[str, Any] = dict(
        name=f"hf-{mt}", vocab_size=h["vocab_size"], d_model=d, n_layers=n_layers, n_heads=nh,
        n_kv_heads=h.get("num_key_value_heads") or nh, head_dim=h.get("head_dim") or d // nh,
        d_ff=h["intermediate_size"], max_seq_len=h["max_position_embeddings"],
        norm="rmsnorm", norm_eps=float(h["rms_norm_eps"]), norm_placement=fam.norm_placement,
        qk_norm=fam.qk_norm if fam.qk_norm_flag is None or h.get(fam.qk_norm_flag) else None,
        pos_emb="rope", rope_interleave=fam.rope_interleave,
        mlp="glu", mlp_bias=bool(h.get("mlp_bias")) if fam.mlp_bias_key else False,
        activation=fam.activation(h.get(fam.activation_key, "silu")),
        qkv_bias=ab or fam.attention_bias == "qkv", o_bias=ab and fam.attention_bias != "qkv",
        tie_embeddings=bool(h["tie_word_embeddings"]), attn_dropout=float(h.get("attention_dropout") or 0.0),
        init_std=float(h.get("initializer_range", 0.02)), meta=meta)
    if fam.unit_offset_norms:
        kw.update(norm_unit_offset=True, embed_scale=True)
    if fam.from_hf:
        fam.from_hf(h, kw)
    glob, loc = rope_from_hf(h, fam.local_rope_theta)
    if float(glob.get("partial_rotary_factor", 1.0)) != 1.0:
        raise err(f"partial_rotary_factor={glob['partial_rotary_factor']} is not supported for {mt}")
    kw.update(rope_theta=float(glob["rope_theta"]), rope_scaling=scaling_from_hf(glob, h))
    _window_from_hf(fam, h, kw, loc)
    return ModelConfig(**kw)


def _window_from_hf(fam: Family, h: dict, kw: dict, loc: dict | None) -> None:
    window = h.get("sliding_window")
    if fam.window == "none" or (fam.window_switch and not h.get(fam.window_switch)):
        window = None
    every_layer = fam.window == "every_layer"
    local = local_layers(h, fam, kw["n_layers"]) if window is not None and not every_layer else None
    if local is not None and not any(local):
        window = None
    if window is None:
        return
    pattern = 1 if every_layer else window_pattern(local)
    if pattern is None:
        raise err(f"layer_types {['sliding' if x else 'full' for x in local]} cannot be expressed as "
                  "'every N-th layer global' (ModelConfig.sliding_window_pattern)")
    kw.update(sliding_window=int(window), sliding_window_pattern=pattern)
    if loc is not None:  # per-layer-type rope: the local layers get their own base/scaling
        kw.update(rope_local_theta=float(loc["rope_theta"]), rope_local_scaling=scaling_from_hf(loc, h))


def config_to_hf(fam: Family, c: ModelConfig, out: dict) -> None:
    """Fill ``out`` (already holding the keys every family writes) with the decoder's keys."""
    out.update(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
               num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
               head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
               attention_dropout=c.attn_dropout)
    out[fam.activation_key] = ACT_TO_HF[c.activation]
    if fam.attention_bias == "flag":
        out["attention_bias"] = c.qkv_bias
    if fam.mlp_bias_key:
        out["mlp_bias"] = c.mlp_bias
    if fam.qk_norm_flag:
        out[fam.qk_norm_flag] = c.qk_norm is not None
    glob = scaling_to_hf(c.rope_theta, c.rope_scaling)
    out["rope_theta"] = c.rope_theta  # read by transformers 4.x
    if c.rope_scaling is not None:
        out["rope_scaling"] = {k: v for k, v in glob.items() if k != "rope_theta"}
    if fam.local_rope_theta is not None:  # per layer type
        local = c.rope_local_theta is not None or c.rope_local_scaling is not None
        loc = scaling_to_hf(c.rope_local_theta or c.rope_theta, c.rope_local_scaling) if local else glob
        out["rope_parameters"] = {"full_attention": glob, "sliding_attention": loc}
        out["rope_local_base_freq"] = loc["rope_theta"]
    else:
        out["rope_parameters"] = glob
    if fam.to_hf:
        fam.to_hf(c, out)


def blockers(fam: Family, c: ModelConfig, need: Needs) -> None:
    """What of ``c`` the decoder schema, with ``fam``'s switches, cannot write."""
    mla = fam.attention == "mla"
    need(c.norm == "rmsnorm", "norm", "'rmsnorm'")
    need(c.pos_emb == "rope", "pos_emb", "'rope'")
    need(c.mlp == "glu", "mlp", "'glu'")
    need(c.rotary_pct == 1.0 or mla, "rotary_pct", "1.0")
    need(c.rope_interleave == fam.rope_interleave or mla, "rope_interleave", str(fam.rope_interleave))
    need(c.attention == fam.attention, "attention", repr(fam.attention))
    need(c.norm_unit_offset == fam.unit_offset_norms, "norm_unit_offset", str(fam.unit_offset_norms))
    need(c.embed_scale == fam.unit_offset_norms, "embed_scale", str(fam.unit_offset_norms))
    need(c.norm_placement == fam.norm_placement, "norm_placement", repr(fam.norm_placement))
    need(c.qk_norm == fam.qk_norm or (fam.qk_norm_flag is not None and c.qk_norm is None), "qk_norm",
         repr(fam.qk_norm) + (" or None" if fam.qk_norm_flag else ""))
    if not fam.query_scalar:
        need(c.final_softcap is None, "final_softcap", "None")
        need(c.query_pre_attn_scalar is None or c.query_pre_attn_scalar == (
            c.qk_nope_head_dim + c.qk_rope_head_dim if mla else c.head_dim), "query_pre_attn_scalar", "None")
    need(c.attn_softcap is None or fam.attn_softcap, "attn_softcap", "None")
    if fam.attention_bias == "qkv":
        need(c.qkv_bias and not c.o_bias, "qkv_bias", "q/k/v biases and no o_proj bias")
    elif fam.attention_bias == "none":
        need(not c.qkv_bias and not c.o_bias, "qkv_bias", "False (and o_bias False)")
    else:
        need(c.qkv_bias == c.o_bias, "o_bias", f"to equal qkv_bias ({c.qkv_bias}): one attention_bias flag")
    need(not c.mlp_bias or fam.mlp_bias_key, "mlp_bias", "False")
    if c.sliding_window is not None:
        if fam.window == "every_layer":
            need(c.sliding_window_pattern == 1, "sliding_window_pattern", "1 (every layer local)")
        else:
            need(fam.window == "per_layer", "sliding_window", "None")
    need(not differs_locally(c) or fam.local_rope_theta is not None, "rope_local_theta",
         "local layers to share the global RoPE")
    if fam.blockers:
        fam.blockers(c, need)
    need(c.mtp_depth == 0 or fam.mtp, "mtp_depth", "0 (no multi-token prediction modules)")
    if not fam.experts:
        need(not has_moe(c), "n_experts", "0 (a dense model)")


# =========================================================================================
# weights
# =========================================================================================
TOP_WEIGHTS = {"embed_tokens.weight": "embed_tokens.weight", "norm.weight": "norm.weight"}
# our norm names <- transformers' per-layer norm names, by where the config puts the norms
NORMS_FROM_HF = {
    "pre": {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"},
    "sandwich": {"input_layernorm": "attn_norm", "post_attention_layernorm": "attn_out_norm",
                 "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "mlp_out_norm"},
    "olmo2": {"post_attention_layernorm": "attn_out_norm", "post_feedforward_layernorm": "mlp_out_norm"},
}


def layer_from_hf(fam: Family, config: ModelConfig, name: str, t: torch.Tensor, i: int, out: dict,
                  experts: dict) -> bool:
    """Place one layer tensor (``name`` below ``layers.{i}.``); False if it has no place."""
    L = f"layers.{i}."
    mod, _, kind = name.partition(".")
    norms = NORMS_FROM_HF.get(config.norm_placement, {})
    if mod in norms and kind in ("weight", "bias"):
        out[f"{L}{norms[mod]}.{kind}"] = t
        return True
    if mod == fam.expert_names[0]:  # e.g. Mixtral's pre-v5 name for the MoE block
        name = "mlp." + kind
    parts = name.split(".")
    if len(parts) == 5 and parts[1] == "experts" and parts[2].isdigit():  # per-expert tensors
        experts.setdefault((i, parts[3]), {})[int(parts[2])] = t
        return True
    if parts[0] in ("self_attn", "mlp"):
        out[L + name] = t
        return True
    return False


def stack_experts(fam: Family, config: ModelConfig, experts: dict, out: dict) -> None:
    """Per-expert weights -> gate rows then up rows, like transformers 5's fused layout."""
    gate_name, up_name, down_name = fam.expert_names[1:]
    for i in sorted({i for i, _ in experts}):
        def stack(n: str) -> torch.Tensor:
            got = experts.get((i, n), {})
            if sorted(got) != list(range(config.n_experts)):
                raise KeyError(f"layer {i}: expected {config.n_experts} '{n}' expert weights, "
                               f"found experts {sorted(got)}")
            return torch.stack([got[e] for e in range(config.n_experts)])
        out[f"layers.{i}.mlp.experts.gate_up_proj"] = torch.cat((stack(gate_name), stack(up_name)), dim=1)
        out[f"layers.{i}.mlp.experts.down_proj"] = stack(down_name)


def weights_to_hf(fam: Family, sd: dict[str, torch.Tensor], config: ModelConfig,
                  fused_experts: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    norms = {v: k for k, v in NORMS_FROM_HF[config.norm_placement].items()}
    block, gate_name, up_name, down_name = fam.expert_names
    for k, t in sd.items():
        if not k.startswith("layers."):
            out[k if k == "lm_head.weight" else "model." + k] = t
            continue
        _, i, rest = k.split(".", 2)
        L = f"model.layers.{i}."
        mod, _, kind = rest.partition(".")
        if mod in norms:
            out[L + norms[mod] + "." + kind] = t
        elif rest.startswith("mlp.experts.") and not fused_experts:
            F = config.moe_d_ff
            for e in range(t.shape[0]):
                E = f"{L}{block}.experts.{e}."
                if rest.endswith("gate_up_proj"):
                    out[E + gate_name + ".weight"] = t[e, :F].contiguous()
                    out[E + up_name + ".weight"] = t[e, F:].contiguous()
                else:
                    out[E + down_name + ".weight"] = t[e].contiguous()
        elif rest.startswith("mlp.gate.") and block != "mlp":
            out[L + rest.replace("mlp.", block + ".", 1)] = t
        else:
            out[L + rest] = t
    if fam.finish_weights_to_hf:
        fam.finish_weights_to_hf(out, config)
    return out


# =========================================================================================
# GGUF: llama.cpp's expert keys, shared by the families whose files carry experts
# =========================================================================================
def gguf_moe_fields(get) -> dict[str, Any]:
    n = get("expert_count", 0)
    if not n:
        return {}
    out = dict(n_experts=n, n_experts_per_tok=get("expert_used_count"), norm_topk_prob=True)
    width = get("expert_feed_forward_length", None)
    if width:
        out["moe_d_ff"] = width
    return out


def text_config(h: dict, model_type: str, tie_default: bool) -> dict:
    """A multimodal wrapper's config.json (Gemma 3, Llama 4) -> its language model's config: the
    nested ``text_config``, with the wrapper's token ids and head tying where the text part has none."""
    text = dict(h.get("text_config") or {})
    text.setdefault("tie_word_embeddings", h.get("tie_word_embeddings", tie_default))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in h:
            text.setdefault(k, h[k])
    text["model_type"] = model_type
    return text
