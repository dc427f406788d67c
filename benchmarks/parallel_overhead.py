"""CPU overhead of a parallel layout vs one process, at equal global batch (issue 32).

One process trains a tiny model (forward + backward + AdamW) on a global batch; then ``--world``
gloo processes (one thread each) train the same model on the same global batch under the layout
(``--tp 2``, ``--dp-shard 2 --tp 2`` ...: evolm.parallel.parallelize; data-parallel ranks take their
part of the batch). The figure is the tokens/s ratio layout / one process, over ``--repeat``
interleaved runs (median and spread). Gloo on a CPU is slow: this measures the cost of the
collectives and of splitting small matmuls, not a speed-up.

    python benchmarks/parallel_overhead.py --preset tiny-llama --world 2 --tp 2 [--steps 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from benchmarks.stats import median_spread  # noqa: E402

FIELDS = ("dp_shard", "dp_replicate", "tp", "pp", "cp", "ep")


def config(preset: str, d_model: int, layers: int):
    from evolm.presets import get_preset

    return get_preset(preset, vocab_size=4096, rope_scaling=None, max_seq_len=1024, n_layers=layers,
                      d_model=d_model, head_dim=d_model // 4, n_heads=4, n_kv_heads=2, d_ff=d_model * 3)


def steps_per_s(model, batch, steps: int, warmup: int, dp=(0, 1)) -> float:
    import torch.distributed as dist

    rank, degree = dp
    rows = batch[0].shape[0] // degree
    x, y = (t[rank * rows:(rank + 1) * rows] for t in batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(warmup + steps):
        if i == warmup:
            if dist.is_initialized():
                dist.barrier()
            t0 = time.perf_counter()
        model(x, targets=y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dist.is_initialized():
        dist.barrier()
    return steps / (time.perf_counter() - t0)


def batch_of(args):
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 4096, (args.batch, args.seq), generator=g),
            torch.randint(0, 4096, (args.batch, args.seq), generator=g))


def one_process(args) -> float:
    from evolm.model import build

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return steps_per_s(build(config(args.preset, args.d_model, args.layers)), batch_of(args), args.steps, args.warmup)


def rank_fn(rank, world, args, degrees):
    from evolm.model import build
    from evolm.parallel import ParallelLayout, parallelize

    layout = ParallelLayout(**degrees).resolve(world)
    mesh = layout.build_mesh("cpu")
    torch.manual_seed(0)
    net = parallelize(build(config(args.preset, args.d_model, args.layers)), layout, mesh)
    return steps_per_s(net, batch_of(args), args.steps, args.warmup, (mesh["dp"].get_local_rank(), mesh["dp"].size()))


def main() -> None:
    from ranks import run_ranks

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny-llama")
    p.add_argument("--world", type=int, default=2)
    for f in FIELDS:
        p.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    degrees = {f: getattr(args, f) for f in FIELDS if getattr(args, f) is not None}
    tokens = args.batch * args.seq
    one, many = [], []
    for _ in range(args.repeat):  # interleaved, so a busy moment of the shared machine hits both
        one.append(one_process(args) * tokens)
        many.append(min(run_ranks(args.world, rank_fn, args, degrees)) * tokens)
    ratios = [m / o for m, o in zip(many, one)]
    (o, os_), (m, ms), (r, rs) = median_spread(one), median_spread(many), median_spread(ratios)
    what = " x ".join(f"{k} {v}" for k, v in degrees.items()) or "dp_shard -1"
    print(f"{args.preset} d_model {args.d_model}, {args.layers} layers, global batch {args.batch} x {args.seq}")
    print(f"one process (1 thread):        {o:8.0f} tok/s (+-{100 * os_:.0f}%)  runs {[round(v) for v in one]}")
    print(f"{what} ({args.world} x 1 thread): {m:8.0f} tok/s (+-{100 * ms:.0f}%)  runs {[round(v) for v in many]}")
    print(f"ratio layout / one process: {r:.2f} (+-{100 * rs:.0f}%), per run {[round(v, 2) for v in ratios]}")


if __name__ == "__main__":
    main()
