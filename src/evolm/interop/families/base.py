"""What one model family is, as data: the ``Family`` record every family module fills in.

A family is one transformers ``model_type`` (and, where llama.cpp has one, its GGUF
architecture). Most families are the Llama decoder with a few switches flipped, so a family
declares those switches as fields (``norm_placement``, ``qk_norm``, ``attention_bias``,
``window``, ...) and the shared Llama schema in ``decoder.py`` applies them; what a switch
cannot say (MoE keys, soft-caps, DeepSeek's latent attention) goes in a small hook. A family
whose whole layout differs (GPT-2) replaces the schema functions themselves.

Fields are grouped by the four jobs the drivers (``interop/hf.py``, ``interop/gguf.py``) do
with a family: read config.json, write config.json (and say what blocks writing), rename
weights, read GGUF metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from evolm.config import ModelConfig
from evolm.interop.families import decoder


# ModelConfig parts that only some families can write, at the values that switch them off; a family
# lists the ones it writes in ``Family.parts`` (Llama 4: all of them)
OPTIONAL_PARTS = {"nope_layers": (), "attention_chunk_size": None, "attn_temperature_tuning": False,
                  "moe_layer_step": 1, "router_scales_input": False,
                  # the encoders' parts (bert.py, modernbert.py)
                  "embed_norm": False, "type_vocab_size": 0, "pos_offset": 0, "positions_from_mask": False,
                  "lm_head_bias": False, "head": "lm", "head_transform": False, "pooler": False,
                  "first_attn_norm": True, "global_layer_first": False,
                  # the encoder-decoders' parts (t5.py, bart.py)
                  "moe_first_layer": None, "expert_capacity": None, "moe_loss_groups": "layer", "encoder_layers": 0,
                  "head_input_scale": False,
                  # a vision model's image side (mllama.py)
                  "vision": None,
                  # the hybrids' parts (jamba.py)
                  "mixer_pattern": (), "mamba_dt_b_c_norm": False}


class Needs(list):
    """The reasons a family cannot express a config: ``need(ok, field, want)`` adds one when not ok."""

    def __init__(self, config: ModelConfig, model_type: str):
        super().__init__()
        self.config, self.model_type = config, model_type

    def __call__(self, ok: bool, field_name: str, want: str) -> None:
        if not ok:
            self.append(f"field '{field_name}' is {getattr(self.config, field_name, None)!r} "
                        f"but {self.model_type} needs {want}")


@dataclass(frozen=True)
class Family:
    """One transformers ``model_type``: its config schema both ways, weight names, blockers, GGUF keys."""

    model_type: str
    architecture: str  # the causal-LM class transformers instantiates (an encoder's: its masked-LM class)
    # Values transformers assumes when config.json leaves a key out (its config class's defaults;
    # tests/test_parity_hf.py::test_hf_defaults_match_transformers keeps them honest).
    defaults: Mapping[str, Any]
    aliases: Mapping[str, str] = field(default_factory=dict)  # other names for a key (attribute_map)
    wrappers: tuple[str, ...] = ()  # model_types that nest this one's config (Gemma 3's multimodal)
    unwrap: Callable[[dict], dict] | None = None  # wrapper config.json -> this family's config dict

    # --- the decoder's shape (decoder.py reads these; every switch has the Llama value by default) ----
    norm_placement: str = "pre"  # ModelConfig.norm_placement
    final_norm: bool = True  # a norm after the last block (GPT-1 has none)
    qk_norm: str | None = None  # ModelConfig.qk_norm
    qk_norm_flag: str | None = None  # a config.json key that switches qk_norm on or off (Llama 4's use_qk_norm)
    rope_interleave: bool = False  # RoPE rotates adjacent pairs (Llama 4's complex form), not halves
    parts: frozenset[str] = frozenset()  # the OPTIONAL_PARTS this family writes
    mask: str = "causal"  # ModelConfig.mask: "causal" for a decoder, "bidirectional" for an encoder
    unit_offset_norms: bool = False  # Gemma: RMSNorm scales by (1 + w) and embeddings by sqrt(d_model)
    attention: str = "mha"  # "mha" | "mla"
    attention_bias: str = "flag"  # "flag": one attention_bias key; "qkv": q/k/v only (Qwen2); "none"
    mlp_bias_key: bool = False  # config.json has an mlp_bias key
    activation_key: str = "hidden_act"
    activation_aliases: Mapping[str, str] = field(default_factory=dict)  # family-specific spellings
    window: str = "none"  # "none" | "every_layer" (one window, all layers) | "per_layer" (layer_types)
    window_switch: str | None = None  # a config key that must be true for the window to apply
    local_layers: Callable[[dict, int], list[bool]] | None = None  # rule when layer_types is absent
    local_rope_theta: float | None = None  # per-layer-type RoPE (Gemma 3): the local layers' default base
    query_scalar: bool = False  # config.json carries query_pre_attn_scalar and final_logit_softcapping
    attn_softcap: bool = False  # config.json's attn_logit_softcapping is applied (Gemma 2)
    experts: bool = False  # the family may have MoE layers (its blockers hook checks them)
    mtp: bool = False  # the layout stores multi-token prediction modules (DeepSeek-V3's num_nextn_predict_layers)
    expert_names: tuple[str, str, str, str] = ("mlp", "gate_proj", "up_proj", "down_proj")  # block, gate, up, down

    # --- hooks: the family's own keys on top of the shared schema -----------------------------------
    from_hf: Callable[[dict, dict], None] | None = None  # (config.json dict, ModelConfig kwargs)
    to_hf: Callable[[ModelConfig, dict], None] | None = None  # (config, config.json dict)
    blockers: Callable[[ModelConfig, Needs], None] | None = None
    finish_weights_to_hf: Callable[[dict, ModelConfig], None] | None = None
    # a weight outside the layers and top_weights (an encoder's task head) -> our name; "" for a known
    # weight the config does not use, None for an unknown one (families without it ignore such weights)
    outer_from_hf: Callable[[Family, ModelConfig, str], str | None] | None = None

    # --- the schema itself (GPT-2 replaces it) ------------------------------------------------------
    read_config: Callable[[Family, dict, dict], ModelConfig] = decoder.config_from_hf
    write_config: Callable[[Family, ModelConfig, dict], None] = decoder.config_to_hf
    check: Callable[[Family, ModelConfig, Needs], None] = decoder.blockers
    weight_anchor: str = "embed_tokens.weight"  # the embedding: its name's prefix is the model's prefix
    top_weights: Mapping[str, str] = field(default_factory=lambda: dict(decoder.TOP_WEIGHTS))
    layer_tag: str = "layers."
    layer_from_hf: Callable[..., bool] = decoder.layer_from_hf
    weights_to_hf: Callable[..., dict] = decoder.weights_to_hf
    # a layout the per-layer renaming cannot say (encoder-decoders: families/seq2seq.py):
    # (family, checkpoint tensors, config) -> ours, replacing the driver's walk
    weights_from_hf: Callable[..., dict] | None = None

    # --- GGUF (llama.cpp) ---------------------------------------------------------------------------
    gguf_archs: tuple[str, ...] = ()  # general.architecture values this family reads
    gguf_from_metadata: Callable[[Callable, dict, set, dict], None] | None = None  # (get, meta, names, kwargs)
    gguf_permute_qk: bool = False  # llama.cpp's converter permuted Q/K rows for its interleaved RoPE

    def activation(self, name: str | None) -> str:
        """Our activation name for the family's spelling of it."""
        return decoder.activation(self.activation_aliases.get(name, name), self.model_type)

    def cannot_express(self, config: ModelConfig) -> list[str]:
        """Why this family cannot express ``config`` (empty: it can)."""
        need = Needs(config, self.model_type)
        need(config.final_norm == self.final_norm, "final_norm", str(self.final_norm))
        for name, off in OPTIONAL_PARTS.items():
            need(name in self.parts or getattr(config, name) == off, name, repr(off))
        need(config.mask == self.mask, "mask", repr(self.mask) + (
            " (every decoder family attends causally)" if self.mask == "causal" else " (an encoder)"))
        self.check(self, config, need)
        return list(need)


def need_classic_block(c: ModelConfig, need: "Needs", placement: str) -> None:
    """The block GPT-2 and BERT share: full multi-head attention, LayerNorm with biases at ``placement``,
    learned positions, a plain (ungated) MLP."""
    need(c.attention == "mha" and c.n_kv_heads == c.n_heads, "n_kv_heads", "n_heads (multi-head attention)")
    need(c.head_dim * c.n_heads == c.d_model, "head_dim", "d_model // n_heads")
    need(c.norm == "layernorm" and c.norm_bias, "norm", "'layernorm' with norm_bias=True")
    need(c.norm_placement == placement, "norm_placement", f"'{placement}'")
    need(c.pos_emb == "learned", "pos_emb", "'learned'")
    need(c.mlp == "mlp", "mlp", "'mlp'")
