"""Hugging Face interop: transformers model folders in and out of evolm, exactly.

A Hugging Face folder is a ``config.json`` written in one of a dozen per-family schemas plus
weights in ``*.safetensors`` under that family's module names. This file is the only place in
evolm that knows those schemas:

- ``config_from_hf`` / ``config_to_hf``: a family's config.json <-> one ``ModelConfig``.
  config.json may omit any key whose value is the family's default (transformers writes only
  the differences), so each family's defaults are listed here (``HF_DEFAULTS``) and a test checks
  them against transformers' own config classes.
- ``state_dict_from_hf`` / ``state_dict_to_hf``: rename weights. Our names are Llama's, so for
  most families only the norms move (their names say *where* a norm sits, ours say *what it
  normalises*); GPT-2's fused ``c_attn`` is split and its Conv1D weights transposed; MoE experts
  are stacked into (E, 2F, D) / (E, D, F) tensors, read from either the per-expert layout that
  checkpoints on the Hub use or transformers 5's fused layout.
- ``load_hf_folder`` / ``save_hf_folder``: the file work (sharded safetensors, atomic writes).

Exactness is tested against transformers itself: ``tests/test_parity_hf.py`` (every family, logits
and cached greedy decoding) and ``tests/test_hf_export.py`` (evolm -> folder -> transformers).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from evolm.config import ConfigError, ModelConfig

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma",
                         "gemma2", "gemma3_text", "gemma3", "olmo2", "deepseek_v2", "deepseek_v3")

# the class transformers instantiates for each family's causal LM
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}

# Values transformers assumes when config.json leaves a key out (transformers 5.23 config classes;
# tests/test_parity_hf.py::test_hf_defaults_match_transformers keeps this table honest).
_LLAMA_LIKE = dict(num_key_value_heads=None, head_dim=None, rms_norm_eps=1e-6, tie_word_embeddings=False,
                   attention_dropout=0.0, rope_theta=10000.0)
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_weights=True,
                 scale_attn_by_inverse_layer_idx=False, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                 tie_word_embeddings=True, initializer_range=0.02),
    "llama": dict(_LLAMA_LIKE, hidden_act="silu", attention_bias=False, mlp_bias=False, vocab_size=32000,
                  hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  max_position_embeddings=2048),
    "mistral": dict(_LLAMA_LIKE, hidden_act="silu", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=131072, sliding_window=4096),
    "mixtral": dict(_LLAMA_LIKE, hidden_act="silu", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=131072, rms_norm_eps=1e-5, sliding_window=None,
                    num_experts_per_tok=2, num_local_experts=8, rope_theta=1e6),
    "qwen2": dict(_LLAMA_LIKE, hidden_act="silu", vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28, layer_types=None),
    "qwen3": dict(_LLAMA_LIKE, hidden_act="silu", attention_bias=False, vocab_size=151936, hidden_size=4096,
                  intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  head_dim=128, max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28, layer_types=None),
    "qwen3_moe": dict(_LLAMA_LIKE, hidden_act="silu", attention_bias=False, vocab_size=151936, hidden_size=2048,
                      intermediate_size=6144, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=4,
                      max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                      decoder_sparse_step=1, moe_intermediate_size=768, num_experts_per_tok=8, num_experts=128,
                      norm_topk_prob=False, mlp_only_layers=[]),
    "gemma": dict(_LLAMA_LIKE, hidden_act="gelu_pytorch_tanh", attention_bias=False, vocab_size=256000,
                  hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=16, head_dim=256, max_position_embeddings=8192, tie_word_embeddings=True),
    "gemma2": dict(_LLAMA_LIKE, hidden_activation="gelu_pytorch_tanh", attention_bias=False, vocab_size=256000,
                   hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=256, max_position_embeddings=8192, tie_word_embeddings=True,
                   query_pre_attn_scalar=256, sliding_window=4096, layer_types=None,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(_LLAMA_LIKE, hidden_activation="gelu_pytorch_tanh", attention_bias=False,
                        vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                        tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096, layer_types=None,
                        final_logit_softcapping=None, attn_logit_softcapping=None, rope_theta=1e6,
                        rope_local_base_freq=10000.0, sliding_window_pattern=6),
    "olmo2": dict(_LLAMA_LIKE, hidden_act="silu", attention_bias=False, vocab_size=50304, hidden_size=4096,
                  intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  max_position_embeddings=2048, rms_norm_eps=1e-5),
    "deepseek_v3": dict(_LLAMA_LIKE, hidden_act="silu", attention_bias=False, vocab_size=129280, hidden_size=7168,
                        intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
                        num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
                        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                        v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
                        first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=4096,
                        rope_interleave=True),
    "deepseek_v2": dict(_LLAMA_LIKE, hidden_act="silu", attention_bias=False, vocab_size=102400, hidden_size=4096,
                        intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        max_position_embeddings=2048, mlp_bias=False, first_k_dense_replace=0, kv_lora_rank=512,
                        q_lora_rank=1536, n_group=None, n_routed_experts=64, n_shared_experts=2,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, routed_scaling_factor=1.0, topk_group=None,
                        topk_method="greedy", norm_topk_prob=False, v_head_dim=128, num_experts_per_tok=None,
                        moe_intermediate_size=1407),
}

# other names transformers accepts for a key (its config classes' attribute_map)
_ALIASES = {
    "gpt2": {"hidden_size": "n_embd", "max_position_embeddings": "n_positions", "num_attention_heads": "n_head",
             "num_hidden_layers": "n_layer"},
    "mixtral": {"num_experts": "num_local_experts"},
    "qwen3_moe": {"num_local_experts": "num_experts"},
    "deepseek_v3": {"num_local_experts": "n_routed_experts"},
    "deepseek_v2": {"num_experts": "n_routed_experts"},
}

_ACT_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "silu": "silu",
                "swish": "silu", "relu": "relu"}
_ACT_TO_HF = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "silu": "silu", "relu": "relu"}


def _err(msg: str) -> ConfigError:
    return ConfigError(f"config.json: {msg}")


# =========================================================================================
# config.json -> ModelConfig
# =========================================================================================
def _activation(name: str | None, mt: str) -> str:
    if mt == "gemma" and name == "gelu":  # Gemma 1 configs say "gelu" but mean the tanh approximation
        return "gelu_tanh"
    if name not in _ACT_FROM_HF:
        raise _err(f"activation {name!r} of model_type {mt!r} is not supported; expected one of {sorted(_ACT_FROM_HF)}")
    return _ACT_FROM_HF[name]


def _scaling_from_hf(p: dict, h: dict) -> dict | None:
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
    raise _err(f"rope type {kind!r} is not supported; expected one of default, linear, llama3, yarn")


def _rope_from_hf(h: dict, default_local_theta: float | None = None) -> tuple[dict, dict | None]:
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


def _local_layers(h: dict, mt: str, n_layers: int) -> list[bool] | None:
    """Which layers use the sliding window, from ``layer_types`` or the family's own rule."""
    types = h.get("layer_types")
    if types is None:
        if mt == "gemma2":
            return [(i + 1) % 2 != 0 for i in range(n_layers)]
        if mt == "gemma3_text":
            p = int(h.get("sliding_window_pattern") or 6)
            return [(i + 1) % p != 0 for i in range(n_layers)]
        if mt in ("qwen2", "qwen3"):
            return [i >= h["max_window_layers"] for i in range(n_layers)]
        return [True] * n_layers
    types = [{"attention": "full_attention"}.get(t, t) for t in types]
    bad = sorted(set(types) - {"full_attention", "sliding_attention"})
    if bad:
        raise _err(f"layer_types has {bad}; only 'full_attention' and 'sliding_attention' are supported")
    if len(types) < n_layers:
        raise _err(f"layer_types lists {len(types)} layers but num_hidden_layers is {n_layers}")
    return [t == "sliding_attention" for t in types[:n_layers]]


def _window_pattern(local: list[bool]) -> int | None:
    """Our ``sliding_window_pattern`` (every N-th layer global; 1: all local) for a layer list."""
    n = len(local)
    for p in range(1, n + 1):
        if all(local[i] == (p == 1 or (i + 1) % p != 0) for i in range(n)):
            return p
    return None


def config_from_hf(hf_config: dict) -> ModelConfig:
    """A transformers ``config.json`` (as a dict) -> ``ModelConfig``.

    Raises ``ConfigError`` naming the key when the file asks for something evolm cannot express.
    """
    h = dict(hf_config)
    mt = h.get("model_type")
    if mt == "gemma3":  # the multimodal wrapper: the language model's config is nested
        text = dict(h.get("text_config") or {})
        text.setdefault("tie_word_embeddings", h.get("tie_word_embeddings", True))
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if k in h:
                text.setdefault(k, h[k])
        text["model_type"] = "gemma3_text"
        h, mt = text, "gemma3_text"
    if mt not in HF_DEFAULTS:
        raise _err(f"model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    quant = hf_config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise _err(f"quantization_config (quant_method={method!r}): quantized Hugging Face checkpoints are not "
                   "supported; use the bf16/fp32 weights (or a GGUF file)")
    for alias, key in _ALIASES.get(mt, {}).items():
        if alias in h and key not in h:
            h[key] = h.pop(alias)
    h = {**HF_DEFAULTS[mt], **h}
    meta = {"hf": {k: h.get(k) for k in ("model_type", "bos_token_id", "eos_token_id", "pad_token_id")
                   if h.get(k) is not None}}
    meta["hf"]["model_type"] = mt
    if mt == "gpt2":
        return _gpt2_from_hf(h, meta)

    d, nh = h["hidden_size"], h["num_attention_heads"]
    n_layers = h["num_hidden_layers"]
    kw: dict[str, Any] = dict(
        name=f"hf-{mt}", vocab_size=h["vocab_size"], d_model=d, n_layers=n_layers, n_heads=nh,
        n_kv_heads=h.get("num_key_value_heads") or nh, head_dim=h.get("head_dim") or d // nh,
        d_ff=h["intermediate_size"], max_seq_len=h["max_position_embeddings"],
        norm="rmsnorm", norm_eps=float(h["rms_norm_eps"]), norm_placement="pre",
        pos_emb="rope", mlp="glu", mlp_bias=False, activation=_activation(h.get("hidden_act", "silu"), mt),
        tie_embeddings=bool(h["tie_word_embeddings"]), attn_dropout=float(h.get("attention_dropout") or 0.0),
        init_std=float(h.get("initializer_range", 0.02)), meta=meta)
    ab = bool(h.get("attention_bias"))
    kw.update(qkv_bias=ab, o_bias=ab)

    # --- per family --------------------------------------------------------------------
    if mt == "llama":
        kw["mlp_bias"] = bool(h["mlp_bias"])
    elif mt == "qwen2":
        kw.update(qkv_bias=True, o_bias=False)
    elif mt in ("qwen3", "qwen3_moe"):
        kw["qk_norm"] = "head"
    elif mt == "olmo2":
        kw.update(norm_placement="olmo2", qk_norm="full")
    elif mt in ("gemma", "gemma2", "gemma3_text"):
        kw.update(norm_unit_offset=True, embed_scale=True)
        if mt != "gemma":
            kw.update(activation=_activation(h["hidden_activation"], mt),
                      norm_placement="sandwich", query_pre_attn_scalar=h["query_pre_attn_scalar"],
                      final_softcap=h["final_logit_softcapping"])
        if mt == "gemma2":  # Gemma 3 keeps the key but transformers never applies it
            kw["attn_softcap"] = h["attn_logit_softcapping"]
        if mt == "gemma3_text":
            kw["qk_norm"] = "head"
            if h.get("use_bidirectional_attention"):
                raise _err("use_bidirectional_attention=true (an encoder) is not a causal LM")
    if mt in ("mixtral", "qwen3_moe"):
        E = h["num_local_experts"] if mt == "mixtral" else h["num_experts"]
        kw.update(n_experts=E, n_experts_per_tok=h["num_experts_per_tok"], router="softmax")
        if mt == "mixtral":
            kw.update(moe_d_ff=h["intermediate_size"], norm_topk_prob=True)
        else:
            only = sorted(h.get("mlp_only_layers") or [])
            if h["decoder_sparse_step"] != 1 or only != list(range(len(only))):
                raise _err(f"qwen3_moe with decoder_sparse_step={h['decoder_sparse_step']} and "
                           f"mlp_only_layers={only}: evolm's dense layers must be the first k (first_k_dense)")
            kw.update(moe_d_ff=h["moe_intermediate_size"], norm_topk_prob=bool(h["norm_topk_prob"]),
                      first_k_dense=len(only))
        if h.get("output_router_logits"):
            kw["moe_aux_loss_coef"] = float(h.get("router_aux_loss_coef") or 0.0)
    if mt in ("deepseek_v2", "deepseek_v3"):
        _deepseek_from_hf(h, mt, kw)

    # --- positions ------------------------------------------------------------------------
    glob, loc = _rope_from_hf(h, 10000.0 if mt == "gemma3_text" else None)
    if float(glob.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _err(f"partial_rotary_factor={glob['partial_rotary_factor']} is not supported for {mt}")
    kw.update(rope_theta=float(glob["rope_theta"]), rope_scaling=_scaling_from_hf(glob, h))

    # --- sliding windows --------------------------------------------------------------------
    window = h.get("sliding_window")
    if mt in ("qwen2", "qwen3", "qwen3_moe") and not h.get("use_sliding_window"):
        window = None
    if mt in ("llama", "olmo2", "gemma", "deepseek_v2", "deepseek_v3"):
        window = None
    every_layer = mt in ("mistral", "mixtral", "qwen3_moe")  # one window for all layers
    local = _local_layers(h, mt, n_layers) if window is not None and not every_layer else None
    if local is not None and not any(local):
        window = None
    if window is not None:
        pattern = 1 if every_layer else _window_pattern(local)
        if pattern is None:
            raise _err(f"layer_types {['sliding' if x else 'full' for x in local]} cannot be expressed as "
                       "'every N-th layer global' (ModelConfig.sliding_window_pattern)")
        kw.update(sliding_window=int(window), sliding_window_pattern=pattern)
        if loc is not None:  # per-layer-type rope: the local layers get their own base/scaling
            kw.update(rope_local_theta=float(loc["rope_theta"]), rope_local_scaling=_scaling_from_hf(loc, h))
    return ModelConfig(**kw)


def _gpt2_from_hf(h: dict, meta: dict) -> ModelConfig:
    if h.get("scale_attn_by_inverse_layer_idx"):
        raise _err("scale_attn_by_inverse_layer_idx=true is not supported")
    if h.get("add_cross_attention"):
        raise _err("add_cross_attention=true (an encoder-decoder) is not supported")
    d = h["n_embd"]
    return ModelConfig(
        name="hf-gpt2", vocab_size=h["vocab_size"], d_model=d, n_layers=h["n_layer"], n_heads=h["n_head"],
        d_ff=h.get("n_inner") or 4 * d, max_seq_len=h["n_positions"], norm="layernorm",
        norm_eps=float(h["layer_norm_epsilon"]), norm_bias=True, norm_placement="pre", pos_emb="learned",
        qkv_bias=True, o_bias=True, mlp="mlp", mlp_bias=True, activation=_activation(h["activation_function"], "gpt2"),
        query_pre_attn_scalar=None if h["scale_attn_weights"] else 1.0,
        tie_embeddings=bool(h["tie_word_embeddings"]), attn_dropout=float(h["attn_pdrop"]),
        resid_dropout=float(h["resid_pdrop"]), embd_dropout=float(h["embd_pdrop"]),
        init_std=float(h["initializer_range"]), meta=meta)


def _deepseek_from_hf(h: dict, mt: str, kw: dict) -> None:
    """Multi-head latent attention and DeepSeekMoE (V2: softmax router; V3: sigmoid + bias)."""
    n_layers, d, nh = h["num_hidden_layers"], h["hidden_size"], h["num_attention_heads"]
    kw.update(attention="mla", q_lora_rank=h.get("q_lora_rank"), kv_lora_rank=h["kv_lora_rank"],
              qk_nope_head_dim=h["qk_nope_head_dim"], qk_rope_head_dim=h["qk_rope_head_dim"],
              v_head_dim=h["v_head_dim"], n_kv_heads=h["num_attention_heads"],
              # head_dim is unused by MLA: keep the d_model // n_heads default the presets have
              head_dim=d // nh if d % nh == 0 else h["qk_nope_head_dim"] + h["qk_rope_head_dim"],
              # V2 rotates interleaved pairs as complex numbers; V3 has a switch
              rope_interleave=True if mt == "deepseek_v2" else bool(h.get("rope_interleave", True)))
    if mt == "deepseek_v2":
        kw["mlp_bias"] = bool(h.get("mlp_bias"))
    k_dense = min(int(h.get("first_k_dense_replace") or 0), n_layers)
    E = h.get("n_routed_experts") or 0
    if k_dense >= n_layers or E == 0:
        return  # every layer dense
    kw.update(n_experts=E, n_experts_per_tok=h["num_experts_per_tok"], moe_d_ff=h["moe_intermediate_size"],
              n_shared_experts=h.get("n_shared_experts") or 0, first_k_dense=k_dense,
              routed_scaling_factor=float(h["routed_scaling_factor"]))
    if mt == "deepseek_v3":
        kw.update(router="sigmoid", router_bias=True, norm_topk_prob=bool(h["norm_topk_prob"]),
                  n_expert_groups=h.get("n_group") or 1, topk_groups=h.get("topk_group") or 1)
    else:  # transformers' DeepSeek-V2 router never renormalises the top-k weights
        method = h.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise _err(f"deepseek_v2 topk_method {method!r} is not supported; expected greedy or group_limited_greedy")
        groups = method == "group_limited_greedy"
        kw.update(router="softmax", norm_topk_prob=False, n_expert_groups=h["n_group"] if groups else 1,
                  topk_groups=h["topk_group"] if groups else 1)


# =========================================================================================
# ModelConfig -> config.json
# =========================================================================================
def _differs_locally(c: ModelConfig) -> bool:
    """True if sliding-window layers use a different RoPE from global ones (Gemma 3)."""
    if c.rope_local_theta is None and c.rope_local_scaling is None:
        return False
    return (c.rope_local_theta or c.rope_theta) != c.rope_theta or c.rope_local_scaling != c.rope_scaling


def _blockers(c: ModelConfig, mt: str) -> list[str]:
    """Why family ``mt`` cannot express config ``c`` (empty: it can)."""
    out: list[str] = []

    def need(ok: bool, field: str, want: str) -> None:
        if not ok:
            out.append(f"field '{field}' is {getattr(c, field, None)!r} but {mt} needs {want}")

    mla = mt in ("deepseek_v2", "deepseek_v3")
    need(c.final_norm, "final_norm", "True")
    need(not c.lm_head_bias, "lm_head_bias", "False")
    need(not c.nope_layers, "nope_layers", "()")
    if mt == "gpt2":
        need(c.attention == "mha" and c.n_kv_heads == c.n_heads, "n_kv_heads", "n_heads (multi-head attention)")
        need(c.head_dim * c.n_heads == c.d_model, "head_dim", "d_model // n_heads")
        need(c.norm == "layernorm" and c.norm_bias, "norm", "'layernorm' with norm_bias=True")
        need(c.norm_placement == "pre", "norm_placement", "'pre'")
        need(c.pos_emb == "learned", "pos_emb", "'learned'")
        need(c.mlp == "mlp", "mlp", "'mlp'")
        need(c.qkv_bias and c.o_bias and c.mlp_bias, "qkv_bias", "qkv_bias, o_bias and mlp_bias all True")
        need(c.query_pre_attn_scalar in (None, 1.0, c.head_dim), "query_pre_attn_scalar", "None")
        need(c.qk_norm is None, "qk_norm", "None")
        need(c.sliding_window is None, "sliding_window", "None")
        need(c.attn_softcap is None and c.final_softcap is None, "attn_softcap", "no soft-capping")
        need(not c.embed_scale, "embed_scale", "False")
        need(c.n_experts == 0, "n_experts", "0")
        return out
    need(c.norm == "rmsnorm", "norm", "'rmsnorm'")
    need(c.pos_emb == "rope", "pos_emb", "'rope'")
    need(c.mlp == "glu", "mlp", "'glu'")
    need(c.rotary_pct == 1.0 or mla, "rotary_pct", "1.0")
    need(not c.rope_interleave or mla, "rope_interleave", "False")
    need(c.attention == ("mla" if mla else "mha"), "attention", "'mla'" if mla else "'mha'")
    gemma = mt in ("gemma", "gemma2", "gemma3_text")
    need(c.norm_unit_offset == gemma, "norm_unit_offset", str(gemma))
    need(c.embed_scale == gemma, "embed_scale", str(gemma))
    placement = {"gemma2": "sandwich", "gemma3_text": "sandwich", "olmo2": "olmo2"}.get(mt, "pre")
    need(c.norm_placement == placement, "norm_placement", repr(placement))
    qk = {"qwen3": "head", "qwen3_moe": "head", "gemma3_text": "head", "olmo2": "full"}.get(mt)
    need(c.qk_norm == qk, "qk_norm", repr(qk))
    if mt not in ("gemma2", "gemma3_text"):
        need(c.final_softcap is None, "final_softcap", "None")
        need(c.query_pre_attn_scalar is None or c.query_pre_attn_scalar == (
            c.qk_nope_head_dim + c.qk_rope_head_dim if mla else c.head_dim), "query_pre_attn_scalar", "None")
    need(c.attn_softcap is None or mt == "gemma2", "attn_softcap", "None")
    if mt == "qwen2":
        need(c.qkv_bias and not c.o_bias, "qkv_bias", "q/k/v biases and no o_proj bias")
    elif mt in ("mistral", "mixtral"):
        need(not c.qkv_bias and not c.o_bias, "qkv_bias", "False (and o_bias False)")
    else:
        need(c.qkv_bias == c.o_bias, "o_bias", f"to equal qkv_bias ({c.qkv_bias}): one attention_bias flag")
    need(not c.mlp_bias or mt in ("llama", "deepseek_v2"), "mlp_bias", "False")
    # sliding windows and per-layer rope
    if c.sliding_window is not None:
        if mt in ("mistral", "mixtral", "qwen3_moe"):
            need(c.sliding_window_pattern == 1, "sliding_window_pattern", "1 (every layer local)")
        else:
            need(mt in ("qwen2", "qwen3", "gemma2", "gemma3_text"), "sliding_window", "None")
    need(not _differs_locally(c) or mt == "gemma3_text", "rope_local_theta", "local layers to share the global RoPE")
    # experts
    moe = c.n_experts > 0 and c.first_k_dense < c.n_layers
    if mt in ("mixtral", "qwen3_moe"):
        need(moe, "n_experts", "> 0")
        need(c.router == "softmax", "router", "'softmax'")
        need(c.n_shared_experts == 0, "n_shared_experts", "0")
        need(not c.router_bias, "router_bias", "False")
        need(c.n_expert_groups == 1, "n_expert_groups", "1")
        need(c.routed_scaling_factor == 1.0, "routed_scaling_factor", "1.0")
        if mt == "mixtral":
            need(c.norm_topk_prob, "norm_topk_prob", "True")
            need(c.first_k_dense == 0, "first_k_dense", "0")
    elif mla:
        need(c.norm_eps == 1e-6, "norm_eps", "1e-6 (transformers' latent norms use a fixed eps)")
        if moe:
            need(c.n_shared_experts > 0, "n_shared_experts", ">= 1")
            if mt == "deepseek_v3":
                need(c.router == "sigmoid", "router", "'sigmoid'")
                need(c.n_expert_groups == 1 or c.n_experts // c.n_expert_groups >= 2, "n_expert_groups",
                     "groups of at least 2 experts")
            else:
                need(c.router == "softmax", "router", "'softmax'")
                need(not c.router_bias, "router_bias", "False")
                need(not c.norm_topk_prob, "norm_topk_prob", "False")
                need(c.rope_interleave, "rope_interleave", "True")
    else:
        need(not moe, "n_experts", "0 (a dense model)")
    return out


_EXPORT_ORDER = ("gpt2", "deepseek_v3", "deepseek_v2", "mixtral", "qwen3_moe", "gemma3_text", "gemma2", "gemma",
                 "olmo2", "qwen3", "qwen2", "llama", "mistral")


def hf_family(config: ModelConfig) -> str:
    """The transformers model_type that expresses ``config`` exactly, or a ConfigError saying why none does."""
    reasons = {mt: _blockers(config, mt) for mt in _EXPORT_ORDER}
    for mt in _EXPORT_ORDER:
        if not reasons[mt]:
            return mt
    best = min(_EXPORT_ORDER, key=lambda mt: len(reasons[mt]))
    raise ConfigError(f"ModelConfig '{config.name}' cannot be written as a Hugging Face model: the closest "
                      f"family, {best}, is blocked because " + "; ".join(reasons[best]))


def _scaling_to_hf(theta: float, sc: dict | None) -> dict:
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


def _layer_types(c: ModelConfig) -> list[str]:
    return ["sliding_attention" if c.layer_is_local(i) else "full_attention" for i in range(c.n_layers)]


def config_to_hf(config: ModelConfig, dtype: torch.dtype | None = None, model_type: str | None = None) -> dict:
    """``ModelConfig`` -> a transformers ``config.json`` dict for the family that expresses it.

    ``model_type`` forces a family (a ConfigError names the fields it cannot express).
    """
    c = config
    mt = model_type or hf_family(c)
    blockers = _blockers(c, mt) if mt in _EXPORT_ORDER else [f"model_type {mt!r} is not one of {_EXPORT_ORDER}"]
    if blockers:
        raise ConfigError(f"ModelConfig '{c.name}' cannot be written as {mt}: " + "; ".join(blockers))
    hf_meta = dict(c.meta.get("hf", {})) if isinstance(c.meta, dict) else {}
    out: dict[str, Any] = {"architectures": [ARCHITECTURES[mt]], "model_type": mt}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf_meta.get(k) is not None:
            out[k] = hf_meta[k]
    if dtype is not None:
        out["dtype"] = out["torch_dtype"] = str(dtype).removeprefix("torch.")
    out["tie_word_embeddings"] = c.tie_embeddings
    out["initializer_range"] = c.init_std
    if mt == "gpt2":
        out.update(vocab_size=c.vocab_size, n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads,
                   n_inner=c.d_ff, n_positions=c.max_seq_len, layer_norm_epsilon=c.norm_eps,
                   activation_function={"gelu_tanh": "gelu_new"}.get(c.activation, _ACT_TO_HF[c.activation]),
                   scale_attn_weights=c.query_pre_attn_scalar != 1.0, resid_pdrop=c.resid_dropout,
                   embd_pdrop=c.embd_dropout, attn_pdrop=c.attn_dropout)
        return out
    out.update(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
               num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
               head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
               attention_dropout=c.attn_dropout)
    act = _ACT_TO_HF[c.activation]
    out["hidden_activation" if mt in ("gemma2", "gemma3_text") else "hidden_act"] = act
    if mt not in ("qwen2", "mistral", "mixtral"):
        out["attention_bias"] = c.qkv_bias
    if mt in ("llama", "deepseek_v2"):
        out["mlp_bias"] = c.mlp_bias
    # positions
    glob = _scaling_to_hf(c.rope_theta, c.rope_scaling)
    out["rope_theta"] = c.rope_theta  # read by transformers 4.x
    if c.rope_scaling is not None:
        out["rope_scaling"] = {k: v for k, v in glob.items() if k != "rope_theta"}
    if mt == "gemma3_text":
        local = c.rope_local_theta is not None or c.rope_local_scaling is not None
        loc = _scaling_to_hf(c.rope_local_theta or c.rope_theta, c.rope_local_scaling) if local else glob
        out["rope_parameters"] = {"full_attention": glob, "sliding_attention": loc}
        out["rope_local_base_freq"] = loc["rope_theta"]
    else:
        out["rope_parameters"] = glob
    # family specifics
    if mt in ("gemma2", "gemma3_text"):
        out.update(query_pre_attn_scalar=c.query_pre_attn_scalar or c.head_dim,
                   final_logit_softcapping=c.final_softcap, attn_logit_softcapping=c.attn_softcap)
    window = c.sliding_window
    if mt in ("mistral", "mixtral"):
        out["sliding_window"] = window
    elif mt == "qwen3_moe":
        out.update(use_sliding_window=window is not None, sliding_window=window)
    elif mt in ("qwen2", "qwen3"):
        out.update(use_sliding_window=window is not None, sliding_window=window, layer_types=_layer_types(c),
                   max_window_layers=0 if window is not None and c.sliding_window_pattern == 1 else c.n_layers)
    elif mt in ("gemma2", "gemma3_text"):
        # no window: every layer global (sliding_window must still be an integer there)
        out.update(sliding_window=window or c.max_seq_len, layer_types=_layer_types(c))
        if mt == "gemma3_text" and window is not None:
            out["sliding_window_pattern"] = c.sliding_window_pattern
    if mt == "mixtral":
        out.update(num_local_experts=c.n_experts, num_experts_per_tok=c.n_experts_per_tok,
                   intermediate_size=c.moe_d_ff, output_router_logits=c.moe_aux_loss_coef > 0,
                   router_aux_loss_coef=c.moe_aux_loss_coef)
    elif mt == "qwen3_moe":
        out.update(num_experts=c.n_experts, num_experts_per_tok=c.n_experts_per_tok,
                   moe_intermediate_size=c.moe_d_ff, norm_topk_prob=c.norm_topk_prob, decoder_sparse_step=1,
                   mlp_only_layers=list(range(c.first_k_dense)), output_router_logits=c.moe_aux_loss_coef > 0,
                   router_aux_loss_coef=c.moe_aux_loss_coef)
    elif mt in ("deepseek_v2", "deepseek_v3"):
        moe = c.n_experts > 0 and c.first_k_dense < c.n_layers
        out.update(q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
                   qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, num_key_value_heads=c.n_heads,
                   first_k_dense_replace=c.first_k_dense if moe else c.n_layers,
                   n_routed_experts=c.n_experts if moe else 1, num_experts_per_tok=c.n_experts_per_tok if moe else 1,
                   moe_intermediate_size=c.moe_d_ff, n_shared_experts=c.n_shared_experts if moe else 1,
                   routed_scaling_factor=c.routed_scaling_factor, n_group=c.n_expert_groups if moe else 1,
                   topk_group=c.topk_groups if moe else 1, norm_topk_prob=c.norm_topk_prob)
        out.pop("head_dim")  # transformers derives it (= qk_rope_head_dim)
        if mt == "deepseek_v3":
            out["rope_interleave"] = c.rope_interleave
        else:
            out["topk_method"] = "group_limited_greedy" if c.n_expert_groups > 1 else "greedy"
    return out


# =========================================================================================
# weights
# =========================================================================================
# our norm names <- transformers' per-layer norm names, by where the config puts the norms
_NORMS_FROM_HF = {
    "pre": {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"},
    "sandwich": {"input_layernorm": "attn_norm", "post_attention_layernorm": "attn_out_norm",
                 "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "mlp_out_norm"},
    "olmo2": {"post_attention_layernorm": "attn_out_norm", "post_feedforward_layernorm": "mlp_out_norm"},
}
_GPT2_LAYER = {"ln_1": "attn_norm", "ln_2": "mlp_norm", "attn.c_proj": "self_attn.o_proj",
               "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
# per-expert checkpoint names (the layout on the Hub and what transformers 5 saves by default)
_EXPERT_NAMES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2")}
_EXPERT_DEFAULT = ("mlp", "gate_proj", "up_proj", "down_proj")
_IGNORED = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")  # buffers old checkpoints carry


def _ignored(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq") or name in _IGNORED


def _find_prefix(keys: list[str], anchor: str) -> str:
    cands = [k[: -len(anchor)] for k in keys if k.endswith(anchor) and "layers." not in k and ".h." not in k]
    if not cands:
        raise KeyError(f"no '{anchor}' tensor among the weights; is this a causal LM checkpoint?")
    return min(cands, key=len)


def state_dict_from_hf(sd: dict[str, torch.Tensor], config: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    """transformers weight names -> ours (tensors are not copied unless reshaped).

    Accepts the usual prefixes (``model.``, ``transformer.``, Gemma 3's ``model.language_model.`` /
    ``language_model.model.``), ignores what is not part of the language model (vision towers,
    DeepSeek's multi-token-prediction layers), and raises ``KeyError`` listing any weight of the
    language model it does not know.
    """
    mt = "gemma3_text" if model_type == "gemma3" else model_type
    keys = list(sd)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    if mt == "gpt2":
        p = _find_prefix(keys, "wte.weight")
        top = {"wte.weight": "embed_tokens.weight", "wpe.weight": "pos_embed.weight",
               "ln_f.weight": "norm.weight", "ln_f.bias": "norm.bias"}
        layer_tag = "h."
    else:
        p = _find_prefix(keys, "embed_tokens.weight")
        top = {"embed_tokens.weight": "embed_tokens.weight", "norm.weight": "norm.weight"}
        layer_tag = "layers."
    head = [k for k in keys if k.endswith("lm_head.weight") and "layers." not in k]
    norms = _NORMS_FROM_HF.get(config.norm_placement, {})
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for k in keys:
        if not k.startswith(p) or k in head:
            continue
        rest = k[len(p):]
        if rest in top:
            out[top[rest]] = sd[k]
            continue
        if not rest.startswith(layer_tag):
            if not _ignored(rest):
                unknown.append(k)
            continue
        idx, name = rest[len(layer_tag):].split(".", 1)
        i = int(idx)
        if i >= config.n_layers or _ignored(name):  # e.g. DeepSeek-V3's multi-token-prediction layer 61
            continue
        t = sd[k]
        L = f"layers.{i}."
        if mt == "gpt2":
            mod, _, kind = name.rpartition(".")
            if mod == "attn.c_attn":  # fused q|k|v, Conv1D stores (in, out)
                w = t.t() if kind == "weight" else t
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), w.chunk(3, dim=0)):
                    out[f"{L}self_attn.{part}.{kind}"] = chunk.contiguous()
            elif mod in _GPT2_LAYER:
                is_conv = kind == "weight" and not mod.startswith("ln_")
                out[f"{L}{_GPT2_LAYER[mod]}.{kind}"] = t.t().contiguous() if is_conv else t
            else:
                unknown.append(k)
            continue
        mod, _, kind = name.partition(".")
        if mod in norms and kind in ("weight", "bias"):
            out[f"{L}{norms[mod]}.{kind}"] = t
            continue
        if mod == "block_sparse_moe":  # Mixtral's pre-v5 name for the MoE block
            name = "mlp." + kind
        parts = name.split(".")
        if len(parts) == 5 and parts[1] == "experts" and parts[2].isdigit():  # per-expert tensors
            experts.setdefault((i, parts[3]), {})[int(parts[2])] = t
            continue
        if parts[0] in ("self_attn", "mlp"):
            out[L + name] = t
        else:
            unknown.append(k)
    # stack per-expert weights: gate rows then up rows, like transformers 5's fused layout
    gate_name, up_name, down_name = _EXPERT_NAMES.get(mt, _EXPERT_DEFAULT)[1:]
    for i in sorted({i for i, _ in experts}):
        def stack(n: str) -> torch.Tensor:
            got = experts.get((i, n), {})
            if sorted(got) != list(range(config.n_experts)):
                raise KeyError(f"layer {i}: expected {config.n_experts} '{n}' expert weights, "
                               f"found experts {sorted(got)}")
            return torch.stack([got[e] for e in range(config.n_experts)])
        out[f"layers.{i}.mlp.experts.gate_up_proj"] = torch.cat((stack(gate_name), stack(up_name)), dim=1)
        out[f"layers.{i}.mlp.experts.down_proj"] = stack(down_name)
    if head and not config.tie_embeddings:
        out["lm_head.weight"] = sd[min(head, key=len)]
    if unknown:
        raise KeyError(f"{len(unknown)} weights of the {mt} checkpoint have no place in evolm's model, e.g. "
                       f"{unknown[:5]}")
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], config: ModelConfig, model_type: str | None = None,
                     fused_experts: bool = False) -> dict[str, torch.Tensor]:
    """Our weight names -> transformers' for ``model_type`` (default: ``hf_family(config)``).

    Experts are written per expert (the Hub layout, which transformers 4 and 5 both read);
    ``fused_experts=True`` keeps transformers 5's stacked tensors instead.
    """
    mt = model_type or hf_family(config)
    out: dict[str, torch.Tensor] = {}
    if mt == "gpt2":
        inv = {v: k for k, v in _GPT2_LAYER.items()}
        qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for k, t in sd.items():
            if k.startswith("layers."):
                _, i, rest = k.split(".", 2)
                mod, _, kind = rest.rpartition(".")
                if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                    qkv.setdefault((i, kind), {})[mod.split(".")[1]] = t
                    continue
                is_conv = kind == "weight" and not mod.endswith("norm")
                out[f"transformer.h.{i}.{inv[mod]}.{kind}"] = t.t().contiguous() if is_conv else t
            elif k == "lm_head.weight":
                out[k] = t
            else:
                name = {"embed_tokens.weight": "wte.weight", "pos_embed.weight": "wpe.weight",
                        "norm.weight": "ln_f.weight", "norm.bias": "ln_f.bias"}[k]
                out["transformer." + name] = t
        for (i, kind), parts in qkv.items():
            w = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
            out[f"transformer.h.{i}.attn.c_attn.{kind}"] = w.t().contiguous() if kind == "weight" else w
        return out
    norms = {v: k for k, v in _NORMS_FROM_HF[config.norm_placement].items()}
    block, gate_name, up_name, down_name = _EXPERT_NAMES.get(mt, _EXPERT_DEFAULT)
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
        elif rest.startswith("mlp.gate.") and mt == "mixtral":
            out[L + rest.replace("mlp.", "block_sparse_moe.", 1)] = t
        else:
            out[L + rest] = t
    if mt == "deepseek_v3":  # transformers always has the selection bias (zeros = no bias)
        for i in range(config.n_layers):
            key = f"model.layers.{i}.mlp.gate.weight"
            bias = f"model.layers.{i}.mlp.gate.e_score_correction_bias"
            if key in out and bias not in out:
                out[bias] = torch.zeros(out[key].shape[0], dtype=torch.float32)
    return out


# =========================================================================================
# files
# =========================================================================================
def read_hf_config(path: str | os.PathLike) -> dict:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory (expected a Hugging Face model folder)")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg}: not valid JSON ({e})") from None


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a folder: from the shard index, ``model.safetensors``, or every ``*.safetensors``."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid shard index ({e!r})") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    bins = sorted(p.name for p in folder.glob("*.bin"))
    hint = f" (found {bins}: convert them to safetensors first)" if bins else ""
    raise FileNotFoundError(f"{folder}: no *.safetensors weights{hint}")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{f}: cannot read safetensors file ({e}); the file may be truncated or corrupt") from None
    return sd


def build_from_state_dict(config: ModelConfig, sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                          device: str | torch.device | None = None, source: str = "checkpoint"):
    """A ``Transformer`` holding ``sd`` (our names), built without allocating random weights first."""
    from evolm.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        raise KeyError(f"{source}: weights do not match the config: missing {missing[:5]}"
                       f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    if dtype is not None:
        # keep the router's selection bias in float32 as the references do
        sd = {k: (t.to(dtype) if t.is_floating_point() and not k.endswith("e_score_correction_bias") else t)
              for k, t in sd.items()}
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{source}: weights do not fit the config: {e}") from None
    model.reset_buffers()  # RoPE tables are derived from the config, never stored: float32, on the weights' device
    left = [n for n, b in model.named_buffers() if b.is_meta] + [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"{source}: internal error, tensors left unmaterialised: {left[:5]}")
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_hf_folder(path: str | os.PathLike, dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None):
    """A Hugging Face folder (config.json + safetensors, sharded or not) -> evolm ``Transformer``.

    ``dtype=None`` keeps the checkpoint's dtype. The folder's generation_config.json, if any, is
    kept in ``model.config.meta['generation_config']``.
    """
    folder = Path(path)
    hf = read_hf_config(folder)
    try:
        config = config_from_hf(hf)
    except ConfigError as e:
        raise ConfigError(f"{folder / 'config.json'}: {str(e).removeprefix('config.json: ')}") from None
    config.name = folder.name or config.name
    gen = folder / "generation_config.json"
    if gen.is_file():
        try:
            config.meta["generation_config"] = json.loads(gen.read_text())
        except json.JSONDecodeError:
            pass
    raw = read_safetensors(weight_files(folder))
    try:
        sd = state_dict_from_hf(raw, config, hf.get("model_type"))
    except KeyError as e:
        raise KeyError(f"{folder}: {e.args[0]}") from None
    return build_from_state_dict(config, sd, dtype=dtype, device=device, source=str(folder))


def write_safetensors(sd: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int,
                      prefix: str = "model") -> list[str]:
    """Write ``sd`` as ``{prefix}.safetensors`` or shards plus ``{prefix}.safetensors.index.json``."""
    from safetensors.torch import save_file
    sd = {k: t.detach().contiguous().cpu() for k, t in sd.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        n = sd[k].numel() * sd[k].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(folder / f"{prefix}.safetensors"), metadata={"format": "pt"})
        return [f"{prefix}.safetensors"]
    names = [f"{prefix}-{j + 1:05d}-of-{len(shards):05d}.safetensors" for j in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / f"{prefix}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


def atomic_folder(path: str | os.PathLike, fill) -> Path:
    """Write a folder by filling a temporary sibling, then renaming it into place.

    An existing folder at ``path`` is replaced only once the new one is complete, so a crash never
    leaves it half-overwritten.
    """
    dest = Path(path).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        fill(tmp)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Write tokenizer files with whatever the tokenizer object offers (evolm's or transformers')."""
    if tokenizer is None:
        return
    for method in ("save_hf", "save_pretrained", "save"):
        fn = getattr(tokenizer, method, None)
        if callable(fn):
            fn(str(folder))
            return
    raise TypeError(f"cannot save tokenizer of type {type(tokenizer).__name__}: it has no save_pretrained/save method")


def save_hf_folder(model, path: str | os.PathLike, tokenizer=None, max_shard_size: int = 5 * 2**30,
                   model_type: str | None = None) -> Path:
    """Write ``model`` as a Hugging Face folder that transformers loads with the same logits.

    config.json (the family chosen by ``hf_family`` unless ``model_type`` is given),
    model.safetensors (sharded above ``max_shard_size`` bytes, with an index), generation_config.json
    and, if given, the tokenizer's files. Written atomically.
    """
    c: ModelConfig = model.config
    mt = model_type or hf_family(c)
    sd = dict(model.state_dict())
    dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    hf = config_to_hf(c, dtype=dtype, model_type=mt)
    hf_sd = state_dict_to_hf(sd, c, mt)
    meta = c.meta if isinstance(c.meta, dict) else {}
    ids = {k: v for k, v in (meta.get("hf") or {}).items() if k.endswith("_token_id") and v is not None}
    gen = dict(meta.get("generation_config") or {})
    if tokenizer is not None:  # e.g. a model read from GGUF: its special tokens live in the tokenizer
        for key, attr in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"), ("pad_token_id", "pad_id")):
            v = getattr(tokenizer, attr, None)
            if isinstance(v, int):
                ids.setdefault(key, v)
        stops = getattr(tokenizer, "eos_ids", None)
        if isinstance(stops, list) and len(stops) > 1:  # end-of-turn tokens stop generation too
            gen.setdefault("eos_token_id", stops)
    for k, v in ids.items():
        hf.setdefault(k, v)
        gen.setdefault(k, v)

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))
        write_safetensors(hf_sd, tmp, max_shard_size)
        save_tokenizer(tokenizer, tmp)

    return atomic_folder(path, fill)


__all__ = ["SUPPORTED_MODEL_TYPES", "HF_DEFAULTS", "config_from_hf", "config_to_hf", "hf_family",
           "state_dict_from_hf", "state_dict_to_hf", "load_hf_folder", "save_hf_folder"]
