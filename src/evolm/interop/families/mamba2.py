"""Mamba-2 (Dao & Gu 2024, arXiv:2405.21060): transformers' ``mamba2`` (``Mamba2ForCausalLM``).

A stack of mixer-only blocks, ``x = x + mixer(rmsnorm(x))``, with no MLP and no positions:
our ``attention="mamba2"``, ``mlp="none"``, ``pos_emb="none"``, pre-norm RMSNorm and a final
``norm_f``. The mixer's own weights carry transformers' names already (``nn/mamba2.py``), so
only the block's prefix changes: ``backbone.layers.{i}.mixer.*`` -> ``layers.{i}.self_attn.*``,
``backbone.layers.{i}.norm`` -> ``layers.{i}.attn_norm``, ``backbone.embeddings`` ->
``embed_tokens``, ``backbone.norm_f`` -> ``norm``.

Config keys map to the ``mamba_*`` fields one to one (``state_size`` -> ``mamba_d_state``,
``head_dim`` -> ``mamba_d_head`` ...).
``num_heads`` must equal ``expand * hidden_size / head_dim`` (transformers checks the same);
``time_step_rank`` is Mamba-1's and unused by Mamba-2; ``residual_in_fp32`` keeps transformers'
residual stream in float32 under bf16 weights, which our blocks do not (the same model in float32).
The model has no position limit; ``max_seq_len`` (not in config.json) reads as 1M tokens.
"""

from __future__ import annotations

import math

from evolm.config import ModelConfig
from evolm.interop.families.base import Family, Needs
from evolm.interop.families.decoder import err
# the checkpoint layout is Mamba's (backbone.layers.i.mixer.* / .norm): the same weight names both ways
from evolm.interop.families.mamba import TOP, layer_from_hf, weights_to_hf

NO_LIMIT = 1 << 20  # max_seq_len of a model whose state does not grow with the sequence


def config_from_hf(fam: Family, h: dict, meta: dict) -> ModelConfig:
    if h["hidden_act"] != "silu":
        raise err(f"hidden_act={h['hidden_act']!r}: Mamba-2's convolution and gate use 'silu'")
    d, expand, hd = h["hidden_size"], h["expand"], h["head_dim"]
    if expand * d != h["num_heads"] * hd:
        raise err(f"num_heads ({h['num_heads']}) * head_dim ({hd}) must equal expand ({expand}) * hidden_size ({d})")
    lo, hi = (float(v) for v in h["time_step_limit"])
    return ModelConfig(
        name="hf-mamba2", vocab_size=h["vocab_size"], d_model=d, n_layers=h["num_hidden_layers"], n_heads=1,
        max_seq_len=NO_LIMIT, norm="rmsnorm", norm_eps=float(h["layer_norm_epsilon"]), norm_placement="pre",
        pos_emb="none", attention="mamba2", mlp="none", mlp_bias=False, tie_embeddings=bool(h["tie_word_embeddings"]),
        mamba_d_state=h["state_size"], mamba_d_head=hd, mamba_n_groups=h["n_groups"], mamba_expand=expand,
        mamba_d_conv=h["conv_kernel"], mamba_chunk_size=h["chunk_size"], mamba_proj_bias=bool(h["use_bias"]),
        mamba_conv_bias=bool(h["use_conv_bias"]), mamba_dt_min=float(h["time_step_min"]),
        mamba_dt_max=float(h["time_step_max"]), mamba_dt_floor=float(h["time_step_floor"]),
        mamba_dt_limit=None if (lo, hi) == (0.0, math.inf) else (lo, hi),
        init_std=float(h["initializer_range"]), meta=meta)


def config_to_hf(fam: Family, c: ModelConfig, out: dict) -> None:
    inner = c.mamba_expand * c.d_model
    out.update(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
               layer_norm_epsilon=c.norm_eps, num_heads=inner // c.mamba_d_head, head_dim=c.mamba_d_head,
               state_size=c.mamba_d_state, n_groups=c.mamba_n_groups, expand=c.mamba_expand,
               conv_kernel=c.mamba_d_conv, chunk_size=c.mamba_chunk_size, use_bias=c.mamba_proj_bias,
               use_conv_bias=c.mamba_conv_bias, hidden_act="silu", time_step_min=c.mamba_dt_min,
               time_step_max=c.mamba_dt_max, time_step_floor=c.mamba_dt_floor,
               time_step_limit=list(c.mamba_dt_limit or (0.0, math.inf)), residual_in_fp32=True)


def blockers(fam: Family, c: ModelConfig, need: Needs) -> None:
    need(c.attention == "mamba2", "attention", "'mamba2'")
    need(c.mlp == "none", "mlp", "'none' (mixer-only blocks)")
    need(c.n_experts == 0, "n_experts", "0")
    need(c.norm == "rmsnorm" and not c.norm_unit_offset, "norm", "'rmsnorm'")
    need(c.norm_placement == "pre", "norm_placement", "'pre'")
    need(c.pos_emb == "none", "pos_emb", "'none'")
    need(not c.embed_scale, "embed_scale", "False")
    need(c.final_softcap is None, "final_softcap", "None")


MAMBA2 = Family(
    model_type="mamba2", architecture="Mamba2ForCausalLM",
    defaults=dict(num_heads=128, head_dim=64, vocab_size=32768, hidden_size=4096, state_size=128,
                  num_hidden_layers=64, layer_norm_epsilon=1e-5, expand=2, conv_kernel=4, n_groups=8,
                  use_bias=False, use_conv_bias=True, hidden_act="silu", initializer_range=0.1,
                  residual_in_fp32=True, time_step_min=0.001, time_step_max=0.1, time_step_floor=1e-4,
                  time_step_limit=(0.0, math.inf), chunk_size=256, tie_word_embeddings=False),
    read_config=config_from_hf, write_config=config_to_hf, check=blockers,
    weight_anchor="embeddings.weight", top_weights=TOP, layer_from_hf=layer_from_hf, weights_to_hf=weights_to_hf,
)
