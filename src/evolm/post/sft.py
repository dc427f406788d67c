"""Supervised fine-tuning: conversations -> an instruct model, on the shared training loop.

SFT (Ouyang et al. 2022, InstructGPT, arXiv:2203.02155 sec. 3.5; the seeds' "training trinity")
continues next-token training on demonstrations, but the loss counts only the tokens the model
must produce: the assistant turns, through their end-of-turn token (``evolm.post.data`` builds
that mask from the model's own chat template). Everything else — optimizer over the trainable
parameters, schedule, accumulation, autocast, metrics, checkpoints, exact resume — is the loop of
:mod:`evolm.train.loop`, the one pretraining runs on; :class:`SftTask` only feeds it batches.

Batches: ``batch_size`` conversations padded on the right (causal attention never looks at the
pads after a token, and their labels are -100), or with ``packing`` rows of up to ``max_len``
tokens holding several conversations each. Packed conversations stay isolated: ``doc_ids`` give
attention a block-diagonal causal mask and positions restart at 0 for each (as in pretraining's
document masking), so a packed batch has exactly the loss of the same conversations unpacked
(tested), with less padding. Each micro-batch's loss is the mean over its trained tokens.

An encoder-decoder (T5, BART: ``encoder_layers > 0``) trains on (source, target) pairs instead,
the prompt read by the encoder and the answer + EOS produced by the decoder
(:mod:`evolm.post.seq2seq_sft`); the rest of this path is the same.

With LoRA (``--lora``; ``evolm.post.lora``) only the adapters train and the out folder is a PEFT
adapter (adapter_config.json + adapter_model.safetensors); QLoRA (``--qlora``) keeps the frozen
base in 4-bit NF4. Without, the out folder is a whole model (+ tokenizer) for ``evolm generate``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evolm.post.common import AdapterConfig, Policy, load_policy, pad_id, peak_memory_mb, run_folder
from evolm.post.data import (BUILTIN_SFT, IGNORE, DataError, Example, Rendered, encode_examples, load_sft,
                             require_template)
from evolm.post.flags import flat, option, require
from evolm.train import parallel as par
from evolm.train.loop import LoopConfig, Phase, Runtime, run

TRAINING, LOGGING = "training", "logging and checkpoints"


# ---------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------
@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T), -100 = not trained
    doc_ids: torch.Tensor | None = None  # (B, T) packed: one id per conversation (pads get their own)
    position_ids: torch.Tensor | None = None
    n_tokens: int = 0  # real (non-pad) tokens
    attention_mask: torch.Tensor | None = None  # (B, S) encoder-decoder: the source's padding (1 = token)
    decoder_input_ids: torch.Tensor | None = None  # (B, T) encoder-decoder: targets shifted right


def collate(rows: list[list[Rendered]], pad_id: int, packed: bool) -> Batch:
    """Rows of conversations -> tensors; each conversation contributes ``ids[:-1]`` as input and
    ``labels[1:]`` as targets (next-token prediction)."""
    T = max(sum(len(r.ids) - 1 for r in row) for row in rows)
    B = len(rows)
    x = torch.full((B, T), pad_id, dtype=torch.long)
    y = torch.full((B, T), IGNORE, dtype=torch.long)
    doc = torch.zeros((B, T), dtype=torch.long) if packed else None
    pos = torch.zeros((B, T), dtype=torch.long) if packed else None
    n = 0
    for b, row in enumerate(rows):
        t = 0
        for d, r in enumerate(row):
            k = len(r.ids) - 1
            x[b, t:t + k] = torch.tensor(r.ids[:-1])
            y[b, t:t + k] = torch.tensor(r.labels[1:])
            if packed:
                doc[b, t:t + k] = d
                pos[b, t:t + k] = torch.arange(k)
            t += k
        n += t
        if packed and t < T:  # padding is a document of its own: it attends only to itself
            doc[b, t:] = len(row)
            pos[b, t:] = torch.arange(T - t)
    return Batch(x, y, doc, pos, n)


def plan_batches(lengths: list[int], order: list[int], batch_size: int, max_len: int,
                 packing: bool) -> list[list[list[int]]]:
    """Batches of rows of example indices, in ``order``. Unpacked: ``batch_size`` rows of one
    example each. Packed: examples fill rows of up to ``max_len`` input tokens in order (a row is
    closed when the next example does not fit), ``batch_size`` rows per batch."""
    if not packing:
        return [[[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
    rows, row, used = [], [], 0
    for i in order:
        k = lengths[i] - 1
        if row and used + k > max_len:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += k
    if row:
        rows.append(row)
    return [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)]


# ---------------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------------
class SftTask:
    """Assistant-only next-token loss over rendered conversations (the loop's Task protocol)."""

    def __init__(self, train: list[Rendered], val: list[Rendered], *, batch_size: int, max_len: int,
                 packing: bool, pad_id: int, seed: int, rt: Runtime | None = None, tokenizer=None,
                 sample_prompts: list[list[dict]] | None = None, sample_tokens: int = 48):
        if not train:
            raise DataError("SFT: no training examples left after rendering")
        self.train, self.val = train, val
        self.batch_size, self.max_len, self.packing = batch_size, max_len, packing
        self.pad_id, self.seed = pad_id, seed
        self.rt = rt or Runtime()
        self.tokenizer, self.sample_prompts, self.sample_tokens = tokenizer, sample_prompts or [], sample_tokens
        self.lengths = [self.length(r) for r in train]
        self.epoch, self.cursor = 0, 0
        self._plan: list | None = None

    @staticmethod
    def length(example: Rendered) -> int:
        return len(example.ids)

    def collate(self, rows: list[list[Rendered]], packed: bool) -> Batch:
        return collate(rows, self.pad_id, packed)

    # --- data order --------------------------------------------------------------------------
    def epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.train), generator=g).tolist()
        return plan_batches(self.lengths, order, self.batch_size, self.max_len, self.packing)

    def batches_per_epoch(self) -> int:
        """Micro-batches per process per epoch (the plan of epoch 0; packing varies a little)."""
        return max(1, len(self.epoch_plan(0)) // self.rt.world)

    def start_phase(self, index: int, phase: Phase) -> None:
        self._plan = None

    def next_batch(self) -> Batch:
        if self._plan is None:
            self._plan = self.epoch_plan(self.epoch)
        w, r = self.rt.world, self.rt.rank
        if (self.cursor + 1) * w > len(self._plan):  # this epoch is used up (ranks drop an uneven tail)
            self.epoch, self.cursor = self.epoch + 1, 0
            self._plan = self.epoch_plan(self.epoch)
        rows = self._plan[self.cursor * w + r]
        self.cursor += 1
        return self.collate([[self.train[i] for i in row] for row in rows], self.packing)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.cursor, self._plan = s["epoch"], s["cursor"], None

    # --- loss and evaluation ---------------------------------------------------------------
    def _forward(self, model, b: Batch) -> torch.Tensor:
        dev = self.rt.device
        kw = {}
        if b.doc_ids is not None:
            kw = {"doc_ids": b.doc_ids.to(dev), "position_ids": b.position_ids.to(dev)}
        if b.decoder_input_ids is not None:
            kw = {"attention_mask": b.attention_mask.to(dev), "decoder_input_ids": b.decoder_input_ids.to(dev)}
        return model(b.input_ids.to(dev), targets=b.targets.to(dev), **kw)

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        trained = int((batch.targets != IGNORE).sum())
        return self._forward(model, batch), {"tokens": batch.n_tokens, "trained_tokens": trained}

    def evaluate(self, model) -> dict[str, float]:
        """Held-out loss over every assistant token of the validation set (token-weighted)."""
        if not self.val:
            return {}
        total, count = 0.0, 0.0
        order = sorted(range(len(self.val)), key=lambda i: self.length(self.val[i]))  # less padding
        for k, s in enumerate(range(0, len(order), self.batch_size)):
            if k % self.rt.world != self.rt.rank:
                continue
            b = self.collate([[self.val[i]] for i in order[s:s + self.batch_size]], False)
            n = int((b.targets != IGNORE).sum())
            if n:
                total += float(self._forward(model, b)) * n
                count += n
        total, count = par.all_reduce_sum([total, count], self.rt.world)
        loss = total / max(count, 1.0)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def samples(self, model) -> list[tuple[str, str]]:
        if not self.sample_prompts or self.tokenizer is None:
            return []
        from evolm.infer import SamplingParams, generate

        tok = self.tokenizer
        params = SamplingParams(max_new_tokens=self.sample_tokens, temperature=0.0, ignore_eos=False,
                                stop_token_ids=tok.eos_ids)
        outs = []
        for msgs in self.sample_prompts:
            shown, ids = self.sample_prompt(msgs)
            new = generate(model, [ids], params)[0]
            outs.append((shown[-60:] + " -> ", tok.decode(new, skip_special_tokens=True)))
        return outs

    def sample_prompt(self, msgs: list[dict]) -> tuple[str, list[int]]:
        """(the text a sample shows, the ids generation starts from) for held-out ``msgs``."""
        return msgs[-1]["content"], self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Everything ``evolm sft`` runs from (defaults: the command's). ``lr=None``: 2e-4 with LoRA, 2e-5 full."""

    model: str = option(help="model to fine-tune: HF folder, GGUF file, evolm checkpoint/run")
    data: str = option(help="JSONL (chat / prompt-response / Alpaca rows) or a built-in set (alpaca_en_demo, "
                            "openai_evals)")
    val: str | None = option(None, "held-out JSONL (default: the built-in set's val split, else --val-fraction of "
                                   "--data)")
    val_fraction: float = option(0.05, "held out from --data when there is no --val")
    out: str | None = option(None, "output folder (default runs/sft-<data name>)")
    adapter: AdapterConfig = option(AdapterConfig())
    epochs: float | None = option(None, "passes over the data (default 1 unless --steps)", group=TRAINING)
    steps: int | None = option(None, "optimizer steps (overrides --epochs)", group=TRAINING)
    lr: float | None = option(None, "peak LR (default 2e-4 with LoRA, 2e-5 full)", group=TRAINING)
    schedule: str = option("cosine", choices=["cosine", "linear", "constant", "wsd"], group=TRAINING)
    warmup: float = option(0.03, "warm-up: a fraction of the steps (<1) or a count", group=TRAINING)
    lr_end: float = option(0.1, "final LR as a fraction of the peak", group=TRAINING)
    batch_size: int = option(8, "conversations (or packed rows) per micro-batch", group=TRAINING)
    accum: int = option(1, "micro-batches per optimizer step", group=TRAINING)
    max_len: int = option(1024, "tokens per conversation / packed row", group=TRAINING)
    packing: bool = option(False, "pack conversations into rows (attention kept apart)", group=TRAINING)
    weight_decay: float = option(0.0, group=TRAINING)
    grad_clip: float = option(1.0, group=TRAINING)
    dtype: str = option("float32", "bfloat16: autocast (weights stay float32)", choices=["float32", "bfloat16"],
                        group=TRAINING)
    seed: int = option(1234, group=TRAINING)
    limit: int | None = option(None, "use the first N training rows", group=TRAINING)
    val_limit: int | None = option(None, "use the first N held-out rows", group=TRAINING)
    chat_template: str | None = option(None, "'chatml' or a .jinja file, for models without one", group=TRAINING)
    threads: int | None = option(None, group=TRAINING)
    eval_every: int = option(50, group=LOGGING)
    log_every: int = option(10, group=LOGGING)
    ckpt_every: int = option(100, group=LOGGING)
    keep_checkpoints: int = option(2, group=LOGGING)
    samples: int = option(2, "held-out prompts to answer at the end", group=LOGGING)
    resume: bool = option(False, "continue from the latest checkpoint in --out", group=LOGGING)
    stop_after: int | None = option(None, argparse.SUPPRESS, group=LOGGING)

    def __post_init__(self):
        for name in ("batch_size", "accum", "max_len"):
            require(self, name, getattr(self, name) >= 1, f"must be >= 1, got {getattr(self, name)}")
        require(self, "steps", self.steps is None or self.steps >= 1, f"must be >= 1, got {self.steps}")
        require(self, "val_fraction", 0 <= self.val_fraction < 1, f"must be in [0, 1), got {self.val_fraction}")
        require(self, "warmup", self.warmup >= 0, f"must be >= 0, got {self.warmup}")

    @property
    def peak_lr(self) -> float:
        return self.lr or (2e-4 if self.adapter.enabled else 2e-5)


def _split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(examples), generator=g).tolist()
    n_val = max(1, int(round(fraction * len(examples)))) if fraction > 0 and len(examples) > 1 else 0
    val = set(perm[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


def _is_builtin(data: str) -> bool:
    return str(data) in BUILTIN_SFT and not os.path.isfile(str(data))


def read_conversations(config: SFTConfig) -> tuple[list[Example], list[Example]]:
    """(train, held-out) conversations: --val, else the built-in set's val split, else a seeded
    --val-fraction of --data."""
    train = load_sft(config.data, "train", limit=config.limit)
    if config.val:
        return train, load_sft(config.val, "val", limit=config.val_limit)
    if _is_builtin(config.data):
        return train, load_sft(config.data, "val", limit=config.val_limit)
    train, val = _split(train, config.val_fraction, config.seed)
    return train, val[:config.val_limit] if config.val_limit else val


def encode_conversations(config: SFTConfig, tokenizer, train_ex, val_ex, say) -> tuple[list[Rendered], list[Rendered]]:
    """Render and tokenize both splits (assistant-only labels), reporting what was cut or dropped."""
    train = encode_examples(tokenizer, train_ex, config.max_len)
    val = encode_examples(tokenizer, val_ex, config.max_len)
    n_trained = sum(r.n_trained for r in train)
    say(f"data: {len(train)} training conversations ({sum(len(r.ids) for r in train):,} tokens, {n_trained:,} "
        f"trained), {len(val)} held out; {train.truncated} cut to --max-len {config.max_len}, "
        f"{train.dropped} dropped (no assistant token left)")
    return train, val


def sample_prompts(val_ex: list[Example], n: int) -> list[list[dict]]:
    """The first ``n`` held-out conversations up to (not including) their last assistant turn."""
    return [[m for m in e.messages[:max(i for i, m in enumerate(e.messages) if m["role"] == "assistant")]]
            for e in val_ex[:n]]


def make_task(config: SFTConfig, model, tokenizer, train_ex, val_ex, rt: Runtime, say) -> SftTask:
    """The task for this model: chat-template SFT for a decoder, source -> target pairs for an
    encoder-decoder (``evolm.post.seq2seq_sft``)."""
    kw = dict(batch_size=config.batch_size, max_len=config.max_len, packing=config.packing, pad_id=pad_id(tokenizer),
              seed=config.seed, rt=rt, tokenizer=tokenizer, sample_prompts=sample_prompts(val_ex, config.samples))
    from evolm.post.seq2seq_sft import Seq2SeqSftTask, encode_pairs, is_seq2seq

    if is_seq2seq(model):
        train, val = encode_pairs(tokenizer, train_ex, config.max_len), encode_pairs(tokenizer, val_ex, config.max_len)
        say(f"data: {len(train)} training pairs ({sum(len(p.source) for p in train):,} source and "
            f"{sum(len(p.target) for p in train):,} target tokens), {len(val)} held out; {train.truncated} cut to "
            f"--max-len {config.max_len}")
        return Seq2SeqSftTask(train, val, start_id=model.config.decoder_start_token_id, **kw)
    require_template(tokenizer)
    train, val = encode_conversations(config, tokenizer, train_ex, val_ex, say)
    return SftTask(train, val, **kw)


def loop_settings(config: SFTConfig, task: SftTask, rt: Runtime, say) -> tuple[Phase, LoopConfig]:
    """Steps from --steps or --epochs, warm-up as a fraction or a count, and the loop's settings."""
    per_epoch = math.ceil(task.batches_per_epoch() / config.accum)
    steps = config.steps or max(1, math.ceil((config.epochs or 1.0) * per_epoch))
    warmup = int(config.warmup * steps) if config.warmup < 1 else int(config.warmup)
    phase = Phase("sft", steps=steps, accum=config.accum, warmup_steps=warmup, schedule=config.schedule,
                  lr_end=config.lr_end)
    cfg = LoopConfig(lr=config.peak_lr, weight_decay=config.weight_decay, grad_clip=config.grad_clip,
                     dtype=config.dtype, distributed="ddp" if rt.world > 1 else "none", log_every=config.log_every,
                     eval_every=config.eval_every, ckpt_every=config.ckpt_every,
                     keep_checkpoints=config.keep_checkpoints, eval_at_start=True)
    say(f"{steps} steps of {config.accum} x {config.batch_size} {'packed rows' if config.packing else 'conversations'}"
        f" ({steps / per_epoch:.2f} epochs), lr {config.peak_lr:g}, {config.schedule}, warmup {warmup}")
    return phase, cfg


def save_sft_result(raw, state, folder: Path, tokenizer, base_model: str, lora: bool) -> None:
    """The out folder: a PEFT adapter + tokenizer with LoRA (the adapter files at the top level),
    else the whole model + tokenizer for ``evolm generate``."""
    if lora:
        from evolm.post.lora import save_adapter

        tmp = folder / ".adapter"
        save_adapter(raw, tmp, base_model=base_model)
        for f in tmp.iterdir():
            os.replace(f, folder / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save(folder)
    else:
        from evolm.train.loop import promote_final, save_model_folder

        save_model_folder(raw, state, folder / "final", None, tokenizer)
        promote_final(folder)


def finish_summary(summary: dict, config: SFTConfig, policy: Policy, task: SftTask, rt: Runtime, out: Path,
                   t0: float, say) -> dict[str, Any]:
    """Add the run's sizes, memory and time to the loop's summary; write sft_summary.json; say the result."""
    lora = config.adapter.enabled
    summary.pop("rows", None)
    summary.update({"trainable_params": policy.trainable, "total_params": policy.total, "lora": lora,
                    "qlora": config.adapter.qlora, "train_examples": len(task.train), "val_examples": len(task.val),
                    "peak_memory_mb": peak_memory_mb(rt.device), "wall_s": time.time() - t0,
                    "samples": summary.get("samples", [])})
    before = (summary.get("initial_eval") or {}).get("val_loss")
    if rt.main and not summary["stopped_early"]:
        (out / "sft_summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "losses"},
                                                         indent=2, default=str))
        say(f"done: {summary['steps']} steps in {summary['wall_s']:.0f}s; held-out loss "
            f"{before if before is not None else float('nan'):.4f} -> {summary.get('val_loss', float('nan')):.4f}; "
            f"peak memory {summary['peak_memory_mb']:.0f} MiB; {'adapter' if lora else 'model'} in {out}")
    return summary


def run_sft(config: SFTConfig, log=print) -> dict[str, Any]:
    """``evolm sft``: load, render, train on the loop, save; returns the summary (also sft_summary.json)."""
    t0 = time.time()
    rt = Runtime.create("ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none")
    say = log if rt.main else (lambda s: None)
    out = run_folder(config.out, "sft", config.data)
    policy = load_policy(config.model, adapter=config.adapter, seed=config.seed, chat_template=config.chat_template,
                         threads=config.threads, float32=False, purpose="SFT", log=say)
    tokenizer = policy.tokenizer
    train_ex, val_ex = read_conversations(config)
    model = policy.model.train().to(rt.device)
    task = make_task(config, model, tokenizer, train_ex, val_ex, rt, say)
    phase, loop_cfg = loop_settings(config, task, rt, say)
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sft_args.json").write_text(json.dumps(flat(config), indent=2, default=str))
    task.save_final = lambda raw, state, folder: save_sft_result(raw, state, folder, tokenizer, str(config.model),
                                                                 config.adapter.enabled)
    summary = run(model, task, [phase], loop_cfg, out, tokenizer=tokenizer, resume=config.resume, rt=rt, log=say,
                  stop_after_steps=config.stop_after)
    return finish_summary(summary, config, policy, task, rt, out, t0, say)


def main(argv: list[str] | None = None) -> None:
    """``python -m evolm.post.sft ...`` (the same as ``evolm sft``)."""
    from evolm.post import module_main

    module_main("evolm sft", "supervised fine-tuning on chat data", SFTConfig, run_sft, argv)


if __name__ == "__main__":
    main()
