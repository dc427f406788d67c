"""Checkpoints: safetensors weights + the state needed to resume exactly, written atomically.

A checkpoint folder holds ``model.safetensors`` (weights), ``config.json`` (the ModelConfig,
marked with ``"format": "evolm"``) and, for training runs, ``trainer.pt`` (optimizer, scheduler,
RNG states, data-loader position, step). A training run with ``train.ckpt_format: dcp`` writes
its step folders sharded instead (``evolm/parallel/checkpoint.py``); :func:`load_checkpoint` reads
those too. Every save writes into a temporary sibling folder,
fsyncs its files and the folder, and renames it into place, so a kill or a power cut during a
save leaves the previous good checkpoint intact.

``trainer.pt`` holds only tensors and plain containers, and is read with
``torch.load(weights_only=True)``: a run folder from someone else cannot run code on resume
(a full pickle executes whatever the file names). Damaged files raise :class:`CheckpointError`,
one line naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from evolm.config import ConfigError, ModelConfig
from evolm.inputs import read_json

FORMAT_MARK = "evolm"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER = "trainer.pt"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, damaged, or holds something other than expected."""


def is_checkpoint(path: str) -> bool:
    cfg = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg):
        return False
    try:
        d = read_json(cfg, ConfigError)
    except ConfigError:  # not ours to judge here: the loader that reads it names the problem
        return False
    return d.get("format") == FORMAT_MARK


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
            publish_dir(self_inner.tmp, path)
            return False
    return _Ctx()


def publish_dir(tmp: str, path: str) -> None:
    """Make the finished folder ``tmp`` the folder ``path``: its data on disk first, then one
    rename (the previous ``path``, if any, is moved aside and removed only after)."""
    _fsync_tree(tmp)  # the data is on disk before the rename makes it visible
    old = None
    if os.path.exists(path):
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))  # ... and the rename itself is
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(folder: str) -> None:
    """fsync every file under ``folder``, then the folders: without it a crash soon after the
    rename can leave a checkpoint whose name exists but whose files are empty (ext4 delayed
    allocation)."""
    for name in os.listdir(folder):
        p = os.path.join(folder, name)
        if os.path.isdir(p):
            _fsync_tree(p)
        elif os.path.isfile(p):
            fsync_file(p)
    _fsync_dir(folder)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; the files are synced already
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_trainer_state(state: dict[str, Any], folder: str) -> None:
    """``trainer.pt``: tensors and plain containers only (checked on load by weights_only)."""
    torch.save(state, os.path.join(folder, TRAINER))


def save_checkpoint(model, path: str, trainer_state: dict[str, Any] | None = None,
                    extra_files: dict[str, str] | None = None) -> None:
    """Write weights (+ optional trainer state and extra text files) to ``path`` atomically.
    Weight-only quantized layers are written as their codes (``evolm.quant.saved``), with their
    formats under ``"quantization"`` in config.json."""
    from evolm.quant.saved import portable_state

    state, quantized = portable_state(model)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    meta = {"format": FORMAT_MARK, "model": model.config.to_dict()}
    if quantized:
        meta["quantization"] = {**getattr(model, "quantization", {}), "layers": quantized}
    if getattr(model, "pruning", None):  # how `evolm prune` made it (a record; the weights are ordinary)
        meta["pruning"] = model.pruning
    with _atomic_dir(path) as tmp:
        save_file(state, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(meta, f, indent=2)
        if trainer_state is not None:
            save_trainer_state(trainer_state, tmp)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)


def load_config(path: str) -> ModelConfig:
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no {CONFIG}; not an evolm checkpoint folder")
    d = read_json(cfg_path, ConfigError)
    if d.get("format") != FORMAT_MARK or "model" not in d:
        raise ConfigError(f"{cfg_path}: missing '\"format\": \"evolm\"' and 'model' keys; not an evolm checkpoint")
    return ModelConfig.from_dict(d["model"], source=cfg_path)


def load_checkpoint(path: str, dtype: torch.dtype | None = None, device=None):
    """Build the model stored in ``path`` and load its weights."""
    from evolm.interop.empty import assign_weights, build_empty

    config = load_config(path)
    weights = os.path.join(path, WEIGHTS)
    if os.path.isfile(weights):
        state = read_weights(weights)
    else:
        from evolm.parallel.checkpoint import is_sharded, read_model_state

        if not is_sharded(path):
            raise FileNotFoundError(f"{path}: missing {WEIGHTS}")
        state = read_model_state(path)  # a sharded training checkpoint: read from its shards
    model = build_empty(config)
    meta = read_json(os.path.join(path, CONFIG), ConfigError)
    quantization = meta.get("quantization")
    if quantization is not None:  # weight-only quantized layers, rebuilt from their codes
        from evolm.quant.saved import restore_quantized

        layers = quantization.get("layers") if isinstance(quantization, dict) else None
        model, state = restore_quantized(model, state, layers, weights)
        model.quantization = {k: v for k, v in quantization.items() if k != "layers"}
    model = assign_weights(model, state, source=weights)
    if isinstance(meta.get("pruning"), dict):
        model.pruning = meta["pruning"]
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device) if device is not None else model


def load_trainer_state(path: str) -> dict[str, Any]:
    """The trainer state of checkpoint folder ``path``, read without unpickling code."""
    p = os.path.join(path, TRAINER)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{path}: no {TRAINER}; this checkpoint cannot resume training")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{p}: holds Python objects beyond tensors and plain containers "
                f"({_first_line(e)}); evolm will not unpickle them, since that can run code. "
                "A trainer.pt from evolm before 2026-12 stored numpy RNG state this way: "
                "resume from its weights with a fresh run instead") from None
        raise CheckpointError(f"{p}: damaged ({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{p}: damaged or not a torch file ({_first_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{p}: expected a dict of trainer state, found {type(state).__name__}")
    return state


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or a :class:`CheckpointError` naming the file."""
    try:
        return load_file(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"{path}: cannot read safetensors file ({_first_line(e)})") from None


def check_weights(model, state: dict[str, torch.Tensor], source: str, *, expected: set[str] | None = None) -> None:
    """Refuse a state dict that does not fit ``model`` exactly: names missing (of ``expected``,
    default all of the model's, less a tied head), names the model lacks, or shapes that differ.
    ``load_state_dict(strict=False)`` would accept a checkpoint with a tensor missing and train
    on from the random init without a word."""
    own = model.state_dict()
    want = set(own) if expected is None else set(expected)
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        want.discard("lm_head.weight")
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} (model: {tuple(own[k].shape)})" for k in sorted(set(state) & set(own))
              if state[k].shape != own[k].shape]
    problems = [f"{label} {_few(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if names]
    if problems:
        raise CheckpointError(f"{source}: does not fit this model: " + "; ".join(problems))


def readable_checkpoint(folder: str) -> bool:
    """True when the folder's trainer state and every weights file's header read cleanly."""
    from safetensors import safe_open

    try:
        load_trainer_state(folder)
        if os.path.isdir(os.path.join(folder, "dcp")):
            from evolm.parallel.checkpoint import SafeReader

            SafeReader(os.path.join(folder, "dcp")).read_metadata()
        for name in os.listdir(folder):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(folder, name), "pt") as f:
                    for k in f.keys():
                        f.get_slice(k)
        return True
    except Exception:
        return False


def _few(names: list[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
