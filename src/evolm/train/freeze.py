"""Freezing parts of a model for one training stage (``train.freeze`` in a recipe).

Llama 3.2 Vision is trained in stages (Llama 3 herd, arXiv:2407.21783, sec. 7.4; as Flamingo,
arXiv:2204.14198): the language model's weights stay frozen while the image encoder, the projector
and the cross-attention layers learn to feed it, so its text abilities are kept intact; a later
stage may unfreeze more. A frozen parameter gets ``requires_grad=False``: the loop leaves it out
of the optimizer and of the checkpoints (``train/trainer.py``), as it does LoRA's base weights.

``freeze`` lists parts by name, or parameter-name patterns (``fnmatch``: ``layers.0.*``):

- ``text``: the text model: embeddings, self-attention layers, final norm, head (not its
  cross-attention layers);
- ``cross``: a vision model's cross-attention layers (``vision.cross_attention_layers``);
- ``vision``: the image encoder; ``projector``: the projector to the text width.
"""

from __future__ import annotations

import fnmatch
import re

PARTS = ("text", "cross", "vision", "projector")
_LAYER = re.compile(r"layers\.(\d+)\.")


def part_of(name: str, config) -> str:
    """Which part a parameter of a ``Transformer`` with this config belongs to."""
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith("multi_modal_projector."):
        return "projector"
    m = _LAYER.match(name)
    if m and config.layer_is_cross(int(m.group(1))):
        return "cross"
    return "text"


def frozen_names(model, freeze: list[str]) -> set[str]:
    """The parameter names ``freeze`` selects; a ValueError names an entry that selects nothing."""
    names = [n for n, _ in model.named_parameters()]
    out: set[str] = set()
    for entry in freeze:
        if not isinstance(entry, str):
            raise ValueError(f"train.freeze: entries are part names or patterns, got {entry!r}")
        hit = {n for n in names if part_of(n, model.config) == entry} if entry in PARTS else \
            set(fnmatch.filter(names, entry))
        if not hit:
            what = f"part {entry!r}" if entry in PARTS else f"pattern {entry!r}"
            raise ValueError(f"train.freeze: {what} matches no parameter of this model "
                             f"(parts: {', '.join(PARTS)}; or a pattern such as 'layers.0.*')")
        out |= hit
    if out and len(out) == len(names):
        raise ValueError(f"train.freeze: {freeze} freezes every parameter; nothing would train")
    return out


def freeze(model, freeze: list[str]) -> int:
    """Set ``requires_grad=False`` on the parameters ``freeze`` selects; returns how many values
    that freezes. An empty list changes nothing (a LoRA run's own freezing stays)."""
    chosen = frozen_names(model, freeze)
    n = 0
    for name, p in model.named_parameters():
        if name in chosen:
            p.requires_grad_(False)
            n += p.numel()
    return n


__all__ = ["PARTS", "part_of", "frozen_names", "freeze"]
