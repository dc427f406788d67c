"""The runs of one lab folder: shared set-up, one ordinary run per (variant, seed), in parallel.

Everything that does not depend on the variant is made once in ``OUT/shared`` and reused: the
tokenizer (trained on the base recipe's data), the token shards of each distinct data section
(``shared/data-<hash>``; a data ablation has one per setting, a model ablation just one), and the
held-out set: the validation split of the base recipe's data, on which every run is evaluated, so
a filter or dedup variant is judged on the same text as its baseline (``data/prepare.py`` splits
by each document's own hash, so the filtered data's held-out documents never leak into an
unfiltered run's training split). Each run is an ordinary run folder that records its wall time as
set-up (``setup_s``) and training (``train_s``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Setup:
    """What every run of a lab folder shares."""

    tokenizer: Any
    base: dict        # the base recipe, its tokenizer pointing at the shared one, evaluated on ``heldout``
    heldout: Path     # a prepared data folder: its val split is every run's held-out set
    folder: Path      # OUT/shared
    data_dir: str | None


def shared_setup(base: dict, out: Path, data_dir: str | None, log: Callable[[str], None]) -> Setup:
    """Train (or reuse) the tokenizer and prepare the base data once, under ``out/shared``."""
    from evolm.train.pretrain import load_or_train_tokenizer
    from evolm.train.recipe import recipe_from_dict

    shared = out / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    tokenizer = load_or_train_tokenizer(recipe_from_dict(base, "base recipe"), shared, data_dir, log)
    base = copy.deepcopy(base)
    base["tokenizer"] = {"path": str(shared if (shared / "tokenizer_config.json").is_file() else
                                     shared / "tokenizer.json")}
    setup = Setup(tokenizer, base, Path(), shared, data_dir)
    heldout = prepare_data(setup, base, log)
    base.setdefault("train", {})["eval_data"] = str(heldout)
    return Setup(tokenizer, base, heldout, shared, data_dir)


def data_folder(setup: Setup, d: dict) -> Path:
    """The shared shard folder of a recipe's data section: one per distinct set of sources and
    options, defaults filled in (``near_dedup: true`` written out or left to the default is one)."""
    import dataclasses

    from evolm.data.prepare import PrepareOptions, load_spec

    specs, options = load_spec(d.get("data") or {})
    resolved = {"sources": [s.to_dict() for s in specs], "options": dataclasses.asdict(PrepareOptions(**options))}
    key = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return setup.folder / f"data-{key}"


def prepare_data(setup: Setup, d: dict, log: Callable[[str], None]) -> Path:
    """Tokenize ``d``'s data section into its shared folder (a no-op when it is up to date)."""
    from evolm.data.prepare import prepare

    folder = data_folder(setup, d)
    prepare(d.get("data") or {}, setup.tokenizer, folder, data_dir=setup.data_dir, log=log)
    return folder


@dataclass(frozen=True)
class Job:
    """One (variant, seed) run: its recipe, folder and shared shards; picklable for a worker process."""

    recipe: dict
    seed: int
    folder: Path
    data: Path
    data_dir: str | None
    name: str = ""  # the run's name in its recipe and log lines (default: its folder's parent)

    @property
    def done(self) -> bool:
        return (self.folder / "summary.json").is_file()


def run_job(job: Job, log: Callable[[str], None] | None = None) -> dict:
    """Train one run (resuming a checkpoint left by an interrupted one); write and return its summary."""
    from evolm.train.pretrain import pretrain
    from evolm.train.recipe import recipe_from_dict

    name = job.name or job.folder.parent.name
    log = log or (lambda s, p=f"[{name}/{job.folder.name}] ": print(p + s, flush=True))
    d = dict(job.recipe, seed=job.seed, name=name)
    summary = pretrain(recipe_from_dict(d, str(job.folder)), out_dir=str(job.folder),
                       resume=(job.folder / "checkpoints").exists(), data_dir=job.data_dir, log=log,
                       data_out=job.data)
    keep = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
    (job.folder / "summary.json").write_text(json.dumps(keep, indent=2))
    return keep


def run_jobs(jobs: list[Job], workers: int, log: Callable[[str], None]) -> None:
    """Run the jobs not yet done: in this process (``workers`` 1), or in ``workers`` processes that
    share the machine's cores (each gets cores // workers threads unless its recipe sets
    ``train.threads``) and, with several CUDA GPUs, one GPU each in turn."""
    todo = [j for j in jobs if not j.done]
    for j in jobs:
        if j.done:
            log(f"{j.folder}: done, skipped")
    if workers <= 1 or len(todo) <= 1:
        for j in todo:
            run_job(j, log)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // workers)
    todo = [replace(j, recipe={**j.recipe, "train": {"threads": threads, **(j.recipe.get("train") or {})}})
            for j in todo]
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ctx = multiprocessing.get_context("spawn")
    devices = ctx.Queue()
    for i in range(workers):
        devices.put(i % gpus if gpus > 1 else None)
    log(f"{len(todo)} runs in {workers} processes, {threads} thread(s) each"
        + (f", on {gpus} GPUs in turn" if gpus > 1 else ""))
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_take_device, initargs=(devices,)) as pool:
        for future in [pool.submit(run_job, j) for j in todo]:
            future.result()  # a failed run stops the lab with its error


def _take_device(devices) -> None:
    """A worker process's initializer: pin it to the next free GPU (none on CPU or one GPU)."""
    index = devices.get()
    if index is not None:
        import torch

        torch.cuda.set_device(index)


def tokens_per_byte(data: Path, tokenizer) -> float:
    """Held-out tokens per UTF-8 byte of their text, so a loss in nats per token becomes bits per
    byte: a measure no tokenizer choice can move (a variant with another vocabulary compares)."""
    import numpy as np

    manifest = json.loads((data / "manifest.json").read_text())
    eos = manifest["tokenizer"]["eos_id"]
    n_tokens = n_bytes = 0
    for shard in sorted((data / "val").glob("*.bin")):
        ids = np.fromfile(shard, dtype=manifest["tokenizer"]["dtype"]).tolist()
        n_tokens += len(ids)
        n_bytes += len(tokenizer.decode([i for i in ids if i != eos]).encode("utf-8"))
    return n_tokens / max(1, n_bytes)


def bits_per_byte(val_loss: float, tokens_per_byte_: float) -> float:
    return val_loss / math.log(2) * tokens_per_byte_
