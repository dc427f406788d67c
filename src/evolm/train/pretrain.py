"""The pretraining loop: next-token prediction over a data mixture, in stages.

One loop serves every stage of a recipe (see ``recipe.py``): for each optimizer step it draws
``accum`` micro-batches from the stage's mixture, runs forward/backward (bf16 autocast when asked),
clips the gradient norm, and steps AdamW at the stage's LR. Every few steps it logs the loss,
LR, tokens/s and MFU; evaluates held-out loss and perplexity per source; prints samples; and
writes an atomic checkpoint from which ``resume`` continues bit for bit.

The run folder holds ``metrics.jsonl``, TensorBoard events (``tb/``), ``checkpoints/``,
``loss.png``, ``report.md`` and, at the end, the final model + tokenizer, so that
``evolm generate --model RUN_DIR`` works on it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from evolm.checkpoint import load_trainer_state, save_checkpoint
from evolm.config import ModelConfig
from evolm.train import parallel as par
from evolm.train.optim import lr_at, make_optimizer
from evolm.train.recipe import Recipe, RecipeError, StageSpec


# --------------------------------------------------------------------------------------------
# setup pieces
# --------------------------------------------------------------------------------------------
def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def load_or_train_tokenizer(recipe: Recipe, out: Path, data_dir: str | None, log: Callable[[str], None]):
    """The recipe's tokenizer; a trained one is saved in the run folder and reused on resume."""
    from evolm.tokenizer import Tokenizer, train_bpe

    spec = recipe.tokenizer
    saved = out / "tokenizer.json"
    if spec.path is not None:
        p = spec.path
        if os.path.isdir(p):
            return Tokenizer.from_hf_dir(p)
        if p.endswith(".gguf"):
            return Tokenizer.from_gguf(p)
        if not os.path.isfile(p):
            raise RecipeError(f"{recipe.source}: tokenizer: path not found: {p}")
        return Tokenizer.from_file(p)
    if saved.is_file():
        return Tokenizer.from_hf_dir(out) if (out / "tokenizer_config.json").is_file() else Tokenizer.from_file(saved)
    from evolm.data.prepare import load_spec
    from evolm.data.sources import iter_documents

    opts = dict(spec.train or {})
    vocab = int(opts.pop("vocab_size", 4096))
    specials = opts.pop("special_tokens", ["<|endoftext|>"])
    names = opts.pop("sources", None)
    max_chars = int(opts.pop("max_chars", 20_000_000))
    if opts:
        raise RecipeError(f"{recipe.source}: tokenizer.train: unknown key(s) {sorted(opts)} "
                          "(valid: vocab_size, special_tokens, sources, max_chars)")
    sources, _ = load_spec(names or recipe.data["sources"])

    def texts():
        budget = max_chars
        for s in sources:
            for doc in iter_documents(s, data_dir):
                if budget <= 0:
                    return
                yield doc.text[:budget]
                budget -= len(doc.text)

    log(f"training a byte-level BPE tokenizer (vocab {vocab}) on {', '.join(s.name for s in sources)}")
    tok = train_bpe(texts(), vocab_size=vocab, special_tokens=specials)
    tok.save(out)
    return tok


def build_model(recipe: Recipe, tokenizer) -> tuple[Any, ModelConfig]:
    from evolm.model import build

    m = recipe.model
    if m.init is not None:
        from evolm.loading import load

        model, _ = load(m.init)
        return model, model.config
    from evolm.loading import load_config

    spec = m.preset if m.preset is not None else m.config
    if m.config is not None and not os.path.isfile(m.config):
        raise RecipeError(f"{recipe.source}: model.config: file not found: {m.config}")
    config = load_config(spec)
    overrides = dict(m.overrides)
    if overrides.get("vocab_size") == "tokenizer":
        overrides["vocab_size"] = tokenizer.vocab_size
    known = set(config.to_dict())
    for k in overrides:
        if k not in known:
            import difflib

            close = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RecipeError(f"{recipe.source}: model.overrides: unknown ModelConfig field '{k}'{hint}")
    config = config.replace(**overrides, name=recipe.name)
    if tokenizer.vocab_size > config.vocab_size:
        raise RecipeError(f"{recipe.source}: tokenizer has {tokenizer.vocab_size} tokens but the model's "
                          f"vocab_size is {config.vocab_size}; set model.overrides.vocab_size to at least "
                          f"{tokenizer.vocab_size} (or 'tokenizer')")
    return build(config), config


def _peak_flops(device: torch.device, dtype: str, stated: float | None) -> tuple[float, str]:
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


def positions_from_segments(seg: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at every document boundary of a packed row."""
    T = seg.shape[1]
    idx = torch.arange(T, device=seg.device).expand_as(seg)
    start = torch.ones_like(seg, dtype=torch.bool)
    start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
@dataclass
class StagePlan:
    spec: StageSpec
    steps: int
    accum: int
    tokens_per_step: int


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


def plan_stages(recipe: Recipe, world: int) -> list[StagePlan]:
    plans = []
    for s in recipe.stages:
        micro_tokens = recipe.train.micro_batch * s.seq_len * world
        target = recipe.train.tokens_per_step or micro_tokens
        accum = max(1, round(target / micro_tokens))
        tps = accum * micro_tokens
        steps = s.tokens // tps
        if steps < 1:
            raise RecipeError(f"{recipe.source}: stages ({s.name}): tokens={s.tokens} is less than one step "
                              f"of {tps} tokens")
        plans.append(StagePlan(s, steps, accum, tps))
    return plans


def _latest_checkpoint(out: Path) -> Path | None:
    ck = out / "checkpoints"
    if not ck.is_dir():
        return None
    done = sorted(p for p in ck.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and (p / "trainer.pt").is_file())
    return done[-1] if done else None


def apply_stage_to_model(model, spec: StageSpec) -> None:
    """Long-context stages change RoPE's base or scaling; the tables are recomputed."""
    changes: dict[str, Any] = {}
    c = model.config
    if spec.rope_theta is not None and spec.rope_theta != c.rope_theta:
        changes["rope_theta"] = spec.rope_theta
    if spec.rope_scaling is not None and spec.rope_scaling != c.rope_scaling:
        changes["rope_scaling"] = spec.rope_scaling
    if spec.seq_len > c.max_seq_len:
        if c.pos_emb == "learned":
            raise RecipeError(f"stage {spec.name}: seq_len {spec.seq_len} exceeds the learned position "
                              f"table ({c.max_seq_len}); learned positions cannot be extended")
        changes["max_seq_len"] = spec.seq_len
    if changes:
        if c.pos_emb != "rope" and ("rope_theta" in changes or "rope_scaling" in changes):
            raise RecipeError(f"stage {spec.name}: rope_theta/rope_scaling set but the model has pos_emb={c.pos_emb!r}")
        model.config = c.replace(**changes)
        model.reset_buffers()


def pretrain(recipe: Recipe, out_dir: str | None = None, resume: bool = False,
             log: Callable[[str], None] | None = None, data_dir: str | None = None,
             stop_after_steps: int | None = None) -> dict[str, Any]:
    """Run a recipe; returns a summary (final losses, tokens, throughput, run folder).

    ``stop_after_steps`` ends the run early after that many optimizer steps of this call (used
    to test exact resumption).
    """
    from evolm.analysis.cost import cost_card
    from evolm.data.mixture import MixtureLoader, iter_eval_batches
    from evolm.data.prepare import prepare

    t_start = time.time()
    rank, world, device = par.init_distributed(recipe.train.distributed)
    main = rank == 0
    say = (log or print) if main else (lambda s: None)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    out = Path(out_dir or recipe.out or os.path.join("runs", recipe.name))
    ckpt_path = _latest_checkpoint(out) if resume else None
    if resume and ckpt_path is None:
        say(f"--resume: no checkpoint in {out}/checkpoints; starting from scratch")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt_path is None and (out / "checkpoints").exists():
            shutil.rmtree(out / "checkpoints")  # a fresh run in an old folder
        import yaml

        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    par.barrier(world)

    _seed_all(recipe.seed)
    tokenizer = load_or_train_tokenizer(recipe, out, data_dir, say) if main else None
    par.barrier(world)
    if not main:
        tokenizer = load_or_train_tokenizer(recipe, out, data_dir, say)
    data_out = out / "data"
    if main:
        manifest = prepare(recipe.data, tokenizer, data_out, data_dir=data_dir, log=say)
    par.barrier(world)
    if not main:
        manifest = json.loads((data_out / "manifest.json").read_text())

    _seed_all(recipe.seed)  # the same initial weights whatever the tokenizer/data steps consumed
    model, config = build_model(recipe, tokenizer)
    from evolm.data.mixture import check_tokenizer, tier_mixture

    check_tokenizer(manifest, tokenizer, config.vocab_size)
    model.to(device)
    plans = plan_stages(recipe, world)
    say(f"model {config.name}: {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"{len(plans)} stage(s): " + ", ".join(f"{p.spec.name} {p.steps} steps x {p.tokens_per_step} tokens"
                                                for p in plans))

    # resume state
    stage_idx, stage_step, global_step, loader_state = 0, 0, 0, None
    trainer_state = None
    if ckpt_path is not None:
        trainer_state = load_trainer_state(str(ckpt_path))
        stage_idx, stage_step = trainer_state["stage_idx"], trainer_state["stage_step"]
        global_step, loader_state = trainer_state["global_step"], trainer_state["loader"]
        for s in plans[:stage_idx + 1]:
            apply_stage_to_model(model, s.spec)
        from safetensors.torch import load_file

        weights = load_file(str(ckpt_path / "model.safetensors"))
        model.load_state_dict(weights, strict=False)
        say(f"resuming from {ckpt_path.name}: stage {plans[stage_idx].spec.name}, step {global_step}")

    train_model = par.parallelize(model, recipe.train.distributed, world, device,
                                  compile=recipe.train.compile,
                                  activation_checkpointing=recipe.train.activation_checkpointing)
    o = recipe.optim
    optimizer = make_optimizer(model, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
    if trainer_state is not None:
        par.load_optimizer_state(train_model, optimizer, trainer_state["optimizer"], recipe.train.distributed)
        _set_rng_state(trainer_state["rng"])

    metrics = MetricsLog(out, global_step if trainer_state is not None else None, main)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if recipe.train.dtype == "bfloat16"
                else contextlib.nullcontext())
    peak, peak_note = _peak_flops(device, recipe.train.dtype, recipe.train.peak_tflops)
    say(f"MFU against {peak / 1e12:.2f} TFLOP/s ({peak_note})")
    raw = model  # the plain module: sampling and checkpoints use it

    def evaluate(seq_len: int) -> dict[str, float]:
        """Held-out loss per source; batches are shared out across ranks and the sums reduced,
        so the figure is the same for any number of processes."""
        was = train_model.training
        train_model.eval()
        sums: dict[str, list[float]] = {}
        batches = iter_eval_batches(data_out, seq_len, recipe.train.micro_batch,
                                    max_windows_per_source=recipe.train.eval_batches * recipe.train.micro_batch)
        with torch.no_grad(), autocast:
            for i, (source, x, y) in enumerate(batches):
                acc = sums.setdefault(source, [0.0, 0.0])
                if i % world != rank:
                    continue
                net = raw if recipe.train.distributed != "fsdp" else train_model
                acc[0] += float(net(x.to(device), targets=y.to(device))) * y.numel()
                acc[1] += y.numel()
        train_model.train(was)
        names = sorted(sums)
        totals = par.all_reduce_sum([v for n in names for v in sums[n]], world)
        res = {f"val_loss_{n}": totals[2 * i] / max(1.0, totals[2 * i + 1]) for i, n in enumerate(names)}
        res["val_loss"] = sum(totals[0::2]) / max(1.0, sum(totals[1::2]))
        res["val_ppl"] = math.exp(min(res["val_loss"], 50.0))
        return res

    def samples() -> list[tuple[str, str]]:
        if not main or recipe.train.distributed == "fsdp":
            return []
        from evolm.generate import SamplingParams, generate

        params = SamplingParams(max_new_tokens=recipe.train.sample_tokens, temperature=0.8, top_k=50,
                                seed=recipe.seed, ignore_eos=False, stop_token_ids=tokenizer.eos_ids)
        outs = []
        for p in recipe.train.sample_prompts:
            ids = tokenizer.encode(p, add_special_tokens=False) or [tokenizer.eos_id or 0]
            new = generate(raw, [ids], params)[0]
            outs.append((p, tokenizer.decode(new, skip_special_tokens=True)))
        return outs

    def save(step_dir: Path, stage_i: int, stage_s: int) -> None:
        msd, osd = par.full_state_dicts(train_model, optimizer, recipe.train.distributed)
        if main:
            state = {"stage_idx": stage_i, "stage_step": stage_s, "global_step": global_step,
                     "loader": loader.state_dict(), "optimizer": osd, "rng": _rng_state(),
                     "recipe": recipe.to_dict()}
            _save_weights(raw, msd, step_dir, state, tokenizer)
            ckpts = sorted(p for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
            for old in ckpts[:-max(1, recipe.train.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        par.barrier(world)

    progress = _Progress(sum(p.steps for p in plans), global_step, enabled=main and sys.stdout.isatty())
    last_train_loss, last_eval, sample_text = float("nan"), {}, []
    steps_this_call = 0
    tokens_seen = sum(p.tokens_per_step * p.steps for p in plans[:stage_idx])  # tokens before this call
    if stage_idx < len(plans):
        tokens_seen += stage_step * plans[stage_idx].tokens_per_step
    throughput: list[float] = []
    stopped_early = False
    train_model.train()

    for si in range(stage_idx, len(plans)):
        plan = plans[si]
        spec = plan.spec
        if si != stage_idx or trainer_state is None:
            apply_stage_to_model(model, spec)
        weights = tier_mixture(manifest, spec.mixture) if isinstance(spec.mixture, str) else spec.mixture
        loader = MixtureLoader(data_out, spec.seq_len, recipe.train.micro_batch, weights=weights,
                               seed=recipe.seed + si, rank=rank, world_size=world,
                               return_segments=recipe.train.doc_masking)
        first = stage_step if si == stage_idx else 0
        if si == stage_idx and loader_state is not None and first > 0:
            loader.load_state_dict(loader_state)
        card = cost_card(model.config, context_len=spec.seq_len)
        flops_per_token = card["flops_per_token"]
        if first == 0:
            say(f"stage {si + 1}/{len(plans)} '{spec.name}': {plan.steps} steps, seq_len {spec.seq_len}, "
                f"{plan.accum} micro-batch(es) of {recipe.train.micro_batch} per step, "
                f"mixture {loader.weights}")
        for step in range(first, plan.steps):
            t0 = time.perf_counter()
            lr = o.lr * lr_at(step, plan.steps, spec.warmup_steps, spec.schedule, spec.lr_end,
                              spec.decay_fraction, spec.lr_start)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum = 0.0
            for micro in range(plan.accum):
                batch = loader.next_batch()
                x, y = batch[0].to(device), batch[1].to(device)
                kwargs = {}
                if recipe.train.doc_masking:
                    seg = batch[2].to(device)
                    kwargs = {"doc_ids": seg, "position_ids": positions_from_segments(seg)}
                sync = (micro == plan.accum - 1) or not hasattr(train_model, "no_sync")
                ctx = contextlib.nullcontext() if sync else train_model.no_sync()
                with ctx:
                    with autocast:
                        loss = train_model(x, targets=y, **kwargs)  # CE (+ MoE aux), fused with the head
                    (loss / plan.accum).backward()
                loss_sum += float(loss.detach())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(train_model.parameters(), o.grad_clip)) \
                if o.grad_clip else float("nan")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if hasattr(raw, "layers"):
                for layer in raw.layers:  # DeepSeek-V3's aux-loss-free balancing, if enabled
                    gate = getattr(layer.mlp, "gate", None)
                    if gate is not None and gate.e_score_correction_bias is not None \
                            and layer.mlp.expert_counts is not None:
                        gate.update_bias(layer.mlp.expert_counts)
            dt = time.perf_counter() - t0
            global_step += 1
            stage_done = step + 1
            steps_this_call += 1
            tokens_seen += plan.tokens_per_step
            last_train_loss = par.all_reduce_mean(loss_sum / plan.accum, world)
            tps = plan.tokens_per_step / dt
            throughput.append(tps)
            progress.update(global_step, last_train_loss, lr, tps)
            row = None
            if global_step % recipe.train.log_every == 0 or step == 0 or stage_done == plan.steps:
                row = {"step": global_step, "stage": spec.name, "loss": last_train_loss, "lr": lr,
                       "grad_norm": grad_norm, "tokens": tokens_seen, "tokens_per_s": tps,
                       "mfu": flops_per_token * tps / peak}
            is_eval = (recipe.train.eval_every and global_step % recipe.train.eval_every == 0) \
                or stage_done == plan.steps
            if is_eval:
                last_eval = evaluate(spec.seq_len)
                row = row or {"step": global_step, "stage": spec.name, "loss": last_train_loss, "lr": lr,
                              "grad_norm": grad_norm, "tokens": tokens_seen, "tokens_per_s": tps,
                              "mfu": flops_per_token * tps / peak}
                row.update(last_eval)
            if row is not None:
                metrics.write(row)
                if not progress.enabled:
                    msg = (f"step {global_step:>5} [{spec.name}] loss {last_train_loss:.4f} lr {lr:.2e} "
                           f"{tps:,.0f} tok/s mfu {100 * row['mfu']:.1f}%")
                    if "val_loss" in row:
                        msg += f" | val loss {row['val_loss']:.4f} ppl {row['val_ppl']:.1f}"
                    say(msg)
            if recipe.train.sample_every and global_step % recipe.train.sample_every == 0:
                for p, text in samples():
                    say(f"  sample | {p}{text!r}")
            if (recipe.train.ckpt_every and global_step % recipe.train.ckpt_every == 0) \
                    or stage_done == plan.steps:
                save(out / "checkpoints" / f"step_{global_step:07d}", si, stage_done)
            if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                if not (out / "checkpoints" / f"step_{global_step:07d}").exists():
                    save(out / "checkpoints" / f"step_{global_step:07d}", si, stage_done)
                stopped_early = True
                break
        if stopped_early:
            break
        stage_step = 0
    progress.close()

    summary = {"run_dir": str(out), "steps": global_step, "tokens": tokens_seen, "train_loss": last_train_loss,
               **last_eval, "tokens_per_s": float(np.median(throughput)) if throughput else 0.0,
               "wall_s": time.time() - t_start, "stopped_early": stopped_early,
               "losses": [r["loss"] for r in metrics.rows]}
    if not stopped_early:  # gathering the full state is a collective: every rank takes part
        msd, _ = par.full_state_dicts(train_model, optimizer, recipe.train.distributed)
    if main and not stopped_early:
        sample_text = samples()
        for p, text in sample_text:
            say(f"  sample | {p}{text!r}")
        _save_weights(raw, msd, out / "final", None, tokenizer)
        _promote_final(out)
        _plot(metrics.rows, out / "loss.png", plans)
        _report(recipe, config, manifest, plans, summary, sample_text, peak_note, out / "report.md")
        say(f"done: {global_step} steps, {tokens_seen:,} tokens in {summary['wall_s']:.0f}s; "
            f"val loss {summary.get('val_loss', float('nan')):.4f}; run folder {out}")
    metrics.close()
    par.barrier(world)
    return summary


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------
def _save_weights(model, state: dict, path: Path, trainer_state: dict | None, tokenizer) -> None:
    """An evolm checkpoint folder (+ tokenizer files) written atomically."""

    class _View:  # save_checkpoint wants .state_dict() and .config
        def __init__(self, config, sd):
            self.config, self._sd = config, sd

        def state_dict(self):
            return self._sd

    extra = {}
    if tokenizer is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save(tmp)
            for name in os.listdir(tmp):
                extra[name] = Path(tmp, name).read_text()
    save_checkpoint(_View(model.config, state), str(path), trainer_state, extra_files=extra)


def _promote_final(out: Path) -> None:
    """Copy the final model files to the run folder itself so it loads as a model."""
    final = out / "final"
    for f in final.iterdir():
        shutil.copy2(f, out / f.name)
    shutil.rmtree(final)


def _plot(rows: list[dict], path: Path, plans: list[StagePlan]) -> None:
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1.2)
    ev = [r for r in rows if "val_loss" in r]
    if ev:
        ax.plot([r["tokens"] for r in ev], [r["val_loss"] for r in ev], "o-", label="val loss", ms=3)
    boundary = 0
    for p in plans[:-1]:
        boundary += p.steps * p.tokens_per_step
        ax.axvline(boundary, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(" -> ".join(p.spec.name for p in plans))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _report(recipe, config, manifest, plans, summary, samples, peak_note, path: Path) -> None:
    from evolm.analysis.cost import cost_card, human_count

    card = cost_card(config, context_len=plans[-1].spec.seq_len)
    lines = [f"# {recipe.name}", "",
             f"Model: `{recipe.model.preset or recipe.model.config or recipe.model.init}` with overrides "
             f"`{recipe.model.overrides}`: {human_count(card['params_total'])} parameters "
             f"({card['params_total']:,}), d_model {config.d_model}, {config.n_layers} layers, "
             f"{config.n_heads} heads / {config.n_kv_heads} KV heads, vocab {config.vocab_size}.", "",
             "## Data", "", "| source | train tokens | val tokens | documents |", "|---|---|---|---|"]
    for name, info in manifest.get("sources", {}).items():
        splits = info.get("splits", {})
        tr, va = splits.get("train", {}), splits.get("val", {})
        lines.append(f"| {name} | {tr.get('tokens', 0):,} | {va.get('tokens', 0):,} | "
                     f"{tr.get('docs', 0) + va.get('docs', 0):,} |")
    lines += ["", "## Stages", "", "| stage | steps | tokens/step | seq_len | LR | mixture |", "|---|---|---|---|---|---|"]
    for p in plans:
        s = p.spec
        lines.append(f"| {s.name} | {p.steps} | {p.tokens_per_step:,} | {s.seq_len} | {s.schedule} "
                     f"{s.lr_start}->{s.lr_end} x {recipe.optim.lr} | {s.mixture or 'data weights'} |")
    lines += ["", "## Results", "",
              f"- steps {summary['steps']}, tokens {summary['tokens']:,}, wall time {summary['wall_s']:.0f} s",
              f"- final train loss {summary['train_loss']:.4f}",
              f"- final val loss {summary.get('val_loss', float('nan')):.4f} "
              f"(perplexity {summary.get('val_ppl', float('nan')):.2f})"]
    for k, v in summary.items():
        if k.startswith("val_loss_"):
            lines.append(f"  - {k[9:]}: {v:.4f}")
    lines += [f"- throughput (median) {summary['tokens_per_s']:,.0f} tokens/s; MFU against {peak_note}",
              "", "![loss](loss.png)", "", "## Samples", ""]
    for p, text in samples:
        lines.append(f"- `{p}` → {text!r}")
    path.write_text("\n".join(lines) + "\n")


class _Progress:
    """A live bar on a terminal (rich); plain log lines otherwise."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn())
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=done, info="")

    def update(self, step: int, loss: float, lr: float, tps: float) -> None:
        if self.enabled:
            self.bar.update(self.task, completed=step, info=f"loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s")

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
