"""An empty model, then a file's tensors assigned into it: the one way a loader builds a model.

``build_empty(config)`` builds the model on the meta device: no memory is allocated and no random
initialisation runs for weights that are about to be overwritten (for a 7B model that is tens of
gigabytes and tens of seconds saved). ``assign_weights`` then makes the file's tensors the
parameters themselves (``load_state_dict(assign=True)``: no copy, the tensors keep their dtype and
device) and computes the RoPE tables, which are derived from the config and never stored, next
to the weights. A tensor left on the meta device afterwards is an error, not a silent crash at
the first forward pass.

Every loader (evolm checkpoints, Hugging Face folders, GGUF files) goes through these two steps,
so a new format or a new model kind has one place to learn them from.
"""

from __future__ import annotations

import torch

from evolm.config import ModelConfig


def build_empty(config: ModelConfig):
    """The model ``config`` describes, with every parameter and buffer on the meta device."""
    from evolm.model import build

    return build(config, device="meta")


def assign_weights(model, state: dict[str, torch.Tensor], source: str = "checkpoint"):
    """``model`` (from :func:`build_empty`) holding ``state`` (our parameter names), RoPE tables
    recomputed; raises a ValueError naming ``source`` when the names do not match the config."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise ValueError(f"{source}: weights do not fit the config: {e}") from None
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.reset_buffers()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{source}: internal error, tensors left unmaterialised: {left[:5]}")
    return model


__all__ = ["build_empty", "assign_weights"]
