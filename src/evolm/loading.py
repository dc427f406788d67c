"""``load(path)``: one door for every way weights arrive, and ``save`` for evolm's own folders.

``load`` looks at what ``path`` is and hands it to the right adapter:

- a Hugging Face folder (``config.json`` + ``*.safetensors``) -> ``evolm.interop.hf``;
- a ``.gguf`` file (llama.cpp) -> ``evolm.interop.gguf``;
- an evolm checkpoint folder -> read here.

An evolm checkpoint folder holds the exact ``ModelConfig`` (so configs no Hugging Face family can
express, e.g. MLA + sliding windows + OLMo 2 norms, still round-trip) and our own weight names:

    config.json          {"evolm": {"format_version": 1, ...}, <ModelConfig fields>}
                         (``evolm_config.json`` with the same content is accepted too)
    model.safetensors    or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json ...   if a tokenizer was saved alongside

It returns ``(model, tokenizer)``; the tokenizer is None when the source carries none (or when
``evolm.tokenizer`` is not available).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from evolm.config import ConfigError, ModelConfig
from evolm.interop import hf as _hf

EVOLM_MARKER = "evolm"
FORMAT_VERSION = 1


def _tokenizer_from_dir(folder: Path):
    """evolm's tokenizer for a folder's tokenizer.json, or None if there is none (or no tokenizer module)."""
    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        from evolm.tokenizer import Tokenizer
    except ImportError:
        return None
    from_dir = getattr(Tokenizer, "from_hf_dir", None)
    return from_dir(str(folder)) if callable(from_dir) else None


def _evolm_config(folder: Path) -> dict | None:
    """The ModelConfig dict of an evolm folder, or None if ``folder`` is not one."""
    for name in ("config.json", "evolm_config.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{f}: not valid JSON ({e})") from None
        if name == "evolm_config.json" or (isinstance(d, dict) and EVOLM_MARKER in d):
            return d
    return None


def detect_format(path: str | os.PathLike) -> str:
    """'hf', 'evolm' or 'gguf' for a path; raises naming what was expected otherwise."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if p.suffix.lower() == ".gguf" or magic == b"GGUF":
            return "gguf"
        raise ValueError(f"{p}: not a model: expected a .gguf file, a Hugging Face folder (config.json + "
                         f"*.safetensors) or an evolm checkpoint folder")
    if _evolm_config(p) is not None:
        return "evolm"
    if (p / "config.json").is_file():
        return "hf"
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    found = sorted(x.name for x in p.iterdir())[:10]
    raise ValueError(f"{p}: not a model folder: no config.json{' and several .gguf files' if ggufs else ''} "
                     f"(found {found}); expected a Hugging Face folder (config.json + *.safetensors), "
                     f"an evolm checkpoint folder, or a .gguf file")


def load(path: str | os.PathLike, dtype: torch.dtype | None = None,
         device: str | torch.device | None = None):
    """Load a model and its tokenizer from a Hugging Face folder, a GGUF file or an evolm folder.

    ``dtype=None`` keeps the stored dtype (GGUF: whatever ``load_gguf`` chooses). Returns
    ``(model, tokenizer_or_None)``; the model is in eval mode.
    """
    p = Path(path)
    kind = detect_format(p)
    if kind == "gguf":
        if p.is_dir():
            p = sorted(p.glob("*.gguf"))[0]
        try:
            from evolm.interop.gguf import load_gguf
        except ImportError as e:
            raise ImportError(f"{p}: reading GGUF files needs evolm.interop.gguf and the 'gguf' package ({e})") from None
        model, tokenizer = load_gguf(str(p), dtype=dtype)
        if device is not None:
            model = model.to(device)
        return model.eval(), tokenizer
    if kind == "hf":
        model = _hf.load_hf_folder(p, dtype=dtype, device=device)
        return model, _tokenizer_from_dir(p)
    d = dict(_evolm_config(p))
    info = d.pop(EVOLM_MARKER, {}) or {}
    version = info.get("format_version", FORMAT_VERSION) if isinstance(info, dict) else FORMAT_VERSION
    if version > FORMAT_VERSION:
        raise ValueError(f"{p}: evolm checkpoint format {version} is newer than this evolm reads "
                         f"({FORMAT_VERSION}); upgrade evolm")
    config = ModelConfig.from_dict(d, source=str(p / "config.json"))
    sd = _hf.read_safetensors(_hf.weight_files(p))
    model = _hf.build_from_state_dict(config, sd, dtype=dtype, device=device, source=str(p))
    return model, _tokenizer_from_dir(p)


def save(model, path: str | os.PathLike, tokenizer=None, max_shard_size: int = 5 * 2**30) -> Path:
    """Write ``model`` (and ``tokenizer``) as an evolm checkpoint folder that ``load`` reads back exactly.

    Written atomically: an existing folder at ``path`` is replaced only once the new one is complete.
    """
    from evolm import __version__

    c: ModelConfig = model.config
    cfg = {EVOLM_MARKER: {"format_version": FORMAT_VERSION, "library_version": __version__}, **c.to_dict()}
    sd = dict(model.state_dict())

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        _hf.write_safetensors(sd, tmp, max_shard_size)
        _hf.save_tokenizer(tokenizer, tmp)

    return _hf.atomic_folder(path, fill)


__all__ = ["load", "save", "detect_format"]
