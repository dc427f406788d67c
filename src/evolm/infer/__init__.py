"""Inference: sampling, the decoding loop, text streaming and the compiled decode step.

- ``sampling.py``: :class:`SamplingParams`, the logits processors (HF ``generate()``'s order), the draw.
- ``decode.py``: batch validation, prefill, the decode loop, :func:`generate` (token ids).
- ``text.py``: UTF-8-safe streaming, stop strings, chat prompts: :func:`stream`, :func:`generate_text`.
- ``compiled.py``: the ``torch.compile``-d step and prompt pass, their kernels, direct graph calls
  and CUDA-graph replay.

Which kernels run is a :class:`evolm.quant.policy.KernelPolicy` passed in (default: the measured
choices); an entry point that honours the ``EVOLM_*`` switches builds it with ``KernelPolicy.from_env()``.
"""

from evolm.infer.decode import generate
from evolm.infer.sampling import SamplingParams
from evolm.infer.text import chat_prompt_ids, generate_text, stream

__all__ = ["SamplingParams", "generate", "stream", "generate_text", "chat_prompt_ids"]
