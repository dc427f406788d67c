"""Making a loaded model ready to generate: the one preparation every caller shares.

``evolm generate``, ``chat``, ``serve``, ``eval`` and the lm-eval adapter all want the same
thing -- weights on a device in a dtype, in eval mode, optionally with fused projections or
weight-only quantized linears -- so they describe it with one :class:`InferenceOptions` and call
:func:`load_for_inference` (or :func:`prepare` on a model they already hold). A flag added here
(a new kernel, a new quantization) reaches every one of them at once; the CLI only maps its flags
to these options.

Fusing (``Transformer.fuse_for_inference``) turns the q/k/v and gate/up projections into one
matmul each. Quantizing swaps linears for weight-only int8 or int4 ones (``evolm.quant``; CPU
kernels, as in gpt-fast's ``quantize.py``), applied after fusing so the fused matmuls are the ones
quantized. Keeping a GGUF file's blocks (``evolm.quant.blocks``) happens while loading, since the
blocks never become float weights. ``compile`` is carried to the decode loop, which compiles its
prefill and step over a static cache (``evolm.infer``): the model itself is not changed.

Fast by default: ``keep_blocks``, ``fuse`` and ``compile`` left at None are chosen by
:func:`choose_path` for the source and device -- the fastest path whose numbers are the model's own
(a GGUF file's blocks are its exact weights; fusing concatenates weights, the same dot products;
CUDA decodes through compiled graphs). ``fast=False`` (``--no-fast``) is the plain eager model, and
every choice comes with the reason ``--explain`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from evolm.quant.policy import KernelPolicy

QUANTIZE = ("int8", "int4")


@dataclass(frozen=True)
class InferenceOptions:
    """How a model is loaded and prepared for inference.

    ``device``: ``auto`` (a CUDA GPU when there is one, else the CPU; always the CPU for the CPU
    paths ``keep_blocks`` and ``quantize``), ``cpu``, ``cuda`` or ``cuda:N``. ``dtype``: the
    weights' dtype (a torch dtype or its name), None keeps the stored one. ``keep_blocks``: a
    GGUF file's quantized blocks stay as they are. ``fuse``: one qkv and one gate_up matmul per
    layer. ``quantize``: weight-only int8, or int4 (group 32, int8 head). ``compile``: decode
    through torch.compile-d graphs over a static KV cache (read by the decode loop).
    ``block_step``: on the CPU, each block's one-token step as one C++ call
    (:mod:`evolm.infer.block_step`; blocks it cannot express keep the Python path). ``policy``:
    which kernels quantized linears and the compiled step use (``KernelPolicy.from_env()`` at an
    entry point; the defaults are the measured fastest).
    """

    device: str = "auto"
    dtype: torch.dtype | str | None = None
    keep_blocks: bool | None = None
    fuse: bool | None = None
    quantize: Literal["int8", "int4"] | None = None
    compile: bool | None = None
    block_step: bool | None = None
    fast: bool = True
    policy: KernelPolicy = KernelPolicy()

    def __post_init__(self):
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(f"--quantize {self.quantize}: expected one of {QUANTIZE}")
        if self.keep_blocks and self.quantize:
            raise ValueError(f"--keep-blocks keeps the file's own quantization; drop --quantize {self.quantize}")

    @property
    def cpu_only(self) -> bool:
        """Whether the options name a CPU-only path (``device='auto'`` then means the CPU)."""
        return bool(self.quantize or self.keep_blocks)

    @property
    def chosen(self) -> bool:
        """Whether every path choice is made (after :func:`choose_path`)."""
        return None not in (self.keep_blocks, self.fuse, self.compile, self.block_step)


def choose_path(source, options: InferenceOptions = InferenceOptions()) -> tuple[InferenceOptions, list[str]]:
    """``options`` with every choice left at None made for ``source`` (a model path), and one line
    per choice saying why. What the user set is kept, and said so."""
    from dataclasses import replace

    from evolm.loading import detect_format, resolve_device

    device = resolve_device(options.device, cpu_only=options.cpu_only)
    gguf = detect_format(source) == "gguf"
    why, picks = [], {}

    def pick(field: str, value: bool, reason: str) -> None:
        if getattr(options, field) is None:
            picks[field] = value
            why.append(f"{field}: {'on' if value else 'off'} ({reason})")
        else:
            why.append(f"{field}: {'on' if getattr(options, field) else 'off'} (set by the caller)")

    if not options.fast:
        reason = "--no-fast: the plain eager model"
        for field in ("keep_blocks", "fuse", "compile", "block_step"):
            pick(field, False, reason)
    else:
        if not gguf:
            pick("keep_blocks", False, "not a GGUF file: no blocks to keep")
        elif device.type != "cpu" or options.quantize:
            pick("keep_blocks", False, "the block kernels are CPU kernels" if device.type != "cpu"
                 else f"--quantize {options.quantize} re-quantizes dense weights")
        else:
            pick("keep_blocks", True, "GGUF on the CPU: the file's blocks are its exact weights, read at 5-10 bits "
                                      "each instead of 32")
        pick("fuse", True, "one qkv and one gate_up matmul per layer: the same dot products, fewer calls")
        if device.type == "cuda":
            pick("compile", True, "CUDA: prefill and step as compiled graphs over a static cache")
        else:
            pick("compile", False, "CPU: eager decoding starts at once; --compile trades ~25 s of compilation at "
                                   "start for ~10-15% faster decoding")
        compiled = options.compile if options.compile is not None else picks.get("compile")
        if device.type != "cpu" or compiled:
            pick("block_step", False, "the compiled step decodes" if compiled else "a CPU kernel")
        else:
            pick("block_step", True, "CPU: each block's decode step is one C++ call (the eager model's ops, no "
                                     "interpreter between them)")
    why.insert(0, f"device: {device} ({'asked' if options.device != 'auto' else 'auto'})")
    return replace(options, device=str(device), **picks), why


def load_for_inference(path, options: InferenceOptions = InferenceOptions()):
    """``(model, tokenizer)`` from ``path`` (anything :func:`evolm.load` reads), prepared as
    ``options`` ask. A bad device or a source without a tokenizer is a ValueError that names it,
    raised before any weights are read where it can be."""
    from evolm.loading import load, resolve_device

    if not options.chosen:
        options, _ = choose_path(path, options)
    device = resolve_device(options.device, cpu_only=options.cpu_only)
    model, tok = load(path, dtype=options.dtype, device=device, blocks=options.keep_blocks, need_tokenizer=True)
    return prepare(model, options), tok


def prepare(model, options: InferenceOptions):
    """``model`` in eval mode, fused and quantized as ``options`` ask; returns the model to use
    (quantizing replaces modules, so use the result). Device and dtype are the loader's work
    (:func:`load_for_inference`); a quantized model must already be on the CPU."""
    model.eval()
    if options.fuse or (options.fuse is None and options.fast):
        model.fuse_for_inference()
    if options.quantize:
        from evolm.quant import quantize_int4, quantize_int8

        device = next(model.parameters()).device
        if device.type != "cpu":
            raise ValueError(f"--quantize {options.quantize} is a CPU path (weight-only kernels); drop it on {device}")
        policy = options.policy
        model = quantize_int8(model, policy=policy) if options.quantize == "int8" else \
            quantize_int4(model, group_size=32, policy=policy)
    if options.block_step or (options.block_step is None and options.fast and not options.compile):
        from evolm.infer import block_step

        block_step.attach(model)  # last: it holds the prepared modules' tensors
    return model


__all__ = ["InferenceOptions", "choose_path", "load_for_inference", "prepare", "QUANTIZE"]
