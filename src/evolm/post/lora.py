"""LoRA: fine-tune a frozen model through low-rank updates of its linear layers.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
freezes a pretrained weight W (out x in) and learns ``delta W = (alpha / r) * B @ A`` with
A (r x in), B (out x r), r << in: the layer computes ``W x + (alpha / r) * B A dropout(x)``.
A starts Kaiming-uniform and B at zero, so training starts exactly at the base model. Only A and
B train: at r = 16 on the q/v projections of a 1B model that is ~0.1-0.5% of the parameters,
and the optimizer state shrinks with them. After training the update folds into W
(``merge_lora``), so inference costs nothing extra. QLoRA (Dettmers et al. 2023) keeps the frozen
W in 4-bit NF4 (``evolm.quant.nf4``) and the adapters in bf16.

Modules are chosen as PEFT chooses them: by name suffix (``q_proj`` matches
``layers.3.self_attn.q_proj``), or ``all-linear`` = every linear layer except the output head.
MoE experts are 3-D tensors (``mlp.experts.gate_up_proj``), not linear layers, so LoRA does not
reach them (nor the router); attention, MLA and dense/shared-expert MLP projections all work.

Adapters are saved in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.<transformers module>.lora_A.weight``) for the transformers model that
``evolm convert --to hf`` writes, so ``peft.PeftModel.from_pretrained`` loads them there with the
same logits; ``load_adapter`` reads such folders, whether written here or by PEFT itself.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from evolm.config import ConfigError
from evolm.post.flags import option
from evolm.quant.nf4 import NF4Linear

ALL_LINEAR = "all-linear"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix for a PeftModelForCausalLM's adapter keys
EXCLUDED = ("lm_head",)  # the output head: never a LoRA target (PEFT's all-linear leaves it out too)
_PROBE = 64  # embedding values recorded to recognise the base model
_GPT2_FUSED = ("q_proj", "k_proj", "v_proj")  # one c_attn layer in transformers' GPT-2


# =========================================================================================
# configuration
# =========================================================================================
@dataclass
class LoRAConfig:
    """Rank, scale, dropout and target modules of a LoRA adapter (defaults: the LoRA paper's q/v).

    ``targets``: module name suffixes (``["q_proj", "v_proj"]``, or full names), a comma-separated
    string, or ``"all-linear"``. ``use_rslora`` scales by alpha/sqrt(r) instead of alpha/r
    (rsLoRA, Kalajdzievski 2023, arXiv:2312.03732). ``rank_pattern``/``alpha_pattern`` override
    r/alpha for modules whose name ends with a key (PEFT's semantics; set when loading such adapters).
    """

    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(fieldname: str, msg: str) -> ConfigError:
            return ConfigError(f"LoRAConfig: field '{fieldname}' {msg}")

        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise bad("r", f"(the rank) must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise bad("alpha", f"must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str):
            t = self.targets.strip()
            self.targets = ALL_LINEAR if t == ALL_LINEAR else [s.strip() for s in t.split(",") if s.strip()]
        elif isinstance(self.targets, (list, tuple, set)):
            self.targets = list(dict.fromkeys(str(s).strip() for s in self.targets))
        else:
            raise bad("targets", f"must be a list of module names or {ALL_LINEAR!r}, got {self.targets!r}")
        if not self.targets:
            raise bad("targets", f"is empty; name modules such as 'q_proj,v_proj' or use {ALL_LINEAR!r}")
        if self.targets != ALL_LINEAR:
            if ALL_LINEAR in self.targets:
                raise bad("targets", f"mixes {ALL_LINEAR!r} with module names {self.targets}; use one or the other")
            head = [t for t in self.targets if t.rsplit(".", 1)[-1] in EXCLUDED]
            if head:
                raise bad("targets", f"names the output head {head}: LoRA on lm_head is not supported "
                                     "(the fused loss reads its weight directly)")
        for name, pat in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for k, v in pat.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or \
                        (name == "rank_pattern" and not isinstance(v, int)):
                    kind = "integer" if name == "rank_pattern" else "number"
                    raise bad(name, f"entry {k!r} must be a positive {kind}, got {v!r}")

    @classmethod
    def from_string(cls, targets: str, **kwargs) -> "LoRAConfig":
        """``LoRAConfig.from_string("q_proj,v_proj", r=8)`` or ``from_string("all-linear")``."""
        return cls(targets=targets, **kwargs)

    def matches(self, name: str) -> bool:
        """Does module ``name`` match a target (PEFT's rule: equal, or ends with '.' + target)?"""
        if self.targets == ALL_LINEAR:
            return name.rsplit(".", 1)[-1] not in EXCLUDED
        return any(name == t or name.endswith("." + t) for t in self.targets)

    def _pattern(self, pat: dict, name: str, default):
        for key, v in pat.items():
            if name == key or name.endswith("." + key):
                return v
        return default

    def rank_for(self, name: str) -> int:
        return self._pattern(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        return self._pattern(self.alpha_pattern, name, self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": self.targets,
                "use_rslora": self.use_rslora, "rank_pattern": dict(self.rank_pattern),
                "alpha_pattern": dict(self.alpha_pattern)}


# =========================================================================================
# the adapted layer
# =========================================================================================
class LoRALinear(nn.Module):
    """``base(x) + scaling * lora_B(lora_A(dropout(x)))`` around a frozen ``base`` (nn.Linear or NF4Linear)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, NF4Linear):
            dtype, device = base.compute_dtype, base.weight_packed.device
        else:
            dtype, device = base.weight.dtype, base.weight.device
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self) -> None:
        """A: Kaiming-uniform (a = sqrt(5), PEFT's default); B: zeros -> the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = self.dropout(x.to(self.lora_A.weight.dtype))
        return y + (self.lora_B(self.lora_A(h)) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in), in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def _is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or isinstance(m, NF4Linear)


def linear_names(model: nn.Module) -> list[str]:
    """Full names of the layers LoRA can adapt (linear layers, also NF4 ones, and already adapted ones)."""
    names = []
    skip: set[str] = set()
    for name, m in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(m, LoRALinear):
            names.append(name)
            skip.add(name)
        elif _is_linear(m):
            names.append(name)
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# =========================================================================================
# apply / merge
# =========================================================================================
def apply_lora(model: nn.Module, cfg: LoRAConfig | None = None) -> list[str]:
    """Wrap the matching linear layers of ``model`` in ``LoRALinear`` and freeze everything else.

    Returns the wrapped module names. Raises ``ConfigError`` naming the unknown targets (with the
    linear layers the model has) when a target matches nothing.
    """
    cfg = cfg or LoRAConfig()
    if lora_modules(model):
        raise ConfigError("apply_lora: the model already has LoRA adapters "
                          f"({len(lora_modules(model))} layers); merge_lora() them first or use a fresh model")
    candidates = [n for n in linear_names(model) if n.rsplit(".", 1)[-1] not in EXCLUDED]
    chosen = [n for n in candidates if cfg.matches(n)]
    if cfg.targets != ALL_LINEAR:
        unknown = [t for t in cfg.targets if not any(n == t or n.endswith("." + t) for n in candidates)]
        if unknown:
            kinds = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            raise ConfigError(f"LoRAConfig: field 'targets' names {unknown}, which match no linear layer of this "
                              f"model; its linear layers are {kinds} (or use {ALL_LINEAR!r})")
    if not chosen:
        raise ConfigError("LoRAConfig: no linear layer to adapt in this model")
    model.requires_grad_(False)
    for name in chosen:
        base = model.get_submodule(name)
        _set_module(model, name, LoRALinear(base, cfg.rank_for(name), cfg.alpha_for(name), cfg.dropout,
                                            cfg.use_rslora))
    model.lora_config = cfg
    return chosen


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, under evolm's names (``layers.0.self_attn.q_proj.lora_A.weight``)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; an NF4 weight counts as the parameters it stands for."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, total


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.to(dtype))
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().to(dtype).clone())
    return lin


@torch.no_grad()
def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every adapter into its base weight (W += scaling * B @ A) and restore plain ``nn.Linear``.

    The sum is formed in float32 and stored in the base weight's dtype. NF4 layers (adapted or
    not) are dequantized and become ``nn.Linear`` in ``dtype`` (default: their compute dtype), so
    the result can be saved or exported. All parameters become trainable again. Returns the model.
    """
    for name, m in lora_modules(model).items():
        base = m.base
        if isinstance(base, NF4Linear):
            w = base.dequantize(torch.float32) + m.delta_weight()
            new = _plain_linear(w, base.bias, dtype or base.compute_dtype)
        else:
            base.weight.copy_((base.weight.float() + m.delta_weight().to(base.weight.device)).to(base.weight.dtype))
            new = base
        _set_module(model, name, new)
    for name, m in list(model.named_modules()):
        if isinstance(m, NF4Linear):
            _set_module(model, name, _plain_linear(m.dequantize(torch.float32), m.bias, dtype or m.compute_dtype))
    for attr in ("lora_config", "nf4"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.requires_grad_(True)
    return model


# =========================================================================================
# PEFT format
# =========================================================================================
def _hf_names(model: nn.Module, names: list[str]) -> dict[str, str] | None:
    """evolm module name -> transformers module name in the folder ``save_hf_folder`` writes.

    Uses ``interop.hf.state_dict_to_hf`` on each module's weight name. None when no transformers
    family expresses the config. GPT-2's q/k/v have no name there (transformers fuses them into one
    ``c_attn`` layer, so a separate q/k/v adapter has no PEFT equivalent): they are left out.
    """
    from evolm.interop.hf import state_dict_to_hf

    mt = _family(model)
    if mt is None:
        return None
    if getattr(model.config, "encoder_layers", 0):
        return _seq2seq_hf_names(model, names, mt)
    out = {}
    for n in names:
        if mt == "gpt2" and n.rsplit(".", 1)[-1] in _GPT2_FUSED:
            continue
        hf = state_dict_to_hf({n + ".weight": torch.empty(1, 1)}, model.config, mt)
        out[n] = next(iter(hf)).removesuffix(".weight")
    return out


def _seq2seq_hf_names(model: nn.Module, names: list[str], mt: str) -> dict[str, str]:
    """The same map for an encoder-decoder, whose families translate whole state dicts only (each
    name of the table is looked up): every weight is stood in by a 1x1 tensor holding its index,
    and the index read back from each transformers name says which of ours it is."""
    from evolm.interop.hf import state_dict_to_hf

    with torch.device("meta"):  # the names of the plain model (no adapters, no NF4), built without memory
        keys = list(type(model)(model.config).state_dict())
    sd = {k: torch.full((1, 1), float(i), dtype=torch.float64) for i, k in enumerate(keys)}
    ours = {}
    for hf_name, t in state_dict_to_hf(sd, model.config, mt).items():
        if t.numel() == 1:
            ours.setdefault(keys[int(t.item())], hf_name)  # a tied weight keeps its first (canonical) name
    return {n: ours[n + ".weight"].removesuffix(".weight") for n in names}


def _family(model) -> str | None:
    from evolm.interop.hf import hf_family

    try:
        return hf_family(model.config)
    except (ConfigError, AttributeError, KeyError):
        return None


def _probe(model: nn.Module) -> dict[str, Any]:
    """A few embedding values at fixed positions: recognises the base model an adapter was made for."""
    w = model.embed_tokens.weight.detach()
    idx = torch.linspace(0, w.numel() - 1, _PROBE, dtype=torch.float64).long()
    return {"dtype": str(w.dtype).removeprefix("torch."), "shape": list(w.shape),
            "values": w.reshape(-1)[idx.to(w.device)].float().cpu().tolist()}


def _probe_mismatch(saved: dict, model: nn.Module) -> str | None:
    now = _probe(model)
    if saved.get("shape") != now["shape"]:
        return f"embedding shape {saved.get('shape')} != the model's {now['shape']}"
    a, b = torch.tensor(saved["values"]), torch.tensor(now["values"])
    exact = saved.get("dtype") == now["dtype"] == "float32"
    rtol = 1e-6 if exact else 1e-2  # bf16/fp16 on either side: its rounding
    if not torch.allclose(a, b, rtol=rtol, atol=1e-6):
        bad = int((~torch.isclose(a, b, rtol=rtol, atol=1e-6)).sum())
        return f"{bad} of {_PROBE} probed embedding values differ (e.g. {a[0].item():.6g} vs {b[0].item():.6g})"
    return None


def _short_targets(chosen_hf: list[str], all_hf: list[str]) -> list[str]:
    """Target names for adapter_config.json: suffixes when they select exactly these modules, else full names."""
    short = sorted({h.rsplit(".", 1)[-1] for h in chosen_hf})
    if {h for h in all_hf if h.rsplit(".", 1)[-1] in short} == set(chosen_hf):
        return short
    return sorted(chosen_hf)


def _adapter_keys(model: nn.Module, names: list[str]) -> tuple[dict[str, str] | None, str]:
    """(evolm name -> transformers name, or None), and the naming ("hf" or "evolm") the file will use.

    transformers names when a family expresses the model, so PEFT can load the folder; evolm's own
    names otherwise, with a warning where that costs PEFT compatibility.
    """
    hf = _hf_names(model, names)
    if hf is not None and len(hf) < len(names):
        warnings.warn(f"save_adapter: {sorted(set(names) - set(hf))[:3]}...: GPT-2's transformers model fuses q/k/v "
                      "into one c_attn layer, so these adapters have no PEFT equivalent; saving under evolm's names "
                      "(evolm loads the folder, PEFT does not)", stacklevel=3)
        hf = None
    moe_mlp = [n for n in names if n.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")]
    if hf is not None and getattr(model.config, "n_experts", 0) and moe_mlp:
        warnings.warn(f"save_adapter: adapters on {moe_mlp[0]} and {len(moe_mlp) - 1} other dense/shared-expert MLP "
                      "layers of an MoE model: PEFT (<= 0.21) with transformers 5 retargets gate_proj/up_proj/"
                      "down_proj to the routed experts (huggingface/peft#3711), so PEFT will not load them where "
                      "they belong; evolm's load_adapter does", stacklevel=3)
    return hf, "hf" if hf is not None else "evolm"


def _most_common(values: list):
    return max(set(values), key=values.count)


def _peft_config(model: nn.Module, mods: dict[str, LoRALinear], key: dict[str, str], all_keys: list[str],
                 naming: str, base_model: str | None) -> dict[str, Any]:
    """adapter_config.json as PEFT writes it; the most common rank/alpha is the default, the others
    go to PEFT's per-module patterns."""
    cfg: LoRAConfig = getattr(model, "lora_config", None) or LoRAConfig()
    r = _most_common([m.r for m in mods.values()])
    alpha = _most_common([m.alpha for m in mods.values()])
    meta = getattr(getattr(model, "config", None), "meta", None) or {}
    if base_model is None:
        base_model = meta.get("hf_id") if isinstance(meta, dict) else None
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if getattr(getattr(model, "config", None), "encoder_layers", 0) else "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": _short_targets([key[n] for n in mods], all_keys),
        "bias": "none",
        "fan_in_fan_out": naming == "hf" and _family(model) == "gpt2",  # GPT-2's Conv1D layers store W transposed
        "use_rslora": any(m.use_rslora for m in mods.values()),
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        # PEFT reads pattern keys as regular expressions: escape the dots of full module names
        "rank_pattern": {re.escape(key[n]): m.r for n, m in mods.items() if m.r != r},
        "alpha_pattern": {re.escape(key[n]): m.alpha for n, m in mods.items() if m.alpha != alpha},
        "inference_mode": True,
        "revision": None,
    }


def save_adapter(model: nn.Module, folder: str | Path, base_model: str | None = None) -> Path:
    """Write the adapters as PEFT does: ``adapter_config.json`` + ``adapter_model.safetensors``.

    Keys are those PEFT uses for the transformers model ``save_hf_folder(model)`` writes, so
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_folder), folder)`` loads
    them. ``base_model`` goes to ``base_model_name_or_path`` (default: the config's Hugging Face id,
    if known). A fingerprint of the base (a few embedding values) is kept in the safetensors
    metadata, where PEFT ignores it, so ``load_adapter`` can refuse an adapter made for another base.
    """
    from safetensors.torch import save_file

    from evolm.interop.hf import atomic_folder

    mods = lora_modules(model)
    if not mods:
        raise ValueError("save_adapter: the model has no LoRA adapters (apply_lora or load_adapter first)")
    hf, naming = _adapter_keys(model, list(mods))
    key = hf if hf is not None else {n: n for n in mods}
    tensors = {}
    for n, m in mods.items():
        tensors[f"{PREFIX}{key[n]}.lora_A.weight"] = m.lora_A.weight.detach()
        tensors[f"{PREFIX}{key[n]}.lora_B.weight"] = m.lora_B.weight.detach()
    all_names = [n for n in linear_names(model) if n.rsplit(".", 1)[-1] not in EXCLUDED]
    all_keys = [hf[n] for n in all_names if n in hf] if hf is not None else all_names
    config = _peft_config(model, mods, key, all_keys, naming, base_model)
    metadata = {"format": "pt", "evolm_names": naming, "evolm_base_probe": json.dumps(_probe(model))}

    def fill(tmp: Path) -> None:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file({k: t.contiguous().cpu() for k, t in tensors.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata=metadata)

    return atomic_folder(folder, fill)


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(adapter_config.json, tensors, safetensors metadata) of a PEFT adapter folder."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory (expected a PEFT adapter folder with "
                                f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    cfg_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no {ADAPTER_CONFIG} (expected a PEFT adapter folder)")
    if not weights.is_file():
        has_bin = (folder / "adapter_model.bin").is_file()
        hint = " (found adapter_model.bin: re-save it with safetensors)" if has_bin else ""
        raise FileNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS}{hint}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{weights}: cannot read safetensors file ({e})") from None
    return config, tensors, metadata


def _check_supported(config: dict, where: str) -> None:
    """Refuse adapter kinds evolm's LoRA does not implement (DoRA, LoRA biases, modules_to_save, ...)."""
    ptype = config.get("peft_type")
    if ptype != "LORA":
        raise ConfigError(f"{where}: peft_type is {ptype!r}; only LoRA adapters ('LORA') are supported")
    unsupported = [(k, config[k]) for k in ("use_dora", "lora_bias") if config.get(k, False)]
    if config.get("bias", "none") != "none":
        unsupported.append(("bias", config["bias"]))
    if config.get("modules_to_save"):
        unsupported.append(("modules_to_save", config["modules_to_save"]))
    if unsupported:
        raise ConfigError(f"{where}: adapter_config.json sets {unsupported}, which evolm's LoRA does not support")


def _ab_pairs(tensors: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors grouped by module: {module name: {"lora_A": A, "lora_B": B}}."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    odd = []
    for k, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", k)
        if m is None:
            odd.append(k)
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if odd:
        raise ConfigError(f"{where}: tensors that are not LoRA A/B matrices (e.g. DoRA, embedding adapters, "
                          f"modules_to_save): {odd[:5]}")
    if not pairs:
        raise ConfigError(f"{where}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    half = [n for n, ab in pairs.items() if set(ab) != {"lora_A", "lora_B"}]
    if half:
        raise ConfigError(f"{where}: modules with only one of lora_A/lora_B: {half[:5]}")
    return pairs


def _to_our_names(model: nn.Module, candidates: list[str], naming: str, where: str) -> dict[str, str]:
    """The adapter's module name -> ours, for every module this model can adapt."""
    if naming == "evolm":
        return {n: n for n in candidates}
    hf = _hf_names(model, candidates)
    if hf is None:
        raise ConfigError(f"{where}: the adapter uses transformers module names, but this model's config has no "
                          "transformers family to map them to")
    return {h: n for n, h in hf.items()}


def _check_fits(model: nn.Module, pairs: dict, to_ours: dict[str, str], where: str) -> dict[str, dict]:
    """The pairs under our names, after checking every module exists here and every shape fits it."""
    missing = sorted(k for k in pairs if k not in to_ours)
    if missing:
        raise ConfigError(f"{where}: the adapter was made for another base model: it adapts {len(missing)} "
                          f"module(s) this model does not have, e.g. {missing[:3]}; this model's adaptable modules "
                          f"are like {sorted(to_ours)[:3]}")
    ours = {to_ours[k]: ab for k, ab in pairs.items()}
    wrong = []
    for n, ab in ours.items():
        mod = model.get_submodule(n)
        A, B = ab["lora_A"], ab["lora_B"]
        ok = A.ndim == 2 and B.ndim == 2 and A.shape[1] == mod.in_features and B.shape[0] == mod.out_features \
            and A.shape[0] == B.shape[1]
        if not ok:
            wrong.append(f"{n}: lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)} vs layer "
                         f"({mod.out_features} x {mod.in_features})")
    if wrong:
        raise ConfigError(f"{where}: the adapter was made for another base model: shapes do not fit: {wrong[:3]}")
    return ours


def _check_base_probe(model: nn.Module, config: dict, metadata: dict, where: str) -> None:
    """Refuse an adapter whose recorded base fingerprint (written by ``save_adapter``) differs from this model's."""
    if "evolm_base_probe" not in metadata:
        return
    why = _probe_mismatch(json.loads(metadata["evolm_base_probe"]), model)
    if why:
        raise ConfigError(f"{where}: the adapter was made for another base model: {why} (base recorded as "
                          f"{config.get('base_model_name_or_path')!r}); pass check_base=False "
                          "(evolm merge --no-check-base) to load it anyway")


def _loaded_config(config: dict, ours: dict[str, dict], names: list[str], their_name: dict[str, str]) -> LoRAConfig:
    """The LoRAConfig of a loaded adapter: per-module rank from the shapes, alpha from the config
    (PEFT's ``alpha_pattern`` keys are regular expressions over its module names)."""
    alpha0 = config.get("lora_alpha", 8)
    alpha_pattern = config.get("alpha_pattern") or {}

    def alpha_of(n: str) -> float:
        for pat, a in alpha_pattern.items():
            if re.match(rf"(.*\.)?({pat})$", their_name[n]):
                return a
        return alpha0

    ranks = {n: int(ours[n]["lora_A"].shape[0]) for n in names}
    r0 = int(config.get("r", _most_common(list(ranks.values()))))
    return LoRAConfig(r=r0, alpha=alpha0, dropout=float(config.get("lora_dropout", 0.0) or 0.0), targets=names,
                      use_rslora=bool(config.get("use_rslora", False)),
                      rank_pattern={n: k for n, k in ranks.items() if k != r0},
                      alpha_pattern={n: alpha_of(n) for n in names if alpha_of(n) != alpha0})


def _install(model: nn.Module, cfg: LoRAConfig, ours: dict[str, dict], names: list[str], where: str) -> None:
    """Apply ``cfg`` (or refit the model's existing adapters to it) and copy the A/B weights in."""
    existing = lora_modules(model)
    if existing:
        if set(existing) != set(names) or any(existing[n].r != cfg.rank_for(n) for n in names):
            raise ConfigError(f"{where}: the model already has LoRA adapters on other modules or ranks; "
                              "load onto a model without adapters")
        for n in names:
            alpha, r = cfg.alpha_for(n), cfg.rank_for(n)
            existing[n].scaling = alpha / (math.sqrt(r) if cfg.use_rslora else r)
            existing[n].alpha, existing[n].use_rslora = alpha, cfg.use_rslora
        model.lora_config = cfg
    else:
        apply_lora(model, cfg)
    with torch.no_grad():
        for n in names:
            m = model.get_submodule(n)
            m.lora_A.weight.copy_(ours[n]["lora_A"])
            m.lora_B.weight.copy_(ours[n]["lora_B"])


def load_adapter(model: nn.Module, folder: str | Path, check_base: bool = True) -> list[str]:
    """Load a PEFT LoRA adapter folder (saved by ``save_adapter`` or by PEFT on the transformers model).

    Applies LoRA to the modules the adapter has weights for (or fills the existing adapters when
    the model already has exactly those) and returns their names. Fails, naming the folder and the
    mismatch, when the adapter is for another base: a module this model lacks, a shape that differs,
    or (``check_base``) a base fingerprint that differs from this model's.
    """
    folder = Path(folder)
    config, tensors, metadata = read_adapter(folder)
    where = f"adapter {folder}"
    _check_supported(config, where)
    pairs = _ab_pairs(tensors, where)
    candidates = [n for n in linear_names(model) if n.rsplit(".", 1)[-1] not in EXCLUDED]
    to_ours = _to_our_names(model, candidates, metadata.get("evolm_names", "hf"), where)
    ours = _check_fits(model, pairs, to_ours, where)
    if check_base:
        _check_base_probe(model, config, metadata, where)
    names = sorted(ours, key=candidates.index)
    their_name = {v: k for k, v in to_ours.items()}
    _install(model, _loaded_config(config, ours, names, their_name), ours, names, where)
    return names


# =========================================================================================
# command line: `evolm merge`; the trainers' LoRA flags are evolm.post.common.AdapterConfig
# =========================================================================================
def prepare_lora(model: nn.Module, cfg: LoRAConfig | None, qlora: bool = False) -> list[str]:
    """Apply LoRA ``cfg`` (plus an NF4 base for ``qlora``, QLoRA); [] when ``cfg`` is None."""
    if cfg is None:
        return []
    names = apply_lora(model, cfg)
    if qlora:
        from evolm.quant.nf4 import quantize_base_nf4

        quantize_base_nf4(model)
    return names


MERGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class MergeConfig:
    """``evolm merge``: a base model, a PEFT adapter folder, and where the merged model goes."""

    model: str = option(help="base model: HF folder, GGUF file or evolm checkpoint")
    adapter: str = option(help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    out: str = option(help="output folder")
    to: str = option("evolm", "output format (default: evolm)", choices=["evolm", "hf"])
    dtype: str | None = option(None, "load (and save) the base in this dtype", choices=list(MERGE_DTYPES))
    check_base: bool = option(True, "load the adapter even if it was recorded for a different base model",
                              flag="--no-check-base")


def run_merge(config: MergeConfig) -> None:
    """`evolm merge`: base + adapter -> one model with the adapter folded in."""
    from evolm.loading import load, save

    model, tok = load(config.model, dtype=config.dtype)
    names = load_adapter(model, config.adapter, check_base=config.check_base)
    merge_lora(model)
    save(model, config.out, tokenizer=tok, fmt=config.to)
    print(f"merged {len(names)} LoRA adapters from {config.adapter} into {config.model}; "
          f"wrote {config.to} model to {config.out}")


__all__ = ["LoRAConfig", "LoRALinear", "apply_lora", "merge_lora", "lora_state_dict", "trainable_parameters",
           "save_adapter", "load_adapter", "read_adapter", "linear_names", "lora_modules", "prepare_lora",
           "MergeConfig", "run_merge", "ALL_LINEAR"]
