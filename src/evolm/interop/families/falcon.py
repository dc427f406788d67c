"""Falcon (Almazrouei et al. 2023, "The Falcon Series of Open Language Models"): transformers' ``falcon``.

A decoder with its own layout: LayerNorms with biases, RoPE, a plain MLP (``dense_h_to_4h`` ->
GELU -> ``dense_4h_to_h``), one ``bias`` flag for every linear, and q, k and v fused in one
``query_key_value`` matrix. Its config.json picks among three block wirings:

- Falcon-7B (``new_decoder_architecture=false``, ``parallel_attn=true``): attention and MLP in
  parallel from one LayerNorm (``input_layernorm``): our ``norm_placement="parallel"``, PaLM's
  block; ``multi_query=true`` is one K/V head (MQA).
- Falcon-40B/180B (``new_decoder_architecture=true``): attention and MLP in parallel, each with
  its own LayerNorm (``ln_attn``, ``ln_mlp``): ``norm_placement="parallel2"``; ``num_kv_heads``
  K/V groups (GQA). With ``num_ln_in_parallel_attn=1`` (Falcon2-11B) one norm again: ``"parallel"``.
- ``parallel_attn=false``: a pre-norm block (``input_layernorm``, ``post_attention_layernorm``).

``query_key_value`` holds its rows per K/V group: for each group, the group's query heads, then
its key head, then its value head (``FalconAttention._split_heads``). Multi-query (one group:
all queries, k, v) and plain multi-head (a group per head: q, k, v per head) are the same rule,
so one split and one fuse serve all three. llama.cpp's converter regroups the rows as all q, all
k, all v (its ``attn_qkv``), which the GGUF driver splits like GPT-2's. llama.cpp runs the MLP
with its tanh GELU where the released model (and transformers) use the exact one: a GGUF
``falcon`` reads as the exact GELU, the model the file was converted from.

``hidden_dropout`` reads as our ``resid_dropout``, which drops each branch where Falcon drops their
sum: the same model at inference, a slightly different noise in training.

Not supported (a ConfigError says so): ALiBi (``alibi=true``, Falcon-RW), the wirings
transformers' own ``FalconDecoderLayer`` cannot run, the pre-port ``RefinedWeb``/``RefinedWebModel``
config.json files (their hub repositories now carry ``falcon`` ones).
"""

from __future__ import annotations

from typing import Any

import torch

from evolm.config import ModelConfig
from evolm.interop.families.base import Family, Needs
from evolm.interop.families.decoder import ACT_TO_HF, err, rope_from_hf, scaling_from_hf, scaling_to_hf

TOP = {"word_embeddings.weight": "embed_tokens.weight", "ln_f.weight": "norm.weight", "ln_f.bias": "norm.bias"}
LAYER = {"self_attention.dense": "self_attn.o_proj", "mlp.dense_h_to_4h": "mlp.up_proj",
         "mlp.dense_4h_to_h": "mlp.down_proj"}
# transformers' per-layer norm names -> ours, by block wiring
NORMS = {"parallel": {"input_layernorm": "attn_norm"},
         "parallel2": {"ln_attn": "attn_norm", "ln_mlp": "mlp_norm"},
         "pre": {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}}
QKV = "self_attention.query_key_value"


# =========================================================================================
# config.json <-> ModelConfig
# =========================================================================================
def _wiring(h: dict) -> tuple[str, int]:
    """(our norm_placement, K/V heads) for the config.json's block flags, as FalconDecoderLayer reads them."""
    H = h["num_attention_heads"]
    n_ln = h.get("num_ln_in_parallel_attn")
    if h["new_decoder_architecture"]:
        if not h["parallel_attn"]:
            raise err("new_decoder_architecture=true with parallel_attn=false: transformers' FalconDecoderLayer "
                      "cannot run it (the new decoder architecture is always parallel)")
        if n_ln not in (None, 1, 2):
            raise err(f"num_ln_in_parallel_attn={n_ln}; expected 1 or 2")
        return ("parallel" if n_ln == 1 else "parallel2"), h.get("num_kv_heads") or H
    if h["parallel_attn"] and n_ln == 2:
        raise err("num_ln_in_parallel_attn=2 needs new_decoder_architecture=true (without it transformers' "
                  "FalconDecoderLayer has no input_layernorm to run)")
    kv = h.get("num_kv_heads")
    if not h["multi_query"] and kv not in (None, H):
        raise err(f"num_kv_heads={kv} with multi_query=false and new_decoder_architecture=false: the fused "
                  f"query_key_value then holds {H} K/V heads")
    return ("parallel" if h["parallel_attn"] else "pre"), 1 if h["multi_query"] else H


def config_from_hf(fam: Family, h: dict, meta: dict) -> ModelConfig:
    if h["alibi"]:
        raise err("alibi=true (ALiBi attention biases, as in Falcon-RW) is not supported; evolm reads the "
                  "rotary Falcon models (alibi=false)")
    d, H = h["hidden_size"], h["num_attention_heads"]
    if d % H:
        raise err(f"hidden_size {d} is not a multiple of num_attention_heads {H} (Falcon's head size is their ratio)")
    placement, kv = _wiring(h)
    glob, _ = rope_from_hf(h)
    if float(glob.get("partial_rotary_factor", 1.0)) != 1.0:
        raise err(f"partial_rotary_factor={glob['partial_rotary_factor']} is not supported for falcon")
    bias = bool(h["bias"])
    return ModelConfig(
        name="hf-falcon", vocab_size=h["vocab_size"], d_model=d, n_layers=h["num_hidden_layers"], n_heads=H,
        n_kv_heads=kv, d_ff=h.get("ffn_hidden_size") or 4 * d, max_seq_len=h["max_position_embeddings"],
        norm="layernorm", norm_eps=float(h["layer_norm_epsilon"]), norm_bias=True, norm_placement=placement,
        pos_emb="rope", rope_theta=float(glob["rope_theta"]), rope_scaling=scaling_from_hf(glob, h),
        qkv_bias=bias, o_bias=bias, mlp="mlp", mlp_bias=bias, activation=fam.activation(h["activation"]),
        tie_embeddings=bool(h["tie_word_embeddings"]), attn_dropout=float(h["attention_dropout"] or 0.0),
        resid_dropout=float(h["hidden_dropout"] or 0.0), init_std=float(h["initializer_range"]), meta=meta)


def config_to_hf(fam: Family, c: ModelConfig, out: dict) -> None:
    p = c.norm_placement
    new = p == "parallel2" or (p == "parallel" and c.n_kv_heads not in (1, c.n_heads))  # grouped K/V heads
    out.update(vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
               num_attention_heads=c.n_heads, num_kv_heads=c.n_kv_heads, ffn_hidden_size=c.d_ff,
               max_position_embeddings=c.max_seq_len, layer_norm_epsilon=c.norm_eps, bias=c.qkv_bias,
               activation=ACT_TO_HF[c.activation], alibi=False, new_decoder_architecture=new,
               multi_query=not new and c.n_kv_heads == 1, parallel_attn=p != "pre",
               num_ln_in_parallel_attn=(2 if p == "parallel2" else 1) if new else None,
               attention_dropout=c.attn_dropout, hidden_dropout=c.resid_dropout, rope_theta=c.rope_theta,
               rope_parameters=scaling_to_hf(c.rope_theta, c.rope_scaling))
    if c.rope_scaling is not None:  # read by transformers 4.x
        out["rope_scaling"] = {k: v for k, v in out["rope_parameters"].items() if k != "rope_theta"}


def blockers(fam: Family, c: ModelConfig, need: Needs) -> None:
    need(c.attention == "mha", "attention", "'mha'")
    need(c.head_dim * c.n_heads == c.d_model, "head_dim", "d_model // n_heads (falcon derives it)")
    need(c.norm == "layernorm" and c.norm_bias, "norm", "'layernorm' with norm_bias=True")
    need(c.norm_placement in NORMS, "norm_placement",
         "'parallel' (Falcon-7B), 'parallel2' (Falcon-40B) or 'pre' (parallel_attn=false)")
    if c.norm_placement == "pre":
        need(c.n_kv_heads in (1, c.n_heads), "n_kv_heads",
             "1 or n_heads with norm_placement 'pre' (grouped K/V heads come only with the parallel new decoder)")
    need(c.pos_emb == "rope", "pos_emb", "'rope'")
    need(c.rotary_pct == 1.0, "rotary_pct", "1.0")
    need(not c.rope_interleave, "rope_interleave", "False")
    need(c.rope_local_scaling is None, "rope_local_scaling", "None")
    need(c.mlp == "mlp", "mlp", "'mlp' (up -> activation -> down)")
    need(c.qkv_bias == c.o_bias == c.mlp_bias, "qkv_bias", "to equal o_bias and mlp_bias (one bias flag)")
    need(c.query_pre_attn_scalar in (None, c.head_dim), "query_pre_attn_scalar", "None")
    need(c.qk_norm is None, "qk_norm", "None")
    need(c.sliding_window is None, "sliding_window", "None")
    need(c.attn_softcap is None and c.final_softcap is None, "attn_softcap", "no soft-capping")
    need(not c.embed_scale, "embed_scale", "False")
    need(c.n_experts == 0, "n_experts", "0")


# =========================================================================================
# weights
# =========================================================================================
def split_qkv(t: torch.Tensor, c: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused rows (per K/V group: its query heads, its key head, its value head) -> q, k, v rows."""
    G, hd, rest = c.n_kv_heads, c.head_dim, t.shape[1:]
    g = t.reshape(G, c.n_heads // G + 2, hd, *rest)
    return (g[:, :-2].reshape(-1, *rest).contiguous(), g[:, -2].reshape(-1, *rest).contiguous(),
            g[:, -1].reshape(-1, *rest).contiguous())


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    """The inverse of :func:`split_qkv`."""
    G, hd, rest = c.n_kv_heads, c.head_dim, q.shape[1:]
    parts = (q.reshape(G, -1, hd, *rest), k.reshape(G, 1, hd, *rest), v.reshape(G, 1, hd, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest).contiguous()


def layer_from_hf(fam: Family, config: ModelConfig, name: str, t: torch.Tensor, i: int, out: dict,
                  experts: dict) -> bool:
    L = f"layers.{i}."
    mod, _, kind = name.rpartition(".")
    norms = NORMS.get(config.norm_placement, {})
    if mod == QKV:
        for part, rows in zip(("q_proj", "k_proj", "v_proj"), split_qkv(t, config)):
            out[f"{L}self_attn.{part}.{kind}"] = rows
    elif mod in norms:
        out[f"{L}{norms[mod]}.{kind}"] = t
    elif mod in LAYER:
        out[f"{L}{LAYER[mod]}.{kind}"] = t
    else:
        return False
    return True


def weights_to_hf(fam: Family, sd: dict[str, torch.Tensor], config: ModelConfig,
                  fused_experts: bool) -> dict[str, torch.Tensor]:
    inv = {v: k for k, v in {**LAYER, **NORMS[config.norm_placement]}.items()}
    top = {v: k for k, v in TOP.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, t in sd.items():
        if k == "lm_head.weight":
            out[k] = t
        elif not k.startswith("layers."):
            out["transformer." + top[k]] = t
        else:
            _, i, rest = k.split(".", 2)
            mod, _, kind = rest.rpartition(".")
            if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((i, kind), {})[mod.split(".")[1]] = t
            else:
                out[f"transformer.h.{i}.{inv[mod]}.{kind}"] = t
    for (i, kind), p in qkv.items():
        out[f"transformer.h.{i}.{QKV}.{kind}"] = fuse_qkv(p["q_proj"], p["k_proj"], p["v_proj"], config)
    return out


# =========================================================================================
# GGUF (llama.cpp's ``falcon``)
# =========================================================================================
def gguf_from_metadata(get, meta: dict, names: set, c: dict[str, Any]) -> None:
    """LayerNorms with biases, a GELU MLP, q|k|v fused as ``attn_qkv`` (all q, all k, all v: split by
    the reader); a second norm per block (``attn_norm_2``, feeding attention, while ``attn_norm``
    feeds the MLP) is Falcon-40B's two-norm block."""
    c.update(norm="layernorm", norm_bias=True, norm_eps=float(get("attention.layer_norm_epsilon", 1e-5, kind=float)),
             norm_placement="parallel2" if "blk.0.attn_norm_2.weight" in names else "parallel",
             mlp="mlp", activation="gelu", mlp_bias="blk.0.ffn_up.bias" in names,
             qkv_bias="blk.0.attn_qkv.bias" in names, o_bias="blk.0.attn_output.bias" in names)


FALCON = Family(
    model_type="falcon", architecture="FalconForCausalLM",
    defaults=dict(vocab_size=65024, hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
                  num_ln_in_parallel_attn=None, layer_norm_epsilon=1e-5, initializer_range=0.02,
                  hidden_dropout=0.0, attention_dropout=0.0, alibi=False, new_decoder_architecture=False,
                  multi_query=True, parallel_attn=True, bias=False, max_position_embeddings=2048,
                  rope_theta=10000.0, activation="gelu", tie_word_embeddings=True),
    aliases={"n_embed": "hidden_size"},
    norm_placement="parallel",
    read_config=config_from_hf, write_config=config_to_hf, check=blockers,
    weight_anchor="word_embeddings.weight", top_weights=TOP, layer_tag="h.", layer_from_hf=layer_from_hf,
    weights_to_hf=weights_to_hf,
    gguf_archs=("falcon",), gguf_from_metadata=gguf_from_metadata,
)
