"""``evolm lab fit``: read (N, D, loss[, C]) points from a CSV, fit the scaling laws, write
``fit.json``, print a table and draw the plots. The maths lives in ``evolm.lab.scaling``."""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evolm.lab.scaling import FLOPS_PER_TOKEN, PARAMETERS, IsoFlopFit, LawFit, fit_isoflop, fit_loss_law

PARAM_CONVENTIONS = ("with-embeddings", "without-embeddings")


@dataclass(frozen=True)
class Points:
    N: np.ndarray
    D: np.ndarray
    loss: np.ndarray
    C: np.ndarray | None  # compute budget of each run, for the IsoFLOP groups of approach 2
    n_column: str  # which CSV column gave N


def _n_column(path: Path, fields: list[str], params: str) -> str:
    """``N`` when the file has it (the caller says what it counts); otherwise the column the
    ``params`` convention names, as lab folders record both (``N_with_embeddings``, ...)."""
    if "N" in fields:
        return "N"
    named = "N_" + params.replace("-", "_")
    if named in fields:
        return named
    raise ValueError(f"{path}: no column 'N' (or '{named}'); the header has {fields}")


def _number(path: Path, row: int, column: str, text: str | None) -> float:
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{path}: row {row}, column '{column}': expected a positive number, got {text!r}")
    return value


def read_points(path: str | Path, params: str = "with-embeddings") -> Points:
    """Columns N, D, loss (and optionally C); header names are case-sensitive, extra columns ignored.
    Errors name the file, the row (the header is row 1) and the column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such points file")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = [name.strip() for name in reader.fieldnames or []]
        if not fields:
            raise ValueError(f"{path}: empty file; expected a header with columns N, D, loss (and optionally C)")
        reader.fieldnames = fields
        n_col = _n_column(path, fields, params)
        missing = [c for c in ("D", "loss") if c not in fields]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; the header has {fields}, "
                             "expected N, D, loss (and optionally C)")
        columns = [n_col, "D", "loss"] + (["C"] if "C" in fields else [])
        rows = [[_number(path, i, c, r.get(c)) for c in columns] for i, r in enumerate(reader, start=2)]
    if not rows:
        raise ValueError(f"{path}: no data rows under the header")
    table = np.array(rows, dtype=float)
    return Points(N=table[:, 0], D=table[:, 1], loss=table[:, 2], C=table[:, 3] if "C" in fields else None,
                  n_column=n_col)


def report(fit: LawFit, isoflop: IsoFlopFit | None, budgets: list[float], flops_per_token: float,
           params: str, source: str) -> dict:
    """Everything ``fit.json`` holds: the law with intervals and the split of each budget."""
    law = fit.law
    out = {
        "source": source,
        "law": "L(N, D) = E + A / N^alpha + B / D^beta",
        "method": "approach 3 (Hoffmann et al. 2022; Besiroglu et al. 2024): Huber loss on log loss, L-BFGS",
        "params_counted": params,
        "flops_per_token": flops_per_token,
        "n_points": fit.n_points,
        "huber_delta": fit.huber_delta,
        "objective": fit.objective,
        **{p: getattr(law, p) for p in PARAMETERS},
        "confidence": fit.confidence,
        "bootstrap": len(fit.bootstrap),
        "intervals": {p: list(v) for p, v in fit.intervals.items()},
        "budgets": [],
    }
    for C in budgets:
        split = law.compute_optimal(C, flops_per_token)
        row = {"C": C, "N_opt": split.N, "D_opt": split.D, "tokens_per_param": split.tokens_per_param}
        row["intervals"] = {k: list(v) for k, v in fit.allocation_intervals(C, flops_per_token).items()}
        out["budgets"].append(row)
    if isoflop is not None:
        out["approach2"] = {
            "N_opt": {"coefficient": isoflop.N_opt.coefficient, "exponent": isoflop.N_opt.exponent},
            "D_opt": {"coefficient": isoflop.D_opt.coefficient, "exponent": isoflop.D_opt.exponent},
            "minima": [{"C": m.C, "N_opt": m.N_opt, "D_opt": m.D_opt, "loss_min": m.loss_min,
                        "inside_range": m.inside_range, "n_runs": m.n_runs} for m in isoflop.minima],
        }
    return out


def format_table(rep: dict) -> str:
    """The fitted parameters with intervals, then N_opt / D_opt per budget, as plain text."""
    lines = [f"L(N, D) = E + A/N^alpha + B/D^beta  ({rep['n_points']} points, N {rep['params_counted']}, "
             f"C = {rep['flops_per_token']:g} N D)"]
    pct = round(100 * rep["confidence"])
    lines.append(f"{'param':<6} {'value':>12}  {str(pct) + '% interval':>28}")
    for p in PARAMETERS:
        lo_hi = rep["intervals"].get(p)
        interval = f"[{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else "(no bootstrap)"
        lines.append(f"{p:<6} {rep[p]:>12.5g}  {interval:>28}")
    if rep["budgets"]:
        lines.append(f"{'C (FLOPs)':>10} {'N_opt':>10} {'D_opt':>10} {'D/N':>8}  {str(pct) + '% interval of D/N':>22}")
        for b in rep["budgets"]:
            lo_hi = b["intervals"].get("tokens_per_param")
            interval = f"[{lo_hi[0]:.1f}, {lo_hi[1]:.1f}]" if lo_hi else "(no bootstrap)"
            lines.append(f"{b['C']:>10.3g} {b['N_opt']:>10.3g} {b['D_opt']:>10.3g} "
                         f"{b['tokens_per_param']:>8.1f}  {interval:>22}")
    if "skipped" in rep.get("approach2", {}):
        lines.append(f"approach 2 (IsoFLOP) skipped: {rep['approach2']['skipped']}")
    elif "approach2" in rep:
        a2 = rep["approach2"]
        lines.append(f"approach 2 (IsoFLOP): N_opt ~ C^{a2['N_opt']['exponent']:.3f}, "
                     f"D_opt ~ C^{a2['D_opt']['exponent']:.3f} over {len(a2['minima'])} budgets")
    return "\n".join(lines)


def add_fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--points", required=True, help="CSV with columns N, D, loss (and C to group IsoFLOP runs)")
    p.add_argument("--out", required=True, help="folder for fit.json and the plots")
    p.add_argument("--bootstrap", type=int, default=200, help="refits on resampled points for the intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--starts", type=int, default=64,
                   help="L-BFGS runs from this many of the most promising points of Hoffmann's grid of "
                        "4,500 initialisations (0: from every one, as the papers do; slow)")
    p.add_argument("--budget", type=float, action="append", default=[],
                   help="compute budget C in FLOPs to split into N_opt, D_opt (repeatable)")
    p.add_argument("--flops-per-token", type=float, default=FLOPS_PER_TOKEN,
                   help="k in C = k N D (default 6: 2 forward + 4 backward per parameter)")
    p.add_argument("--params", choices=PARAM_CONVENTIONS, default="with-embeddings",
                   help="which parameter count N is: a label for column N, or which of N_with_embeddings / "
                        "N_without_embeddings to read. It moves the tokens-per-parameter answer a lot "
                        "(nanochat: ~10 with embeddings, ~3-4 without); Chinchilla counts all parameters")
    p.add_argument("--no-plots", action="store_true", help="write fit.json only")


def _approach2(points: Points) -> tuple[IsoFlopFit | None, str | None]:
    """The IsoFLOP fit when the runs carry budgets; the reason it was skipped when they do not form
    IsoFLOP curves (a grid of sizes x token counts has a different C for every run)."""
    if points.C is None:
        return None, None
    try:
        return fit_isoflop(points.N, points.D, points.loss, points.C), None
    except ValueError as e:
        return None, str(e)


def run_fit(args) -> dict:
    if args.flops_per_token <= 0 or any(b <= 0 for b in args.budget):
        raise ValueError("--budget and --flops-per-token must be positive")
    points = read_points(args.points, args.params)
    try:
        fit = fit_loss_law(points.N, points.D, points.loss, starts=args.starts or None,
                           bootstrap=args.bootstrap, seed=args.seed)
    except ValueError as e:
        raise ValueError(f"{args.points}: {e}") from e
    isoflop, skipped = _approach2(points)
    rep = report(fit, isoflop, list(args.budget), args.flops_per_token, args.params, str(args.points))
    if skipped:
        rep["approach2"] = {"skipped": skipped}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fit.json").write_text(json.dumps(rep, indent=2) + "\n")
    if not args.no_plots:
        from evolm.lab.scaling_plots import write_plots

        write_plots(out, points, fit, isoflop, list(args.budget), args.flops_per_token)
    print(format_table(rep))
    print(f"wrote {out / 'fit.json'}")
    return rep
