"""The one training loop: pretraining, SFT, DPO and GRPO all step through ``run``.

This module is the loop's contract (the Task protocol, :class:`Runtime`) and the pieces trainers
share (RNG state, metrics log, progress bar, checkpoint folders, loss plot); ``run`` drives the
:class:`~evolm.train.trainer.Trainer`, which does the work one short method per job. The typed
settings (:class:`Phase`, :class:`LoopConfig`) are declared in ``config.py``.

What every trainer shares lives here: the LR schedule of each phase (``optim.lr_at``), gradient
accumulation, gradient clipping, bf16 autocast, AdamW over the *trainable* parameters only
(``requires_grad``; LoRA freezes the base), DDP/FSDP wrapping, ``metrics.jsonl`` + TensorBoard,
the progress bar, periodic evaluation and samples, atomic checkpoints with exact ``--resume``,
the final save and the loss plot. What differs between trainers is a **task** object.

The Task protocol
-----------------
A task is any object with these methods (see :class:`Task`)::

    start_phase(index, phase)   called when a phase starts, and again for the current phase when a
                                run resumes (then ``load_state_dict`` follows): build the data
                                loader of that phase, change the model (RoPE base) ...
    next_batch() -> batch       one micro-batch, anything ``loss`` understands
    loss(model, batch) -> (loss, metrics)
                                the *mean* loss of one micro-batch (a scalar tensor with grad) and
                                extra floats to log (averaged over the micro-batches of a step).
                                The special key ``"tokens"`` is the number of tokens the micro-batch
                                trained on; it feeds ``tokens`` and ``tokens_per_s`` (otherwise the
                                phase's ``tokens_per_step`` is used). ``model`` may be a DDP/FSDP
                                wrapper: call it, do not reach into it.
    evaluate(model) -> dict     held-out metrics (``val_loss``, ``val_reward_accuracy`` ...); the
                                loop has put the model in eval mode under ``no_grad`` + autocast
    state_dict() / load_state_dict(s)
                                the data position, for a resume that continues bit for bit
Optional:
    samples(model) -> [(prompt, text)]    continuations printed at ``sample_every`` and at the end
    after_step(model)                     after each optimizer step (DeepSeek-V3's MoE bias update)
    flops_per_token(phase) -> float       for the MFU column
    save_final(model, state_dict, out)    write the final result (default: the whole model +
                                          tokenizer into ``out``, loadable by ``evolm generate``)

The loop calls ``loss`` under autocast and divides by the phase's ``accum`` before backward, so a
task never handles scaling, clipping, optimizer or schedule. A phase (:class:`Phase`) is one LR
shape over ``steps`` optimizer steps: pretraining has one per recipe stage; SFT/DPO usually one.

Checkpoints (``out/checkpoints/step_NNNNNNN``) hold the weights — the whole model when every
parameter trains, only the trainable ones otherwise (an adapter's worth for LoRA) — and
``trainer.pt``: optimizer, RNG states, the task's data position, phase and step. They are written
atomically (``evolm.checkpoint``), so a kill mid-save leaves the previous one intact.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch

from evolm.train import parallel as par
from evolm.train.config import LoopConfig, Phase


# --------------------------------------------------------------------------------------------
# the contract
# --------------------------------------------------------------------------------------------
@runtime_checkable
class Task(Protocol):
    def start_phase(self, index: int, phase: Phase) -> None: ...

    def next_batch(self) -> Any: ...

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self, model) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, s: dict) -> None: ...


@dataclass
class Runtime:
    """Where this process runs: rank, world size, device (from ``torchrun``'s environment), and
    the run's parallel layout with its DeviceMesh (None: one process, or plain DDP/FSDP runs that
    predate layouts still get one: see ``evolm.parallel.layout.effective_layout``).

    ``dp_rank`` / ``dp_world``: this process's place among the data-parallel ranks, which read
    different parts of the global batch; ranks of one tensor/context/pipeline group share theirs.
    Logged figures are reduced over ``dp_group``."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    layout: Any = None  # evolm.parallel.ParallelLayout (resolved) or None
    mesh: Any = None  # its torch DeviceMesh

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else self.rank

    @property
    def dp_world(self) -> int:
        return self.mesh["dp"].size() if self.mesh is not None else self.world

    @property
    def dp_group(self):
        """The process group of the data-parallel ranks (None: the default group)."""
        return self.mesh["dp"].get_group() if self.mesh is not None and self.dp_world < self.world else None

    @property
    def sharded(self) -> bool:
        """Whether the parameters are DTensors (FSDP2, TP, ...): state dicts are gathered collectively."""
        return self.layout is not None and self.layout.sharded

    @classmethod
    def create(cls, distributed: str = "none", parallel=None) -> "Runtime":
        """Start the process group when the layout (``train.distributed`` + the ``parallel:``
        section, ``evolm.parallel.effective_layout``) splits the world, and build its mesh."""
        from evolm.parallel.layout import effective_layout

        layout = effective_layout(distributed, parallel, int(os.environ.get("WORLD_SIZE", "1")))
        rank, world, device = par.init_distributed("none" if layout is None else "on")
        mesh = layout.build_mesh(device.type) if layout is not None else None
        return cls(rank, world, device, layout, mesh)


# --------------------------------------------------------------------------------------------
# small pieces shared by trainers
# --------------------------------------------------------------------------------------------
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors, ints and lists, so ``trainer.pt`` loads without pickle
    (numpy's state is an ndarray: stored as its list of words)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict[str, Any]) -> None:
    version, words, gauss = s["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def update_moe_bias(model, world: int = 1) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing (arXiv:2412.19437 sec. 2.1.2): after each step,
    nudge every router's expert bias against that expert's load. A no-op for other models.

    The load is the whole step's: each MoE layer sums its counts over the step's micro-batches
    (``MoE.step_counts``), and the counts of all layers are summed across the data-parallel ranks
    in one all-reduce, so every rank applies the same update, equal to one process seeing the
    global batch. The routers of multi-token prediction blocks are balanced too. Under activation checkpointing a layer's forward runs again in the backward,
    doubling all its counts alike; ``sign(mean - load)`` is unchanged by that."""
    blocks = list(getattr(model, "layers", [])) + [m.block for m in (getattr(model, "mtp_layers", None) or [])]
    moes = [layer.mlp for layer in blocks
            if getattr(getattr(getattr(layer, "mlp", None), "gate", None), "e_score_correction_bias", None) is not None]
    if not moes:
        return
    bias = moes[0].gate.e_score_correction_bias
    counts = torch.stack([m.step_counts if m.step_counts is not None
                          else torch.zeros(bias.shape[0], dtype=torch.long, device=bias.device) for m in moes])
    par.all_reduce_sum_(counts, world)
    for m, c in zip(moes, counts):
        m.gate.update_bias(c)
        m.step_counts = None


def peak_flops(device: torch.device, dtype: str, stated: float | None) -> tuple[float, str]:
    """The peak FLOP/s that MFU is measured against, and a note saying where it comes from."""
    if stated:
        return stated * 1e12, f"stated {stated} TFLOP/s"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
        for k, v in table.items():
            if k in name:
                return v, f"{name} dense bf16 peak"
        return 100e12, f"{name}: unknown peak, assumed 100 TFLOP/s"
    threads = torch.get_num_threads()
    # AVX-512: 2 FMA units x 16 fp32 lanes x 2 FLOPs per cycle, ~3 GHz; bf16 doubles the lanes
    peak = threads * 3.0e9 * 64 * (2 if dtype == "bfloat16" else 1)
    return peak, f"CPU estimate: {threads} threads x 3 GHz x {64 * (2 if dtype == 'bfloat16' else 1)} FLOP/cycle"


def latest_checkpoint(out: Path) -> Path | None:
    ck = Path(out) / "checkpoints"
    if not ck.is_dir():
        return None
    done = sorted(p for p in ck.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and (p / "trainer.pt").is_file())
    return done[-1] if done else None


def all_trainable(model) -> bool:
    return all(p.requires_grad for p in model.parameters())


def trainable_state(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a state dict that a partial (e.g. LoRA) run changes: trainable parameters
    plus DeepSeek-V3's router bias buffers."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names or k.endswith("e_score_correction_bias")}


class MetricsLog:
    """metrics.jsonl (one object per logged step) + TensorBoard, on rank 0."""

    def __init__(self, out: Path, resume_step: int | None, enabled: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.rows: list[dict] = []
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():  # drop rows past the checkpoint
            kept = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.rows = [r for r in kept if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=(resume_step + 1) if resume_step else None)
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            self.tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k.replace("val_loss_", "val_loss/"), v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """A live bar on a terminal (rich); plain log lines otherwise."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

        self.bar = RichProgress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=done, info="")

    def update(self, step: int, loss: float, lr: float, tps: float) -> None:
        if self.enabled:
            self.bar.update(self.task, completed=step, info=f"loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s")

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()


def save_model_folder(model, state: dict, path: Path, trainer_state: dict | None, tokenizer) -> None:
    """An evolm checkpoint folder (weights + config [+ trainer.pt] + tokenizer files), atomically."""
    from evolm.checkpoint import save_checkpoint

    class _View:  # save_checkpoint wants .state_dict() and .config
        def __init__(self, config, sd):
            self.config, self._sd = config, sd

        def state_dict(self):
            return self._sd

    save_checkpoint(_View(model.config, state), str(path), trainer_state, extra_files=tokenizer_files(tokenizer))


def tokenizer_files(tokenizer) -> dict[str, str]:
    if tokenizer is None:
        return {}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        return {name: Path(tmp, name).read_text() for name in os.listdir(tmp)}


def save_trainable_folder(state: dict, path: Path, trainer_state: dict) -> None:
    """A checkpoint of a partly frozen model: the trainable tensors + trainer state, atomically."""
    from safetensors.torch import save_file

    from evolm.checkpoint import _atomic_dir, save_trainer_state

    with _atomic_dir(str(path)) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                  os.path.join(tmp, "trainable.safetensors"), metadata={"format": "pt"})
        save_trainer_state(trainer_state, tmp)


def plot_losses(rows: list[dict], path: Path, title: str = "") -> None:
    """Train (and val) loss against tokens, with a dashed line at each phase boundary."""
    ev = [r for r in rows if "val_loss" in r]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1.2)
    if ev:
        ax.plot([r["tokens"] for r in ev], [r["val_loss"] for r in ev], "o-", label="val loss", ms=3)
    for a, b in zip(rows, rows[1:]):
        if a.get("stage") != b.get("stage"):
            ax.axvline(a["tokens"], color="grey", ls="--", lw=0.8)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_title(title or " -> ".join(dict.fromkeys(r.get("stage", "") for r in rows)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def find_eval_in_training() -> Callable | None:
    """The eval package's ``evaluate_in_training(model, tokenizer, tasks, limit, batch_size)``
    (``evolm.eval.harness``), or None when this evolm has none."""
    import evolm.eval as ev

    if hasattr(ev, "evaluate_in_training"):
        return ev.evaluate_in_training
    names = ["harness"] + [i.name for i in pkgutil.iter_modules(ev.__path__) if i.name != "harness"]
    for name in names:
        try:
            mod = importlib.import_module(f"evolm.eval.{name}")
        except ImportError:
            continue
        if hasattr(mod, "evaluate_in_training"):
            return mod.evaluate_in_training
    return None


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
def run(model, task: Task, phases: list[Phase], cfg: LoopConfig, out: str | Path, *, tokenizer=None,
        resume: bool = False, rt: Runtime | None = None, log: Callable[[str], None] | None = None,
        stop_after_steps: int | None = None, seed: int | None = None,
        extra_state: dict | None = None) -> dict[str, Any]:
    """Train ``model`` on ``task`` through ``phases``; returns a summary (losses, eval, throughput).

    ``out`` is the run folder (created by the caller or here). ``resume`` continues from the
    latest checkpoint in ``out/checkpoints`` bit for bit. ``stop_after_steps`` ends this call
    early after that many optimizer steps, with a checkpoint (used to test exact resumption).
    ``extra_state`` is stored in each checkpoint's ``trainer.pt`` (e.g. the recipe).
    The model must already be on ``rt.device``; frozen parameters (``requires_grad=False``) are
    left out of the optimizer and of the checkpoints.
    """
    from evolm.train.trainer import Trainer

    trainer = Trainer(model, task, phases, cfg, out, tokenizer=tokenizer, rt=rt, log=log, extra_state=extra_state)
    trainer.restore(resume, seed)
    trainer.wrap()
    stopped_early = trainer.fit(stop_after_steps)
    return trainer.finish(stopped_early)


def promote_final(out: Path) -> None:
    """Copy the final model files to the run folder itself so it loads as a model."""
    final = out / "final"
    for f in final.iterdir():
        shutil.copy2(f, out / f.name)
    shutil.rmtree(final)
