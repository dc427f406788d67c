"""The Minitron recipe on SmolLM2-135M, end to end: prune structurally, then distill from the unpruned model,
against the same small config trained from scratch at equal tokens.

    python benchmarks/minitron.py [--ratio 0.3] [--steps 40 --batch-size 4 --seq-len 256] [--threads 1]
        [--only prune|train] [--json runs/minitron/results.jsonl]

Every step runs the CLI a user would run, into ``runs/minitron/`` (a folder that exists is reused):

1. ``evolm convert --to evolm --dtype float32``: the Q4_1 GGUF dequantized (the teacher and the baseline);
2. ``evolm prune --method minitron``: ``width`` (hidden size + MLP, ``--axes mlp,embed``, the
   Llama-3.1-Minitron-4B-Width choice), ``width-norescale`` (the same without rescaling the norms),
   ``mlp`` (MLP channels alone),
   ``depth`` (whole layers by Block Importance), ``depth-loss`` (layers by the loss increase);
   each scored right after the cut on the held-out perplexity of ``docs/compression.md``'s
   quantize table (python_docs held-out split, 512-token windows; ``benchmarks/quantize.py``'s file);
3. ``evolm distill`` on the calibration split of python_docs (the held-out documents excluded),
   the same rows in the same order for every run: the pruned width model distilled from the
   unpruned one (forward KL), the pruned model trained on the next token (the paper's ablation),
   and the same small config from random weights trained on the next token; each final model
   scored on the same held-out perplexity. ``depth-kd`` and ``mlp-kd`` (``--runs``) distill the
   depth-pruned and the MLP-only models the same way: the axes compared after retraining.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "minitron"
CLI = [sys.executable, "-m", "evolm.cli"]
PRUNES = {"width": ["--ratio", "{ratio}", "--axes", "mlp,embed"],
          "width-norescale": ["--ratio", "{ratio}", "--axes", "mlp,embed", "--no-rescale-norms"],
          "mlp": ["--ratio", "{ratio}", "--axes", "mlp"],
          "depth": ["--ratio", "{ratio}", "--axes", "layers"],
          # one calibration pass per layer: 8 windows instead of 32
          "depth-loss": ["--ratio", "{ratio}", "--axes", "layers", "--layer-metric", "loss", "--calib-samples", "8"]}


def _quantize_bench():
    spec = importlib.util.spec_from_file_location("bench_quantize", ROOT / "benchmarks" / "quantize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sh(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run([str(c) for c in cmd], check=True, stdout=f, stderr=subprocess.STDOUT)
    return round(time.perf_counter() - start, 1)


def perplexity(folder: Path, heldout: Path) -> dict:
    from evolm.eval.harness import evaluate
    from evolm.loading import load

    model, tok = load(folder, dtype="float32")
    res = evaluate(model, tok, [f"ppl:{heldout}@512"], max_length=512, cache=False, progress=False,
                   bootstrap_iters=0)
    metrics = next(iter(res["results"].values()))
    return {"ppl": round(metrics["perplexity"], 3), "ppl_tokens": metrics.get("n_tokens"),
            "params": model.num_params()}


def train_split(tok_docs_path: Path) -> Path:
    """python_docs without its held-out documents (index % 10 == 9), as JSONL for --data."""
    from evolm.data.corpora import default_data_dir
    from evolm.quant.calibration import HELD_OUT_EVERY, documents

    if not tok_docs_path.is_file():
        docs = documents(default_data_dir() / "python_docs.jsonl")
        keep = [t for i, t in enumerate(docs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
        tok_docs_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in keep))
    return tok_docs_path


def emit(row: dict, args) -> None:
    print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--prunes", default=",".join(PRUNES))
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr-pruned", type=float, default=3e-4)
    ap.add_argument("--lr-random", type=float, default=1e-3)
    ap.add_argument("--runs", default="pruned-kd,pruned-ce,random-ce")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["prune", "train"], default=None)
    ap.add_argument("--json", default=str(RUNS / "results.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    RUNS.mkdir(parents=True, exist_ok=True)
    qb = _quantize_bench()
    teacher = ROOT / "runs" / "quant" / "smollm2-fp32"
    if not (teacher / "config.json").is_file():
        sh(CLI + ["convert", "--model", qb.source("smollm2"), "--to", "evolm", "--dtype", "float32", "--out", teacher],
           RUNS / "log-convert.txt")
    from evolm.loading import load, load_config

    _, tok = load(teacher, dtype="float32")
    heldout = qb.heldout_text(tok, 4096)
    if args.only != "train":
        emit({"variant": "unpruned", **perplexity(teacher, heldout)}, args)
        for name in [p for p in args.prunes.split(",") if p]:
            out = RUNS / f"smollm2-{name}"
            seconds = None
            if not (out / "config.json").is_file():
                extra = [a.format(ratio=args.ratio) for a in PRUNES[name]]
                seconds = sh(CLI + ["prune", "--model", teacher, "--out", out, "--method", "minitron",
                                    "--calib-samples", args.calib_samples, "--calib-len", 512, *extra],
                             RUNS / f"log-prune-{name}.txt")
            cfg = load_config(out)
            sizes = {k: getattr(cfg, k) for k in ("n_heads", "n_kv_heads", "d_ff", "d_model", "n_layers")}
            emit({"variant": name, "prune_s": seconds, **sizes, **perplexity(out, heldout)}, args)
    if args.only == "prune":
        return
    data = train_split(RUNS / "python_docs-train.jsonl")
    pruned = RUNS / "smollm2-width"
    common = ["--teacher", teacher, "--data", data, "--seq-len", args.seq_len, "--batch-size", args.batch_size,
              "--max-tokens", args.steps * args.batch_size * args.seq_len * 2, "--val-rows", 8, "--steps", args.steps,
              "--eval-every", 0, "--log-every", 1, "--warmup-ratio", 0.05, "--schedule", "cosine",
              "--threads", args.threads, "--seed", 0, "--json"]
    small = load_config(pruned)
    overrides = [f"{k}={getattr(small, k)}" for k in ("d_model", "d_ff", "n_heads", "n_kv_heads", "head_dim", "n_layers")]
    runs = {"pruned-kd": ["--student", pruned, "--beta", 0, "--lr", args.lr_pruned],
            "mlp-kd": ["--student", RUNS / "smollm2-mlp", "--beta", 0, "--lr", args.lr_pruned],
            "depth-kd": ["--student", RUNS / "smollm2-depth", "--beta", 0, "--lr", args.lr_pruned],
            "pruned-ce": ["--student", pruned, "--kd-weight", 0, "--ce-weight", 1, "--lr", args.lr_pruned],
            "random-ce": ["--student", "smollm2-135m", *sum((["--student-override", o] for o in overrides), []),
                          "--kd-weight", 0, "--ce-weight", 1, "--lr", args.lr_random],
            "random-kd": ["--student", "smollm2-135m", *sum((["--student-override", o] for o in overrides), []),
                          "--beta", 0, "--lr", args.lr_random]}
    for name in [r for r in args.runs.split(",") if r]:
        out = RUNS / f"train-{name}"
        if not (out / "distill_summary.json").is_file():
            sh(CLI + ["distill", *common, "--out", out, *runs[name]], RUNS / f"log-train-{name}.txt")
        s = json.loads((out / "distill_summary.json").read_text())
        row = {"run": name, "steps": s["steps"], "tokens": s["tokens"], "tokens_per_s": round(s["tokens_per_s"], 1),
               "wall_s": round(s["wall_s"]), "val_kl": s.get("val_kl"), "val_loss": s.get("val_loss"),
               "before_val_kl": s["before"].get("val_kl"), "before_val_loss": s["before"].get("val_loss"),
               "teacher_val_loss": s.get("teacher_val_loss")}
        emit({**row, **perplexity(out, heldout)}, args)


if __name__ == "__main__":
    main()
