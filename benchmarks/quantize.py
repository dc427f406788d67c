"""`evolm quantize` report: perplexity, accuracy, size and decode speed, float vs each method.

    python benchmarks/quantize.py --model smollm2 --variants fp32,int8,int4,nf4,gptq,int4-g64,gptq-g64
        [--calib-samples 8] [--threads 1] [--ppl-tokens 4096] [--tasks lambada,arc_easy --limit 100] [--json OUT]

For each variant the model is written with the CLI (``evolm convert --to evolm`` for fp32, the
GGUF dequantized; ``evolm quantize --method M`` for the others, into ``runs/quant/MODEL-VARIANT``,
reused when present) and loaded back from that folder, as a user would. Then:

- perplexity: the held-out split of the built-in ``python_docs`` corpus (every 10th document,
  which calibration never reads; ``evolm.quant.calibration.held_out``), its first documents up to
  ``--ppl-tokens`` tokens, written to ``runs/quant/heldout.jsonl``; token-level, each document
  scored in disjoint windows of ``--ctx`` (512) tokens (stride = context: lm-eval's rolling
  log-likelihood), ``exp(-sum log p / tokens)``;
- ``--tasks`` (lm-eval's scoring) on the first ``--limit`` documents;
- bits per quantized weight, the weights file's size, and greedy decode tokens/s (64 new tokens
  after a short prompt, batch 1, the eager decode loop ``evolm generate`` runs, best of 2).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "quant"


def source(name: str) -> str:
    if name.endswith(".gguf") or Path(name).exists():
        return name
    from evolm.interop.gguf import find_asset

    return str(find_asset(name))


def build_variant(model: str, variant: str, calib_samples: int) -> tuple[Path, float]:
    out = RUNS / f"{Path(model).stem if model.endswith('.gguf') else model}-{variant}"
    if (out / "config.json").is_file():
        return out, float("nan")
    cmd = [sys.executable, "-m", "evolm.cli"]
    if variant == "fp32":
        cmd += ["convert", "--model", source(model), "--to", "evolm", "--dtype", "float32", "--out", str(out)]
    else:  # METHOD or METHOD-gGROUP (e.g. int4-g128)
        method, _, group = variant.partition("-g")
        cmd += ["quantize", "--model", source(model), "--out", str(out), "--method", method,
                "--calib-samples", str(calib_samples), "--group-size", group or "32"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return out, time.perf_counter() - start


def heldout_text(tok, tokens: int) -> Path:
    from evolm.data.corpora import default_data_dir
    from evolm.quant.calibration import documents, held_out

    path = RUNS / f"heldout-{tokens}.jsonl"
    if not path.is_file():
        docs, n = [], 0
        for text in held_out(documents(default_data_dir() / "python_docs.jsonl")):
            if n >= tokens:
                break
            docs.append(text)
            n += len(tok.encode(text))
        RUNS.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path


def decode_speed(model, tok, new: int = 64) -> float:
    from evolm.infer import SamplingParams, generate

    ids = torch.tensor([tok.encode("The Python standard library provides")])
    generate(model, ids, SamplingParams(max_new_tokens=4, temperature=0))  # warm-up
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        out = generate(model, ids, SamplingParams(max_new_tokens=new, temperature=0, stop=()))
        best = max(best, len(out[0]) / (time.perf_counter() - start))
    return best


def measure(folder: Path, args) -> dict:
    from evolm.eval.harness import evaluate
    from evolm.infer.prepare import InferenceOptions, load_for_inference
    from evolm.quant.quantize import bits_per_weight

    model, tok = load_for_inference(folder, InferenceOptions(device="cpu"))
    row = {"variant": folder.name, "file_mb": round((folder / "model.safetensors").stat().st_size / 1e6, 1),
           "bits_per_weight": round(bits_per_weight(model), 3) if hasattr(model, "quantization") else 32.0}
    ppl_file = heldout_text(tok, args.ppl_tokens)
    start = time.perf_counter()
    res = evaluate(model, tok, [f"ppl:{ppl_file}@{args.ctx}"] + [t for t in args.tasks.split(",") if t],
                   limit=args.limit, max_length=args.ctx, cache=False, progress=False, bootstrap_iters=0)
    row["eval_s"] = round(time.perf_counter() - start, 1)
    for task, metrics in res["results"].items():
        for k in ("perplexity", "acc", "acc_norm", "n_tokens"):
            if k in metrics:
                row[f"{task.split(':')[0]}/{k}"] = metrics[k]
    row["decode_tok_s"] = round(decode_speed(model, tok), 1)
    row["results"] = res["results"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2, gemma3 or a model path")
    ap.add_argument("--variants", default="fp32,int8,int4,nf4,gptq,int4-g64,gptq-g64")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--tasks", default="", help="e.g. lambada,arc_easy")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="1 on a shared machine: two OpenMP threads on "
                    "oversubscribed cores spin-wait (GPTQ measured ~15x slower per block)")
    ap.add_argument("--json", default=None, help="append one JSON line per variant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for variant in args.variants.split(","):
        folder, seconds = build_variant(args.model, variant, args.calib_samples)
        row = {"model": args.model, "quantize_s": round(seconds, 1), **measure(folder, args)}
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
