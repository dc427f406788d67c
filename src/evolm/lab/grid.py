"""``evolm lab scaling``: train an IsoFLOP grid on your own data, then fit the scaling laws to it.

Model sizes (``d_model x n_layers``: heads of 32 dims, an MLP 4x as wide; the rest from the base
recipe) times compute budgets: each size trains on as many tokens as the budget buys it
(``lab/budget.py``: the cost card's FLOPs per token, whole steps within 1%), one run folder each,
sharing the tokenizer, shards and held-out set (``lab/runs.py``). Per budget the sizes form an
IsoFLOP profile (Hoffmann et al. 2022, approach 2); all runs together are the points (N, D, loss)
of approach 3. ``points.csv`` records N with and without the embedding tables, D and C, and
``lab/fit_command.py`` fits them (``fit/fit.json``, plots).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from evolm.lab.budget import Budget
from evolm.lab.runs import Job, prepare_data, run_jobs, shared_setup

HEAD_DIM = 32


@dataclass(frozen=True)
class Size:
    d_model: int
    n_layers: int

    @property
    def name(self) -> str:
        return f"d{self.d_model}x{self.n_layers}"

    def overrides(self) -> dict:
        heads = max(1, self.d_model // HEAD_DIM)
        return {"d_model": self.d_model, "n_layers": self.n_layers, "n_heads": heads, "n_kv_heads": heads,
                "head_dim": self.d_model // heads, "d_ff": 4 * self.d_model}


def parse_sizes(text: str) -> list[Size]:
    """``64x2,128x4`` -> sizes (d_model x n_layers); d_model a multiple of 32."""
    sizes = []
    for item in text.split(","):
        d, sep, n = item.strip().partition("x")
        if not sep or not d.isdigit() or not n.isdigit() or int(d) < 1 or int(n) < 1:
            raise ValueError(f"--sizes {item!r}: expected D_MODELxN_LAYERS, e.g. 128x4")
        if int(d) % HEAD_DIM:
            raise ValueError(f"--sizes {item!r}: d_model must be a multiple of {HEAD_DIM} (the head width)")
        sizes.append(Size(int(d), int(n)))
    return sizes


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--budgets {text!r}: expected FLOPs, comma-separated (1e12,3e12)") from None
    if not budgets or any(b <= 0 for b in budgets):
        raise ValueError(f"--budgets {text!r}: expected positive FLOPs")
    return sorted(budgets)


def plan_grid(base: dict, sizes: list[Size], budgets: list[float], tokenizer, log: Callable[[str], None]
              ) -> list[tuple[Size, float, dict, dict]]:
    """(size, budget, recipe, cost card) for every cell; the recipe's stages share the budget's steps."""
    from evolm.analysis.cost import cost_card
    from evolm.lab.ablate import _budgeted, _config

    cells = []
    for size in sizes:
        d = copy.deepcopy(base)
        d.setdefault("model", {}).setdefault("overrides", {}).update(size.overrides())
        config = _config(d, tokenizer)
        seq_len = (d.get("stages") or [{}])[0].get("seq_len", 256)
        card = cost_card(config, context_len=seq_len)
        for c in budgets:
            recipe, notes = _budgeted(copy.deepcopy(d), config, tokenizer, Budget("flops", c))
            tokens = sum(s["tokens"] for s in recipe["stages"])
            log(f"{size.name} at C={c:.3g}: {card['params_total']:,} parameters, {notes[-1]}")
            cells.append((size, c, recipe, {**card, "tokens": tokens, "flops": tokens * card["flops_per_token"]}))
    return cells


def run_grid(base: dict, sizes: list[Size], budgets: list[float], out: str | Path, seed: int = 0,
             data_dir: str | None = None, workers: int = 1, log: Callable[[str], None] = print) -> Path:
    """Train every cell not yet done; write ``points.csv`` (one row per run) and return its path."""
    out = Path(out)
    setup = shared_setup(base, out, data_dir, log)
    cells = plan_grid(setup.base, sizes, budgets, setup.tokenizer, log)
    data = prepare_data(setup, setup.base, log)
    folder = lambda size, c: out / size.name / f"C-{c:.3g}" / f"seed-{seed}"  # noqa: E731
    run_jobs([Job(recipe, seed, folder(size, c), data, data_dir, name=f"{size.name}-C{c:.3g}")
              for size, c, recipe, _ in cells], workers, log)
    rows = []
    for size, c, _, card in cells:
        summary = json.loads((folder(size, c) / "summary.json").read_text())
        rows.append({"size": size.name, "N_with_embeddings": card["params_total"],
                     "N_without_embeddings": card["params_non_embedding"], "D": card["tokens"],
                     "C": c, "C_card": card["flops"], "loss": summary["val_loss"], "train_s": summary.get("train_s")})
    path = out / "points.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def add_scaling_args(p: argparse.ArgumentParser) -> None:
    from evolm.lab.fit_command import PARAM_CONVENTIONS

    p.add_argument("--base", default="recipes/lab-base.yaml", help="the recipe every size starts from")
    p.add_argument("--sizes", default="32x2,64x2,96x3,128x4,160x4", help="d_model x n_layers, comma-separated")
    p.add_argument("--budgets", default="1.5e12,4e12,1e13", help="training FLOPs of each IsoFLOP profile")
    p.add_argument("--out", default="runs/lab/scaling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="runs at once, in separate processes sharing the cores")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--fit-budget", type=float, action="append", default=[],
                   help="compute budgets C to split into N_opt, D_opt (default: the largest grid budget and 10x it)")
    p.add_argument("--params", choices=PARAM_CONVENTIONS, default="with-embeddings",
                   help="which parameter count the fit uses as N (Chinchilla: all parameters)")
    p.add_argument("--bootstrap", type=int, default=200)


def run_scaling(args) -> dict:
    import yaml

    from evolm.lab.fit_command import run_fit

    sizes, budgets = parse_sizes(args.sizes), parse_budgets(args.budgets)
    if len(sizes) * len(budgets) < 5:
        raise ValueError(f"{len(sizes)} sizes x {len(budgets)} budgets: a fit of 5 parameters needs more runs")
    base = yaml.safe_load(Path(args.base).read_text())
    if not isinstance(base, dict):
        raise ValueError(f"{args.base}: expected a recipe mapping")
    points = run_grid(base, sizes, budgets, args.out, seed=args.seed, data_dir=args.data_dir, workers=args.jobs)
    fit_args = argparse.Namespace(points=str(points), out=str(Path(args.out) / "fit"), bootstrap=args.bootstrap,
                                  seed=args.seed, starts=64, budget=args.fit_budget or [budgets[-1], 10 * budgets[-1]],
                                  flops_per_token=6.0, params=args.params, no_plots=False)
    return run_fit(fit_args)
