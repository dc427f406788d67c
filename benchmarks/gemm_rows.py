"""Where ``evolm.quant.blocks.GEMM_ROWS`` should sit: a prompt's products with a GGUF file's blocks kept.

For one layer of a real model (SmolLM2-135M's fused q/k/v, o, gate/up and down by default), at each
row count, times in one process, interleaved by row count: the dense float matmul (what a dequantized
model runs), ``blocks_gemm`` (the weights rebuilt panel by panel in cache), ``blocks_dense_linear``
(rebuilt into a reused buffer, then the float matmul) and a fresh rebuilt tensor per product. The
crossover between the second and third is the threshold.

    python benchmarks/gemm_rows.py [--model smollm2|gemma3|PATH.gguf] [--rows 9,16,32,64,128,256,512] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from evolm import kernels  # noqa: E402
from evolm.interop.gguf import find_asset, load_gguf  # noqa: E402
from evolm.quant.blocks import BlockLinear  # noqa: E402


def quartile_ms(fn, n: int) -> float:
    """The first quartile of ``n`` timed calls after three warm-ups (robust to a shared host)."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 4] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rows", default="9,16,32,64,128,256,512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        sys.exit("evolm's CPU kernels do not build here")
    path = args.model if args.model.endswith(".gguf") else find_asset(args.model)
    model = load_gguf(path, blocks=True, tokenizer=False)[0].eval()
    model.fuse_for_inference()
    layer = [m for n, m in model.named_modules() if n.startswith("layers.1.") and isinstance(m, BlockLinear)]
    dense = [m.blocks.dequantize() for m in layer]
    ops = torch.ops.evolm_f
    print(f"{os.path.basename(path)}, layer 1's products {[(m.out_features, m.in_features) for m in layer]}, "
          f"{args.threads} threads; ms per layer (first quartile of {args.repeat})")
    print("| rows | dense matmul | blocks_gemm | blocks_dense_linear | fresh rebuilt weight | gemm / dense_linear |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for rows in map(int, args.rows.split(",")):
            xs = [torch.randn(rows, m.in_features) for m in layer]
            d = quartile_ms(lambda: [F.linear(x, w) for x, w in zip(xs, dense)], args.repeat)
            g = quartile_ms(lambda: [ops.blocks_gemm(x, m.codes, m.scale, m.min, m.group) for x, m in zip(xs, layer)],
                            args.repeat)
            r = quartile_ms(lambda: [ops.blocks_dense_linear(x, m.codes, m.scale, m.min, m.group)
                                     for x, m in zip(xs, layer)], args.repeat)
            f = quartile_ms(lambda: [F.linear(x, m.blocks.dequantize()) for x, m in zip(xs, layer)], args.repeat)
            print(f"| {rows} | {d:.2f} | {g:.2f} | {r:.2f} | {f:.2f} | {g / r:.2f} |", flush=True)


if __name__ == "__main__":
    main()
