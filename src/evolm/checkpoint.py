"""Checkpoints: safetensors weights + the state needed to resume exactly, written atomically.

A checkpoint folder holds ``model.safetensors`` (weights), ``config.json`` (the ModelConfig,
marked with ``"format": "evolm"``) and, for training runs, ``trainer.pt`` (optimizer, scheduler,
RNG states, data-loader position, step). Every save writes into a temporary sibling folder and
renames it into place, so a kill during a save leaves the previous good checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from evolm.config import ModelConfig

FORMAT_MARK = "evolm"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER = "trainer.pt"


def is_checkpoint(path: str) -> bool:
    cfg = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg) as f:
            return json.load(f).get("format") == FORMAT_MARK
    except (OSError, json.JSONDecodeError):
        return False


def _atomic_dir(path: str):
    """Context: yields a temp folder that replaces ``path`` on success, vanishes on failure."""
    class _Ctx:
        def __enter__(self_inner):
            parent = os.path.dirname(os.path.abspath(path)) or "."
            os.makedirs(parent, exist_ok=True)
            self_inner.tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
            return self_inner.tmp

        def __exit__(self_inner, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self_inner.tmp, ignore_errors=True)
                return False
            old = None
            if os.path.exists(path):
                old = path + ".old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            os.replace(self_inner.tmp, path)
            if old:
                shutil.rmtree(old, ignore_errors=True)
            return False
    return _Ctx()


def save_checkpoint(model, path: str, trainer_state: dict[str, Any] | None = None,
                    extra_files: dict[str, str] | None = None) -> None:
    """Write weights (+ optional trainer state and extra text files) to ``path`` atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    with _atomic_dir(path) as tmp:
        save_file(state, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump({"format": FORMAT_MARK, "model": model.config.to_dict()}, f, indent=2)
        if trainer_state is not None:
            torch.save(trainer_state, os.path.join(tmp, TRAINER))
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)


def load_config(path: str) -> ModelConfig:
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no {CONFIG}; not an evolm checkpoint folder")
    with open(cfg_path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if d.get("format") != FORMAT_MARK or "model" not in d:
        raise ValueError(f"{cfg_path}: missing '\"format\": \"evolm\"' and 'model' keys; not an evolm checkpoint")
    return ModelConfig.from_dict(d["model"], source=cfg_path)


def load_checkpoint(path: str, dtype: torch.dtype | None = None, device=None):
    """Build the model stored in ``path`` and load its weights."""
    from evolm.interop.empty import assign_weights, build_empty

    config = load_config(path)
    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{path}: missing {WEIGHTS}")
    try:
        state = load_file(weights)
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ValueError(f"{weights}: cannot read safetensors file ({e})") from None
    model = assign_weights(build_empty(config), state, source=weights)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device) if device is not None else model


def load_trainer_state(path: str) -> dict[str, Any]:
    p = os.path.join(path, TRAINER)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{path}: no {TRAINER}; this checkpoint cannot resume training")
    return torch.load(p, map_location="cpu", weights_only=False)
