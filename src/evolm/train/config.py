"""The typed settings of a training run, each field declared once.

A recipe's sections are these classes extended: ``optim`` *is* :class:`OptimConfig`, ``train`` is
:class:`LoopSettings` plus the pretraining-only keys, a stage is :class:`LRShape` plus its data and
RoPE keys (``recipe.py``). So :meth:`LoopConfig.from_recipe` and ``StagePlan.phase`` copy by the
field lists of these classes, never by hand, and a knob added here reaches the recipe, its
validation and the loop at once. SFT and DPO fill :class:`LoopConfig` from command-line flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from evolm.train.optim import SCHEDULES


def values_of(source: Any, declared: type) -> dict[str, Any]:
    """``source``'s values for the fields that the dataclass ``declared`` declares."""
    return {f.name: getattr(source, f.name) for f in dataclasses.fields(declared)}


@dataclass(kw_only=True)
class LRShape:
    """The learning-rate shape of one phase (``optim.lr_at``): multipliers of the base LR."""

    schedule: str = "cosine"
    warmup_steps: int = 0
    lr_start: float = 1.0
    lr_end: float = 0.1
    decay_fraction: float = 0.2  # for wsd


@dataclass
class Phase(LRShape):
    """One LR phase of ``steps`` optimizer steps (a pretraining stage, or a whole SFT run)."""

    name: str
    steps: int
    accum: int = 1  # micro-batches per optimizer step (per process)
    tokens_per_step: int = 0  # nominal; a task may report the real count via the "tokens" metric

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"phase {self.name!r}: steps must be >= 1, got {self.steps}")
        if self.accum < 1:
            raise ValueError(f"phase {self.name!r}: accum must be >= 1, got {self.accum}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"phase {self.name!r}: schedule must be one of {list(SCHEDULES)}, "
                             f"got {self.schedule!r}")


@dataclass
class OptimConfig:
    """AdamW and gradient clipping (a recipe's ``optim`` section)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class LoopSettings:
    """Precision, parallelism and bookkeeping (the loop's part of a recipe's ``train`` section)."""

    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    distributed: str = "none"  # none | ddp | fsdp (launch with torchrun)
    compile: bool = False
    activation_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end of each phase
    sample_every: int = 0  # 0: only at the end
    ckpt_every: int = 200  # 0: only at the end of each phase
    keep_checkpoints: int = 2
    # full: rank 0 writes the gathered model.safetensors + optimizer; dcp: every rank writes its
    # shards (torch.distributed.checkpoint, parallel/checkpoint.py), resumable under another layout
    ckpt_format: str = "full"
    peak_tflops: float | None = None  # for MFU; None: a stated estimate for the device
    eval_tasks: list[str] = field(default_factory=list)  # benchmarks (evolm eval names) logged at eval steps
    eval_tasks_limit: int | None = None  # examples per benchmark at each eval
    # parts kept fixed in this run (train/freeze.py): "text", "cross", "vision", "projector" or
    # parameter-name patterns; Llama 3.2 Vision's first stage freezes "text"
    freeze: list[str] = field(default_factory=list)


@dataclass
class LoopConfig(LoopSettings, OptimConfig):
    """Everything the loop needs besides the model, the task and the phases."""

    eval_tasks_batch_size: int = 8
    eval_at_start: bool = False  # a step-0 row with the held-out metrics of the untrained model
    # the run's parallel layout (evolm.parallel.ParallelLayout: a recipe's `parallel:` section), or
    # None: train.distributed alone decides (see evolm.parallel.layout.effective_layout)
    parallel: Any = None

    def __post_init__(self):
        self.betas = tuple(self.betas)  # YAML gives a list; the optimizer state keeps what it gets
        self.eval_tasks = list(self.eval_tasks)
        self.freeze = list(self.freeze)

    @classmethod
    def from_recipe(cls, recipe) -> "LoopConfig":
        return cls(**values_of(recipe.optim, OptimConfig), **values_of(recipe.train, LoopSettings),
                   parallel=getattr(recipe, "parallel", None))
