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

import os
import re
import resource

import torch

from evolm.config import ConfigError, ModelConfig


class WeightsError(ValueError):
    """Weights that cannot be read, or that do not fit the config they came with; names the file."""


_ALLOW_LARGE = [False]  # the process default; only the CLI edge changes it (allow_large_models)


def allow_large_models(allow: bool = True) -> None:
    """Lift the memory cap of :func:`check_fits` for this process (``evolm --allow-large`` or
    ``EVOLM_ALLOW_LARGE=1``, read once by the CLI); library callers pass ``allow_large=True``."""
    _ALLOW_LARGE[0] = bool(allow)


def memory_limit() -> int:
    """Bytes this process can hold: the machine's RAM, or less under an address-space limit."""
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return min(ram, soft) if soft != resource.RLIM_INFINITY else ram


def check_fits(config: ModelConfig, source: str, bytes_per_param: int = 4, allow_large: bool | None = None) -> None:
    """Refuse a config whose parameters could not be held in memory, before anything is built.

    A model file's sizes are data: ``block_count = 1e9`` or ``intermediate_size = 1e9`` in a damaged
    file would otherwise be trusted until the machine runs out of memory. The count is the exact one
    (``analysis.cost.param_counts``); a real model larger than this machine passes with
    ``allow_large=True``.
    """
    from evolm.analysis.cost import param_counts

    if _ALLOW_LARGE[0] if allow_large is None else allow_large:
        return
    n = sum(param_counts(config).values())
    need, limit = n * bytes_per_param, memory_limit()
    if need > limit:
        c = config
        sizes = ", ".join(f"{f}={getattr(c, f)}" for f in ("n_layers", "d_model", "d_ff", "vocab_size", "n_heads",
                                                            "head_dim", "n_experts", "moe_d_ff")
                          if getattr(c, f))
        raise ConfigError(f"{source}: the sizes ({sizes}) imply {n:.3g} parameters, {need / 2**30:.3g} GiB at "
                          f"{bytes_per_param} bytes each, more than this machine's {limit / 2**30:.3g} GiB; a damaged "
                          f"size field? For a real model this large pass allow_large=True "
                          f"(CLI: --allow-large or EVOLM_ALLOW_LARGE=1)")


def check_layers(config: ModelConfig, names, source: str, pattern: str = r"layers\.(\d+)\.") -> None:
    """The weights must hold every layer the config asks for (checked before the layers are built)."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for n in names if (m := rx.match(n))}
    missing = sorted(set(range(config.n_layers)) - found)
    if missing:
        raise WeightsError(f"{source}: the config asks for {config.n_layers} layers but the weights hold "
                           f"{len(found)} (no tensors for layer {missing[0]}{' ...' if len(missing) > 1 else ''})")


def build_empty(config: ModelConfig, source: str = "model", allow_large: bool | None = None,
                bytes_per_param: int = 4):
    """The model ``config`` describes, with every parameter and buffer on the meta device
    (after :func:`check_fits`: ``source`` names the file in its error)."""
    from evolm.model import build

    check_fits(config, source, bytes_per_param, allow_large)
    return build(config, device="meta")


def assign_weights(model, state: dict[str, torch.Tensor], source: str = "checkpoint"):
    """``model`` (from :func:`build_empty`) holding ``state`` (our parameter names), RoPE tables
    recomputed; raises a ValueError naming ``source`` when the names do not match the config."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # a tensor of the wrong shape
        lines = str(e).strip().splitlines()  # torch's first line only says "Error(s) in loading"
        raise WeightsError(f"{source}: weights do not fit the config: {lines[-1].strip()[:300]}") from None
    if missing or unexpected:
        raise WeightsError(f"{source}: weights do not match config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.reset_buffers()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{source}: internal error, tensors left unmaterialised: {left[:5]}")
    return model


__all__ = ["build_empty", "assign_weights", "check_fits", "check_layers", "allow_large_models", "memory_limit",
           "WeightsError"]
