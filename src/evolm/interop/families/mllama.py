"""Llama 3.2 Vision (transformers' ``mllama``): weight names both ways.

A vision model in evolm is the one ``Transformer`` with ``ModelConfig.vision`` set: its image
encoder (``vision_model``, ``nn/vision.py``), the projector (``multi_modal_projector``) and the text
layers, of which ``vision.cross_attention_layers`` cross-attend the image. transformers nests the
three under ``model.`` and names the vision blocks as CLIP does; the renames below are the whole
difference.
"""

from __future__ import annotations

# transformers' module prefix -> ours
PREFIXES = (("model.vision_model.", "vision_model."), ("model.multi_modal_projector.", "multi_modal_projector."),
            ("model.language_model.", ""), ("lm_head.", "lm_head."))
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
    if theirs == "model.vision_model.":
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
    out = {}
    for k, v in sd.items():
        ours = name_from_hf(k)
        if ours is None:
            raise KeyError(f"mllama: unexpected weight {k!r}")
        out[ours] = v
    return out


__all__ = ["name_from_hf", "name_to_hf", "state_dict_from_hf"]
