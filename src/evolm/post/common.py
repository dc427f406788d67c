"""What the post-training commands share: adapter and loop options, loading the policy, the run
folder, the optimizer schedule, the final save and the held-out report.

``sft``, ``dpo`` and ``grpo`` differ in their data and their loss (their ``Task``); everything
around the task is here, once: :func:`load_policy` is the one place a post-training run loads a
model (through :func:`evolm.loading.load`), :class:`AdapterConfig` the one set of LoRA / QLoRA
options, :class:`LoopOptions` the optimizer and bookkeeping options DPO and GRPO take, and
:func:`report_held_out` the before/after comparison both print and store. The per-token and
per-sequence log-probabilities the preference and RL losses need live in
:mod:`evolm.post.logprobs`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from evolm.post.flags import option, require

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# options every trainer shares
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """LoRA / QLoRA (``evolm.post.lora``): train low-rank adapters only, over a frozen (NF4) base."""

    flag_group = "LoRA / QLoRA"

    lora: bool = option(False, "train LoRA adapters only (base frozen)")
    qlora: bool = option(False, "LoRA on a 4-bit NF4 base (implies --lora)")
    lora_r: int = option(16, "adapter rank (default 16)")
    lora_alpha: float = option(32, "adapter scale numerator: scaling = alpha / r")
    lora_dropout: float = option(0.0)
    lora_targets: str = option("q_proj,v_proj", "module names, comma-separated, or all-linear")

    def __post_init__(self):
        if not self.enabled:  # the adapter's shape flags mean nothing without --lora/--qlora
            return
        r = self.lora_r
        require(self, "lora_r", isinstance(r, int) and not isinstance(r, bool) and r > 0,
                f"(the rank) must be a positive integer, got {r!r}")
        require(self, "lora_alpha", self.lora_alpha > 0, f"must be > 0, got {self.lora_alpha!r}")
        require(self, "lora_dropout", 0.0 <= self.lora_dropout < 1.0, f"must be in [0, 1), got {self.lora_dropout!r}")
        self.lora_config()  # the targets: LoRAConfig names a bad list

    @property
    def enabled(self) -> bool:
        return self.lora or self.qlora

    def lora_config(self):
        """The :class:`~evolm.post.lora.LoRAConfig` asked for, or None without --lora/--qlora
        (LoRAConfig validates r, alpha, dropout and targets, naming the field)."""
        if not self.enabled:
            return None
        from evolm.post.lora import LoRAConfig

        return LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.lora_targets)


@dataclass(frozen=True, kw_only=True)
class LoopOptions:
    """Optimizer, schedule and bookkeeping of ``evolm dpo`` / ``evolm grpo`` (they fill a LoopConfig)."""

    flag_group = "optimizer and bookkeeping"

    steps: int | None = option(None, "optimizer steps")
    accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-6, "peak learning rate (default 1e-06)")
    weight_decay: float = option(0.0)
    warmup_ratio: float = option(0.1, "share of steps warming up linearly")
    schedule: str = option("linear", "LR shape after warm-up: linear (to 0) | cosine | constant")
    grad_clip: float = option(1.0)
    dtype: str = option("float32", "bfloat16 = autocast", choices=list(DTYPES))
    activation_checkpointing: bool = option(
        False, "recompute each block in the backward: activation memory ~ 1 layer instead of all")
    eval_every: int = option(0, "held-out evaluation every N steps (0: at the end)")
    log_every: int = option(1)
    ckpt_every: int = option(0, "checkpoint every N steps (0: at the end)")
    resume: bool = option(False, "continue from the run folder's last checkpoint")
    seed: int = option(0)
    stop_after: int | None = option(None, argparse.SUPPRESS)

    def __post_init__(self):
        require(self, "steps", self.steps is None or self.steps >= 1, f"must be >= 1, got {self.steps}")
        require(self, "accum", self.accum >= 1, f"must be >= 1, got {self.accum}")
        require(self, "lr", self.lr > 0, f"must be > 0, got {self.lr}")

    def loop_config(self):
        from evolm.train.loop import LoopConfig

        return LoopConfig(lr=self.lr, weight_decay=self.weight_decay, grad_clip=self.grad_clip, dtype=self.dtype,
                          log_every=self.log_every, eval_every=self.eval_every, ckpt_every=self.ckpt_every,
                          sample_every=0, eval_at_start=True, activation_checkpointing=self.activation_checkpointing)

    def phase(self, name: str, steps: int):
        """One phase of ``steps``: linear warm-up over ``warmup_ratio`` of them, then ``schedule`` to 0."""
        from evolm.train.loop import Phase

        warm = int(round(self.warmup_ratio * steps))
        return Phase(name, steps=steps, accum=self.accum, warmup_steps=warm, schedule=self.schedule, lr_end=0.0)


# ---------------------------------------------------------------------------------------------
# the policy: load, template, adapters
# ---------------------------------------------------------------------------------------------
@dataclass
class Policy:
    """The model a run trains, its tokenizer, and what was made trainable."""

    model: Any
    tokenizer: Any
    lora_names: list[str]
    trainable: int
    total: int


def load_policy(path, *, adapter: AdapterConfig, seed: int, chat_template: str | None = None,
                threads: int | None = None, float32: bool = True, purpose: str = "post-training",
                log: Callable[[str], None] = print) -> Policy:
    """Load the model to train and its tokenizer, set the chat template, seed, and apply LoRA/QLoRA.

    The one place post-training loads a model (``evolm.loading.load``). ``float32``: cast the
    weights to float32 (DPO/GRPO); SFT keeps the stored dtype. Seeding comes right before the
    adapters because LoRA's A matrices start random: the same seed, the same start.
    """
    from evolm.loading import load
    from evolm.post.data import DataError, chat_template_from_arg
    from evolm.post.lora import prepare_lora, trainable_parameters
    from evolm.train.loop import seed_all

    if threads:
        torch.set_num_threads(threads)
    model, tok = load(path)
    if tok is None:
        raise DataError(f"{path}: no tokenizer found beside the weights (expected tokenizer.json, or GGUF tokenizer "
                        f"metadata); {purpose} renders text with it")
    if chat_template:
        tok.chat_template = chat_template_from_arg(chat_template)
    if float32:
        model = model.float()
    seed_all(seed)
    names = prepare_lora(model, adapter.lora_config(), qlora=adapter.qlora)
    trainable, total = trainable_parameters(model)
    log(f"model {path}: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.3f}%)"
        + (f"; LoRA on {len(names)} layers" + (" over an NF4 base" if adapter.qlora else "") if names else ""))
    return Policy(model, tok, names, trainable, total)


def pad_id(tokenizer) -> int:
    """The padding id batches use: the tokenizer's pad token, else its end of sequence, else 0."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)


# ---------------------------------------------------------------------------------------------
# the run folder and what is written to it
# ---------------------------------------------------------------------------------------------
def run_folder(out, command: str, name) -> Path:
    """``out``, or ``runs/<command>-<name>`` (the data or model name without folder and suffix)."""
    if out:
        return Path(out)
    return Path("runs") / f"{command}-{Path(str(name).rstrip('/')).stem}"


class EpochOrder:
    """A post-training task's walk over its training rows (``self.train``): a fresh random order each
    epoch, drawn from the run's ``seed`` and the epoch number, so that ``(epoch, cursor)`` is all a
    checkpoint needs to resume bit for bit; the final weights are written with ``tokenizer`` (and,
    for an adapter, the base model's ``base_path``) next to them."""

    tokenizer = None  # set by the task's run_* function
    base_path = None

    def _shuffle(self) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.order = torch.randperm(len(self.train), generator=g).tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.cursor = s["epoch"], s["cursor"]
        self._shuffle()

    def save_final(self, model, state: dict, out) -> None:
        save_policy(model, state, out, self.tokenizer, self.base_path)


def save_policy(model, state: dict, out, tokenizer, base_path: str | None) -> None:
    """The final result: the whole model + tokenizer in ``out`` (``evolm generate --model OUT``);
    for LoRA also the PEFT adapter in ``out/adapter``, and the model written is the merged one."""
    import copy

    from evolm.post.logprobs import has_adapters
    from evolm.train.loop import promote_final, save_model_folder

    out = Path(out)
    if has_adapters(model):
        from evolm.post.lora import merge_lora, save_adapter

        save_adapter(model, out / "adapter", base_model=base_path)
        model = merge_lora(copy.deepcopy(model))
        state = model.state_dict()
    save_model_folder(model, state, out / "final", None, tokenizer)
    promote_final(out)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak resident memory, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def summary_text(summary: dict) -> str:
    """The summary as JSON, without the long per-step lists."""
    return json.dumps({k: v for k, v in summary.items() if k not in ("losses", "rows", "samples")}, indent=2,
                      default=str)


def report_held_out(summary: dict, model, out: Path, command: str, log: Callable[[str], None] = print,
                    **extra) -> None:
    """Held-out metrics before training (``summary['before']``) and after, printed and written to
    ``out/<command>_eval.json`` with ``extra`` (e.g. the reward curve); adds ``peak_memory_mb``."""
    before = summary["before"] = summary.get("initial_eval") or {}
    summary["peak_memory_mb"] = peak_memory_mb(next(model.parameters()).device)
    after = {k: v for k, v in summary.items() if k.startswith("val_")}
    if before and after:
        log("after:  " + " ".join(f"{k} {after[k]:.4f}" for k in before if k in after))
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{command}_eval.json").write_text(json.dumps(
            {"before": before, "after": after, **extra, "steps": summary["steps"], "wall_s": summary["wall_s"],
             "peak_memory_mb": summary["peak_memory_mb"]}, indent=2))


__all__ = ["DTYPES", "AdapterConfig", "LoopOptions", "Policy", "load_policy", "pad_id", "run_folder", "save_policy",
           "peak_memory_mb", "summary_text", "report_held_out"]
