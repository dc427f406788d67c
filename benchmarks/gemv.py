"""Per-call speed of the decode matmuls: evolm's kernels against PyTorch's, one process.

Decoding is a sequence of skinny products, a few activation rows times every weight matrix. This
times each candidate kernel on the weight shapes of a real model (SmolLM2-135M by default: the
q/k/v/o, gate/up/down and LM-head matrices of one layer, repeated ``--layers`` times so that the
weights do not fit in cache), at 1 and 8 rows, and prints the weight bytes streamed per second
and each kernel's ratio to PyTorch's kernel for the same storage (``F.linear`` for fp32 and bf16,
``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``).

    python benchmarks/gemv.py [--rows 1,8] [--threads 2] [--layers 30] [--repeat 5]

Kernels: ``F.linear`` (oneDNN/MKL), the compiled multiply-reduce the compiled decode step uses at
one row, ``evolm_f::skinny_linear`` (fp32 / bf16 / int8 weights), ``evolm_q::q8a8_linear`` and
``evolm_q::q4a8_linear`` (int8 activations in blocks of 32, llama.cpp's scheme), PyTorch's
``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu``.
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
from evolm.quant import Int8Linear  # noqa: E402
from evolm.quant.int4 import quantize_groups  # noqa: E402
from stats import median_spread  # noqa: E402  (benchmarks/stats.py)

# (out, in) of one SmolLM2-135M layer: q, k, v, o, gate, up, down
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
HEAD = (49152, 576)


def _reduce(x, w):
    return (x.float() * w.float()).sum(-1).to(x.dtype)


def _reduce_int8(x, q, s):
    return (x[:, None, :] * q.to(x.dtype)[None]).sum(-1) * s


def candidates(rows: int):
    """name -> (weight storage, fn(x, prepared weight), prepare(w fp32) -> prepared weight)."""
    have = kernels.available()
    reduce_c = torch.compile(_reduce, dynamic=False)
    reduce8_c = torch.compile(_reduce_int8, dynamic=False)

    def int8(w):
        q = Int8Linear(w, None)
        return q.weight, q.scale

    def q4(w):
        q, d, lo = quantize_groups(w, 32, torch.float16)
        return kernels.pack_q4(q), kernels.pack_q4_scales(d, lo)

    def int4pack(w):
        q, d, lo = quantize_groups(w, 32)
        sz = torch.stack((d, lo + 8 * d), -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8), sz

    c = {
        "fp32 F.linear": ("fp32", lambda x, w: F.linear(x, w), lambda w: w),
        "bf16 F.linear": ("bf16", lambda x, w: F.linear(x.bfloat16(), w), lambda w: w.bfloat16()),
        "int8 int8pack_mm": ("int8", lambda x, p: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), p[0], p[1]),
                             lambda w: (lambda q: (q.weight, q.scale_bf16))(Int8Linear(w, None))),
        "int4 int4pack_mm": ("int4", lambda x, p: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), p[0], 32, p[1]),
                             int4pack),
    }
    if rows == 1:
        c["fp32 compiled reduce"] = ("fp32", lambda x, w: reduce_c(x, w), lambda w: w)
        c["bf16 compiled reduce"] = ("bf16", lambda x, w: reduce_c(x.bfloat16(), w), lambda w: w.bfloat16())
        c["int8 compiled reduce"] = ("int8", lambda x, p: reduce8_c(x, p[0], p[1]), int8)
    if have:
        sk = torch.ops.evolm_f.skinny_linear
        c["fp32 skinny"] = ("fp32", lambda x, w: sk(x, w), lambda w: w)
        c["bf16 skinny"] = ("bf16", lambda x, w: sk(x.bfloat16(), w), lambda w: w.bfloat16())
        c["int8 skinny"] = ("int8", lambda x, p: sk(x, p[0], p[1]), int8)
        c["int8 q8a8"] = ("int8", lambda x, p: torch.ops.evolm_q.q8a8_linear(x, p[0], p[1]), int8)
        c["int4 q4a8"] = ("int4", lambda x, p: torch.ops.evolm_q.q4a8_linear(x, *p), q4)
    return c


def nbytes(p) -> int:
    return sum(t.numel() * t.element_size() for t in (p if isinstance(p, tuple) else (p,)))


def main() -> None:
    torch._dynamo.config.recompile_limit = 64  # one graph per weight shape
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--layers", type=int, default=30, help="copies of the layer's matrices (defeat the cache)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated substrings: run only matching kernels")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = LAYER * args.layers + [HEAD]
    weights = [torch.randn(n, k) * 0.02 for n, k in shapes]
    print(f"{torch.get_num_threads()} threads, {len(shapes)} matrices ({sum(n * k for n, k in shapes) / 1e6:.0f} M "
          f"weights), evolm kernels: {kernels.isa()}")
    for rows in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(rows, k) for k in {k for _, k in shapes}}
        results = {}
        with torch.inference_mode():
            cands = candidates(rows)
            only = [s for s in args.only.split(",") if s]
            cands = {n: c for n, c in cands.items() if not only or any(s in n for s in only)}
            prepared = {n: [prep(w) for w in weights] for n, (_, _, prep) in cands.items()}
            times = {n: [] for n in cands}
            for n, (_, fn, _) in cands.items():  # warm-up (and compilation)
                for (_, k), w in list(zip(shapes, prepared[n]))[:8] + [(shapes[-1], prepared[n][-1])]:
                    fn(xs[k], w)
            for _ in range(args.repeat):  # interleaved
                for n, (_, fn, _) in cands.items():
                    t = time.perf_counter()
                    for (_, k), w in zip(shapes, prepared[n]):
                        fn(xs[k], w)
                    times[n].append(time.perf_counter() - t)
            for n, (store, _, _) in cands.items():
                med, spread = median_spread(times[n])
                results[n] = (store, med, spread, sum(nbytes(p) for p in prepared[n]))
        print(f"\nrows = {rows}")
        print("| kernel | weights | ms per pass | GB/s of weights | G weights/s | vs PyTorch's kernel (same storage) |")
        print("|---|---|---|---|---|---|")
        base = {s: results[n][1] for n, (s, *_) in results.items() if "F.linear" in n}
        base.setdefault("int8", results.get("int8 int8pack_mm", (0, None))[1])
        base.setdefault("int4", results.get("int4 int4pack_mm", (0, None))[1])
        n_w = sum(n * k for n, k in shapes)
        for n, (store, med, spread, nb) in results.items():
            ref = base.get(store)
            ratio = f"{ref / med:.2f}x" if ref else ""
            print(f"| {n} | {store} | {med * 1e3:.2f} ±{spread:.0%} | {nb / med / 1e9:.1f} | {n_w / med / 1e9:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
