"""evolm: the decoder-only LLM lineage, from GPT-2 to DeepSeek-V3, as one composable model."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# The top-level names, imported at first use (PEP 562): `import evolm.cli` (every command) or
# `import evolm.tokenizer` should not pay for torch and the model modules unless they use them.
_EXPORTS = {"ModelConfig": "evolm.config", "ConfigError": "evolm.config", "Transformer": "evolm.model",
            "KVCache": "evolm.cache", "build": "evolm.model", "load": "evolm.loading"}
__all__ = ["ModelConfig", "ConfigError", "Transformer", "KVCache", "build", "load", "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'evolm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
