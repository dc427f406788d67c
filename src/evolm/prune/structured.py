"""Structured (Minitron) pruning: cut heads, MLP channels, embedding channels and layers, and
write a real smaller model.

Muralidharan et al. 2024 (arXiv:2407.14679) and Sreenivas et al. 2024 ("LLM Pruning and
Distillation in Practice: the Minitron Approach", arXiv:2408.11796): rank each structure by its
activation importance on a calibration set (``importance.py``), keep the most important ones up
to a target size, slice the kept rows and columns out of every weight, then retrain the small
model by distilling from the unpruned one (``evolm distill --student <pruned folder>``).

Choices made here (the papers leave them open or make them for other architectures):

- **Uniform across layers.** A ``ModelConfig`` has one ``n_heads`` and one ``d_ff``, so every
  layer keeps the same number of heads and channels (its own best ones), as Minitron's models do.
- **GQA.** A target ``n_kv_heads`` below the model's drops whole KV groups (a key/value head with
  its query heads; a group's score is the sum of its query heads' scores); then each kept group
  keeps its best ``n_heads / n_kv_heads`` query heads. ``--ratio`` prunes query heads *within*
  groups (KV heads kept; the KV cache keeps its size) while a group has more than one query
  head, and whole groups after that. ``head_dim`` never changes, so RoPE is untouched.
- **Embedding channels** are cut everywhere the hidden size appears: the (tied) embedding and
  head, learned positions, the q/k/v/gate/up inputs, the o_proj/down_proj outputs, every
  d_model-wide norm. An RMSNorm over fewer channels divides by a different RMS; its weights are
  scaled by ``sqrt(d/d' · E[kept share of the input's energy])`` (from the calibration pass) so
  its output keeps its scale (exact when the cut channels carry no energy). Not in the papers
  (their retraining absorbs it); ``rescale_norms=False`` turns it off.
- **Depth** keeps the ``n_layers`` most important blocks in their order (Block Importance by
  default). Models whose layers differ by index (sliding-window patterns, NoPE layers, dense
  first layers of an MoE) are refused for depth pruning: the kept layers would change kind.

MoE experts and multi-head latent attention are not pruned (refused with a one-line error);
weight-only quantized models must be dequantized first (``evolm convert --to evolm``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from evolm.config import ModelConfig
from evolm.model import Transformer, build
from evolm.nn.norm import RMSNorm
from evolm.prune.importance import Importance, compute_importance, d_model_norms
from evolm.prune.masks import PruneError

AXES = ("heads", "mlp", "embed", "layers")
CUT_KEYS = {"heads": "n_heads", "kv": "n_kv_heads", "mlp": "d_ff", "embed": "d_model", "layers": "n_layers"}
DEFAULT_AXES = ("mlp", "embed")  # Llama-3.1-Minitron-4B-Width's choice: hidden size and MLP, heads kept


@dataclass(frozen=True)
class Target:
    """The sizes of the pruned model (each at most the source's)."""

    n_heads: int
    n_kv_heads: int
    d_ff: int
    d_model: int
    n_layers: int

    @classmethod
    def of(cls, c: ModelConfig) -> "Target":
        return cls(c.n_heads, c.n_kv_heads, c.d_ff, c.d_model, c.n_layers)

    def config(self, c: ModelConfig) -> ModelConfig:
        """The source config with these sizes; head_dim is pinned (it was d_model // n_heads by default)."""
        return c.replace(n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=c.head_dim, d_ff=self.d_ff,
                         moe_d_ff=c.moe_d_ff, d_model=self.d_model, n_layers=self.n_layers,
                         name=f"{c.name}-pruned")


# --- what can be pruned -----------------------------------------------------------------------
def check_prunable(c: ModelConfig, target: Target) -> None:
    """One-line errors for a target outside the source's sizes or an architecture this cannot cut."""
    src = Target.of(c)
    for key, f in CUT_KEYS.items():
        new, old = getattr(target, f), getattr(src, f)
        if not 1 <= new <= old:
            raise PruneError(f"prune: {key}={new} ({f}) must be between 1 and the model's {old}")
    if target.n_heads % target.n_kv_heads:
        raise PruneError(f"prune: heads={target.n_heads} is not divisible by kv={target.n_kv_heads} "
                         f"(grouped-query attention needs whole groups of query heads)")
    if target.n_heads // target.n_kv_heads > c.n_heads // c.n_kv_heads:
        raise PruneError(f"prune: heads={target.n_heads} with kv={target.n_kv_heads} needs "
                         f"{target.n_heads // target.n_kv_heads} query heads per KV group; the model has "
                         f"{c.n_heads // c.n_kv_heads}")
    if c.mixer_pattern and target != Target.of(c):
        raise PruneError(f"prune: {c.name} is a hybrid (mixer_pattern={list(c.mixer_pattern)}); structured pruning "
                         f"cuts models whose layers share one mixer (depth would shift the pattern)")
    if c.attention != "mha" and (target.n_heads, target.n_kv_heads, target.d_model) != (c.n_heads, c.n_kv_heads,
                                                                                         c.d_model):
        raise PruneError(f"prune: {c.name} uses attention={c.attention!r}; structured pruning cuts heads and the "
                         f"hidden size of attention='mha' models only")
    if c.n_experts and (target.d_ff, target.d_model) != (c.d_ff, c.d_model):
        raise PruneError(f"prune: {c.name} is a mixture of experts (n_experts={c.n_experts}); structured pruning "
                         f"cuts dense MLPs only (prune heads or layers)")
    if target.n_layers < c.n_layers and (c.sliding_window_pattern > 1 or c.nope_layers or c.first_k_dense):
        raise PruneError(f"prune: {c.name}'s layers differ by index (sliding_window_pattern="
                         f"{c.sliding_window_pattern}, nope_layers={list(c.nope_layers)}, first_k_dense="
                         f"{c.first_k_dense}); depth pruning would change their kinds: prune width only")


def parse_cut(spec: str, c: ModelConfig) -> Target:
    """``heads=6,kv=3,mlp=1024,embed=448,layers=24`` (target sizes; keys left out keep the model's)."""
    sizes = vars(Target.of(c)).copy()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, value = item.partition("=")
        if key not in CUT_KEYS or not eq:
            raise PruneError(f"prune: --cut {item!r}: expected KEY=SIZE with KEY one of {', '.join(CUT_KEYS)}")
        try:
            sizes[CUT_KEYS[key]] = int(value)
        except ValueError:
            raise PruneError(f"prune: --cut {item!r}: {value!r} is not a whole number") from None
    if "kv" not in spec and sizes["n_heads"] < c.n_heads and sizes["n_heads"] % sizes["n_kv_heads"]:
        sizes["n_kv_heads"] = math.gcd(sizes["n_heads"], c.n_kv_heads)  # heads=K alone: drop groups when needed
    target = Target(**sizes)
    check_prunable(c, target)
    return target


def num_params(c: ModelConfig) -> int:
    """Parameters of a config (built on the meta device: nothing allocated)."""
    return build(c, device="meta").num_params()


def target_for_ratio(c: ModelConfig, ratio: float, axes=DEFAULT_AXES) -> Target:
    """The largest model that removes at least ``ratio`` of the parameters, shrinking every axis of
    ``axes`` by the same keep fraction (rounded: widths of 512 or more to multiples of 32, of 64 or more to multiples of 8, where
    the source's are;
    query heads per KV group, then whole groups). Minitron searches architectures; one common
    fraction is the simplest rule that lands on the requested size."""
    if not 0.0 < ratio < 1.0:
        raise PruneError(f"prune: --ratio {ratio}: expected a fraction of the parameters in (0, 1)")
    bad = [a for a in axes if a not in AXES]
    if bad or not axes:
        raise PruneError(f"prune: --axes {','.join(axes)}: expected a comma-separated subset of {', '.join(AXES)}")
    budget = (1.0 - ratio) * num_params(c)

    def at(f: float) -> Target:
        t = Target.of(c)
        sizes = vars(t).copy()
        if "heads" in axes:
            sizes["n_heads"], sizes["n_kv_heads"] = _heads_at(c, f)
        if "mlp" in axes:
            sizes["d_ff"] = _width_at(c.d_ff, f)
        if "embed" in axes:
            sizes["d_model"] = _width_at(c.d_model, f)
        if "layers" in axes:
            sizes["n_layers"] = max(1, round(c.n_layers * f))
        return Target(**sizes)

    lo, hi = 0.0, 1.0  # at(lo) fits the budget (or nothing does), at(hi) does not
    for _ in range(40):
        mid = (lo + hi) / 2
        if num_params(at(mid).config(c)) <= budget:
            lo = mid
        else:
            hi = mid
    target = at(lo)
    if num_params(target.config(c)) > budget:
        raise PruneError(f"prune: --ratio {ratio} cannot be reached by pruning {','.join(axes)} of {c.name} (the "
                         f"smallest such model keeps {num_params(target.config(c)) / num_params(c):.0%}); add axes")
    check_prunable(c, target)
    return target


def _width_at(n: int, f: float) -> int:
    step = 32 if n % 32 == 0 and n >= 512 else 8 if n % 8 == 0 and n >= 64 else 1
    return max(step, int(n * f) // step * step)


def _heads_at(c: ModelConfig, f: float) -> tuple[int, int]:
    """(n_heads, n_kv_heads) keeping about ``f`` of the query heads: fewer per group first, then fewer groups."""
    per_group, groups = c.n_heads // c.n_kv_heads, c.n_kv_heads
    want = max(1, int(c.n_heads * f))
    if want >= groups:
        return want // groups * groups, groups
    return want, want  # one query head per group, fewer groups


# --- which structures stay ------------------------------------------------------------------
@dataclass
class Keep:
    """Kept indices, in their original order: ``layers``; per kept layer ``heads`` (query heads),
    ``kv`` (KV heads) and ``mlp`` (channels); ``embed`` (hidden channels)."""

    layers: list[int]
    heads: list[list[int]]
    kv: list[list[int]]
    mlp: list[list[int]]
    embed: list[int]


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, in increasing index order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def select(c: ModelConfig, imp: Importance, target: Target) -> Keep:
    """The structures that stay, by importance."""
    layers = _top(imp.layers, target.n_layers)
    group = c.n_heads // c.n_kv_heads
    per_group = target.n_heads // target.n_kv_heads
    heads, kv = [], []
    for i in layers:
        h = imp.heads[i]
        groups = _top(h.view(c.n_kv_heads, group).sum(-1), target.n_kv_heads)
        kv.append(groups)
        heads.append([g * group + j for g in groups for j in _top(h[g * group:(g + 1) * group], per_group)])
    return Keep(layers, heads, kv, [_top(imp.mlp[i], target.d_ff) for i in layers], _top(imp.embed, target.d_model))


# --- slicing the weights ----------------------------------------------------------------------
def _head_rows(idx: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in idx for d in range(head_dim)], dtype=torch.long)


def _copy_linear(dst: nn.Linear, src: nn.Linear, rows=None, cols=None) -> None:
    w = src.weight
    w = w if rows is None else w.index_select(0, rows)
    w = w if cols is None else w.index_select(1, cols)
    dst.weight.copy_(w)
    if src.bias is not None:
        dst.bias.copy_(src.bias if rows is None else src.bias.index_select(0, rows))


def _norm_scale(src: nn.Module, energy: torch.Tensor | None, e: torch.Tensor, d: int) -> float:
    """The factor an RMSNorm's weight needs over fewer channels: ``sqrt(d/d' · kept energy share)``."""
    if energy is None or len(e) == d:
        return 1.0
    return math.sqrt(d / len(e) * float(energy.index_select(0, e).sum()))


def _copy_norm(dst: nn.Module, src: nn.Module, idx: torch.Tensor | None, scale: float = 1.0) -> None:
    w = src.weight if idx is None else src.weight.index_select(0, idx)
    if getattr(src, "unit_offset", False):  # Gemma stores w with the output scaled by (1 + w)
        dst.weight.copy_((1.0 + w) * scale - 1.0)
    else:
        dst.weight.copy_(w * scale)
    if getattr(src, "bias", None) is not None:
        dst.bias.copy_(src.bias if idx is None else src.bias.index_select(0, idx))


@torch.no_grad()
def prune_model(model: Transformer, imp: Importance, target: Target, rescale_norms: bool = True) -> Transformer:
    """A new ``Transformer`` of ``target``'s sizes holding ``model``'s most important structures."""
    c = model.config
    check_prunable(c, target)
    _check_float(model)
    keep = select(c, imp, target)
    new = build(target.config(c), dtype=model.embed_tokens.weight.dtype)
    e = torch.tensor(keep.embed, dtype=torch.long)
    full_e = len(keep.embed) == c.d_model
    ecols = None if full_e else e
    norm_names = d_model_norms(model)
    energy = imp.energy if rescale_norms else {}

    def norm(dst, name):
        src = norm_names[name]
        scale = _norm_scale(src, energy.get(name), e, c.d_model) if isinstance(src, RMSNorm) else 1.0
        _copy_norm(dst, src, ecols, scale)

    new.embed_tokens.weight.copy_(model.embed_tokens.weight if full_e else model.embed_tokens.weight[:, e])
    if model.pos_embed is not None:
        new.pos_embed.weight.copy_(model.pos_embed.weight if full_e else model.pos_embed.weight[:, e])
    if model.lm_head is not None:
        _copy_linear(new.lm_head, model.lm_head, cols=ecols)
    if model.norm is not None:
        norm(new.norm, "norm")
    for j, i in enumerate(keep.layers):
        dst, src = new.layers[j], model.layers[i]
        for part in ("attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm"):
            if hasattr(src, part):
                norm(getattr(dst, part), f"layers.{i}.{part}")
        _slice_attention(dst.self_attn, src.self_attn, keep.heads[j], keep.kv[j], ecols, c)
        _slice_mlp(dst.mlp, src.mlp, torch.tensor(keep.mlp[j], dtype=torch.long), ecols, c)
    new.config.meta = {**c.meta, "pruned": {"from": {k: getattr(Target.of(c), v) for k, v in CUT_KEYS.items()},
                                            "layers_kept": keep.layers, "layer_metric": imp.layer_metric,
                                            "calibration_tokens": imp.tokens, "rescale_norms": rescale_norms}}
    return new.eval()


def _slice_attention(dst, src, heads, kv, ecols, c: ModelConfig) -> None:
    if c.attention != "mha":  # MLA: width kept (check_prunable), copied whole
        dst.load_state_dict(src.state_dict())
        return
    q, k = _head_rows(heads, c.head_dim), _head_rows(kv, c.head_dim)
    _copy_linear(dst.q_proj, src.q_proj, q, ecols)
    _copy_linear(dst.k_proj, src.k_proj, k, ecols)
    _copy_linear(dst.v_proj, src.v_proj, k, ecols)
    _copy_linear(dst.o_proj, src.o_proj, ecols, q)
    if c.qk_norm == "head":
        _copy_norm(dst.q_norm, src.q_norm, None)
        _copy_norm(dst.k_norm, src.k_norm, None)
    elif c.qk_norm == "full":  # norms over the whole projection: their statistics now cover fewer heads
        _copy_norm(dst.q_norm, src.q_norm, q)
        _copy_norm(dst.k_norm, src.k_norm, k)


def _slice_mlp(dst, src, f, ecols, c: ModelConfig) -> None:
    if not hasattr(src, "down_proj") or not isinstance(src.down_proj, nn.Linear):  # MoE: kept whole
        dst.load_state_dict(src.state_dict())
        return
    if src.gated:
        _copy_linear(dst.gate_proj, src.gate_proj, f, ecols)
    _copy_linear(dst.up_proj, src.up_proj, f, ecols)
    _copy_linear(dst.down_proj, src.down_proj, ecols, f)


def _check_float(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if name and (hasattr(m, "dequantize") or hasattr(m, "blocks") or hasattr(m, "qkv_proj")
                     or hasattr(m, "gate_up_proj")):
            raise PruneError(f"prune: layer '{name}' is quantized or fused ({type(m).__name__}); structured pruning "
                             f"slices float weights: load the model in float (evolm convert --to evolm first)")


# --- the command (`evolm prune --method minitron`; its options are in cli.py) -----------------
def _opt(args, name, default):
    v = getattr(args, name, None)
    return default if v is None else v


def run(args, log: Callable[[str], None] | None = None) -> dict:
    """``evolm prune --method minitron``: load, score on calibration windows, cut, save; returns a summary."""
    import time

    from evolm.loading import load, save
    from evolm.quant.calibration import CalibrationConfig, calibration_ids

    log = log or (lambda m: print(m, file=sys.stderr))
    cut, ratio = _opt(args, "cut", None), _opt(args, "ratio", None)
    if _opt(args, "sparsity", None) is not None or _opt(args, "pattern", None) is not None:
        raise PruneError("prune --method minitron removes whole structures: give --ratio or --cut, not "
                         "--sparsity / --pattern (those are for magnitude, wanda, sparsegpt)")
    if (cut is None) == (ratio is None):
        raise PruneError("prune --method minitron: give exactly one of --ratio (fraction of parameters removed) "
                         "and --cut (target sizes)")
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise PruneError(f"prune: --ratio {ratio}: expected a fraction of the parameters in (0, 1)")
    start = time.perf_counter()
    model, tok = load(args.model, dtype="float32", need_tokenizer=True)
    c = model.config
    target = parse_cut(cut, c) if cut else target_for_ratio(c, ratio, tuple(_opt(args, "axes", "heads,mlp,embed")
                                                                             .split(",")))
    calib = CalibrationConfig(sources=tuple(_opt(args, "calib_data", None) or ()),
                              samples=_opt(args, "calib_samples", 32), seq_len=_opt(args, "calib_len", 512),
                              seed=_opt(args, "seed", 0))
    ids = calibration_ids(tok, calib)
    log(f"prune: scoring {c.name} on {ids.shape[0]} x {ids.shape[1]} calibration tokens")
    imp = compute_importance(model, ids, layer_metric=_opt(args, "layer_metric", "bi"))
    small = prune_model(model, imp, target, rescale_norms=_opt(args, "rescale_norms", True))
    save(small, args.out, tokenizer=tok)
    before, after = model.num_params(), small.num_params()
    summary = {"out": str(args.out), "params_before": before, "params_after": after,
               "removed": round(1 - after / before, 4), "sizes": vars(target),
               "layers_kept": small.config.meta["pruned"]["layers_kept"], "seconds": round(time.perf_counter() - start, 1)}
    print(f"wrote pruned model to {args.out}: {after / 1e6:.1f}M of {before / 1e6:.1f}M parameters "
          f"({summary['removed']:.1%} removed); heads {target.n_heads}/{c.n_heads}, kv {target.n_kv_heads}/"
          f"{c.n_kv_heads}, d_ff {target.d_ff}/{c.d_ff}, d_model {target.d_model}/{c.d_model}, layers "
          f"{target.n_layers}/{c.n_layers}")
    return summary


__all__ = ["Target", "Keep", "PruneError", "parse_cut", "target_for_ratio", "select", "prune_model", "run",
           "num_params", "check_prunable", "AXES", "compute_importance"]
