"""Jamba (Lieber et al. 2024, arXiv:2403.19887): transformers' ``jamba`` (``JambaForCausalLM``).

A hybrid: most layers' mixer is Mamba, with RMSNorms on dt, B and C inside it
(``mamba_dt_b_c_norm``); one layer in ``attn_layer_period`` is grouped-query attention without any
position encoding (the Mamba layers carry order), at index ``attn_layer_offset`` of each group.
Every layer then has a SwiGLU channel part, a mixture of ``num_experts`` experts (softmax router,
top ``num_experts_per_tok``, weights not renormalised) on one layer in ``expert_layer_period``
from ``expert_layer_offset``. Pre-RMSNorm, a final ``final_layernorm``, an untied head.

In evolm the two periods are data: ``mixer_pattern`` (the group of ``attn_layer_period`` mixers,
``"mha"`` at the offset) and ``moe_layer_step`` / ``moe_first_layer`` (the experts' period and offset).
The checkpoints name a layer's mixer ``mamba`` or ``self_attn`` by its kind and its channel part
``feed_forward`` (router ``feed_forward.router``); the Hub's files keep one tensor per expert,
transformers 5 stacks them (both are read). The load-balancing loss (Mixtral's, weighted by
``router_aux_loss_coef`` when ``output_router_logits``) maps to ``moe_aux_loss_coef``.
"""

from __future__ import annotations

import torch

from evolm.config import ModelConfig
from evolm.interop.families.base import Family, Needs
from evolm.interop.families.decoder import ACT_TO_HF, err

TOP = {"embed_tokens.weight": "embed_tokens.weight", "final_layernorm.weight": "norm.weight"}
NORMS = {"input_layernorm": "attn_norm", "pre_ff_layernorm": "mlp_norm"}


def mixer_pattern(period: int, offset: int) -> tuple[str, ...]:
    """Jamba's attention placement (layer i attends when ``i % period == offset``) as a mixer pattern."""
    return tuple("mha" if j == offset else "mamba" for j in range(period))


def config_from_hf(fam: Family, h: dict, meta: dict) -> ModelConfig:
    d, nh = h["hidden_size"], h["num_attention_heads"]
    period, offset = h["attn_layer_period"], h["attn_layer_offset"]
    e_period, e_offset = h["expert_layer_period"], h["expert_layer_offset"]
    for name, p, o in (("attn_layer", period, offset), ("expert_layer", e_period, e_offset)):
        if not (isinstance(p, int) and isinstance(o, int) and 0 <= o < p):
            raise err(f"{name}_offset={o!r} and {name}_period={p!r}: expected integers with 0 <= offset < period")
    rank = h["mamba_dt_rank"]
    rank = -(-d // 16) if rank == "auto" else rank
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
        raise err(f"mamba_dt_rank is {rank!r}; expected 'auto' or a positive integer")
    if h["hidden_act"] != "silu":
        raise err(f"hidden_act={h['hidden_act']!r}: evolm's Mamba mixer uses SiLU (the released models' 'silu')")
    n_experts = h["num_experts"] if h["num_experts"] > 1 else 0  # one "expert" is a dense MLP
    kw = dict(
        name="hf-jamba", vocab_size=h["vocab_size"], d_model=d, n_layers=h["num_hidden_layers"], n_heads=nh,
        n_kv_heads=h.get("num_key_value_heads") or nh, d_ff=h["intermediate_size"],
        max_seq_len=h["max_position_embeddings"], norm="rmsnorm", norm_eps=float(h["rms_norm_eps"]),
        norm_placement="pre", pos_emb="none", attention="mha", mixer_pattern=mixer_pattern(period, offset),
        mlp="glu", activation="silu", mlp_bias=False, attn_dropout=float(h.get("attention_dropout") or 0.0),
        mamba_d_state=h["mamba_d_state"], mamba_d_conv=h["mamba_d_conv"], mamba_expand=h["mamba_expand"],
        mamba_dt_rank=rank, mamba_conv_bias=bool(h["mamba_conv_bias"]), mamba_proj_bias=bool(h["mamba_proj_bias"]),
        mamba_dt_b_c_norm=True, tie_embeddings=bool(h["tie_word_embeddings"]),
        init_std=float(h["initializer_range"]), meta=meta)
    if n_experts:
        kw.update(n_experts=n_experts, n_experts_per_tok=h["num_experts_per_tok"], router="softmax",
                  norm_topk_prob=False, moe_layer_step=e_period, moe_first_layer=e_offset)
        if h.get("output_router_logits"):
            kw["moe_aux_loss_coef"] = float(h.get("router_aux_loss_coef") or 0.0)
    return ModelConfig(**kw)


def _period_offset(c: ModelConfig) -> tuple[int, int] | None:
    """``mixer_pattern`` as Jamba's (attn_layer_period, attn_layer_offset), None if it is not one
    attention layer among Mamba layers."""
    p = c.mixer_pattern
    att = [j for j, m in enumerate(p) if m == "mha"]
    if len(att) != 1 or any(m != "mamba" for j, m in enumerate(p) if j != att[0]):
        return None
    return len(p), att[0]


def config_to_hf(fam: Family, c: ModelConfig, out: dict) -> None:
    period, offset = _period_offset(c)
    moe = c.n_experts > 0
    out.update(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
               num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, hidden_act=ACT_TO_HF[c.activation],
               max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, attention_dropout=c.attn_dropout,
               attn_layer_period=period, attn_layer_offset=offset,
               num_experts=c.n_experts if moe else 1, num_experts_per_tok=c.n_experts_per_tok if moe else 1,
               expert_layer_period=c.moe_layer_step if moe else 1, expert_layer_offset=_moe_first(c) if moe else 0,
               output_router_logits=c.moe_aux_loss_coef > 0, router_aux_loss_coef=c.moe_aux_loss_coef,
               mamba_d_state=c.mamba_d_state, mamba_d_conv=c.mamba_d_conv, mamba_expand=c.mamba_expand,
               mamba_dt_rank=c.mamba_dt_rank, mamba_conv_bias=c.mamba_conv_bias, mamba_proj_bias=c.mamba_proj_bias)


def _moe_first(c: ModelConfig) -> int:
    return c.moe_layer_step - 1 if c.moe_first_layer is None else c.moe_first_layer


def blockers(fam: Family, c: ModelConfig, need: Needs) -> None:
    need(_period_offset(c) is not None, "mixer_pattern",
         "one 'mha' among 'mamba' entries (attn_layer_period / attn_layer_offset)")
    need(c.attention == "mha", "attention", "'mha'")
    need(c.mamba_dt_b_c_norm, "mamba_dt_b_c_norm", "True (Jamba's norms on dt, B, C)")
    need(c.norm == "rmsnorm" and not c.norm_unit_offset, "norm", "'rmsnorm'")
    need(c.norm_placement == "pre", "norm_placement", "'pre'")
    need(c.pos_emb == "none", "pos_emb", "'none' (Jamba's attention has no positions)")
    need(c.mlp == "glu" and c.activation == "silu" and not c.mlp_bias, "mlp", "'glu' with SiLU, no biases (SwiGLU)")
    need(c.head_dim * c.n_heads == c.d_model, "head_dim", "d_model // n_heads")
    need(not c.qkv_bias and not c.o_bias, "qkv_bias", "False (and o_bias False)")
    need(c.qk_norm is None, "qk_norm", "None")
    need(c.sliding_window is None, "sliding_window", "None")
    need(not c.embed_scale and c.final_softcap is None, "final_softcap", "None")
    if c.n_experts:
        need(c.router == "softmax" and not c.router_bias and not c.norm_topk_prob, "norm_topk_prob",
             "False (softmax top-k, weights not renormalised)")
        need(c.n_shared_experts == 0, "n_shared_experts", "0")
        need(c.moe_d_ff == c.d_ff, "moe_d_ff", f"d_ff ({c.d_ff}): Jamba's experts have the MLP's width")
        need(c.first_k_dense == 0 and _moe_first(c) < c.moe_layer_step, "moe_first_layer",
             f"< moe_layer_step ({c.moe_layer_step}) and first_k_dense 0 (expert_layer_offset < period)")
        need(c.routed_scaling_factor == 1.0 and c.n_expert_groups == 1 and c.moe_z_loss_coef == 0,
             "routed_scaling_factor", "1.0 (no group routing, no z-loss)")


def layer_from_hf(fam: Family, config: ModelConfig, name: str, t: torch.Tensor, i: int, out: dict,
                  experts: dict) -> bool:
    L = f"layers.{i}."
    mod, _, rest = name.partition(".")
    if mod in NORMS and rest == "weight":
        out[f"{L}{NORMS[mod]}.weight"] = t
    elif mod in ("mamba", "self_attn"):
        out[f"{L}self_attn.{rest}"] = t
    elif mod == "feed_forward":
        parts = rest.split(".")
        if parts[0] == "router":
            out[f"{L}mlp.gate.{parts[1]}"] = t
        elif len(parts) == 4 and parts[0] == "experts" and parts[1].isdigit():  # the Hub's per-expert tensors
            experts.setdefault((i, parts[2]), {})[int(parts[1])] = t
        else:
            out[f"{L}mlp.{rest}"] = t
    else:
        return False
    return True


def weights_to_hf(fam: Family, sd: dict[str, torch.Tensor], config: ModelConfig,
                  fused_experts: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    norms = {v: k for k, v in NORMS.items()}
    for k, t in sd.items():
        if k == "lm_head.weight":
            out[k] = t
            continue
        if not k.startswith("layers."):
            out["model." + {"norm.weight": "final_layernorm.weight"}.get(k, k)] = t
            continue
        _, i, rest = k.split(".", 2)
        L = f"model.layers.{i}."
        mod, _, tail = rest.partition(".")
        if mod in norms:
            out[L + norms[mod] + "." + tail] = t
        elif mod == "self_attn":
            out[L + ("mamba." if config.layer_is_recurrent(int(i)) else "self_attn.") + tail] = t
        elif tail.startswith("gate."):
            out[L + "feed_forward.router." + tail.removeprefix("gate.")] = t
        elif tail.startswith("experts.") and not fused_experts:
            F = config.moe_d_ff
            for e in range(t.shape[0]):
                E = f"{L}feed_forward.experts.{e}."
                if tail.endswith("gate_up_proj"):
                    out[E + "gate_proj.weight"] = t[e, :F].contiguous()
                    out[E + "up_proj.weight"] = t[e, F:].contiguous()
                else:
                    out[E + "down_proj.weight"] = t[e].contiguous()
        else:
            out[L + "feed_forward." + tail] = t
    return out


JAMBA = Family(
    model_type="jamba", architecture="JambaForCausalLM",
    defaults=dict(vocab_size=65536, tie_word_embeddings=False, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                  initializer_range=0.02, rms_norm_eps=1e-6, output_router_logits=False, router_aux_loss_coef=0.001,
                  max_position_embeddings=262144, attention_dropout=0.0, num_experts_per_tok=2, num_experts=16,
                  expert_layer_period=2, expert_layer_offset=1, attn_layer_period=8, attn_layer_offset=4,
                  mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank="auto", mamba_conv_bias=True,
                  mamba_proj_bias=False),
    aliases={"num_local_experts": "num_experts"},
    experts=True, parts=frozenset({"moe_layer_step", "moe_first_layer", "mixer_pattern", "mamba_dt_b_c_norm"}),
    read_config=config_from_hf, write_config=config_to_hf, check=blockers,
    top_weights=TOP, layer_from_hf=layer_from_hf, weights_to_hf=weights_to_hf,
)
