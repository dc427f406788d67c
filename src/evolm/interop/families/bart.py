"""BART (Lewis et al. 2019, arXiv:1910.13461): transformers' ``bart``.

A denoising sequence-to-sequence model with the original Transformer's post-norm blocks
(LayerNorm with biases after each residual sum, no final norm), biases everywhere, an exact-GELU
MLP, learned positions whose table is shifted by 2 (``pos_offset``: rows 0-1 were reserved by
fairseq), a LayerNorm right after the embedding sum in each stack (``embed_norm``), optional
``sqrt(d_model)`` embedding scaling (``scale_embedding`` -> ``embed_scale``) and a bias on the
head (``final_logits_bias`` -> ``lm_head_bias``: ``head.bias`` when tied, ``lm_head.bias`` when not;
a buffer in transformers, a parameter here, as BERT's tied decoder bias). The decoder starts from ``</s>`` (2).
"""

from __future__ import annotations

from typing import Any

import torch

from evolm.config import ModelConfig
from evolm.interop.families import seq2seq
from evolm.interop.families.base import Family, Needs
from evolm.interop.families.decoder import ACT_TO_HF, err

COPIES = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")


def config_from_hf(fam: Family, h: dict, meta: dict) -> ModelConfig:
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if h[a] != h[b]:
            raise err(f"{a} ({h[a]}) differs from {b} ({h[b]}); evolm's stacks share n_heads and d_ff")
    dropout = float(h.get("dropout") or 0.0)
    return ModelConfig(
        name="hf-bart", vocab_size=h["vocab_size"], d_model=h["d_model"], n_layers=h["decoder_layers"],
        encoder_layers=h["encoder_layers"], n_heads=h["decoder_attention_heads"], d_ff=h["decoder_ffn_dim"],
        max_seq_len=h["max_position_embeddings"], norm="layernorm", norm_eps=1e-5, norm_bias=True,
        norm_placement="post", final_norm=False, pos_emb="learned", pos_offset=2, embed_norm=True,
        embed_scale=bool(h.get("scale_embedding")), qkv_bias=True, o_bias=True, mlp="mlp", mlp_bias=True,
        activation=fam.activation(h["activation_function"]), tie_embeddings=bool(h["tie_word_embeddings"]),
        lm_head_bias=True, decoder_start_token_id=int(h["decoder_start_token_id"]),
        attn_dropout=float(h.get("attention_dropout") or 0.0), resid_dropout=dropout, embd_dropout=dropout,
        init_std=float(h["init_std"]), meta=meta)


def config_to_hf(fam: Family, c: ModelConfig, out: dict) -> None:
    out.update(vocab_size=c.vocab_size, d_model=c.d_model, encoder_layers=c.encoder_layers, decoder_layers=c.n_layers,
               encoder_attention_heads=c.n_heads, decoder_attention_heads=c.n_heads, encoder_ffn_dim=c.d_ff,
               decoder_ffn_dim=c.d_ff, max_position_embeddings=c.max_seq_len, scale_embedding=c.embed_scale,
               activation_function=ACT_TO_HF[c.activation], decoder_start_token_id=c.decoder_start_token_id,
               dropout=c.resid_dropout, attention_dropout=c.attn_dropout, activation_dropout=0.0,
               is_encoder_decoder=True, forced_eos_token_id=None)
    out["init_std"] = out.pop("initializer_range")


def blockers(fam: Family, c: ModelConfig, need: Needs) -> None:
    need(c.encoder_layers > 0, "encoder_layers", "> 0 (an encoder-decoder)")
    need(c.norm == "layernorm" and c.norm_bias and c.norm_eps == 1e-5, "norm", "'layernorm' with biases, eps 1e-5")
    need(c.norm_placement == "post", "norm_placement", "'post'")
    need(c.pos_emb == "learned" and c.pos_offset == 2, "pos_offset", "2 with pos_emb='learned'")
    need(c.embed_norm and not c.type_vocab_size and not c.positions_from_mask, "embed_norm",
         "True (layernorm_embedding), without token types or mask-counted positions")
    need(c.qkv_bias and c.o_bias and c.mlp_bias and c.mlp == "mlp", "mlp_bias",
         "a plain MLP and every bias (qkv_bias, o_bias, mlp_bias True)")
    need(c.n_kv_heads == c.n_heads and c.head_dim * c.n_heads == c.d_model, "n_kv_heads",
         "n_heads, head_dim d_model // n_heads")
    need(c.query_pre_attn_scalar in (None, c.head_dim), "query_pre_attn_scalar", "None")
    need(c.lm_head_bias, "lm_head_bias", "True (final_logits_bias)")
    need(c.resid_dropout == c.embd_dropout, "embd_dropout", "resid_dropout (one dropout)")
    need(c.sliding_window is None and c.attn_softcap is None and c.final_softcap is None and c.qk_norm is None,
         "sliding_window", "None (and no soft-capping or QK-norm)")
    need(not c.head_input_scale, "head_input_scale", "False")
    need(c.n_experts == 0, "n_experts", "0")


def names(c: ModelConfig) -> list[tuple[str, Any]]:
    """Every (transformers name, our name) of a BART model of config ``c`` (the head's bias apart)."""
    out: list[tuple[str, Any]] = [("model.shared.weight", "embed_tokens.weight")]
    if not c.tie_embeddings:
        out.append(("lm_head.weight", "lm_head.weight"))
    wb = ("weight", "bias")
    for stack, ours, sc in seq2seq.stacks(c):
        P = f"model.{stack}."
        out += [(f"{P}embed_positions.weight", f"{ours}pos_embed.weight")]
        out += [(f"{P}layernorm_embedding.{k}", f"{ours}embed_norm.{k}") for k in wb]
        for i in range(sc.n_layers):
            H, L = f"{P}layers.{i}.", f"{ours}layers.{i}."
            mods = [("self_attn.q_proj", "self_attn.q_proj"), ("self_attn.k_proj", "self_attn.k_proj"),
                    ("self_attn.v_proj", "self_attn.v_proj"), ("self_attn.out_proj", "self_attn.o_proj"),
                    ("self_attn_layer_norm", "attn_norm"), ("fc1", "mlp.up_proj"), ("fc2", "mlp.down_proj"),
                    ("final_layer_norm", "mlp_norm")]
            if stack == "decoder":
                mods += [("encoder_attn.q_proj", "cross_attn.q_proj"), ("encoder_attn.k_proj", "cross_attn.k_proj"),
                         ("encoder_attn.v_proj", "cross_attn.v_proj"), ("encoder_attn.out_proj", "cross_attn.o_proj"),
                         ("encoder_attn_layer_norm", "cross_norm")]
            out += [(f"{H}{a}.{k}", f"{L}{b}.{k}") for a, b in mods for k in wb]
    return out


def _head_bias(c: ModelConfig) -> str:
    return "head.bias" if c.tie_embeddings else "lm_head.bias"  # nn/heads.py holds a tied head's bias


def weights_from_hf(fam: Family, sd: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    bias = sd.pop("final_logits_bias", None)  # a (1, vocab) buffer, zeros when absent (as transformers makes it)
    out = seq2seq.weights_from_hf(names, COPIES, sd, c)
    out[_head_bias(c)] = bias.reshape(-1) if bias is not None else torch.zeros(c.vocab_size)
    return out


def weights_to_hf(fam: Family, sd: dict[str, torch.Tensor], c: ModelConfig, fused: bool) -> dict[str, torch.Tensor]:
    out = seq2seq.weights_to_hf(names, sd, c)
    out["final_logits_bias"] = sd[_head_bias(c)].reshape(1, -1).contiguous()
    for copy in COPIES[:2]:  # transformers 5 unties these too when tie_word_embeddings is false
        out[copy] = sd["embed_tokens.weight"].clone()
    return out


BART = Family(
    model_type="bart", architecture="BartForConditionalGeneration", final_norm=False,
    defaults=dict(vocab_size=50265, max_position_embeddings=1024, encoder_layers=12, encoder_ffn_dim=4096,
                  encoder_attention_heads=16, decoder_layers=12, decoder_ffn_dim=4096, decoder_attention_heads=16,
                  activation_function="gelu", d_model=1024, dropout=0.1, attention_dropout=0.0, init_std=0.02,
                  scale_embedding=False, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                  tie_word_embeddings=True),
    aliases={"num_attention_heads": "encoder_attention_heads", "hidden_size": "d_model",
             "num_hidden_layers": "encoder_layers"},
    parts=frozenset({"encoder_layers", "lm_head_bias", "embed_norm", "pos_offset"}), read_config=config_from_hf, write_config=config_to_hf,
    check=blockers,
    weights_from_hf=weights_from_hf, weights_to_hf=weights_to_hf,
)
