"""``evolm lab ablate``: variants of one recipe, trained at equal compute over several seeds.

A variant changes ModelConfig fields (``norm=layernorm``: they go to the recipe's
``model.overrides``) or recipe keys (``optim.lr=1e-3``, ``train.micro_batch=8``: a dotted
section.key). ``--vary`` lists values per key; the variants are every combination, the first is the
baseline. Every variant gets the same budget (``lab/budget.py``: equal training FLOPs, or equal
tokens), the parameter-matching rules that apply to it, the same tokenizer, shards and held-out set
(made once in ``OUT/shared``, ``lab/runs.py``), and the same seeds. ``--sweep optim.lr=...`` tries
each setting for every variant and judges each at its best (an innovation judged at the wrong LR
is misjudged: Porian et al. 2024). Each (variant, seed) is an ordinary run folder
(``OUT/<variant>/seed-<k>``: metrics, checkpoint, report), skipped when its summary exists, so an
interrupted ablation resumes where it stopped; ``--jobs N`` runs N at once. ``results.json`` and
``report.md`` compare each variant's final validation losses with the baseline's (``lab/stats.py``).
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from evolm.config import ModelConfig
from evolm.lab.budget import Budget, match_parameters, plan_tokens, training_flops_per_token
from evolm.lab.runs import Job, Setup, bits_per_byte, prepare_data, run_jobs, shared_setup, tokens_per_byte
from evolm.lab.report import plot, report_text
from evolm.lab.stats import compare


@dataclass(frozen=True)
class Variant:
    name: str
    changes: dict[str, Any] = field(default_factory=dict)
    on: str | None = None  # on a ladder: the rung this one builds on and is compared with (default: the previous)
    side: bool = False     # on a ladder: a side rung, compared with ``on`` but built on by no later rung


def parse_vary(items: list[str]) -> list[Variant]:
    """``["norm=layernorm,rmsnorm", "optim.lr=1e-3,3e-3"]`` -> every combination, the first the baseline."""
    keys, values = [], []
    for item in items:
        key, sep, vals = item.partition("=")
        if not sep or not key or not vals:
            raise ValueError(f"--vary {item!r}: expected KEY=VALUE[,VALUE...]")
        keys.append(key.strip())
        values.append([_value(v) for v in vals.split(",")])
    variants = []
    for combo in itertools.product(*values):
        changes = dict(zip(keys, combo))
        name = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in changes.items()) or "base"
        variants.append(Variant(re.sub(r"[^A-Za-z0-9_.-]", "", name), changes))
    return variants


def _value(text: str) -> Any:
    """A --vary value as YAML reads it, except that 1e-3 is a number (YAML 1.1 reads it as text)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_variant(base: dict, variant: Variant) -> dict:
    """The recipe dict of ``variant``: ModelConfig fields into ``model.overrides``, dotted keys into
    their section (``optim.lr``), a stage by its name (``stages.decay.mixture``); ``lab.*`` keys are
    the lab's own (``lab.moe_match``) and stay in ``d["lab"]``."""
    d = copy.deepcopy(base)
    fields = set(ModelConfig.__dataclass_fields__)
    for key, value in variant.changes.items():
        if "." in key:
            _set_path(d, key, value)
        elif key in fields:
            d.setdefault("model", {}).setdefault("overrides", {})[key] = value
        else:
            raise ValueError(f"--vary {key}: not a ModelConfig field; recipe keys are written section.key "
                             f"(e.g. optim.lr, data.near_dedup, stages.<stage name>.mixture)")
    return d


def _set_path(d: dict, key: str, value: Any) -> None:
    *path, last = key.split(".")
    node: Any = d
    for part in path:
        if isinstance(node, list):  # a list of named items (the stages): pick one by name
            named = [item for item in node if isinstance(item, dict) and item.get("name") == part]
            if not named:
                raise ValueError(f"--vary {key}: no item named {part!r} (have "
                                 f"{[item.get('name') for item in node if isinstance(item, dict)]})")
            node = named[0]
        else:
            node = node.setdefault(part, {})
    if not isinstance(node, dict):
        raise ValueError(f"--vary {key}: {'.'.join(path)} is not a section")
    node[last] = value


@dataclass(frozen=True)
class Plan:
    """What an ablation trains: its variants' budgeted recipes and the runs they make."""

    variants: list[Variant]
    recipes: dict[str, dict]          # variant name -> recipe dict (budgeted, matched)
    sweep: list[Variant]              # settings tried per variant (``[Variant("")]``: no sweep)
    seeds: list[int]
    against: dict[str, str]           # variant name -> the variant it is compared with

    def folder(self, out: Path, variant: str, point: Variant, seed: int) -> Path:
        return out / variant / point.name / f"seed-{seed}" if point.name else out / variant / f"seed-{seed}"


def plan_ablation(setup: Setup, variants: list[Variant], seeds: list[int], budget: Budget, ladder: bool = False,
                  sweep: list[Variant] | None = None, log: Callable[[str], None] = print) -> Plan:
    """Each variant's budgeted recipe and what it is compared with: the baseline, or on a ladder
    the rung it builds on (``Variant.on``, else the one before)."""
    if len(seeds) < 2:
        raise ValueError(f"a comparison needs at least 2 seeds per variant, got {len(seeds)}")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names repeat: {names}")
    recipes: dict[str, dict] = {}
    against: dict[str, str] = {}
    baseline = _config(apply_variant(setup.base, variants[0]), setup.tokenizer)
    main_line: list[str] = []
    for i, v in enumerate(variants):
        parent = (v.on or main_line[-1]) if ladder and i else None
        if not v.side:
            main_line.append(v.name)
        if parent is not None and parent not in recipes:
            raise ValueError(f"rung {v.name!r} builds on {parent!r}, which is not an earlier rung")
        start = recipes[parent] if parent else setup.base
        reference = _config(recipes[parent], setup.tokenizer) if parent else baseline
        recipes[v.name], notes = _budgeted(apply_variant(start, v), reference, setup.tokenizer, budget)
        if i:
            against[v.name] = parent or variants[0].name
        for note in notes:
            log(f"{v.name}: {note}")
    return Plan(variants, recipes, sweep or [Variant("")], seeds, against)


def run_ablation(base: dict, variants: list[Variant], seeds: list[int], budget: Budget, out: str | Path,
                 data_dir: str | None = None, log: Callable[[str], None] = print, ladder: bool = False,
                 sweep: list[Variant] | None = None, workers: int = 1) -> dict:
    """Train every (variant, sweep point, seed) not yet done under ``out``; write and return the results.

    ``ladder``: each variant's changes apply on top of the previous variant (its matched widths
    included), and each is compared with the previous one: what that one step buys. ``sweep``:
    settings (e.g. learning rates) tried for every variant; each variant is judged at its best one.
    """
    import time

    out = Path(out)
    t0 = time.time()
    setup = shared_setup(base, out, data_dir, log)
    plan = plan_ablation(setup, variants, seeds, budget, ladder, sweep, log)
    jobs = []
    for v in variants:
        data = prepare_data(setup, plan.recipes[v.name], log)
        for point in plan.sweep:
            recipe = apply_variant(plan.recipes[v.name], point)
            recipe.pop("lab", None)
            jobs += [Job(recipe, s, plan.folder(out, v.name, point, s), data, data_dir, name=v.name) for s in seeds]
    shared_s = time.time() - t0
    run_jobs(jobs, workers, log)
    results = collect(out, plan, setup, ladder)
    results.update(shared_setup_s=shared_s, wall_s=time.time() - t0, workers=workers)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(report_text(results) + "\n![loss curves](loss_curves.png)\n\n"
                                   "![delta](delta.png)\n")
    plot(out, results)
    return results


def _config(d: dict, tokenizer) -> ModelConfig:
    """The ModelConfig a recipe dict trains (as ``train.pretrain.build_model`` resolves it), for its cost card."""
    from evolm.loading import load_config
    from evolm.train.recipe import recipe_from_dict

    recipe = recipe_from_dict({k: v for k, v in d.items() if k != "lab"}, "variant")
    overrides = dict(recipe.model.overrides)
    config = load_config(recipe.model.preset if recipe.model.preset is not None else recipe.model.config)
    if overrides.get("vocab_size") == "tokenizer":
        overrides["vocab_size"] = tokenizer.vocab_size
    return config.replace(**overrides, name=recipe.name)


def _objective(d: dict):
    """The recipe's pretraining objective (``objective:``; clm when absent)."""
    from evolm.train.recipe import recipe_from_dict

    return recipe_from_dict({k: v for k, v in d.items() if k != "lab"}, "variant").objective


def _budgeted(d: dict, baseline: ModelConfig, tokenizer, budget: Budget) -> tuple[dict, list[str]]:
    """``d`` with its parameter-matching fields and its stages' tokens set for ``budget``: the
    budget's whole steps are shared out over the stages in the proportions the recipe writes."""
    as_written = _config(d, tokenizer)
    config, notes = match_parameters(baseline, as_written, moe_match=(d.get("lab") or {}).get("moe_match", "active"))
    for k in ("d_ff", "moe_d_ff"):
        if getattr(config, k) != getattr(as_written, k):
            d.setdefault("model", {}).setdefault("overrides", {})[k] = getattr(config, k)
    stages = d.get("stages") or [{}]
    seq_lens = {s.get("seq_len", 256) for s in stages}
    if len(seq_lens) != 1:
        raise ValueError(f"lab: the base recipe's stages train at several seq_len {sorted(seq_lens)}; "
                         f"a budget needs one (the FLOPs per token depend on it)")
    tokens_per_step = (d.get("train") or {}).get("tokens_per_step") or 0
    if not tokens_per_step:
        raise ValueError("lab: the base recipe needs train.tokens_per_step (the budget is whole steps)")
    plan = plan_tokens(config, budget, seq_lens.pop(), tokens_per_step, _objective(d))
    steps = _share(plan.steps, [s.get("tokens", 1) for s in stages])
    d["stages"] = [dict(s, tokens=n * tokens_per_step) for s, n in zip(stages, steps)]
    split = " + ".join(f"{s.get('name', 'stage')} {n}" for s, n in zip(stages, steps)) if len(stages) > 1 else ""
    notes.append(f"{plan.steps} steps{f' ({split})' if split else ''} x {tokens_per_step} tokens = "
                 f"{plan.tokens:,} tokens, {plan.flops:.3g} FLOPs ({plan.flops_per_token:,} per token; "
                 f"{100 * plan.error:.2f}% off the budget)")
    return d, notes


def _share(steps: int, weights: list[float]) -> list[int]:
    """``steps`` whole steps in proportion to ``weights``, each stage at least one, summing to ``steps``."""
    if steps < len(weights):
        raise ValueError(f"lab: the budget is {steps} steps, fewer than the {len(weights)} stages")
    total = sum(weights)
    counts = [max(1, round(steps * w / total)) for w in weights[:-1]]
    return counts + [steps - sum(counts)]


def collect(out: Path, plan: Plan, setup: Setup, ladder: bool = False) -> dict:
    """Per variant: changes, parameters, FLOPs, tokens, final val loss and bits per byte per seed,
    wall time (set-up / training), the sweep point it is judged at, and its comparison."""
    from evolm.analysis.cost import cost_card

    tpb = tokens_per_byte(setup.heldout, setup.tokenizer)
    rows: dict[str, dict] = {}
    for v in plan.variants:
        points = {}
        for point in plan.sweep:
            runs = [json.loads((plan.folder(out, v.name, point, s) / "summary.json").read_text()) for s in plan.seeds]
            points[point.name] = runs
        best = min(points, key=lambda k: _mean_of([r["val_loss"] for r in points[k]]))
        runs = points[best]
        recipe = plan.recipes[v.name]
        card = cost_card(_config(recipe, setup.tokenizer), context_len=recipe["stages"][0].get("seq_len", 256))
        tokens = sum(s["tokens"] for s in recipe["stages"])
        row = {"variant": v.name, "changes": v.changes, "params_total": card["params_total"],
               "params_active": card["params_active"], "tokens": tokens,
               "flops": tokens * training_flops_per_token(_config(recipe, setup.tokenizer),
                                                          recipe["stages"][0].get("seq_len", 256), _objective(recipe)),
               "val_loss": [r["val_loss"] for r in runs],
               "val_loss_by_source": {k[len("val_loss_"):]: [r[k] for r in runs] for k in sorted(runs[0])
                                      if k.startswith("val_loss_")},
               # a masked / seq2seq loss is per predicted token, not per token of the text: no bits per byte
               "val_bits_per_byte": [bits_per_byte(r["val_loss"], tpb) if _objective(recipe).name == "clm" else None
                                     for r in runs],
               "wall_s": [r.get("wall_s") for r in runs], "setup_s": [r.get("setup_s") for r in runs],
               "train_s": [r.get("train_s") for r in runs], "tokens_per_s": [r.get("tokens_per_s") for r in runs],
               "mean": _mean_of([r["val_loss"] for r in runs]), "std": statistics.stdev([r["val_loss"] for r in runs])}
        if best:
            row["sweep"] = {k: _mean_of([r["val_loss"] for r in rs]) for k, rs in points.items()}
            row["best"] = best
        rows[v.name] = row
    for name, other in plan.against.items():
        c = compare(rows[name]["val_loss"], rows[other]["val_loss"])
        rows[name].update(std=c.std, delta=c.delta, ci95=[c.low, c.high], p_value=c.p_value, verdict=c.verdict,
                          against=other)
    rows[plan.variants[0].name]["baseline"] = True
    return {"baseline": plan.variants[0].name, "ladder": ladder, "seeds": plan.seeds, "tokens_per_byte": tpb,
            "heldout": str(setup.heldout), "variants": list(rows.values())}


def _mean_of(xs: list[float]) -> float:
    return sum(xs) / len(xs)
