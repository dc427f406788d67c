"""Which kernels inference runs: one frozen value, read from the environment once, passed in.

The kernel choices of decoding were measured per CPU kind and dtype (docs/performance.md) and
each has a switch to compare it against the alternative on a new machine. They used to be read
from ``EVOLM_*`` variables and module globals wherever a kernel was picked; now the entry point
(the CLI, a benchmark) builds one :class:`KernelPolicy` with :meth:`KernelPolicy.from_env` and
hands it to what it calls: ``quantize_int8`` / ``quantize_int4`` (each quantized layer keeps its
choice), ``generate`` / ``stream`` (the compiled step, the attention kernel, CUDA graphs) and the
trainer (the compiled loss). Library calls that get no policy use ``KernelPolicy()``: the
defaults, which are the measured choices. ``None`` in a field means "the measured choice for
this CPU / dtype", decided when asked (asking may build evolm's kernels, so never inside a trace).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch

from evolm import kernels

_HAS_INT8PACK = hasattr(torch.ops.aten, "_weight_int8pack_mm")


@dataclass(frozen=True)
class KernelPolicy:
    """Kernel choices of inference (and the trainer's loss). Environment switch of each field:

    - ``quant_kernels`` (``EVOLM_KERNELS=0``: off): evolm's int8-activation kernels for int8 / int4
      layers (llama.cpp's Q4_1 x Q8 scheme; ``evolm/kernels/qgemv.cpp``) where they build.
    - ``skinny`` (``EVOLM_KERNELS=0``: off): ``evolm_f::skinny_linear`` for products of a few
      rows (float layers in the compiled CPU step, int8 layers) where it builds.
    - ``row1`` (``EVOLM_ROW1=skinny|reduce``): one float row in the compiled CPU step; None:
      :meth:`row1_kernel`'s measured choice.
    - ``int8_row`` (no switch; set it to compare): one row of an int8 layer, ``"reduce"`` or
      ``"int8pack"``; None: :meth:`int8_row_kernel`'s measured choice.
    - ``int8_dequant_rows`` / ``int8_dequant_low_precision``: from how many rows (a prompt) an int8
      layer dequantizes and uses the float matmul instead of ``_weight_int8pack_mm``.
    - ``decode_attention`` (``EVOLM_DECODE_ATTN=0``): ``evolm_f::decode_attention`` for one query
      per sequence in the compiled CPU step.
    - ``attn_loops`` (``EVOLM_ATTN_LOOPS=0``): decode attention as multiply-reduce loops inside a
      compiled CPU graph.
    - ``compile_prefill`` (``EVOLM_COMPILE_PREFILL=0``): the compiled prompt pass of
      ``generate(compile=True)``.
    - ``cpp_wrapper`` (``EVOLM_CPP_WRAPPER=0``): the compiled CPU step driven from C++ (taken at
      the first compilation of a process).
    - ``direct_step`` (``EVOLM_DIRECT_STEP=0``): call the compiled step's graph without dynamo
      once a generate call is steady.
    - ``cuda_graph`` (``EVOLM_CUDA_GRAPH=0``): replay that step as one CUDA graph on a GPU.
    - ``compiled_loss``: the fused loss's per-chunk softmax/gradient through ``torch.compile``;
      a model carries it as ``Transformer.compiled_loss`` (the trainer sets that with
      ``train.compile``).
    """

    quant_kernels: bool = True
    skinny: bool = True
    row1: str | None = None
    int8_row: str | None = None
    int8_dequant_rows: int = 32
    int8_dequant_low_precision: bool = True
    decode_attention: bool = True
    attn_loops: bool = True
    compile_prefill: bool = True
    cpp_wrapper: bool = True
    direct_step: bool = True
    cuda_graph: bool = True
    compiled_loss: bool = False

    def __post_init__(self) -> None:
        if self.row1 not in (None, "skinny", "reduce"):
            raise ValueError(f"KernelPolicy: row1 must be None, 'skinny' or 'reduce', got {self.row1!r}")
        if self.int8_row not in (None, "reduce", "int8pack"):
            raise ValueError(f"KernelPolicy: int8_row must be None, 'reduce' or 'int8pack', got {self.int8_row!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "KernelPolicy":
        """The defaults with the ``EVOLM_*`` switches of ``environ`` (default ``os.environ``) applied;
        ``overrides`` (field=value) win over both. Called once, by an entry point."""
        env = os.environ if environ is None else environ

        def on(name: str) -> bool:  # a switch that is on unless set to "0"
            return env.get(name, "1") != "0"

        row1 = env.get("EVOLM_ROW1")
        fields = dict(quant_kernels=on("EVOLM_KERNELS"), skinny=on("EVOLM_KERNELS"),
                      row1=row1 if row1 in ("skinny", "reduce") else None,
                      decode_attention=on("EVOLM_DECODE_ATTN"), attn_loops=on("EVOLM_ATTN_LOOPS"),
                      compile_prefill=on("EVOLM_COMPILE_PREFILL"), cpp_wrapper=on("EVOLM_CPP_WRAPPER"),
                      direct_step=on("EVOLM_DIRECT_STEP"), cuda_graph=on("EVOLM_CUDA_GRAPH"))
        return cls(**{**fields, **overrides})

    # ---- the choices, resolved for a device / shape / dtype --------------------------------
    def uses_quant_kernels(self, in_features: int, device: torch.device) -> bool:
        """Whether an int8 / int4 layer of this input width runs evolm's int8-activation kernels."""
        return self.quant_kernels and device.type == "cpu" and in_features % 32 == 0 and kernels.available()

    def uses_skinny(self, device_type: str) -> bool:
        """Whether few-row products on this device run ``skinny_linear`` (builds the kernels)."""
        return self.skinny and device_type == "cpu" and kernels.available()

    def row1_kernel(self, dtype: torch.dtype = torch.float32) -> str:
        """The one-row product of the compiled CPU step for ``dtype`` weights: ``"reduce"`` (inductor's
        multiply-reduce) or ``"skinny"`` (evolm's kernel). Measured (docs/performance.md), SmolLM2
        fused, batch 1: bf16 skinny everywhere (AVX-512 with BF16, two A/B rounds: 86.6 / 97.3 vs
        69.4 / 73.8 tok/s); fp32 skinny on AVX2-only CPUs (four rounds: 42-44 vs 38-41), reduce on
        AVX-512 ones (48 / 48 vs 52 / 56, both near the host's read bandwidth)."""
        if self.row1 is not None:
            return self.row1
        return "reduce" if dtype == torch.float32 and kernels.cpu_has_avx512() else "skinny"

    def int8_row_kernel(self) -> str:
        """The faster one-row int8 product on this CPU, as measured (docs/performance.md).

        The compiled multiply-reduce streams ~10 G weights/s per core where inductor vectorises
        the int8 -> float conversion (AVX-512 hosts), but only 0.6 on an AVX2-only host, where
        ``_weight_int8pack_mm`` with bf16 activations streams 3.2 (fp32 weights: 1.9). There, bf16
        is emulated, so ``int8_dequant_rows`` rows and more (prefill) dequantize and use the fp32
        matmul instead (1536 x 576, one thread: 64 rows 29.6 ms vs 54.7 for int8pack, 256 rows
        162 vs 235)."""
        if self.int8_row is not None:
            return self.int8_row
        return "reduce" if kernels.cpu_has_avx512() or not _HAS_INT8PACK else "int8pack"


DEFAULT_POLICY = KernelPolicy()
