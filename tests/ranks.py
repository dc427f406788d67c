"""Run one function in several CPU processes joined in a gloo process group, as torchrun would.

The parallelism tests (tensor, pipeline, context, expert, and their compositions with FSDP) compare
N processes against one. ``run_ranks(world, fn, *args)`` spawns ``world`` processes, each with
``RANK``/``WORLD_SIZE`` set, a gloo group from a file rendezvous (no port to collide on when tests
run side by side) and one thread; it returns ``fn(rank, world, *args)`` of every rank, in rank order,
and re-raises the first rank's failure with its traceback. ``fn`` must be a module-level function
(spawned processes import it by name).
"""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, queue, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        queue.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn, *args, timeout: float = 300.0) -> list:
    """``[fn(rank, world, *args) for rank in range(world)]``, each in its own gloo process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(r, world, init_file, queue, fn, args)) for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, object] = {}
        errors: dict[int, str] = {}
        try:
            for _ in range(world):
                rank, status, value = queue.get(timeout=timeout)
                (results if status == "ok" else errors)[rank] = value
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    if errors:
        rank = min(errors)
        raise AssertionError(f"rank {rank} of {world} failed:\n{errors[rank]}")
    return [results[r] for r in range(world)]
