"""Published model sizes as data: ``get_preset('llama-3-8b')`` -> a fresh ``ModelConfig``.

Each family file (gpt, palm, llama, falcon, mistral, gemma, olmo, qwen, deepseek, smollm, mamba, mamba2, jamba, and the encoders
bert, modernbert; the encoder-decoders t5, bart; tiny) holds a dict
``PRESETS`` of name -> keyword arguments of ``ModelConfig``, with the published
hyper-parameters (from each model's released ``config.json``) and a ``meta`` dict citing the
Hugging Face id, the paper and the published parameter count (``params``; ``active`` for
mixtures of experts) with a note on where the figure comes from and how it is rounded.

Presets are only data: adding a model size is adding a dict entry, never code.
"""

from __future__ import annotations

import copy
import difflib

from evolm.config import ConfigError, ModelConfig
from evolm.presets import (bart, bert, deepseek, falcon, gemma, gpt, jamba, llama, mamba, mamba2, mistral, modernbert,
                           olmo, palm, qwen, smollm, t5, tiny)

FAMILIES = {
    "gpt": gpt.PRESETS,
    "palm": palm.PRESETS,
    "llama": llama.PRESETS,
    "falcon": falcon.PRESETS,
    "mistral": mistral.PRESETS,
    "gemma": gemma.PRESETS,
    "olmo": olmo.PRESETS,
    "qwen": qwen.PRESETS,
    "deepseek": deepseek.PRESETS,
    "smollm": smollm.PRESETS,
    "mamba": mamba.PRESETS,
    "jamba": jamba.PRESETS,
    "t5": t5.PRESETS,
    "bart": bart.PRESETS,
    "bert": bert.PRESETS,
    "modernbert": modernbert.PRESETS,
    "mamba2": mamba2.PRESETS,
    "tiny": tiny.PRESETS,
}

PRESETS: dict[str, dict] = {}
PRESET_FAMILY: dict[str, str] = {}
for _family, _table in FAMILIES.items():
    for _name, _kwargs in _table.items():
        if _name in PRESETS:  # a programming error in the data files, caught at import
            raise ConfigError(f"preset '{_name}' is defined twice (in '{PRESET_FAMILY[_name]}' and '{_family}')")
        PRESETS[_name] = _kwargs
        PRESET_FAMILY[_name] = _family


def list_presets(family: str | None = None) -> list[str]:
    """Preset names, in family order (GPT, PaLM, ... DeepSeek, then SmolLM2 and the tiny ones)."""
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"unknown preset family '{family}'; known: {', '.join(FAMILIES)}")
    return [n for n in PRESETS if family is None or PRESET_FAMILY[n] == family]


def preset_family(name: str) -> str:
    """The family file a preset lives in ('gpt', 'llama', ..., 'tiny')."""
    _check(name)
    return PRESET_FAMILY[name]


def _check(name: str) -> None:
    if name not in PRESETS:
        close = difflib.get_close_matches(name.lower(), list(PRESETS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown preset '{name}'{hint} (`evolm arch list` or "
                          f"evolm.presets.list_presets() shows all {len(PRESETS)})")


def get_preset(name: str, **overrides) -> ModelConfig:
    """A fresh ``ModelConfig`` for a preset (case-insensitive), optionally with fields overridden."""
    key = name.lower()
    _check(key if key in PRESETS else name)
    kwargs = copy.deepcopy(PRESETS[key])
    kwargs["meta"] = dict(kwargs.get("meta", {}), family=PRESET_FAMILY[key])
    kwargs.update(overrides)
    return ModelConfig(name=key, **kwargs)


__all__ = ["PRESETS", "FAMILIES", "PRESET_FAMILY", "get_preset", "list_presets", "preset_family"]
