"""Prompt (prefill) speed: transformers' forward vs evolm's prefill, eager and compiled, same weights.

A prompt's time is mostly matrix products, the same oneDNN/BLAS calls in every engine, so the
engines differ by a few percent; on a shared machine that is inside the run-to-run noise. This
benchmark times the three interleaved, many times, in one process, and prints the medians and
their ratios to transformers:

- ``transformers``: ``model(ids, logits_to_keep=1)`` (its cache filled, as generate does);
- ``evolm eager`` / ``evolm compiled``: the prompt as ``generate`` runs it without / with
  ``compile=True`` (``benchmarks/decode.py: generate_prefill``: ``evolm.infer.decode.prefill`` into a
  fresh cache; compiled, ``infer.compiled.compiled_prefill`` makes the prompt one ``torch.compile`` graph).

    python benchmarks/prefill.py [--model smollm2|gemma3|PATH.gguf] [--dtypes float32,bfloat16]
                                 [--batches 1,8] [--prompt-len 64,256] [--repeat 8] [--threads 2] [--blocks]

Prompts of up to 128 tokens per batch row and batch 1 take a different kernel than longer ones with
``--blocks`` (``evolm.quant.blocks.GEMM_ROWS``): time both lengths.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from decode import generate_prefill  # noqa: E402  (benchmarks/decode.py)
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
    ap.add_argument("--blocks", action="store_true", help="evolm keeps the file's quantized blocks (--keep-blocks)")
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
        ours = load_gguf(path, dtype=dtype, blocks=args.blocks)[0].eval().fuse_for_inference()
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=dtype).eval()
        for b, T in ((b, T) for T in map(int, args.prompt_len.split(",")) for b in map(int, args.batches.split(","))):
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(100, min(ours.config.vocab_size, 30000), (b, T), generator=g)
            engines = {"transformers": lambda: hf(ids, logits_to_keep=1),
                       "evolm eager": lambda: generate_prefill(ours, ids, False),
                       "evolm compiled": lambda: generate_prefill(ours, ids, True)}
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
