"""The one training loop: pretraining, SFT, DPO and GRPO all step through ``run``.

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

import contextlib
import importlib
import json
import os
import pkgutil
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch

from evolm.train import parallel as par
from evolm.train.optim import SCHEDULES, lr_at, make_optimizer


# --------------------------------------------------------------------------------------------
# the contract
# --------------------------------------------------------------------------------------------
@dataclass
class Phase:
    """One LR phase of ``steps`` optimizer steps (a pretraining stage, or a whole SFT run)."""

    name: str
    steps: int
    accum: int = 1  # micro-batches per optimizer step (per process)
    tokens_per_step: int = 0  # nominal; a task may report the real count via the "tokens" metric
    warmup_steps: int = 0
    schedule: str = "cosine"
    lr_start: float = 1.0  # multipliers of LoopConfig.lr
    lr_end: float = 0.1
    decay_fraction: float = 0.2  # for wsd

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"phase {self.name!r}: steps must be >= 1, got {self.steps}")
        if self.accum < 1:
            raise ValueError(f"phase {self.name!r}: accum must be >= 1, got {self.accum}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"phase {self.name!r}: schedule must be one of {list(SCHEDULES)}, "
                             f"got {self.schedule!r}")


@runtime_checkable
class Task(Protocol):
    def start_phase(self, index: int, phase: Phase) -> None: ...

    def next_batch(self) -> Any: ...

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self, model) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, s: dict) -> None: ...


@dataclass
class LoopConfig:
    """Optimizer, precision, parallelism and bookkeeping of a run (pretraining takes these from
    the recipe's ``optim`` and ``train`` sections; SFT/DPO from command-line flags)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    distributed: str = "none"  # none | ddp | fsdp
    compile: bool = False
    activation_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end of each phase
    sample_every: int = 0  # 0: only at the end
    ckpt_every: int = 200  # 0: only at the end of each phase
    keep_checkpoints: int = 2
    peak_tflops: float | None = None
    eval_tasks: list[str] = field(default_factory=list)  # benchmark names logged at eval steps
    eval_tasks_limit: int | None = None
    eval_tasks_batch_size: int = 8
    eval_at_start: bool = False  # a step-0 row with the held-out metrics of the untrained model

    @classmethod
    def from_recipe(cls, recipe) -> "LoopConfig":
        o, t = recipe.optim, recipe.train
        return cls(lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps, grad_clip=o.grad_clip,
                   dtype=t.dtype, distributed=t.distributed, compile=t.compile,
                   activation_checkpointing=t.activation_checkpointing, log_every=t.log_every,
                   eval_every=t.eval_every, sample_every=t.sample_every, ckpt_every=t.ckpt_every,
                   keep_checkpoints=t.keep_checkpoints, peak_tflops=t.peak_tflops,
                   eval_tasks=list(getattr(t, "eval_tasks", None) or []),
                   eval_tasks_limit=getattr(t, "eval_tasks_limit", None))


@dataclass
class Runtime:
    """Where this process runs: rank, world size, device (from ``torchrun``'s environment)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def create(cls, distributed: str = "none") -> "Runtime":
        rank, world, device = par.init_distributed(distributed)
        return cls(rank, world, device)


# --------------------------------------------------------------------------------------------
# small pieces shared by trainers
# --------------------------------------------------------------------------------------------
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def update_moe_bias(model) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing (arXiv:2412.19437 sec. 2.1.2): after each step,
    nudge every router's expert bias against that expert's load. A no-op for other models."""
    for layer in getattr(model, "layers", []):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is not None and getattr(gate, "e_score_correction_bias", None) is not None \
                and getattr(layer.mlp, "expert_counts", None) is not None:
            gate.update_bias(layer.mlp.expert_counts)


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


def _save_partial(state: dict, path: Path, trainer_state: dict) -> None:
    """A checkpoint of a partly frozen model: the trainable tensors + trainer state, atomically."""
    from safetensors.torch import save_file

    from evolm.checkpoint import TRAINER, _atomic_dir

    with _atomic_dir(str(path)) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                  os.path.join(tmp, "trainable.safetensors"), metadata={"format": "pt"})
        torch.save(trainer_state, os.path.join(tmp, TRAINER))


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
    t_start = time.time()
    rt = rt or Runtime.create(cfg.distributed)
    main = rt.main
    say = (log or print) if main else (lambda s: None)
    out = Path(out)
    if not phases:
        raise ValueError("run: needs at least one Phase")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"LoopConfig.dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    eval_fn = None
    if cfg.eval_tasks:
        eval_fn = find_eval_in_training()
        if eval_fn is None:
            raise ValueError(f"train.eval_tasks={cfg.eval_tasks}: this evolm has no "
                             "evolm.eval.*.evaluate_in_training; remove eval_tasks from the recipe")
        if cfg.distributed == "fsdp":
            raise ValueError("train.eval_tasks needs the whole model on one process; it does not run with "
                             "distributed: fsdp (use ddp, or evaluate the saved checkpoints with evolm eval)")

    ckpt_path = latest_checkpoint(out) if resume else None
    if resume and ckpt_path is None:
        say(f"--resume: no checkpoint in {out}/checkpoints; starting from scratch")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt_path is None and (out / "checkpoints").exists():
            shutil.rmtree(out / "checkpoints")  # a fresh run in an old folder
    par.barrier(rt.world)
    if seed is not None:
        seed_all(seed)

    raw = model  # the plain module: sampling, evaluation and checkpoints use it
    partial = not all_trainable(raw)
    phase_idx, phase_step, global_step, tokens_seen = 0, 0, 0, 0
    trainer_state = None
    if ckpt_path is not None:
        from evolm.checkpoint import load_trainer_state
        from safetensors.torch import load_file

        trainer_state = load_trainer_state(str(ckpt_path))
        phase_idx, phase_step = trainer_state["phase_idx"], trainer_state["phase_step"]
        global_step, tokens_seen = trainer_state["global_step"], trainer_state["tokens"]
        task.start_phase(phase_idx, phases[phase_idx])
        task.load_state_dict(trainer_state["task"])
        wfile = ckpt_path / ("trainable.safetensors" if partial else "model.safetensors")
        if not wfile.is_file():
            raise FileNotFoundError(f"{ckpt_path}: missing {wfile.name}; was this checkpoint written by a "
                                    f"{'full' if partial else 'partly frozen (LoRA)'} run?")
        raw.load_state_dict(load_file(str(wfile)), strict=False)
        say(f"resuming from {ckpt_path.name}: phase {phases[phase_idx].name}, step {global_step}")

    net = par.parallelize(raw, cfg.distributed, rt.world, rt.device, compile=cfg.compile,
                          activation_checkpointing=cfg.activation_checkpointing)
    optimizer = make_optimizer(raw, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps)
    if trainer_state is not None:
        par.load_optimizer_state(net, optimizer, trainer_state["optimizer"], cfg.distributed)
        set_rng_state(trainer_state["rng"])
    trainable = [p for p in net.parameters() if p.requires_grad]

    metrics = MetricsLog(out, global_step if trainer_state is not None else None, main)
    autocast = (torch.autocast(rt.device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16"
                else contextlib.nullcontext())
    peak, peak_note = peak_flops(rt.device, cfg.dtype, cfg.peak_tflops)
    if hasattr(task, "flops_per_token"):
        say(f"MFU against {peak / 1e12:.2f} TFLOP/s ({peak_note})")
    eval_net = raw if cfg.distributed != "fsdp" else net

    def evaluate() -> dict[str, float]:
        was = net.training
        net.eval()
        with torch.no_grad(), autocast:
            res = dict(task.evaluate(eval_net))
            if eval_fn is not None and main:
                res.update(eval_fn(raw, tokenizer, cfg.eval_tasks, cfg.eval_tasks_limit, cfg.eval_tasks_batch_size))
        net.train(was)
        return res

    def samples() -> list[tuple[str, str]]:
        if not main or cfg.distributed == "fsdp" or not hasattr(task, "samples"):
            return []
        was = raw.training
        raw.eval()
        try:
            return list(task.samples(raw))
        finally:
            raw.train(was)

    def save(step_dir: Path, pi: int, ps: int, task_state: dict) -> None:
        msd, osd = par.full_state_dicts(net, optimizer, cfg.distributed)
        if main:
            state = {"phase_idx": pi, "phase_step": ps, "global_step": global_step, "tokens": tokens_seen,
                     "task": task_state, "optimizer": osd, "rng": rng_state(), **(extra_state or {})}
            if partial:
                _save_partial(trainable_state(raw, msd), step_dir, state)
            else:
                save_model_folder(raw, msd, step_dir, state, tokenizer)
            ckpts = sorted(p for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
            for old in ckpts[:-max(1, cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        par.barrier(rt.world)

    progress = Progress(sum(p.steps for p in phases), global_step, enabled=main and sys.stdout.isatty())
    last_train_loss, last_eval, initial_eval = float("nan"), {}, None
    steps_this_call = 0
    throughput: list[float] = []
    stopped_early = False
    net.train()

    for pi in range(phase_idx, len(phases)):
        phase = phases[pi]
        resumed_here = pi == phase_idx and trainer_state is not None
        if not resumed_here:
            task.start_phase(pi, phase)
        first = phase_step if pi == phase_idx else 0
        if cfg.eval_at_start and global_step == 0:
            initial_eval = evaluate()
            metrics.write({"step": 0, "stage": phase.name, "tokens": 0, **initial_eval})
            say("before training: " + " ".join(f"{k} {v:.4f}" for k, v in initial_eval.items()))
        flops_per_token = task.flops_per_token(phase) if hasattr(task, "flops_per_token") else None
        for step in range(first, phase.steps):
            t0 = time.perf_counter()
            lr = cfg.lr * lr_at(step, phase.steps, phase.warmup_steps, phase.schedule, phase.lr_end,
                                phase.decay_fraction, phase.lr_start)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum, extra_sums, step_tokens = 0.0, {}, None
            for micro in range(phase.accum):
                batch = task.next_batch()
                sync = (micro == phase.accum - 1) or not hasattr(net, "no_sync")
                with (contextlib.nullcontext() if sync else net.no_sync()):
                    with autocast:
                        loss, extra = task.loss(net, batch)
                    (loss / phase.accum).backward()
                loss_sum += float(loss.detach())
                for k, v in (extra or {}).items():
                    if k == "tokens":
                        step_tokens = (step_tokens or 0) + int(v)
                    else:
                        extra_sums[k] = extra_sums.get(k, 0.0) + float(v)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)) \
                if cfg.grad_clip else float("nan")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if hasattr(task, "after_step"):
                task.after_step(raw)
            dt = time.perf_counter() - t0
            global_step += 1
            done_in_phase = step + 1
            steps_this_call += 1
            if step_tokens is not None:
                step_tokens = int(par.all_reduce_sum([float(step_tokens)], rt.world)[0])
            else:
                step_tokens = phase.tokens_per_step
            tokens_seen += step_tokens
            last_train_loss = par.all_reduce_mean(loss_sum / phase.accum, rt.world)
            extras = {}
            if extra_sums:
                names = sorted(extra_sums)
                vals = par.all_reduce_sum([extra_sums[k] / phase.accum for k in names], rt.world)
                extras = {k: v / rt.world for k, v in zip(names, vals)}
            tps = step_tokens / dt
            throughput.append(tps)
            progress.update(global_step, last_train_loss, lr, tps)

            def base_row() -> dict:
                r = {"step": global_step, "stage": phase.name, "loss": last_train_loss, "lr": lr,
                     "grad_norm": grad_norm, "tokens": tokens_seen, "tokens_per_s": tps}
                if flops_per_token is not None:
                    r["mfu"] = flops_per_token * tps / peak
                r.update(extras)
                return r

            row = None
            if global_step % max(1, cfg.log_every) == 0 or step == 0 or done_in_phase == phase.steps:
                row = base_row()
            if (cfg.eval_every and global_step % cfg.eval_every == 0) or done_in_phase == phase.steps:
                last_eval = evaluate()
                row = row or base_row()
                row.update(last_eval)
            if row is not None:
                metrics.write(row)
                if not progress.enabled:
                    msg = (f"step {global_step:>5} [{phase.name}] loss {last_train_loss:.4f} lr {lr:.2e} "
                           f"{tps:,.0f} tok/s")
                    if "mfu" in row:
                        msg += f" mfu {100 * row['mfu']:.1f}%"
                    if "val_loss" in row:
                        msg += f" | val loss {row['val_loss']:.4f}"
                        if "val_ppl" in row:
                            msg += f" ppl {row['val_ppl']:.1f}"
                    for k, v in row.items():
                        if k.startswith("val_") and k not in ("val_loss", "val_ppl") \
                                and not k.startswith("val_loss_"):
                            msg += f" {k} {v:.4f}"
                    say(msg)
            if cfg.sample_every and global_step % cfg.sample_every == 0:
                for p, text in samples():
                    say(f"  sample | {p}{text!r}")
            step_dir = out / "checkpoints" / f"step_{global_step:07d}"
            if (cfg.ckpt_every and global_step % cfg.ckpt_every == 0) or done_in_phase == phase.steps:
                save(step_dir, pi, done_in_phase, task.state_dict())
            if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                if not step_dir.exists():
                    save(step_dir, pi, done_in_phase, task.state_dict())
                stopped_early = True
                break
        if stopped_early:
            break
        phase_step = 0
    progress.close()

    summary = {"run_dir": str(out), "steps": global_step, "tokens": tokens_seen, "train_loss": last_train_loss,
               **last_eval, "tokens_per_s": float(np.median(throughput)) if throughput else 0.0,
               "stopped_early": stopped_early, "losses": [r["loss"] for r in metrics.rows if "loss" in r],
               "peak_note": peak_note, "samples": []}
    if initial_eval is None and metrics.rows and metrics.rows[0]["step"] == 0:  # resumed: from the log
        initial_eval = {k: v for k, v in metrics.rows[0].items() if k not in ("step", "stage", "tokens")}
    summary["initial_eval"] = initial_eval
    if not stopped_early:  # gathering the full state is a collective: every rank takes part
        msd, _ = par.full_state_dicts(net, optimizer, cfg.distributed)
    if main and not stopped_early:
        summary["samples"] = samples()
        for p, text in summary["samples"]:
            say(f"  sample | {p}{text!r}")
        if hasattr(task, "save_final"):
            task.save_final(raw, msd, out)
        else:
            save_model_folder(raw, msd, out / "final", None, tokenizer)
            promote_final(out)
        plot_losses(metrics.rows, out / "loss.png")
    summary["wall_s"] = time.time() - t_start
    summary["rows"] = list(metrics.rows)
    metrics.close()
    par.barrier(rt.world)
    return summary


def promote_final(out: Path) -> None:
    """Copy the final model files to the run folder itself so it loads as a model."""
    final = out / "final"
    for f in final.iterdir():
        shutil.copy2(f, out / f.name)
    shutil.rmtree(final)
