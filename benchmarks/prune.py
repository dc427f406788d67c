"""`evolm prune` report: held-out perplexity and pruning time, dense vs each method and target.

    python benchmarks/prune.py --model smollm2 --variants dense,magnitude-0.5,wanda-0.5,sparsegpt-0.5,\\
        magnitude-2:4,wanda-2:4,sparsegpt-2:4 [--calib-samples 8] [--threads 1] [--json OUT]

Same protocol as ``benchmarks/quantize.py`` (whose helpers this reuses), so the two tables line up:
``dense`` is the GGUF dequantized to float32 (``evolm convert --to evolm``); every other variant
``METHOD-TARGET`` is ``evolm prune --method METHOD --sparsity F`` (or ``--pattern N:M``) of the same
GGUF into ``runs/prune/MODEL-VARIANT`` (reused when present), calibrated on the same windows of
the built-in ``python_docs`` corpus that GPTQ uses, and loaded back from its folder. Perplexity:
the held-out split of ``python_docs`` (which calibration never reads), the first documents up to
``--ppl-tokens`` tokens, each scored in disjoint windows of ``--ctx`` tokens. Pruning time is the
CLI's own measure of the pruning step (model loading and saving excluded), on ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize import heldout_text, source  # noqa: E402  (same protocol, one place)

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "prune"


def build_variant(model: str, variant: str, args) -> tuple[Path, dict]:
    stem = Path(model).stem if model.endswith(".gguf") else model
    calibrated = variant.split("-")[0] in ("wanda", "sparsegpt")
    tag = f"-c{args.calib_samples}x{args.calib_len}" if calibrated and (args.calib_samples, args.calib_len) != (8, 512) \
        else ""
    out = RUNS / f"{stem}-{variant.replace(':', 'of')}{tag}"
    if (out / "config.json").is_file():
        return out, {}
    cmd = [sys.executable, "-m", "evolm.cli"]
    if variant == "dense":
        cmd += ["convert", "--model", source(model), "--to", "evolm", "--dtype", "float32", "--out", str(out)]
    else:  # METHOD-FRACTION or METHOD-N:M
        method, _, target = variant.partition("-")
        cmd += ["prune", "--model", source(model), "--out", str(out), "--method", method,
                "--calib-samples", str(args.calib_samples), "--calib-len", str(args.calib_len)]
        cmd += ["--pattern", target] if ":" in target else ["--sparsity", target]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    res = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    sys.stderr.write(res.stderr)
    wall = time.perf_counter() - start
    found = re.search(r"pruning ([\d.]+) s", res.stdout)
    return out, {"wall_s": round(wall, 1), "prune_s": float(found.group(1)) if found else None}


def measure(folder: Path, args) -> dict:
    from evolm.eval.harness import evaluate
    from evolm.loading import load
    from evolm.prune.unstructured import zero_fraction

    model, tok = load(folder, dtype=torch.float32, device="cpu")
    zeros, total = zero_fraction(model)
    ppl_file = heldout_text(tok, args.ppl_tokens)
    start = time.perf_counter()
    res = evaluate(model, tok, [f"ppl:{ppl_file}@{args.ctx}"], max_length=args.ctx, cache=False, progress=False,
                   bootstrap_iters=0)
    metrics = next(iter(res["results"].values()))
    return {"variant": folder.name, "zero_fraction": round(zeros, 4), "block_weights": total,
            "ppl": metrics["perplexity"], "n_tokens": metrics.get("n_tokens"),
            "eval_s": round(time.perf_counter() - start, 1), "pruning": getattr(model, "pruning", None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2, gemma3 or a model path")
    ap.add_argument("--variants", default="dense,magnitude-0.5,wanda-0.5,sparsegpt-0.5,magnitude-2:4,wanda-2:4,"
                    "sparsegpt-2:4")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="1 on a shared machine (oversubscribed OpenMP threads "
                    "spin-wait)")
    ap.add_argument("--json", default=None, help="append one JSON line per variant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for variant in args.variants.split(","):
        folder, timing = build_variant(args.model, variant, args)
        row = {"model": args.model, **timing, **measure(folder, args)}
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
