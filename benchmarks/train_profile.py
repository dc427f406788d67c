"""Where a training step's time goes: one engine of ``benchmarks/train.py``, timed and profiled.

Builds the same engines as ``train.py`` (evolm eager or with compiled blocks, the nanoGPT-style
model compiled whole, transformers) on the same configs and batch, runs warm-up steps, then
prints each timed step, the process's minor page faults per step (every fresh tensor above
glibc's mmap threshold costs one per 4 KB touched) and, with ``--profile``, the operators by self
CPU time per step. ``--keep-freed-memory`` sets glibc's mmap and trim thresholds so that freed
memory is reused instead of returned to the kernel (what an allocator such as jemalloc or
tcmalloc gives): it shows how much of a step is page faults.

    python benchmarks/train_profile.py [--engine evolm|evolm-compiled|evolm-whole|nanogpt|transformers]
                                       [--model gpt2-style|llama-style] [--dtype bfloat16|float32]
                                       [--steps 5] [--warmup 3] [--profile] [--keep-freed-memory]
                                       [--device cuda] [--size gpt2-124m] [--batch B] [--context T]
                                       [--loss-chunk ROWS]

``evolm-whole`` is ``torch.compile(model)`` of the whole evolm model (its fused loss stays out of
the graph); ``--loss-chunk`` sets the fused loss's rows per chunk (default 1,024 fp32 / 2,048
bf16). On a GPU the profile lists operators by GPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

import train as tb  # noqa: E402  (benchmarks/train.py: configs, engines, batch)
from stats import sync  # noqa: E402
import evolm.nn.loss as loss_mod  # noqa: E402
from evolm.interop.hf import config_from_hf, state_dict_from_hf  # noqa: E402
from evolm.model import build  # noqa: E402
from evolm.train.optim import make_optimizer  # noqa: E402


def make_step(engine: str, model_name: str, dtype: str, device: str = "cpu"):
    """One training step (forward, backward, AdamW) of ``engine`` on ``train.py``'s batch."""
    x = torch.randint(0, tb.V, (tb.B, tb.T + 1), generator=torch.Generator().manual_seed(0)).to(device)
    inp, tgt = x[:, :-1], x[:, 1:]
    name, cls, hf_cfg = next(m for m in tb.hf_models() if m[0] == model_name)
    torch.manual_seed(0)
    if engine == "nanogpt":
        if model_name != "gpt2-style":
            raise SystemExit("--engine nanogpt is the GPT-2-style model only")
        raw = tb.NanoGPTStyle(tb.SIZE["layers"], tb.SIZE["width"], tb.SIZE["heads"]).to(device)
        model, loss_of = torch.compile(raw), lambda m: m(inp, tgt)
    elif engine == "transformers":
        raw = model = cls(hf_cfg).to(device)
        loss_of = lambda m: F.cross_entropy(m(inp).logits.float().flatten(0, 1), tgt.flatten())  # noqa: E731
    else:
        hf = cls(hf_cfg)
        cfg = config_from_hf(hf_cfg.to_dict())
        raw = model = build(cfg, device=device)
        model.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg, hf_cfg.model_type), strict=False)
        if engine == "evolm-compiled":
            for block in model.layers:
                block.compile()
        elif engine == "evolm-whole":
            model = torch.compile(raw)
        raw.compiled_loss = engine != "evolm"  # as train.compile sets it
        loss_of = lambda m: m(inp, targets=tgt)  # noqa: E731
    opt = make_optimizer(raw, 1e-4)
    amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()

    def step():
        with amp:
            loss = loss_of(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def keep_freed_memory() -> None:
    """glibc: serve every allocation from the heap and never trim it (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD)."""
    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(-3, 1 << 30) and libc.mallopt(-1, (1 << 31) - 1)):
        raise SystemExit("mallopt failed: not glibc?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="evolm-compiled",
                    choices=["evolm", "evolm-compiled", "evolm-whole", "nanogpt", "transformers"])
    ap.add_argument("--model", default="gpt2-style", choices=["gpt2-style", "llama-style"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also profile 2 steps and print the top operators")
    ap.add_argument("--keep-freed-memory", action="store_true", help="glibc keeps freed memory for reuse")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="small", choices=sorted(tb.SIZES))
    ap.add_argument("--batch", type=int, default=tb.B)
    ap.add_argument("--context", type=int, default=tb.T)
    ap.add_argument("--loss-chunk", type=int, default=None, help="rows per chunk of evolm's fused loss")
    args = ap.parse_args()
    tb.SIZE, tb.B, tb.T = tb.SIZES[args.size], args.batch, args.context
    if args.loss_chunk:
        loss_mod._default_chunk = lambda dtype: args.loss_chunk
    if args.keep_freed_memory:
        keep_freed_memory()
    step = make_step(args.engine, args.model, args.dtype, args.device)
    gpu = torch.device(args.device).type == "cuda"
    for _ in range(args.warmup):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(args.steps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // args.steps
    best = min(times)
    print(f"{args.engine} {args.model} {args.dtype}, {torch.get_num_threads()} threads: steps "
          f"{', '.join(f'{t:.3f}' for t in times)} s; best {tb.B * tb.T / best:,.0f} tok/s; "
          f"{faults:,} minor page faults per step")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=acts) as prof:
            for _ in range(2):
                step()
            sync()
        key = "self_device_time_total" if gpu else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
        print(f"self {'GPU' if gpu else 'CPU'} time per step: {sum(getattr(e, key) for e in events) / 2e3:,.1f} ms")
        for e in events[:args.rows]:
            print(f"{getattr(e, key) / 2e3:9.2f} ms  {e.count // 2:5d} calls  {e.key[:100]}")


if __name__ == "__main__":
    main()
