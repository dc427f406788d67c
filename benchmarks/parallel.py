"""Every parallel layout against one process, as a user runs them: `evolm pretrain` under torchrun.

Each layout trains the same recipe (a Qwen3-MoE-style model: GQA attention and MoE layers, so
every dimension applies -- tensor, pipeline, context, expert, data) on the same data, at the same
global batch (``tokens_per_step``: the data-parallel ranks split it, the ranks of one tensor /
pipeline / context / expert group share theirs), for the same steps. It reports the run's median
training throughput (``evolm pretrain --json``: ``tokens_per_s``, the optimizer steps after the
first) and its ratio to the single process of the same round. Rounds are interleaved (the layouts
rotate), so a change in the host's load hits all alike; the table gives the median and half the
spread.

On a CPU host these ratios are the cost of the communication (gloo over loopback) and of the
smaller per-rank products, not a speed-up: N processes share the host's cores (each runs one
thread). They say what a layout costs before it is worth running on hardware that gains from it.

    python benchmarks/parallel.py [--layouts none,dp_shard=2,tp=2,pp=2,cp=2,dp_shard=2+ep=2,dp_shard=2+tp=2]
                                  [--repeat 2] [--steps 8] [--d-model 128] [--layers 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, os.path.dirname(__file__))
from stats import median_spread  # noqa: E402  (benchmarks/stats.py)

ROOT = Path(__file__).resolve().parent.parent


def recipe(a, tokenizer: str | None) -> dict:
    """The benchmark's recipe: one stage of ``a.steps`` optimizer steps of ``a.batch`` sequences."""
    tokens_per_step = a.batch * a.seq
    return {
        "name": "parallel-bench", "seed": 1,
        "model": {"preset": "tiny-qwen3-moe", "overrides": {
            "vocab_size": "tokenizer", "d_model": a.d_model, "n_layers": a.layers, "n_heads": 8, "n_kv_heads": 4,
            "head_dim": a.d_model // 8, "max_seq_len": a.seq}},
        "tokenizer": {"path": tokenizer} if tokenizer else {"train": {"vocab_size": 2048, "max_chars": 400_000}},
        "data": {"sources": [{"name": "shakespeare"}], "val_fraction": 0.02},
        "optim": {"lr": 1.0e-3},
        "train": {"micro_batch": a.micro_batch, "tokens_per_step": tokens_per_step, "log_every": 1,
                  "eval_every": 0, "eval_batches": 1, "ckpt_every": 0, "sample_prompts": [], "threads": 1},
        "stages": [{"name": "s", "tokens": tokens_per_step * a.steps, "seq_len": a.seq, "warmup_steps": 1}],
    }


def layout_flags(layout: str) -> tuple[int, list[str]]:
    """``"dp_shard=2+tp=2"`` -> (world size 4, ``["--dp-shard", "2", "--tp", "2"]``); ``"none"``: one process."""
    if layout == "none":
        return 1, []
    world, flags = 1, []
    for part in layout.split("+"):
        key, _, value = part.partition("=")
        if key not in ("dp_shard", "dp_replicate", "tp", "pp", "cp", "ep") or not value.isdigit():
            raise SystemExit(f"--layouts: {part!r} is not dim=N (dims: dp_shard, dp_replicate, tp, pp, cp, ep)")
        flags += ["--" + key.replace("_", "-"), value]
        if key != "ep":  # ep borrows data-parallel ranks
            world *= int(value)
    if "dp_shard" not in layout:
        flags += ["--dp-shard", "1"]  # the layout as given, not FSDP over the rest of the ranks
    return world, flags


def run(layout: str, recipe_path: Path, out: Path, port: int) -> float:
    """One training run of ``layout``; its median tokens/s."""
    world, flags = layout_flags(layout)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    if world == 1:
        cmd = [sys.executable, "-m", "evolm.cli"]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--nproc_per_node", str(world), "--master_port", str(port), "-m", "evolm.cli"]
    cmd += ["pretrain", "--config", str(recipe_path), "--out", str(out), "--json", *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{layout}: evolm pretrain failed:\n{proc.stderr[-3000:]}")
    out = proc.stdout
    summary = json.loads(out[out.rfind("\n{") + 1:])  # the summary printed last, after the run's log
    return float(summary["tokens_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="none,dp_shard=2,tp=2,pp=2,cp=2,dp_shard=2+ep=2,dp_shard=2+tp=2")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="sequences per optimizer step (the global batch)")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per forward on one data-parallel rank")
    a = ap.parse_args()
    layouts = [x for x in a.layouts.split(",") if x]
    if "none" not in layouts:
        layouts.insert(0, "none")
    for layout in layouts:
        layout_flags(layout)  # bad names fail before anything runs
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        first = tmp / "r0.yaml"  # trains the tokenizer once; every timed run reads it
        first.write_text(yaml.safe_dump(recipe(a, None)))
        run("none", first, tmp / "tok", 29400 + os.getpid() % 400)
        path = tmp / "r.yaml"
        path.write_text(yaml.safe_dump(recipe(a, str(tmp / "tok" / "tokenizer.json"))))
        rates: dict[str, list[float]] = {x: [] for x in layouts}
        ratios: dict[str, list[float]] = {x: [] for x in layouts}
        for r in range(a.repeat):
            order = layouts[r % len(layouts):] + layouts[:r % len(layouts)]
            got = {x: run(x, path, tmp / f"{r}-{i}", 29400 + (os.getpid() + i) % 400) for i, x in enumerate(order)}
            for x in layouts:
                rates[x].append(got[x])
                ratios[x].append(got[x] / got["none"])
                print(f"  round {r + 1} {x}: {got[x]:.0f} tok/s ({got[x] / got['none']:.2f}x)", flush=True)
    print(f"\nQwen3-MoE-style {a.layers} layers x {a.d_model}, global batch {a.batch} x {a.seq} tokens, "
          f"{a.steps} steps, one thread per process, {a.repeat} interleaved rounds, {os.cpu_count()} cpus")
    print("| layout | processes | tokens/s | vs one process |")
    print("|---|---|---|---|")
    for x in layouts:
        m, s = median_spread(rates[x])
        rm, _ = median_spread(ratios[x])
        print(f"| {x} | {layout_flags(x)[0]} | {m:,.0f} ±{100 * s:.0f}% | {rm:.2f}x |")


if __name__ == "__main__":
    main()
