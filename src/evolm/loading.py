"""``load(path)``: one door for every way weights arrive.

``load`` looks at what ``path`` is and hands it to the right adapter:

- an evolm checkpoint folder (``config.json`` marked ``"format": "evolm"``, see
  ``evolm.checkpoint``): the exact ``ModelConfig`` and our own weight names, so configs that no
  Hugging Face family can express (MLA + sliding windows + OLMo 2 norms ...) still round-trip;
- a Hugging Face folder (``config.json`` + ``*.safetensors``, sharded or not) -> ``evolm.interop.hf``;
- a ``.gguf`` file (llama.cpp), or a folder holding exactly one -> ``evolm.interop.gguf``.

It returns ``(model, tokenizer)``: the tokenizer is read from the folder's ``tokenizer.json`` (or
the GGUF metadata) with ``evolm.tokenizer``, and is None when the source carries none.
``save`` writes either kind of folder, tokenizer included.

Every caller loads through here (generate, chat, serve, eval, post-training, pretraining's
``init``); the adapters build the model empty and assign the file's tensors into it
(``evolm.interop.empty``). Making a loaded model ready to generate (device, fusing, quantizing)
is ``evolm.infer.prepare``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from evolm import checkpoint
from evolm.interop import hf as _hf


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


def load_config(spec: str | os.PathLike):
    """The ModelConfig named by ``spec``: a preset name, an evolm config JSON (or checkpoint
    folder), or a Hugging Face config.json / model folder."""
    from evolm.config import ConfigError, ModelConfig
    from evolm.inputs import read_json
    from evolm.presets import get_preset

    spec = str(spec)
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        if os.sep in spec or spec.endswith(".json"):
            raise FileNotFoundError(f"{path}: no such config file")
        return get_preset(spec)
    d = read_json(path, ConfigError)
    if "model_type" in d:
        return _hf.config_from_hf(d, source=path)
    return ModelConfig.from_dict(d.get("model", d), source=path)


def detect_format(path: str | os.PathLike) -> str:
    """'evolm', 'hf' or 'gguf' for a path; raises naming what was expected otherwise."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    expected = ("expected a Hugging Face folder (config.json + *.safetensors), an evolm checkpoint folder, "
                "or a .gguf file")
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return "gguf"
        if p.suffix.lower() == ".gguf":
            from evolm.interop.gguf import GGUFError

            raise GGUFError(f"{p}: not a GGUF file (it does not start with the 'GGUF' magic bytes)")
        raise ValueError(f"{p}: not a model file; {expected}")
    if checkpoint.is_checkpoint(str(p)):
        return "evolm"
    if (p / "config.json").is_file():
        return "hf"
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    found = sorted(x.name for x in p.iterdir())[:8]
    several = f" and {len(ggufs)} .gguf files (name one)" if ggufs else ""
    raise ValueError(f"{p}: no config.json{several}, found {found}; {expected}")


def resolve_device(name: str, cpu_only: bool = False) -> torch.device:
    """A ``--device`` value as a torch device: ``"auto"`` is the first CUDA GPU when there is one,
    else the CPU (always the CPU with ``cpu_only``: a CPU path such as ``--quantize`` or
    ``--keep-blocks``); ``cpu``, ``cuda`` and ``cuda:N`` must exist here. Anything else raises a
    ValueError that names the value and what was expected (not a traceback from inside torch)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and not cpu_only else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible); "
                         f"use --device cpu")
    return dev


# the dtypes a user names (--dtype, lm-eval's model_args): the names torch gives them
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype or its name (``"bfloat16"``) as a torch dtype; None stays None (keep the stored one)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
         device: str | torch.device | None = None, blocks: bool = False, need_tokenizer: bool = False,
         allow_large: bool | None = None):
    """Load ``(model, tokenizer_or_None)`` from an evolm folder, a Hugging Face folder or a GGUF file.

    ``dtype`` (a torch dtype or its name) ``=None`` keeps the stored dtype (for GGUF, whatever
    ``load_gguf`` dequantizes to). The model is returned in eval mode. ``blocks=True``: a GGUF
    file's quantized linear layers keep their blocks (``evolm.quant.blocks``; CPU inference, fp32
    arithmetic with the file's exact weights). ``need_tokenizer``: a source without a tokenizer is
    a ValueError (generation, serving and chat training need one to turn text into ids).

    A damaged or hostile source raises its kind's error naming the file (``GGUFError``,
    ``ConfigError``, ``WeightsError``, ``CheckpointError``, ``TokenizerError``: all ValueErrors),
    never a traceback from deep inside. Sizes are checked against this machine's memory before
    the model is built; ``allow_large=True`` lifts that check for a real model this large
    (``None``: the process default, set by ``evolm --allow-large``).
    """
    model, tok = _load(Path(path), as_dtype(dtype), device, blocks, allow_large)
    if need_tokenizer and tok is None:
        raise ValueError(f"{path}: no tokenizer found (expected tokenizer.json, or GGUF tokenizer metadata)")
    return model, tok


def _load(p: Path, dtype: torch.dtype | None, device, blocks: bool, allow_large: bool | None = None):
    """The adapter for ``p``'s format: ``(model in eval mode, tokenizer or None)``."""
    kind = detect_format(p)
    if blocks and kind != "gguf":
        raise ValueError(f"{p}: keeping quantized blocks (--keep-blocks) needs a GGUF file; this is a"
                         f"{'n evolm' if kind == 'evolm' else ' Hugging Face'} folder with float weights")
    if kind == "gguf":
        if p.is_dir():
            p = sorted(p.glob("*.gguf"))[0]
        try:
            from evolm.interop.gguf import load_gguf
        except ImportError as e:
            raise ImportError(f"{p}: reading GGUF files needs evolm.interop.gguf and the 'gguf' package "
                              f"({e})") from None
        model, tokenizer = load_gguf(str(p), device=device, blocks=blocks, allow_large=allow_large,
                                     **({"dtype": dtype} if dtype is not None else {}))
        return model.eval(), tokenizer
    if kind == "hf":
        return _hf.load_hf_folder(p, dtype=dtype, device=device, allow_large=allow_large), _tokenizer_from_dir(p)
    from evolm.config import ConfigError

    try:
        model = checkpoint.load_checkpoint(str(p), dtype=dtype, device=device)
    except ConfigError as e:  # the size check names the config, not the folder it came from
        raise ConfigError(str(e) if str(p) in str(e) else f"{p}: {e}") from None
    return model.eval(), _tokenizer_from_dir(p)


def save(model, path: str | os.PathLike, tokenizer=None, fmt: str = "evolm", gguf_type: str = "f16") -> Path:
    """Write ``model`` (and its tokenizer) to a folder ``load`` reads back exactly.

    ``fmt="evolm"``: an evolm checkpoint folder (any config); ``fmt="hf"``: a Hugging Face folder
    that transformers loads (``evolm.interop.hf.save_hf_folder``; a ConfigError names the field
    when no transformers family can express the config); ``fmt="gguf"``: one ``.gguf`` file that
    llama.cpp runs, weights in ``gguf_type`` (``evolm.interop.gguf_export``). All are written
    atomically: an existing folder or file at ``path`` is replaced only once the new one is complete.
    """
    if fmt == "hf" and getattr(model, "quantization", None):
        raise ValueError(f"{path}: this model is weight-only quantized ({model.quantization.get('method')}); a Hugging "
                         f"Face folder holds float weights: convert the float model, or keep --to evolm")
    if fmt == "hf":
        return _hf.save_hf_folder(model, path, tokenizer=tokenizer)
    if fmt == "gguf":
        from evolm.interop.gguf_export import export_gguf

        return export_gguf(model, path, tokenizer, qtype=gguf_type)
    if fmt != "evolm":
        raise ValueError(f"unknown save format {fmt!r}; expected 'evolm', 'hf' or 'gguf'")
    extra: dict[str, str] = {}
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp:
            _hf.save_tokenizer(tokenizer, Path(tmp))
            extra = {f.name: f.read_text(encoding="utf-8") for f in Path(tmp).iterdir() if f.is_file()}
    checkpoint.save_checkpoint(model, str(path), extra_files=extra)
    return Path(path)


__all__ = ["load", "save", "detect_format", "load_config", "resolve_device", "as_dtype", "DTYPES"]
