"""A quantized model on disk: an evolm checkpoint folder whose quantized linears are stored as codes.

``evolm quantize`` writes an ordinary evolm folder (``config.json`` + ``model.safetensors``) that
every verb loads. Its ``config.json`` gains a ``"quantization"`` entry naming the format of each
quantized layer (``{"method": "gptq", ..., "layers": {"layers.0.self_attn.q_proj": "int4", ...,
"lm_head": "int8"}}``) and, for such a layer ``NAME``, the weights file holds, instead of
``NAME.weight``, the numbers its runtime layer is rebuilt from exactly:

- ``int8`` (per output row, symmetric): ``NAME.qweight`` (N, K) int8, ``NAME.scales`` (N,) float32;
  ``w = q * scale``.
- ``int4`` (group-wise, asymmetric; round-to-nearest or GPTQ): ``NAME.qweight`` (N, K/2) uint8 --
  input column 2j in the low nibble, 2j+1 in the high one -- and ``NAME.scales``, ``NAME.mins``
  (N, K/group) float16 (bfloat16 where the layer was built for torch's int4pack kernel); ``w = q *
  scale + min`` (llama.cpp's Q4_1 form: a minimum, not a zero point).
- ``nf4`` (QLoRA's NormalFloat, blocks of 64 along the flattened weight, no double quantization): ``NAME.qweight`` the
  packed codes as :func:`~evolm.quant.nf4.quantize_nf4` writes them, ``NAME.absmax`` float32.

plus ``NAME.bias`` where the layer has one. The layout is independent of which kernels this
machine builds (the runtime layers' own buffers are not: evolm's q4 kernel packs nibbles its own
way, torch's int4pack opaquely), so a folder written on one machine loads on any other. A tied LM
head that was quantized is stored as ``lm_head.*`` and rebuilt as a separate head, as
:func:`~evolm.quant.walk.untied_head` made it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from evolm.quant.int4 import Int4Linear
from evolm.quant.int8 import Int8Linear
from evolm.quant.nf4 import BLOCK_SIZE, NF4Linear
from evolm.quant.policy import DEFAULT_POLICY, KernelPolicy
from evolm.quant.walk import replace_linears

FORMATS = ("int8", "int4", "nf4")


def layer_format(module: nn.Module) -> str | None:
    if isinstance(module, Int8Linear):
        return "int8"
    if isinstance(module, Int4Linear):
        return "int4"
    if isinstance(module, NF4Linear):
        return "nf4"
    return None


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) in 0..15 -> (N, K/2) uint8, column 2j in the low nibble."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: (N, K/2) uint8 -> (N, K) int32."""
    return torch.stack((packed & 0x0F, packed >> 4), -1).reshape(packed.shape[0], -1).to(torch.int32)


def layer_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The portable tensors of one quantized layer (names relative to it)."""
    fmt = layer_format(module)
    if fmt == "int8":
        out = {"qweight": module.weight, "scales": module.scale.float()}
    elif fmt == "int4":
        q, scale, lo = module.codes()
        dtype = torch.float16 if module.layout == "q4" else torch.bfloat16
        out = {"qweight": pack_nibbles(q), "scales": scale.to(dtype), "mins": lo.to(dtype)}
    else:
        out = {"qweight": module.weight_packed, "absmax": module.block_absmax().float()}
    if module.bias is not None:
        out["bias"] = module.bias
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def portable_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state, layers)``: the model's tensors with each quantized layer's runtime buffers replaced
    by its portable tensors, and the format of each quantized layer by name (empty if none).
    ``model`` may be any object with ``state_dict()`` (the trainer saves a view of its weights)."""
    if not isinstance(model, nn.Module):
        return dict(model.state_dict()), {}
    layers = {name: fmt for name, m in model.named_modules() if (fmt := layer_format(m))}
    state = {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in layers)}
    for name in layers:
        for key, tensor in layer_tensors(model.get_submodule(name)).items():
            state[f"{name}.{key}"] = tensor
    return state, layers


def _rebuild(fmt: str, t: dict[str, torch.Tensor], linear_shape: tuple[int, int], compute_dtype: torch.dtype,
             policy: KernelPolicy, where: str) -> nn.Module:
    """The runtime layer of format ``fmt`` from its portable tensors ``t`` (shape (out, in) of the
    float layer it replaces)."""
    N, K = linear_shape
    bias = t.get("bias")
    if fmt == "int8":
        return Int8Linear.from_codes(t["qweight"], t["scales"], bias, policy)
    if fmt == "int4":
        return Int4Linear.from_codes(unpack_nibbles(t["qweight"]), t["scales"].float(), t["mins"].float(), bias, policy)
    if fmt == "nf4":
        if t["absmax"].numel() != -(-N * K // BLOCK_SIZE):
            raise ValueError(f"{where}: nf4 layer of {N}x{K} weights needs {-(-N * K // BLOCK_SIZE)} block constants "
                             f"(blocks of {BLOCK_SIZE}), the file has {t['absmax'].numel()}")
        layer = NF4Linear(K, N, bias is not None, compute_dtype)
        layer.weight_packed.copy_(t["qweight"])
        layer.absmax.copy_(t["absmax"])
        if bias is not None:
            layer.bias.data = bias.to(compute_dtype)
        return layer
    raise ValueError(f"{where}: unknown quantized layer format {fmt!r}; expected one of {FORMATS}")


def restore_quantized(model: nn.Module, state: dict[str, torch.Tensor], layers: dict[str, str], source: str,
                      policy: KernelPolicy = DEFAULT_POLICY) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Swap the layers named in ``layers`` of an empty ``model`` (meta device, from
    ``build_empty``) for quantized layers rebuilt from ``state``; returns the model and the state
    to assign to the rest (the portable tensors taken out, the new layers' own buffers put in)."""
    from evolm.interop.empty import WeightsError

    if not isinstance(layers, dict) or any(f not in FORMATS for f in layers.values()):
        raise WeightsError(f"{source}: 'quantization.layers' must map layer names to one of {FORMATS}")
    rest = dict(state)
    tensors = {}
    for name, fmt in layers.items():
        prefix = name + "."
        tensors[name] = {k[len(prefix):]: rest.pop(k) for k in [k for k in rest if k.startswith(prefix)]}
        need = {"int8": ("qweight", "scales"), "int4": ("qweight", "scales", "mins"), "nf4": ("qweight", "absmax")}
        missing = [f"{name}.{k}" for k in need[fmt] if k not in tensors[name]]
        if missing:
            raise WeightsError(f"{source}: quantized layer {name} ({fmt}) lacks {', '.join(missing)}")
    dtype = model.embed_tokens.weight.dtype if state.get("embed_tokens.weight") is None else \
        state["embed_tokens.weight"].dtype

    def make(name: str, linear: nn.Linear):
        if name not in layers:
            return None
        return _rebuild(layers[name], tensors[name], tuple(linear.weight.shape), dtype, policy, source)

    done = replace_linears(model, make)
    if "lm_head" in layers and getattr(model, "lm_head", "absent") is None:  # a tied head, quantized apart
        c = model.config
        model.lm_head = _rebuild(layers["lm_head"], tensors["lm_head"], (c.vocab_size, c.d_model), dtype, policy,
                                 source)
        done += 1
    if done != len(layers):
        found = {n for n, m in model.named_modules() if layer_format(m)}
        raise WeightsError(f"{source}: quantized layers {sorted(set(layers) - found)[:5]} are not linear layers "
                           f"of this config")
    for name in layers:
        for key, tensor in model.get_submodule(name).state_dict().items():
            rest[f"{name}.{key}"] = tensor
    return model, rest


__all__ = ["portable_state", "restore_quantized", "layer_tensors", "pack_nibbles", "unpack_nibbles", "FORMATS"]
