"""The Trainer: one object that owns a run's moving parts, one short method per job.

``loop.run`` drives it: :meth:`Trainer.restore` (the run folder and, on ``--resume``, the
weights, task position and counters of the latest checkpoint), :meth:`Trainer.wrap` (DDP/FSDP2
applied from outside the model, as torchtitan does, then the optimizer), :meth:`Trainer.fit`
(phases of :meth:`Trainer.step`, each followed by :meth:`Trainer.log`, :meth:`Trainer.evaluate`
and :meth:`Trainer.checkpoint` when due) and :meth:`Trainer.finish` (final save, samples, plot,
summary). The contract a task fulfils and the checkpoint layout are described in ``loop.py``.

The order of work is the order of the single function this replaced, call for call, so random
draws, collectives and files are the same and a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from evolm.checkpoint import CheckpointError, check_weights, load_trainer_state, read_weights, readable_checkpoint
from evolm.parallel import checkpoint as dckpt
from evolm.parallel.expert import clip_grad_norm_
from evolm.train import parallel as par
from evolm.train.config import LoopConfig, Phase
from evolm.train.freeze import freeze
from evolm.train.loop import (MetricsLog, Progress, Runtime, Task, all_trainable, find_eval_in_training,
                              latest_checkpoint, peak_flops, plot_losses, promote_final, rng_state,
                              save_model_folder, save_trainable_folder, seed_all, set_rng_state, tokenizer_files,
                              trainable_state)
from evolm.train.optim import lr_at, make_optimizer


@dataclass
class StepStats:
    """What one optimizer step measured on this process, before the ranks are reduced."""

    lr: float
    loss_sum: float  # over the micro-batches
    extra_sums: dict[str, float]
    tokens: int | None  # the task's "tokens" metric, None when it reports none
    grad_norm: float
    seconds: float


class Trainer:
    """Trains ``model`` on ``task`` through ``phases`` (see ``loop.run`` for the arguments)."""

    def __init__(self, model, task: Task, phases: list[Phase], cfg: LoopConfig, out: str | Path, *,
                 tokenizer=None, rt: Runtime | None = None, log: Callable[[str], None] | None = None,
                 extra_state: dict | None = None):
        self.t_start = time.time()
        self.rt = rt or Runtime.create(cfg.distributed, cfg.parallel)
        self.say = (log or print) if self.rt.main else (lambda s: None)
        self.model, self.task, self.phases, self.cfg = model, task, phases, cfg  # model: the plain module
        self.out, self.tokenizer, self.extra_state = Path(out), tokenizer, extra_state or {}
        self.benchmarks = _check(phases, cfg, self.rt)
        if cfg.freeze:  # a stage that trains only some parts (train/freeze.py)
            n = freeze(model, cfg.freeze)
            self.say(f"frozen ({', '.join(cfg.freeze)}): {n:,} parameters")
        self.partial = not all_trainable(model)  # a LoRA-like run: checkpoints hold the trainable part
        self.from_phase, self.from_step = 0, 0  # where this call starts (a resume moves it)
        self.global_step, self.tokens = 0, 0
        self.resumed: dict | None = None  # the checkpoint's trainer state
        self.resumed_from: Path | None = None  # ... and its folder; for a sharded one, each rank's state:
        self.rank_states: list[dict] = []  # data-parallel rank and degree, task position, RNG
        self.steps_this_call, self.throughput, self.mfus = 0, [], []
        self.last_train_loss, self.last_eval, self.initial_eval = float("nan"), {}, None
        self.pipe = None  # this rank's pipeline stages when the layout has pp > 1 (set by wrap)

    # --- restore ---------------------------------------------------------------------------
    def restore(self, resume: bool, seed: int | None = None) -> None:
        """Prepare the run folder; on ``resume`` load the latest checkpoint's weights, task data
        position and counters (the optimizer and RNG follow in :meth:`wrap`)."""
        ckpt = latest_checkpoint(self.out) if resume else None
        if resume and ckpt is None:
            self.say(f"--resume: no checkpoint in {self.out}/checkpoints; starting from scratch")
        if self.rt.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if ckpt is None and (self.out / "checkpoints").exists():
                shutil.rmtree(self.out / "checkpoints")  # a fresh run in an old folder
        par.barrier(self.rt.world)
        if seed is not None:
            seed_all(seed)
        if ckpt is not None:
            self._load(ckpt)

    def _load(self, ckpt: Path) -> None:
        try:
            self._load_checkpoint(ckpt)
        except CheckpointError as e:
            raise CheckpointError(f"{e}\n{_previous_good(ckpt)}") from None

    def _load_checkpoint(self, ckpt: Path) -> None:
        s = self.resumed = load_trainer_state(str(ckpt))
        sharded = s.get("format") == dckpt.FORMAT
        need = ("phase_idx", "phase_step", "global_step", "tokens") + (() if sharded else ("task", "optimizer", "rng"))
        missing = [k for k in need if k not in s]
        if missing:
            raise CheckpointError(f"{ckpt / 'trainer.pt'}: no {', '.join(missing)}; not written by an evolm trainer")
        self.from_phase, self.from_step = s["phase_idx"], s["phase_step"]
        self.global_step, self.tokens = s["global_step"], s["tokens"]
        self.task.start_phase(self.from_phase, self.phases[self.from_phase])
        self.task.load_state_dict(self._task_state(ckpt, s, sharded))
        if sharded:  # model and optimizer follow in wrap(), into the sharded modules
            self.resumed_from = ckpt
        else:
            self._load_full_weights(ckpt)
        self.say(f"resuming from {ckpt.name}: phase {self.phases[self.from_phase].name}, step {self.global_step}")

    def _task_state(self, ckpt: Path, s: dict, sharded: bool) -> dict:
        """This rank's data position: its own data-parallel rank's under the same degree; under
        another the task re-derives it or the resume stops (``dckpt.data_state``). A full
        checkpoint holds rank 0's position, which stands for every rank of the global-plan samplers."""
        dp_rank, dp_degree = self.data_parallel()
        if sharded:
            self.rank_states = dckpt.read_rank_states(ckpt)
            states = self.rank_states
        else:
            saved = s.get("data_parallel", dp_degree)  # absent before 2026-12: taken as unchanged
            if saved == dp_degree:
                return s["task"]
            states = [{"dp_rank": r, "dp_degree": saved, "task": s["task"]} for r in range(saved)]
        return dckpt.data_state(states, dp_rank, dp_degree, self.task, str(ckpt))

    def _load_full_weights(self, ckpt: Path) -> None:
        wfile = ckpt / ("trainable.safetensors" if self.partial else "model.safetensors")
        if not wfile.is_file():
            raise FileNotFoundError(f"{ckpt}: missing {wfile.name}; was this checkpoint written by a "
                                    f"{'full' if self.partial else 'partly frozen (LoRA)'} run?")
        state = read_weights(str(wfile))
        expected = set(trainable_state(self.model, self.model.state_dict())) if self.partial else None
        check_weights(self.model, state, str(wfile), expected=expected)
        self.model.load_state_dict(state, strict=False)  # checked above; a tied head is not stored

    def _stateful(self):
        """The module whose state a sharded checkpoint holds: the wrapped model, or under pipeline
        parallelism this rank's stage (its parameters keep the whole model's names)."""
        return dckpt.stateful(getattr(self, "pipe", None) or self.net)

    def data_parallel(self) -> tuple[int, int]:
        """(data-parallel rank, degree) of this process: the ranks that see different data (those
        of one tensor/context/pipeline group share theirs)."""
        return self.rt.dp_rank, self.rt.dp_world

    def _restore_optimizer(self) -> None:
        """The resumed run's optimizer state (and, for a sharded checkpoint, the model's) and RNG."""
        s = self.resumed
        if s.get("format") != dckpt.FORMAT:
            if self.pipe is not None:  # the stages' entries of the gathered state (parallel/pipeline.py)
                from evolm.parallel import pipeline as pp

                pp.load_optimizer_state(self.pipe, self.optimizer, s["optimizer"])
            else:
                par.load_optimizer_state(self.net, self.optimizer, s["optimizer"], self.rt.sharded)
            set_rng_state(s["rng"])
            return
        try:
            dckpt.load(self._stateful(), self.optimizer, self.resumed_from, partial=self.partial)
        except CheckpointError as e:
            raise CheckpointError(f"{e}\n{_previous_good(self.resumed_from)}") from None
        same = len(self.rank_states) == self.rt.world  # each rank its own generators; else rank 0's
        set_rng_state(self.rank_states[self.rt.rank if same else 0]["rng"])

    # --- wrap ------------------------------------------------------------------------------
    def wrap(self) -> None:
        """The run's parallel layout (DDP, FSDP2, tensor parallel ...: ``evolm.parallel.parallelize``),
        compile and activation checkpointing from outside the model; AdamW over the trainable
        parameters; a resumed run gets its optimizer and RNG state back."""
        from evolm.parallel import parallelize
        from evolm.parallel import pipeline as pp

        cfg, rt = self.cfg, self.rt
        self.net = parallelize(self.model, rt.layout, rt.mesh, device=rt.device, compile=cfg.compile,
                               activation_checkpointing=cfg.activation_checkpointing)
        self.pipe = self.net if isinstance(self.net, pp.Pipeline) else None  # pipeline stages (parallel/pipeline.py)
        self.optimizer = make_optimizer(self.pipe.module if self.pipe else self.model, lr=cfg.lr, betas=cfg.betas,
                                        weight_decay=cfg.weight_decay, eps=cfg.eps)
        if self.resumed is not None:
            self._restore_optimizer()
        self.trainable = [p for p in self.net.parameters() if p.requires_grad]
        self.autocast = (torch.autocast(self.rt.device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16"
                         else contextlib.nullcontext())
        self.eval_net = self.net if rt.sharded else self.model  # FSDP/TP: the shards must work together
        if self.pipe is not None:  # the stages compute the loss together
            self.eval_net = pp.PipelineLM(self.pipe)

    # --- fit -------------------------------------------------------------------------------
    def fit(self, stop_after_steps: int | None = None) -> bool:
        """Every remaining phase; True when ``stop_after_steps`` ended this call early."""
        self._open_logs()
        self.net.train()
        for pi in range(self.from_phase, len(self.phases)):
            if self._fit_phase(pi, stop_after_steps):
                return True
        return False

    def _open_logs(self) -> None:
        self.metrics = MetricsLog(self.out, self.global_step if self.resumed is not None else None, self.rt.main)
        self.peak, self.peak_note = peak_flops(self.rt.device, self.cfg.dtype, self.cfg.peak_tflops)
        if hasattr(self.task, "flops_per_token"):
            self.say(f"MFU against {self.peak / 1e12:.2f} TFLOP/s ({self.peak_note})")
        total = sum(p.steps for p in self.phases)
        self.progress = Progress(total, self.global_step, enabled=self.rt.main and sys.stdout.isatty())

    def _fit_phase(self, pi: int, stop_after_steps: int | None) -> bool:
        phase = self.phases[pi]
        continuing = pi == self.from_phase
        if not (continuing and self.resumed is not None):
            self.task.start_phase(pi, phase)
        if self.cfg.eval_at_start and self.global_step == 0:
            self._evaluate_untrained(phase)
        fpt = self.task.flops_per_token(phase) if hasattr(self.task, "flops_per_token") else None
        for step in range(self.from_step if continuing else 0, phase.steps):
            row = self._reduce(phase, self.step(phase, step), fpt)
            if self._after_step(pi, step + 1, row, stop_after_steps):
                return True
        return False

    def _after_step(self, pi: int, done: int, row: dict[str, Any], stop_after_steps: int | None) -> bool:
        """Log, evaluate, sample and checkpoint when due; True when this call stops here."""
        end = done == self.phases[pi].steps
        logged = self._due(max(1, self.cfg.log_every)) or done == 1 or end
        if self._due(self.cfg.eval_every) or end:
            self.last_eval = self.evaluate()
            row.update(self.last_eval)
            logged = True
        if logged:
            self.log(row)
        if self._due(self.cfg.sample_every):
            self._print_samples(self.samples())
        step_dir = self.out / "checkpoints" / f"step_{self.global_step:07d}"
        if self._due(self.cfg.ckpt_every) or end:
            self.checkpoint(step_dir, pi, done)
        if stop_after_steps is None or self.steps_this_call < stop_after_steps:
            return False
        if not step_dir.exists():
            self.checkpoint(step_dir, pi, done)
        return True

    def _due(self, every: int) -> bool:
        return bool(every) and self.global_step % every == 0

    # --- step ------------------------------------------------------------------------------
    def step(self, phase: Phase, step: int) -> StepStats:
        """One optimizer step: the phase's LR, ``accum`` micro-batches under autocast (gradients
        averaged, DDP syncing only on the last), clipping, AdamW, then the task's ``after_step``
        hook (DeepSeek-V3's router bias update) on the plain module."""
        t0 = time.perf_counter()
        lr = self.cfg.lr * lr_at(step, phase.steps, phase.warmup_steps, phase.schedule, phase.lr_end,
                                 phase.decay_fraction, phase.lr_start)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if self.pipe is not None:
            return self._pipeline_step(phase, lr, t0)
        loss_sum, extra_sums, tokens = self._accumulate(phase.accum)
        grad_norm = float(clip_grad_norm_(self.trainable, self.cfg.grad_clip)) if self.cfg.grad_clip else float("nan")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.task, "after_step"):
            self.task.after_step(self.model)
        return StepStats(lr, loss_sum, extra_sums, tokens, grad_norm, time.perf_counter() - t0)

    def _pipeline_step(self, phase: Phase, lr: float, t0: float) -> StepStats:
        """:meth:`step` under pipeline parallelism (parallel/pipeline.py): the ``accum``
        micro-batches run as one schedule (only the last stage has the loss; it comes back to
        every rank for the log), the gradient norm is the global one over all stages, and the
        after-step hook is the router bias update of this rank's own layers."""
        from evolm.parallel import pipeline as pp

        batches = [self.task.next_batch() for _ in range(phase.accum)]
        with self.autocast:
            loss = pp.step_examples(self.pipe, batches)
        grad_norm = pp.clip_grad_norm_(self.pipe, self.cfg.grad_clip) if self.cfg.grad_clip else float("nan")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        pp.update_router_bias(self.pipe, self.rt.dp_group)
        return StepStats(lr, loss * phase.accum, {}, None, grad_norm, time.perf_counter() - t0)

    def _full_state(self) -> tuple[dict, dict]:
        """The unsharded model and optimizer state (a collective: every rank calls it)."""
        if self.pipe is not None:
            from evolm.parallel import pipeline as pp

            return pp.full_state_dicts(self.pipe, self.optimizer)
        return par.full_state_dicts(self.net, self.optimizer, self.rt.sharded)

    def _accumulate(self, accum: int) -> tuple[float, dict[str, float], int | None]:
        loss_sum, extra_sums, tokens = 0.0, {}, None
        for micro in range(accum):
            batch = self.task.next_batch()
            sync = (micro == accum - 1) or not hasattr(self.net, "no_sync")
            with (contextlib.nullcontext() if sync else self.net.no_sync()):
                with self.autocast:
                    loss, extra = self.task.loss(self.net, batch)
                (loss / accum).backward()
            loss_sum += float(loss.detach())
            for k, v in (extra or {}).items():
                if k == "tokens":
                    tokens = (tokens or 0) + int(v)
                else:
                    extra_sums[k] = extra_sums.get(k, 0.0) + float(v)
        return loss_sum, extra_sums, tokens

    def _reduce(self, phase: Phase, s: StepStats, flops_per_token: float | None) -> dict[str, Any]:
        """Count the step, average its figures over the ranks: the metrics row of this step."""
        self.global_step += 1
        self.steps_this_call += 1
        # over the data-parallel ranks: those of one tp/cp/pp group saw the same batch
        world, group = self.rt.dp_world, self.rt.dp_group
        tokens = int(par.all_reduce_sum([float(s.tokens)], world, group)[0]) if s.tokens is not None \
            else phase.tokens_per_step
        self.tokens += tokens
        self.last_train_loss = par.all_reduce_mean(s.loss_sum / phase.accum, world, group)
        names = sorted(s.extra_sums)
        extras = {}
        if names:
            vals = par.all_reduce_sum([s.extra_sums[k] / phase.accum for k in names], world, group)
            extras = {k: v / world for k, v in zip(names, vals)}
        tps = tokens / s.seconds
        self.throughput.append(tps)
        self.progress.update(self.global_step, self.last_train_loss, s.lr, tps)
        row = {"step": self.global_step, "stage": phase.name, "loss": self.last_train_loss, "lr": s.lr,
               "grad_norm": s.grad_norm, "tokens": self.tokens, "tokens_per_s": tps}
        if flops_per_token is not None:
            row["mfu"] = flops_per_token * tps / self.peak
            self.mfus.append(row["mfu"])
        return {**row, **extras}

    # --- log -------------------------------------------------------------------------------
    def log(self, row: dict[str, Any]) -> None:
        """One metrics row to ``metrics.jsonl`` + TensorBoard, and a console line without a bar."""
        self.metrics.write(row)
        if not self.progress.enabled:
            self.say(console_line(row))

    # --- evaluate --------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """The task's held-out metrics (+ the benchmark hook's on rank 0), in eval mode."""
        was = self.net.training
        self.net.eval()
        with torch.no_grad(), self.autocast:
            res = dict(self.task.evaluate(self.eval_net))
            if self.benchmarks is not None and self.rt.main:
                cfg = self.cfg
                res.update(self.benchmarks(self.model, self.tokenizer, cfg.eval_tasks, cfg.eval_tasks_limit,
                                           cfg.eval_tasks_batch_size))
        self.net.train(was)
        return res

    def _evaluate_untrained(self, phase: Phase) -> None:
        self.initial_eval = self.evaluate()
        self.metrics.write({"step": 0, "stage": phase.name, "tokens": 0, **self.initial_eval})
        self.say("before training: " + " ".join(f"{k} {v:.4f}" for k, v in self.initial_eval.items()))

    def samples(self) -> list[tuple[str, str]]:
        """The task's sampled continuations, on rank 0 from the plain module (none when the
        parameters are sharded: FSDP, tensor parallel ...)."""
        if not self.rt.main or self.rt.sharded or not hasattr(self.task, "samples"):
            return []
        was = self.model.training
        self.model.eval()
        try:
            return list(self.task.samples(self.model))
        finally:
            self.model.train(was)

    def _print_samples(self, samples: list[tuple[str, str]]) -> None:
        for p, text in samples:
            self.say(f"  sample | {p}{text!r}")

    # --- checkpoint ------------------------------------------------------------------------
    def checkpoint(self, step_dir: Path, pi: int, phase_step: int) -> None:
        """Weights (all, or the trainable part) + ``trainer.pt``, atomically; older ones pruned.
        ``ckpt_format: full`` gathers the full state (a collective) and rank 0 writes it; ``dcp``
        has every rank write its shards and its own data position and RNG. Every rank calls this."""
        task_state = self.task.state_dict()
        dp_rank, dp_degree = self.data_parallel()
        progress = {"phase_idx": pi, "phase_step": phase_step, "global_step": self.global_step,
                    "tokens": self.tokens, "data_parallel": dp_degree, **self.extra_state}
        if self.cfg.ckpt_format == dckpt.FORMAT:
            rank_state = {"dp_rank": dp_rank, "dp_degree": dp_degree, "task": task_state, "rng": rng_state()}
            files = {"config.json": _config_json(self.model), **tokenizer_files(self.tokenizer)}
            dckpt.save(self._stateful(), self.optimizer, step_dir, progress=progress, rank_state=rank_state,
                       rank=self.rt.rank, world=self.rt.world, partial=self.partial, files=files)
        else:
            msd, osd = self._full_state()
            if self.rt.main:
                state = {**progress, "task": task_state, "optimizer": osd, "rng": rng_state()}
                if self.partial:
                    save_trainable_folder(trainable_state(self.model, msd), step_dir, state)
                else:
                    save_model_folder(self.model, msd, step_dir, state, self.tokenizer)
        if self.rt.main:
            ckpts = sorted(p for p in (self.out / "checkpoints").iterdir() if p.name.startswith("step_"))
            for old in ckpts[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        par.barrier(self.rt.world)

    # --- finish ----------------------------------------------------------------------------
    def finish(self, stopped_early: bool) -> dict[str, Any]:
        """The final model (unless stopped early), samples and loss plot; returns the summary."""
        self.progress.close()
        summary = self._summary(stopped_early)
        if not stopped_early:  # gathering the full state is a collective: every rank takes part
            msd, _ = self._full_state()
        if self.rt.main and not stopped_early:
            summary["samples"] = self.samples()
            self._print_samples(summary["samples"])
            self._save_final(msd)
            plot_losses(self.metrics.rows, self.out / "loss.png")
        summary["wall_s"] = time.time() - self.t_start
        summary["rows"] = list(self.metrics.rows)
        self.metrics.close()
        par.barrier(self.rt.world)
        return summary

    def _save_final(self, msd: dict) -> None:
        if hasattr(self.task, "save_final"):
            self.task.save_final(self.model, msd, self.out)
        else:
            save_model_folder(self.model, msd, self.out / "final", None, self.tokenizer)
            promote_final(self.out)

    def _summary(self, stopped_early: bool) -> dict[str, Any]:
        rows = self.metrics.rows
        initial = self.initial_eval
        if initial is None and rows and rows[0]["step"] == 0:  # resumed: from the log
            initial = {k: v for k, v in rows[0].items() if k not in ("step", "stage", "tokens")}
        return {"run_dir": str(self.out), "steps": self.global_step, "tokens": self.tokens,
                "train_loss": self.last_train_loss, **self.last_eval,
                "tokens_per_s": float(np.median(self.throughput)) if self.throughput else 0.0,
                "mfu": float(np.median(self.mfus)) if self.mfus else None,
                "stopped_early": stopped_early, "losses": [r["loss"] for r in rows if "loss" in r],
                "peak_note": self.peak_note, "samples": [], "initial_eval": initial}


def _previous_good(ckpt: Path) -> str:
    """What to do about a damaged checkpoint: the newest older one that reads cleanly, if any.
    Nothing is deleted for the user: a half-written file may still be worth a look."""
    older = sorted((p for p in ckpt.parent.iterdir() if p.name.startswith("step_") and p.name < ckpt.name),
                   reverse=True)
    for p in older:
        if readable_checkpoint(str(p)):
            return f"the previous checkpoint {p} reads cleanly: move {ckpt.name} out of {ckpt.parent} and resume again"
    return f"no older checkpoint in {ckpt.parent} reads cleanly: start the run again without --resume"


def _config_json(model) -> str:
    import json

    return json.dumps({"format": "evolm", "model": model.config.to_dict()}, indent=2)


def _check(phases: list[Phase], cfg: LoopConfig, rt) -> Callable | None:
    """Refuse what cannot run before any work; the benchmark hook when ``eval_tasks`` asks for it."""
    if not phases:
        raise ValueError("run: needs at least one Phase")
    if cfg.ckpt_format not in ("full", dckpt.FORMAT):
        raise ValueError(f"train.ckpt_format must be full or dcp, got {cfg.ckpt_format!r}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"LoopConfig.dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    if not cfg.eval_tasks:
        return None
    hook = find_eval_in_training()
    if hook is None:
        raise ValueError(f"train.eval_tasks={cfg.eval_tasks}: this evolm has no "
                         "evolm.eval.*.evaluate_in_training; remove eval_tasks from the recipe")
    if rt.sharded:
        raise ValueError(f"train.eval_tasks needs the whole model on one process; it does not run with "
                         f"sharded parameters ({rt.layout.describe()}: use ddp, or evaluate the saved "
                         f"checkpoints with evolm eval)")
    return hook


def console_line(row: dict[str, Any]) -> str:
    """A metrics row as one log line: step, stage, loss, LR, throughput, MFU, held-out figures."""
    msg = (f"step {row['step']:>5} [{row['stage']}] loss {row['loss']:.4f} lr {row['lr']:.2e} "
           f"{row['tokens_per_s']:,.0f} tok/s")
    if "mfu" in row:
        msg += f" mfu {100 * row['mfu']:.1f}%"
    if "val_loss" in row:
        msg += f" | val loss {row['val_loss']:.4f}"
        if "val_ppl" in row:
            msg += f" ppl {row['val_ppl']:.1f}"
    for k, v in row.items():
        if k.startswith("val_") and k not in ("val_loss", "val_ppl") and not k.startswith("val_loss_"):
            msg += f" {k} {v:.4f}"
    return msg
