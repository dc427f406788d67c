"""Pipeline parallelism on CPU: throughput of pp = 2 vs one process at equal global batch, and the bubble.

One process trains a Llama-style model accumulating ``m`` micro-batches per step; ``pp`` gloo
processes (one thread each) train the same model pipelined (evolm/parallel/pipeline.py) on the same
global batch cut into the same ``m`` micro-batches. Printed per ``m``: tokens/s of each, their ratio
(median over ``--repeat`` runs, with the half-spread), and the bubble: each rank's idle share of the
step, ``1 - busy / step`` where busy is the wall time inside the stage's forward and backward calls
(``PipelineStage.forward_one_chunk`` / ``backward_one_chunk``; waits on messages excluded), next to
GPipe/1F1B's ``(p - 1) / (m + p - 1)``; and the most micro-batches whose activations a rank held
at once (GPipe: all ``m``; 1F1B: at most ``p``, PipeDream-Flush's memory saving). The one-process run uses one thread, so a perfect pipeline of
two processes reaches a ratio of ``2 m / (m + 1)``; on a shared 2-core machine it will not.

    python benchmarks/pipeline.py [--micro 2,4,8] [--schedule 1f1b] [--layers 8] [--d-model 256]
                                  [--seq 128] [--rows 16] [--steps 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))

from stats import median_spread  # noqa: E402


def _config(a):
    from evolm.presets import get_preset

    return get_preset("tiny-llama").replace(n_layers=a.layers, d_model=a.d_model, n_heads=8, n_kv_heads=4,
                                            d_ff=a.d_model * 8 // 3, vocab_size=a.vocab, max_seq_len=a.seq)


def _batches(cfg, a):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, cfg.vocab_size, (a.rows, a.seq), generator=g),
             torch.randint(0, cfg.vocab_size, (a.rows, a.seq), generator=g)) for _ in range(a.steps + 1)]


def one_process(a, m: int) -> float:
    """Tokens/s of one process accumulating m micro-batches per step (first step untimed)."""
    import evolm
    from evolm.train.optim import make_optimizer

    torch.set_num_threads(1)
    cfg = _config(a)
    torch.manual_seed(0)
    model = evolm.build(cfg)
    opt = make_optimizer(model)
    times = []
    for x, y in _batches(cfg, a):
        t0 = time.perf_counter()
        for xm, ym in zip(x.chunk(m), y.chunk(m)):
            (model(xm, targets=ym) / m).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return a.rows * a.seq * len(times[1:]) / sum(times[1:])


def _ranked(rank: int, world: int, a, m: int):
    """(tokens/s, idle share of the timed ``Pipeline.step`` calls, the most micro-batches whose
    activations this rank held at once) of this pipeline rank."""
    import evolm
    from torch.distributed.device_mesh import init_device_mesh

    from evolm.parallel import pipeline as pp
    from evolm.train.optim import make_optimizer

    cfg = _config(a)
    torch.manual_seed(0)
    model = evolm.build(cfg)
    pipe = pp.pipeline(model, init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))["pp"], a.schedule, m)
    opt = make_optimizer(pipe.module)
    busy, held = [0.0], [0]
    times, in_pipe = [], []
    for i, (x, y) in enumerate(_batches(cfg, a)):
        if i == 1:  # the stages exist after the first step: time their compute calls
            for st in (pipe.schedule._stage,):
                for name in ("forward_one_chunk", "backward_one_chunk"):
                    inner = getattr(st, name)

                    def timed(*args, _inner=inner, _st=st, **kw):
                        t = time.perf_counter()
                        try:
                            return _inner(*args, **kw)
                        finally:
                            busy[0] += time.perf_counter() - t
                            held[0] = max(held[0], len(_st.fwd_cache))  # micro-batches whose activations wait

                    setattr(st, name, timed)
        t0 = time.perf_counter()
        pipe.step(x, y)
        in_pipe.append(time.perf_counter() - t0)
        pp.clip_grad_norm_(pipe, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return a.rows * a.seq * len(times[1:]) / sum(times[1:]), 1 - busy[0] / sum(in_pipe[1:]), held[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro", default="2,4,8")
    p.add_argument("--schedule", default="1f1b")
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    from ranks import run_ranks

    print(f"llama-style {a.layers} layers x {a.d_model}, vocab {a.vocab}, global batch {a.rows} x {a.seq}, "
          f"{a.schedule}, pp={a.pp}, {a.steps} timed steps, {a.repeat} repeats")
    print(f"{'m':>3} {'1 proc tok/s':>14} {'pp tok/s':>14} {'ratio':>12} {'bubble/rank (observed)':>26} {'formula':>8} "
          f"{'activations held/rank':>22}")
    for m in [int(v) for v in a.micro.split(",")]:
        single, piped, ratios, bubbles, held = [], [], [], [], []
        for _ in range(a.repeat):  # interleaved, so load changes hit both alike
            s = one_process(a, m)
            r = run_ranks(a.pp, _ranked, a, m)
            single.append(s)
            piped.append(min(v[0] for v in r))
            ratios.append(piped[-1] / s)
            bubbles.append([v[1] for v in r])
            held = [v[2] for v in r]
        (sm, ss), (pm, ps), (rm, rs) = median_spread(single), median_spread(piped), median_spread(ratios)
        per_rank = " / ".join(f"{median_spread([b[k] for b in bubbles])[0]:.2f}" for k in range(a.pp))
        print(f"{m:>3} {sm:>9.0f} ±{ss:4.0%} {pm:>9.0f} ±{ps:4.0%} {rm:>6.2f} ±{rs:4.0%} {per_rank:>26} "
              f"{(a.pp - 1) / (m + a.pp - 1):>8.2f} {' / '.join(map(str, held)):>22}")


if __name__ == "__main__":
    main()
