"""Caches of past tokens, passed into the forward pass: one protocol (``protocol.Cache``), several kinds.

- ``KVCache``: keys/values of every token, ring buffers for sliding-window layers, MLA latents;
- ``StaticKVCache``: fixed shapes for a ``torch.compile``-d decode step;
- ``PrefillKV``: collects a compiled prefill's keys/values;
- ``CrossCache``: an encoder-decoder's encoder output and cross-attention keys/values.
"""

from evolm.cache.cross import CrossCache
from evolm.cache.kv import KVCache, PrefillKV, StaticKVCache
from evolm.cache.protocol import Cache, KeyLayout

__all__ = ["Cache", "CrossCache", "KeyLayout", "KVCache", "PrefillKV", "StaticKVCache"]
