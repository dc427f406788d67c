"""Encoder forward speed: transformers' masked-LM model vs evolm's, same weights, same dtype, one process.

The model is a preset (default ``bert-base``) with evolm's random initialisation, written to
transformers through ``interop.hf`` (so both hold the same weights; the logits are checked to agree
before timing). Both run ``model(input_ids, attention_mask)`` over a right-padded batch (a quarter
of each row padding), interleaved, many times; the medians and their ratio are printed.

    python benchmarks/encoder.py [--preset bert-base|roberta-base|modernbert-base] [--dtypes float32,bfloat16]
                                 [--batch 8] [--seq-len 128] [--repeat 8] [--threads 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from evolm.interop.hf import config_to_hf, state_dict_to_hf  # noqa: E402
from evolm.model import build  # noqa: E402
from evolm.presets import get_preset  # noqa: E402
from stats import median_spread, sync  # noqa: E402  (benchmarks/stats.py)


def transformers_twin(model):
    """transformers' model of ``model``'s head class, holding ``model``'s weights."""
    import transformers
    h = config_to_hf(model.config)
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in h.items() if k != "architectures"})
    hf = getattr(transformers, h["architectures"][0])._from_config(cfg, attn_implementation="sdpa")
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(model.state_dict(), model.config), strict=False)
    if unexpected or [k for k in missing if "decoder" not in k]:  # the tied decoder is not stored
        raise RuntimeError(f"weights did not transfer: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bert-base")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=8, help="timed runs per engine (interleaved)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.preset}, batch {args.batch} x {args.seq_len} tokens (right-padded by a quarter), {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.repeat} interleaved runs per engine")
    torch.manual_seed(0)
    base = build(get_preset(args.preset)).eval()
    hf32 = transformers_twin(base).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, min(base.config.vocab_size, 30000), (args.batch, args.seq_len), generator=g)
    mask = torch.ones_like(ids)
    mask[:, args.seq_len * 3 // 4:] = 0
    ids = ids.masked_fill(mask == 0, 0)  # right padding: real positions are the same for every family
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        ours, hf = base.to(args.device, dtype), hf32.to(args.device, dtype)
        x, m = ids.to(args.device), mask.to(args.device)
        engines = {"transformers": lambda: hf(input_ids=x, attention_mask=m).logits,
                   "evolm": lambda: ours(x, attention_mask=m)}
        with torch.inference_mode():
            a, b = (f().float() for f in engines.values())
            keep = m.bool()
            diff = (a[keep] - b[keep]).abs().max().item()
            times = {k: [] for k in engines}
            for f in engines.values():  # warm-up
                f()
            for _ in range(args.repeat):
                for k, f in engines.items():
                    sync()
                    t = time.perf_counter()
                    f()
                    sync()
                    times[k].append(time.perf_counter() - t)
        speeds = {k: median_spread([x.numel() / s for s in v]) for k, v in times.items()}
        for k, (tps, spread) in speeds.items():
            ratio = tps / speeds["transformers"][0]
            rows.append((dtype_name, k, tps, spread, ratio))
            print(f"  {dtype_name} {k}: {tps:,.0f} tok/s ±{spread:.0%} ({ratio:.3f}x); max |logit diff| {diff:.1e}",
                  flush=True)
    print("\n| dtype | engine | forward tok/s | vs transformers |")
    print("|---|---|---|---|")
    for dtype_name, k, tps, spread, ratio in rows:
        print(f"| {dtype_name} | {k} | {tps:,.0f} ±{spread:.0%} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
