"""Hyena vs attention: prefill speed and decode time per token against the context length.

The lab's widths (d_model 128, 4 layers, 4 heads of 32, SwiGLU 512, vocab 4096) with
``max_seq_len`` 4096, random weights, batch 1, through ``KVCache.for_model`` (the path ``generate``
takes). For each context: one prefill of that many tokens (timed once), then 8 warm-up and 32 timed
greedy one-token steps. The two mixers run in one process, one after the other, at each context:

    python benchmarks/hyena_decode.py [--contexts 512,1024,2048,4000] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from evolm.cache import KVCache  # noqa: E402
from evolm.model import Transformer  # noqa: E402
from evolm.presets import get_preset  # noqa: E402


def measure(model, ctx: int) -> tuple[float, float]:
    """(prefill tokens/s, decode ms/token) at a context of ``ctx`` tokens."""
    ids = torch.randint(0, model.config.vocab_size, (1, ctx))
    with torch.no_grad():
        cache = KVCache.for_model(model, 1, ctx + 40)
        t0 = time.perf_counter()
        model(ids, cache=cache, last_only=True)
        prefill = ctx / (time.perf_counter() - t0)
        tok = ids[:, -1:]
        for i in range(40):
            if i == 8:
                t0 = time.perf_counter()
            tok = model(tok, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    return prefill, (time.perf_counter() - t0) / 32 * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="512,1024,2048,4000")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base = get_preset("tiny-llama").replace(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4,
                                            head_dim=32, d_ff=512, max_seq_len=4096, rope_scaling=None)
    models = {}
    for kind in ("mha", "hyena"):
        torch.manual_seed(0)
        models[kind] = Transformer(base.replace(attention=kind)).eval()
        measure(models[kind], 64)  # warm-up (Hyena: its filters are generated once here)
    print("| context | MHA prefill | Hyena prefill | MHA decode | Hyena decode |")
    print("|---|---|---|---|---|")
    for ctx in (int(c) for c in a.contexts.split(",")):
        (pm, dm), (ph, dh) = measure(models["mha"], ctx), measure(models["hyena"], ctx)
        print(f"| {ctx:,} | {pm:,.0f} tok/s | {ph:,.0f} tok/s | {dm:.2f} ms/token | {dh:.2f} ms/token |", flush=True)


if __name__ == "__main__":
    main()
