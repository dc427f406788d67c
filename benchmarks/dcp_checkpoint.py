"""Checkpoint save/load under FSDP 2 (gloo, CPU): the sharded path (``train.ckpt_format: dcp``,
``evolm/parallel/checkpoint.py``) vs the full-state path (``full``: gathered onto rank 0, written
there), for the same model and AdamW state.

    python benchmarks/dcp_checkpoint.py [--world 2] [--d-model 256] [--layers 4] [--vocab 8192] [--repeat 5]

Each rank runs ``--repeat`` save+load rounds of each path, interleaved; printed per path: the
median seconds of save and of load (slowest rank of each round) with the min-max spread, and the
bytes each rank wrote. Full path, as the trainer does it: save = gather model and optimizer
(``full_state_dicts``) + rank 0 writes model.safetensors and trainer.pt; load = every rank reads
both files and scatters them into its shards (``set_state_dict(full_state_dict=True)``). Sharded
path: save = ``dckpt.save``; load = ``dckpt.load``. The host may be shared: read the spread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def bench(rank: int, world: int, args: dict, tmp: str):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from evolm import ModelConfig, build
    from evolm.checkpoint import load_trainer_state, read_weights
    from evolm.parallel import checkpoint as dckpt
    from evolm.train import parallel as par
    from evolm.train.loop import save_model_folder
    from evolm.train.optim import make_optimizer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args["vocab"], d_model=args["d_model"], n_layers=args["layers"], n_heads=8,
                      n_kv_heads=4, norm="rmsnorm", pos_emb="rope", mlp="glu", activation="silu", max_seq_len=64)
    model = build(cfg)
    net = par.parallelize(model, "fsdp", world, torch.device("cpu"))
    opt = make_optimizer(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    x = torch.randint(0, cfg.vocab_size, (2, 33))
    net(x[:, :-1], targets=x[:, 1:]).backward()
    opt.step()
    opt.zero_grad()

    def slowest(t: float) -> float:
        v = torch.tensor([t], dtype=torch.float64)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return float(v)

    def full_save(path: Path):
        msd, osd = par.full_state_dicts(net, opt, "fsdp")
        if rank == 0:
            save_model_folder(model, msd, path, {"optimizer": osd}, None)
        dist.barrier()

    def full_load(path: Path):
        msd = read_weights(str(path / "model.safetensors"))
        osd = load_trainer_state(str(path))["optimizer"]
        set_state_dict(net, opt, model_state_dict=msd, optim_state_dict=osd,
                       options=StateDictOptions(full_state_dict=True, strict=False))

    def dcp_save(path: Path):
        dckpt.save(net, opt, path, progress={}, rank_state={"dp_rank": rank, "dp_degree": world, "task": {},
                                                           "rng": {}}, rank=rank, world=world)

    def dcp_load(path: Path):
        dckpt.load(net, opt, path)

    times = {k: [] for k in ("full save", "full load", "dcp save", "dcp load")}
    for i in range(args["repeat"]):
        for kind, save, load in (("full", full_save, full_load), ("dcp", dcp_save, dcp_load)):
            path = Path(tmp) / f"{kind}_{i}"
            dist.barrier()
            t0 = time.perf_counter()
            save(path)
            times[f"{kind} save"].append(slowest(time.perf_counter() - t0))
            dist.barrier()
            t0 = time.perf_counter()
            load(path)
            times[f"{kind} load"].append(slowest(time.perf_counter() - t0))
    params = sum(p.numel() for p in model.parameters())
    return times, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ranks import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        args = {"vocab": a.vocab, "d_model": a.d_model, "layers": a.layers, "repeat": a.repeat}
        (times, params), *_ = run_ranks(a.world, bench, args, tmp, timeout=1800)
        full, sharded = _sizes(Path(tmp) / "full_0"), _sizes(Path(tmp) / "dcp_0")
    print(f"model: {params:,} parameters (d_model {a.d_model}, {a.layers} layers, vocab {a.vocab}), AdamW state, "
          f"fsdp {a.world} on gloo, {a.repeat} rounds")
    for k, v in times.items():
        print(f"  {k:9s}  median {statistics.median(v):.3f} s  (min {min(v):.3f}, max {max(v):.3f})")
    written = {r: 0 for r in range(a.world)}
    for name, size in sharded.items():
        if name.startswith("dcp/__"):
            written[int(name.split("__")[1].split("_")[0])] += size
        elif name.startswith("rank_"):
            written[int(name[5:10])] += size
        else:  # .metadata, trainer.pt, config: rank 0
            written[0] += size
    print("  bytes written per rank: full " + ", ".join(f"rank {r} {sum(full.values()) if r == 0 else 0:,}"
                                                       for r in range(a.world))
          + " | dcp " + ", ".join(f"rank {r} {b:,}" for r, b in written.items()))
    print(f"  files: full {sorted(full)} | dcp {sorted(sharded)}")


if __name__ == "__main__":
    main()
