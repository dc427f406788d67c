"""Encoder forward speed on real weights: transformers' BertModel vs evolm on the same all-MiniLM-L6-v2 weights.

Both engines load the same Hugging Face folder (``evolm.load`` and ``BertModel.from_pretrained``) in the
same dtype and run a padded batch of random ids (each row a different real length, the rest masked) to
the last hidden states, the work a sentence-embedding or classification request does. The engines are
timed interleaved, many times, in one process, and the medians, their spread and the ratio to
transformers are printed (tokens per second counts the real tokens):

    python benchmarks/embed.py [--model minilm|PATH] [--dtypes float32,bfloat16] [--batches 1,32]
                                 [--lengths 128] [--repeat 10] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from evolm import load  # noqa: E402
from evolm.interop.hf import find_asset  # noqa: E402
from stats import median_spread, sync  # noqa: E402  (benchmarks/stats.py)


def batch(b: int, T: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids of ``b`` rows, row i of real length T - i * T // (2b) (batch 1: all T), right-padded."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (b, T), generator=g)
    mask = torch.zeros(b, T, dtype=torch.long)
    for i in range(b):
        mask[i, :T - i * T // (2 * b)] = 1
    return (ids * mask).to(device), mask.to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm", help="'minilm' (the packaged all-MiniLM-L6-v2) or a BERT HF folder")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--lengths", default="128", help="padded sequence lengths, comma-separated")
    ap.add_argument("--repeat", type=int, default=10, help="timed runs per engine (interleaved)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import BertModel

    path = str(find_asset(args.model) if not os.path.isdir(args.model) else args.model)
    device = torch.device(args.device)
    print(f"model {os.path.basename(path)}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {device}, {args.repeat} interleaved runs per engine")
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        ours = load(path, dtype=dtype, device=device)[0].eval()
        hf = BertModel.from_pretrained(path, dtype=dtype, add_pooling_layer=False).to(device).eval()
        for b, T in ((b, T) for T in map(int, args.lengths.split(",")) for b in map(int, args.batches.split(","))):
            ids, mask = batch(b, T, ours.config.vocab_size, device)
            engines = {"transformers": lambda: hf(input_ids=ids, attention_mask=mask).last_hidden_state,
                       "evolm": lambda: ours(ids, attention_mask=mask, return_hidden=True)}
            times = {k: [] for k in engines}
            with torch.inference_mode():
                for f in engines.values():  # warm-up
                    f()
                    f()
                real_rows = mask.bool()  # the same answer: the engines' states on the real tokens
                diff = (engines["evolm"]() - engines["transformers"]()).float()[real_rows].abs().max()
                print(f"  {dtype_name} batch {b} length {T}: max |evolm - transformers| {float(diff):.2e}")
                for _ in range(args.repeat):
                    for k, f in engines.items():
                        sync()
                        t = time.perf_counter()
                        f()
                        sync()
                        times[k].append(time.perf_counter() - t)
            real = int(mask.sum())
            speeds = {k: median_spread([real / s for s in v]) for k, v in times.items()}
            for k, (tps, spread) in speeds.items():
                ratio = tps / speeds["transformers"][0]
                rows.append((dtype_name, b, T, k, tps, spread, ratio))
                print(f"  {dtype_name} batch {b} length {T} {k}: {tps:,.0f} tok/s ±{spread:.0%} ({ratio:.3f}x)",
                      flush=True)
        del hf, ours
    print("\n| dtype | batch | length | engine | tok/s (real tokens) | vs transformers |")
    print("|---|---|---|---|---|---|")
    for dtype_name, b, T, k, tps, spread, ratio in rows:
        print(f"| {dtype_name} | {b} | {T} | {k} | {tps:,.0f} ±{spread:.0%} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
