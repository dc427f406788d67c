"""The one walk that swaps a model's linear layers for other layers (quantized ones, a file's blocks).

Every weight format (int8, int4, NF4, a GGUF file's blocks) is a module that takes an
``nn.Linear``'s place; only the choice of what replaces which layer differs. So one function walks
the tree and a format supplies ``make(name, linear)``: the new layer, or None to keep it (as
gpt-fast's ``quantize.py`` swaps ``nn.Linear`` modules by one walker).
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

MakeLayer = Callable[[str, nn.Linear], "nn.Module | None"]


def replace_linears(model: nn.Module, make: MakeLayer) -> int:
    """Replace each ``nn.Linear`` of ``model`` by ``make(full name, layer)`` unless that is None
    (in place); returns how many were replaced.

    The modules are listed once before any is replaced, so the new layers are not walked again
    (a LoRA layer whose ``base`` is replaced keeps its adapters as they are)."""
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            new = make(f"{name}.{child_name}" if name else child_name, child)
            if new is not None:
                setattr(module, child_name, new)
                replaced += 1
    return replaced


def untied_head(model: nn.Module, make: Callable[[nn.Parameter], "nn.Module | None"]) -> bool:
    """A model whose LM head is tied to the embedding (``lm_head is None``) gets ``lm_head =
    make(embedding weight)``: a separate quantized copy of the head (the embedding stays float, a
    lookup reads one row per token). Returns whether a head was made."""
    if getattr(model, "lm_head", "absent") is not None or not hasattr(model, "embed_tokens"):
        return False
    head = make(model.embed_tokens.weight)
    if head is None:
        return False
    model.lm_head = head
    return True


def skipped(name: str, skip: tuple[str, ...]) -> bool:
    """Whether a layer's full name contains one of ``skip`` (the int8 / int4 ``skip`` argument)."""
    return any(s in name for s in skip)


def keep_dtypes(module: nn.Module, apply, fn, recurse: bool = True) -> nn.Module:
    """``module._apply(fn)`` (``apply``: the parent class's) except that the buffers named in
    ``module.fixed_dtype`` keep their dtype: ``model.to(torch.float32)`` must not turn a kernel's
    float16 scales into float32 ones, but ``model.to(device)`` must still move them. The original
    tensor is moved, so no value is rounded through the other dtype on the way."""
    kept = {n: getattr(module, n) for n in module.fixed_dtype if getattr(module, n, None) is not None}
    apply(fn, recurse)
    for name, before in kept.items():
        after = getattr(module, name)
        if after.dtype != before.dtype:
            setattr(module, name, before.to(after.device))
    return module
