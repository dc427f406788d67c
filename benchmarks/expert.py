"""Expert parallelism on CPU: throughput of ep = 2 vs one process at equal global batch, and the
bytes the all-to-alls send per step against the formula.

One process (one thread) trains a DeepSeek-style MoE model (sigmoid router + bias, a shared
expert) on ``--rows`` sequences per step; ``ep`` gloo processes (one thread each) train the same
model with the experts split across them (evolm/parallel/expert.py, DDP for the dense rest), each
on ``rows / ep`` sequences of the same global batch. Printed: tokens/s of each and their ratio
(median over ``--repeat`` runs, with the half-spread); per rank and step, the bytes sent to other
ranks by the dispatch and combine all-to-alls (forward; the backward sends the same again) and
the per-expert counts, next to the formula

    bytes(forward) = (rows_out + rows_in) * d_model * 4  +  (ep - 1) * E / ep * 8     per MoE layer,

where ``rows_out`` is the number of this rank's (token, expert) pairs whose expert lives on another
rank (dispatch) and ``rows_in`` the other ranks' pairs routed to this rank's experts (their results
go back: combine), both counted from the routing; with a balanced router each has the expectation
``N k (ep - 1) / ep`` for ``N`` tokens per rank and top-``k`` routing.

    python benchmarks/expert.py [--ep 2] [--layers 4] [--d-model 128] [--experts 8] [--seq 128]
                                [--rows 8] [--steps 4] [--repeat 3]
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

    return get_preset("tiny-deepseek", n_layers=a.layers, d_model=a.d_model, n_heads=4, q_lora_rank=a.d_model // 2,
                      kv_lora_rank=a.d_model // 4, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                      d_ff=a.d_model * 3, moe_d_ff=a.d_model, n_experts=a.experts, n_experts_per_tok=2,
                      n_expert_groups=1, topk_groups=1, first_k_dense=0, vocab_size=512, max_seq_len=a.seq)


def _batches(a):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 512, (a.rows, a.seq + 1), generator=g) for _ in range(a.steps + 1)]


def _step(model, net, opt, b):
    from evolm.train.loop import update_moe_bias

    net(b[:, :-1], targets=b[:, 1:]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_moe_bias(model, torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)


def one_process(a) -> float:
    import evolm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = evolm.build(_config(a))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for b in _batches(a):
        t0 = time.perf_counter()
        _step(model, model, opt, b)
        times.append(time.perf_counter() - t0)
    return a.rows * a.seq * len(times[1:]) / sum(times[1:])


def _ranked(rank: int, world: int, a):
    """(tokens/s of the global batch, per-step forward bytes sent, per-step formula bytes) on this rank."""
    import evolm
    from torch.distributed.device_mesh import init_device_mesh

    from evolm.parallel.expert import data_parallel, expert_range, moe_layers, parallelize_experts

    torch.manual_seed(0)
    model = evolm.build(_config(a))
    parallelize_experts(model, init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)))
    net = data_parallel(model, "ddp")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    per = a.rows // world
    times, sent, formula = [], [], []
    mine = expert_range(a.experts, world, rank)
    for b in _batches(a):
        layers = moe_layers(model)
        for m in layers:
            m.experts.ep.sent.update(dispatch=0, combine=0, counts=0)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        _step(model, net, opt, b[rank * per:(rank + 1) * per])
        torch.distributed.barrier()
        times.append(time.perf_counter() - t0)
        sent.append(sum(sum(m.experts.ep.sent.values()) for m in layers))
        rows = 0  # pairs this rank sends away (dispatch) + pairs the others sent it (their combine comes back)
        for m in layers:
            counts = [torch.empty_like(m.expert_counts) for _ in range(world)]
            torch.distributed.all_gather(counts, m.expert_counts)
            rows += int(counts[rank].sum() - counts[rank][mine.start:mine.stop].sum())
            rows += sum(int(c[mine.start:mine.stop].sum()) for s, c in enumerate(counts) if s != rank)
        formula.append(rows * a.d_model * 4 + len(layers) * (world - 1) * len(mine) * 8)
    return a.rows * a.seq * len(times[1:]) / sum(times[1:]), sent[1:], formula[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    from ranks import run_ranks

    single, parallel, ratios = [], [], []
    for _ in range(a.repeat):  # interleaved, so drifts in the machine's load hit both
        s = one_process(a)
        res = run_ranks(a.ep, _ranked, a)
        e = min(r[0] for r in res)
        single.append(s)
        parallel.append(e)
        ratios.append(e / s)
    (s, ss), (e, es), (r, rs) = median_spread(single), median_spread(parallel), median_spread(ratios)
    N = a.rows // a.ep * a.seq
    print(f"global batch {a.rows} x {a.seq} tokens, {a.layers} MoE layers, {a.experts} experts top-2, "
          f"d_model {a.d_model}")
    print(f"one process: {s:8.1f} tok/s (±{ss:.0%})   ep={a.ep}: {e:8.1f} tok/s (±{es:.0%})   "
          f"ratio {r:.2f} (±{rs:.0%})")
    for rank, (_, sent, formula) in enumerate(res):
        expect = a.layers * (2 * N * 2 * (a.ep - 1) / a.ep * a.d_model * 4 + (a.ep - 1) * a.experts // a.ep * 8)
        print(f"rank {rank}: forward all-to-all bytes per step {sent} ; formula from the routing {formula} ; "
              f"balanced-router expectation {expect:.0f} (backward sends the same again)")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
