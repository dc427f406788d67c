"""Context parallelism on CPU processes: throughput overhead and activation memory per rank.

    python benchmarks/context_parallel.py [--seq 1024] [--steps 4] [--repeat 3] [--mem-seqs 256,512,1024,2048]

1. **Overhead** at equal global batch: training steps (forward, backward, AdamW) of a small
   Llama-style model on one (B, T) batch, as one process (evolm's attention: SDPA), as one process
   through the ring code (cp = 1: the ring's per-block math without communication), and as cp = 2
   gloo processes, each holding half of every sequence in the zigzag layout. Tokens/s = B*T / step
   time (the slowest rank's); the ratios to one process are printed. ``--repeat`` runs each
   interleaved and prints the median and the spread (the machine may be shared).
2. **Memory**: bytes of activations the forward pass saves for the backward (autograd's saved
   tensors, each storage counted once) per rank, for the whole model and for attention's own op
   (SDPA in one process; the ring's q, k, v, out, lse under cp), at several sequence lengths.
   With cp = 2 every figure should halve.

Each process runs on one thread (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from ranks import run_ranks  # noqa: E402

CONFIG = dict(vocab_size=512, d_model=128, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16, d_ff=256,
              max_seq_len=8192, rope_scaling=None)


def _model():
    from evolm.model import build
    from evolm.presets import get_preset

    torch.manual_seed(0)
    return build(get_preset("tiny-llama", **CONFIG))


def _batch(T, B=2):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (B, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def _steps(rank, world, T, steps, ring):
    """Seconds per training step (median of ``steps`` after one warm-up), this rank."""
    torch.set_num_threads(1)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs, targets = _batch(T)
    cp = None
    if ring:
        from evolm.parallel.context import ContextParallel

        cp = ContextParallel()
    times, cpu = [], []
    for i in range(steps + 1):
        if dist.is_initialized():
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad()
        if cp is None:
            model(inputs, targets=targets).backward()
        else:
            cp.loss(model, inputs, targets).backward()
            cp.reduce_gradients(model)
        opt.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times[1:]), statistics.median(cpu[1:])


def _saved_bytes(model, model_call):
    """Activation bytes autograd saves during ``model_call()`` (each storage once, parameters not
    counted): (all, inside attention's own op)."""
    import evolm.nn.attention as attention_mod
    from evolm.parallel import context as context_mod

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, inside = {}, {"on": False, "bytes": 0, "ptrs": set()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in params:
            return t
        n = t.untyped_storage().nbytes()
        seen[ptr] = max(seen.get(ptr, 0), n)
        if inside["on"] and ptr not in inside["ptrs"]:
            inside["ptrs"].add(ptr)
            inside["bytes"] += n
        return t

    def wrap(fn):
        def inner(*a, **k):
            inside["on"] = True
            try:
                return fn(*a, **k)
            finally:
                inside["on"] = False
        return inner

    orig_attend, orig_call = attention_mod.attend, context_mod._RingCall.__call__
    attention_mod.attend = wrap(orig_attend)
    context_mod._RingCall.__call__ = wrap(orig_call)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model_call()
    finally:
        attention_mod.attend, context_mod._RingCall.__call__ = orig_attend, orig_call
    return sum(seen.values()), inside["bytes"]


def _memory(rank, world, seqs, ring):
    torch.set_num_threads(1)
    model = _model()
    out = {}
    for T in seqs:
        inputs, targets = _batch(T)
        if ring:
            from evolm.parallel.context import ContextParallel

            cp = ContextParallel()
            out[T] = _saved_bytes(model, lambda: cp.loss(model, inputs, targets))
        else:
            out[T] = _saved_bytes(model, lambda: model(inputs, targets=targets))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mem-seqs", default="256,512,1024,2048")
    args = ap.parse_args()
    T = args.seq
    print(f"model: tiny-llama {CONFIG['d_model']}d x {CONFIG['n_layers']} layers, batch 2 x {T} tokens, one thread per process")
    runs = {"one process (SDPA)": [], "cp=1 (ring code)": [], "cp=2 (2 gloo procs)": []}
    cpus = {name: [] for name in runs}
    for _ in range(args.repeat):
        for name, (world, ring) in zip(runs, ((0, False), (1, True), (2, True))):
            res = [_steps(0, 1, T, args.steps, False)] if world == 0 else run_ranks(world, _steps, T, args.steps, ring)
            runs[name].append(max(r[0] for r in res))  # the slowest rank's wall time
            cpus[name].append(max(r[1] for r in res))  # CPU seconds of the busiest rank (gloo's threads included)
    base = statistics.median(runs["one process (SDPA)"])
    print(f"{'layout':<22} {'s/step median':>14} {'spread':>18} {'tokens/s':>10} {'ratio':>7} {'CPU s/step/rank':>16}")
    for name, ts in runs.items():
        med = statistics.median(ts)
        print(f"{name:<22} {med:>14.3f} {min(ts):>8.3f}-{max(ts):<8.3f} {2 * T / med:>10.0f} {base / med:>7.2f} "
              f"{statistics.median(cpus[name]):>16.3f}")

    seqs = [int(s) for s in args.mem_seqs.split(",")]
    one = _memory(0, 1, seqs, False)
    two = run_ranks(2, _memory, seqs, True)
    print("\nactivations saved for the backward, MiB per rank (whole model | attention's own op)")
    print(f"{'T':>6} {'one process':>22} {'cp=2 rank 0':>22} {'cp=2 rank 1':>22} {'ratio (all)':>12}")
    mib = 2 ** 20
    for T in seqs:
        a, b, c = one[T], two[0][T], two[1][T]
        print(f"{T:>6} {a[0] / mib:>10.2f} | {a[1] / mib:>9.2f} {b[0] / mib:>10.2f} | {b[1] / mib:>9.2f} "
              f"{c[0] / mib:>10.2f} | {c[1] / mib:>9.2f} {max(b[0], c[0]) / a[0]:>12.2f}")


if __name__ == "__main__":
    main()
