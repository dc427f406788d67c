"""Mamba (Gu & Dao 2023, arXiv:2312.00752): transformers' ``mamba`` (``MambaForCausalLM``).

A stack of mixer-only blocks (``x + mixer(rmsnorm(x))``, our ``attention="mamba"``, ``mlp="none"``)
between a token embedding and a final RMSNorm, no positions. Its config.json names the mixer's
sizes ``state_size``, ``conv_kernel``, ``expand``, ``time_step_rank``; ``use_conv_bias`` and
``use_bias`` (in/out projections) are our ``mamba_conv_bias`` / ``mamba_proj_bias``. The
checkpoints keep the mixer under ``backbone.layers.i.mixer`` and its norm as ``norm``; the first
converted checkpoints spelt the embedding ``embedding`` (transformers renames it on load, so do we).
The initialisation keys (``time_step_min`` ...) and ``residual_in_fp32`` (a precision choice of the
reference kernels) do not change the model a checkpoint describes; they are not read. GGUF: llama.cpp's
``mamba`` (sizes under ``mamba.ssm.*``; ``interop/gguf.py`` undoes the converter's ``ssm_a = -exp(A_log)``
and squeezed convolution filters, ``gguf_export.py`` applies them).
"""

from __future__ import annotations

import torch

from evolm.config import ModelConfig
from evolm.interop.families.base import Family, Needs
from evolm.interop.families.decoder import err

TOP = {"embeddings.weight": "embed_tokens.weight", "embedding.weight": "embed_tokens.weight",
       "norm_f.weight": "norm.weight"}
MAX_SEQ_LEN = 2048  # Mamba has no position limit; this only sizes default caches (the pretraining context)


def config_from_hf(fam: Family, h: dict, meta: dict) -> ModelConfig:
    if h["hidden_act"] != "silu":
        raise err(f"hidden_act={h['hidden_act']!r}: evolm's Mamba mixer uses SiLU (the released models' 'silu')")
    d = h["hidden_size"]
    rank = h["time_step_rank"]
    rank = -(-d // 16) if rank == "auto" else rank
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
        raise err(f"time_step_rank is {rank!r}; expected 'auto' or a positive integer")
    return ModelConfig(
        name="hf-mamba", vocab_size=h["vocab_size"], d_model=d, n_layers=h["num_hidden_layers"], n_heads=1,
        max_seq_len=MAX_SEQ_LEN, norm="rmsnorm", norm_eps=float(h["layer_norm_epsilon"]), norm_placement="pre",
        pos_emb="none", attention="mamba", mlp="none", mamba_d_state=h["state_size"],
        mamba_d_conv=h["conv_kernel"], mamba_expand=h["expand"], mamba_dt_rank=rank,
        mamba_conv_bias=bool(h["use_conv_bias"]), mamba_proj_bias=bool(h["use_bias"]),
        tie_embeddings=bool(h["tie_word_embeddings"]), init_std=float(h["initializer_range"]), meta=meta)


def config_to_hf(fam: Family, c: ModelConfig, out: dict) -> None:
    out.update(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
               state_size=c.mamba_d_state, conv_kernel=c.mamba_d_conv, expand=c.mamba_expand,
               intermediate_size=c.mamba_expand * c.d_model, time_step_rank=c.mamba_dt_rank,
               use_conv_bias=c.mamba_conv_bias, use_bias=c.mamba_proj_bias, hidden_act="silu",
               layer_norm_epsilon=c.norm_eps)


def blockers(fam: Family, c: ModelConfig, need: Needs) -> None:
    need(c.attention == "mamba", "attention", "'mamba'")
    need(c.mlp == "none", "mlp", "'none' (a Mamba block is its mixer alone)")
    need(c.norm == "rmsnorm" and not c.norm_unit_offset, "norm", "'rmsnorm'")
    need(c.norm_placement == "pre", "norm_placement", "'pre'")
    need(c.pos_emb == "none", "pos_emb", "'none'")
    need(c.n_experts == 0, "n_experts", "0")
    need(not c.embed_scale, "embed_scale", "False")
    need(c.final_softcap is None, "final_softcap", "None")
    need(c.embd_dropout == 0 and c.resid_dropout == 0, "resid_dropout", "0 (no dropout)")


def layer_from_hf(fam: Family, config: ModelConfig, name: str, t: torch.Tensor, i: int, out: dict,
                  experts: dict) -> bool:
    if name.startswith("mixer."):
        out[f"layers.{i}.self_attn.{name.removeprefix('mixer.')}"] = t
    elif name == "norm.weight":
        out[f"layers.{i}.attn_norm.weight"] = t
    else:
        return False
    return True


def weights_to_hf(fam: Family, sd: dict[str, torch.Tensor], config: ModelConfig,
                  fused_experts: bool) -> dict[str, torch.Tensor]:
    top = {"embed_tokens.weight": "embeddings.weight", "norm.weight": "norm_f.weight"}
    out: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        if k == "lm_head.weight":
            out[k] = t
        elif not k.startswith("layers."):
            out["backbone." + top[k]] = t
        else:
            _, i, rest = k.split(".", 2)
            rest = "norm.weight" if rest == "attn_norm.weight" else "mixer." + rest.removeprefix("self_attn.")
            out[f"backbone.layers.{i}.{rest}"] = t
    return out


def gguf_from_metadata(get, meta: dict, names: set, c: dict) -> None:
    """llama.cpp's ``mamba``: the mixer's sizes under ``ssm.*`` (``inner_size`` = expand * d_model), a
    bias on the convolution where the file has one; no heads, no MLP, no positions."""
    d, inner = c["d_model"], get("ssm.inner_size", kind=int)
    if inner % d:
        raise err(f"mamba.ssm.inner_size={inner} is not a multiple of embedding_length={d} (Mamba's expand)")
    if get("ssm.dt_b_c_rms", False):
        raise err("mamba.ssm.dt_b_c_rms=true (Falcon-Mamba's norms on dt, B, C) is not supported")
    c.update(attention="mamba", mlp="none", pos_emb="none", n_heads=1, n_kv_heads=None, d_ff=None,
             mamba_d_state=get("ssm.state_size", kind=int), mamba_d_conv=get("ssm.conv_kernel", kind=int),
             mamba_expand=inner // d, mamba_dt_rank=get("ssm.time_step_rank", kind=int),
             mamba_conv_bias="blk.0.ssm_conv1d.bias" in names, mamba_proj_bias="blk.0.ssm_in.bias" in names)
    c.pop("head_dim", None)
    c.pop("rotary_pct", None)


MAMBA = Family(
    model_type="mamba", architecture="MambaForCausalLM",
    defaults=dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=32, layer_norm_epsilon=1e-5,
                  expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True, hidden_act="silu",
                  initializer_range=0.1, time_step_rank="auto", tie_word_embeddings=True),
    attention="mamba",
    read_config=config_from_hf, write_config=config_to_hf, check=blockers,
    weight_anchor="norm_f.weight", top_weights=TOP, layer_from_hf=layer_from_hf, weights_to_hf=weights_to_hf,
    gguf_archs=("mamba",), gguf_from_metadata=gguf_from_metadata,
)
