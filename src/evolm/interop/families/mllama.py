"""Llama 3.2 Vision (transformers' ``mllama``): config.json and weight names both ways.

config.json nests a Llama-style ``text_config`` (read and written by the shared decoder schema,
``decoder.py``, plus ``cross_attention_layers``) and a ``vision_config`` (``VisionConfig``'s fields
under transformers' names). A vision model in evolm is the one ``Transformer`` with ``ModelConfig.vision`` set: its image
encoder (``vision_model``, ``nn/vision.py``), the projector (``multi_modal_projector``) and the text
layers, of which ``vision.cross_attention_layers`` cross-attend the image. transformers nests the
three under ``model.`` and names the vision blocks as CLIP does; the renames below are the whole
difference.
"""

from __future__ import annotations

from evolm.config import ConfigError, ModelConfig, VisionConfig
from evolm.interop.empty import WeightsError
from evolm.interop.families import decoder
from evolm.interop.families.base import Family, Needs

# transformers 5's module prefix -> ours; then the Hub checkpoints' older layout (transformers 4)
PREFIXES = (("model.vision_model.", "vision_model."), ("model.multi_modal_projector.", "multi_modal_projector."),
            ("model.language_model.", ""), ("lm_head.", "lm_head."),
            ("vision_model.", "vision_model."), ("multi_modal_projector.", "multi_modal_projector."),
            ("language_model.model.", ""), ("language_model.lm_head.", "lm_head."))
# inside the vision encoder: its two stacks
VISION_STACKS = (("global_transformer.layers.", "global_layers."), ("transformer.layers.", "layers."))
# the last parts of a block's weight names (vision blocks: CLIP's MLP and gate names)
LEAVES = ((".mlp.fc1.", ".mlp.up_proj."), (".mlp.fc2.", ".mlp.down_proj."),
          (".input_layernorm.", ".attn_norm."), (".post_attention_layernorm.", ".mlp_norm."),
          (".gate_attn", ".attn_gate"), (".gate_ffn", ".mlp_gate"),
          (".cross_attn_attn_gate", ".attn_gate"), (".cross_attn_mlp_gate", ".mlp_gate"))


def name_from_hf(name: str) -> str | None:
    """A transformers Mllama weight name -> ours (None: not a weight of this layout)."""
    for theirs, ours in PREFIXES:
        if name.startswith(theirs):
            rest = name[len(theirs):]
            break
    else:
        return None
    if ours == "vision_model.":
        for t, o in VISION_STACKS:
            if rest.startswith(t):
                rest = o + rest[len(t):]
                break
    for t, o in LEAVES:
        rest = rest.replace(t, o)
    return ours + rest


def name_to_hf(name: str, cross_layers: tuple[int, ...]) -> str:
    """Our weight name -> transformers'. ``cross_layers``: the text layers that cross-attend (their
    gates are ``cross_attn_attn_gate`` / ``cross_attn_mlp_gate``)."""
    if name.startswith("vision_model."):
        rest = name[len("vision_model."):]
        for t, o in VISION_STACKS:
            if rest.startswith(o):
                rest = t + rest[len(o):]
                break
        for t, o in LEAVES[:6]:
            rest = rest.replace(o, t)
        return "model.vision_model." + rest
    if name.startswith(("multi_modal_projector.", "lm_head.")):
        return ("model." if name.startswith("multi") else "") + name
    for t, o in LEAVES[2:4]:
        name = name.replace(o, t)
    name = name.replace(".attn_gate", ".cross_attn_attn_gate").replace(".mlp_gate", ".cross_attn_mlp_gate")
    return "model.language_model." + name


def state_dict_from_hf(sd: dict) -> dict:
    """A transformers Mllama state dict -> ours (every weight renamed; an unknown name is an error)."""
    out, unknown = {}, []
    for k, v in sd.items():
        ours = name_from_hf(k)
        if ours is None:
            unknown.append(k)
        else:
            out[ours] = v
    if unknown:
        raise WeightsError(f"{len(unknown)} weights of the mllama checkpoint have no place in evolm's model, "
                           f"e.g. {unknown[:5]}")
    return out


# =========================================================================================
# config.json
# =========================================================================================
# transformers 5.23's MllamaTextConfig / MllamaVisionConfig defaults (the 11B checkpoint's shape)
TEXT_DEFAULTS = dict(vocab_size=128256, hidden_size=4096, hidden_act="silu", num_hidden_layers=40,
                     num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, rope_theta=500000.0,
                     rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False,
                     cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], initializer_range=0.02)
VISION_DEFAULTS = dict(hidden_size=1280, hidden_act="gelu", num_hidden_layers=32, num_global_layers=8,
                       attention_heads=16, num_channels=3, intermediate_size=5120, vision_output_dim=7680,
                       image_size=448, patch_size=14, norm_eps=1e-5, max_num_tiles=4,
                       intermediate_layers_indices=[3, 7, 15, 23, 30],
                       supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]])
# VisionConfig field <- vision_config key
VISION_KEYS = dict(d_model="hidden_size", n_layers="num_hidden_layers", n_global_layers="num_global_layers",
                   n_heads="attention_heads", d_ff="intermediate_size", image_size="image_size",
                   patch_size="patch_size", num_channels="num_channels", max_num_tiles="max_num_tiles",
                   norm_eps="norm_eps", intermediate_layers="intermediate_layers_indices",
                   supported_aspect_ratios="supported_aspect_ratios")
EXTRA_TOKEN_ROWS = 8  # MllamaTextModel's embedding has vocab_size + 8 rows


def _sub(h: dict, key: str) -> dict:
    v = h.get(key) or {}
    if not isinstance(v, dict):
        raise ConfigError(f"config.json: {key} is {type(v).__name__}; expected an object")
    return v


def config_from_hf(fam: Family, h: dict, meta: dict) -> ModelConfig:
    """An mllama config.json -> a ModelConfig whose ``vision`` holds the image side."""
    text = {**TEXT_DEFAULTS, **({"initializer_range": h["initializer_range"]} if "initializer_range" in h else {}),
            **_sub(h, "text_config")}
    vis = {**VISION_DEFAULTS, **_sub(h, "vision_config")}
    if "rope_theta" not in _sub(h, "text_config") and isinstance(text.get("rope_parameters"), dict):
        text["rope_theta"] = text["rope_parameters"].get("rope_theta", text["rope_theta"])
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if text.get(k) is not None:
            meta["hf"][k] = text[k]
    c = decoder.config_from_hf(fam, text, meta)
    v = VisionConfig(**{f: vis[k] for f, k in VISION_KEYS.items()}, activation=decoder.activation(vis["hidden_act"], "mllama"),
                     cross_attention_layers=tuple(text["cross_attention_layers"]), extra_token_rows=EXTRA_TOKEN_ROWS,
                     image_token_id=int(h.get("image_token_index", 128256)))
    if vis["vision_output_dim"] != v.output_dim:
        raise ConfigError(f"config.json: vision_config.vision_output_dim is {vis['vision_output_dim']}; the encoder "
                          f"gives hidden_size * (1 + len(intermediate_layers_indices)) = {v.output_dim}")
    return c.replace(vision=v)


def config_to_hf(fam: Family, c: ModelConfig, out: dict) -> None:
    """A vision ModelConfig -> an mllama config.json (``out`` holds the keys every family writes)."""
    v = c.vision
    if v.fusion != "cross_attention":
        raise ConfigError(f"vision.fusion={v.fusion!r} (image states as tokens, LLaVA-style) has no mllama "
                          f"config.json; only fusion='cross_attention' exports")
    text = {"model_type": "mllama_text_model", "tie_word_embeddings": out.pop("tie_word_embeddings"),
            "initializer_range": out["initializer_range"]}
    decoder.config_to_hf(fam, c, text)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in out:
            text[k] = out.pop(k)
    text.pop("head_dim", None)  # MllamaTextConfig derives it from hidden_size
    text["cross_attention_layers"] = list(v.cross_attention_layers)
    vision = {"model_type": "mllama_vision_model", "hidden_act": decoder.ACT_TO_HF[v.activation],
              "vision_output_dim": v.output_dim, "initializer_range": c.init_std}
    for f, k in VISION_KEYS.items():
        val = getattr(v, f)
        vision[k] = [list(x) if isinstance(x, tuple) else x for x in val] if isinstance(val, tuple) else val
    out.update(text_config=text, vision_config=vision, image_token_index=v.image_token_id)


def blockers(fam: Family, c: ModelConfig, need: Needs) -> None:
    """What an mllama config.json cannot say: a text model without images, or another text stack."""
    decoder.blockers(fam, c, need)
    need(c.vision is not None, "vision", "a VisionConfig (an image encoder)")
    need(c.head_dim * c.n_heads == c.d_model, "head_dim", "d_model // n_heads")
    if c.vision is not None:
        need(c.vision.extra_token_rows == EXTRA_TOKEN_ROWS, "vision", f"extra_token_rows={EXTRA_TOKEN_ROWS}")
        need(c.vision.activation in decoder.ACT_TO_HF, "vision", "an activation transformers names")


def weights_from_hf(fam: Family, sd: dict, config: ModelConfig) -> dict:
    return state_dict_from_hf(sd)


def weights_to_hf(fam: Family, sd: dict, config: ModelConfig, fused_experts: bool = False) -> dict:
    return {name_to_hf(k, config.vision.cross_attention_layers): t for k, t in sd.items()}


MLLAMA = Family(
    model_type="mllama", architecture="MllamaForConditionalGeneration", defaults={"image_token_index": 128256},
    attention_bias="none", parts=frozenset({"vision"}),
    read_config=config_from_hf, write_config=config_to_hf, check=blockers,
    weights_from_hf=weights_from_hf, weights_to_hf=weights_to_hf,
)

__all__ = ["MLLAMA", "name_from_hf", "name_to_hf", "state_dict_from_hf"]
