"""Llama 4 (Meta 2025: Scout 17B-16E, Maverick 17B-128E), the text model.

A Llama decoder with five parts of its own, each one ModelConfig field:

- NoPE layers (``no_rope_layers``: 1 = RoPE, 0 = none; by default every 4th layer has none) that
  attend globally, while the RoPE layers attend within chunks of ``attention_chunk_size`` tokens
  (``layer_types``: ``chunked_attention`` / ``full_attention``);
- attention temperature tuning on the NoPE layers (``attn_temperature_tuning``, ``floor_scale``,
  ``attn_scale``);
- a weightless L2 QK-norm on the RoPE layers (``use_qk_norm``: Scout has it, Maverick not);
- RoPE in complex form, rotating adjacent pairs (``rope_interleave``);
- MoE layers (every ``interleave_moe_layer_step``-th, or as ``moe_layers`` lists) of one shared
  expert plus sigmoid-routed experts whose routing weight scales the expert's input; the MoE
  layers' experts are ``intermediate_size`` wide, the dense layers' MLPs ``intermediate_size_mlp``.

transformers 5 stores the routed experts fused and transposed to ours: ``feed_forward.experts.
gate_up_proj`` (E, D, 2F, gate columns then up) and ``down_proj`` (E, F, D); the block's MLP or MoE
lives under ``feed_forward`` (router ``router``, shared expert ``shared_expert``). The multimodal
``llama4`` config nests this one under ``text_config``, weights under ``language_model.``.
"""

from __future__ import annotations

import torch

from evolm.config import ModelConfig
from evolm.interop.families.base import OPTIONAL_PARTS, Family, Needs
from evolm.interop.families.decoder import NORMS_FROM_HF, err, has_moe, text_config, window_pattern

LOCAL, GLOBAL = "chunked_attention", "full_attention"


def _every(step: int, n: int) -> list[int]:
    """transformers' rule for a layer step (NoPE or MoE): layers step-1, 2*step-1, ..."""
    return [i for i in range(n) if (i + 1) % step == 0]


def llama4_from_hf(h: dict, kw: dict) -> None:
    n = kw["n_layers"]
    rope = h.get("no_rope_layers") or [int((i + 1) % h["no_rope_layer_interval"] != 0) for i in range(n)]
    if len(rope) < n:
        raise err(f"no_rope_layers lists {len(rope)} layers but num_hidden_layers is {n}")
    types = h.get("layer_types") or [LOCAL if r else GLOBAL for r in rope]
    bad = sorted(set(types) - {LOCAL, GLOBAL})
    if bad or len(types) < n:
        raise err(f"layer_types must list {n} of {LOCAL!r} / {GLOBAL!r}, got {types}")
    local = [t == LOCAL for t in types[:n]]
    kw.update(nope_layers=tuple(i for i in range(n) if not rope[i]), d_ff=h["intermediate_size_mlp"],
              attn_temperature_tuning=bool(h["attn_temperature_tuning"]),
              attn_floor_scale=float(h["floor_scale"]), attn_scale=float(h["attn_scale"]))
    if any(local):
        pattern = window_pattern(local)
        if pattern is None:
            raise err(f"layer_types {local} cannot be expressed as 'every N-th layer global' "
                      "(ModelConfig.sliding_window_pattern)")
        kw.update(attention_chunk_size=int(h["attention_chunk_size"]), sliding_window_pattern=pattern)
    moe = h.get("moe_layers")
    step = h["interleave_moe_layer_step"]
    moe = _every(step, n) if moe is None else sorted(i for i in moe if i < n)
    if not moe:
        return
    step = next((s for s in range(1, n + 1) if _every(s, n) == moe), None)
    if step is None:
        raise err(f"moe_layers {moe} cannot be expressed as 'every N-th layer' (ModelConfig.moe_layer_step)")
    kw.update(n_experts=h["num_local_experts"], n_experts_per_tok=h["num_experts_per_tok"],
              moe_d_ff=h["intermediate_size"], moe_layer_step=step, n_shared_experts=1, router="sigmoid",
              norm_topk_prob=False, router_scales_input=True)


def llama4_to_hf(c: ModelConfig, out: dict) -> None:
    n = c.n_layers
    floor = c.attn_floor_scale
    out.update(intermediate_size=c.moe_d_ff, intermediate_size_mlp=c.d_ff,
               no_rope_layers=[int(i not in c.nope_layers) for i in range(n)],
               layer_types=[LOCAL if c.layer_is_local(i) else GLOBAL for i in range(n)],
               # transformers builds the chunked mask even when no layer uses it: any size will do
               attention_chunk_size=c.attention_chunk_size or c.max_seq_len,
               attn_temperature_tuning=c.attn_temperature_tuning,
               floor_scale=int(floor) if float(floor).is_integer() else floor, attn_scale=c.attn_scale,
               moe_layers=[i for i in range(n) if c.layer_is_moe(i)], interleave_moe_layer_step=c.moe_layer_step,
               num_local_experts=max(c.n_experts, 1), num_experts_per_tok=c.n_experts_per_tok if has_moe(c) else 1)


def llama4_blockers(c: ModelConfig, need: Needs) -> None:
    need(c.first_k_dense == 0, "first_k_dense", "0 (MoE layers are every moe_layer_step-th)")
    if not has_moe(c):
        return
    need(c.router == "sigmoid", "router", "'sigmoid'")
    need(c.router_scales_input, "router_scales_input", "True (the score scales the expert's input)")
    need(not c.norm_topk_prob, "norm_topk_prob", "False")
    need(c.n_shared_experts == 1, "n_shared_experts", "1")
    need(not c.router_bias, "router_bias", "False")
    need(c.n_expert_groups == 1, "n_expert_groups", "1")
    need(c.routed_scaling_factor == 1.0, "routed_scaling_factor", "1.0")


# our module names under a block <- Llama 4's under ``feed_forward``
_FFN = {"router": "gate", "shared_expert": "shared_experts"}


def layer_from_hf(fam: Family, config: ModelConfig, name: str, t: torch.Tensor, i: int, out: dict,
                  experts: dict) -> bool:
    L = f"layers.{i}."
    mod, _, rest = name.partition(".")
    norms = NORMS_FROM_HF["pre"]
    if mod in norms and rest == "weight":
        out[f"{L}{norms[mod]}.weight"] = t
        return True
    if mod == "self_attn":
        out[L + name] = t
        return True
    if mod != "feed_forward":
        return False
    sub, _, kind = rest.partition(".")
    if sub == "experts" and kind in ("gate_up_proj", "down_proj"):  # (E, D, 2F) / (E, F, D) -> ours
        out[f"{L}mlp.experts.{kind}"] = t.transpose(1, 2).contiguous()
        return True
    out[f"{L}mlp.{_FFN.get(sub, sub)}.{kind}"] = t
    return True


def weights_to_hf(fam: Family, sd: dict[str, torch.Tensor], config: ModelConfig,
                  fused_experts: bool) -> dict[str, torch.Tensor]:
    """Ours -> Llama 4's names; the experts are always fused (the only layout Llama 4 has)."""
    out: dict[str, torch.Tensor] = {}
    norms = {v: k for k, v in NORMS_FROM_HF["pre"].items()}
    ffn = {v: k for k, v in _FFN.items()}
    for k, t in sd.items():
        if not k.startswith("layers."):
            out[k if k == "lm_head.weight" else "model." + k] = t
            continue
        _, i, rest = k.split(".", 2)
        L = f"model.layers.{i}."
        mod, _, kind = rest.partition(".")
        if mod in norms:
            out[L + norms[mod] + "." + kind] = t
        elif mod != "mlp":
            out[L + rest] = t
        elif kind.startswith("experts."):
            out[f"{L}feed_forward.{kind}"] = t.transpose(1, 2).contiguous()
        else:
            sub, _, tail = kind.partition(".")
            out[f"{L}feed_forward.{ffn.get(sub, sub)}.{tail}"] = t
    return out


def unwrap_multimodal(h: dict) -> dict:
    """The multimodal ``llama4`` config.json -> its language model's config (``text_config``)."""
    return text_config(h, "llama4_text", tie_default=False)


LLAMA4_TEXT = Family(
    model_type="llama4_text", architecture="Llama4ForCausalLM",
    # transformers 5.23's Llama4TextConfig (no_rope_layers, moe_layers and layer_types are derived)
    defaults=dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
                  num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                  hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, attention_dropout=0.0, num_experts_per_tok=1, num_local_experts=16,
                  interleave_moe_layer_step=1, use_qk_norm=True, rope_theta=500000.0, no_rope_layer_interval=4,
                  attention_chunk_size=8192, attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1,
                  attention_bias=False),
    wrappers=("llama4",), unwrap=unwrap_multimodal,
    qk_norm="l2", qk_norm_flag="use_qk_norm", rope_interleave=True, experts=True, parts=frozenset(OPTIONAL_PARTS),
    from_hf=llama4_from_hf, to_hf=llama4_to_hf, blockers=llama4_blockers,
    layer_from_hf=layer_from_hf, weights_to_hf=weights_to_hf,
)
