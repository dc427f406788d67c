"""The shared training loop against a plain-PyTorch reference loop, frozen parameters,
resume, metrics, the benchmark hook and its errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from evolm import ModelConfig, build
from evolm.train.loop import LoopConfig, Phase, Task, run


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, norm="rmsnorm", pos_emb="rope",
                             max_seq_len=16, mlp="glu", activation="silu"))


class ToyTask:
    """Random token sequences from a seeded generator; the data position is the batch count."""

    def __init__(self, seed: int = 7):
        self.seed, self.i = seed, 0
        self.phases = []

    def _batch(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1000 + i)
        return torch.randint(0, 64, (2, 13), generator=g)

    def start_phase(self, index, phase):
        self.phases.append(index)

    def next_batch(self):
        self.i += 1
        return self._batch(self.i)

    def loss(self, model, batch):
        return model(batch[:, :-1], targets=batch[:, 1:]), {"tokens": batch[:, :-1].numel(), "extra": 1.5}

    def evaluate(self, model):
        return {"val_loss": float(model(self._batch(-1)[:, :-1], targets=self._batch(-1)[:, 1:]))}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


PHASES = [Phase("warm", steps=3, accum=2, warmup_steps=2, schedule="cosine", lr_end=0.5),
          Phase("decay", steps=3, accum=1, schedule="linear", lr_start=0.5, lr_end=0.0)]
CFG = LoopConfig(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=0.5, log_every=1, eval_every=2,
                 ckpt_every=2)


def _reference_losses() -> list[float]:
    """The same training written out in plain PyTorch: AdamW with decay on matrices only, the
    warmup-cosine / linear formulas, accumulation by averaging, clipping at 0.5."""
    model, task = _model(), ToyTask()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    out = []
    for ph in PHASES:
        for step in range(ph.steps):
            if step < ph.warmup_steps:
                mult = ph.lr_start * (step + 1) / ph.warmup_steps
            else:
                frac = min(1.0, (step - ph.warmup_steps) / max(1, ph.steps - ph.warmup_steps - 1))
                if ph.schedule == "cosine":
                    mult = ph.lr_end + (ph.lr_start - ph.lr_end) * 0.5 * (1 + math.cos(math.pi * frac))
                else:
                    mult = ph.lr_start + (ph.lr_end - ph.lr_start) * frac
            for g in opt.param_groups:
                g["lr"] = 1e-2 * mult
            total = 0.0
            for _ in range(ph.accum):
                b = task.next_batch()
                loss = model(b[:, :-1], targets=b[:, 1:])
                (loss / ph.accum).backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
            out.append(total / ph.accum)
    return out


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_loop_equals_a_plain_pytorch_loop(tmp_path):
    task = ToyTask()
    s = run(_model(), task, PHASES, CFG, tmp_path / "run", log=lambda m: None)
    assert s["losses"] == pytest.approx(_reference_losses(), rel=1e-6, abs=1e-6)
    rows = _rows(tmp_path / "run")
    assert [r["stage"] for r in rows] == ["warm"] * 3 + ["decay"] * 3
    assert rows[-1]["lr"] == 0.0 and rows[0]["extra"] == 1.5
    assert rows[0]["tokens"] == 2 * 2 * 12 and rows[-1]["tokens"] == 9 * 2 * 12  # 2+2+2+1+1+1 micro-batches
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 3, 4, 6]  # every 2 steps + each phase's end
    assert task.phases == [0, 1]
    assert (tmp_path / "run" / "loss.png").is_file() and (tmp_path / "run" / "model.safetensors").is_file()


def test_resume_is_exact_and_checkpoints_are_pruned(tmp_path):
    full = run(_model(), ToyTask(), PHASES, CFG, tmp_path / "a", log=lambda m: None)
    run(_model(), ToyTask(), PHASES, CFG, tmp_path / "b", log=lambda m: None, stop_after_steps=4)
    again = ToyTask()
    s = run(_model(1), again, PHASES, CFG, tmp_path / "b", log=lambda m: None, resume=True)  # weights from ckpt
    assert s["losses"] == full["losses"]
    assert again.phases == [1]  # resumed inside the second phase: only it starts
    assert len(list((tmp_path / "b" / "checkpoints").iterdir())) == CFG.keep_checkpoints


def test_frozen_parameters_are_left_alone_and_checkpointed_apart(tmp_path):
    model = _model()
    for n, p in model.named_parameters():
        p.requires_grad = "mlp" in n
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    run(model, ToyTask(), PHASES[:1], CFG, tmp_path / "r", log=lambda m: None, stop_after_steps=2)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "r" / "checkpoints" / "step_0000002" / "trainable.safetensors"))
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    opt_state = torch.load(tmp_path / "r" / "checkpoints" / "step_0000002" / "trainer.pt", weights_only=True)
    n_opt = sum(len(g["params"]) for g in opt_state["optimizer"]["param_groups"])
    assert n_opt == len(saved)


def test_tasks_follow_the_protocol():
    from evolm.post.sft import SftTask
    from evolm.train.pretrain import PretrainTask

    assert isinstance(ToyTask(), Task)
    for cls in (PretrainTask, SftTask):
        for m in ("start_phase", "next_batch", "loss", "evaluate", "state_dict", "load_state_dict"):
            assert callable(getattr(cls, m)), (cls, m)


def test_benchmark_hook_logs_its_metrics(tmp_path, monkeypatch):
    import evolm.eval as ev

    calls = []

    def fake(model, tokenizer, tasks, limit, batch_size):
        calls.append((tuple(tasks), limit))
        return {f"{t}_acc": 0.25 for t in tasks}

    monkeypatch.setattr(ev, "evaluate_in_training", fake, raising=False)
    cfg = LoopConfig(lr=1e-3, log_every=1, eval_every=2, ckpt_every=0, eval_tasks=["arc_easy"], eval_tasks_limit=5)
    run(_model(), ToyTask(), [Phase("p", steps=2)], cfg, tmp_path / "r", log=lambda m: None)
    rows = _rows(tmp_path / "r")
    assert rows[-1]["arc_easy_acc"] == 0.25 and calls == [(("arc_easy",), 5)]


def test_errors():
    with pytest.raises(ValueError, match="phase 'x': steps must be >= 1"):
        Phase("x", steps=0)
    with pytest.raises(ValueError, match="phase 'x': schedule must be one of"):
        Phase("x", steps=1, schedule="exp")
    with pytest.raises(ValueError, match="LoopConfig.dtype must be float32 or bfloat16"):
        run(_model(), ToyTask(), [Phase("p", steps=1)], LoopConfig(dtype="fp8"), "/tmp/unused-evolm-run")


def test_real_benchmark_hook_in_a_run(tmp_path):
    """With the eval package's evaluate_in_training and installed ARC-Easy data: scores land in
    metrics.jsonl at eval steps, and training continues exactly as without them."""
    from evolm.train.loop import find_eval_in_training
    from evolm.tokenizer import train_bpe

    if find_eval_in_training() is None:
        pytest.skip("no evolm.eval evaluate_in_training")
    from evolm.eval import data as eval_data

    if not (eval_data.default_data_dir() / "arc_easy").is_dir():
        pytest.skip("missing asset benchmark data (required; install: make eval-data)")
    tok = train_bpe(["The quick brown fox jumps over the lazy dog. Science question answer."] * 20, vocab_size=300)
    cfg = dict(lr=1e-3, log_every=1, eval_every=2, ckpt_every=0)

    def model():
        torch.manual_seed(0)
        return build(ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=4, max_seq_len=512))

    with_eval = run(model(), ToyTask(), [Phase("p", steps=2)],
                    LoopConfig(**cfg, eval_tasks=["arc_easy"], eval_tasks_limit=4), tmp_path / "a",
                    tokenizer=tok, log=lambda m: None)
    plain = run(model(), ToyTask(), [Phase("p", steps=2)], LoopConfig(**cfg), tmp_path / "b", log=lambda m: None)
    row = _rows(tmp_path / "a")[-1]
    assert 0.0 <= row["arc_easy/acc"] <= 1.0
    assert with_eval["losses"] == plain["losses"]
