"""Write an evolm model as a GGUF file that llama.cpp (and Ollama, LM Studio, transformers) runs.

The inverse of ``interop/gguf.py``, with the same conventions llama.cpp's ``convert_hf_to_gguf.py``
applies to a Hugging Face checkpoint:

* hyper-parameters under ``{arch}.*`` (``general.architecture`` is llama.cpp's name for the
  family that expresses the config: ``llama`` (Mixtral's experts included), ``qwen2``, ``qwen3``,
  ``qwen3moe``, ``gemma2``, ``gemma3``, ``olmo2``, ``deepseek2``, ``gpt2``, ``falcon``, ``mamba``);
* tensors renamed to llama.cpp's (``blk.{i}.attn_q.weight`` ...), Llama-architecture Q/K rows
  permuted for its interleaved RoPE, Gemma's RMSNorm weights stored as ``1 + w``, a Llama 3
  RoPE scaling written as the ``rope_freqs`` tensor of per-frequency divisors, experts as
  stacked ``ffn_{gate,up,down}_exps``, MLA's kv_b split into ``attn_k_b`` / ``attn_v_b`` (the
  absorbed form llama.cpp runs), GPT-2's and Falcon's q|k|v fused into ``attn_qkv`` (all q rows, all
  k, all v: the layout llama.cpp's converter gives Falcon's per-group ``query_key_value``), Mamba's
  ``A_log`` stored as ``ssm_a = -exp(A_log)`` and its convolution filters squeezed to 2-D (kept float32);
* the vocabulary under ``tokenizer.ggml.*`` (``gguf_vocab_export.py``).

The file is written by the ``gguf`` package's ``GGUFWriter``; quantized types come from its
reference quantizers (``gguf.quants.quantize``: bit-identical to llama.cpp's), the k-quants
(Q4_K, Q5_K, Q6_K) from ``gguf_kquants`` (also bit-identical), and which tensor gets which type
follows llama.cpp's ``llama-quantize`` for the file type (``tensor_types``: the q4_k_m / q5_k_m
mixes, the LM head at Q6_K, norms and routers in float32).

Before anything is written the metadata is read back by evolm's own GGUF reader: the model it
describes must be the one being exported (every architectural field equal). The reader encodes
what llama.cpp hard-codes rather than stores (Gemma 3's local RoPE base and 5:1 pattern, its
query scale), so a config llama.cpp would run differently is refused, naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import torch

from evolm.config import ConfigError, ModelConfig

# --type name -> (ggml type name, llama.cpp file type name)
TYPES = {
    "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"), "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q6_k": ("Q6_K", "MOSTLY_Q6_K"), "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M"), "q5_k_s": ("Q5_K", "MOSTLY_Q5_K_S"),
    "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"), "q4_k_s": ("Q4_K", "MOSTLY_Q4_K_S"),
}
# llama.cpp's fallback when a k-quant's 256-weight super-blocks do not tile a row
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# tensors llama.cpp keeps in float32 whatever the file type (its converter and llama-quantize agree)
_ALWAYS_F32 = ("ffn_gate_inp.weight", "position_embd.weight", "rope_freqs.weight", "ssm_conv1d.weight")
# the families llama.cpp runs that we write: transformers model_type -> llama.cpp architecture
ARCHS = {"llama": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe",
         "gemma2": "gemma2", "gemma3_text": "gemma3", "olmo2": "olmo2", "deepseek_v2": "deepseek2",
         "deepseek_v3": "deepseek2", "gpt2": "gpt2", "mistral": "llama", "falcon": "falcon", "mamba": "mamba"}
# llama.cpp's converter states head sizes for these even when they equal d_model / n_heads
_STATES_HEAD_DIM = ("qwen3", "qwen3moe", "gemma3")
_GATING = {"softmax": 1, "sigmoid": 2}  # llama.cpp's expert_gating_func
_YARN_DEFAULTS = {"beta_fast": 32, "beta_slow": 1}  # llama.cpp's (and evolm's) when a file states none
# fields that do not change what the model computes
_NOT_ARCHITECTURE = {"name", "meta", "attn_dropout", "embd_dropout", "resid_dropout", "init_std",
                     "moe_aux_loss_coef", "moe_z_loss_coef"}
# fields that only matter when a feature is on: (is it on?, its fields)
_SWITCHED = ((lambda c: c.n_experts > 0, ("n_experts_per_tok", "moe_d_ff", "n_shared_experts", "first_k_dense",
                                          "router", "router_bias", "norm_topk_prob", "routed_scaling_factor",
                                          "n_expert_groups", "topk_groups")),
             (lambda c: c.attention == "mla", ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                               "qk_rope_head_dim", "v_head_dim")),
             (lambda c: c.sliding_window is not None, ("sliding_window_pattern",)),
             (lambda c: c.attention != "mla", ("head_dim",)),  # MLA's head sizes are its own fields
             (lambda c: c.pos_emb == "rope", ("rope_theta", "rotary_pct", "rope_interleave", "rope_scaling",
                                              "rope_local_theta", "rope_local_scaling")),
             (lambda c: c.n_experts == 0 or c.first_k_dense > 0, ("d_ff",)),  # all-MoE: no dense MLP
             (lambda c: c.norm != "rmsnorm", ("norm_bias",)),  # an RMSNorm has no bias, whatever the flag says
             # a state-space mixer has no heads, a mixer-only block no MLP (Mamba)
             (lambda c: c.attention != "mamba", ("n_heads", "n_kv_heads", "head_dim", "qkv_bias", "o_bias")),
             (lambda c: c.mlp != "none", ("d_ff", "activation", "mlp_bias")),
             (lambda c: c.attention == "mamba", ("mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank",
                                                 "mamba_conv_bias", "mamba_proj_bias")))


class ExportError(ValueError):
    """A model, type or path that cannot be written as GGUF; the message names it."""


# ----------------------------------------------------------------------------------------------
# which llama.cpp architecture
# ----------------------------------------------------------------------------------------------
def gguf_architecture(config: ModelConfig) -> str:
    """llama.cpp's ``general.architecture`` for ``config``, or an ExportError saying why there is none."""
    from evolm.interop.hf import hf_family

    try:
        model_type = hf_family(config)
    except ConfigError as e:
        raise ExportError(f"cannot export to GGUF: {e}") from None
    if model_type not in ARCHS:
        raise ExportError(f"ModelConfig '{config.name}' is a {model_type} model; GGUF export writes "
                          f"{', '.join(dict.fromkeys(ARCHS.values()))} (architecture {model_type!r} is not "
                          f"supported yet)")
    arch = ARCHS[model_type]
    why = _llama_cpp_cannot_run(config, arch)
    if why:
        raise ExportError(f"ModelConfig '{config.name}' is a {model_type} model that llama.cpp's {arch} "
                          f"cannot run: {why}")
    return arch


def _llama_cpp_cannot_run(c: ModelConfig, arch: str) -> str | None:
    """What llama.cpp decides from something other than the file's keys, or refuses outright."""
    if arch == "llama" and c.sliding_window is not None:
        return f"sliding_window is {c.sliding_window} but the llama architecture has no window"
    if arch == "falcon":
        if c.norm_placement == "pre":
            return "norm_placement is 'pre' but llama.cpp's falcon always runs attention and MLP in parallel"
        if c.qkv_bias or c.o_bias or c.mlp_bias:
            return "it has biases but llama.cpp's falcon loads no bias for its linear layers"
    if arch == "mamba" and (c.mamba_proj_bias or not c.mamba_conv_bias):
        return ("llama.cpp's mamba loads a bias on the convolution and none on in_proj / out_proj "
                f"(mamba_conv_bias={c.mamba_conv_bias}, mamba_proj_bias={c.mamba_proj_bias})")
    if arch == "deepseek2":
        lite = c.n_layers in (26, 27)  # llama.cpp takes "no q LoRA" (V2-Lite) from the layer count
        if lite != (c.q_lora_rank is None):
            return (f"q_lora_rank is {c.q_lora_rank} with n_layers {c.n_layers}; llama.cpp reads queries "
                    f"without a LoRA (q_lora_rank None) exactly when there are 26 or 27 layers")
        if c.n_experts and c.n_expert_groups > 1 and c.topk_groups >= c.n_expert_groups:
            return (f"topk_groups {c.topk_groups} must be below n_expert_groups {c.n_expert_groups} "
                    f"(llama.cpp asserts it)")
    return None


def _metadata(config: ModelConfig, arch: str) -> dict:
    """The ``general.*`` and ``{arch}.*`` keys llama.cpp reads for this config."""
    c = config
    rotary = int(c.head_dim * c.rotary_pct)
    meta = {
        "general.architecture": arch, "general.type": "model", "general.name": c.name,
        f"{arch}.vocab_size": c.vocab_size,
        f"{arch}.context_length": c.max_seq_len, f"{arch}.embedding_length": c.d_model,
        f"{arch}.block_count": c.n_layers, f"{arch}.feed_forward_length": c.d_ff,
        f"{arch}.attention.head_count": c.n_heads, f"{arch}.attention.head_count_kv": c.n_kv_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": float(c.norm_eps),
        f"{arch}.rope.freq_base": float(c.rope_theta), f"{arch}.rope.dimension_count": rotary,
    }
    if arch in _STATES_HEAD_DIM or c.head_dim * c.n_heads != c.d_model:
        meta[f"{arch}.attention.key_length"] = meta[f"{arch}.attention.value_length"] = c.head_dim
    if c.norm == "layernorm":  # GPT-2, Falcon: no RMS eps
        del meta[f"{arch}.attention.layer_norm_rms_epsilon"]
        meta[f"{arch}.attention.layer_norm_epsilon"] = float(c.norm_eps)
    if c.pos_emb != "rope":  # GPT-2's learned positions
        del meta[f"{arch}.rope.freq_base"], meta[f"{arch}.rope.dimension_count"]
    if c.n_experts:
        meta.update(_moe_metadata(c, arch))
    if c.attention == "mla":
        meta.update(_mla_metadata(c, arch))
    if c.sliding_window is not None:
        meta[f"{arch}.attention.sliding_window"] = c.sliding_window
    if arch == "mamba":
        meta.update(_mamba_metadata(c, arch))
        del meta[f"{arch}.attention.head_count_kv"]
    for key, value in (("attn_logit_softcapping", c.attn_softcap), ("final_logit_softcapping", c.final_softcap)):
        if value is not None:  # Gemma 2's soft-caps
            meta[f"{arch}.{key}"] = float(value)
    sc = c.rope_scaling
    if sc and sc["type"] == "linear":
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(sc["factor"])
    elif sc and sc["type"] == "yarn":
        meta[f"{arch}.rope.scaling.type"] = "yarn"
        meta[f"{arch}.rope.scaling.factor"] = float(sc["factor"])
        meta[f"{arch}.rope.scaling.original_context_length"] = int(sc["original_max_seq_len"])
        if sc.get("mscale_all_dim"):  # DeepSeek's query scaling under YaRN, as llama.cpp's converter writes it
            meta[f"{arch}.rope.scaling.yarn_log_multiplier"] = 0.1 * float(sc["mscale_all_dim"])
    return meta


def _moe_metadata(c: ModelConfig, arch: str) -> dict:
    """Expert counts and widths. llama.cpp's ``llama`` sizes its experts by ``feed_forward_length``
    (Mixtral's converter writes the expert width there); the others read ``expert_feed_forward_length``."""
    meta = {f"{arch}.expert_count": c.n_experts, f"{arch}.expert_used_count": c.n_experts_per_tok}
    if arch == "llama":
        meta[f"{arch}.feed_forward_length"] = c.moe_d_ff
    else:
        meta[f"{arch}.expert_feed_forward_length"] = c.moe_d_ff
    if arch == "deepseek2":  # DeepSeekMoE: shared experts, leading dense layers, routing
        meta.update({f"{arch}.leading_dense_block_count": c.first_k_dense,
                     f"{arch}.expert_shared_count": c.n_shared_experts,
                     f"{arch}.expert_weights_scale": float(c.routed_scaling_factor),
                     f"{arch}.expert_weights_norm": bool(c.norm_topk_prob),
                     f"{arch}.expert_gating_func": _GATING[c.router]})
        if c.n_expert_groups > 1:
            meta.update({f"{arch}.expert_group_count": c.n_expert_groups,
                         f"{arch}.expert_group_used_count": c.topk_groups})
    return meta


def _mamba_metadata(c: ModelConfig, arch: str) -> dict:
    """Mamba's sizes as llama.cpp's converter writes them: no heads, no MLP, the ``ssm.*`` keys."""
    return {f"{arch}.attention.head_count": 0, f"{arch}.feed_forward_length": 0,
            f"{arch}.ssm.conv_kernel": c.mamba_d_conv, f"{arch}.ssm.inner_size": c.mamba_expand * c.d_model,
            f"{arch}.ssm.state_size": c.mamba_d_state, f"{arch}.ssm.time_step_rank": c.mamba_dt_rank,
            f"{arch}.ssm.dt_b_c_rms": False}


def _mla_metadata(c: ModelConfig, arch: str) -> dict:
    """Multi-head latent attention as llama.cpp's converter writes it for its absorbed form: the
    per-head sizes under ``*_mla``, one shared "KV head" of the latent (kv_lora_rank + rope dims)."""
    meta = {f"{arch}.attention.kv_lora_rank": c.kv_lora_rank,
            f"{arch}.attention.key_length": c.kv_lora_rank + c.qk_rope_head_dim,
            f"{arch}.attention.value_length": c.kv_lora_rank,
            f"{arch}.attention.key_length_mla": c.qk_nope_head_dim + c.qk_rope_head_dim,
            f"{arch}.attention.value_length_mla": c.v_head_dim,
            f"{arch}.attention.head_count_kv": 1, f"{arch}.rope.dimension_count": c.qk_rope_head_dim}
    if c.q_lora_rank:
        meta[f"{arch}.attention.q_lora_rank"] = c.q_lora_rank
    return meta


def _check_reads_back(config: ModelConfig, meta: dict, shapes: dict, path: str, rope_freqs: bool) -> None:
    """evolm's reader builds exactly ``config`` from ``meta``: else the file would be another model."""
    from evolm.interop.gguf import GGUFError, config_from_metadata

    try:
        back = config_from_metadata(meta, shapes, path)
    except GGUFError as e:
        raise ExportError(f"cannot export ModelConfig '{config.name}' to GGUF: {e}") from None
    want = config
    if rope_freqs:  # the Llama 3 scaling travels as the rope_freqs tensor, not as config
        want = dataclasses.replace(want, rope_scaling=None)
    if want.rope_scaling and want.rope_scaling["type"] == "yarn":  # defaults both sides assume
        want = dataclasses.replace(want, rope_scaling={**_YARN_DEFAULTS, **want.rope_scaling})
        if back.rope_scaling and back.rope_scaling["type"] == "yarn":
            back = dataclasses.replace(back, rope_scaling={**_YARN_DEFAULTS, **back.rope_scaling})
    skip = set(_NOT_ARCHITECTURE)
    for on, fields in _SWITCHED:
        if not on(want) and not on(back):
            skip.update(fields)
    diffs = []
    for f in dataclasses.fields(ModelConfig):
        if f.name in skip:
            continue
        a, b = getattr(want, f.name), getattr(back, f.name)
        same = math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) and isinstance(b, float) else a == b
        if not same:
            diffs.append(f"field '{f.name}' is {a!r} but a {meta['general.architecture']} GGUF gives {b!r}")
    if diffs:
        raise ExportError(f"ModelConfig '{config.name}' cannot be written as a {meta['general.architecture']} "
                          f"GGUF that llama.cpp runs the same: " + "; ".join(diffs))


# ----------------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------------
def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order: per head, the rotate-half halves ``[x.., y..]`` become interleaved
    pairs ``[x0, y0, x1, y1, ...]`` (the inverse of ``gguf.unpermute_rope_rows``)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_names(placement: str) -> dict[str, str]:
    """Our per-layer module names -> llama.cpp's (the reader's tables, inverted; the router, whose
    two tensors have two names, is placed by ``_layer_tensors``)."""
    from evolm.interop.gguf import _LAYER_NAMES, _NORMS_BY_PLACEMENT

    names = {ours: theirs for theirs, ours in _LAYER_NAMES.items() if ours != "mlp.gate"}
    names.update({ours: theirs for theirs, ours in _NORMS_BY_PLACEMENT[placement].items()})
    return names


def _layer_tensors(i: str, rest: str, t: torch.Tensor, c: ModelConfig, names: dict, arch: str):
    """``(llama.cpp name, tensor)`` for our parameter ``layers.{i}.{rest}``: usually one, but our
    stacked gate|up experts are two tensors there, and MLA's kv_b is split the way llama.cpp's
    absorbed attention reads it (``attn_k_b`` transposed per head, ``attn_v_b``)."""
    B = f"blk.{i}."
    if rest == "self_attn.A_log":  # Mamba, as llama.cpp's converter stores it (interop/gguf.py reads it back)
        return [(B + "ssm_a", -torch.exp(t))]
    if rest == "self_attn.D":
        return [(B + "ssm_d", t)]
    if rest == "self_attn.conv1d.weight":  # (d_inner, 1, d_conv) -> (d_inner, d_conv)
        return [(B + "ssm_conv1d.weight", t[:, 0])]
    if rest == "mlp.experts.gate_up_proj":  # (E, 2F, D): gate rows, then up rows
        gate, up = t.split(t.shape[1] // 2, dim=1)
        return [(B + "ffn_gate_exps.weight", gate), (B + "ffn_up_exps.weight", up)]
    if rest == "mlp.experts.down_proj":  # (E, D, F)
        return [(B + "ffn_down_exps.weight", t)]
    if rest == "mlp.gate.weight":
        return [(B + "ffn_gate_inp.weight", t)]
    if rest == "mlp.gate.e_score_correction_bias":
        return [(B + "exp_probs_b.bias", t)]
    if rest == "self_attn.kv_b_proj.weight":  # (H * (nope + v), rank)
        kv = t.reshape(c.n_heads, c.qk_nope_head_dim + c.v_head_dim, -1)
        k_b, v_b = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)
        return [(B + "attn_k_b.weight", k_b.transpose(1, 2)), (B + "attn_v_b.weight", v_b)]
    module, _, suffix = rest.rpartition(".")
    if module not in names:
        raise ExportError(f"cannot export to GGUF: parameter 'layers.{i}.{rest}' has no llama.cpp name for {arch!r}")
    return [(f"{B}{names[module]}.{suffix}", t)]


def _fuse_qkv(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2's and Falcon's llama.cpp layout: q|k|v rows (and biases) as one ``attn_qkv`` tensor, in place of the three."""
    fused: dict[str, torch.Tensor] = {}
    for name, t in out.items():
        if ".attn_q." in name:
            parts = [out[name.replace(".attn_q.", f".attn_{x}.")] for x in "qkv"]
            fused[name.replace(".attn_q.", ".attn_qkv.")] = torch.cat(parts, dim=0).contiguous()
        elif ".attn_k." not in name and ".attn_v." not in name:
            fused[name] = t
    return fused


def float_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights as float tensors, quantized linears (int8, int4, NF4, GGUF blocks) dequantized."""
    sd = {k: v for k, v in model.state_dict().items()}
    for prefix, m in model.named_modules():
        dense = _dense_weight(m)
        if dense is None:
            continue
        for k in [k for k in sd if k.startswith(prefix + ".") and k != prefix + ".bias"]:
            del sd[k]
        sd[prefix + ".weight"] = dense
    bad = [k for k, v in sd.items() if not v.is_floating_point()]
    if bad:
        raise ExportError(f"cannot export to GGUF: tensor {bad[0]!r} is {sd[bad[0]].dtype}, not a float weight, "
                          f"and its module ({type(model.get_submodule(bad[0].rsplit('.', 1)[0])).__name__}) "
                          f"offers no dequantize()")
    return sd


def _dense_weight(m) -> torch.Tensor | None:
    """A quantized linear's float32 weight (None for any other module)."""
    if hasattr(m, "codes") and hasattr(m, "blocks"):  # GGUF blocks kept from a file
        return m.blocks.dequantize(dtype=torch.float32)
    if callable(getattr(m, "dequantize", None)) and not isinstance(m, torch.nn.Linear):
        return m.dequantize().float()
    w, scale = getattr(m, "weight", None), getattr(m, "scale", None)
    if isinstance(w, torch.Tensor) and w.dtype == torch.int8 and isinstance(scale, torch.Tensor):  # int8
        return w.float() * scale.float()[:, None]
    return None


def gguf_tensors(model, arch: str) -> dict[str, torch.Tensor]:
    """Every tensor of the file, float32, in llama.cpp's names and conventions (file order)."""
    from evolm.interop.families import GGUF_FAMILIES
    from evolm.nn.rope import rope_frequencies

    c: ModelConfig = model.config
    fam = GGUF_FAMILIES[arch]
    names = _gguf_names(c.norm_placement)
    heads = {"self_attn.q_proj": c.n_heads, "self_attn.k_proj": c.n_kv_heads}
    out: dict[str, torch.Tensor] = {}
    sd = float_state_dict(model)
    top = {"embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
           "pos_embed.weight": "position_embd.weight", "norm.weight": "output_norm.weight",
           "norm.bias": "output_norm.bias"}
    for key, t in sd.items():
        t = t.detach().to("cpu", torch.float32)
        if key == "lm_head.weight" and c.tie_embeddings:
            continue
        if key in top:
            parts = [(top[key], t)]
        elif key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            module = rest.rpartition(".")[0]
            if fam.gguf_permute_qk and module in heads:
                t = permute_rope_rows(t, heads[module])
            parts = _layer_tensors(i, rest, t, c, names, arch)
        else:
            raise ExportError(f"cannot export to GGUF: parameter {key!r} has no llama.cpp name for {arch!r}")
        for name, part in parts:
            if fam.unit_offset_norms and name.endswith("norm.weight"):
                part = part + 1.0  # llama.cpp's Gemma norms scale by the stored weight itself
            out[name] = part.contiguous()
    if arch in ("gpt2", "falcon"):
        out = _fuse_qkv(out)
    if c.rope_scaling and c.rope_scaling["type"] == "llama3":  # per-frequency divisors, as the converter writes
        plain, _ = rope_frequencies(c.rotary_dim, c.rope_theta, None)
        scaled, _ = rope_frequencies(c.rotary_dim, c.rope_theta, c.rope_scaling)
        out["rope_freqs.weight"] = (plain / scaled).float()
    return out


def tensor_types(shapes: dict[str, tuple[int, ...]], qtype: str, n_layers: int, n_experts: int = 0) -> dict:
    """The ggml type of every tensor of a ``qtype`` file, chosen as llama.cpp's ``llama-quantize``
    chooses them (``llama_tensor_get_type``, no importance matrix) for that file type:

    * 1-D tensors, biases, the MoE router, learned positions and ``rope_freqs`` stay F32;
    * the LM head (``output``, or ``token_embd`` when tied) goes to Q6_K below 8 bits (Q8_0 when its
      rows do not split into the type's blocks), every logit going through it;
    * in 8-expert models (Mixtral) ``attn_v`` and ``attn_k`` are Q8_0, and ``attn_output`` Q5_K
      for q4_k_m / q4_k_s;
    * q4_k_m / q5_k_m: ``attn_v`` (or a fused ``attn_qkv``) and ``ffn_down`` of the first and last
      eighth of the layers and of every third layer between them get Q6_K (``use_more_bits``);
      q4_k_s: ``attn_v`` of the first 4 layers and ``ffn_down`` of the first eighth get Q5_K;
    * a k-quant whose 256-weight super-blocks do not tile a row falls back as llama.cpp's does
      (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), then to F16 if 32 does not divide it either.
    """
    import gguf

    T = gguf.GGMLQuantizationType
    default = T[TYPES[qtype][0]]
    quantized = gguf.GGML_QUANT_SIZES[default][0] > 1
    has_output = "output.weight" in shapes
    n_attn_v = sum(1 for n in shapes if _is_attn_v(n))
    i_attn_v = 0
    out = {}
    for name, shape in shapes.items():
        if len(shape) < 2 or not name.endswith(".weight") or name.endswith("_norm.weight") \
                or any(name.endswith(k) for k in _ALWAYS_F32) or default == T.F32:
            out[name] = T.F32
            continue
        kind = default
        if quantized:
            kind = _mix_type(name, shape, default, qtype, has_output, n_layers, n_experts, i_attn_v, n_attn_v)
            i_attn_v += _is_attn_v(name)
        block = gguf.GGML_QUANT_SIZES[kind][0]
        if shape[-1] % block:
            kind = T[_K_FALLBACK.get(kind.name, "F16")]
            if shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
                kind = T.F16
        out[name] = kind
    return out


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layers that get more bits in the _M mixes: the first and last eighth, and every
    third layer between them."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mix_type(name, shape, default, qtype, has_output, n_layers, n_experts, i_attn_v, n_attn_v):
    """One tensor's type in a quantized file (see ``tensor_types``)."""
    import gguf

    T = gguf.GGMLQuantizationType
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        if shape[-1] % gguf.GGML_QUANT_SIZES[default][0]:
            return T.Q8_0
        return T.Q6_K if default != T.Q8_0 else T.Q8_0
    if _is_attn_v(name):
        kind = default
        if qtype in ("q4_k_m", "q5_k_m") and _use_more_bits(i_attn_v, n_attn_v):
            kind = T.Q6_K
        elif qtype == "q4_k_s" and i_attn_v < 4:
            kind = T.Q5_K
        return T.Q8_0 if n_experts == 8 else kind
    if "attn_k.weight" in name:
        return T.Q8_0 if n_experts == 8 else default
    if "ffn_down" in name:
        if qtype in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, n_layers):
            return T.Q6_K
        if qtype == "q4_k_s" and layer < n_layers // 8:
            return T.Q5_K
        return default
    if "attn_output.weight" in name:
        return T.Q5_K if n_experts == 8 and qtype in ("q4_k_m", "q4_k_s") else default
    return default


def _is_attn_v(name: str) -> bool:
    """The value projections llama.cpp counts and gives more bits: ``attn_v``, or GPT-2's fused ``attn_qkv``."""
    return "attn_v.weight" in name or "attn_qkv.weight" in name


def encode_tensor(t: torch.Tensor, kind) -> np.ndarray:
    """``t`` as the array ``GGUFWriter.add_tensor`` takes for ggml type ``kind`` (quantized types
    by the ``gguf`` package's reference quantizer, k-quants by ``gguf_kquants``: both bit-identical
    to llama.cpp's)."""
    import gguf

    from evolm.interop.gguf_kquants import QUANTIZERS

    T = gguf.GGMLQuantizationType
    x = t.numpy().astype(np.float32, copy=False)
    if kind == T.F32:
        return x
    if kind == T.F16:
        return x.astype(np.float16)
    if kind.name in QUANTIZERS:  # ours: the gguf package has no k-quant quantizer
        return QUANTIZERS[kind.name](x)
    return gguf.quants.quantize(x, kind)


# ----------------------------------------------------------------------------------------------
# the file
# ----------------------------------------------------------------------------------------------
def _add(writer, key: str, value) -> None:
    """One metadata key with the type llama.cpp reads it as."""
    import gguf

    V = gguf.GGUFValueType
    if key in ("general.architecture",):
        return  # written by GGUFWriter itself
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        sub = V.STRING if value and isinstance(value[0], str) else \
            V.FLOAT32 if value and isinstance(value[0], float) else V.INT32
        writer.add_key_value(key, value, V.ARRAY, sub_type=sub)
    else:
        raise TypeError(f"metadata {key!r}: {type(value).__name__} is not a GGUF value")


def export_gguf(model, path: str | os.PathLike, tokenizer=None, qtype: str = "f16") -> Path:
    """Write ``model`` (and its tokenizer) as the GGUF file ``path`` with weights in ``qtype``
    (``TYPES``: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s).

    Raises ExportError (one line) for an unknown type, a model no supported llama.cpp
    architecture expresses exactly (naming the architecture or the field), or a missing or
    unsupported tokenizer (llama.cpp needs the vocabulary in the file).
    """
    if qtype not in TYPES:
        raise ExportError(f"--type {qtype}: expected one of {', '.join(TYPES)} (other llama.cpp types, e.g. "
                          f"q3_k_m or the i-quants: run llama.cpp's llama-quantize on the f32 or f16 file)")
    meta, tensors = gguf_plan(model, tokenizer, str(path))
    return write_gguf(path, meta, tensors, qtype)


def gguf_plan(model, tokenizer, path: str = "model.gguf") -> tuple[dict, dict[str, torch.Tensor]]:
    """``(metadata, float32 tensors in llama.cpp's names)`` of the file ``model`` becomes, checked
    to read back as the same model (``path`` only names the file in errors)."""
    from evolm.interop.gguf_vocab_export import vocab_metadata

    if tokenizer is None:
        raise ExportError(f"{path}: the model has no tokenizer; a GGUF file for llama.cpp must carry its vocabulary")
    c: ModelConfig = model.config
    arch = gguf_architecture(c)
    tensors = gguf_tensors(model, arch)
    meta = _metadata(c, arch)
    meta.update(vocab_metadata(tokenizer, c.vocab_size, arch))
    _check_reads_back(c, meta, {k: tuple(v.shape) for k, v in tensors.items()}, path, "rope_freqs.weight" in tensors)
    return meta, tensors


def write_gguf(path: str | os.PathLike, meta: dict, tensors: dict[str, torch.Tensor], qtype: str) -> Path:
    """Write ``meta`` and ``tensors`` (llama.cpp's names, float32) with ``GGUFWriter``, the 2-D
    tensors in ``qtype``. Written to a temporary file first: an existing file is replaced only
    by a complete one."""
    import gguf

    file_type = TYPES[qtype][1]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), meta["general.architecture"])
    try:
        for k, v in meta.items():
            _add(writer, k, v)
        writer.add_file_type(int(gguf.LlamaFileType[file_type]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        arch = meta["general.architecture"]
        kinds = tensor_types({n: tuple(t.shape) for n, t in tensors.items()}, qtype, meta[f"{arch}.block_count"],
                             meta.get(f"{arch}.expert_count", 0))
        for name, t in tensors.items():
            kind = kinds[name]
            data = encode_tensor(t, kind)
            writer.add_tensor(name, data, raw_dtype=kind if data.dtype == np.uint8 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


__all__ = ["export_gguf", "gguf_plan", "write_gguf", "ExportError", "TYPES", "ARCHS", "gguf_architecture",
           "gguf_tensors", "permute_rope_rows", "tensor_types", "encode_tensor", "float_state_dict"]
