"""What a synthetic source did in a lab ablation: Δ held-out loss on the original mixture and on synthetic text.

``evolm lab ablate`` reports each run's held-out loss per source (``val_loss_<source>``) and a
pooled one over every held-out source. For a data ablation that adds a source, the two questions
are separate: does the original mixture's held-out text get better or worse (its sources pooled,
token-weighted as the trainer pools them: windows of seq_len, at most eval_batches x micro_batch
per source), and does held-out text of the new kind get better. Each is compared with the
baseline over seeds by the lab's Welch test (``evolm.lab.stats.compare``) with a bootstrap check.

    .venv/bin/python benchmarks/synthesize_effect.py runs/lab/synthetic --new synthetic
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def eval_tokens(heldout: Path, seq_len: int, windows: int) -> dict[str, int]:
    """Target tokens the trainer's evaluation scores per source (``iter_eval_batches``' windows)."""
    from evolm.data.mixture import iter_eval_batches

    counts: dict[str, int] = {}
    for source, _, y in iter_eval_batches(heldout, seq_len, 64, max_windows_per_source=windows):
        counts[source] = counts.get(source, 0) + y.numel()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("lab", help="the lab folder (results.json)")
    ap.add_argument("--new", default="synthetic", help="the added source")
    args = ap.parse_args()

    import yaml

    from evolm.lab.stats import bootstrap_interval, compare

    lab = Path(args.lab)
    results = json.loads((lab / "results.json").read_text())
    rows = {r["variant"]: r for r in results["variants"]}
    base = rows[results["baseline"]]
    recipe = yaml.safe_load(next(lab.rglob("seed-*/recipe.yaml")).read_text())  # every run evaluates alike
    train = recipe.get("train") or {}
    seq_len = (recipe.get("stages") or [{}])[0].get("seq_len", 128)
    tokens = eval_tokens(Path(results["heldout"]), seq_len, train.get("eval_batches", 24) * train.get("micro_batch", 16))
    old = [s for s in tokens if s != args.new]

    def pooled(row: dict) -> list[float]:
        by = row["val_loss_by_source"]
        return [sum(by[s][k] * tokens[s] for s in old) / sum(tokens[s] for s in old) for k in range(len(by[old[0]]))]

    print(f"held-out tokens scored: {tokens}")
    for name, row in rows.items():
        if row is base:
            continue
        for what, a, b in ((f"original mixture ({'+'.join(old)})", pooled(row), pooled(base)),
                           (f"held-out {args.new}", row["val_loss_by_source"][args.new],
                            base["val_loss_by_source"][args.new])):
            c = compare(a, b)
            lo, hi = bootstrap_interval(a, b)
            print(f"{name} vs {results['baseline']}, {what}: {c.mean:.4f} vs {sum(b) / len(b):.4f}, "
                  f"delta {c.delta:+.4f}, 95% CI [{c.low:+.4f}, {c.high:+.4f}], p {c.p_value:.3g} ({c.verdict}); "
                  f"bootstrap [{lo:+.4f}, {hi:+.4f}]; seeds {[round(x, 4) for x in a]} vs {[round(x, 4) for x in b]}")


if __name__ == "__main__":
    main()
