"""Prompt (prefill) speed: transformers' forward vs evolm's prefill, eager and compiled, same weights.

A prompt's time is mostly matrix products, the same oneDNN/BLAS calls in every engine, so the
engines differ by a few percent; on a shared machine that is inside the run-to-run noise. This
benchmark times the three interleaved, many times, in one process, and prints the medians and
their ratios to transformers:

- ``transformers``: ``model(ids, logits_to_keep=1)`` (its cache filled, as generate does);
- ``evolm defaults``: the model as ``evolm generate`` prepares it with no flags (``load_for_inference``:
  on the CPU, the file's blocks kept, fused, the block step attached), its prompt as ``generate`` runs it
  (``benchmarks/decode.py: generate_prefill``: ``evolm.infer.decode.prefill`` into a fresh cache);
- ``evolm eager``: the dequantized model, fused (``--blocks``: keeping the file's blocks);
- ``evolm compiled`` (with ``--compile``): the eager model's prompt as one ``torch.compile`` graph
  (``infer.compiled.compiled_prefill``).

    python benchmarks/prefill.py [--model smollm2|gemma3|PATH.gguf] [--dtypes float32,bfloat16]
                                 [--batches 1,8] [--prompt-len 64,256] [--repeat 8] [--threads 2] [--blocks] [--compile]

Products of up to ``evolm.quant.blocks.GEMM_ROWS`` rows take a different kernel than longer ones
with the file's blocks: time short and long prompts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from decode import generate_prefill  # noqa: E402  (benchmarks/decode.py)
from evolm.infer.prepare import InferenceOptions, load_for_inference  # noqa: E402
from evolm.interop.gguf import find_asset, load_gguf  # noqa: E402
from stats import median_spread  # noqa: E402  (benchmarks/stats.py)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", default="256", help="prompt lengths, comma-separated")
    ap.add_argument("--repeat", type=int, default=8, help="timed runs per engine (interleaved)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--blocks", action="store_true", help="evolm eager keeps the file's quantized blocks (--keep-blocks)")
    ap.add_argument("--compile", action="store_true", help="also time the compiled prompt graph")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    path = args.model if args.model.endswith(".gguf") else find_asset(args.model)
    print(f"model {os.path.basename(path)}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.prompt_len}-token prompts, {args.repeat} interleaved runs per engine"
          + (", evolm with the file's blocks" if args.blocks else ""))
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        ours = load_gguf(path, dtype=dtype, blocks=args.blocks, tokenizer=False)[0].eval().fuse_for_inference()
        defaults = load_for_inference(path, InferenceOptions(dtype=dtype_name))[0]
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=dtype).eval()
        for b, T in ((b, T) for T in map(int, args.prompt_len.split(",")) for b in map(int, args.batches.split(","))):
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(100, min(ours.config.vocab_size, 30000), (b, T), generator=g)
            engines = {"transformers": lambda: hf(ids, logits_to_keep=1),
                       "evolm defaults": lambda: generate_prefill(defaults, ids, False),
                       "evolm eager": lambda: generate_prefill(ours, ids, False)}
            if args.compile:
                engines["evolm compiled"] = lambda: generate_prefill(ours, ids, True)
            times = {k: [] for k in engines}
            with torch.inference_mode():
                for f in engines.values():  # warm-up, compilation
                    f()
                    f()
                for _ in range(args.repeat):
                    for k, f in engines.items():
                        t = time.perf_counter()
                        f()
                        times[k].append(time.perf_counter() - t)
            speeds = {k: median_spread([ids.numel() / s for s in v]) for k, v in times.items()}
            for k, (tps, spread) in speeds.items():
                ratio = tps / speeds["transformers"][0]
                rows.append((dtype_name, b, T, k, tps, spread, ratio))
                print(f"  {dtype_name} batch {b} prompt {T} {k}: {tps:,.0f} tok/s ±{spread:.0%} ({ratio:.3f}x)", flush=True)
        del hf
    print("\n| dtype | batch | prompt | engine | prefill tok/s | vs transformers |")
    print("|---|---|---|---|---|---|")
    for dtype_name, b, T, k, tps, spread, ratio in rows:
        print(f"| {dtype_name} | {b} | {T} | {k} | {tps:,.0f} ±{spread:.0%} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
