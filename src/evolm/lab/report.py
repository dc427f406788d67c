"""An ablation's ``report.md`` table and plots, from its ``results.json`` (``lab/ablate.py``)."""

from __future__ import annotations

import json
from pathlib import Path


def report_text(results: dict) -> str:
    """One row per variant: size, FLOPs, tokens, val loss (mean ± std over seeds), bits per byte,
    Δ vs what it is compared with, its 95% interval and p-value, the verdict, and wall time."""
    title = "Ladder" if results.get("ladder") else "Ablation"
    lines = [f"# {title} (baseline: {results['baseline']}; seeds {results['seeds']}; held-out: "
             f"{results.get('heldout', '-')})", "",
             "| variant | vs | params (active) | FLOPs | tokens | val loss | bits/byte | Δ loss | 95% CI | p | "
             "verdict | wall s (set-up + train) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["variants"]:
        size = f"{r['params_total']:,}" + (f" ({r['params_active']:,})" if r["params_active"] != r["params_total"] else "")
        name = r["variant"] + (f" @ {r['best']}" if r.get("best") else "")
        head = f"| {name} | {r.get('against', '(baseline)')} | {size} | {r['flops']:.3g} | {r['tokens']:,} | "
        bpb = _mean(r["val_bits_per_byte"])
        wall = f"{_mean(r['setup_s'], 1)} + {_mean(r['train_s'], 1)}"
        if r.get("baseline"):
            lines.append(head + f"{r['mean']:.4f} ± {r['std']:.4f} | {bpb} | | | | | {wall} |")
        else:
            lines.append(head + f"{r['mean']:.4f} ± {r['std']:.4f} | {bpb} | {r['delta']:+.4f} | "
                         f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] | {r['p_value']:.3g} | {r['verdict']} | {wall} |")
    lines += _by_source(results["variants"])
    if "wall_s" in results:
        walls = [w for r in results["variants"] for w in r["wall_s"] if w is not None]
        lines += ["", f"Wall time: the {len(walls)} runs took {sum(walls):.0f} s of run time in all "
                      f"({sum(walls) / max(1, len(walls)):.0f} s each on average); this invocation "
                      f"{results['wall_s']:.0f} s in {results.get('workers', 1)} process(es), of which "
                      f"{results['shared_setup_s']:.1f} s shared set-up (tokenizer, shards, held-out set; "
                      f"reused when present)."]
    sweeps = [r for r in results["variants"] if r.get("sweep")]
    if sweeps:
        lines += ["", "Sweep (mean val loss per setting; each variant is judged at its best):", ""]
        lines += [f"- {r['variant']}: " + ", ".join(f"{k} {v:.4f}" for k, v in r["sweep"].items()) for r in sweeps]
    return "\n".join(lines) + "\n"


def _by_source(rows: list[dict]) -> list[str]:
    """Mean held-out loss per source and its change vs what each variant is compared with: a data
    change (a filter, an anneal on one tier) often helps one source and hurts another."""
    sources = sorted({s for r in rows for s in r.get("val_loss_by_source", {})})
    if len(sources) < 2:
        return []
    means = {r["variant"]: {s: _avg(r["val_loss_by_source"][s]) for s in sources} for r in rows}
    lines = ["", "Held-out loss per source (mean over seeds; Δ vs the variant compared with):", "",
             "| variant | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    for r in rows:
        cells = [f"{means[r['variant']][s]:.4f}" + (f" ({means[r['variant']][s] - means[r['against']][s]:+.4f})"
                                                    if r.get("against") else "") for s in sources]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return lines


def _avg(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _mean(xs: list, digits: int = 4) -> str:
    xs = [x for x in xs if x is not None]
    return f"{sum(xs) / len(xs):.{digits}f}" if xs else "-"


def _run_folder(out: Path, row: dict, seed: int) -> Path:
    return out / row["variant"] / row["best"] / f"seed-{seed}" if row.get("best") else out / row["variant"] / f"seed-{seed}"


def plot(out: Path, results: dict) -> None:
    """``loss_curves.png`` (training loss per variant: mean over seeds, band = min..max) and
    ``delta.png`` (Δ val loss vs what each variant is compared with, with its 95% interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row in results["variants"]:
        curves = [_train_curve(_run_folder(out, row, s) / "metrics.jsonl") for s in results["seeds"]]
        tokens = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[c[t] for c in curves] for t in tokens]
        ax.plot(tokens, [sum(v) / len(v) for v in values], label=row["variant"], lw=1)
        ax.fill_between(tokens, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
    ax.set(xlabel="tokens", ylabel="training loss", title="loss over seeds (band: min..max)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)
    rows = [r for r in results["variants"] if not r.get("baseline")]
    fig, ax = plt.subplots(figsize=(8, 1 + 0.4 * max(1, len(rows))))
    for i, r in enumerate(rows):
        ax.errorbar(r["delta"], i, xerr=[[r["delta"] - r["ci95"][0]], [r["ci95"][1] - r["delta"]]], fmt="o", capsize=4)
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(range(len(rows)), [f"{r['variant']} vs {r['against']}" for r in rows])
    ax.invert_yaxis()
    ax.set(xlabel="Δ val loss (95% CI); below 0 = better")
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
