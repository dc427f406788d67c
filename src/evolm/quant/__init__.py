"""Weight formats for inference and QLoRA, one module each, over one linear-replacement walker.

- ``walk.py``: :func:`replace_linears`, the one walk that swaps ``nn.Linear`` layers.
- ``policy.py``: :class:`KernelPolicy`, which kernels the layers and the decode step run
  (built once by an entry point, ``KernelPolicy.from_env()``, and passed in).
- ``int8.py`` / ``int4.py``: weight-only round-to-nearest quantization for fast decoding.
- ``blocks.py``: a GGUF file's quantized blocks kept as they are (exact fp32 arithmetic).
- ``nf4.py``: QLoRA's 4-bit NormalFloat frozen base.
"""

from evolm.quant.int4 import Int4Linear, quantize_int4
from evolm.quant.int8 import Int8Linear, quantize_int8
from evolm.quant.policy import KernelPolicy
from evolm.quant.walk import replace_linears

__all__ = ["KernelPolicy", "replace_linears", "quantize_int8", "quantize_int4", "Int8Linear", "Int4Linear"]
