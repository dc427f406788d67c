"""evolm: the decoder-only LLM lineage, from GPT-2 to DeepSeek-V3, as one composable model."""

from evolm.cache import KVCache
from evolm.config import ConfigError, ModelConfig
from evolm.loading import load
from evolm.model import Transformer, build

__version__ = "0.1.0"
__all__ = ["ModelConfig", "ConfigError", "Transformer", "KVCache", "build", "load", "__version__"]
