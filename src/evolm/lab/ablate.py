"""``evolm lab ablate``: variants of one recipe, trained at equal compute over several seeds.

A variant changes ModelConfig fields (``norm=layernorm``: they go to the recipe's
``model.overrides``) or recipe keys (``optim.lr=1e-3``, ``train.micro_batch=8``: a dotted
section.key). ``--vary`` lists values per key; the variants are every combination, the first is the
baseline. Every variant gets the same budget (``lab/budget.py``: equal training FLOPs, or equal
tokens), the parameter-matching rules that apply to it, the same tokenizer (trained once in
``OUT/shared``), the same data and held-out split, and the same seeds. Each (variant, seed) is an
ordinary run folder (``OUT/<variant>/seed-<k>``: metrics, checkpoint, report), skipped when its
report exists, so an interrupted ablation resumes where it stopped. ``results.json`` and
``report.md`` compare each variant's final validation losses with the baseline's (``lab/stats.py``).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from evolm.config import ModelConfig
from evolm.lab.budget import Budget, match_parameters, plan_tokens
from evolm.lab.stats import compare


@dataclass(frozen=True)
class Variant:
    name: str
    changes: dict[str, Any] = field(default_factory=dict)


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
    """The recipe dict of ``variant``: ModelConfig fields into ``model.overrides``, dotted keys into their section."""
    d = copy.deepcopy(base)
    fields = set(ModelConfig.__dataclass_fields__)
    for key, value in variant.changes.items():
        if "." in key:
            section, _, sub = key.partition(".")
            d.setdefault(section, {})[sub] = value
        elif key in fields:
            d.setdefault("model", {}).setdefault("overrides", {})[key] = value
        else:
            raise ValueError(f"--vary {key}: not a ModelConfig field; recipe keys are written section.key "
                             f"(e.g. optim.lr)")
    return d


def run_ablation(base: dict, variants: list[Variant], seeds: list[int], budget: Budget, out: str | Path,
                 data_dir: str | None = None, log: Callable[[str], None] = print, ladder: bool = False) -> dict:
    """Train every (variant, seed) not yet done under ``out``; write and return the results.

    ``ladder``: each variant's changes apply on top of the previous variant (its matched widths
    included), and each is compared with the previous one: what that one step buys.
    """
    from evolm.train.pretrain import load_or_train_tokenizer
    from evolm.train.recipe import recipe_from_dict

    out = Path(out)
    shared = out / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    tokenizer = load_or_train_tokenizer(recipe_from_dict(base, "base recipe"), shared, data_dir, log)
    base = copy.deepcopy(base)
    base["tokenizer"] = {"path": str(shared if (shared / "tokenizer_config.json").is_file() else
                                     shared / "tokenizer.json")}
    plans, previous = {}, None
    baseline_config = _config(apply_variant(base, variants[0]), tokenizer)
    for v in variants:
        start = plans[previous] if ladder and previous else base
        reference = _config(plans[previous], tokenizer) if ladder and previous else baseline_config
        d, notes = _budgeted(apply_variant(start, v), reference, tokenizer, budget)
        plans[v.name], previous = d, v.name
        for note in notes:
            log(f"{v.name}: {note}")
    for v in variants:
        for seed in seeds:
            _run_one(plans[v.name], seed, out / v.name / f"seed-{seed}", data_dir, log)
    results = collect(out, variants, seeds, plans, tokenizer, ladder)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(report_text(results) + "\n![loss curves](loss_curves.png)\n\n"
                                   "![delta vs baseline](delta.png)\n")
    plot(out, results)
    return results


def _config(d: dict, tokenizer) -> ModelConfig:
    """The ModelConfig a recipe dict trains (as ``train.pretrain.build_model`` resolves it), for its cost card."""
    from evolm.loading import load_config
    from evolm.train.recipe import recipe_from_dict

    recipe = recipe_from_dict(d, "variant")
    overrides = dict(recipe.model.overrides)
    config = load_config(recipe.model.preset if recipe.model.preset is not None else recipe.model.config)
    if overrides.get("vocab_size") == "tokenizer":
        overrides["vocab_size"] = tokenizer.vocab_size
    return config.replace(**overrides, name=recipe.name)


def _budgeted(d: dict, baseline: ModelConfig, tokenizer, budget: Budget) -> tuple[dict, list[str]]:
    """``d`` with its parameter-matching fields and its one stage's tokens set for ``budget``."""
    as_written = _config(d, tokenizer)
    config, notes = match_parameters(baseline, as_written)
    for k in ("d_ff", "moe_d_ff"):
        if getattr(config, k) != getattr(as_written, k):
            d.setdefault("model", {}).setdefault("overrides", {})[k] = getattr(config, k)
    stages = d.get("stages") or [{}]
    if len(stages) != 1:
        raise ValueError(f"lab ablate: the base recipe has {len(stages)} stages; a budget is set on one stage")
    stage = stages[0]
    tokens_per_step = (d.get("train") or {}).get("tokens_per_step") or 0
    if not tokens_per_step:
        raise ValueError("lab ablate: the base recipe needs train.tokens_per_step (the budget is whole steps)")
    plan = plan_tokens(config, budget, stage.get("seq_len", 256), tokens_per_step)
    stage["tokens"] = plan.tokens
    d["stages"] = [stage]
    notes.append(f"{plan.steps} steps x {tokens_per_step} tokens = {plan.tokens:,} tokens, "
                 f"{plan.flops:.3g} FLOPs ({plan.flops_per_token:,} per token; {100 * plan.error:.2f}% off the budget)")
    return d, notes


def _run_one(d: dict, seed: int, folder: Path, data_dir: str | None, log) -> None:
    from evolm.train.pretrain import pretrain
    from evolm.train.recipe import recipe_from_dict

    if (folder / "summary.json").is_file():
        log(f"{folder}: done, skipped")
        return
    d = dict(d, seed=seed, name=folder.parent.name)
    summary = pretrain(recipe_from_dict(d, str(folder)), out_dir=str(folder), resume=(folder / "checkpoints").exists(),
                       data_dir=data_dir, log=log)
    keep = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
    if keep.get("val_loss") is not None:
        keep["val_bits_per_byte"] = keep["val_loss"] / math.log(2) * _tokens_per_byte(folder / "data")
    (folder / "summary.json").write_text(json.dumps(keep, indent=2))


def _tokens_per_byte(data: Path) -> float:
    """Held-out tokens per UTF-8 byte of their text, so a loss in nats per token becomes bits per
    byte: a measure no tokenizer choice can move (a variant with another vocabulary compares)."""
    import numpy as np

    from evolm.tokenizer import Tokenizer

    manifest = json.loads((data / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(data.parent / "tokenizer.json"))
    eos = manifest["tokenizer"]["eos_id"]
    n_tokens = n_bytes = 0
    for shard in sorted((data / "val").glob("*.bin")):
        ids = np.fromfile(shard, dtype=manifest["tokenizer"]["dtype"]).tolist()
        n_tokens += len(ids)
        n_bytes += len(tok.decode([i for i in ids if i != eos]).encode("utf-8"))
    return n_tokens / max(1, n_bytes)


def collect(out: Path, variants: list[Variant], seeds: list[int], plans: dict, tokenizer,
            ladder: bool = False) -> dict:
    """Per variant: changes, parameters, FLOPs, tokens, final val loss per seed, and the comparison
    with the baseline (``ladder``: with the previous rung)."""
    from evolm.analysis.cost import cost_card

    rows, losses = [], {}
    for v in variants:
        runs = [json.loads((out / v.name / f"seed-{s}" / "summary.json").read_text()) for s in seeds]
        losses[v.name] = [r["val_loss"] for r in runs]
        config = _config(plans[v.name], tokenizer)
        stage = plans[v.name]["stages"][0]
        card = cost_card(config, context_len=stage.get("seq_len", 256))
        rows.append({"variant": v.name, "changes": v.changes, "params_total": card["params_total"],
                     "params_active": card["params_active"], "tokens": stage["tokens"],
                     "flops": stage["tokens"] * card["flops_per_token"], "val_loss": losses[v.name],
                     "val_bits_per_byte": [r.get("val_bits_per_byte") for r in runs],
                     "wall_s": [r.get("wall_s") for r in runs]})
    base = losses[variants[0].name]
    for before, row in zip(rows, rows[1:]):
        c = compare(row["val_loss"], before["val_loss"] if ladder else base)
        row.update(mean=c.mean, std=c.std, delta=c.delta, ci95=[c.low, c.high], p_value=c.p_value,
                   verdict=c.verdict, against=before["variant"] if ladder else variants[0].name)
    first = rows[0]
    first.update(mean=sum(base) / len(base), baseline=True)
    return {"baseline": variants[0].name, "ladder": ladder, "seeds": seeds, "variants": rows}


def report_text(results: dict) -> str:
    against = "previous rung" if results.get("ladder") else "baseline"
    lines = [f"# {'Ladder' if results.get('ladder') else 'Ablation'} (baseline: {results['baseline']}; "
             f"seeds {results['seeds']})", "",
             f"| variant | params | FLOPs | tokens | val loss mean | bits/byte | Δ vs {against} | 95% CI | p | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["variants"]:
        if r.get("baseline"):
            lines.append(f"| {r['variant']} (baseline) | {r['params_total']:,} | {r['flops']:.3g} | {r['tokens']:,} "
                         f"| {r['mean']:.4f} | {_mean(r['val_bits_per_byte'])} | | | | |")
        else:
            lines.append(f"| {r['variant']} | {r['params_total']:,} | {r['flops']:.3g} | {r['tokens']:,} | "
                         f"{r['mean']:.4f} ± {r['std']:.4f} | {_mean(r['val_bits_per_byte'])} | {r['delta']:+.4f} | "
                         f"[{r['ci95'][0]:+.4f}, "
                         f"{r['ci95'][1]:+.4f}] | {r['p_value']:.3g} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def _mean(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    return f"{sum(xs) / len(xs):.4f}" if xs else "-"


def plot(out: Path, results: dict) -> None:
    """``loss_curves.png`` (training loss per variant: mean over seeds, band = min..max) and
    ``delta.png`` (Δ val loss vs the baseline with its 95% interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in results["variants"]:
        curves = [_train_curve(out / row["variant"] / f"seed-{s}" / "metrics.jsonl") for s in results["seeds"]]
        tokens = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[c[t] for c in curves] for t in tokens]
        ax.plot(tokens, [sum(v) / len(v) for v in values], label=row["variant"])
        ax.fill_between(tokens, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
    ax.set(xlabel="tokens", ylabel="training loss", title="loss over seeds (band: min..max)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)
    rows = [r for r in results["variants"] if not r.get("baseline")]
    fig, ax = plt.subplots(figsize=(7, 1 + 0.5 * max(1, len(rows))))
    for i, r in enumerate(rows):
        ax.errorbar(r["delta"], i, xerr=[[r["delta"] - r["ci95"][0]], [r["ci95"][1] - r["delta"]]], fmt="o", capsize=4)
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(range(len(rows)), [r["variant"] for r in rows])
    ax.set(xlabel=f"Δ val loss vs {'the previous rung' if results.get('ladder') else results['baseline']} (95% CI)")
    fig.tight_layout()
    fig.savefig(out / "delta.png", dpi=120)
    plt.close(fig)


def _train_curve(metrics: Path) -> dict[int, float]:
    """tokens -> training loss, from a run folder's metrics.jsonl."""
    curve = {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row and "tokens" in row:
            curve[row["tokens"]] = row["loss"]
    return curve
