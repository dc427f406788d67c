"""Model families as adapters: one module per lineage, each declaring ``Family`` records.

The drivers (``interop/hf.py`` for Hugging Face folders, ``interop/gguf.py`` for llama.cpp files)
look a family up here and apply its tables; they hold no per-family code. Adding a family is
adding a ``Family`` to one of these modules (or a new one) and listing it in ``FAMILIES`` below
(see docs/architecture-families.md).
"""

from __future__ import annotations

from evolm.config import ConfigError
from evolm.interop.families.bart import BART
from evolm.interop.families.base import Family, Needs
from evolm.interop.families.bert import BERT, ROBERTA
from evolm.interop.families.deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from evolm.interop.families.falcon import FALCON
from evolm.interop.families.gemma import GEMMA, GEMMA2, GEMMA3_TEXT
from evolm.interop.families.gpt2 import GPT2
from evolm.interop.families.jamba import JAMBA
from evolm.interop.families.llama import LLAMA, MISTRAL, MIXTRAL
from evolm.interop.families.llama4 import LLAMA4_TEXT
from evolm.interop.families.mllama import MLLAMA
from evolm.interop.families.mamba import MAMBA
from evolm.interop.families.mamba2 import MAMBA2
from evolm.interop.families.modernbert import MODERNBERT
from evolm.interop.families.olmo2 import OLMO2
from evolm.interop.families.openai_gpt import OPENAI_GPT
from evolm.interop.families.qwen import QWEN2, QWEN3, QWEN3_MOE
from evolm.interop.families.t5 import SWITCH, T5

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    GPT2, OPENAI_GPT, LLAMA, MISTRAL, MIXTRAL, QWEN2, QWEN3, QWEN3_MOE, GEMMA, GEMMA2, GEMMA3_TEXT, OLMO2, DEEPSEEK_V2,
    DEEPSEEK_V3, FALCON, LLAMA4_TEXT, BERT, ROBERTA, MODERNBERT, T5, SWITCH, BART, MLLAMA, MAMBA, JAMBA, MAMBA2)}

# the model_types config.json may name: each family's own, then the wrappers that nest it
SUPPORTED_MODEL_TYPES = tuple(mt for f in FAMILIES.values() for mt in (f.model_type, *f.wrappers))

# Export tries the families in this order and writes the first that expresses a config exactly:
# the most specific first, so a plain Llama config is not written as, say, a Gemma with every
# Gemma feature switched off (Mistral, last, is Llama with a window: a windowless config is Llama).
EXPORT_ORDER = ("mllama", "jamba", "mamba", "mamba2", "switch_transformers", "t5", "bart", "openai-gpt", "gpt2", "falcon", "deepseek_v3", "deepseek_v2", "llama4_text", "mixtral", "qwen3_moe",
                "gemma3_text", "gemma2", "gemma", "olmo2", "qwen3", "qwen2", "llama", "mistral",
                "bert", "roberta", "modernbert")  # the encoders: mask='bidirectional', no decoder can write them

# llama.cpp's general.architecture -> the family that reads it
GGUF_FAMILIES: dict[str, Family] = {arch: f for f in FAMILIES.values() for arch in f.gguf_archs}


def family(model_type: str | None) -> Family:
    """The family for a config.json ``model_type`` (a wrapper type gives the family it wraps)."""
    for f in FAMILIES.values():
        if model_type == f.model_type or model_type in f.wrappers:
            return f
    raise ConfigError(f"config.json: model_type {model_type!r} is not supported; "
                      f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


__all__ = ["Family", "Needs", "FAMILIES", "SUPPORTED_MODEL_TYPES", "EXPORT_ORDER", "GGUF_FAMILIES", "family"]
