"""GPT-2 (Radford et al. 2019): the one family whose layout is not Llama's.

Its config.json has its own key names (``n_embd``, ``n_layer``, ...), LayerNorm with biases and
learned positions; its weights are Conv1D modules stored (in, out), with q|k|v fused into one
``c_attn``. So GPT-2 replaces the shared decoder schema's functions instead of flipping switches.
"""

from __future__ import annotations

from typing import Any

import torch

from evolm.config import ModelConfig
from evolm.interop.families.base import Family, Needs, need_classic_block
from evolm.interop.families.decoder import ACT_TO_HF, err

# ours <- transformers' per-layer module names
LAYER = {"ln_1": "attn_norm", "ln_2": "mlp_norm", "attn.c_proj": "self_attn.o_proj",
         "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
TOP = {"wte.weight": "embed_tokens.weight", "wpe.weight": "pos_embed.weight",
       "ln_f.weight": "norm.weight", "ln_f.bias": "norm.bias"}


def config_from_hf(fam: Family, h: dict, meta: dict) -> ModelConfig:
    if h.get("scale_attn_by_inverse_layer_idx"):
        raise err("scale_attn_by_inverse_layer_idx=true is not supported")
    if h.get("add_cross_attention"):
        raise err("add_cross_attention=true (an encoder-decoder) is not supported")
    d = h["n_embd"]
    return ModelConfig(
        name="hf-gpt2", vocab_size=h["vocab_size"], d_model=d, n_layers=h["n_layer"], n_heads=h["n_head"],
        d_ff=h.get("n_inner") or 4 * d, max_seq_len=h["n_positions"], norm="layernorm",
        norm_eps=float(h["layer_norm_epsilon"]), norm_bias=True, norm_placement="pre", pos_emb="learned",
        qkv_bias=True, o_bias=True, mlp="mlp", mlp_bias=True, activation=fam.activation(h["activation_function"]),
        query_pre_attn_scalar=None if h["scale_attn_weights"] else 1.0,
        tie_embeddings=bool(h["tie_word_embeddings"]), attn_dropout=float(h["attn_pdrop"]),
        resid_dropout=float(h["resid_pdrop"]), embd_dropout=float(h["embd_pdrop"]),
        init_std=float(h["initializer_range"]), meta=meta)


def config_to_hf(fam: Family, c: ModelConfig, out: dict) -> None:
    out.update(vocab_size=c.vocab_size, n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads,
               n_inner=c.d_ff, n_positions=c.max_seq_len, layer_norm_epsilon=c.norm_eps,
               activation_function={"gelu_tanh": "gelu_new"}.get(c.activation, ACT_TO_HF[c.activation]),
               scale_attn_weights=c.query_pre_attn_scalar != 1.0, resid_pdrop=c.resid_dropout,
               embd_pdrop=c.embd_dropout, attn_pdrop=c.attn_dropout)


def blockers(fam: Family, c: ModelConfig, need: Needs) -> None:
    need_classic_block(c, need, "pre")
    need(c.qkv_bias and c.o_bias and c.mlp_bias, "qkv_bias", "qkv_bias, o_bias and mlp_bias all True")
    need(c.query_pre_attn_scalar in (None, 1.0, c.head_dim), "query_pre_attn_scalar", "None")
    need(c.qk_norm is None, "qk_norm", "None")
    need(c.sliding_window is None, "sliding_window", "None")
    need(c.attn_softcap is None and c.final_softcap is None, "attn_softcap", "no soft-capping")
    need(not c.embed_scale, "embed_scale", "False")
    need(c.n_experts == 0, "n_experts", "0")


def layer_from_hf(fam: Family, config: ModelConfig, name: str, t: torch.Tensor, i: int, out: dict,
                  experts: dict) -> bool:
    L = f"layers.{i}."
    mod, _, kind = name.rpartition(".")
    if mod == "attn.c_attn":  # fused q|k|v, Conv1D stores (in, out)
        w = t.t() if kind == "weight" else t
        for part, chunk in zip(("q_proj", "k_proj", "v_proj"), w.chunk(3, dim=0)):
            out[f"{L}self_attn.{part}.{kind}"] = chunk.contiguous()
        return True
    if mod in LAYER:
        is_conv = kind == "weight" and not mod.startswith("ln_")
        out[f"{L}{LAYER[mod]}.{kind}"] = t.t().contiguous() if is_conv else t
        return True
    return False


def weights_to_hf(fam: Family, sd: dict[str, torch.Tensor], config: ModelConfig,
                  fused_experts: bool) -> dict[str, torch.Tensor]:
    """Ours -> the Conv1D layout (shared with GPT-1, whose top-level names differ: ``fam.top_weights``)."""
    inv, top = {v: k for k, v in LAYER.items()}, {v: k for k, v in fam.top_weights.items()}
    out: dict[str, torch.Tensor] = {}
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
            out["transformer." + top[k]] = t
    for (i, kind), parts in qkv.items():
        w = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
        out[f"transformer.h.{i}.attn.c_attn.{kind}"] = w.t().contiguous() if kind == "weight" else w
    return out


def gguf_from_metadata(get, meta: dict, names: set, c: dict[str, Any]) -> None:
    """llama.cpp's ``gpt2``: LayerNorm with biases, learned positions (``position_embd``), a GELU
    (tanh) MLP with biases, q|k|v fused as ``attn_qkv`` (split by the reader)."""
    c.update(norm="layernorm", norm_bias=True, norm_eps=float(get("attention.layer_norm_epsilon", 1e-5, kind=float)),
             pos_emb="learned", mlp="mlp", activation="gelu_tanh", mlp_bias="blk.0.ffn_up.bias" in names,
             qkv_bias="blk.0.attn_qkv.bias" in names, o_bias="blk.0.attn_output.bias" in names)


GPT2 = Family(
    model_type="gpt2", architecture="GPT2LMHeadModel",
    defaults=dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                  activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_weights=True,
                  scale_attn_by_inverse_layer_idx=False, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                  tie_word_embeddings=True, initializer_range=0.02),
    aliases={"hidden_size": "n_embd", "max_position_embeddings": "n_positions", "num_attention_heads": "n_head",
             "num_hidden_layers": "n_layer"},
    read_config=config_from_hf, write_config=config_to_hf, check=blockers,
    weight_anchor="wte.weight", top_weights=TOP, layer_tag="h.", layer_from_hf=layer_from_hf,
    weights_to_hf=weights_to_hf,
    gguf_archs=("gpt2",), gguf_from_metadata=gguf_from_metadata,
)
