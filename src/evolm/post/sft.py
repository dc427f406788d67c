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

from evolm.post.data import (BUILTIN_SFT, IGNORE, DataError, Example, Rendered, chat_template_from_arg,
                             encode_examples, load_sft, require_template)
from evolm.train import parallel as par
from evolm.train.loop import LoopConfig, Phase, Runtime, run, seed_all


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
        self.lengths = [len(r.ids) for r in train]
        self.epoch, self.cursor = 0, 0
        self._plan: list | None = None

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
        return collate([[self.train[i] for i in row] for row in rows], self.pad_id, self.packing)

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
        return model(b.input_ids.to(dev), targets=b.targets.to(dev), **kw)

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        trained = int((batch.targets != IGNORE).sum())
        return self._forward(model, batch), {"tokens": batch.n_tokens, "trained_tokens": trained}

    def evaluate(self, model) -> dict[str, float]:
        """Held-out loss over every assistant token of the validation set (token-weighted)."""
        if not self.val:
            return {}
        total, count = 0.0, 0.0
        order = sorted(range(len(self.val)), key=lambda i: len(self.val[i].ids))  # less padding
        for k, s in enumerate(range(0, len(order), self.batch_size)):
            if k % self.rt.world != self.rt.rank:
                continue
            b = collate([[self.val[i]] for i in order[s:s + self.batch_size]], self.pad_id, False)
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
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            new = generate(model, [ids], params)[0]
            outs.append((msgs[-1]["content"][-60:] + " -> ", tok.decode(new, skip_special_tokens=True)))
        return outs


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def add_sft_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``evolm sft``."""
    p.add_argument("--model", required=True, help="model to fine-tune: HF folder, GGUF file, evolm checkpoint/run")
    p.add_argument("--data", required=True, help="JSONL (chat / prompt-response / Alpaca rows) or a built-in set "
                                                 "(alpaca_en_demo, openai_evals)")
    p.add_argument("--val", default=None, help="held-out JSONL (default: the built-in set's val split, else "
                                               "--val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held out from --data when there is no --val")
    p.add_argument("--out", default=None, help="output folder (default runs/sft-<data name>)")
    try:
        from evolm.post.lora import add_lora_args

        add_lora_args(p)
    except ImportError:  # pragma: no cover - lora.py ships with evolm
        pass
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=float, default=None, help="passes over the data (default 1 unless --steps)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=None, help="peak LR (default 2e-4 with LoRA, 2e-5 full)")
    g.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant", "wsd"])
    g.add_argument("--warmup", type=float, default=0.03, help="warm-up: a fraction of the steps (<1) or a count")
    g.add_argument("--lr-end", type=float, default=0.1, help="final LR as a fraction of the peak")
    g.add_argument("--batch-size", type=int, default=8, help="conversations (or packed rows) per micro-batch")
    g.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max-len", type=int, default=1024, help="tokens per conversation / packed row")
    g.add_argument("--packing", action="store_true", help="pack conversations into rows (attention kept apart)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16: autocast (weights stay float32)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--limit", type=int, default=None, help="use the first N training rows")
    g.add_argument("--val-limit", type=int, default=None, help="use the first N held-out rows")
    g.add_argument("--chat-template", default=None, help="'chatml' or a .jinja file, for models without one")
    g.add_argument("--threads", type=int, default=None)
    o = p.add_argument_group("logging and checkpoints")
    o.add_argument("--eval-every", type=int, default=50)
    o.add_argument("--log-every", type=int, default=10)
    o.add_argument("--ckpt-every", type=int, default=100)
    o.add_argument("--keep-checkpoints", type=int, default=2)
    o.add_argument("--samples", type=int, default=2, help="held-out prompts to answer at the end")
    o.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    o.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)


def _split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(examples), generator=g).tolist()
    n_val = max(1, int(round(fraction * len(examples)))) if fraction > 0 and len(examples) > 1 else 0
    val = set(perm[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_sft(args, log=print) -> dict[str, Any]:
    """``evolm sft``: load, render, train on the loop, save; returns the summary (also sft_summary.json)."""
    from evolm.loading import load

    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    rt = Runtime.create("ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none")
    say = log if rt.main else (lambda s: None)
    lora = bool(getattr(args, "lora", False) or getattr(args, "qlora", False))
    data_name = Path(str(args.data)).stem if os.path.isfile(str(args.data)) else str(args.data)
    out = Path(args.out or os.path.join("runs", f"sft-{data_name}"))

    model, tokenizer = load(args.model)
    if tokenizer is None:
        raise DataError(f"{args.model}: no tokenizer found beside the weights; SFT renders conversations with it")
    if args.chat_template:
        tokenizer.chat_template = chat_template_from_arg(args.chat_template)
    require_template(tokenizer)

    # data
    train_ex = load_sft(args.data, "train", limit=args.limit)
    if args.val:
        val_ex = load_sft(args.val, "val", limit=args.val_limit)
    elif str(args.data) in BUILTIN_SFT and not os.path.isfile(str(args.data)):
        val_ex = load_sft(args.data, "val", limit=args.val_limit)
    else:
        train_ex, val_ex = _split(train_ex, args.val_fraction, args.seed)
        val_ex = val_ex[:args.val_limit] if args.val_limit else val_ex
    train = encode_examples(tokenizer, train_ex, args.max_len)
    val = encode_examples(tokenizer, val_ex, args.max_len)
    n_trained = sum(r.n_trained for r in train)
    say(f"data: {len(train)} training conversations ({sum(len(r.ids) for r in train):,} tokens, {n_trained:,} "
        f"trained), {len(val)} held out; {train.truncated} cut to --max-len {args.max_len}, "
        f"{train.dropped} dropped (no assistant token left)")

    # model
    seed_all(args.seed)  # LoRA's initial A matrices are random: the same seed gives the same run
    model.train()
    lora_names: list[str] = []
    if lora:
        from evolm.post.lora import prepare_lora

        lora_names = prepare_lora(model, args)
    model.to(rt.device)
    n_train_p = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        from evolm.post.lora import trainable_parameters

        _, n_total = trainable_parameters(model)
    except ImportError:  # pragma: no cover
        n_total = sum(p.numel() for p in model.parameters())
    say(f"model {args.model}: {n_total:,} parameters, {n_train_p:,} trainable ({100 * n_train_p / n_total:.3f}%)"
        + (f"; LoRA on {len(lora_names)} layers" + (" over an NF4 base" if args.qlora else "") if lora else ""))

    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    sample_prompts = [[m for m in e.messages[:max(i for i, m in enumerate(e.messages) if m["role"] == "assistant")]]
                      for e in val_ex[:args.samples]]
    task = SftTask(train, val, batch_size=args.batch_size, max_len=args.max_len, packing=args.packing,
                   pad_id=pad_id, seed=args.seed, rt=rt, tokenizer=tokenizer, sample_prompts=sample_prompts)
    per_epoch = math.ceil(task.batches_per_epoch() / args.accum)
    steps = args.steps or max(1, math.ceil((args.epochs or 1.0) * per_epoch))
    warmup = int(args.warmup * steps) if args.warmup < 1 else int(args.warmup)
    lr = args.lr or (2e-4 if lora else 2e-5)
    phase = Phase("sft", steps=steps, accum=args.accum, warmup_steps=warmup, schedule=args.schedule,
                  lr_end=args.lr_end)
    cfg = LoopConfig(lr=lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip, dtype=args.dtype,
                     distributed="ddp" if rt.world > 1 else "none", log_every=args.log_every,
                     eval_every=args.eval_every, ckpt_every=args.ckpt_every, keep_checkpoints=args.keep_checkpoints,
                     eval_at_start=True)
    say(f"{steps} steps of {args.accum} x {args.batch_size} {'packed rows' if args.packing else 'conversations'} "
        f"({steps / per_epoch:.2f} epochs), lr {lr:g}, {args.schedule}, warmup {warmup}")

    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sft_args.json").write_text(json.dumps(vars(args), indent=2, default=str))

    def save_final(raw, state, folder: Path) -> None:
        if lora:
            from evolm.post.lora import save_adapter

            tmp = folder / ".adapter"
            save_adapter(raw, tmp, base_model=str(args.model))
            for f in tmp.iterdir():
                os.replace(f, folder / f.name)
            shutil.rmtree(tmp, ignore_errors=True)
            tokenizer.save(folder)
        else:
            from evolm.train.loop import promote_final, save_model_folder

            save_model_folder(raw, state, folder / "final", None, tokenizer)
            promote_final(folder)

    task.save_final = save_final
    summary = run(model, task, [phase], cfg, out, tokenizer=tokenizer, resume=args.resume, rt=rt, log=say,
                  stop_after_steps=args.stop_after)
    summary.pop("rows", None)
    summary.update({"trainable_params": n_train_p, "total_params": n_total, "lora": lora,
                    "qlora": bool(getattr(args, "qlora", False)), "train_examples": len(train),
                    "val_examples": len(val), "peak_memory_mb": _peak_memory_mb(rt.device),
                    "wall_s": time.time() - t0, "samples": summary.get("samples", [])})
    before = (summary.get("initial_eval") or {}).get("val_loss")
    if rt.main and not summary["stopped_early"]:
        (out / "sft_summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "losses"},
                                                         indent=2, default=str))
        say(f"done: {summary['steps']} steps in {summary['wall_s']:.0f}s; held-out loss "
            f"{before if before is not None else float('nan'):.4f} -> {summary.get('val_loss', float('nan')):.4f}; "
            f"peak memory {summary['peak_memory_mb']:.0f} MiB; {'adapter' if lora else 'model'} in {out}")
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m evolm.post.sft ...`` (the same as ``evolm sft``)."""
    from evolm.post import module_main

    module_main("evolm sft", "supervised fine-tuning on chat data", add_sft_args, run_sft, argv, errors=(DataError,))


if __name__ == "__main__":
    main()
